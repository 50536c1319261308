"""cigl: calibrated sparse training (CigL), export, serving and calibration audits.

Importing this package never imports torch: the calibration metrics and the serving side
(`cigl.serve`) run with numpy and onnxruntime alone. The entry points below are imported on
first use:

    cigl.TrainConfig(...)                  # settings of the trainer (torch)
    cigl.train(config)                     # run it (the cigl.train module is callable)
    cigl.Masking(model, "cigl", ...)       # sparse training in your own loop (torch)
    cigl.WeightAverage()                   # weight-and-mask averaging (torch)
    cigl.Predictor("model.onnx")           # calibrated inference (onnxruntime, no torch)
    cigl.calibration.ece(...)              # metrics (numpy)
    cigl.export.save / load_model          # packed safetensors (torch)
"""

from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "TrainConfig": ("cigl.train", "TrainConfig"),
    "train": ("cigl.train", None),
    "Masking": ("cigl.sparse", "Masking"),
    "WeightAverage": ("cigl.sparse", "WeightAverage"),
    "Predictor": ("cigl.serve.predictor", "Predictor"),
    "calibration": ("cigl.calibration", None),
    "export": ("cigl.export", None),
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'cigl' has no attribute {name!r}")
    module, attribute = _LAZY[name]
    value = import_module(module) if attribute is None else getattr(import_module(module), attribute)
    globals()[name] = value
    return value
