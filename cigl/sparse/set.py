"""SET (Mocanu et al., 2018): drop the smallest weights, grow new connections at random."""

import torch

from cigl.sparse.method import Method


def grow_scores(weight: torch.Tensor, _dense_grad: torch.Tensor | None) -> torch.Tensor:
    """Uniform random scores from torch's (per-step seeded) global generator."""
    return torch.rand(weight.shape, device=weight.device)


METHOD = Method(name="set", updates=True, grow_scores=grow_scores)
