"""What distinguishes Static, SET and RigL: whether masks change and how growth is scored."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Method:
    name: str
    updates: bool  # does the mask change during training?
    # score of every entry for growth, from (weight, dense gradient of the batch); None: no growth
    grow_scores: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None


def drop_and_grow(
    weight: torch.Tensor, mask: torch.Tensor, scores: torch.Tensor, n: int | torch.Tensor, most: int | None = None
) -> torch.Tensor:
    """New mask: drop the n active entries with the smallest |weight|, then activate the n
    inactive entries (just-dropped ones included) with the largest score. nnz is unchanged.

    `n` may be a 0-dim tensor on the weight's device, with `most` (an int, at least n) bounding
    it: the `most` smallest and largest entries are ranked and the first n of each taken, so
    the shapes are fixed and nothing is read back to the host: a CUDA graph can capture it."""
    m = mask.reshape(-1).clone()
    most = int(n) if most is None else most
    if most <= 0:
        return m.view(mask.shape)
    taken = torch.arange(most, device=m.device) < n  # of the ranked entries, the first n
    magnitude = torch.where(m, weight.detach().abs().reshape(-1).float(), torch.inf)
    lowest = torch.topk(magnitude, most, largest=False).indices  # sorted: the smallest first
    m[lowest] = m[lowest] & ~taken
    candidates = torch.where(m, -torch.inf, scores.reshape(-1).float())
    highest = torch.topk(candidates, most).indices
    m[highest] = m[highest] | taken
    return m.view(mask.shape)
