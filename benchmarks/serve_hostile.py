"""cigl-serve under a mix of good and hostile requests: no 5xx, memory flat.

A real cigl-serve (uvicorn, loopback) on an exported CIFAR ResNet-20 gets REQUESTS requests from
CLIENTS concurrent clients, drawn in a fixed order from: real CIFAR-10 JPEGs, 16-bit PNGs, image
bombs (a PNG header declaring 20000 x 20000 pixels), random bytes, deeply nested JSON, NaN and
ragged JSON inputs, too many files, broken multipart framing and over-large bodies. It counts
status codes (goal: 0 answers >= 500, every good request 200, every bad one 4xx) and samples the
server's resident memory every 0.25 s (goal: the last quarter's median within 10% of the second
quarter's).

    python benchmarks/serve_hostile.py     # -> benchmarks/results/serve_hostile.json
"""

from __future__ import annotations

import contextlib
import io
import itertools
import struct
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CIFAR_ARCHIVE, start_server, write_results

from cigl.data import CIFAR10_CLASSES, extract_archive_subset
from cigl.export import cli
from cigl.testing import fake_model_file

CLIENTS, REQUESTS = 64, int(sys.argv[1]) if len(sys.argv) > 1 else 6400


def bomb_png(width: int = 20_000, height: int = 20_000) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (4, 4)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def request_kinds(jpeg: bytes) -> dict[str, tuple[bool, dict]]:
    """name -> (is a good request, httpx.post keyword arguments)."""
    sixteen = io.BytesIO()
    Image.fromarray(np.asarray(Image.open(io.BytesIO(jpeg)).convert("L"), np.uint16) * 257).save(sixteen, "PNG")
    json_type = {"content-type": "application/json"}
    nested = b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    return {
        "jpeg": (True, {"files": {"f": ("a.jpg", jpeg, "image/jpeg")}}),
        "png16": (True, {"files": {"f": ("a.png", sixteen.getvalue(), "image/png")}}),
        "bomb": (False, {"files": {"f": ("b.png", bomb_png(), "image/png")}}),
        "random_bytes": (False, {"files": {"f": ("r.png", bytes(range(256)) * 8, "image/png")}}),
        "nested_json": (False, {"content": nested, "headers": json_type}),
        "nan_json": (False, {"content": b'{"inputs": [[[[1e999]]]]}', "headers": json_type}),
        "ragged_json": (False, {"json": {"inputs": [[[1, 2], [3]]]}}),
        "too_many_files": (False, {"files": [("f", (f"{i}.jpg", jpeg, "image/jpeg")) for i in range(70)]}),
        "broken_multipart": (
            False,
            {"content": b"--xyz\r\nContent-Disposition: form-data", "headers": {"content-type": "multipart/form-data"}},
        ),
        "oversized": (False, {"content": b"0" * (11 * 1024 * 1024), "headers": json_type}),
    }


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def hammer(model: Path, jpeg: bytes) -> dict:
    proc, base = start_server(model)
    kinds = request_kinds(jpeg)
    order = list(itertools.islice(itertools.cycle(sorted(kinds)), REQUESTS))
    statuses: dict[str, Counter] = {k: Counter() for k in kinds}
    memory: list[float] = []
    done = threading.Event()
    try:

        def sample_memory() -> None:
            while not done.is_set():
                memory.append(rss_mb(proc.pid))
                time.sleep(0.25)

        sampler = threading.Thread(target=sample_memory)
        sampler.start()
        client = httpx.Client(timeout=120, limits=httpx.Limits(max_connections=CLIENTS))

        def one(kind: str) -> None:
            try:
                status = client.post(base + "/v1/predict", **kinds[kind][1]).status_code
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            statuses[kind][status] += 1

        t0 = time.perf_counter()
        with ThreadPoolExecutor(CLIENTS) as pool:
            list(pool.map(one, order))
        wall = time.perf_counter() - t0
        alive = httpx.get(base + "/healthz", timeout=5).status_code == 200
        done.set()
        sampler.join()
    finally:
        done.set()
        proc.terminate()
        proc.wait(timeout=30)
    q = len(memory) // 4
    second, last = float(np.median(memory[q : 2 * q])), float(np.median(memory[3 * q :]))
    server_errors = sum(n for c in statuses.values() for s, n in c.items() if not isinstance(s, int) or s >= 500)
    good_ok = all(set(statuses[k]) == {200} for k, (good, _) in kinds.items() if good)
    bad = [k for k, (good, _) in kinds.items() if not good]
    bad_4xx = all(isinstance(s, int) and 400 <= s < 500 for k in bad for s in statuses[k])
    return {
        "clients": CLIENTS,
        "requests": REQUESTS,
        "wall_s": round(wall, 1),
        "status_by_kind": {k: {str(s): n for s, n in c.items()} for k, c in statuses.items()},
        "responses_5xx_or_failed": server_errors,
        "good_all_200": good_ok,
        "bad_all_4xx": bad_4xx,
        "alive_after": alive,
        "rss_mb": {"start": memory[0], "second_quarter": second, "last_quarter": last, "max": max(memory)},
        "memory_flat": last <= 1.1 * second,
    }


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        check = extract_archive_subset(CIFAR_ARCHIVE, root / "check", {"test": 10}) / "test"
        src = root / "run" / "model.pt"
        fake_model_file(src, "resnet20", density=0.1, classes=CIFAR10_CLASSES)
        with contextlib.redirect_stdout(io.StringIO()):
            cli.main([str(src), "--check-data", str(check)])
        jpeg = sorted((check / "cat").iterdir())[0].read_bytes()
        result = hammer(src.parent / "model.onnx", jpeg)
    print(write_results("serve_hostile", {"model": "resnet20 (CIFAR, density 0.1)", **result}))
    print(
        f"{result['requests']} requests from {result['clients']} clients in {result['wall_s']} s: "
        f"{result['responses_5xx_or_failed']} 5xx/failed, good all 200: {result['good_all_200']}, "
        f"bad all 4xx: {result['bad_all_4xx']}, RSS {result['rss_mb']['second_quarter']:.0f} -> "
        f"{result['rss_mb']['last_quarter']:.0f} MB (flat: {result['memory_flat']})"
    )


if __name__ == "__main__":
    main()
