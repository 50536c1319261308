"""The model card: what an exported model says about itself.

Written once by cigl-export (`write_card`) into the safetensors header and the ONNX
metadata_props, read back by cigl-predict, cigl-serve and confidence-audit (`ModelCard`).
Every value is a string; non-strings are JSON. Torch-free: serving needs numpy only.

Metric names are one vocabulary everywhere (summary.json, metrics.jsonl, report.json and the
card): those of `cigl.calibration.summary`. Files written before it spelled two of them
differently; `metric` still reads those.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass

import numpy as np

from cigl.conformal import METHODS as CONFORMAL_METHODS
from cigl.errors import FormatError, InputError
from cigl.images import MAX_SIDE, PREPROCESS, check_preprocess

METRICS = ("accuracy", "nll", "ece", "brier", "mean_confidence")
RECORDED = ("accuracy", "ece", "nll")  # the test metrics a card carries, as test_<name>
RECORDED_ECE_BINS = 10  # the equal-width bins of every ECE a card records (training's split metrics)
OLD_METRIC_NAMES = {"accuracy": "acc", "mean_confidence": "conf"}  # summary.json before one vocabulary
METHOD_SETTINGS = (
    "density",
    "sparse_init",
    "dpnum",
    "avg_start",
    "drop_fraction",
    "update_every",
    "update_end",
    "epochs",
    "seed",
    "dataset",
)


def metric(metrics: dict, name: str):
    """metrics[name], or its pre-vocabulary spelling in files from earlier versions (None if absent)."""
    if name in metrics:
        return metrics[name]
    return metrics.get(OLD_METRIC_NAMES.get(name, name))


def mask_density(masks: dict) -> float:
    """Nonzeros / elements over the masked tensors (numpy arrays or torch tensors), 1.0 without
    masks: a run's actual density, summary.json's and the card's one definition."""
    numel = sum(int(np.prod(m.shape)) for m in masks.values())
    return sum(int((m != 0).sum()) for m in masks.values()) / numel if numel else 1.0


def write_card(model_file: dict) -> dict[str, str]:
    """The card of a loaded model.pt (cigl.runfiles): architecture, input and preprocessing,
    classes, method and its settings, densities, temperature and the run's test metrics."""
    cfg, summary, kw = model_file.get("config", {}), model_file.get("summary", {}), model_file["model_kwargs"]
    test = summary.get("test", {})
    card = {
        "arch": model_file["arch"],
        "model_kwargs": kw,
        "num_classes": kw["num_classes"],
        "input_size": [kw["in_chans"], kw["image_size"], kw["image_size"]],
        "preprocess": PREPROCESS,
        "mean": model_file["mean"],
        "std": model_file["std"],
        "classes": model_file["classes"],
        "method": model_file.get("method", "unknown"),
        "method_settings": {k: cfg[k] for k in METHOD_SETTINGS if k in cfg},
        "product": summary.get("product", "final_weights"),
        "mask_updates": summary.get("mask_updates", 0),
        "target_density": summary.get("target_density", cfg.get("density", 1.0)),
        # a model.pt without it (written by save_model_file outside a run) says what its masks hold
        "actual_density": summary.get("actual_density", mask_density(model_file.get("masks", {}))),
        "layer_density": {r["name"]: round(r["density"], 6) for r in summary.get("layers", [])},
        "temperature": model_file.get("temperature", 1.0),
        **{f"test_{name}": metric(test, name) for name in RECORDED},
        "test_calibrated": summary.get("test_calibrated", {}),
    }
    if "conformal" in summary:
        c = summary["conformal"]
        card["conformal"] = {"method": c["method"], "thresholds": c["thresholds"], "n_calibration": c["n_calibration"]}
    if summary.get("selective", {}).get("threshold") is not None:
        card["abstain_threshold"] = summary["selective"]["threshold"]
        card["selective"] = {k: summary["selective"][k] for k in ("target_risk", "delta", "coverage", "risk")}
    return {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in card.items()}


@dataclass(frozen=True)
class ModelCard:
    """A card read back from an exported file, checked: the file may come from anyone."""

    classes: list[str]
    input_size: tuple[int, int, int]  # C, H, W
    mean: np.ndarray
    std: np.ndarray
    temperature: float
    raw: dict[str, str]

    @classmethod
    def from_metadata(cls, meta: dict[str, str], source: str) -> ModelCard:
        """Parse and check the card: every entry well-formed and within bounds, so that nothing
        downstream trusts a malformed one. Raises FormatError naming `source`."""
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
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            return f"temperature must be a finite number > 0, got {self.temperature}"
        return None

    def conformal(self) -> tuple[str, dict[float, float]] | None:
        """(score method, alpha -> threshold) calibrated at training, or None. Checked: the
        file may come from anyone."""
        return self._conformal

    @functools.cached_property
    def _conformal(self) -> tuple[str, dict[float, float]] | None:
        """The conformal entry parsed once (the card never changes; the server asks per request)."""
        if "conformal" not in self.raw:
            return None
        try:
            entry = json.loads(self.raw["conformal"])
            method, thresholds = entry["method"], {float(a): float(q) for a, q in entry["thresholds"].items()}
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
            raise FormatError("the model card's conformal entry is malformed; re-export the model") from None
        good = all(0 < a < 1 and math.isfinite(q) for a, q in thresholds.items())
        if method not in CONFORMAL_METHODS or not thresholds or not good:
            raise FormatError("the model card's conformal entry is malformed; re-export the model")
        return method, thresholds

    def conformal_threshold(self, alpha: float) -> tuple[str, float]:
        """(method, threshold) for `alpha`; InputError naming the alphas the card holds."""
        found = self.conformal()
        if found is None:
            raise InputError(
                "this model has no conformal thresholds (it was trained without a validation split or by an "
                "older cigl); retrain with a validation split (--val-size > 0) to record them, or measure sets "
                "on labelled images with confidence-audit --alpha"
            )
        method, thresholds = found
        for a, q in thresholds.items():
            if math.isclose(a, alpha, rel_tol=1e-9):
                return method, q
        held = ", ".join(f"{a:g}" for a in sorted(thresholds, reverse=True))
        raise InputError(f"alpha {alpha:g} is not in the model card (calibrated: {held}); choose one of those")

    def abstain_threshold(self) -> float:
        """The certified abstain threshold recorded at training (0.0: none, answer everything)."""
        value = self.number("abstain_threshold")
        return value if value is not None and 0 <= value <= 1 else 0.0

    def number(self, key: str) -> float | None:
        """A numeric entry (None when absent or not a finite number)."""
        try:
            value = float(self.raw.get(key, "nan"))
        except ValueError:
            return None
        return value if math.isfinite(value) else None

    def recorded(self) -> dict[str, float | None]:
        """The test metrics measured at the end of training (None where the card has none):
        raw (T = 1), and `served_ece` at the model's own temperature."""
        try:
            served = json.loads(self.raw.get("test_calibrated", "{}")).get("ece")
        except (ValueError, AttributeError, RecursionError):
            served = None
        served = float(served) if isinstance(served, int | float) and math.isfinite(served) else None
        return {name: self.number(f"test_{name}") for name in RECORDED} | {"served_ece": served}
