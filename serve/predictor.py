"""Calibrated predictions from an exported model.onnx with onnxruntime (numpy + pillow, no torch).

p = Predictor("model.onnx")                 # device="auto" | "cpu" | "cuda"
p.provider                                  # the execution provider actually in use
logits, probs = p.predict(batch)            # float32 NCHW, normalised as the model expects
records = p.predict_files(["cat.jpg", ...]) # decode, resize / centre-crop, normalise
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cigl.errors import FormatError, InputError

MAX_BATCH = 1024


@dataclass(frozen=True)
class ModelCard:
    """What a model.onnx says about itself (its metadata_props)."""

    classes: list[str]
    input_size: tuple[int, int, int]  # C, H, W
    mean: np.ndarray
    std: np.ndarray
    temperature: float
    raw: dict[str, str]

    @classmethod
    def from_metadata(cls, meta: dict[str, str], source: str) -> ModelCard:
        try:
            return cls(
                classes=json.loads(meta["classes"]),
                input_size=tuple(json.loads(meta["input_size"])),
                mean=np.asarray(json.loads(meta["mean"]), dtype=np.float32),
                std=np.asarray(json.loads(meta["std"]), dtype=np.float32),
                temperature=float(meta.get("temperature", "1.0")),
                raw=dict(meta),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise FormatError(f"{source} lacks cigl metadata ({exc}); export it with cigl-export") from None

    def number(self, key: str) -> float | None:
        """A numeric metadata entry (None when absent)."""
        value = self.raw.get(key)
        return None if value in (None, "null") else float(value)


def _gpu_present() -> bool:
    """An NVIDIA driver is loaded (Linux); elsewhere onnxruntime's own check has to do."""
    return Path("/proc/driver/nvidia/version").exists() or not sys.platform.startswith("linux")


def _providers(device: str) -> list[str]:
    import onnxruntime as ort

    if device not in ("auto", "cpu", "cuda"):
        raise InputError(f"device must be auto, cpu or cuda, got {device!r}")
    # onnxruntime-gpu lists CUDAExecutionProvider even on machines without a GPU, then logs
    # errors while falling back to CPU: only ask for CUDA where a GPU can be there
    cuda_ok = "CUDAExecutionProvider" in ort.get_available_providers() and _gpu_present()
    if device == "cuda" and not cuda_ok:
        raise InputError("device cuda requested but no usable CUDA GPU / CUDAExecutionProvider here; use --device cpu")
    if device == "cpu" or not cuda_ok:
        return ["CPUExecutionProvider"]
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


class Predictor:
    """One onnxruntime session (safe to share across threads) plus the model card."""

    def __init__(self, path: str | Path, device: str = "auto", threads: int = 0, max_batch: int = MAX_BATCH):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise InputError(f"model not found: {path}")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads must not steal cores
        opts.log_severity_level = 3
        try:  # from bytes: a model that keeps weights in external files cannot resolve them
            self.session = ort.InferenceSession(path.read_bytes(), opts, providers=_providers(device))
        except InputError:
            raise
        except Exception as exc:  # onnxruntime raises its own exception types
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if "external" in message.lower():
                raise FormatError(
                    f"{path} keeps weights in external data files; cigl serves single-file ONNX only"
                ) from None
            raise FormatError(f"{path} is not a loadable ONNX model ({message[:200]})") from None
        self.provider = self.session.get_providers()[0]
        if device == "cuda" and self.provider != "CUDAExecutionProvider":
            raise InputError(f"device cuda requested but onnxruntime fell back to {self.provider}")
        self.card = ModelCard.from_metadata(self.session.get_modelmeta().custom_metadata_map, str(path))
        self.max_batch = max_batch
        self.path = path

    # ------------------------------------------------------------------ arrays

    def check_batch(self, x: np.ndarray) -> np.ndarray:
        """Validate a normalised float batch before onnxruntime sees it."""
        x = np.asarray(x)
        c, h, w = self.card.input_size
        if x.dtype.kind != "f":
            raise InputError(f"inputs must be float arrays (normalised images), got dtype {x.dtype}")
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4:
            raise InputError(f"inputs must have shape (batch, {c}, {h}, {w}), got {x.shape}")
        if x.shape[1] != c:
            raise InputError(f"the model takes {c} channel(s), the input has {x.shape[1]}")
        if x.shape[2:] != (h, w):
            raise InputError(f"the model takes {h}x{w} images, the input is {x.shape[2]}x{x.shape[3]}")
        if x.shape[0] == 0:
            raise InputError("empty batch")
        if x.shape[0] > self.max_batch:
            raise InputError(f"batch of {x.shape[0]} exceeds the limit of {self.max_batch}; send smaller batches")
        if not np.isfinite(x).all():
            raise InputError("inputs contain NaN or Inf values")
        return np.ascontiguousarray(x, dtype=np.float32)

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(logits, calibrated probabilities) of a normalised float batch."""
        logits, probs = self.session.run(["logits", "probs"], {"images": self.check_batch(x)})
        return logits, probs

    def normalize(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, C) images -> normalised float32 NCHW."""
        x = images.astype(np.float32).transpose(0, 3, 1, 2) / 255.0
        return (x - self.card.mean[None, :, None, None]) / self.card.std[None, :, None, None]

    # ------------------------------------------------------------------ image files

    def load_image(self, path, name: str | None = None) -> np.ndarray:
        """Decode a file (path or file object) with Pillow, convert to the model's channels,
        resize the short side and centre-crop to the model's size: uint8 (H, W, C)."""
        from PIL import Image, UnidentifiedImageError

        c, h, w = self.card.input_size
        try:
            with Image.open(path) as im:
                im = im.convert("L" if c == 1 else "RGB")
                if im.size != (w, h):
                    scale = max(w / im.size[0], h / im.size[1])
                    size = (max(w, round(im.size[0] * scale)), max(h, round(im.size[1] * scale)))
                    im = im.resize(size, Image.BILINEAR)
                    left, top = (im.size[0] - w) // 2, (im.size[1] - h) // 2
                    im = im.crop((left, top, left + w, top + h))
                arr = np.asarray(im, dtype=np.uint8)
        except UnidentifiedImageError:
            raise InputError(f"cannot read image {name or path}: not a decodable image file") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise InputError(f"cannot read image {name or path}: {exc}") from None
        return arr[..., None] if arr.ndim == 2 else arr

    def records(self, sources: list[str], probs: np.ndarray, top_k: int = 1, abstain_below: float = 0.0) -> list[dict]:
        """One record per input: predicted class, calibrated confidence, top-k, abstained."""
        k = max(1, min(top_k, probs.shape[1]))
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        out = []
        for src, p, idx in zip(sources, probs, order, strict=True):
            conf = float(p[idx[0]])
            out.append(
                {
                    "source": src,
                    "class": self.card.classes[idx[0]],
                    "confidence": round(conf, 6),
                    "top_k": [[self.card.classes[i], round(float(p[i]), 6)] for i in idx],
                    "abstained": conf < abstain_below,
                }
            )
        return out
