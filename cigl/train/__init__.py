"""The trainer: `train(TrainConfig(...))` in Python, `cigl-train` / `python tools/train.py` on the
command line.

    config.py    TrainConfig, the method presets and `resolve` (validation, derived settings)
    loop.py      the training loop: set-up, epochs, the product
    evaluate.py  logits, metrics, MC dropout and summary.json
    cli.py       the command line

The module itself is callable, so `cigl.train(cfg)` runs `cigl.train.train(cfg)`.
"""

import sys
import types

from cigl.train.cli import main
from cigl.train.config import TrainConfig, resolve
from cigl.train.loop import lr_at, train, train_step

__all__ = ["TrainConfig", "lr_at", "main", "resolve", "train", "train_step"]


class _CallableModule(types.ModuleType):
    def __call__(self, cfg: TrainConfig, **kwargs):
        return train(cfg, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
