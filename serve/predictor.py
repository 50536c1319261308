"""Calibrated predictions from an exported model.onnx with onnxruntime (numpy + pillow, no torch).

p = Predictor("model.onnx")                 # device="auto" | "cpu" | "cuda"
p.provider                                  # the execution provider actually in use
image = p.load_image("cat.jpg")             # path, file object or PIL.Image -> uint8 H x W x C
logits, probs = p.predict(p.normalize(image[None]))  # float32 NCHW, normalised as the model expects
records = p.records(["cat.jpg"], probs)     # class, calibrated confidence, top-k, abstained
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cigl.errors import FormatError, InputError
from cigl.images import MAX_SIDE, check_preprocess, load_image

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
        """Parse and check the card: every entry well-formed and within bounds (the file may come
        from anyone), so that nothing downstream trusts a malformed one."""
        try:
            card = cls(
                classes=json.loads(meta["classes"]),
                input_size=tuple(json.loads(meta["input_size"])),
                mean=np.asarray(json.loads(meta["mean"]), dtype=np.float32),
                std=np.asarray(json.loads(meta["std"]), dtype=np.float32),
                temperature=float(meta.get("temperature", "1.0")),
                raw=dict(meta),
            )
        except (KeyError, ValueError, TypeError, RecursionError) as exc:
            raise FormatError(f"{source} lacks cigl metadata ({exc}); export it with cigl-export") from None
        problem = card._problem()
        if problem:
            raise FormatError(f"{source} has a malformed model card: {problem}; re-export it with cigl-export")
        if "preprocess" in meta:
            check_preprocess(meta["preprocess"], source)
        return card

    def _problem(self) -> str | None:
        """What is wrong with the parsed entries, or None."""
        size = self.input_size
        if len(size) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) for v in size):
            return f"input_size must be [channels, height, width], got {list(size)}"
        if size[0] not in (1, 3) or not (1 <= size[1] <= MAX_SIDE and 1 <= size[2] <= MAX_SIDE):
            return f"input_size {list(size)} is outside 1 or 3 channels and 1..{MAX_SIDE} pixels a side"
        if not isinstance(self.classes, list) or not self.classes or not all(isinstance(c, str) for c in self.classes):
            return "classes must be a non-empty list of names"
        if self.mean.shape != (size[0],) or self.std.shape != (size[0],):
            return f"mean and std need {size[0]} value(s), one per channel"
        if not (np.isfinite(self.mean).all() and np.isfinite(self.std).all() and (self.std > 0).all()):
            return "mean and std must be finite with std > 0"
        if not (np.isfinite(self.temperature) and self.temperature > 0):
            return f"temperature must be a finite number > 0, got {self.temperature}"
        return None

    def number(self, key: str) -> float | None:
        """A numeric metadata entry (None when absent or not a finite number)."""
        try:
            value = float(self.raw.get(key, "nan"))
        except ValueError:
            return None
        return value if np.isfinite(value) else None


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
        self._check_graph(str(path))
        self.max_batch = max_batch
        self.path = path

    def _check_graph(self, source: str) -> None:
        """The card must describe the graph: input `images` of the card's size, outputs `logits`
        and `probs` with one column per class."""
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        outputs = {o.name: o.shape for o in self.session.get_outputs()}
        if "images" not in inputs or not {"logits", "probs"} <= set(outputs):
            raise FormatError(f"{source} is not a cigl model (needs input 'images', outputs 'logits' and 'probs')")
        declared = [d for d in inputs["images"][1:] if isinstance(d, int)]
        if len(inputs["images"]) != 4 or (len(declared) == 3 and tuple(declared) != self.card.input_size):
            raise FormatError(
                f"{source}: the card's input_size {list(self.card.input_size)} does not match the graph's "
                f"input {inputs['images']}; re-export it with cigl-export"
            )
        width = outputs["logits"][-1] if outputs["logits"] else None
        if isinstance(width, int) and width != len(self.card.classes):
            raise FormatError(
                f"{source}: the card names {len(self.card.classes)} classes but the model has {width} outputs; "
                "re-export it with cigl-export"
            )

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
        c, h, w = self.card.input_size
        if images.ndim != 4 or images.shape[3] != c:
            raise InputError(f"images must have shape (N, H, W, {c}) for this model, got {images.shape}")
        x = images.astype(np.float32).transpose(0, 3, 1, 2) / 255.0
        return (x - self.card.mean[None, :, None, None]) / self.card.std[None, :, None, None]

    # ------------------------------------------------------------------ image files

    def load_image(self, source, name: str | None = None) -> np.ndarray:
        """Decode an image (a path, a binary file object or a PIL.Image) to the model's input as
        uint8 (H, W, C), by the one preprocessing training used (cigl.images)."""
        c, h, w = self.card.input_size
        return load_image(source, c, (h, w), name=name)

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
