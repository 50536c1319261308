"""Ctrl-C and SIGTERM end a training run at the next step boundary, with a checkpoint.

A signal that lands inside a step (say between the optimiser's update of two layers) cannot be
saved from, so the handler only records it; the loop asks `requested()` between steps, saves
last.pt there and raises `Interrupted`, and `--resume` continues bit-identically from that step
(as from any checkpoint). The first signal also puts the previous handlers back, so a second
Ctrl-C stops at once. Installed for single-process runs in the main thread only: under torchrun
the processes would stop at different steps, and the launcher's own handling applies.
"""

from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """Training stopped on a signal after saving its checkpoint; `exit_code` is 128 + the signal."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class StopRequest:
    """A context manager: while it is open, SIGINT and SIGTERM are recorded, not acted on."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._record) for s in SIGNALS}
        return self

    def __exit__(self, *_exc) -> None:
        self._restore()

    def _record(self, signum: int, _frame) -> None:
        self.signal = signum
        self._restore()  # a second signal acts at once

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def requested(self) -> bool:
        return self.signal is not None

    def interrupted(self, step: int, total: int, out: str) -> Interrupted:
        """The exception to raise once last.pt holds `step`."""
        name = signal.Signals(self.signal).name
        return Interrupted(
            f"{name} at step {step} of {total}; last.pt holds that step: cigl-train --resume {out} continues",
            128 + self.signal,
        )
