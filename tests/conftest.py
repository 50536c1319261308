"""Shared fixtures: a real slice of CIFAR-10 from ../shared/data, an isolated cache, CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cigl.data import extract_archive_subset

ROOT = Path(__file__).resolve().parents[1]
CIFAR_ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.xz"


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    os.environ["CIGL_CACHE"] = str(tmp_path_factory.mktemp("cigl-cache"))


@pytest.fixture(scope="session")
def cifar_small(tmp_path_factory) -> Path:
    """A few hundred real CIFAR-10 JPEGs: 30 train and 10 test images per class."""
    if not CIFAR_ARCHIVE.is_file():
        pytest.fail(f"missing {CIFAR_ARCHIVE}: tests need ../shared/data beside the checkout")
    return extract_archive_subset(CIFAR_ARCHIVE, tmp_path_factory.mktemp("cifar10"), {"train": 30, "test": 10})


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
