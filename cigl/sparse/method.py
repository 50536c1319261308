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


def drop_and_grow(weight: torch.Tensor, mask: torch.Tensor, scores: torch.Tensor, n: int) -> torch.Tensor:
    """New mask: drop the n active entries with the smallest |weight|, then activate the n
    inactive entries (just-dropped ones included) with the largest score. nnz is unchanged."""
    m = mask.reshape(-1).clone()
    if n <= 0:
        return m.view(mask.shape)
    magnitude = torch.where(m, weight.detach().abs().reshape(-1).float(), torch.inf)
    m[torch.topk(magnitude, n, largest=False).indices] = False
    candidates = torch.where(m, -torch.inf, scores.reshape(-1).float())
    m[torch.topk(candidates, n).indices] = True
    return m.view(mask.shape)
