"""Weight-and-mask averaging (WMA) and batch-norm recalibration of the averaged model."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


class WeightAverage:
    """Running mean of parameter snapshots: avg <- avg + (w - avg) / (n + 1).

    The snapshots are effective weights (w * M * R * scale for masked tensors), so the masks
    are averaged together with the weights and the average's support is the union of masks.
    """

    def __init__(self) -> None:
        self.avg: dict[str, torch.Tensor] = {}
        self.count = 0

    def fold(self, snapshot: dict[str, torch.Tensor]) -> None:
        if self.count == 0:
            self.avg = {k: v.detach().clone() for k, v in snapshot.items()}
        else:
            for k, v in snapshot.items():
                self.avg[k] += (v.detach() - self.avg[k]) / (self.count + 1)
        self.count += 1

    @torch.no_grad()
    def apply_to(self, model: nn.Module) -> None:
        """Copy the running mean into `model`'s parameters (the model the snapshots came from,
        or a copy of it); its batch-norm statistics still need `recalibrate_bn`."""
        if not self.count:
            raise ValueError("no snapshot folded yet: call fold() before apply_to()")
        for name, p in model.named_parameters():
            p.copy_(self.avg[name])

    def state_dict(self) -> dict:
        return {"avg": self.avg, "count": self.count}

    def load_state_dict(self, state: dict, device: torch.device | str | None = None) -> None:
        """Restore a state_dict(), its tensors moved to `device` (checkpoints load on the CPU)."""
        self.avg = {k: v if device is None else v.to(device) for k, v in state["avg"].items()}
        self.count = int(state["count"])

    def support(self, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The averaged model's masks: for each masked tensor of `masks`, where the average is nonzero."""
        return {n: self.avg[n] != 0 for n in masks}


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """Recompute batch-norm running statistics as a cumulative average over `batches`
    (statistics reset first); weights are untouched."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    was_training = model.training
    model.train()
    for x in batches:
        model(x)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    model.train(was_training)
