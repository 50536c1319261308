"""A torchrun entry point for the tests: cigl-train, where every rank also saves its masks at
each mask check into $CIGL_PROBE_DIR, and the names of its threads once training returns
(gloo's threads must be gone by then: left to interpreter shutdown they can abort the process);
with $CIGL_PROBE_CORRUPT_RANK that rank flips one mask entry first, to show that the check
stops a diverging run."""

import os
from pathlib import Path

import torch

from cigl import distributed
from cigl.train.cli import main

_check = distributed.check_same_masks


def _probing_check(masks: dict[str, torch.Tensor], step: int) -> None:
    rank = torch.distributed.get_rank()
    if os.environ.get("CIGL_PROBE_CORRUPT_RANK") == str(rank):
        mask = next(iter(masks.values())).view(-1)
        mask[0] = ~mask[0]
    if "CIGL_PROBE_DIR" in os.environ:
        torch.save({n: m.cpu() for n, m in masks.items()}, Path(os.environ["CIGL_PROBE_DIR"]) / f"{step}-{rank}.pt")
    _check(masks, step)


distributed.check_same_masks = _probing_check

if __name__ == "__main__":
    code = main()
    if "CIGL_PROBE_DIR" in os.environ and Path("/proc/self/task").is_dir():
        rank = os.environ["RANK"]
        names = [(task / "comm").read_text().strip() for task in Path("/proc/self/task").iterdir()]
        (Path(os.environ["CIGL_PROBE_DIR"]) / f"threads-{rank}.txt").write_text("\n".join(names))
    raise SystemExit(code)
