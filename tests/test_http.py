"""cigl-serve started for real (uvicorn on 127.0.0.1, a free port, in a subprocess)."""

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import free_port

from cigl.data import CIFAR10_CLASSES

SERVE = os.path.join(os.path.dirname(sys.executable), "cigl-serve")


def _start(model, *options: str) -> tuple[subprocess.Popen, str]:
    """cigl-serve on a free port, once /healthz answers: one worker takes --port 0 and says
    which port it got; several workers are given a free port."""
    several = "--workers" in options
    port = free_port() if several else 0
    proc = subprocess.Popen(
        [SERVE, str(model), "--port", str(port), *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    announced = proc.stderr.readline()  # "cigl-serve: MODEL on http://127.0.0.1:PORT (API docs at /docs)"
    base = announced.split(" on ")[1].split()[0]
    assert several or int(base.rsplit(":", 1)[1]) > 0, announced
    deadline = time.time() + 60
    while True:
        try:
            if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline, "server did not start"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def server(cifar_onnx):
    proc, base = _start(cifar_onnx, "--max-batch", "4", "--max-body-mb", "0.05")
    yield base
    proc.terminate()
    proc.wait(timeout=20)


def _jpegs(cifar_small, n):
    files = sorted((cifar_small / "test" / "cat").iterdir())[:n]
    return [("files", (f.name, f.read_bytes(), "image/jpeg")) for f in files]


def _good(base, cifar_small):
    r = httpx.post(base + "/v1/predict", files=_jpegs(cifar_small, 2), params={"top_k": 2})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert len(preds) == 2 and all(p["class"] in CIFAR10_CLASSES and len(p["top_k"]) == 2 for p in preds)
    return preds


def test_predict_metadata_health_docs(server, cifar_small):
    preds = _good(server, cifar_small)
    assert preds[0]["source"] == "0000.jpg" and 0 < preds[0]["confidence"] <= 1
    meta = httpx.get(server + "/v1/metadata").json()
    assert meta["classes"] == CIFAR10_CLASSES and meta["input_size"] == [3, 32, 32]
    assert meta["temperature"] == pytest.approx(1.3) and meta["target_density"] == pytest.approx(0.1)
    assert meta["recorded"]["ece"] == pytest.approx(0.1)
    assert httpx.get(server + "/healthz").json()["status"] == "ok"
    assert httpx.get(server + "/docs").status_code == 200
    assert "/v1/predict" in httpx.get(server + "/openapi.json").json()["paths"]
    x = np.zeros((2, 3, 32, 32)).tolist()
    r = httpx.post(server + "/v1/predict", json={"inputs": x, "top_k": 3, "abstain_below": 1.0})
    assert r.status_code == 200 and [p["source"] for p in r.json()["predictions"]] == ["inputs[0]", "inputs[1]"]
    assert all(p["abstained"] for p in r.json()["predictions"])


def test_bad_requests_get_4xx_and_the_server_keeps_serving(server, cifar_small):
    nan = np.zeros((1, 3, 32, 32))
    nan[0, 0, 0, 0] = np.nan
    cases = [
        ({"files": [("files", ("bad.jpg", b"\xff\xd8 not a jpeg", "image/jpeg"))]}, 400, "bad.jpg"),
        ({"json": {"inputs": np.zeros((1, 3, 16, 16)).tolist()}}, 400, "32x32"),
        ({"json": {"inputs": [[[1, 2], [3]]]}}, 400, "equally shaped"),
        (
            {
                "content": json.dumps({"inputs": nan.tolist()}).replace("NaN", "NaN"),
                "headers": {"content-type": "application/json"},
            },
            400,
            "NaN",
        ),
        ({"json": {"inputs": np.zeros((5, 3, 32, 32)).tolist()}}, 413, "larger than"),  # also over the body cap
        ({"files": _jpegs(cifar_small, 5)}, 400, "at most 4"),
        ({"json": {"inputs": [], "colour": "blue"}}, 422, "colour"),
        ({"json": {"inputs": np.zeros((1, 3, 32, 32)).tolist(), "top_k": 0}}, 422, "top_k"),
        ({"json": {"inputs": np.zeros((1, 3, 32, 32)).tolist(), "alpha": 1.5}}, 422, "alpha"),
        # this model's card has no conformal thresholds: asking for a set is the client's mistake
        ({"json": {"inputs": np.zeros((1, 3, 32, 32)).tolist(), "alpha": 0.1}}, 400, "no conformal thresholds"),
        ({"files": _jpegs(cifar_small, 1), "params": {"alpha": 0.1}}, 400, "no conformal thresholds"),
        ({"files": _jpegs(cifar_small, 1), "params": {"abstain_below": 2}}, 422, "abstain_below"),
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
        ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "multipart"),
        ({"content": b"x" * 60_000, "headers": {"content-type": "application/json"}}, 413, "larger than"),
    ]
    for kwargs, status, needle in cases:
        r = httpx.post(server + "/v1/predict", **kwargs)
        assert r.status_code == status, (needle, r.status_code, r.text)
        assert needle in r.json()["error"], r.json()
        _good(server, cifar_small)  # and the next good request still succeeds
    over_batch = httpx.post(server + "/v1/predict", json={"inputs": np.zeros((5, 3, 2, 2)).tolist()})
    assert over_batch.status_code == 400 and "at most 4" in over_batch.json()["error"]


def test_concurrent_requests(server, cifar_small):
    def call(_):
        return httpx.post(server + "/v1/predict", files=_jpegs(cifar_small, 2), timeout=60).status_code

    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(call, range(48)))
    assert codes == [200] * 48


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts worker processes in /proc")
def test_a_taken_port_is_a_one_line_error(cifar_onnx, server):
    port = server.rsplit(":", 1)[1]
    proc = subprocess.run([SERVE, str(cifar_onnx), "--port", port], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert (
        proc.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}") and "choose another --port" in proc.stderr
    )


def test_several_workers_share_the_port_and_the_settings(cifar_onnx, cifar_small):
    proc, base = _start(cifar_onnx, "--workers", "2", "--max-batch", "3")
    try:

        def call(_):
            return httpx.post(base + "/v1/predict", files=_jpegs(cifar_small, 2), timeout=60).status_code

        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(call, range(16))) == [200] * 16
        over_batch = httpx.post(base + "/v1/predict", json={"inputs": np.zeros((4, 3, 2, 2)).tolist()})
        assert over_batch.status_code == 400 and "at most 3" in over_batch.json()["error"]  # each worker's limit
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        commands = [Path(f"/proc/{c}/cmdline").read_bytes().replace(b"\0", b" ").decode() for c in children]
        assert sum("spawn_main" in c for c in commands) == 2, commands  # uvicorn's two worker processes
    finally:
        proc.terminate()
        proc.wait(timeout=30)
