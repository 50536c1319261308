"""Everything a lent GPU machine should measure, in one run within a time budget (default 8 min):

1. tests/test_cuda.py (the CUDA paths, the no-sync step under sync debug mode "error");
2. the CUDA rows of benchmarks/sparse_overhead.py and benchmarks/train_step.py;
3. CIFAR-10 epochs (evaluation included) of CIFAR ResNet-50, dense vs CigL, side by side;
4. WRN-22-2 epochs alone, dense vs CigL, and CigL with every step eager (--no-cuda-graph);
5. five WRN-22-2 runs sharing the GPU (dense, RigL and CigL at densities 0.1 and 0.05): the
   epoch time of each while all run;
6. make repro-gpu's seven WRN-22-2 runs packed for 3 epochs: its estimated minutes;
7. with the time left, ResNet-50 dense with --compile against step 3's eager epoch.

    python benchmarks/gpu_suite.py --data-dir data/cifar10      # results: benchmarks/results/gpu_suite.json

Each step's time limit is cut to what the budget has left, and the JSON (GPU named) is written
after every step, so a run stopped early still leaves what it measured; with $OUT set (the device
tool) a copy goes there too. Stops with a one-line message on a machine without CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tools")]
from common import RESULTS, write_results  # noqa: E402
from study import REPRO_GPU  # noqa: E402

SHARING = [("dense", None), ("rigl", 0.1), ("rigl", 0.05), ("cigl", 0.1), ("cigl", 0.05)]


class Budget:
    """Seconds left of the suite's budget; a step's limit is its own or what is left, whichever is less."""

    def __init__(self, seconds: float) -> None:
        self.end = time.time() + seconds

    def left(self) -> float:
        return self.end - time.time()

    def limit(self, seconds: float) -> float:
        return max(1.0, min(seconds, self.left()))


def run(cmd: list[str], timeout: float) -> dict:
    """Run a command; its exit code, wall time and the tail of its output."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        code, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        code, out = "timeout", exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else ""
    return {"cmd": " ".join(cmd[1:]), "rc": code, "seconds": round(time.perf_counter() - t0, 1), "tail": out[-1500:]}


def train_cmd(data_dir: str, model: str, method: str, density: float | None, out: Path, epochs: int) -> list[str]:
    cmd = [sys.executable, "-m", "cigl.train", "--dataset", "cifar10", "--data-dir", data_dir, "--model", model]
    cmd += ["--method", method, "--epochs", str(epochs), "--batch-size", "128", "--device", "cuda", "--val-size", "0"]
    cmd += ["--out", str(out), "--quiet"] + (["--density", str(density)] if density else [])
    return cmd


def epoch_times(out: Path) -> list[float]:
    """time_s of each epoch in a run's metrics.jsonl (training steps, averaging fold, evaluation)."""
    path = out / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return [r["time_s"] for r in rows]


def save(results: dict) -> Path:
    """The results so far: benchmarks/results/gpu_suite.json, and a copy in $OUT when set."""
    path = write_results("gpu_suite", results)
    if os.environ.get("OUT"):
        shutil.copy(path, Path(os.environ["OUT"]) / path.name)
    return path


@dataclass
class Suite:
    """The results so far, the time budget, the data and the scratch folder."""

    results: dict
    budget: Budget
    data_dir: str
    work: Path


def timed_runs(suite: Suite, key: str, model: str, runs: list, epochs: int, limit: float) -> None:
    """Train each (method, density, extra args) alone, one after another; epoch times under results[key]."""
    results, budget, data_dir, work = suite.results, suite.budget, suite.data_dir, suite.work
    results[key] = {}
    for method, density, extra in runs:
        if budget.left() < 20:
            break
        name = "-".join([method] + [e.lstrip("-") for e in extra])
        out = work / f"{model}-{name}"
        cmd = train_cmd(data_dir, model, method, density, out, epochs) + extra
        results["steps"][f"{model}_{name}"] = run(cmd, budget.limit(limit))
        results[key][name] = epoch_times(out)
        save(results)


def sharing(suite: Suite, epochs: int) -> None:
    """The SHARING runs at once on the one GPU; the epoch times of each while all ran."""
    results, budget, data_dir, work = suite.results, suite.budget, suite.data_dir, suite.work
    procs = {}
    for method, density in SHARING:
        name = f"{method}-d{density}" if density else method
        out = work / f"share-{name}"
        procs[name] = subprocess.Popen(
            train_cmd(data_dir, "wrn22_2", method, density, out, epochs), cwd=ROOT, stdout=subprocess.DEVNULL
        )
    end = time.time() + budget.limit(200)
    for proc in procs.values():
        try:
            proc.wait(timeout=max(1, end - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
    times = {name: epoch_times(work / f"share-{name}") for name in procs}
    results["sharing_epoch_s"] = times
    results["sharing_cigl_over_rigl"] = sharing_ratios(times)
    save(results)


def repro_estimate(suite: Suite, epochs: int) -> None:
    """make repro-gpu's grid (tools/study.py run --repro-gpu, seven WRN-22-2 runs packed) for a few
    epochs: its minutes for its REPRO_GPU["epochs"] (250), from the median epoch after the first
    (start-up)."""
    results, budget, work = suite.results, suite.budget, suite.work / "repro"
    cmd = [sys.executable, "tools/study.py", "run", "--repro-gpu", "--data-dir", suite.data_dir]
    cmd += ["--epochs", str(epochs), "--seeds", "0"]
    limit = budget.limit(150)  # the study stops its runs at --minutes; the timeout is a backstop
    cmd += ["--runs", str(work), "--minutes", f"{limit / 60:.3f}"]
    results["steps"]["repro_gpu"] = run(cmd, limit + 60)
    times = {out.name: epoch_times(out) for out in sorted(work.glob("*-s0"))}
    later = [t for epoch_s in times.values() for t in epoch_s[1:]]
    results["repro_gpu_epoch_s"] = times
    if later:
        results["repro_gpu_estimate_min"] = round(REPRO_GPU["epochs"] * statistics.median(later) / 60, 1)
    save(results)


def sharing_ratios(times: dict[str, list[float]]) -> dict[str, float]:
    """CigL's whole run over RigL's at each density, epochs summed. The runs start together, but
    finish at different moments, and a last epoch run alone on the GPU says nothing of sharing."""
    ratios = {}
    for name, cigl in times.items():
        rigl = times.get(name.replace("cigl", "rigl"), [])
        if name.startswith("cigl") and len(cigl) == len(rigl) > 0:
            ratios[name.removeprefix("cigl-")] = round(sum(cigl) / sum(rigl), 3)
    return ratios


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="data/cifar10", help="CIFAR-10 as an ImageFolder (make data)")
    p.add_argument("--work", default="runs/gpu-suite", help="scratch folder for the runs")
    p.add_argument("--minutes", type=float, default=8.0, help="time budget of the whole suite (default 8)")
    args = p.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("error: the GPU suite needs a CUDA GPU; on CPU run `make test` and `make bench`", file=sys.stderr)
        return 2
    budget = Budget(60 * args.minutes)
    work = ROOT / args.work
    shutil.rmtree(work, ignore_errors=True)
    results: dict = {"gpu": torch.cuda.get_device_name(0), "steps": {}}
    suite = Suite(results, budget, args.data_dir, work)

    # 1-2: the CUDA tests and the benchmarks' CUDA rows
    results["steps"]["cuda_tests"] = run(
        [sys.executable, "-m", "pytest", "-q", "tests/test_cuda.py"], budget.limit(240)
    )
    save(results)
    for name in ("sparse_overhead", "train_step"):
        results["steps"][name] = run([sys.executable, f"benchmarks/{name}.py"], budget.limit(150))
        path = RESULTS / f"{name}.json"
        results[name] = json.loads(path.read_text()) if path.is_file() else None
        save(results)

    # 3-4: full CIFAR-10 epochs, one run at a time (the first epoch warms up)
    timed_runs(suite, "resnet50_epoch_s", "resnet50", [("dense", None, []), ("cigl", None, [])], 2, 120)
    alone = [("dense", None, []), ("cigl", None, []), ("cigl", None, ["--no-cuda-graph"])]
    timed_runs(suite, "wrn22_2_alone_epoch_s", "wrn22_2", alone, 3, 90)

    # 5: five WRN-22-2 runs at once on the one GPU
    if budget.left() > 40:
        sharing(suite, 3)

    # 6: make repro-gpu's seven runs packed: how long its 250 epochs would take
    if budget.left() > 60:
        repro_estimate(suite, 3)

    # 7: torch.compile against eager, ResNet-50 dense (compiling takes the first epoch)
    if budget.left() > 90:
        timed_runs(suite, "resnet50_compile_epoch_s", "resnet50", [("dense", None, ["--compile"])], 3, 240)

    save(results)
    shown = {k: v for k, v in results.items() if k not in ("steps", "sparse_overhead", "train_step")}
    print(json.dumps(shown, indent=1))
    print("steps: " + ", ".join(f"{n} rc={s['rc']} {s['seconds']}s" for n, s in results["steps"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
