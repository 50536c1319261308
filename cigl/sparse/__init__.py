"""Sparse training: Static, SET and RigL masks, CigL's random mask and weight-and-mask averaging.

CigL is not a separate algorithm: it is RigL + random mask (`dpnum`) + averaging, composed.
"""

from cigl.sparse import rigl, static
from cigl.sparse import set as set_method
from cigl.sparse.averaging import WeightAverage, recalibrate_bn
from cigl.sparse.masking import Masking
from cigl.sparse.method import Method, drop_and_grow

METHODS: dict[str, Method] = {m.name: m for m in (static.METHOD, set_method.METHOD, rigl.METHOD)}
# sparse method names a user gives -> (mask method, default DPNUM of the random mask)
PRESETS: dict[str, tuple[str, int | None]] = {"static": ("static", None), "set": ("set", None), "rigl": ("rigl", None)}
PRESETS["cigl"] = ("rigl", 100)  # CigL = RigL + random mask (DPNUM 100) + weight-and-mask averaging

__all__ = ["METHODS", "PRESETS", "Masking", "Method", "WeightAverage", "drop_and_grow", "recalibrate_bn"]
