"""Calibrated predictions from an exported model.onnx with onnxruntime or cigl's sparse engine
(numpy + pillow, no torch).

p = Predictor("model.onnx")                 # device="auto" | "cpu" | "cuda", engine="auto" | "onnxruntime" | "sparse"
p.provider                                  # the engine actually in use (onnxruntime's provider, or "sparse")
image = p.load_image("cat.jpg")             # path, file object or PIL.Image -> uint8 H x W x C
logits, probs = p.predict(image)            # uint8 images (N, H, W, C) or one (H, W, C), or
                                            # float32 NCHW already normalised (p.normalize)
records = p.records(["cat.jpg"], probs)     # class, calibrated confidence, top-k, abstained
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cigl import conformal
from cigl.card import ModelCard
from cigl.errors import FormatError, InputError, is_int_in
from cigl.images import load_image
from cigl.runfiles import export_hint, exported_model
from cigl.serve.engines import open_engine

MAX_BATCH = 1024  # default limit of a batch's images
MAX_BATCH_LIMIT = 65_536  # the highest limit a caller may set


class Predictor:
    """One inference engine (safe to share across threads; cigl.serve.engines) plus the model card."""

    def __init__(
        self,
        path: str | Path,
        device: str = "auto",
        threads: int = 0,
        max_batch: int = MAX_BATCH,
        engine: str = "auto",
    ):
        if not is_int_in(max_batch, 1, MAX_BATCH_LIMIT):
            raise InputError(f"max_batch must be an integer in 1..{MAX_BATCH_LIMIT}, got {max_batch!r}")
        path = exported_model(Path(path))
        try:
            self.engine = open_engine(
                path.read_bytes(), engine=engine, device=device, threads=threads, source=str(path), max_batch=max_batch
            )
        except FormatError:
            hint = export_hint(path)  # a model.pt or safetensors given for the model.onnx
            if hint is None:
                raise
            raise InputError(hint) from None
        self.provider = self.engine.name
        self.card = ModelCard.from_metadata(self.engine.metadata, str(path))
        self._check_graph(str(path))
        self.max_batch = max_batch
        self.path = path

    def _check_graph(self, source: str) -> None:
        """The card must describe the graph: input `images` of the card's size, outputs `logits`
        and `probs` with one column per class."""
        inputs, outputs = self.engine.inputs, self.engine.outputs
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

    def as_batch(self, x) -> np.ndarray:
        """The model's float input for uint8 images (N, H, W, C) or one image (H, W, C), normalised
        here; float arrays are taken as already normalised (N, C, H, W) and returned as they are."""
        x = np.asarray(x)
        if x.dtype == np.uint8:
            return self.normalize(x[None] if x.ndim == 3 else x)
        if x.dtype.kind != "f":
            raise InputError(
                f"inputs must be uint8 images (N, H, W, C) or normalised float arrays (N, C, H, W), got dtype {x.dtype}"
            )
        return x

    def check_batch(self, x: np.ndarray) -> np.ndarray:
        """Validate a normalised float batch before onnxruntime sees it."""
        x = np.asarray(x)
        c, h, w = self.card.input_size
        if x.dtype.kind != "f":
            raise InputError(f"inputs must be float arrays (normalised images), got dtype {x.dtype}")
        single = x.ndim == 3  # one image (C, H, W)
        if single:
            x = x[None]
        if x.ndim != 4:
            shapes = f"(batch, {c}, {h}, {w}) or one image ({c}, {h}, {w})"
            raise InputError(f"inputs must have shape {shapes}, got {x.shape}")
        if x.shape[1] != c:
            looks = "an (H, W, C) image: pass it" if single else "(N, H, W, C) images: pass them"
            hint = ""
            if x.shape[3] == c:  # channels last: images, not the normalised channels-first floats
                hint = f"; this looks like {looks} as uint8 (0-255), normalised for you"
            where = "axis 0 of one (C, H, W) image" if single else "axis 1 of (N, C, H, W)"
            raise InputError(f"the model takes {c} channel(s), the input has {x.shape[1]} in {where}{hint}")
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
        """(logits, calibrated probabilities) of uint8 images or a normalised float batch (`as_batch`)."""
        return self.engine.run(self.check_batch(self.as_batch(x)))

    def normalize(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, C) images -> normalised float32 NCHW."""
        c, h, w = self.card.input_size
        if images.ndim != 4 or images.shape[3] != c:
            raise InputError(f"images must have shape (N, {h}, {w}, {c}) for this model, got {images.shape}")
        x = images.astype(np.float32).transpose(0, 3, 1, 2) / 255.0
        return (x - self.card.mean[None, :, None, None]) / self.card.std[None, :, None, None]

    # ------------------------------------------------------------------ image files

    def load_image(self, source, name: str | None = None) -> np.ndarray:
        """Decode an image (a path, a binary file object or a PIL.Image) to the model's input as
        uint8 (H, W, C), by the one preprocessing training used (cigl.images)."""
        c, h, w = self.card.input_size
        return load_image(source, c, (h, w), name=name)

    def records(
        self,
        sources: list[str],
        probs: np.ndarray,
        top_k: int = 1,
        abstain_below: float | None = None,
        alpha: float | None = None,
    ) -> list[dict]:
        """One record per input: predicted class, calibrated confidence, top-k, abstained
        (confidence below `abstain_below`; None: the card's certified threshold, else 0) and,
        with `alpha`, the conformal prediction set of the card's thresholds for that alpha."""
        threshold = self.card.abstain_threshold() if abstain_below is None else abstain_below
        sets = None
        if alpha is not None:
            method, q = self.card.conformal_threshold(alpha)
            sets = conformal.prediction_sets(probs, q, method, seed=0)  # APS/RAPS draw u per position
        k = max(1, min(top_k, probs.shape[1]))
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        out = []
        for i, (src, p, idx) in enumerate(zip(sources, probs, order, strict=True)):
            conf = float(p[idx[0]])
            record = {
                "source": src,
                "class": self.card.classes[idx[0]],
                "confidence": round(conf, 6),
                "top_k": [[self.card.classes[j], round(float(p[j]), 6)] for j in idx],
                "abstained": conf < threshold,
            }
            if sets is not None:
                record["prediction_set"] = [self.card.classes[j] for j in np.flatnonzero(sets[i])]
            out.append(record)
        return out
