"""One error hierarchy for every side of cigl (stdlib only).

Command-line tools turn a `CiglError` into a one-line message on stderr and exit code 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import functools
import numbers
import os
import sys
import warnings
from collections.abc import Callable
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


def is_int_in(value: object, low: int, high: int | None = None) -> bool:
    """True for a plain integer (Python or numpy, never a bool) with low <= value <= high
    (no upper bound when high is None): the check behind every count a user gives."""
    return (
        isinstance(value, numbers.Integral)
        and not isinstance(value, bool)
        and low <= value
        and (high is None or value <= high)
    )


def _one_line_warning(message, *_details) -> str:
    """warnings.formatwarning without the file and line: one `warning: ...` line."""
    return f"warning: {message}\n"


def cli_entry(func: F) -> F:
    """Wrap a CLI `main`: CiglError -> `error: <message>` on stderr and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        warnings.formatwarning = _one_line_warning
        try:
            return func(*args, **kwargs)
        except CiglError as exc:
            message = " ".join(str(exc).split())
            print(f"error: {message}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None
        except BrokenPipeError:  # stdout closed early (e.g. `cigl-export --inspect F | head`): not an error
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise SystemExit(0) from None

    return wrapper  # type: ignore[return-value]


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line usage errors (`error: ... (see --help)`, exit code 2), `--version`
    and `examples` (command lines shown at the end of --help)."""

    def __init__(self, *args, examples: list[str] | None = None, **kwargs) -> None:
        if examples:
            shown = "examples:\n" + "\n".join(f"  {line}" for line in examples)
            kwargs["epilog"] = shown + (f"\n\n{kwargs['epilog']}" if kwargs.get("epilog") else "")
            kwargs["formatter_class"] = argparse.RawDescriptionHelpFormatter
        super().__init__(*args, **kwargs)
        from cigl import __version__

        self.add_argument("--version", action="version", version=f"%(prog)s (cigl) {__version__}")

    def error(self, message: str):  # type: ignore[override]
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)
