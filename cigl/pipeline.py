"""The training input pipeline as batched tensor ops on the training device: the whole split
stays resident as uint8, batches are gathered, augmented and normalised there."""

from __future__ import annotations

import functools
from collections.abc import Iterator

import torch

from cigl.data import Split


def to_device(split: Split, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 NCHW images and int64 labels on `device` (the whole split stays resident)."""
    x = torch.from_numpy(split.x.transpose(0, 3, 1, 2).copy())
    return x.to(device), torch.from_numpy(split.y).to(device)


def augment(x: torch.Tensor, pad: int, flip: bool) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip of a uint8 NCHW batch,
    drawn from torch's global generator on x's device."""
    n, _, h, w = x.shape
    if pad > 0:
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        oy = torch.randint(0, 2 * pad + 1, (n, 1), device=x.device)
        ox = torch.randint(0, 2 * pad + 1, (n, 1), device=x.device)
        rows = (oy + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (ox + torch.arange(w, device=x.device))[:, None, None, :]
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = padded[batch, chans, rows, cols]
    if flip:
        flips = torch.rand(n, device=x.device) < 0.5
        x = torch.where(flips[:, None, None, None], x.flip(3), x)
    return x


def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 -> float32 in [0, 1], then per-channel (x - mean) / std."""
    m, s = _scales(tuple(mean), tuple(std), x.device)
    return (x.float() - m) / s


@functools.lru_cache(maxsize=16)
def _scales(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """mean * 255 and std * 255 as (1, C, 1, 1) tensors on `device`, made once: a copy from the
    host at every training step would be one more host-device transfer per step."""
    return (
        torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255.0,
        torch.tensor(std, device=device).view(1, -1, 1, 1) * 255.0,
    )


def epoch_order(n: int, seed: int, epoch: int, device: torch.device) -> torch.Tensor:
    """The training order of one epoch: a permutation that depends only on (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).to(device)


def shuffled_batches(
    x: torch.Tensor,
    batch: int,
    seed: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    pad: int = 0,
    flip: bool = False,
) -> Iterator[torch.Tensor]:
    """Normalised batches of uint8 images `x` drawn the way training draws them: in a random order
    fixed by `seed`, full batches only (the whole set if it is smaller than one batch), augmented
    with `pad`/`flip` from a generator seeded by `seed` too.

    For batch-norm recalibration: the recomputed statistics average per-batch means and
    variances, which estimate the data's only when every batch is a random sample of it. Stored
    order is not (an ImageFolder is stored class by class: its batches would hold one class each
    and miss the between-class variance)."""
    n = x.shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(x.device)
    batch = min(batch, n)
    torch.manual_seed(seed)
    for i in range(0, n - batch + 1, batch):
        images = x[order[i : i + batch]]
        if pad or flip:
            images = augment(images, pad, flip)
        yield normalize(images, mean, std)
