"""A torchrun entry point for the tests: cigl-train, where every rank also saves its masks at
each mask check into $CIGL_PROBE_DIR, and (with $CIGL_PROBE_CORRUPT_RANK) that rank flips one
mask entry first, to show that the check stops a diverging run."""

import os
from pathlib import Path

import torch

from cigl import distributed
from cigl.train import main

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
    raise SystemExit(main())
