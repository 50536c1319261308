"""`cigl-train` (= `python tools/train.py` = `python -m cigl.train`): the command line of the trainer."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

from cigl import distributed
from cigl.conformal import METHODS as CONFORMAL_METHODS
from cigl.data import DATASETS
from cigl.errors import ArgumentParser, CheckpointError, InputError, cli_entry
from cigl.sparse.allocation import INITS
from cigl.train.config import (
    ALL_METHODS,
    DEVICES,
    PRODUCTS,
    RESUMABLE_CHANGES,
    RESUMABLE_NOTE,
    TrainConfig,
    changed_setting,
    flag,
)
from cigl.train.loop import train

EXAMPLES = [
    "cigl-train --dataset digits --method cigl --density 0.1 --epochs 30 --out runs/demo-cigl",
    "cigl-train --dataset cifar10 --data-dir data/cifar10 --model wrn22_2 --method rigl --epochs 250",
    "cigl-train --resume runs/demo-cigl --epochs 40",
    "torchrun --nproc-per-node 2 tools/train.py --dataset digits --device cpu",
]


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = ArgumentParser(
        prog="cigl-train",
        argument_default=argparse.SUPPRESS,
        description="Train a (sparse) network: dense, static, SET, RigL or CigL. Writes a run directory "
        "with config.json, metrics.jsonl, last.pt, model.pt and summary.json.",
        examples=EXAMPLES,
    )
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS, help=f"default {d.dataset}")
    g.add_argument("--data-dir", help="dataset folder (cifar10: ImageFolder with train/ test/ or cifar-10-batches-py)")
    g.add_argument(
        "--image-size", type=int, help="resize images to N x N (needed when sizes differ; digits and CIFAR batches too)"
    )
    g.add_argument(
        "--val-size", type=float, help=f"share of train held out for validation (default {d.val_size}; 0 = paper)"
    )
    g.add_argument("--train-per-class", type=int, help="train on a class-balanced subset of N images per class")
    g = p.add_argument_group("model and method")
    g.add_argument("--model", help=f"cigl or timm model name (default {d.model})")
    g.add_argument("--method", choices=ALL_METHODS, help=f"default {d.method} (= rigl + --dpnum 100 + averaging)")
    g.add_argument("--density", type=float, help="DENSITY: share of weights kept (default 0.1; dense: 1)")
    g.add_argument("--sparse-init", choices=INITS, help=f"per-layer density allocation (default {d.sparse_init})")
    g.add_argument(
        "--drop-fraction", type=float, help=f"initial share of weights exchanged per update (default {d.drop_fraction})"
    )
    g.add_argument(
        "--update-every",
        type=int,
        help="steps between mask updates (default: 100, shortened so a short run still makes ~40 updates)",
    )
    g.add_argument("--update-end", type=float, help=f"stop updating after this share of steps (default {d.update_end})")
    g.add_argument("--dpnum", type=int, help="DPNUM: random mask drops each weight with p=1/DPNUM (cigl default 100)")
    g.add_argument(
        "--avg-start", type=int, help="BS: first epoch (1-based) of weight-and-mask averaging (cigl: 80%% of epochs)"
    )
    g.add_argument(
        "--product",
        choices=PRODUCTS,
        help="which model model.pt holds: the averaged one (default when averaging is on) or the final weights",
    )
    g.add_argument(
        "--mc-samples",
        type=int,
        help="also report MC dropout of the final weights: K passes with the random mask (needs --dpnum)",
    )
    g = p.add_argument_group("confidence guarantees (calibrated on the validation split)")
    g.add_argument(
        "--conformal",
        choices=CONFORMAL_METHODS,
        help=f"conformal score for prediction sets at alpha 0.1/0.05/0.01 (default {d.conformal})",
    )
    g.add_argument(
        "--target-risk",
        type=float,
        help="R: record the lowest confidence threshold certified (90%% confidence) to keep the error "
        "among accepted predictions <= R; predict/serve abstain below it",
    )
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, help=f"default {d.epochs}")
    g.add_argument("--batch-size", type=int, help=f"default {d.batch_size}")
    g.add_argument("--lr", type=float, help=f"LR: peak learning rate (default {d.lr})")
    g.add_argument("--decay", type=float, help=f"DECAY: lr factor at each decay (default {d.decay})")
    g.add_argument("--decay-every", type=float, help="epochs between decays (default 40%% of --epochs)")
    g.add_argument("--warmup-epochs", type=float, help=f"linear warm-up length (default {d.warmup_epochs})")
    g.add_argument("--wd", type=float, help=f"weight decay (default {d.wd})")
    g.add_argument("--momentum", type=float, help=f"SGD momentum (default {d.momentum})")
    g.add_argument("--seed", type=int, help=f"SEED (default {d.seed})")
    g = p.add_argument_group("run")
    g.add_argument("--device", choices=DEVICES, help="auto = CUDA when present (default auto)")
    g.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    g.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model (first steps slower; falls back to eager with a note if compiling fails)",
    )
    g.add_argument(
        "--no-cuda-graph",
        dest="cuda_graph",
        action="store_false",
        help="on CUDA, run every step eagerly instead of replaying it as a CUDA graph (the default "
        "with one process and without --compile)",
    )
    g.add_argument("--out", help="run directory (default runs/<dataset>-<model>-<method>-s<seed>)")
    g.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help=f"continue the run in RUN_DIR from its last.pt ({RESUMABLE_NOTE})",
    )
    g.add_argument("--save-every-steps", type=int, help="also checkpoint every N steps (default: each epoch only)")
    g.add_argument("--eval-every", type=int, help="evaluate val/test every N epochs (default 1)")
    g.add_argument("--quiet", action="store_true", help="print nothing but errors")
    return p


def config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, bool]:
    """TrainConfig from explicitly given options; with --resume, the rest comes from the run."""
    given = {k: v for k, v in vars(args).items() if k not in ("resume", "quiet")}
    if not getattr(args, "resume", None):
        if "conformal" in given and given.get("val_size") == 0:  # the default score is skipped silently
            raise InputError("--conformal is calibrated on the validation split: drop --val-size 0 or drop --conformal")
        return TrainConfig(**given), False
    run = Path(args.resume)
    if "out" in given and Path(given["out"]) != run:
        raise InputError("--out and --resume name different runs; give only --resume RUN_DIR")
    saved = saved_config(run)
    key = changed_setting(saved, given, RESUMABLE_CHANGES)
    if key is not None:
        raise CheckpointError(
            f"--resume {run}: the run was started with {flag(key)} {saved[key]}, "
            f"not {given[key]}; {RESUMABLE_NOTE} on resume"
        )
    data_dir = saved.get("data_dir")
    if "data_dir" not in given and isinstance(data_dir, str) and not Path(data_dir).exists():
        raise InputError(
            f"--resume {run}: its data folder {data_dir} is not there; pass --data-dir with where the data is now"
        )
    avg_start = saved.get("avg_start")
    if isinstance(given.get("epochs"), int) and isinstance(avg_start, int) and given["epochs"] < avg_start:
        raise InputError(
            f"--resume {run}: its weight averaging starts at epoch {avg_start}, so --epochs must be {avg_start} or more"
        )
    names = {f.name for f in fields(TrainConfig)}
    merged = {k: v for k, v in saved.items() if k in names} | given | {"out": str(run)}
    return TrainConfig(**merged), True


def saved_config(run: Path) -> dict:
    """The settings in RUN/config.json; CheckpointError when the run folder is missing or damaged."""
    if not (run / "config.json").is_file() or not (run / "last.pt").is_file():
        hint = "; every process must see the run directory (on several machines: a shared filesystem)"
        raise CheckpointError(
            f"--resume {run}: no run there (config.json and last.pt missing)"
            + (hint if distributed.from_env().world > 1 else "")
        )
    try:
        saved = json.loads((run / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"--resume {run}: config.json is not valid JSON ({exc}); the run folder is damaged"
        ) from None
    if not isinstance(saved, dict):
        raise CheckpointError(f"--resume {run}: config.json does not hold a run's settings; the run folder is damaged")
    return saved


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg, resume = config_from_args(args)
    train(cfg, resume=resume, quiet=getattr(args, "quiet", False))
    return 0
