"""RigL (Evci et al., 2020): drop the smallest weights, grow where |dense gradient| is largest."""

import torch

from cigl.sparse.method import Method


def grow_scores(_weight: torch.Tensor, dense_grad: torch.Tensor | None) -> torch.Tensor:
    """|dL/dw| of the loss on the current batch, for every entry including inactive ones."""
    return dense_grad.abs()


METHOD = Method(name="rigl", updates=True, grow_scores=grow_scores)
