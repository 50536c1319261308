"""confidence-audit's outputs from its report dict: the markdown table, the plots and one
self-contained report.html (plots embedded as data URIs; no scripts, no network). numpy +
matplotlib only."""

from __future__ import annotations

import base64
import html
import io

import numpy as np


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _ece_cell(m: dict) -> str:
    s = m["served"]
    if "ece_ci" not in s:
        return pct(s["ece"])
    lo, hi = s["ece_ci"]
    return f"{pct(s['ece'])} (bias-corrected {pct(s['ece_debiased'])} [{pct(lo)}, {pct(hi)}])"


def _coverage_cell(m: dict) -> str:
    alphas = m["conformal"]["alphas"]
    return ", ".join(f"{pct(v['coverage'])} @ {a} (size {v['mean_size']:.2f})" for a, v in alphas.items()) or "-"


def _abstain_cell(m: dict) -> str:
    t = m["selective"].get("threshold")
    if t is None:
        return "-"
    if t["value"] is None:
        return "no threshold certified"
    return f">= {t['value']:.4f}: risk {pct(t['risk'])} at coverage {pct(t['coverage'])}"


def _recorded_ece(m: dict) -> str:
    info = m.get("model")
    if info is None or info["recorded"]["served_ece"] is None:
        return "-"
    return pct(info["recorded"]["served_ece"]) + (" (drift beyond the CI)" if info["ece_drift"] else "")


SUMMARY_ROWS = [
    ("samples: raw rows (the report split) / served rows", lambda m: f"{m['n']} / {m['served']['n']}"),
    ("accuracy (served rows)", lambda m: pct(m["served"]["accuracy"])),
    ("probabilities served", lambda m: m["served"]["what"]),
    ("ECE of served probabilities (bias-corrected [95% CI])", _ece_cell),
    ("ECE raw (T = 1)", lambda m: pct(m["ece"])),
    ("adaptive ECE raw", lambda m: pct(m["adaptive_ece"])),
    ("MCE raw", lambda m: pct(m["mce"])),
    ("NLL raw", lambda m: f"{m['nll']:.4f}"),
    ("Brier raw", lambda m: f"{m['brier']:.4f}"),
    ("mean confidence raw", lambda m: pct(m["mean_confidence"])),
    ("temperature T (--temperature)", lambda m: f"{m['temperature']:.3f}"),
    ("ECE after T", lambda m: pct(m["ece_after_t"])),
    ("conformal coverage @ alpha (mean set size)", _coverage_cell),
    ("AURC / excess AURC", lambda m: f"{m['selective']['aurc']:.4f} / {m['selective']['excess_aurc']:.4f}"),
    ("abstain threshold: realised risk, coverage", _abstain_cell),
]
MODEL_ROWS = [
    ("density (actual)", lambda m: f"{m['model']['actual_density']:.4f}" if m.get("model") else "-"),
    ("served ECE recorded in training (its test split)", _recorded_ece),
]


def _by_severity(m: dict, key: str) -> str:
    means = m["shift"]["mean_by_severity"]
    return " / ".join(pct(means[s][key]) for s in sorted(means, key=int))


SHIFT_ROWS = [
    ("shift: accuracy at severity 1/2/3/4/5 (mean of 9 corruptions)", lambda m: _by_severity(m, "accuracy")),
    ("shift: served ECE at severity 1/2/3/4/5", lambda m: _by_severity(m, "ece")),
]
OOD_ROWS = [("OOD: AUROC / FPR at 95% TPR", lambda m: f"{m['ood']['auroc']:.4f} / {pct(m['ood']['fpr_at_95_tpr'])}")]


def _rows(models: dict[str, dict]) -> list[tuple[str, list[str]]]:
    rows = SUMMARY_ROWS + (MODEL_ROWS if any("model" in m for m in models.values()) else [])
    rows += SHIFT_ROWS if all("shift" in m for m in models.values()) else []
    rows += OOD_ROWS if all("ood" in m for m in models.values()) else []
    return [(label, [fn(m) for m in models.values()]) for label, fn in rows]


def markdown_table(models: dict[str, dict]) -> str:
    """The summary table, models side by side."""
    lines = ["| metric | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in _rows(models)]
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots


def _figure(*args, **kwargs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(*args, **kwargs)


def _png(plt, fig) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def reliability_png(models: dict[str, dict]) -> bytes:
    """Reliability diagram of the served probabilities: marker area ~ samples in the bin, a
    shaded 95% bootstrap band of each bin's accuracy, and the share of samples per bin below."""
    plt, fig, (top, bottom) = _figure(2, 1, figsize=(6, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1, label="perfect calibration")
    for name, m in models.items():
        b = m["served"]["bins"]
        count = np.asarray(b["count"])
        keep = count > 0
        conf, acc = np.asarray(b["confidence"])[keep], np.asarray(b["accuracy"])[keep]
        (line,) = top.plot(conf, acc, label=f"{name} ({m['served']['what']}; ECE {pct(m['served']['ece'])})")
        top.scatter(conf, acc, s=20 + 400 * count[keep] / count.sum(), color=line.get_color(), alpha=0.8)
        if "accuracy_lo" in b:
            lo, hi = np.asarray(b["accuracy_lo"])[keep], np.asarray(b["accuracy_hi"])[keep]
            top.fill_between(conf, lo, hi, color=line.get_color(), alpha=0.15)
        bottom.stairs(count / count.sum(), np.asarray(b["edges"]), color=line.get_color(), linewidth=1.5)
    top.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title="Reliability of the served probabilities")
    top.legend(loc="upper left", fontsize=7)
    bottom.set(xlabel="confidence (marker area: samples in the bin)", ylabel="share of samples")
    return _png(plt, fig)


def risk_coverage_png(models: dict[str, dict]) -> bytes:
    plt, fig, ax = _figure(figsize=(6, 4))
    for name, m in models.items():
        c = m["selective"]["curve"]
        ax.plot(c["coverage"], c["risk"], label=f"{name} (AURC {m['selective']['aurc']:.4f})")
    ax.set(xlabel="coverage (share answered)", ylabel="selective risk (error among answered)", xlim=(0, 1))
    ax.set_title("Risk-coverage: answering only the most confident")
    ax.legend(fontsize=8)
    return _png(plt, fig)


def shift_png(models: dict[str, dict]) -> bytes:
    """ECE (mean over corruptions) and accuracy against severity, one line per model."""
    plt, fig, (left, right) = _figure(1, 2, figsize=(10, 4))
    for name, m in models.items():
        shift = m["shift"]
        severities = ["0", *sorted(next(iter(shift["corruptions"].values())))]
        ece = [m["served"]["ece"]] + [shift["mean_by_severity"][s]["ece"] for s in severities[1:]]
        acc = [m["served"]["accuracy"]] + [shift["mean_by_severity"][s]["accuracy"] for s in severities[1:]]
        left.plot([int(s) for s in severities], ece, marker="o", label=name)
        right.plot([int(s) for s in severities], acc, marker="o", label=name)
    left.set(
        xlabel="severity (0 = clean)", ylabel="ECE (served), mean over corruptions", title="Calibration under shift"
    )
    right.set(xlabel="severity (0 = clean)", ylabel="accuracy, mean over corruptions", title="Accuracy under shift")
    left.legend(fontsize=8)
    return _png(plt, fig)


def plots(models: dict[str, dict]) -> dict[str, bytes]:
    """file name -> PNG bytes of every plot the report has data for."""
    out = {"reliability.png": reliability_png(models), "risk_coverage.png": risk_coverage_png(models)}
    if all("shift" in m for m in models.values()):
        out["shift.png"] = shift_png(models)
    return out


# --------------------------------------------------------------------------- report.html


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _model_sections(name: str, m: dict) -> str:
    parts = [f"<h2>{html.escape(name)}</h2>"]
    rows = [[r["class"], str(r["n"]), pct(r["accuracy"]), pct(r["ece"])] for r in m["per_class"]]
    parts.append("<h3>Per class (served probabilities)</h3>" + _table(["class", "samples", "accuracy", "ECE"], rows))
    if m.get("confusion") is not None:
        classes = [r["class"] for r in m["per_class"]]
        rows = [[c, *map(str, counts)] for c, counts in zip(classes, m["confusion"], strict=True)]
        parts.append("<h3>Confusion matrix (rows: true, columns: predicted)</h3>" + _table(["", *classes], rows))
    conf = m["conformal"]
    if conf["alphas"]:
        rows = [
            [
                a,
                f"{v['threshold']:.4f}",
                pct(v["coverage"]),
                f"{v['mean_size']:.2f}",
                pct(min(x for x in v["class_coverage"] if x is not None)),
            ]
            for a, v in conf["alphas"].items()
        ]
        parts.append(
            f"<h3>Conformal prediction sets ({conf['method']}, thresholds from the {html.escape(conf['source'])}, "
            f"{conf['n']} samples)</h3>"
            + _table(["alpha", "threshold", "coverage", "mean set size", "lowest class coverage"], rows)
        )
    if "shift" in m:
        rows = [
            [c, s, pct(v["accuracy"]), pct(v["ece"]), f"{v['nll']:.3f}", pct(v.get("coverage"))]
            for c, by_severity in m["shift"]["corruptions"].items()
            for s, v in by_severity.items()
        ]
        parts.append(
            "<h3>Distribution shift</h3>"
            + _table(["corruption", "severity", "accuracy", "ECE", "NLL", "coverage"], rows)
        )
    if "ood" in m:
        o = m["ood"]
        parts.append(
            f"<h3>Out of distribution</h3><p>AUROC {o['auroc']:.4f}, FPR at 95% TPR {pct(o['fpr_at_95_tpr'])} "
            f"({o['n_ood']} OOD images)</p>"
        )
    return "".join(parts)


CSS = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
    "table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
    "td:first-child,th:first-child{text-align:left}img{max-width:100%;margin:0.5em 0}"
    ".pass{color:#070}.fail{color:#b00}"
)


def report_html(report: dict, pngs: dict[str, bytes], verdict: str) -> str:
    """One self-contained page: the gate, the summary table, the plots and per-model details."""
    models = report["models"]
    summary = _table(["metric", *models], [[label, *cells] for label, cells in _rows(models)])
    status = (
        "" if not verdict else f'<p class="{"pass" if report["gate"]["passed"] else "fail"}">{html.escape(verdict)}</p>'
    )
    figures = "".join(_img(png, name) for name, png in pngs.items())
    notes = (
        "<p>ECE is estimated with 10 equal-width bins by default; the plug-in estimate is biased upwards, so the "
        "table also gives the bootstrap bias-corrected ECE with its basic bootstrap 95% interval. The reliability "
        "diagram shows the probabilities the model serves (its own temperature for an exported model, the "
        "probabilities as given for a prediction file).</p>"
    )
    sections = "".join(_model_sections(name, m) for name, m in models.items())
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Calibration audit</title><style>{CSS}</style>"
        f"</head><body><h1>Calibration audit</h1>{status}{summary}{notes}{figures}{sections}</body></html>\n"
    )
