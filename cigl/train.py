"""The training loop: Dense, Static, SET, RigL and CigL on one code path.

Read top to bottom: configuration, set-up (data, model, optimiser, sparsity, averaging),
resume, the epoch loop, then the product (averaged model when averaging is on), its
temperature and the run directory files (config.json, metrics.jsonl, last.pt, model.pt,
summary.json).

Determinism: the data order of an epoch depends only on (seed, epoch), and torch's global
generator is re-seeded from (seed, step) before every step, so augmentation, random masks and
SET's growth are functions of the step. A resumed run therefore repeats exactly what an
uninterrupted run would have done.

Under torchrun every process runs this loop on its share of each global batch (see
cigl.distributed); rank 0 alone evaluates and writes the run directory.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cigl import calibration, distributed
from cigl.data import DATASETS, atomic_save_npz, load_dataset
from cigl.errors import ArgumentParser, CheckpointError, InputError, cli_entry
from cigl.images import MAX_SIDE
from cigl.io import atomic_open, atomic_torch_save, load_torch_file
from cigl.models import create_model
from cigl.pipeline import augment, epoch_order, normalize, shuffled_batches, to_device
from cigl.sparse import METHODS, Masking, WeightAverage, random_mask, recalibrate_bn
from cigl.sparse.allocation import INITS, format_table
from cigl.sparse.schedule import FEW_UPDATES, default_update_every, update_count

ALL_METHODS = ("dense", "static", "set", "rigl", "cigl")
CHECKPOINT_FORMAT = "cigl-checkpoint"
MODEL_FORMAT = "cigl-model"
FORMAT_VERSION = 1
RESUMABLE_CHANGES = {"epochs"}
PRODUCTS = ("averaged", "final")


@dataclass
class TrainConfig:
    """Every setting of a run; `resolve` fills the ones that depend on others."""

    dataset: str = "digits"
    data_dir: str | None = None
    image_size: int | None = None
    val_size: float = 0.1
    train_per_class: int | None = None
    model: str = "resnet20"
    method: str = "cigl"
    density: float | None = None  # dense: 1.0, sparse methods: 0.1
    sparse_init: str = "erk"
    drop_fraction: float = 0.3
    update_every: int | None = None  # steps between mask updates; default: 100, fewer on short runs
    update_end: float = 0.75  # fraction of all training steps
    dpnum: int | None = None  # cigl: 100
    avg_start: int | None = None  # first averaged epoch (1-based); cigl: 80% of the epochs
    product: str | None = None  # "averaged" (default with averaging) or "final" (the final weights)
    mc_samples: int = 0  # also evaluate MC dropout: K stochastic passes with the random mask
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
    out: str | None = None  # default runs/<dataset>-<model>-<method>-s<seed>
    save_every_steps: int = 0
    eval_every: int = 1


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Validate and fill derived settings; raises InputError with the fix."""
    cfg = replace(cfg)
    if cfg.method not in ALL_METHODS:
        raise InputError(f"unknown --method {cfg.method!r}; choose one of {', '.join(ALL_METHODS)}")
    if cfg.dataset not in DATASETS:
        raise InputError(f"unknown --dataset {cfg.dataset!r}; choose one of {', '.join(DATASETS)}")
    if cfg.dataset == "digits" and cfg.data_dir is not None:
        raise InputError(
            f"--data-dir {cfg.data_dir} is given but --dataset is digits (the default, which needs no folder); "
            "add --dataset cifar10 or --dataset imagefolder"
        )
    for name, (low, high, kind) in NUMBER_RANGES.items():
        check_number(name, getattr(cfg, name), low, high, kind)
    if cfg.lr <= 0 or cfg.decay <= 0 or (cfg.decay_every is not None and cfg.decay_every <= 0):
        raise InputError("need --lr > 0, 0 < --decay <= 1 and --decay-every > 0")
    if cfg.sparse_init not in INITS:
        raise InputError(f"--sparse-init must be one of {', '.join(INITS)}, got {cfg.sparse_init!r}")
    if not 0 <= cfg.drop_fraction < 1 or not 0 < cfg.update_end <= 1:
        raise InputError("need 0 <= --drop-fraction < 1 and 0 < --update-end <= 1")
    if cfg.method == "dense":
        if cfg.density not in (None, 1.0):
            raise InputError(
                f"--method dense trains every weight; drop --density {cfg.density} or pick a sparse method"
            )
        if cfg.dpnum is not None:
            raise InputError("--dpnum needs a sparse method (static, set, rigl or cigl)")
        cfg.density = 1.0
    else:
        cfg.density = 0.1 if cfg.density is None else cfg.density
        if not 0 < cfg.density <= 1:
            raise InputError(f"--density must lie in (0, 1], got {cfg.density}")
    if cfg.method == "cigl":
        cfg.dpnum = 100 if cfg.dpnum is None else cfg.dpnum
        cfg.avg_start = math.floor(0.8 * cfg.epochs) + 1 if cfg.avg_start is None else cfg.avg_start
    if cfg.dpnum is not None:
        random_mask.check_dpnum(cfg.dpnum)
    if cfg.avg_start is not None and not 1 <= cfg.avg_start <= cfg.epochs:
        raise InputError(
            f"--avg-start {cfg.avg_start} is outside the run: use an epoch from 1 to {cfg.epochs} "
            f"(--epochs {cfg.epochs}); averaging folds the weights after that epoch and every later one"
        )
    cfg.product = cfg.product or ("averaged" if cfg.avg_start else "final")
    if cfg.product not in PRODUCTS:
        raise InputError(f"--product must be one of {', '.join(PRODUCTS)}, got {cfg.product!r}")
    if cfg.product == "averaged" and not cfg.avg_start:
        raise InputError("--product averaged needs weight averaging: add --avg-start EPOCH or use --method cigl")
    if cfg.mc_samples < 0 or (cfg.mc_samples and not cfg.dpnum):
        raise InputError(
            "--mc-samples K (K >= 1) draws the random mask at evaluation: it needs --dpnum N (e.g. --method cigl)"
        )
    cfg.decay_every = cfg.decay_every or max(1.0, round(0.4 * cfg.epochs, 3))
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise InputError(f"--device must be auto, cpu or cuda, got {cfg.device!r}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda but no CUDA device is available; use --device cpu or auto")
    cfg.out = cfg.out or f"runs/{cfg.dataset}-{cfg.model}-{cfg.method}-s{cfg.seed}"
    return cfg


# name -> (lowest, highest, "int" | "float") of the numeric settings; None values mean "default".
# --density and --dpnum have their own checks below (an open interval; an integer > 1).
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
    "val_size": (0.0, 0.99, "float"),
    "drop_fraction": (0.0, 0.99, "float"),
    "update_end": (0.0, 1.0, "float"),
    "lr": (0.0, 100.0, "float"),
    "decay": (0.0, 1.0, "float"),
    "decay_every": (0.0, 1e9, "float"),
    "warmup_epochs": (0.0, 1e9, "float"),
    "wd": (0.0, 1.0, "float"),
    "momentum": (0.0, 0.999, "float"),
}


def check_number(name: str, value, low: float, high: float, kind: str) -> None:
    """`value` is None or a finite number of `kind` in [low, high]; else an InputError naming the option."""
    if value is None:
        return
    flag = "--" + name.replace("_", "-")
    number_types = (int,) if kind == "int" else (int, float)
    if isinstance(value, bool) or not isinstance(value, number_types) or not math.isfinite(value):
        what = "an integer" if kind == "int" else "a finite number"
        raise InputError(f"{flag} must be {what} in {low:g}..{high:g}, got {value!r}")
    if not low <= value <= high:
        raise InputError(f"{flag} must lie in {low:g}..{high:g}, got {value:g}")


# --------------------------------------------------------------------------- small helpers


def lr_at(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Linear warm-up, then lr * decay^floor(epoch / decay_every) (piecewise constant)."""
    warm = cfg.warmup_epochs * steps_per_epoch
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return cfg.lr * cfg.decay ** math.floor(step / steps_per_epoch / cfg.decay_every)


def step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % (2**63)


def load_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; start the run without --resume")
    return load_torch_file(path, CHECKPOINT_FORMAT, "cigl training checkpoint")


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


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


def split_metrics(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> dict[str, float]:
    """Accuracy, NLL, ECE (10 bins), Brier and mean confidence of softmax(logits / T)."""
    s = calibration.summary(logits / temperature, labels, kind="logits", n_bins=10)
    return {"acc": s["accuracy"], "nll": s["nll"], "ece": s["ece"], "brier": s["brier"], "conf": s["mean_confidence"]}


# --------------------------------------------------------------------------- training


def train(cfg: TrainConfig, *, resume: bool = False, quiet: bool = False) -> dict | None:
    """Train as `cfg` says, write the run directory, return the summary (None on the ranks
    other than 0 of a torchrun launch)."""
    cfg = resolve(cfg)
    launch = distributed.from_env()
    device = distributed.device_for(
        launch, cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    )
    with distributed.process_group(launch, device):
        return _train(cfg, launch, device, resume, quiet)


def _train(cfg: TrainConfig, launch: distributed.Launch, device: torch.device, resume: bool, quiet: bool):
    out = Path(cfg.out)
    say = (lambda *a: None) if quiet or not launch.main else (lambda *a: print(*a, flush=True))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cuda = device.type == "cuda"
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else nullcontext
    ckpt = load_checkpoint(out / "last.pt") if resume else None
    if not resume and (out / "last.pt").exists():
        raise InputError(f"{out} already holds a run; pass --resume {out} to continue it or choose another --out")

    # ---- data, model, optimiser
    data = load_dataset(
        cfg.dataset,
        cfg.data_dir,
        val_size=cfg.val_size,
        image_size=cfg.image_size,
        train_per_class=cfg.train_per_class,
    )
    train_x, train_y = to_device(data.train, device)
    n_train = train_x.shape[0]
    batch = min(cfg.batch_size, n_train)  # global: each rank takes batch / world of it
    if batch % launch.world:
        raise InputError(
            f"the batch of {batch} images does not split evenly over {launch.world} processes; "
            f"use a --batch-size that is a multiple of {launch.world}"
        )
    steps_per_epoch = n_train // batch
    total_steps = steps_per_epoch * cfg.epochs
    torch.manual_seed(cfg.seed)
    model = create_model(
        cfg.model, num_classes=data.num_classes, in_chans=data.channels, image_size=data.image_size
    ).to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.wd)

    # ---- sparsity (masks M, random mask R) and weight-and-mask averaging
    masking = None
    step_zero = ckpt is None
    end_step = int(cfg.update_end * total_steps)
    explicit_every, cfg = (
        cfg.update_every,
        replace(cfg, update_every=cfg.update_every or default_update_every(end_step)),
    )
    if cfg.method != "dense":
        masking = Masking(
            model,
            METHODS["rigl" if cfg.method == "cigl" else cfg.method],
            density=cfg.density,
            init=cfg.sparse_init,
            alpha=cfg.drop_fraction,
            update_every=cfg.update_every,
            update_until=end_step,
            dpnum=cfg.dpnum,
            seed=cfg.seed,
        )
    planned_updates = update_count(cfg.update_every, end_step) if masking and masking.method.updates else 0
    if masking and masking.method.updates and planned_updates < FEW_UPDATES and launch.main and step_zero:
        fix = (
            f"use --update-every {default_update_every(end_step)} or leave it out"
            if explicit_every and explicit_every > default_update_every(end_step)
            else "train for more epochs"
        )
        print(
            f"warning: only {planned_updates} mask updates in {end_step} steps (--update-every {cfg.update_every}, "
            f"--update-end {cfg.update_end:g}), so {cfg.method} barely differs from static training; {fix}",
            file=sys.stderr,
            flush=True,
        )
    average = WeightAverage() if cfg.avg_start else None

    # ---- resume
    step = 0
    if ckpt is not None:
        step = restore(ckpt, out / "last.pt", model, optimizer, masking, average, device)
        where = f"epoch {step // steps_per_epoch + 1}" if step < total_steps else f"all {cfg.epochs} epochs done"
        say(f"resumed {out} at step {step} ({where})")
        if ckpt.get("world_size", 1) != launch.world:
            say(
                f"note: the run was checkpointed by {ckpt.get('world_size', 1)} process(es) and continues on "
                f"{launch.world}: same global batch and schedule, but not bit-identical to an uninterrupted run"
            )
    # DDP averages the dense gradient over the processes during backward (wrapped after resume:
    # it starts by copying rank 0's weights to every rank)
    net = (
        model
        if launch.world == 1
        else nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    )
    layers = masking.table() if masking is not None else []
    metrics_path = out / "metrics.jsonl"
    done_epochs = step // steps_per_epoch
    if launch.main:
        run_info = {
            **asdict(cfg),
            "classes": data.classes,
            "n_train": n_train,
            "n_val": len(data.val),
            "n_test": len(data.test),
            "world_size": launch.world,
            "steps_per_epoch": steps_per_epoch,
            "total_steps": total_steps,
            "mask_updates_planned": planned_updates,
            "sparse_layers": layers,
        }
        write_run_start(out, run_info, done_epochs)
    if masking is not None and step == 0:
        say(format_table(layers))

    def checkpoint() -> None:
        if not launch.main:
            return
        atomic_torch_save(
            {
                "format": CHECKPOINT_FORMAT,
                "version": FORMAT_VERSION,
                "config": asdict(cfg),
                "world_size": launch.world,
                "step": step,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "sparse": masking.state_dict() if masking is not None else None,
                "average": average.state_dict() if average is not None else None,
            },
            out / "last.pt",
        )

    eval_x, eval_y = {}, {}  # the evaluated splits (no val split with --val-size 0)
    for split, part in (("val", data.val), ("test", data.test)):
        if len(part):
            eval_x[split], labels = to_device(part, device)
            eval_y[split] = labels.cpu().numpy()
    last_logits: dict[str, np.ndarray] = {}  # of the latest evaluation in the loop
    show_bar = not quiet and launch.main and sys.stderr.isatty()
    say(
        f"training {cfg.model} ({cfg.method}, density {cfg.density:g}) on {cfg.dataset}: "
        f"{n_train} images, {cfg.epochs} epochs x {steps_per_epoch} steps, device {device}"
        + (f", {launch.world} processes x {batch // launch.world} images per step" if launch.world > 1 else "")
    )
    mask_checks = 0

    # ---- the epoch loop
    for epoch in range(done_epochs, cfg.epochs):
        t0 = time.time()
        churn_at_start = masking.churn() if masking is not None else (0, 0)
        order = epoch_order(n_train, cfg.seed, epoch, device)
        model.train()
        losses = []
        first = step - epoch * steps_per_epoch
        bar = None
        if show_bar:
            from tqdm import tqdm

            bar = tqdm(
                total=steps_per_epoch,
                initial=first,
                desc=f"epoch {epoch + 1}/{cfg.epochs}",
                leave=False,
                dynamic_ncols=True,
            )
        for b in range(first, steps_per_epoch):
            torch.manual_seed(step_seed(cfg.seed, step))
            idx = order[b * batch : (b + 1) * batch]
            # the whole global batch is augmented on every rank before each keeps its share, so
            # a step draws the same random numbers for any number of processes
            x = distributed.shard(augment(train_x[idx], data.pad, data.flip), launch)
            x = normalize(x, data.mean, data.std)
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(cfg, step, steps_per_epoch)
            updates_masks = masking is not None and masking.is_update_step(step)
            losses.append(train_step(net, optimizer, masking, x, distributed.shard(train_y[idx], launch), step, amp))
            if updates_masks and launch.world > 1:
                distributed.check_same_masks(masking.masks, step)
                mask_checks += 1
            step += 1
            if bar is not None:
                bar.update(1)
            # mid-epoch checkpoints only: an epoch's end is saved after its averaging fold and metrics
            if cfg.save_every_steps and step % cfg.save_every_steps == 0 and b + 1 < steps_per_epoch:
                checkpoint()
        if bar is not None:
            bar.close()
        if average is not None and epoch + 1 >= cfg.avg_start:
            average.fold(
                masking.snapshot(model)
                if masking is not None
                else {n: p.detach().clone() for n, p in model.named_parameters()}
            )
        train_loss = float(distributed.mean(torch.stack(losses).mean())) if losses else None
        if not launch.main:
            continue
        row = {
            "epoch": epoch + 1,
            "step": step,
            "lr": lr_at(cfg, step - 1, steps_per_epoch),
            "train_loss": train_loss,
            "density": masking.density() if masking is not None else 1.0,
        }
        if masking is not None:  # how much the masks moved this epoch
            updates, moved = (now - before for now, before in zip(masking.churn(), churn_at_start, strict=True))
            row |= {"mask_updates": updates, "mask_churn": moved / sum(masking.nnz.values())}
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            weights = masking.weights() if masking is not None else None
            last_logits = split_logits(model, eval_x, data, amp, weights)
            for split, split_logit in last_logits.items():
                row.update({f"{split}_{k}": v for k, v in split_metrics(split_logit, eval_y[split]).items()})
        row["time_s"] = round(time.time() - t0, 3)
        with open(metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        checkpoint()
        say(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))

    distributed.leave()
    if not launch.main:
        return None
    if mask_checks:
        say(f"masks identical on all {launch.world} processes at each of {mask_checks} mask updates (checksum)")

    # ---- the products: the final training weights, and the averaged model when averaging is on
    if masking is not None:  # training is over: the parameters become w (they held u = scale * w)
        masking.finalize()
    logits = {"final_weights": last_logits or split_logits(model, eval_x, data, amp)}  # the last epoch's
    products = {"final_weights": (model, {n: m.clone() for n, m in masking.masks.items()} if masking else {})}
    if average is not None:
        averaged = copy.deepcopy(model)
        average.apply_to(averaged)
        # batch-norm statistics recomputed from training batches drawn as training draws them:
        # shuffled and augmented (benchmarks/bn_recalibration.py and docs/results compare the choices)
        recalibrate_bn(averaged, shuffled_batches(train_x, batch, cfg.seed, data.mean, data.std, data.pad, data.flip))
        products["averaged"] = (averaged, {n: average.avg[n] != 0 for n in products["final_weights"][1]})
        logits["averaged"] = split_logits(averaged, eval_x, data, amp)
    if cfg.mc_samples:  # RigL+MC-DP: the final weights with K random masks, softmax averaged
        weights = {n: masking.params[n].detach() for n in masking.masks}
        logits["mc_dropout"] = mc_dropout_logits(model, eval_x, data, amp, weights, cfg.dpnum, cfg.mc_samples, cfg.seed)
    results = {name: evaluate(split_logit, eval_y) for name, split_logit in logits.items()}
    chosen = "averaged" if cfg.product == "averaged" else "final_weights"
    product, masks = products[chosen]
    best = results[chosen]
    summary = make_summary(cfg, masks, masking.nnz if masking else {}, results, best)
    if masking is not None:
        updates, moved = masking.churn()
        summary |= {"mask_updates": updates, "mask_churn": moved / sum(masking.nnz.values())}
    save_model_file(
        out / "model.pt",
        arch=cfg.model,
        model=product,
        masks=masks,
        classes=data.classes,
        mean=data.mean,
        std=data.std,
        in_chans=data.channels,
        image_size=data.image_size,
        temperature=summary["temperature"],
        method=cfg.method,
        config=asdict(cfg),
        summary=summary,
    )
    atomic_save_npz(
        out / "predictions.npz", logits=logits[chosen]["test"], labels=eval_y["test"], classes=np.asarray(data.classes)
    )
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    t = summary["test"]
    say(
        f"test acc {t['acc']:.4f}  ece {t['ece']:.4f}  nll {t['nll']:.4f}  "
        f"temperature {summary['temperature']:.3f}  density {summary['actual_density']:.4f} "
        f"(target {cfg.density:g})\nresults in {out}/ (summary.json, model.pt, metrics.jsonl)"
    )
    return summary


def restore(ckpt: dict, path: Path, model, optimizer, masking, average, device) -> int:
    """Load a checkpoint's state into the run's objects and return its step; a checkpoint that
    does not fit this run (damaged, another method or model) is a CheckpointError."""
    sparse = ckpt.get("sparse")
    if masking is not None and not (isinstance(sparse, dict) and isinstance(sparse.get("masks"), dict)):
        raise CheckpointError(f"{path} holds no sparse masks (a dense run's?); resume it with its own config.json")
    try:
        step = ckpt["step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step {step!r}")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if masking is not None:
            if set(sparse["masks"]) != set(masking.masks):
                raise ValueError("its masks are for other layers")
            masking.load_state_dict(sparse)
        if average is not None and ckpt.get("average") is not None:
            saved = ckpt["average"]
            average.load_state_dict(
                {"avg": {k: v.to(device) for k, v in saved["avg"].items()}, "count": saved["count"]}
            )
    except (KeyError, ValueError, TypeError, RuntimeError, AttributeError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise CheckpointError(
            f"{path} does not fit this run ({type(exc).__name__}: {reason}); it is damaged or from another "
            "run: start afresh with another --out"
        ) from None
    return step


def write_run_start(out: Path, run_info: dict, done_epochs: int) -> None:
    """config.json, and metrics.jsonl cut back to the epochs the checkpoint has done."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.json", json.dumps(run_info, indent=2))
    metrics_path = out / "metrics.jsonl"
    kept = metrics_path.read_text().splitlines()[:done_epochs] if metrics_path.exists() else []
    atomic_write_text(metrics_path, "".join(line + "\n" for line in kept))


def save_model_file(
    path: Path,
    *,
    arch: str,
    model: nn.Module,
    masks: dict[str, torch.Tensor],
    classes: list[str],
    mean,
    std,
    in_chans: int,
    image_size: int,
    temperature: float = 1.0,
    method: str = "dense",
    config: dict | None = None,
    summary: dict | None = None,
) -> None:
    """model.pt, the product of a run: weights, masks (support of each masked tensor; {} for
    dense) and everything export and serving need to rebuild and feed the model."""
    atomic_torch_save(
        {
            "format": MODEL_FORMAT,
            "version": FORMAT_VERSION,
            "arch": arch,
            "model_kwargs": {"num_classes": len(classes), "in_chans": in_chans, "image_size": image_size},
            "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
            "masks": {n: m.detach().cpu().contiguous() for n, m in masks.items()},
            "classes": list(classes),
            "mean": list(mean),
            "std": list(std),
            "temperature": float(temperature),
            "method": method,
            "config": config or {},
            "summary": summary or {},
        },
        path,
    )


def train_step(model, optimizer, masking, x, y, step, amp) -> torch.Tensor:
    """One SGD step. With masking: the random mask is drawn before the forward pass, and on a
    mask-update step the masks change from the dense gradient and, as in the reference, the
    optimiser step is skipped. Under torchrun `model` is the DDP wrapper: the gradient is then
    the global batch's, so every rank updates weights and masks alike."""
    optimizer.zero_grad(set_to_none=True)
    if masking is not None:
        masking.begin_step()
    with amp():
        loss = F.cross_entropy(model(x).float(), y)
    loss.backward()
    if masking is not None and masking.is_update_step(step):
        masking.update(step, optimizer)
        return loss.detach()
    if masking is not None:
        masking.mask_gradients()
    optimizer.step()
    if masking is not None:
        masking.end_step()
    return loss.detach()


def split_logits(model: nn.Module, xs: dict[str, torch.Tensor], data, amp, weights=None) -> dict[str, np.ndarray]:
    """split -> logits of `model` (optionally with `weights` swapped in) on that split's images."""
    return {split: predict_logits(model, x, data.mean, data.std, 512, amp, weights) for split, x in xs.items()}


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


def make_summary(
    cfg: TrainConfig, masks: dict[str, torch.Tensor], target_nnz: dict[str, int], results: dict, best: dict
) -> dict:
    """summary.json: the product's test metrics (raw and at the fitted temperature), both
    models' metrics when averaging is on, and target vs actual density per layer and total."""
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
    numel = sum(r["numel"] for r in layers)
    return {
        "method": cfg.method,
        "model": cfg.model,
        "dataset": cfg.dataset,
        "seed": cfg.seed,
        "epochs": cfg.epochs,
        "target_density": cfg.density,
        "actual_density": sum(r["nnz"] for r in layers) / numel if numel else 1.0,
        "product": "averaged" if cfg.product == "averaged" else "final_weights",
        "test": best["test"],
        "temperature": best["temperature"],
        "test_calibrated": best["test_calibrated"],
        **results,
        "layers": layers,
    }


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = ArgumentParser(
        prog="cigl-train",
        argument_default=argparse.SUPPRESS,
        description="Train a (sparse) network: dense, static, SET, RigL or CigL. Writes a run directory "
        "with config.json, metrics.jsonl, last.pt, model.pt and summary.json.",
    )
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS, help=f"default {d.dataset}")
    g.add_argument("--data-dir", help="dataset folder (cifar10: ImageFolder with train/ test/ or cifar-10-batches-py)")
    g.add_argument("--image-size", type=int, help="resize images to N x N (needed when sizes differ)")
    g.add_argument(
        "--val-size",
        type=float,
        help=f"share of train held out for validation (default {d.val_size}; 0 = paper)",
    )
    g.add_argument("--train-per-class", type=int, help="train on a class-balanced subset of N images per class")
    g = p.add_argument_group("model and method")
    g.add_argument("--model", help=f"cigl or timm model name (default {d.model})")
    g.add_argument("--method", choices=ALL_METHODS, help=f"default {d.method} (= rigl + --dpnum 100 + averaging)")
    g.add_argument("--density", type=float, help="DENSITY: share of weights kept (default 0.1; dense: 1)")
    g.add_argument("--sparse-init", choices=INITS, help=f"per-layer density allocation (default {d.sparse_init})")
    g.add_argument(
        "--drop-fraction",
        type=float,
        help=f"initial share of weights exchanged per update (default {d.drop_fraction})",
    )
    g.add_argument(
        "--update-every",
        type=int,
        help="steps between mask updates (default: 100, shortened so a short run still makes ~40 updates)",
    )
    g.add_argument("--update-end", type=float, help=f"stop updating after this share of steps (default {d.update_end})")
    g.add_argument("--dpnum", type=int, help="DPNUM: random mask drops each weight with p=1/DPNUM (cigl default 100)")
    g.add_argument(
        "--avg-start",
        type=int,
        help="BS: first epoch (1-based) of weight-and-mask averaging (cigl: 80%% of epochs)",
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
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), help="auto = CUDA when present")
    g.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    g.add_argument("--out", help="run directory (default runs/<dataset>-<model>-<method>-s<seed>)")
    g.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its last.pt (only --epochs may change)",
    )
    g.add_argument("--save-every-steps", type=int, help="also checkpoint every N steps (default: each epoch only)")
    g.add_argument("--eval-every", type=int, help="evaluate val/test every N epochs (default 1)")
    g.add_argument("--quiet", action="store_true", help="print nothing but errors")
    return p


def config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, bool]:
    """TrainConfig from explicitly given options; with --resume, the rest comes from the run."""
    given = {k: v for k, v in vars(args).items() if k not in ("resume", "quiet")}
    if not getattr(args, "resume", None):
        return TrainConfig(**given), False
    run = Path(args.resume)
    if "out" in given and Path(given["out"]) != run:
        raise InputError("--out and --resume name different runs; give only --resume RUN_DIR")
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
    names = {f.name for f in fields(TrainConfig)}
    for key, value in given.items():
        if key not in RESUMABLE_CHANGES and key in saved and saved[key] != value:
            raise CheckpointError(
                f"--resume {run}: the run was started with --{key.replace('_', '-')} {saved[key]}, "
                f"not {value}; only --epochs may change on resume"
            )
    merged = {k: v for k, v in saved.items() if k in names} | given | {"out": str(run)}
    return TrainConfig(**merged), True


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg, resume = config_from_args(args)
    train(cfg, resume=resume, quiet=getattr(args, "quiet", False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
