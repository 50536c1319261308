"""cigl: calibrated sparse training (CigL), export, serving and calibration audits.

Importing this package never imports torch: the calibration metrics and the serving side
(`cigl.serve`) run with numpy and onnxruntime alone.
"""

__version__ = "0.1.0"
