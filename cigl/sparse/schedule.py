"""When masks are updated and how much of each layer is exchanged (RigL's schedule)."""

from __future__ import annotations

import math

# Mask updates a run's default schedule aims for, the count under which a run is told that its
# "dynamic" method is close to static training, and the shortest default interval: grown weights
# start at 0 and need steps to train before the next update judges them (measured on digits,
# RigL, 75 update steps: interval 1 -> 48% test accuracy, 2 -> 87%, 3 -> 91%, 5 -> 96%, 8 -> 94%).
TARGET_UPDATES = 40
FEW_UPDATES = 10
MIN_UPDATE_EVERY = 5


def cosine_drop_fraction(step: int, alpha: float, end_step: int) -> float:
    """The share of each layer exchanged at `step`: the initial share `alpha` cosine-decayed,
    a_t = alpha/2 * (1 + cos(pi * t / T_end))."""
    return alpha / 2.0 * (1.0 + math.cos(math.pi * min(step, end_step) / end_step)) if end_step > 0 else 0.0


def is_update_step(step: int, every: int, end_step: int) -> bool:
    """Masks change every `every` steps, never at step 0 and never from step `end_step` on."""
    return step > 0 and step % every == 0 and step < end_step


def update_count(every: int, end_step: int) -> int:
    """How many steps `is_update_step` selects: the multiples of `every` in (0, end_step)."""
    return max(0, (end_step - 1) // every)


def default_update_every(end_step: int, cap: int = 100) -> int:
    """RigL's interval of 100 steps, shortened on short runs so that masks still change about
    TARGET_UPDATES times before `end_step` (100 steps gives a 250-epoch CIFAR run ~730 updates
    but a 20-epoch digits run none), and never below MIN_UPDATE_EVERY steps."""
    return max(MIN_UPDATE_EVERY, min(cap, end_step // TARGET_UPDATES))
