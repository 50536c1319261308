#!/usr/bin/env python
"""The CPU reproduction study: Dense vs RigL vs CigL on a CIFAR-10 subset, several seeds.

    python tools/study.py run --data-dir data/cifar10      # train the grid, 2 runs at a time
    python tools/study.py report                           # table + reliability diagram

`run` skips finished runs and resumes interrupted ones, so it can be restarted at any time.
`make repro-cpu` does both.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

from cigl.card import metric
from cigl.data import load_dataset
from cigl.errors import ArgumentParser, InputError, cli_entry
from cigl.models import check_model_name
from cigl.runfiles import write_json, write_text
from cigl.train.cli import build_parser as train_parser
from cigl.train.cli import config_from_args
from cigl.train.config import TrainConfig, changed_setting, flag, resolve

RUNS = Path("runs/study")
RESULTS = Path("docs/results")
NAMES = {"dense": "Dense", "static": "Static", "set": "SET", "rigl": "RigL", "cigl": "CigL"}
# the paper's WRN-22-2 CIFAR-10 results (submission Table 1/3): (method, density) -> (accuracy %, ECE)
PAPER_WRN22_2 = {
    ("RigL", 0.2): (93.12, 0.0319),
    ("RigL", 0.1): (92.26, 0.0272),
    ("RigL", 0.05): (91.02, 0.0235),
    ("CigL", 0.2): (93.95, 0.0178),
    ("CigL", 0.1): (93.05, 0.0159),
    ("CigL", 0.05): (91.34, 0.0131),
}


def paper_table(groups: dict[str, list[dict]]) -> str:
    """Our WRN-22-2 rows beside the paper's (mean over our seeds)."""
    lines = ["| run | seeds | acc. % (ours) | acc. % (paper) | ECE (ours) | ECE (paper) |", "|---" * 6 + "|"]
    for label, rows in sorted(groups.items()):
        key = (label.split(",")[0], rows[0]["target_density"])
        if key in PAPER_WRN22_2:
            acc, ece = PAPER_WRN22_2[key]
            ours_acc = 100 * statistics.mean(metric(r["test"], "accuracy") for r in rows)
            ours_ece = statistics.mean(r["test"]["ece"] for r in rows)
            lines.append(f"| {label} | {len(rows)} | {ours_acc:.2f} | {acc:.2f} | {ours_ece:.4f} | {ece:.4f} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def grid(args) -> list[tuple[str, list[str]]]:
    """(run name, cigl-train options) for every run of the study."""
    common = [
        "--dataset",
        "cifar10",
        "--data-dir",
        args.data_dir,
        "--model",
        args.model,
        "--epochs",
        str(args.epochs),
        "--batch-size",
        "128",
        "--lr",
        "0.1",
        "--eval-every",
        "10",
        "--quiet",
    ]
    if args.image_size:
        common += ["--image-size", str(args.image_size)]
    if args.paper:  # the reference's recipe (METHOD.md section 4): all images, wd 1e-4, lr x0.6 every 30 epochs
        common += ["--wd", "1e-4", "--decay", "0.6", "--decay-every", "30", "--warmup-epochs", "5", "--val-size", "0"]
    else:
        common += ["--train-per-class", str(args.per_class), "--wd", "5e-4", "--warmup-epochs", "2", "--threads", "1"]
    runs = []
    for seed in args.seeds:
        runs.append((f"dense-s{seed}", ["--method", "dense", "--seed", str(seed)]))
        for d in args.densities:
            for method in ("rigl", "cigl"):
                opts = ["--method", method, "--density", str(d), "--seed", str(seed)]
                if method == "cigl" and args.paper:  # the reference's BS=200 of 250 epochs
                    opts += ["--avg-start", str(max(1, args.epochs * 4 // 5))]
                if method == "cigl":  # its final weights are RigL+W-DP; also evaluated as RigL+MC-DP
                    opts += ["--mc-samples", str(args.mc_samples)]
                runs.append((f"{method}-d{d}-s{seed}", opts))
    return [(name, common + opts) for name, opts in runs]


STOPPED = "stopped at the --minutes deadline"
NOT_STARTED = "not started (the --minutes deadline had passed)"


def run_one(name: str, options: list[str], root: Path, deadline: float = math.inf) -> str:
    """Train (or resume) one run of the grid; its status line. At `deadline` (time.monotonic())
    the run gets SIGTERM, which makes cigl-train save last.pt at the step it is on and exit: the
    next `run` resumes it from there."""
    out = root / name
    if (out / "summary.json").is_file():
        return f"{name}: done before"
    if time.monotonic() >= deadline:
        return f"{name}: {NOT_STARTED}"
    cmd = [sys.executable, "-m", "cigl.train", *options, "--out", str(out)]
    if (out / "last.pt").is_file():  # its settings are the run's own; the data may have moved since
        data_dir = options[options.index("--data-dir") + 1]
        cmd = [sys.executable, "-m", "cigl.train", "--resume", str(out), "--data-dir", data_dir, "--quiet"]
    with subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as proc:
        try:
            _, err = proc.communicate(timeout=None if deadline == math.inf else max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate()
            if proc.returncode in (-signal.SIGTERM, 128 + signal.SIGTERM):  # else it had just ended, or failed
                return f"{name}: {STOPPED}"
    last = (err.strip().splitlines() or ["(no message)"])[-1]  # cigl-train's one-line error
    return f"{name}: " + ("ok" if proc.returncode == 0 else f"FAILED {last[:500]}")


MAX_JOBS = 64


def check_grid(args, jobs: list[tuple[str, list[str]]]) -> None:
    """Every run's settings and the data checked as cigl-train would, before any run starts:
    InputError names the first problem (one line, exit code 2) instead of every run failing alike."""
    if not 1 <= args.jobs <= MAX_JOBS:
        raise InputError(f"--jobs must lie in 1..{MAX_JOBS}, got {args.jobs}")
    if args.minutes is not None and not 0 < args.minutes < math.inf:
        raise InputError(f"--minutes must be a positive number of minutes, got {args.minutes}")
    if not Path(args.data_dir).is_dir():
        raise InputError(f"data folder not found: {args.data_dir}; `make data` extracts CIFAR-10 to data/cifar10")
    check_model_name(args.model)
    configs = {name: resolve(config_from_args(train_parser().parse_args(options))[0]) for name, options in jobs}
    for name, cfg in configs.items():
        check_earlier_run(Path(args.runs) / name, cfg)
    cfg = next(iter(configs.values()))  # the runs share their data settings: they load (and cache) once
    load_dataset(
        cfg.dataset, cfg.data_dir, val_size=cfg.val_size, image_size=cfg.image_size, train_per_class=cfg.train_per_class
    )


def check_earlier_run(out: Path, cfg: TrainConfig) -> None:
    """A run directory left by an earlier `run` must hold these settings: `run` skips a finished
    run and resumes an interrupted one, which would otherwise report another study's run."""
    try:
        saved = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return  # no run there yet (or a damaged one, which cigl-train names)
    if not isinstance(saved, dict):
        return
    wanted = {k: v for k, v in asdict(cfg).items() if v is not None}  # None: filled in by training
    key = changed_setting(saved, wanted, {"out", "data_dir"})  # the data may have moved (resume checks it)
    if key is not None:
        raise InputError(
            f"{out} was trained with {flag(key)} {saved[key]}, not {wanted[key]}: pass another --runs for "
            "these settings or delete that run"
        )


def cmd_run(args) -> int:
    root = Path(args.runs)
    jobs = grid(args)
    check_grid(args, jobs)
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / "study.json", {"runs": dict(jobs)})
    deadline = time.monotonic() + 60 * args.minutes if args.minutes else math.inf
    failed = unfinished = 0
    with ThreadPoolExecutor(args.jobs) as pool:
        for line in pool.map(lambda job: run_one(*job, root, deadline), jobs):
            print(line, flush=True)
            failed += ": FAILED" in line
            unfinished += line.endswith((STOPPED, NOT_STARTED))
    if failed:
        print(f"{failed} of {len(jobs)} runs failed; fix the cause and run again (finished runs are kept)")
    if unfinished:
        print(f"{unfinished} of {len(jobs)} runs unfinished at the deadline; run the same command again to continue")
    return 1 if failed or unfinished else 0


def _mean_sd(values: list[float], pct: bool = True) -> str:
    scale = 100 if pct else 1
    mean = statistics.mean(values) * scale
    sd = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.2f} ± {sd:.2f}" if pct else f"{mean:.3f} ± {sd:.3f}"


def rows_of(s: dict) -> list[tuple[str, dict]]:
    """(table label, metrics) of every model a run's summary.json reports: the product, and for
    CigL its final training weights (= RigL+W-DP: averaging never feeds back into training) and
    their MC-dropout evaluation (RigL+MC-DP) when the run made one."""
    density = "" if s["method"] == "dense" else f", density {s['target_density']:g}"
    common = {"target_density": s["target_density"], "seed": s["seed"], "mask_updates": s.get("mask_updates", 0)}
    product = "averaged" if s.get("product") == "averaged" else "final_weights"
    rows = [(NAMES[s["method"]] + density, s[product] | common | {"actual_density": s["actual_density"]})]
    same_masks = common | {"actual_density": s["target_density"]}
    if s["method"] == "cigl":
        rows.append(("RigL+W-DP (CigL's final weights)" + density, s["final_weights"] | same_masks))
        if "mc_dropout" in s:
            rows.append(("RigL+MC-DP (CigL's final weights, MC dropout)" + density, s["mc_dropout"] | same_masks))
    return rows


def cmd_report(args) -> int:
    root, out = Path(args.runs), Path(args.out)
    groups: dict[str, list[dict]] = {}
    for summary_path in sorted(root.glob("*/summary.json")):
        for label, row in rows_of(json.loads(summary_path.read_text())):
            groups.setdefault(label, []).append(row)
    if not groups:
        print(f"no finished runs under {root}", file=sys.stderr)
        return 2
    header = (
        "| run | seeds | acc. % | ECE % | ECE after T % | T | NLL | Brier | mean conf. % | density target / actual "
        "| mask updates |\n" + "|---" * 11 + "|"
    )
    lines = [header]
    for label, rows in sorted(groups.items()):
        t, tc = [r["test"] for r in rows], [r["test_calibrated"] for r in rows]
        lines.append(
            f"| {label} | {len(rows)} | {_mean_sd([metric(m, 'accuracy') for m in t])} | "
            f"{_mean_sd([m['ece'] for m in t])} | "
            f"{_mean_sd([m['ece'] for m in tc])} | {_mean_sd([r['temperature'] for r in rows], False)} | "
            f"{_mean_sd([m['nll'] for m in t], False)} | {_mean_sd([m['brier'] for m in t], False)} | "
            f"{_mean_sd([metric(m, 'mean_confidence') for m in t])} | {rows[0]['target_density']:g} / "
            f"{statistics.mean(r['actual_density'] for r in rows):.4f} | "
            f"{statistics.mean(r['mask_updates'] for r in rows):.0f} |"
        )
    table = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "cpu_study_table.md", table + "\n")
    print(table)
    summaries = [json.loads(p.read_text()) for p in root.glob("*/summary.json")]
    if all(s["model"] == "wrn22_2" and s["dataset"] == "cifar10" for s in summaries):
        beside = paper_table(groups)
        if beside:
            write_text(out / "paper_comparison.md", beside + "\n")
            print("\nbeside the paper (WRN-22-2, CIFAR-10, submission Table 1/3):\n" + beside)
    preds = [f"{p.parent.name}={p}" for p in sorted(root.glob("*-s0/predictions.npz"))]
    if preds:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "cigl.serve.audit",
                *preds,
                "--out",
                str(out / "cpu_study_audit"),
                "--bootstrap",
                "200",
            ],
            check=True,
            capture_output=True,
        )
        print(f"reliability diagram and audit: {out / 'cpu_study_audit'}")
    return 0


# make repro-gpu's grid, the paper's WRN-22-2 CIFAR-10 protocol: Dense, RigL and CigL at sparsity
# 80/90/95%, 250 epochs, the reference's recipe, all seven runs of a seed packed onto one GPU
REPRO_GPU = {
    "paper": True,
    "model": "wrn22_2",
    "epochs": 250,
    "densities": [0.2, 0.1, 0.05],
    "jobs": 7,
    "runs": "runs/paper-wrn22_2",
}
REPRO_GPU_REPORT = {"runs": REPRO_GPU["runs"], "out": "docs/results/paper-wrn22_2"}  # report --repro-gpu


class _Preset(argparse.Action):
    """A flag that sets several options at once where it stands: options after it override them."""

    def __init__(self, option_strings, dest, preset: dict, **kw):
        super().__init__(option_strings, dest, nargs=0, **kw)
        self.preset = preset

    def __call__(self, _parser, namespace, _values, _option=None):
        for name, value in self.preset.items():
            setattr(namespace, name, value)


def _add_preset(parser: argparse.ArgumentParser, preset: dict, what: str) -> None:
    """--repro-gpu on `parser`: the options of `preset`, spelled out in its help."""
    settings = " ".join(
        f"--{k}" if v is True else f"--{k} {' '.join(map(str, v if isinstance(v, list) else [v]))}"
        for k, v in preset.items()
    )
    parser.add_argument(
        "--repro-gpu",
        action=_Preset,
        preset=preset,
        default=argparse.SUPPRESS,
        help=f"{what}: {settings} (options after it override these)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train the grid", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    r.add_argument("--data-dir", default="data/cifar10", help="CIFAR-10 as ImageFolder (train/, test/)")
    r.add_argument("--runs", default=str(RUNS), help="where the run directories go")
    r.add_argument("--model", default="resnet20", help="cigl or timm model name")
    r.add_argument("--per-class", type=int, default=400, help="training images per class (CPU protocol)")
    r.add_argument("--epochs", type=int, default=30, help="epochs per run")
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="one run of each method per seed")
    r.add_argument("--densities", type=float, nargs="+", default=[0.1], help="RigL and CigL at each")
    r.add_argument("--image-size", type=int, help="resize every image to N x N (needed when sizes differ)")
    r.add_argument("--mc-samples", type=int, default=8, help="MC-dropout passes for the RigL+MC-DP row")
    r.add_argument("--jobs", type=int, default=2, help="runs at a time (CPU protocol: one thread each)")
    r.add_argument("--paper", action="store_true", help="the paper's recipe on the full training set (needs a GPU)")
    _add_preset(r, REPRO_GPU, "make repro-gpu's grid")
    r.add_argument(
        "--minutes",
        type=float,
        help="stop after M minutes (a job's time limit, a GPU lease): running runs save their step and the "
        "next `run` continues them (default: no limit)",
    )
    r.set_defaults(fn=cmd_run)
    rep = sub.add_parser(
        "report", help="aggregate finished runs", formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    rep.add_argument("--runs", default=str(RUNS), help="the run directories to aggregate")
    rep.add_argument("--out", default=str(RESULTS), help="where the table and the audit go")
    _add_preset(rep, REPRO_GPU_REPORT, "make repro-gpu's report")
    rep.set_defaults(fn=cmd_report)
    return p


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    raise SystemExit(main())
