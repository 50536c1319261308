"""Weight-and-mask averaging (WMA) and batch-norm recalibration of the averaged model."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch
from torch import nn

from cigl.errors import InputError


class WeightAverage:
    """Running mean of parameter snapshots: avg <- avg + (w - avg) / (n + 1).

    The snapshots are effective weights (w * M * R * scale for masked tensors), so the masks
    are averaged together with the weights and the average's support is the union of masks.
    """

    def __init__(self) -> None:
        self.avg: dict[str, torch.Tensor] = {}
        self.count = 0

    def fold(self, snapshot: dict[str, torch.Tensor]) -> None:
        """Add one snapshot (name -> tensor) to the mean; every snapshot has the first one's tensors."""
        if self.count:
            _check_same_tensors(self.avg, snapshot, "the snapshot", "fold snapshots of one model")
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
            raise InputError("no snapshot folded yet: call fold() before apply_to()")
        params = dict(model.named_parameters())
        _check_same_tensors(self.avg, params, "the model", "apply it to the model its snapshots came from")
        for name, p in params.items():
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


def _check_same_tensors(avg: dict[str, torch.Tensor], other: dict[str, torch.Tensor], what: str, fix: str) -> None:
    """InputError unless `other` has exactly the average's tensor names and shapes."""
    missing, extra = sorted(avg.keys() - other.keys()), sorted(other.keys() - avg.keys())
    if missing or extra:
        raise InputError(
            f"{what} has other tensors than the average ({len(missing)} missing, e.g. {missing[:1]}; "
            f"{len(extra)} not averaged, e.g. {extra[:1]}): {fix}"
        )
    for name, t in other.items():
        if tuple(t.shape) != tuple(avg[name].shape):
            raise InputError(f"{what}'s {name} is {tuple(t.shape)}, the average's {tuple(avg[name].shape)}: {fix}")


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """Recompute batch-norm running statistics as a cumulative average over `batches`
    (statistics reset first); weights are untouched."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    batches = iter(batches)
    first = next(batches, None)
    if first is None:  # resetting with nothing to average would leave mean 0 and variance 1
        raise InputError("recalibrate_bn got no batches: give it training images (an iterable of input batches)")
    batches = itertools.chain([first], batches)
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
