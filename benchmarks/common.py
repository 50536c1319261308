"""Shared by the benchmarks: timing, a description of the machine, and the results file."""

from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from cigl.runfiles import write_text

RESULTS = Path(__file__).resolve().parent / "results"
# real CIFAR-10 JPEGs from ../shared/data beside the checkout
CIFAR_ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.xz"


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall-clock seconds of `fn()` over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine() -> dict:
    """CPU model, core count and library versions, so a result file says where it came from."""
    first: dict[str, str] = {}  # each /proc/cpuinfo key's value for the first core
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            first.setdefault(key, value)
    except OSError:
        pass
    flags = set(first.get("flags", "").split())
    info = {
        "cpu": first.get("model name") or platform.processor(),
        # AMD family 25 is Zen 3 (model 1) or Zen 4 (model 17): the same name, other kernels' speed
        "cpu_family_model": f"{first.get('cpu family', '?')}/{first.get('model', '?')}",
        "simd": "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "",
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        import numpy

        info["numpy"] = numpy.__version__
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def commit() -> str | None:
    """The checkout's short commit; on a machine without the git history (a lent GPU machine gets
    the working tree only) $CIGL_COMMIT, which benchmarks/gpu_lease.sh reads from .dev/commit."""
    try:
        cmd = ["git", "rev-parse", "--short", "HEAD"]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=RESULTS.parent)
        if out.returncode == 0:
            return out.stdout.strip()
    except OSError:
        pass
    return os.environ.get("CIGL_COMMIT")


def write_results(name: str, results: dict) -> Path:
    """benchmarks/results/<name>.json with the commit measured and the machine description."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    head = {"benchmark": name, "measured_at_commit": commit(), "machine": machine()}
    write_text(path, json.dumps({**head, **results}, indent=2) + "\n")
    return path


def start_server(model: Path) -> tuple[subprocess.Popen, str]:
    """cigl-serve on `model` on a free loopback port, once /healthz answers: (process, base URL).
    The caller terminates the process."""
    import contextlib

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "cigl.serve.http", str(model), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                break
        time.sleep(0.1)
    return proc, base
