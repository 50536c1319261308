"""Every setting of a training run (TrainConfig), the method presets, and `resolve`: the one
place settings are validated and the ones that depend on others filled in."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

from cigl.conformal import METHODS as CONFORMAL_METHODS
from cigl.data import DATASETS
from cigl.errors import InputError
from cigl.images import MAX_SIDE
from cigl.sparse import PRESETS
from cigl.sparse.allocation import INITS

ALL_METHODS = ("dense", *PRESETS)  # dense, static, set, rigl, cigl
AVERAGING_METHODS = ("cigl",)  # methods that average weights and masks by default (from 80% of the epochs)
PRODUCTS = ("averaged", "final")
DEVICES = ("auto", "cpu", "cuda")
# what may change on resume: the length, where the data is now (checked to be the same data) and
# how the run executes (not what it computes; a changed device or thread count is noted)
RESUMABLE_CHANGES = {
    "epochs",
    "data_dir",
    "device",
    "threads",
    "compile",
    "cuda_graph",
    "save_every_steps",
    "eval_every",
}
RESUMABLE_NOTE = (
    "only --epochs, --data-dir (data that moved) and how the run executes (--device, --threads, --compile, "
    "--no-cuda-graph, --save-every-steps, --eval-every) may change"
)


@dataclass
class TrainConfig:
    """Every setting of a run; `resolve` fills the ones that depend on others (None = default).

    Example:
        >>> from cigl.train import TrainConfig, resolve
        >>> cfg = resolve(TrainConfig(method="cigl", epochs=10))
        >>> cfg.density, cfg.dpnum, cfg.avg_start, cfg.product
        (0.1, 100, 9, 'averaged')
    """

    dataset: str = "digits"
    data_dir: str | None = None
    image_size: int | None = None
    val_size: float = 0.1
    train_per_class: int | None = None
    model: str = "resnet20"
    method: str = "cigl"
    density: float | None = None  # dense: 1.0, sparse methods: 0.1
    sparse_init: str = "erk"
    drop_fraction: float = 0.3  # initial share of a layer exchanged per mask update (cosine-decayed)
    update_every: int | None = None  # steps between mask updates; default: 100, fewer on short runs
    update_end: float = 0.75  # share of all training steps after which masks stop changing
    dpnum: int | None = None  # cigl: 100
    avg_start: int | None = None  # first averaged epoch (1-based); cigl: 80% of the epochs
    product: str | None = None  # "averaged" (default with averaging) or "final" (the final weights)
    mc_samples: int = 0  # also evaluate MC dropout: K stochastic passes with the random mask
    conformal: str = "aps"  # conformal score calibrated on the validation split: lac, aps or raps
    target_risk: float | None = None  # abstain threshold certified to keep the selective risk <= this
    epochs: int = 20
    batch_size: int = 128
    lr: float = 0.1
    decay: float = 0.1
    decay_every: float | None = None  # epochs between decays; default 40% of the epochs
    warmup_epochs: float = 1.0
    wd: float = 5e-4
    momentum: float = 0.9
    seed: int = 0
    device: str = "auto"
    threads: int = 0  # 0 = torch's default
    compile: bool = False  # torch.compile the model (falls back to eager with a note if it fails)
    cuda_graph: bool = True  # CUDA, one process, no --compile: replay the step as a CUDA graph
    out: str | None = None  # default runs/<dataset>-<model>-<method>-s<seed>
    save_every_steps: int = 0
    eval_every: int = 1


# name -> (lowest, highest, "int" | "float") of the numeric settings; None values mean "default".
# --density, --dpnum, --lr and --decay have their own checks (open intervals).
NUMBER_RANGES = {
    "epochs": (1, 100_000, "int"),
    "batch_size": (1, 65_536, "int"),
    "image_size": (1, MAX_SIDE, "int"),
    "train_per_class": (1, 10**9, "int"),
    "update_every": (1, 10**9, "int"),
    "eval_every": (1, 100_000, "int"),
    "save_every_steps": (0, 10**12, "int"),
    "threads": (0, 4096, "int"),
    "seed": (0, 2**31 - 1, "int"),
    "mc_samples": (0, 1000, "int"),
    "avg_start": (1, 100_000, "int"),
    "dpnum": (0, 10**9, "int"),
    "val_size": (0.0, 0.99, "float"),
    "drop_fraction": (0.0, 0.99, "float"),
    "update_end": (0.0, 1.0, "float"),
    "density": (0.0, 1.0, "float"),
    "lr": (0.0, 100.0, "float"),
    "decay": (0.0, 1.0, "float"),
    "decay_every": (0.0, 1e9, "float"),
    "warmup_epochs": (0.0, 1e9, "float"),
    "wd": (0.0, 1.0, "float"),
    "momentum": (0.0, 0.999, "float"),
    "target_risk": (0.0001, 0.9999, "float"),
}


def flag(name: str) -> str:
    """The command-line option of a TrainConfig field: update_every -> --update-every."""
    return "--" + name.replace("_", "-")


def changed_setting(saved: dict, wanted: dict, keep: set[str] = frozenset()) -> str | None:
    """The first setting in `wanted` that a run's saved config.json holds with another value (keys
    in `keep` may change, keys the run did not save are new defaults); None when all agree."""
    return next((k for k, v in wanted.items() if k not in keep and k in saved and saved[k] != v), None)


def check_number(name: str, value, low: float, high: float, kind: str) -> None:
    """`value` is None or a finite number of `kind` in [low, high]; else an InputError naming the option."""
    if value is None:
        return
    number_types = (int,) if kind == "int" else (int, float)
    span = f"{_show(low)}..{_show(high)}"
    if isinstance(value, bool) or not isinstance(value, number_types) or not math.isfinite(value):
        what = "an integer" if kind == "int" else "a finite number"
        raise InputError(f"{flag(name)} must be {what} in {span}, got {value!r}")
    if not low <= value <= high:
        raise InputError(f"{flag(name)} must lie in {span}, got {_show(value)}")


def _show(x: float) -> str:
    """Integers in full (2147483647, not 2.14748e+09), floats short."""
    return str(x) if isinstance(x, int) else f"{x:g}"


def resolve(cfg: TrainConfig) -> TrainConfig:
    """A validated copy of `cfg` with every derived setting filled; InputError names the fix."""
    cfg = replace(cfg)
    _check_choices(cfg)
    _check_numbers(cfg)
    _fill_method(cfg)
    _fill_product(cfg)
    cfg.decay_every = cfg.decay_every or max(1.0, round(0.4 * cfg.epochs, 3))
    cfg.out = cfg.out or f"runs/{cfg.dataset}-{cfg.model}-{cfg.method}-s{cfg.seed}"
    if cfg.data_dir is not None:  # config.json must find the data again from any working directory
        cfg.data_dir = os.path.abspath(cfg.data_dir)
    return cfg


def _check_choices(cfg: TrainConfig) -> None:
    for name, value, choices in (
        ("method", cfg.method, ALL_METHODS),
        ("dataset", cfg.dataset, DATASETS),
        ("sparse_init", cfg.sparse_init, INITS),
        ("product", cfg.product, (None, *PRODUCTS)),
        ("device", cfg.device, DEVICES),
        ("conformal", cfg.conformal, CONFORMAL_METHODS),
    ):
        if value not in choices:
            names = ", ".join(c for c in choices if c is not None)
            raise InputError(f"unknown {flag(name)} {value!r}; choose one of {names}")
    if cfg.dataset == "digits" and cfg.data_dir is not None:
        raise InputError(
            f"--data-dir {cfg.data_dir} is given but --dataset is digits (the default, which needs no folder); "
            "add --dataset cifar10 or --dataset imagefolder"
        )
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise InputError("--device cuda but no CUDA device is available; use --device cpu or auto")


def _check_numbers(cfg: TrainConfig) -> None:
    for name, (low, high, kind) in NUMBER_RANGES.items():
        if name == "density" and isinstance(cfg.density, int | float) and not 0 < cfg.density <= 1:
            raise InputError(f"--density must lie in (0, 1], got {cfg.density}")
        check_number(name, getattr(cfg, name), low, high, kind)
    if cfg.dpnum is not None and cfg.dpnum <= 1:
        raise InputError(f"--dpnum must be an integer > 1 (drop probability 1/DPNUM), got {cfg.dpnum}")
    for name, value, interval in (
        ("lr", cfg.lr, "(0, 100]"),
        ("decay", cfg.decay, "(0, 1]"),
        ("decay_every", cfg.decay_every, "(0, 1e9]"),
        ("update_end", cfg.update_end, "(0, 1]"),
    ):
        if value is not None and value <= 0:  # the upper bounds are NUMBER_RANGES'
            raise InputError(f"{flag(name)} must lie in {interval}, got {_show(value)}")


def _fill_method(cfg: TrainConfig) -> None:
    """Density, DPNUM and the averaging start from the method's preset."""
    if cfg.method == "dense":
        if cfg.density not in (None, 1.0):
            raise InputError(
                f"--method dense trains every weight; drop --density {cfg.density} or pick a sparse method"
            )
        if cfg.dpnum is not None:
            raise InputError("--dpnum needs a sparse method (static, set, rigl or cigl)")
        cfg.density = 1.0
        return
    cfg.density = 0.1 if cfg.density is None else cfg.density
    cfg.dpnum = PRESETS[cfg.method][1] if cfg.dpnum is None else cfg.dpnum
    if cfg.method in AVERAGING_METHODS and cfg.avg_start is None:
        cfg.avg_start = math.floor(0.8 * cfg.epochs) + 1


def _fill_product(cfg: TrainConfig) -> None:
    """Which model the run ships, and the evaluations that need a random mask or averaging."""
    if cfg.avg_start is not None and cfg.avg_start > cfg.epochs:
        raise InputError(
            f"--avg-start {cfg.avg_start} is outside the run: use an epoch from 1 to {cfg.epochs} "
            f"(--epochs {cfg.epochs}); averaging folds the weights after that epoch and every later one"
        )
    cfg.product = cfg.product or ("averaged" if cfg.avg_start else "final")
    if cfg.product == "averaged" and not cfg.avg_start:
        raise InputError("--product averaged needs weight averaging: add --avg-start EPOCH or use --method cigl")
    if cfg.target_risk is not None and cfg.val_size == 0:
        raise InputError("--target-risk certifies the abstain threshold on the validation split: drop --val-size 0")
    if cfg.mc_samples and not cfg.dpnum:
        raise InputError(
            "--mc-samples K (K >= 1) draws the random mask at evaluation: it needs --dpnum N (e.g. --method cigl)"
        )
