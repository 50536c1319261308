"""Shared fixtures: a real slice of CIFAR-10 from ../shared/data, an isolated cache, CLI runner."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cigl.data import extract_archive_subset
from cigl.testing import fake_model_file

ROOT = Path(__file__).resolve().parents[1]
CIFAR_ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.xz"
TRAIN = str(ROOT / "tools" / "train.py")


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    os.environ["CIGL_CACHE"] = str(tmp_path_factory.mktemp("cigl-cache"))


@pytest.fixture(scope="session")
def cifar_small(tmp_path_factory) -> Path:
    """A few hundred real CIFAR-10 JPEGs: 30 train and 10 test images per class."""
    if not CIFAR_ARCHIVE.is_file():
        pytest.fail(f"missing {CIFAR_ARCHIVE}: tests need ../shared/data beside the checkout")
    return extract_archive_subset(CIFAR_ARCHIVE, tmp_path_factory.mktemp("cifar10"), {"train": 30, "test": 10})


# what cigl-train leaves in a run directory
RUN_FILES = ("config.json", "metrics.jsonl", "last.pt", "model.pt", "summary.json", "predictions.npz", ".lock")

# prepended to `python -c` code: any import of torch fails, as in an environment without it
BLOCK_TORCH = (
    "import sys\n"
    "class _NoTorch:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name == 'torch' or name.startswith('torch.'):\n"
    "            raise ImportError('torch is not installed here')\n"
    "sys.meta_path.insert(0, _NoTorch())\n"
)


def run_cli(*args: str, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """Run a console entry point as a user would (python -m), capturing output."""
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, **kwargs)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def load_pt(path) -> dict:
    """A cigl model.pt or last.pt, loaded safely on the CPU."""
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_model(a, b) -> None:
    """Two model.pt files hold bit-identical weights and masks."""
    a, b = load_pt(a), load_pt(b)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    for k in a["masks"]:
        assert torch.equal(a["masks"][k], b["masks"][k]), k


def wait_for_file(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until `path` exists while `proc` (stderr piped) keeps running."""
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline
        time.sleep(0.05)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model_pt(
    path, arch, *, dataset="digits", data_dir=None, density=0.1, in_chans=1, size=8, temperature=1.3, classes=None
):
    """A model.pt as cigl-train writes it (cigl.testing.fake_model_file); returns its path."""
    fake_model_file(
        path,
        arch,
        density=density,
        in_chans=in_chans,
        image_size=size,
        classes=classes,
        temperature=temperature,
        dataset=dataset,
        data_dir=data_dir,
    )
    return path


@pytest.fixture(scope="session")
def cifar_onnx(tmp_path_factory, cifar_small) -> Path:
    """An exported sparse CIFAR ResNet-20 (model.onnx) with the CIFAR-10 class names."""
    from cigl.data import CIFAR10_CLASSES

    src = make_model_pt(
        tmp_path_factory.mktemp("cifar-model") / "run" / "model.pt",
        "resnet20",
        dataset="cifar10",
        data_dir=str(cifar_small),
        in_chans=3,
        size=32,
        classes=CIFAR10_CLASSES,
    )
    proc = run_cli(os.path.join(os.path.dirname(sys.executable), "cigl-export"), str(src))
    assert proc.returncode == 0, proc.stderr
    return src.parent / "model.onnx"
