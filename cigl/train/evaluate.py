"""Evaluation of a trained model: logits per split, metrics (raw and at the temperature fitted
on the validation split), MC dropout with the random mask, and summary.json."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from cigl import calibration, conformal, selective
from cigl.card import RECORDED_ECE_BINS, mask_density
from cigl.pipeline import normalize
from cigl.sparse import random_mask

EVAL_BATCH = 512


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, mean, std, batch: int, amp, weights=None) -> np.ndarray:
    """Logits (float32 numpy) of `model` in eval mode on uint8 images `x`, optionally with some
    parameters replaced by `weights` (name -> tensor)."""
    model.eval()
    out = []
    for i in range(0, x.shape[0], batch):
        inputs = (normalize(x[i : i + batch], mean, std),)
        with amp():
            logits = model(*inputs) if weights is None else torch.func.functional_call(model, weights, inputs)
        out.append(logits.float().cpu())
    return torch.cat(out).numpy()


def split_logits(model: nn.Module, xs: dict[str, torch.Tensor], data, amp, weights=None) -> dict[str, np.ndarray]:
    """split -> logits of `model` (optionally with `weights` swapped in) on that split's images."""
    return {split: predict_logits(model, x, data.mean, data.std, EVAL_BATCH, amp, weights) for split, x in xs.items()}


def split_metrics(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> dict[str, float]:
    """cigl.card.METRICS of softmax(logits / T): accuracy, NLL, ECE (RECORDED_ECE_BINS), Brier, mean confidence."""
    s = calibration.summary(logits / temperature, labels, kind="logits", n_bins=RECORDED_ECE_BINS)
    return {k: s[k] for k in ("accuracy", "nll", "ece", "brier", "mean_confidence")}


def mc_dropout_logits(
    model: nn.Module,
    xs: dict[str, torch.Tensor],
    data,
    amp,
    weights: dict[str, torch.Tensor],
    dpnum: int,
    samples: int,
    seed: int,
) -> dict[str, np.ndarray]:
    """split -> log of the mean softmax over `samples` forward passes, each with its own random
    mask on `weights` (every weight dropped with p = 1/dpnum, survivors scaled by dpnum/(dpnum-1)):
    Monte-Carlo dropout (Gal & Ghahramani, 2016) on the weights, the paper's RigL+MC-DP. The log
    of the averaged probabilities is a valid logit vector for every metric and temperature fit."""
    generator = torch.Generator(device=next(iter(weights.values())).device).manual_seed(seed)
    total: dict[str, np.ndarray] = {}
    for _ in range(samples):
        dropped = {
            n: w * (torch.rand(w.shape, generator=generator, device=w.device) >= 1.0 / dpnum) * random_mask.scale(dpnum)
            for n, w in weights.items()
        }
        for split, split_logit in split_logits(model, xs, data, amp, dropped).items():
            total[split] = total.get(split, 0.0) + calibration.softmax(split_logit)
    return {split: np.log(np.maximum(p / samples, 1e-12)).astype(np.float32) for split, p in total.items()}


def evaluate(logits: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> dict:
    """Test metrics raw and at the temperature fitted on the validation split (1 without one)."""
    temperature = calibration.fit_temperature(logits["val"], labels["val"], kind="logits") if "val" in logits else 1.0
    return {
        "test": split_metrics(logits["test"], labels["test"]),
        "temperature": temperature,
        "test_calibrated": split_metrics(logits["test"], labels["test"], temperature),
    }


def make_summary(cfg, masks: dict[str, torch.Tensor], target_nnz: dict[str, int], results: dict, chosen: str) -> dict:
    """summary.json: the shipped model's (`chosen`) test metrics raw and at the fitted
    temperature, every evaluated model's metrics, and target vs actual density per layer."""
    layers = [
        {
            "name": n,
            "numel": m.numel(),
            "target_density": target_nnz[n] / m.numel(),
            "nnz": int(m.sum()),
            "density": int(m.sum()) / m.numel(),
        }
        for n, m in masks.items()
    ]
    return {
        "method": cfg.method,
        "model": cfg.model,
        "dataset": cfg.dataset,
        "seed": cfg.seed,
        "epochs": cfg.epochs,
        "target_density": cfg.density,
        "actual_density": mask_density(masks),
        "product": chosen,
        **{k: results[chosen][k] for k in ("test", "temperature", "test_calibrated")},
        **results,
        "layers": layers,
    }


def confidence_guarantees(
    logits: dict[str, np.ndarray], labels: dict[str, np.ndarray], temperature: float, method: str, target_risk
) -> dict:
    """Conformal thresholds (cigl.conformal) and, with `target_risk`, the certified abstain
    threshold (cigl.selective), calibrated on the validation split's served probabilities
    softmax(logits / T), and what they give on the test split. {} without a validation split.
    T was fitted on the same split: one scalar, whose effect the test columns show."""
    if "val" not in logits:
        return {}
    val = calibration.softmax(logits["val"], temperature)
    test = calibration.softmax(logits["test"], temperature)
    alphas = [a for a in conformal.DEFAULT_ALPHAS if len(val) >= conformal.min_samples(a)]
    out = {}
    if alphas:
        thresholds = conformal.calibrate(val, labels["val"], alphas, method)
        sets = {a: conformal.prediction_sets(test, q, method, seed=1) for a, q in thresholds.items()}
        out["conformal"] = {
            "method": method,
            "thresholds": {str(a): q for a, q in thresholds.items()},
            "n_calibration": len(val),
            "test_coverage": {str(a): conformal.coverage(s, labels["test"]) for a, s in sets.items()},
            "test_mean_size": {str(a): float(s.sum(axis=1).mean()) for a, s in sets.items()},
        }
    if target_risk is not None:
        chosen = selective.risk_threshold(val.max(axis=1), val.argmax(axis=1) == labels["val"], target_risk)
        on_test = selective.selective_metrics(
            test.max(axis=1), test.argmax(axis=1) == labels["test"], chosen["threshold"]
        )
        out["selective"] = chosen | {"test_coverage": on_test["coverage"], "test_risk": on_test["risk"]}
    return out
