"""Atomic file writes and safe loading of torch files (torch imported only where needed)."""

from __future__ import annotations

import glob
import math
import os
import pickle
import tempfile
import warnings
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from cigl.errors import CheckpointError, InputError, storage_error

MAX_ARRAY_BYTES = 2 * 1024**3  # the most .npy / .npz data read into memory from a user's file


def check_output_dir(path: str | Path) -> Path:
    """`path` as an output folder that can be created or written, checked before any work is
    done (nothing is created here); InputError names the problem otherwise."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"output folder {path} is a file; give a folder name")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"cannot create output folder {path}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"cannot write to output folder {path}: {existing} is not writable; choose another")
    return path


def make_output_dir(path: str | Path) -> Path:
    """Create the output folder `path` (and its parents) or raise InputError naming the problem."""
    path = check_output_dir(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create output folder {path}: {exc.strerror}") from None
    return path


_TEMP_SUFFIX = ".tmp"  # atomic_open's temp files: .NAME.<random>.tmp beside NAME


def remove_stale_temps(folder: Path, names: Iterable[str]) -> None:
    """Delete the temp files atomic_open left for the files `names` in `folder` when its process
    was killed while writing them (they are never renamed into place). Only while no other
    process writes those files."""
    for name in names:
        for stale in folder.glob(f".{glob.escape(name)}.*{_TEMP_SUFFIX}"):
            stale.unlink(missing_ok=True)


@contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator:
    """A temp file next to `path`; on success it is fsynced and renamed over `path`, on any
    error it is removed, so `path` is never left half-written. A path that cannot be written
    (a folder, a missing or read-only folder) is an InputError before anything is written."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"cannot write {path}: it is a folder; give a file name")
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TEMP_SUFFIX)
    except OSError as exc:
        reason = "its folder does not exist" if isinstance(exc, FileNotFoundError) else exc.strerror
        raise InputError(f"cannot write {path}: {reason}; choose another path") from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
    writes = None
    try:
        with os.fdopen(fd, mode) as f:
            writes = _KeptWriteError(f)
            yield writes
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        full = storage_error(exc, path) or storage_error(getattr(writes, "error", None), path)
        if full is not None:
            raise full from None
        raise


class _KeptWriteError:
    """The file atomic_open hands out: everything passes through to `f`, and the OSError of a
    failed write is kept, since torch.save reports a full disk as a RuntimeError without it."""

    def __init__(self, f) -> None:
        self._f, self.error = f, None

    def write(self, data):
        try:
            return self._f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def __getattr__(self, name: str):
        return getattr(self._f, name)


def atomic_save_npz(path: str | Path, **arrays) -> None:
    """np.savez of `arrays` to `path` (its folder created), atomically."""
    import numpy as np

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as f:
        np.savez(f, **arrays)


def atomic_torch_save(obj: object, path: str | Path) -> None:
    import torch

    with atomic_open(path) as f:
        torch.save(obj, f)


def is_torch_file(path: str | Path) -> bool:
    """Whether `path` looks like a torch.save file (model.pt, a checkpoint): torch writes a zip archive."""
    return zipfile.is_zipfile(path)


def load_torch_file(path: str | Path, fmt: str, what: str, others: dict[str, str] | None = None) -> dict:
    """torch.load(weights_only=True) of a cigl file whose "format" entry is `fmt`: a file that
    needs pickle code is refused (never executed), a damaged one named as such, and one of
    another format gets the advice `others` holds for that format."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    with open(path, "rb") as f:
        legacy_pickle = f.read(1) == b"\x80"  # torch's pre-1.6 format: a pickle, checked by weights_only below
    if not is_torch_file(path) and not legacy_pickle:
        raise CheckpointError(
            f"cannot load {path}: not a torch file (the file is corrupt or truncated, or in another format)"
        )
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
    found = obj.get("format") if isinstance(obj, dict) else None
    if found != fmt:
        advice = (others or {}).get(found) if isinstance(found, str) else None
        raise CheckpointError(f"{path} is not a {what} (expected format {fmt!r})" + (f"; {advice}" if advice else ""))
    return obj


def npy_header(f) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) that the header of the .npy stream `f` (read from its start) declares;
    ValueError or EOFError when it is not one. Reading it costs nothing, so a file's size can be
    checked before its data is loaded."""
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _fortran, dtype = read(f)
    return shape, dtype


def npz_declared_bytes(path: str | Path) -> int:
    """Bytes the arrays of an .npz declare in their headers: a compressed .npz can expand a
    thousandfold, so its size is checked before np.load decompresses it."""
    total = 0
    with zipfile.ZipFile(path) as z:
        for name in z.namelist():
            with z.open(name) as f:
                shape, dtype = npy_header(f)
            total += math.prod(shape) * dtype.itemsize
    return total
