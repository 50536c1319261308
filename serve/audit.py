"""`confidence-audit`: calibration report, reliability diagram and a pass/fail gate.

Inputs are prediction files: `.npz` with `logits` or `probs` plus `labels`, or `.csv` with a
label column and one column per class. Writes report.json, report.md and reliability.png into
--out (all or nothing) and exits 1 when any model's ECE exceeds --max-ece. numpy + matplotlib
only: no torch.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cigl import calibration as cal
from cigl.errors import ArgumentParser, FormatError, InputError, cli_entry
from cigl.io import check_output_dir, make_output_dir


@dataclass
class Predictions:
    name: str
    scores: np.ndarray
    labels: np.ndarray
    kind: str  # "logits" or "probs"
    classes: list[str] | None = None
    model: dict | None = None  # for an audited .onnx: its sparsity and recorded calibration


# --------------------------------------------------------------------------- loading


MAX_BOOTSTRAP = 100_000


def _load_npz(path: Path) -> tuple[np.ndarray, np.ndarray, str, list[str] | None]:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise FormatError(f"{path} is not a readable .npz file ({exc})") from None
    kind = "logits" if "logits" in arrays else "probs" if "probs" in arrays else None
    if kind is None or "labels" not in arrays:
        raise FormatError(f"{path} needs arrays 'labels' and 'logits' or 'probs'; it has {sorted(arrays)}")
    classes = [str(c) for c in arrays["classes"]] if "classes" in arrays else None
    return arrays[kind], arrays["labels"], kind, classes


def _load_csv(path: Path, label_column: str, kind: str) -> tuple[np.ndarray, np.ndarray, str, list[str]]:
    try:
        with open(path, newline="") as f:
            rows = [row for row in csv.reader(f) if row]  # blank lines are not rows
    except (UnicodeDecodeError, csv.Error) as exc:
        raise FormatError(f"{path} is not a readable CSV file ({exc})") from None
    if len(rows) < 2:
        raise FormatError(f"{path} needs a header row and at least one prediction row")
    header = rows[0]
    if label_column not in header:
        raise FormatError(f"{path} has no '{label_column}' column (columns: {', '.join(header)}); use --label-column")
    li = header.index(label_column)
    classes = [c for i, c in enumerate(header) if i != li]
    for number, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise FormatError(f"{path}: line {number} has {len(row)} cells but the header has {len(header)}")
    try:
        table = np.array([[float(v) for v in row] for row in rows[1:]], dtype=np.float64)
    except ValueError as exc:
        raise FormatError(f"{path}: every cell must be a number ({exc})") from None
    return np.delete(table, li, axis=1), table[:, li], kind, classes


def load_predictions(spec: str, *, label_column: str = "label", csv_kind: str = "probs") -> Predictions:
    """`NAME=path` or `path` (named by its stem) -> validated Predictions."""
    name, _, path = spec.rpartition("=")
    path = Path(path)
    name = name or path.stem
    if not path.is_file():
        raise InputError(f"prediction file not found: {path}")
    if path.suffix == ".npz":
        scores, labels, kind, classes = _load_npz(path)
    elif path.suffix == ".csv":
        scores, labels, kind, classes = _load_csv(path, label_column, csv_kind)
    else:
        raise InputError(f"{path}: expected a .npz or .csv prediction file")
    try:
        scores, labels = cal.validate(scores, labels, kind)
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None
    return Predictions(name, scores, labels, kind, classes)


def _onnx_data(predictor, args) -> tuple[np.ndarray, np.ndarray]:
    """Normalised images and labels the model is audited on: an ImageFolder (--data) decoded as
    cigl-predict would, or a dataset's test split (--dataset, the split training used)."""
    from cigl.data import load_dataset

    classes = predictor.card.classes
    if args.data:
        root = Path(args.data)
        root = root / "test" if (root / "test").is_dir() else root
        if not root.is_dir():
            raise InputError(f"--data folder not found: {root}")
        folders = sorted(p for p in root.iterdir() if p.is_dir())
        unknown = [f.name for f in folders if f.name not in classes]
        if not folders or unknown:
            raise InputError(
                f"{root} needs one folder per class named as the model's classes "
                f"({', '.join(classes)}); unexpected: {', '.join(unknown) or 'no class folders'}"
            )
        from cigl.serve.predict import expand_inputs

        files = [(f, classes.index(folder.name)) for folder in folders for f in expand_inputs([str(folder)])]
        images = np.stack([predictor.load_image(f) for f, _ in files])
        labels = np.array([label for _, label in files], dtype=np.int64)
    else:
        split = load_dataset(args.dataset, args.data_dir, val_size=0).test
        c, h, w = predictor.card.input_size
        if split.x.shape[1:] != (h, w, c):
            raise InputError(f"{args.dataset} images are {split.x.shape[1:]}, the model takes {(h, w, c)} (H, W, C)")
        images, labels = split.x, split.y
    return predictor.normalize(images), labels


def onnx_predictions(spec: str, args) -> Predictions:
    """Run an exported model over the audit data; the report then treats it like a file."""
    from cigl.serve.predictor import Predictor

    name, _, path = spec.rpartition("=")
    predictor = Predictor(path, device="cpu")
    x, labels = _onnx_data(predictor, args)
    logits = np.concatenate([predictor.predict(x[i : i + 256])[0] for i in range(0, len(x), 256)])
    card = predictor.card
    model = {
        "path": path,
        "provider": predictor.provider,
        "target_density": card.number("target_density"),
        "actual_density": card.number("actual_density"),
        "temperature_in_model": card.temperature,
        "recorded": card.recorded(),
    }
    return Predictions(name or Path(path).stem, logits, labels, "logits", card.classes, model)


# --------------------------------------------------------------------------- auditing


def _as_logits(p: Predictions) -> np.ndarray:
    return p.scores if p.kind == "logits" else np.log(np.clip(p.scores, 1e-300, None))


def audit_one(
    p: Predictions, *, n_bins: int, scheme: str, temperature: str, fit_split: float, n_boot: int, seed: int
) -> dict:
    """Metrics of one model on its report split (all samples, or those not used to fit T)."""
    idx = np.random.default_rng(seed).permutation(p.labels.shape[0])
    if temperature == "fit":
        n_fit = round(fit_split * idx.size)
        if n_fit < 1 or n_fit >= idx.size:
            raise InputError(f"--fit-split {fit_split} leaves no samples to fit or to report on for {p.name}")
        fit, report = np.sort(idx[:n_fit]), np.sort(idx[n_fit:])
        t = cal.fit_temperature(p.scores[fit], p.labels[fit], kind=p.kind)
    else:
        report = np.arange(p.labels.shape[0])
        if temperature == "model":
            if p.model is None:
                raise InputError(f"--temperature model needs a .onnx model; {p.name} is a prediction file")
            t = p.model["temperature_in_model"]
        else:
            t = 1.0 if temperature == "none" else float(temperature)
    scores, labels = p.scores[report], p.labels[report]
    metrics = cal.summary(scores, labels, kind=p.kind, n_bins=n_bins)
    if scheme == "adaptive":
        metrics["ece"], metrics["adaptive_ece"] = metrics["adaptive_ece"], metrics["ece"]
        metrics["mce"] = cal.mce(scores, labels, kind=p.kind, n_bins=n_bins, scheme="adaptive")
    if n_boot:
        metric = "adaptive_ece" if scheme == "adaptive" else "ece"
        metrics["ece_ci"] = list(
            cal.bootstrap_ci(scores, labels, kind=p.kind, metric=metric, n_boot=n_boot, seed=seed, n_bins=n_bins)
        )
    scaled = cal.softmax(_as_logits(p)[report], t)
    after = cal.summary(scaled, labels, kind="probs", n_bins=n_bins)
    bins = cal.reliability_bins(scores, labels, kind=p.kind, n_bins=n_bins, scheme=scheme)
    metrics.update(
        {
            "temperature": t,
            "ece_after_t": after["adaptive_ece" if scheme == "adaptive" else "ece"],
            "nll_after_t": after["nll"],
            "n_fit": int(p.labels.shape[0] - report.size),
            "bins": {
                "edges": bins.edges.tolist(),
                "count": bins.count.astype(int).tolist(),
                "confidence": np.nan_to_num(bins.confidence).tolist(),
                "accuracy": np.nan_to_num(bins.accuracy).tolist(),
            },
        }
    )
    if p.model is not None:
        # drift: recorded and measured ECE differ by more than the CI's half-width (ECE is biased
        # upwards, so a percentile CI can lie entirely above a small ECE: compare widths, not ends)
        recorded, ci = p.model["recorded"]["ece"], metrics.get("ece_ci")
        p.model["ece_drift"] = bool(
            recorded is not None and ci is not None and abs(recorded - metrics["ece"]) > (ci[1] - ci[0]) / 2
        )
        metrics["model"] = p.model
    return metrics


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def markdown_table(models: dict[str, dict]) -> str:
    """One table, models side by side."""
    names = list(models)

    def ece_cell(m: dict) -> str:
        ci = m.get("ece_ci")
        return _pct(m["ece"]) + (f" [{_pct(ci[0])}, {_pct(ci[1])}]" if ci else "")

    rows = [
        ("samples", lambda m: str(m["n"])),
        ("accuracy", lambda m: _pct(m["accuracy"])),
        ("ECE (95% CI)", ece_cell),
        ("adaptive ECE", lambda m: _pct(m["adaptive_ece"])),
        ("MCE", lambda m: _pct(m["mce"])),
        ("NLL", lambda m: f"{m['nll']:.4f}"),
        ("Brier", lambda m: f"{m['brier']:.4f}"),
        ("mean confidence", lambda m: _pct(m["mean_confidence"])),
        ("temperature T", lambda m: f"{m['temperature']:.3f}"),
        ("ECE after T", lambda m: _pct(m["ece_after_t"])),
    ]
    if any("model" in m for m in models.values()):

        def recorded_ece(m: dict) -> str:
            info = m.get("model")
            if info is None or info["recorded"]["ece"] is None:
                return "-"
            return _pct(info["recorded"]["ece"]) + (" (drift beyond the CI)" if info["ece_drift"] else "")

        rows += [
            ("density (actual)", lambda m: f"{m['model']['actual_density']:.4f}" if m.get("model") else "-"),
            ("ECE recorded in training", recorded_ece),
        ]
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {label} | " + " | ".join(fn(models[n]) for n in names) + " |" for label, fn in rows]
    return "\n".join(lines)


def plot_reliability(models: dict[str, dict], path: Path) -> None:
    """Reliability curves overlaid (top) and confidence histograms (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1, label="perfect calibration")
    for name, m in models.items():
        b = m["bins"]
        count = np.asarray(b["count"])
        keep = count > 0
        conf, acc = np.asarray(b["confidence"])[keep], np.asarray(b["accuracy"])[keep]
        (line,) = top.plot(conf, acc, marker="o", label=f"{name} (ECE {_pct(m['ece'])})")
        edges = np.asarray(b["edges"])
        bottom.stairs(count / count.sum(), edges, color=line.get_color(), linewidth=1.5)
    top.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title="Reliability diagram")
    top.legend(loc="upper left", fontsize=8)
    bottom.set(xlabel="confidence", ylabel="share of samples")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report: dict, out: Path, predictions: dict[str, Predictions] | None = None) -> None:
    """Write report.json, report.md, reliability.png (and predictions-NAME.npz of audited ONNX
    models) into `out` all at once: everything goes to a temp dir first, then is moved in."""
    make_output_dir(out.parent)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        (tmp / "report.json").write_text(json.dumps(report, indent=2))
        gate = report["gate"]
        verdict = (
            ""
            if gate["max_ece"] is None
            else (
                f"\n\nGate: ECE <= {_pct(gate['max_ece'])}: "
                + ("PASS" if gate["passed"] else "FAIL (" + ", ".join(gate["failed"]) + ")")
            )
        )
        (tmp / "report.md").write_text("# Calibration audit\n\n" + markdown_table(report["models"]) + verdict + "\n")
        plot_reliability(report["models"], tmp / "reliability.png")
        for name, p in (predictions or {}).items():
            np.savez(tmp / f"predictions-{name}.npz", logits=p.scores, labels=p.labels, classes=np.asarray(p.classes))
        out.mkdir(exist_ok=True)
        for f in sorted(tmp.iterdir()):
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="confidence-audit",
        description="Audit the calibration of one or more models from prediction files and gate on ECE.",
        epilog="exit codes: 0 pass, 1 an ECE above --max-ece, 2 bad input",
        examples=[
            "confidence-audit runs/demo-cigl/predictions.npz --max-ece 0.05",
            "confidence-audit cigl=runs/a/predictions.npz rigl=runs/b/predictions.npz --out audit/",
            "confidence-audit model.onnx --dataset digits                # run an exported model, then audit",
        ],
    )
    p.add_argument(
        "predictions",
        nargs="+",
        metavar="[NAME=]FILE",
        help=".npz (logits or probs, labels[, classes]) or .csv (label column + one column per class)",
    )
    p.add_argument("--bins", type=int, default=10, help="number of bins (default 10)")
    p.add_argument(
        "--scheme",
        choices=cal.SCHEMES,
        default="uniform",
        help="ECE bins: equal width (uniform, default) or equal mass (adaptive)",
    )
    p.add_argument(
        "--temperature",
        default="fit",
        help="fit (on --fit-split, report on the rest; default), none, model (the temperature stored in "
        "each .onnx: what its probs output serves), or a value T > 0",
    )
    p.add_argument("--fit-split", type=float, default=0.5, help="share of samples used to fit T (default 0.5)")
    p.add_argument(
        "--bootstrap", type=int, default=1000, help="bootstrap replicates for the ECE CI (default 1000; 0: none)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the fit/report split and the bootstrap (default 0)")
    p.add_argument("--max-ece", type=float, help="gate: exit 1 when any model's ECE exceeds this (e.g. 0.05)")
    p.add_argument("--out", default="audit", help="report folder (default ./audit)")
    p.add_argument("--json", action="store_true", help="print report.json to stdout instead of the table")
    p.add_argument("--data", help="for .onnx models: ImageFolder (with test/ or class folders) to audit on")
    p.add_argument(
        "--dataset",
        choices=("digits", "cifar10", "imagefolder"),
        help="for .onnx models: audit on this dataset's test split (as training split it)",
    )
    p.add_argument("--data-dir", help="folder of --dataset cifar10 / imagefolder")
    p.add_argument("--label-column", default="label", help="CSV label column (default label)")
    p.add_argument("--csv-kind", choices=cal.KINDS, default="probs", help="what CSV class columns hold (default probs)")
    return p


def _check_options(args) -> None:
    if not 1 <= args.bins <= cal.MAX_BINS:
        raise InputError(f"--bins must be >= 1 and <= {cal.MAX_BINS}, got {args.bins}")
    if not 0 <= args.bootstrap <= MAX_BOOTSTRAP:
        raise InputError(f"--bootstrap must be >= 0 and <= {MAX_BOOTSTRAP}, got {args.bootstrap}")
    check_output_dir(args.out)
    if args.temperature not in ("fit", "none", "model"):
        try:
            t = float(args.temperature)
        except ValueError:
            t = float("nan")
        if not t > 0 or not np.isfinite(t):
            raise InputError(f"--temperature must be fit, none, model or a number > 0, got {args.temperature!r}")
    if not 0 < args.fit_split < 1:
        raise InputError(f"--fit-split must lie in (0, 1), got {args.fit_split}")
    if args.max_ece is not None and not 0 <= args.max_ece <= 1:
        raise InputError(f"--max-ece must lie in [0, 1] (e.g. 0.05 for 5%), got {args.max_ece}")


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _check_options(args)
    onnx_specs = [s for s in args.predictions if s.endswith(".onnx")]
    if onnx_specs and not (args.data or args.dataset):
        raise InputError("auditing a .onnx model needs --data DIR or --dataset NAME to run it on")
    if onnx_specs and args.data and args.dataset:
        raise InputError("give either --data or --dataset, not both")
    preds = [
        onnx_predictions(s, args)
        if s.endswith(".onnx")
        else load_predictions(s, label_column=args.label_column, csv_kind=args.csv_kind)
        for s in args.predictions
    ]
    names = [p.name for p in preds]
    if len(set(names)) != len(names):
        raise InputError(f"two inputs share the name {max(names, key=names.count)!r}; name them NAME=path")
    models = {
        p.name: audit_one(
            p,
            n_bins=args.bins,
            scheme=args.scheme,
            temperature=args.temperature,
            fit_split=args.fit_split,
            n_boot=args.bootstrap,
            seed=args.seed,
        )
        for p in preds
    }
    failed = [n for n, m in models.items() if args.max_ece is not None and m["ece"] > args.max_ece]
    report = {
        "settings": {k: getattr(args, k) for k in ("bins", "scheme", "temperature", "fit_split", "bootstrap", "seed")},
        "inputs": dict(zip(names, args.predictions, strict=True)),
        "models": models,
        "gate": {"max_ece": args.max_ece, "passed": not failed, "failed": failed},
    }
    out = Path(args.out)
    write_report(report, out, {p.name: p for p in preds if p.model is not None})
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        print(markdown_table(models))
        if args.max_ece is not None:
            print(f"gate ECE <= {_pct(args.max_ece)}: " + ("PASS" if not failed else "FAIL: " + ", ".join(failed)))
        print(f"report: {out / 'report.md'}, {out / 'report.json'}; diagram: {out / 'reliability.png'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
