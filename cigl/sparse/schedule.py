"""When masks are updated and how much of each layer is exchanged (RigL's schedule)."""

from __future__ import annotations

import math


def drop_fraction(step: int, alpha: float, end: int) -> float:
    """Cosine-decayed drop fraction a_t = alpha/2 * (1 + cos(pi * t / T_end))."""
    return alpha / 2.0 * (1.0 + math.cos(math.pi * min(step, end) / end)) if end > 0 else 0.0


def is_update_step(step: int, every: int, end: int) -> bool:
    """Masks change every `every` steps, never at step 0 and never from step `end` on."""
    return step > 0 and step % every == 0 and step < end
