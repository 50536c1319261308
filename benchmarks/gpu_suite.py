"""Everything a lent GPU machine should measure, in one run of at most ~8 minutes:

1. tests/test_cuda.py (the CUDA paths, the no-sync step under sync debug mode "error");
2. the CUDA rows of benchmarks/sparse_overhead.py and benchmarks/train_step.py;
3. one CIFAR-10 epoch (evaluation included) of CIFAR ResNet-50, dense vs CigL, side by side;
4. five WRN-22-2 runs sharing the GPU (dense, RigL and CigL at densities 0.1 and 0.05): the
   epoch time of each while all run.

    python benchmarks/gpu_suite.py --data-dir data/cifar10      # results: benchmarks/results/gpu_suite.json

The JSON names the GPU; with $OUT set (the device tool) a copy goes there too. Stops with a
one-line message on a machine without CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import RESULTS, write_results  # noqa: E402

SHARING = [("dense", None), ("rigl", 0.1), ("rigl", 0.05), ("cigl", 0.1), ("cigl", 0.05)]


def run(cmd: list[str], timeout: float) -> dict:
    """Run a command; its exit code, wall time and the tail of its output."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        code, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        code, out = "timeout", (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else ""
    return {"cmd": " ".join(cmd[1:]), "rc": code, "seconds": round(time.perf_counter() - t0, 1), "tail": out[-1500:]}


def train_cmd(data_dir: str, model: str, method: str, density: float | None, out: Path, epochs: int) -> list[str]:
    cmd = [sys.executable, "-m", "cigl.train", "--dataset", "cifar10", "--data-dir", data_dir, "--model", model]
    cmd += ["--method", method, "--epochs", str(epochs), "--batch-size", "128", "--device", "cuda", "--val-size", "0"]
    cmd += ["--out", str(out), "--quiet"] + (["--density", str(density)] if density else [])
    return cmd


def epoch_times(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] if out.exists() else []
    return [r["time_s"] for r in rows]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="data/cifar10", help="CIFAR-10 as an ImageFolder (make data)")
    p.add_argument("--work", default="runs/gpu-suite", help="scratch folder for the runs")
    args = p.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("error: the GPU suite needs a CUDA GPU; on CPU run `make test` and `make bench`", file=sys.stderr)
        return 2
    work = ROOT / args.work
    shutil.rmtree(work, ignore_errors=True)
    results: dict = {"gpu": torch.cuda.get_device_name(0), "steps": {}}

    # 1-2: the CUDA tests and the benchmarks' CUDA rows
    results["steps"]["cuda_tests"] = run([sys.executable, "-m", "pytest", "-q", "tests/test_cuda.py"], 240)
    for name in ("sparse_overhead", "train_step"):
        results["steps"][name] = run([sys.executable, f"benchmarks/{name}.py"], 150)
        path = RESULTS / f"{name}.json"
        results[name] = json.loads(path.read_text()) if path.is_file() else None

    # 3: one full CIFAR-10 epoch of ResNet-50, dense then CigL (2 epochs: the first warms up)
    results["resnet50_epoch_s"] = {}
    for method in ("dense", "cigl"):
        out = work / f"resnet50-{method}"
        results["steps"][f"resnet50_{method}"] = run(train_cmd(args.data_dir, "resnet50", method, None, out, 2), 120)
        results["resnet50_epoch_s"][method] = epoch_times(out)

    # 4: five WRN-22-2 runs at once on the one GPU
    procs = {}
    for method, density in SHARING:
        name = f"{method}-d{density}" if density else method
        procs[name] = subprocess.Popen(
            train_cmd(args.data_dir, "wrn22_2", method, density, work / f"share-{name}", 3),
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
    deadline = time.time() + 150
    for proc in procs.values():
        try:
            proc.wait(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
    results["sharing_epoch_s"] = {name: epoch_times(work / f"share-{name}") for name in procs}
    times = results["sharing_epoch_s"]
    last = {n: t[-1] for n, t in times.items() if t}
    if "cigl-d0.1" in last and "rigl-d0.1" in last:
        results["sharing_cigl_over_rigl"] = last["cigl-d0.1"] / last["rigl-d0.1"]
    path = write_results("gpu_suite", results)
    if os.environ.get("OUT"):
        shutil.copy(path, Path(os.environ["OUT"]) / path.name)
    print(
        json.dumps({k: v for k, v in results.items() if k not in ("steps", "sparse_overhead", "train_step")}, indent=1)
    )
    print("steps: " + ", ".join(f"{n} rc={s['rc']} {s['seconds']}s" for n, s in results["steps"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
