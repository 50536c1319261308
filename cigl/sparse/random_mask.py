"""CigL's random mask R: every active weight is dropped independently with probability
1/DPNUM at each step, and the survivors are scaled by DPNUM/(DPNUM-1).

The dropped set is sampled as a Bernoulli process over the active entries by drawing the
gaps between drops (geometric with p = 1/DPNUM): O(nnz/DPNUM) work per step instead of a
uniform random number for every weight of the model.
"""

from __future__ import annotations

import math

import torch

from cigl.errors import InputError, is_int_in


def check_dpnum(dpnum: int) -> None:
    if not is_int_in(dpnum, 2):
        raise InputError(f"dpnum must be an integer > 1 (drop probability 1/DPNUM), got {dpnum!r}")


def scale(dpnum: int) -> float:
    """Inverted-dropout factor that keeps the expected effective weight unchanged."""
    return dpnum / (dpnum - 1)


def sample_size(n: int, dpnum: int) -> int:
    """How many positions `sample_dropped` draws for n entries: the expected number of drops
    plus 6 standard deviations and 16. The draw then covers all n entries but with probability
    below 1e-9 (a binomial count 6 sigma high); in that case the entries past its last position
    stay in for that one step."""
    mean = n * (1.0 / dpnum)
    return int(mean + 6.0 * math.sqrt(mean) + 16)


def sample_dropped(n: int, dpnum: int, gaps: torch.Tensor | None = None) -> torch.Tensor:
    """The dropped positions among n entries, each dropped independently with probability
    1/dpnum, drawn from torch's generator as geometric gaps: sample_size(n, dpnum) distinct
    sorted positions, those below n dropped, each later one n + its slot (a spare slot, which a
    caller points at scratch memory). The size is fixed, so drawing needs no host-device
    synchronisation and CUDA graphs can capture it. `gaps` (float64, that size, on the device
    wanted) holds the draw; by default one is made on the CPU."""
    if gaps is None:
        gaps = torch.empty(sample_size(n, dpnum), dtype=torch.float64)
    pos = torch.cumsum(gaps.geometric_(1.0 / dpnum), 0).sub_(1.0)
    spare = torch.arange(n, n + pos.numel(), dtype=torch.float64, device=pos.device)
    return torch.where(pos < n, pos, spare).long()
