"""`confidence-audit`: calibration, conformal coverage, selective prediction, distribution
shift and a pass/fail gate, for prediction files and exported models.

Inputs are prediction files (`.npz` with `logits` or `probs` plus `labels`, or `.csv` with a
label column and one column per class) or exported `.onnx` models run over --data/--dataset.
Writes report.json, report.md, report.html and the plots into --out (all or nothing) and exits
1 when a gate fails. numpy, scipy and matplotlib only: no torch.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cigl import calibration as cal
from cigl import conformal
from cigl.card import RECORDED_ECE_BINS
from cigl.corruptions import CORRUPTIONS, SEVERITIES, corrupt
from cigl.errors import ArgumentParser, InputError, cli_entry, writing
from cigl.images import folder_images
from cigl.io import check_output_dir, make_output_dir
from cigl.serve import guarantees, report
from cigl.serve.audit_inputs import Predictions, is_model, load_predictions, model_logits, onnx_predictions


@dataclass(frozen=True)
class Settings:
    """How models are audited (the command-line options, validated)."""

    n_bins: int = 10
    scheme: str = "uniform"
    temperature: str = "fit"
    fit_split: float = 0.5
    n_boot: int = 1000
    seed: int = 0
    alphas: tuple[float, ...] = (0.1,)
    conformal: str = "aps"
    target_risk: float | None = None
    shift: bool = False
    shift_samples: int = 1000


MAX_BOOTSTRAP = 100_000
MAX_SHIFT_SAMPLES = 100_000


# --------------------------------------------------------------------------- auditing


def _as_logits(p: Predictions) -> np.ndarray:
    return p.scores if p.kind == "logits" else np.log(np.clip(p.scores, 1e-300, None))


def fit_report_split(n: int, fit_split: float, seed: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random (fit, report) indices: fit for the temperature and the thresholds, report
    for measuring them."""
    idx = np.random.default_rng(seed).permutation(n)
    n_fit = round(fit_split * n)
    if n_fit < 1 or n_fit >= n:
        raise InputError(f"--fit-split {fit_split} leaves no samples to fit or to report on for {name}")
    return np.sort(idx[:n_fit]), np.sort(idx[n_fit:])


def served_probs(p: Predictions) -> tuple[np.ndarray, str]:
    """(the probabilities the model serves, what they are): an exported model's softmax at its
    own temperature, a prediction file's probabilities as given (softmax of its logits)."""
    if p.model is not None:
        t = p.model["temperature_in_model"]
        return cal.softmax(p.scores, t), f"model's own T = {t:.3f}"
    return cal.to_probs(p.scores, p.kind), "as given" if p.kind == "probs" else "softmax of the logits"


def served_probs_of(p: Predictions, images: np.ndarray) -> np.ndarray:
    """What an exported model serves for other uint8 images (corrupted or out-of-distribution)."""
    return cal.softmax(model_logits(p.predictor, images), p.model["temperature_in_model"])


def calibration_metrics(p: Predictions, s: Settings, split: tuple[np.ndarray, np.ndarray]) -> dict:
    """The raw scores' metrics and the effect of --temperature, on the report split (all
    samples unless the temperature is fitted)."""
    fit, report = split
    if s.temperature == "fit":
        t = cal.fit_temperature(p.scores[fit], p.labels[fit], kind=p.kind)
    else:
        report = np.arange(p.labels.shape[0])
        if s.temperature == "model" and p.model is None:
            raise InputError(f"--temperature model needs a .onnx model; {p.name} is a prediction file")
        named = {"none": 1.0, "model": p.model["temperature_in_model"] if p.model else None}
        t = named[s.temperature] if s.temperature in named else float(s.temperature)
    scores, labels = p.scores[report], p.labels[report]
    metrics = cal.summary(scores, labels, kind=p.kind, n_bins=s.n_bins)
    if s.scheme == "adaptive":
        metrics["ece"], metrics["adaptive_ece"] = metrics["adaptive_ece"], metrics["ece"]
        metrics["mce"] = cal.mce(scores, labels, kind=p.kind, n_bins=s.n_bins, scheme="adaptive")
    after = cal.summary(cal.softmax(_as_logits(p)[report], t), labels, kind="probs", n_bins=s.n_bins)
    return metrics | {
        "temperature": t,
        "ece_after_t": after["adaptive_ece" if s.scheme == "adaptive" else "ece"],
        "nll_after_t": after["nll"],
        "n_fit": int(p.labels.shape[0] - report.size),
        "bins": bins_dict(cal.to_probs(scores, p.kind), labels, s, band=False),
    }


def bins_dict(probs: np.ndarray, labels: np.ndarray, s: Settings, band: bool) -> dict:
    """Reliability bins; with `band`, each bin's 95% bootstrap interval of accuracy."""
    b = cal.reliability_bins(probs, labels, kind="probs", n_bins=s.n_bins, scheme=s.scheme)
    out = {
        "edges": b.edges.tolist(),
        "count": b.count.astype(int).tolist(),
        "confidence": np.nan_to_num(b.confidence).tolist(),
        "accuracy": np.nan_to_num(b.accuracy).tolist(),
    }
    if band and s.n_boot:
        rng = np.random.default_rng(s.seed)
        draws = np.stack(
            [
                np.nan_to_num(
                    cal.reliability_bins(probs[i], labels[i], kind="probs", n_bins=s.n_bins, scheme=s.scheme).accuracy
                )
                for i in (rng.integers(0, labels.size, labels.size) for _ in range(min(s.n_boot, 200)))
            ]
        )
        out["accuracy_lo"], out["accuracy_hi"] = (np.quantile(draws, q, axis=0).tolist() for q in (0.025, 0.975))
    return out


def audit_one(p: Predictions, s: Settings) -> dict:
    """Every measurement of one model (report.json's entry for it)."""
    split = fit_report_split(p.labels.shape[0], s.fit_split, s.seed, p.name)
    metrics = calibration_metrics(p, s, split)
    probs, what = served_probs(p)
    card = p.predictor.card if p.predictor is not None else None
    metrics["served"] = guarantees.served_metrics(probs, p.labels, n_bins=s.n_bins, n_boot=s.n_boot, seed=s.seed) | {
        "what": what,
        "bins": bins_dict(probs, p.labels, s, band=True),
    }
    classes = p.classes or [str(k) for k in range(probs.shape[1])]
    metrics["per_class"] = guarantees.per_class(probs, p.labels, classes, s.n_bins)
    metrics["confusion"] = guarantees.confusion(probs, p.labels)
    from_card = card.conformal() if card is not None else None
    metrics["conformal"] = guarantees.conformal_report(probs, p.labels, split, list(s.alphas), s.conformal, from_card)
    threshold = card.abstain_threshold() if card is not None else 0.0
    metrics["selective"] = guarantees.selective_report(probs, p.labels, split, s.target_risk, threshold)
    if p.model is not None:
        p.model["ece_drift"] = ece_drift(probs, p.labels, p.model["recorded"]["served_ece"], metrics["served"], s)
        metrics["model"] = p.model
    if s.shift:
        metrics["shift"] = shift_audit(p, s, metrics["conformal"])
    return metrics


def ece_drift(probs: np.ndarray, labels: np.ndarray, recorded: float | None, served: dict, s: Settings) -> bool:
    """Whether the served ECE recorded at training and the one measured here differ by more than
    the bootstrap interval's half-width, both binned as training bins (`--bins` may differ)."""
    if recorded is None or not s.n_boot:
        return False
    if s.n_bins != RECORDED_ECE_BINS:
        served = guarantees.served_metrics(probs, labels, n_bins=RECORDED_ECE_BINS, n_boot=s.n_boot, seed=s.seed)
    low, high = served["ece_ci"]
    return abs(recorded - served["ece"]) > (high - low) / 2


def shift_audit(p: Predictions, s: Settings, conformal_found: dict) -> dict:
    """Accuracy, ECE, NLL and conformal coverage (first alpha) of the served probabilities on
    corrupted copies of (an evenly spread subset of up to --shift-samples of) the audit images."""
    pick = np.unique(np.linspace(0, p.labels.size - 1, min(s.shift_samples, p.labels.size)).round().astype(int))
    images, labels = p.images[pick], p.labels[pick]
    first = next(iter(conformal_found["alphas"].items()), None)
    method = conformal_found["method"]
    corruptions: dict[str, dict[str, dict]] = {}
    for name in CORRUPTIONS:
        corruptions[name] = {}
        for severity in SEVERITIES:
            probs = served_probs_of(p, corrupt(images, name, severity, s.seed))
            row = {
                k: v
                for k, v in cal.summary(probs, labels, kind="probs", n_bins=s.n_bins).items()
                if k in ("accuracy", "ece", "nll")
            }
            if first is not None:
                sets = conformal.prediction_sets(probs, first[1]["threshold"], method, seed=1)
                row["coverage"] = conformal.coverage(sets, labels)
            corruptions[name][str(severity)] = row
    mean = {
        str(sev): {
            k: float(np.mean([corruptions[c][str(sev)][k] for c in corruptions])) for k in ("accuracy", "ece", "nll")
        }
        for sev in SEVERITIES
    }
    return {
        "n": int(labels.size),
        "alpha": first[0] if first else None,
        "corruptions": corruptions,
        "mean_by_severity": mean,
    }


def ood_audit(p: Predictions, folder: str) -> dict:
    """In-distribution (the audit data) vs a folder of out-of-distribution images."""
    from cigl.serve.predict import expand_inputs

    files = expand_inputs([folder])
    if not files:
        raise InputError(f"--ood-data {folder} holds no images")
    with folder_images():
        ood = np.stack([p.predictor.load_image(f) for f in files])
    return guarantees.ood_report(served_probs(p)[0].max(axis=1), served_probs_of(p, ood).max(axis=1))


# --------------------------------------------------------------------------- the gate


@dataclass(frozen=True)
class Gate:
    max_ece: float | None = None  # on the served probabilities
    min_coverage: float | None = None  # conformal coverage at the first --alpha
    max_risk: float | None = None  # realised selective risk at the abstain threshold

    def failures(self, m: dict) -> list[str]:
        """What one model fails (empty: it passes)."""
        out = []
        if self.max_ece is not None and m["served"]["ece"] > self.max_ece:
            out.append(f"ECE {report.pct(m['served']['ece'])} > {report.pct(self.max_ece)}")
        if self.min_coverage is not None:
            found = next(iter(m["conformal"]["alphas"].values()), None)
            if found is None or found["coverage"] < self.min_coverage:
                got = "none" if found is None else report.pct(found["coverage"])
                out.append(f"coverage {got} < {report.pct(self.min_coverage)}")
        if self.max_risk is not None:
            t = m["selective"].get("threshold")
            if t is None or t["risk"] is None or t["risk"] > self.max_risk:
                got = "none" if t is None or t["risk"] is None else report.pct(t["risk"])
                out.append(f"selective risk {got} > {report.pct(self.max_risk)}")
        return out

    def judge(self, models: dict[str, dict]) -> dict:
        reasons = {name: self.failures(m) for name, m in models.items()}
        failed = [name for name, r in reasons.items() if r]
        return {
            "max_ece": self.max_ece,
            "min_coverage": self.min_coverage,
            "max_risk": self.max_risk,
            "passed": not failed,
            "failed": failed,
            "reasons": {name: r for name, r in reasons.items() if r},
        }

    def verdict(self, result: dict) -> str:
        """One line, or "" when no gate was asked for."""
        limits = [
            f"{label} {report.pct(value)}"
            for label, value in (
                ("ECE <=", self.max_ece),
                ("coverage >=", self.min_coverage),
                ("risk <=", self.max_risk),
            )
            if value is not None
        ]
        if not limits:
            return ""
        failed = "; ".join(f"{n}: {', '.join(r)}" for n, r in result["reasons"].items())
        return f"Gate: {', '.join(limits)}: " + ("PASS" if result["passed"] else f"FAIL ({failed})")


# --------------------------------------------------------------------------- writing


def write_report(result: dict, out: Path, verdict: str, predictions: dict[str, Predictions] | None = None) -> None:
    """Write report.json, report.md, report.html, the plots (and predictions-NAME.npz of audited
    ONNX models) into `out` all at once: everything goes to a temp dir first, then is moved in."""
    make_output_dir(out.parent)
    with writing(out):
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
        try:
            _write_files(tmp, result, verdict, predictions or {})
            out.mkdir(exist_ok=True)
            for f in sorted(tmp.iterdir()):
                os.replace(f, out / f.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _write_files(folder: Path, result: dict, verdict: str, predictions: dict[str, Predictions]) -> None:
    (folder / "report.json").write_text(json.dumps(result, indent=2))
    table = report.markdown_table(result["models"])
    (folder / "report.md").write_text("# Calibration audit\n\n" + table + (f"\n\n{verdict}" if verdict else "") + "\n")
    pngs = report.plots(result["models"])
    for name, png in pngs.items():
        (folder / name).write_bytes(png)
    (folder / "report.html").write_text(report.report_html(result, pngs, verdict))
    for name, p in predictions.items():
        np.savez(folder / f"predictions-{name}.npz", logits=p.scores, labels=p.labels, classes=np.asarray(p.classes))


# --------------------------------------------------------------------------- command line


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="confidence-audit",
        description="Audit the calibration, conformal coverage, selective risk and robustness to shift of one or "
        "more models (prediction files or exported .onnx models), with a pass/fail gate.",
        epilog="exit codes: 0 pass, 1 a gate failed, 2 bad input",
        examples=[
            "confidence-audit runs/demo-cigl/predictions.npz --max-ece 0.05",
            "confidence-audit cigl=runs/a/predictions.npz rigl=runs/b/predictions.npz --out audit/",
            "confidence-audit model.onnx --dataset digits --shift --min-coverage 0.88 --max-ece 0.05",
        ],
    )
    p.add_argument(
        "predictions",
        nargs="+",
        metavar="[NAME=]FILE",
        help=".npz (logits or probs, labels[, classes]), .csv (label column + one column per class) or .onnx",
    )
    g = p.add_argument_group("calibration")
    g.add_argument("--bins", type=int, default=10, help="number of bins (default 10)")
    g.add_argument(
        "--scheme",
        choices=cal.SCHEMES,
        default="uniform",
        help="ECE bins: equal width (uniform, default) or equal mass (adaptive)",
    )
    g.add_argument(
        "--temperature",
        default="fit",
        help="fit (on --fit-split, report on the rest; default), none, model (the temperature stored in "
        "each .onnx: what its probs output serves), or a value T > 0",
    )
    g.add_argument(
        "--fit-split", type=float, default=0.5, help="share of samples used to fit T and thresholds (default 0.5)"
    )
    g.add_argument(
        "--bootstrap", type=int, default=1000, help="bootstrap replicates for the ECE interval (default 1000; 0: none)"
    )
    g.add_argument("--seed", type=int, default=0, help="seed of the fit/report split and the bootstrap (default 0)")
    g = p.add_argument_group("guarantees")
    g.add_argument("--alpha", type=float, nargs="+", default=[0.1], help="conformal miscoverage levels (default 0.1)")
    g.add_argument(
        "--conformal",
        choices=conformal.METHODS,
        default="aps",
        help="conformal score when the model card has none (default aps)",
    )
    g.add_argument(
        "--target-risk",
        type=float,
        help="choose the abstain threshold certified for this selective risk on the fit split",
    )
    g = p.add_argument_group("exported models (.onnx)")
    g.add_argument("--data", help="ImageFolder (with test/ or class folders) to audit on")
    g.add_argument(
        "--dataset",
        choices=("digits", "cifar10", "imagefolder"),
        help="audit on this dataset's test split (as trained)",
    )
    g.add_argument("--data-dir", help="folder of --dataset cifar10 / imagefolder")
    g.add_argument("--shift", action="store_true", help="also audit on corrupted copies (9 corruptions x 5 severities)")
    g.add_argument("--shift-samples", type=int, default=1000, help="images corrupted per setting (default 1000)")
    g.add_argument("--ood-data", help="folder of out-of-distribution images: AUROC and FPR@95 of the confidence")
    g = p.add_argument_group("gate (exit 1 when a model fails)")
    g.add_argument("--max-ece", type=float, help="ECE of the served probabilities above this fails (e.g. 0.05)")
    g.add_argument("--min-coverage", type=float, help="conformal coverage at the first --alpha below this fails")
    g.add_argument("--max-risk", type=float, help="selective risk at the abstain threshold above this fails")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="audit", help="report folder (default ./audit)")
    g.add_argument("--json", action="store_true", help="print report.json to stdout instead of the table")
    g.add_argument("--label-column", default="label", help="CSV label column (default label)")
    g.add_argument("--csv-kind", choices=cal.KINDS, default="probs", help="what CSV class columns hold (default probs)")
    return p


def _check_options(args) -> None:
    if not 1 <= args.bins <= cal.MAX_BINS:
        raise InputError(f"--bins must be >= 1 and <= {cal.MAX_BINS}, got {args.bins}")
    if not 0 <= args.bootstrap <= MAX_BOOTSTRAP:
        raise InputError(f"--bootstrap must be >= 0 and <= {MAX_BOOTSTRAP}, got {args.bootstrap}")
    check_output_dir(args.out)
    _check_temperature(args.temperature)
    if not 0 < args.fit_split < 1:
        raise InputError(f"--fit-split must lie in (0, 1), got {args.fit_split}")
    for flag, value in (
        ("--max-ece", args.max_ece),
        ("--min-coverage", args.min_coverage),
        ("--max-risk", args.max_risk),
    ):
        if value is not None and not 0 <= value <= 1:
            raise InputError(f"{flag} must lie in [0, 1] (e.g. 0.05 for 5%), got {value}")
    for flag, values in (
        ("--alpha", args.alpha),
        ("--target-risk", [args.target_risk] if args.target_risk is not None else []),
    ):
        if any(not 0 < v < 1 for v in values):
            raise InputError(f"{flag} must lie in (0, 1), got {' '.join(map(str, values))}")
    if not 1 <= args.shift_samples <= MAX_SHIFT_SAMPLES:
        raise InputError(f"--shift-samples must lie in 1..{MAX_SHIFT_SAMPLES}, got {args.shift_samples}")
    _check_inputs(args)


def _check_temperature(temperature: str) -> None:
    if temperature in ("fit", "none", "model"):
        return
    try:
        t = float(temperature)
    except ValueError:
        t = float("nan")
    if not t > 0 or not np.isfinite(t):
        raise InputError(f"--temperature must be fit, none, model or a number > 0, got {temperature!r}")


def _check_inputs(args) -> None:
    onnx = [s for s in args.predictions if is_model(s)]
    if onnx and not (args.data or args.dataset):
        raise InputError("auditing a .onnx model needs --data DIR or --dataset NAME to run it on")
    if onnx and args.data and args.dataset:
        raise InputError("give either --data or --dataset, not both")
    if (args.shift or args.ood_data) and len(onnx) != len(args.predictions):
        raise InputError("--shift and --ood-data run the models on images: give .onnx models only")


def _load_all(args) -> list[Predictions]:
    preds = [
        onnx_predictions(s, args.data, args.dataset, args.data_dir)
        if is_model(s)
        else load_predictions(s, label_column=args.label_column, csv_kind=args.csv_kind)
        for s in args.predictions
    ]
    names = [p.name for p in preds]
    if len(set(names)) != len(names):
        raise InputError(f"two inputs share the name {max(names, key=names.count)!r}; name them NAME=path")
    return preds


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _check_options(args)
    preds = _load_all(args)
    settings = Settings(
        n_bins=args.bins,
        scheme=args.scheme,
        temperature=args.temperature,
        fit_split=args.fit_split,
        n_boot=args.bootstrap,
        seed=args.seed,
        alphas=tuple(args.alpha),
        conformal=args.conformal,
        target_risk=args.target_risk,
        shift=args.shift,
        shift_samples=args.shift_samples,
    )
    models = {p.name: audit_one(p, settings) for p in preds}
    if args.ood_data:
        for p in preds:
            models[p.name]["ood"] = ood_audit(p, args.ood_data)
    gate = Gate(args.max_ece, args.min_coverage, args.max_risk)
    judged = gate.judge(models)
    keys = (
        "bins",
        "scheme",
        "temperature",
        "fit_split",
        "bootstrap",
        "seed",
        "alpha",
        "conformal",
        "target_risk",
        "shift",
    )
    result = {
        "settings": {k: getattr(args, k) for k in keys},
        "inputs": {p.name: spec for p, spec in zip(preds, args.predictions, strict=True)},
        "models": models,
        "gate": judged,
    }
    out, verdict = Path(args.out), gate.verdict(judged)
    write_report(result, out, verdict, {p.name: p for p in preds if p.model is not None})
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
    else:
        print(report.markdown_table(models))
        if verdict:
            print(verdict)
        print(f"report: {out / 'report.html'} ({out / 'report.md'}, {out / 'report.json'}, plots)")
    return 0 if judged["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
