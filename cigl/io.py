"""Atomic file writes and safe loading of torch files (torch imported only where needed)."""

from __future__ import annotations

import os
import pickle
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cigl.errors import CheckpointError


@contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator:
    """A temp file next to `path`; on success it is fsynced and renamed over `path`, on any
    error it is removed, so `path` is never left half-written."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_torch_save(obj: object, path: str | Path) -> None:
    import torch

    with atomic_open(path) as f:
        torch.save(obj, f)


def load_torch_file(path: str | Path, fmt: str, what: str) -> dict:
    """torch.load(weights_only=True) of a cigl file whose "format" entry is `fmt`: a file that
    needs pickle code is refused (never executed), a damaged one named as such."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower():
            raise CheckpointError(
                f"cannot load {path} safely: it needs arbitrary code to unpickle, which cigl refuses; "
                f"use a {what} written by cigl"
            ) from None
        raise CheckpointError(f"cannot load {path}: the file is corrupt or truncated ({exc})") from None
    except Exception as exc:  # zip/EOF/runtime errors of a damaged file
        raise CheckpointError(f"cannot load {path}: the file is corrupt or truncated ({type(exc).__name__})") from None
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        raise CheckpointError(f"{path} is not a {what} (expected format {fmt!r})")
    return obj
