"""Serving speed, side by side in one run.

1. onnxruntime (cigl.serve.Predictor) vs torch eager on the same exported CIFAR ResNet-20
   (density 0.1): batch-1 latency and batch-64 throughput. Goal: ORT >= 1.5x torch at batch 64.
2. cigl-serve over loopback HTTP with 32 concurrent clients and a bounded number of requests
   (one real CIFAR-10 JPEG each): requests/s, p50/p99 latency, errors. Goal: 0 errors.
Both engines use all cores; onnxruntime's threads do not spin, and blocks are separated by a
pause, so one engine's idle threads do not slow the other.
"""

from __future__ import annotations

import contextlib
import io
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CIFAR_ARCHIVE, median_time, start_server, write_results

import cigl.export as cx
from cigl.data import CIFAR10_CLASSES, extract_archive_subset
from cigl.export import cli
from cigl.serve.predictor import Predictor
from cigl.testing import fake_model_file

CLIENTS, REQUESTS = 32, 640


def engines(root: Path, check: Path) -> dict:
    src = root / "run" / "model.pt"
    fake_model_file(src, "resnet20", density=0.1, classes=CIFAR10_CLASSES)
    with contextlib.redirect_stdout(io.StringIO()):
        cli.main([str(src), "--check-data", str(check)])
    predictor = Predictor(src.parent / "model.onnx", device="cpu", engine="onnxruntime")
    eager = cx.load_model(src.parent / "model.safetensors")
    rng = np.random.default_rng(0)
    out = {}
    for batch, repeats in ((1, 200), (64, 20)):
        x = rng.normal(size=(batch, 3, 32, 32)).astype(np.float32)
        xt = torch.from_numpy(x)
        with torch.inference_mode():
            t_torch = median_time(lambda: eager(xt), repeats, warmup=5)  # noqa: B023
        time.sleep(1.0)
        t_ort = median_time(lambda: predictor.predict(x), repeats, warmup=5)  # noqa: B023
        time.sleep(1.0)
        out[f"batch{batch}"] = {
            "torch_ms": 1000 * t_torch,
            "ort_ms": 1000 * t_ort,
            "ort_speedup": t_torch / t_ort,
            "torch_images_per_s": batch / t_torch,
            "ort_images_per_s": batch / t_ort,
        }
    return out, src.parent / "model.onnx"


def http(model: Path, image: bytes) -> dict:
    proc, base = start_server(model)
    try:
        client = httpx.Client(timeout=60, limits=httpx.Limits(max_connections=CLIENTS))

        def one(_):
            t0 = time.perf_counter()
            try:
                ok = (
                    client.post(base + "/v1/predict", files={"file": ("img.jpg", image, "image/jpeg")}).status_code
                    == 200
                )
            except httpx.HTTPError:
                ok = False
            return time.perf_counter() - t0, ok

        for _ in range(CLIENTS):  # warm-up
            one(0)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(CLIENTS) as pool:
            results = list(pool.map(one, range(REQUESTS)))
        wall = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    lat = sorted(r[0] for r in results)
    return {
        "clients": CLIENTS,
        "requests": REQUESTS,
        "requests_per_s": REQUESTS / wall,
        "p50_ms": 1000 * statistics.median(lat),
        "p99_ms": 1000 * lat[int(0.99 * (len(lat) - 1))],
        "errors": sum(not r[1] for r in results),
    }


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        check = extract_archive_subset(CIFAR_ARCHIVE, Path(tmp) / "check", {"test": 10}) / "test"
        eng, model = engines(Path(tmp), check)
        image = sorted((check / "cat").iterdir())[0].read_bytes()
        results = {
            "model": "resnet20 (CIFAR, density 0.1)",
            "engines": eng,
            "http": http(model, image),
            "goals": {"ort_speedup_batch64": 1.5, "http_errors": 0},
        }
    print(write_results("serve", results))
    for k, v in results["engines"].items():
        print(f"{k}: torch {v['torch_ms']:.2f} ms, onnxruntime {v['ort_ms']:.2f} ms ({v['ort_speedup']:.2f}x)")
    h = results["http"]
    print(
        f"http: {h['requests_per_s']:.0f} req/s, p50 {h['p50_ms']:.1f} ms, p99 {h['p99_ms']:.1f} ms, "
        f"{h['errors']} errors ({h['clients']} clients, {h['requests']} requests)"
    )


if __name__ == "__main__":
    main()
