"""Shared fixtures: a real slice of CIFAR-10 from ../shared/data, an isolated cache, CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CIFAR_ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.xz"


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    os.environ["CIGL_CACHE"] = str(tmp_path_factory.mktemp("cigl-cache"))


def extract_cifar(dest: Path, train_per_class: int, test_per_class: int) -> Path:
    """Copy the first N train / M test JPEGs of each class out of the offline archive."""
    limits = {"train": train_per_class, "test": test_per_class}
    seen: dict[tuple[str, str], int] = {}
    with tarfile.open(CIFAR_ARCHIVE, "r:xz") as tar:
        for member in tar:
            parts = Path(member.name).parts  # cifar10/<split>/<class>/<file>
            if not member.isfile() or len(parts) != 4:
                continue
            key = (parts[1], parts[2])
            if seen.get(key, 0) >= limits[parts[1]]:
                continue
            seen[key] = seen.get(key, 0) + 1
            target = dest / parts[1] / parts[2] / parts[3]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(member).read())
    return dest


@pytest.fixture(scope="session")
def cifar_small(tmp_path_factory) -> Path:
    """A few hundred real CIFAR-10 JPEGs: 30 train and 10 test images per class."""
    if not CIFAR_ARCHIVE.is_file():
        pytest.fail(f"missing {CIFAR_ARCHIVE}: tests need ../shared/data beside the checkout")
    return extract_cifar(tmp_path_factory.mktemp("cifar10"), 30, 10)


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
