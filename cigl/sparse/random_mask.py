"""CigL's random mask R: every active weight is dropped independently with probability
1/DPNUM at each step, and the survivors are scaled by DPNUM/(DPNUM-1).

The dropped set is sampled as a Bernoulli process over the active entries by drawing the
gaps between drops (geometric with p = 1/DPNUM): O(nnz/DPNUM) work per step instead of a
uniform random number for every weight of the model.
"""

from __future__ import annotations

import math

import torch

from cigl.errors import InputError


def check_dpnum(dpnum: int) -> None:
    if isinstance(dpnum, bool) or not isinstance(dpnum, int) or dpnum <= 1:
        raise InputError(f"dpnum must be an integer > 1 (drop probability 1/DPNUM), got {dpnum!r}")


def scale(dpnum: int) -> float:
    """Inverted-dropout factor that keeps the expected effective weight unchanged."""
    return dpnum / (dpnum - 1)


def sample_dropped(n: int, dpnum: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Sorted positions in [0, n), each included independently with probability 1/dpnum,
    drawn from torch's global generator."""
    p = 1.0 / dpnum
    mean = n * p
    chunk = int(mean + 6.0 * math.sqrt(mean) + 16)
    parts, last = [], -1.0
    while True:
        gaps = torch.empty(chunk, dtype=torch.float64, device=device).geometric_(p)
        pos = last + torch.cumsum(gaps, 0)
        if pos[-1] >= n:
            parts.append(pos[pos < n])
            break
        parts.append(pos)
        last = float(pos[-1])
    return torch.cat(parts).long()
