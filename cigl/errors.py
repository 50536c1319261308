"""One error hierarchy for every side of cigl (stdlib only).

Command-line tools turn a `CiglError` into a one-line message on stderr and exit code 2, and so
an OSError that says the disk is full or read-only (`storage_error`: the machine, not cigl, is at
fault); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import functools
import numbers
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

F = TypeVar("F", bound=Callable[..., int | None])


class CiglError(Exception):
    """Base class: a problem the user can fix, described in one line."""


class InputError(CiglError, ValueError):
    """Bad user input: a path, an option value, an array of the wrong shape."""


class FormatError(CiglError):
    """A file that exists but is not in the expected format."""


class CheckpointError(CiglError):
    """A checkpoint that cannot be loaded or resumed from."""


class StorageError(CiglError):
    """A file that could not be written because of where it goes: a full disk, a quota, a
    read-only filesystem, a file size limit."""


_STORAGE_FIXES = {
    errno.ENOSPC: "free some space or choose another output folder",
    errno.EDQUOT: "free some space or choose another output folder",
    errno.EFBIG: "choose an output folder on another filesystem",
    errno.EROFS: "choose an output folder on a writable filesystem",
}


def storage_error(exc: BaseException, path: object = None) -> StorageError | None:
    """The StorageError for an OSError that says the disk is full, over quota, read-only or at
    its file size limit (naming `path`, else the error's own file); None for any other error."""
    if not isinstance(exc, OSError) or exc.errno not in _STORAGE_FIXES:
        return None
    where = path if path is not None else exc.filename
    target = f"cannot write {where}" if where is not None else "cannot write a file"
    error = StorageError(f"{target}: {exc.strerror}; {_STORAGE_FIXES[exc.errno]}")
    error.strerror = exc.strerror  # the reason alone, for callers that word their own message
    return error


@contextmanager
def writing(path: object) -> Iterator[None]:
    """Turn a full disk (or read-only filesystem, `storage_error`) met inside the block into a
    StorageError naming `path`; any other error passes unchanged."""
    try:
        yield
    except OSError as exc:
        full = storage_error(exc, path)
        if full is None:
            raise
        raise full from None


def is_int_in(value: object, low: int, high: int | None = None) -> bool:
    """True for a plain integer (Python or numpy, never a bool) with low <= value <= high
    (no upper bound when high is None): the check behind every count a user gives."""
    return (
        isinstance(value, numbers.Integral)
        and not isinstance(value, bool)
        and low <= value
        and (high is None or value <= high)
    )


def say_line(line: str) -> None:
    """`line` on stderr in one write: print() writes the text and its newline separately, so the
    processes of a torchrun launch, failing at the same moment, ran their lines together."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _one_line_warning(message, *_details) -> str:
    """warnings.formatwarning without the file and line: one `warning: ...` line."""
    return f"warning: {message}\n"


def cli_entry(func: F) -> F:
    """Wrap a CLI `main`: CiglError, or an OSError that says the disk is full (or read-only,
    `storage_error`) -> `error: <message>` on stderr and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        warnings.formatwarning = _one_line_warning
        try:
            return func(*args, **kwargs)
        except BrokenPipeError:  # stdout closed early (e.g. `cigl-export --inspect F | head`): not an error
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise SystemExit(0) from None
        except (CiglError, OSError) as exc:
            problem = exc if isinstance(exc, CiglError) else storage_error(exc)
            if problem is None:
                raise
            message = " ".join(str(problem).split())
            say_line(f"error: {message}")
            raise SystemExit(2) from None
        except KeyboardInterrupt as exc:  # Ctrl-C; training's own stop (train.interrupt) says more
            say_line(f"interrupted: {exc}" if str(exc) else "interrupted")
            raise SystemExit(getattr(exc, "exit_code", 130)) from None

    return wrapper  # type: ignore[return-value]


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line usage errors (`error: ... (see --help)`, exit code 2; in a torchrun
    launch said by rank 0 only, not once per process), `--version` and `examples` (command
    lines shown at the end of --help)."""

    def __init__(self, *args, examples: list[str] | None = None, **kwargs) -> None:
        if examples:
            shown = "examples:\n" + "\n".join(f"  {line}" for line in examples)
            kwargs["epilog"] = shown + (f"\n\n{kwargs['epilog']}" if kwargs.get("epilog") else "")
            kwargs["formatter_class"] = argparse.RawDescriptionHelpFormatter
        super().__init__(*args, **kwargs)
        from cigl import __version__

        self.add_argument("--version", action="version", version=f"%(prog)s (cigl) {__version__}")

    def error(self, message: str):  # type: ignore[override]
        # under torchrun every process parses the same command line and fails alike: rank 0 says why
        if os.environ.get("RANK", "0") == "0":
            say_line(f"error: {message} (see {self.prog} --help)")
        raise SystemExit(2)
