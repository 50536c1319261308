"""The training loop: Dense, Static, SET, RigL and CigL on one code path.

Read top to bottom: `train` sets up a Run (data, model, optimiser, sparsity, averaging, a
checkpoint to resume), runs the epochs (steps, the averaging fold, metrics, checkpoint), then
`finish` builds the product (the averaged model when averaging is on), fits its temperature
and writes the run directory (cigl.runfiles).

Determinism: the data order of an epoch depends only on (seed, epoch), and torch's global
generator is re-seeded from (seed, step) before every step, so augmentation, random masks and
SET's growth are functions of the step. A resumed run therefore repeats exactly what an
uninterrupted run would have done.

Under torchrun every process runs this loop on its share of each global batch (see
cigl.distributed); rank 0 alone evaluates and writes the run directory.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import IO

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cigl import distributed, runfiles
from cigl.data import Dataset, load_dataset
from cigl.errors import CheckpointError, InputError, is_int_in
from cigl.models import create_model
from cigl.pipeline import augment, epoch_order, normalize, shuffled_batches, to_device
from cigl.sparse import Masking, WeightAverage, recalibrate_bn
from cigl.sparse.schedule import FEW_UPDATES, default_update_every
from cigl.tables import format_table
from cigl.train.config import TrainConfig, changed_setting, resolve
from cigl.train.evaluate import (
    confidence_guarantees,
    evaluate,
    make_summary,
    mc_dropout_logits,
    split_logits,
    split_metrics,
)
from cigl.train.graphed import GraphedStep, graph_autocast
from cigl.train.interrupt import StopRequest


@dataclass
class Run:
    """Everything a run's functions share: settings, data, model, optimiser, sparse state, step."""

    cfg: TrainConfig
    launch: distributed.Launch
    device: torch.device
    say: Callable[..., None]
    data: Dataset
    train_x: torch.Tensor
    train_y: torch.Tensor
    batch: int  # global: each process takes batch / world of it
    steps_per_epoch: int
    model: nn.Module
    optimizer: torch.optim.Optimizer
    masking: Masking | None
    average: WeightAverage | None
    step: int = 0
    net: nn.Module | None = None  # the model, or its DDP wrapper under torchrun
    graph: GraphedStep | None = None  # CUDA: the step (and the mask-update step) as replayed CUDA graphs
    eval_x: dict[str, torch.Tensor] = field(default_factory=dict)  # no val split with --val-size 0
    eval_y: dict[str, np.ndarray] = field(default_factory=dict)
    mask_checks: int = 0  # mask updates verified identical on every process
    lock: IO | None = None  # rank 0's lock on the run directory (runfiles.lock_run)
    stop: StopRequest | None = None  # Ctrl-C / SIGTERM seen (single-process runs)

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.cfg.epochs

    def amp(self):
        """bf16 autocast on CUDA, nothing on the CPU."""
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()


class CompiledOrEager(nn.Module):
    """torch.compile(module), or the module itself from the first call on which compiling or
    running the compiled code fails (with a one-line note): --compile never ends a run."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        if not torch.cuda.is_available():  # inductor's CPU build logs that it found no CUDA: noise here
            logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        self.eager, self.compiled = module, torch.compile(module)

    def forward(self, *args):
        if self.compiled is not None:
            try:
                return self.compiled(*args)
            except Exception as exc:  # torch.compile raises many types (backend, C++ toolchain, graph)
                reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
                print(f"note: torch.compile failed ({reason}); training without it", file=sys.stderr, flush=True)
                self.compiled = None
        return self.eager(*args)


def train(cfg: TrainConfig, *, resume: bool = False, quiet: bool = False) -> dict | None:
    """Train as `cfg` says and write the run directory.

    Args:
        cfg: the settings (validated and completed by `resolve`).
        resume: continue the run in `cfg.out` from its last.pt.
        quiet: print nothing.

    Returns:
        The run's summary.json as a dict (None on the ranks other than 0 of a torchrun launch).
    """
    cfg = resolve(cfg)
    launch = distributed.from_env()
    device = distributed.device_for(
        launch, cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    )
    with distributed.process_group(launch, device):
        run = setup(cfg, launch, device, resume, quiet)
        try:
            last_logits: dict[str, np.ndarray] = {}  # of the latest evaluation in the loop
            # while steps run, Ctrl-C and SIGTERM stop at the next step boundary with a checkpoint
            with StopRequest() if launch.world == 1 else nullcontext() as run.stop:
                for epoch in range(run.step // run.steps_per_epoch, cfg.epochs):
                    show_bar = not quiet and launch.main and sys.stderr.isatty()
                    last_logits = train_epoch(run, epoch, show_bar) or last_logits
                    stop_if_asked(run)  # the epoch's checkpoint is saved
            distributed.leave()
            return finish(run, last_logits) if launch.main else None
        finally:
            if run.lock is not None:
                run.lock.close()


# --------------------------------------------------------------------------- set-up


def setup(cfg: TrainConfig, launch, device: torch.device, resume: bool, quiet: bool) -> Run:
    """Data, model, optimiser, sparsity and averaging; the checkpoint's state when resuming;
    config.json written and the start announced."""
    out = Path(cfg.out)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ckpt = runfiles.load_checkpoint(out / "last.pt") if resume else None
    if not resume and (out / "last.pt").exists():
        raise InputError(f"{out} already holds a run; pass --resume {out} to continue it or choose another --out")
    data, train_x, train_y, batch = load_training_data(cfg, launch, device)
    steps_per_epoch = train_x.shape[0] // batch
    model, optimizer = build_model(cfg, data, device)

    # ---- sparsity (masks M, random mask R) and weight-and-mask averaging
    end_step = int(cfg.update_end * steps_per_epoch * cfg.epochs)
    explicit_every = cfg.update_every
    cfg = replace(cfg, update_every=cfg.update_every or default_update_every(end_step))
    masking = None
    if cfg.method != "dense":
        masking = Masking(
            model,
            cfg.method,
            density=cfg.density,
            init=cfg.sparse_init,
            alpha=cfg.drop_fraction,
            update_every=cfg.update_every,
            update_until=end_step,
            dpnum=cfg.dpnum,
            seed=cfg.seed,
        )
    average = WeightAverage() if cfg.avg_start else None
    say = (lambda *_: None) if quiet or not launch.main else (lambda *a: print(*a, flush=True))
    run = Run(
        cfg, launch, device, say, data, train_x, train_y, batch, steps_per_epoch, model, optimizer, masking, average
    )

    # ---- resume, then DDP (it starts by copying rank 0's weights to every rank), evaluation data
    if ckpt is not None:
        check_same_data(run)
        resume_from(run, ckpt)
    elif launch.main:
        warn_few_updates(run, explicit_every)
        if cfg.warmup_epochs > cfg.epochs:
            print(
                f"warning: --warmup-epochs {cfg.warmup_epochs:g} is longer than the run (--epochs {cfg.epochs}), "
                f"so the learning rate never reaches --lr {cfg.lr:g}; use fewer warm-up epochs",
                file=sys.stderr,
                flush=True,
            )
    run.net = (
        model
        if launch.world == 1
        else nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    )
    if cfg.compile:
        run.net = CompiledOrEager(run.net)
    elif cfg.cuda_graph and device.type == "cuda" and launch.world == 1:
        schedule = run.masking.schedule_update if run.masking is not None else None
        run.graph = GraphedStep(functools.partial(graphed_body, run), optimizer, batch, schedule)
    for split, part in (("val", data.val), ("test", data.test)):
        if len(part):
            run.eval_x[split], labels = to_device(part, device)
            run.eval_y[split] = labels.cpu().numpy()
    start_run_files(run)
    return run


def load_training_data(cfg: TrainConfig, launch, device: torch.device):
    """(dataset, training images and labels on the device, global batch size)."""
    data = load_dataset(
        cfg.dataset, cfg.data_dir, val_size=cfg.val_size, image_size=cfg.image_size, train_per_class=cfg.train_per_class
    )
    train_x, train_y = to_device(data.train, device)
    batch = min(cfg.batch_size, train_x.shape[0])
    if batch % launch.world:
        raise InputError(
            f"the batch of {batch} images does not split evenly over {launch.world} processes; "
            f"use a --batch-size that is a multiple of {launch.world}"
        )
    return data, train_x, train_y, batch


def build_model(cfg: TrainConfig, data: Dataset, device: torch.device) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The model (seeded; channels_last on CUDA) and its SGD optimiser."""
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, num_classes=data.num_classes, in_chans=data.channels, image_size=data.image_size)
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model, torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.wd)


def warn_few_updates(run: Run, explicit_every: int | None) -> None:
    """A dynamic method with under FEW_UPDATES mask updates is close to static training: say so."""
    cfg, masking = run.cfg, run.masking
    if masking is None or not masking.method.updates:
        return
    planned, end_step = masking.planned_updates(), masking.update_until
    if planned >= FEW_UPDATES:
        return
    fix = (
        f"use --update-every {default_update_every(end_step)} or leave it out"
        if explicit_every and explicit_every > default_update_every(end_step)
        else "train for more epochs"
    )
    print(
        f"warning: only {planned} mask updates in {run.steps_per_epoch * cfg.epochs} steps (every "
        f"{cfg.update_every} steps until step {end_step}: --update-every {cfg.update_every}, --update-end "
        f"{cfg.update_end:g}), so {cfg.method} barely differs from static training; {fix}",
        file=sys.stderr,
        flush=True,
    )


def resume_from(run: Run, ckpt: dict) -> None:
    """Continue from a loaded last.pt: its state into the run's objects, and a note when the
    number of processes changed."""
    run.step = restore(ckpt, run.out / "last.pt", run.model, run.optimizer, run.masking, run.average, run.device)
    if run.step > run.total_steps:  # the summary would claim fewer epochs than the weights had
        trained = -(-run.step // run.steps_per_epoch)
        raise InputError(
            f"--resume {run.out}: the run has trained {run.step} steps ({trained} epochs) already, more than "
            f"--epochs {run.cfg.epochs} gives; pass --epochs {trained} or more"
        )
    done = run.step >= run.total_steps
    where = f"all {run.cfg.epochs} epochs done" if done else f"epoch {run.step // run.steps_per_epoch + 1}"
    run.say(f"resumed {run.out} at step {run.step} ({where})")
    if ckpt.get("world_size", 1) != run.launch.world:
        run.say(
            f"note: the run was checkpointed by {ckpt.get('world_size', 1)} process(es) and continues on "
            f"{run.launch.world}: same global batch and schedule, but not bit-identical to an uninterrupted run"
        )
    now = execution(run)
    then = {k: ckpt.get(k) for k in now}
    if any(then[k] is not None and then[k] != now[k] for k in now):  # None: not recorded (older checkpoints)
        run.say(
            f"note: the run continues with {_shown(now)} (checkpointed with {_shown(then)}): "
            "not bit-identical to an uninterrupted run"
        )


def restore(ckpt: dict, path: Path, model, optimizer, masking, average, device) -> int:
    """Load a checkpoint's state into the run's objects and return its step; a checkpoint that
    does not fit this run (damaged, another method or model) is a CheckpointError."""
    sparse = ckpt.get("sparse")
    if masking is not None and not (isinstance(sparse, dict) and isinstance(sparse.get("masks"), dict)):
        raise CheckpointError(f"{path} holds no sparse masks (a dense run's?); resume it with its own config.json")
    try:
        step = ckpt["step"]
        if not is_int_in(step, 0):
            raise ValueError(f"step {step!r}")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if masking is not None:
            if set(sparse["masks"]) != set(masking.masks):
                raise ValueError("its masks are for other layers")
            masking.load_state_dict(sparse)
        if average is not None and ckpt.get("average") is not None:
            average.load_state_dict(ckpt["average"], device)
    except (KeyError, ValueError, TypeError, RuntimeError, AttributeError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise CheckpointError(
            f"{path} does not fit this run ({type(exc).__name__}: {reason}); it is damaged or from another "
            "run: start afresh with another --out"
        ) from None
    return step


def data_facts(run: Run) -> dict:
    """What config.json records of the data: a resume checks that it finds the same again."""
    return {
        "classes": run.data.classes,
        "n_train": run.train_x.shape[0],
        "n_val": len(run.data.val),
        "n_test": len(run.data.test),
    }


def check_same_data(run: Run) -> None:
    """On resume (where --data-dir may name a new place for the data): the data found must be
    what the run was trained on, as far as config.json records it."""
    try:
        saved = json.loads((run.out / "config.json").read_text())
    except (OSError, ValueError):
        return  # the command line checked it; through the Python API there may be none
    found = data_facts(run)
    key = changed_setting(saved, found) if isinstance(saved, dict) else None
    if key is not None:
        raise CheckpointError(
            f"--resume {run.out}: the data in {run.cfg.data_dir or run.cfg.dataset} is not what the run was trained "
            f"on ({key}: {_brief(found[key])}, not {_brief(saved[key])}); pass the --data-dir it was trained on"
        )


def _brief(value) -> str:
    text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def start_run_files(run: Run) -> None:
    """config.json and metrics.jsonl (rank 0); the mask table and a line saying what runs."""
    cfg, launch = run.cfg, run.launch
    layers = run.masking.table() if run.masking is not None else []
    if launch.main:
        run.lock = runfiles.lock_run(run.out)
        run_info = {
            **asdict(cfg),
            **data_facts(run),
            "world_size": launch.world,
            "steps_per_epoch": run.steps_per_epoch,
            "total_steps": run.total_steps,
            "mask_updates_planned": run.masking.planned_updates() if run.masking is not None else 0,
            "sparse_layers": layers,
        }
        runfiles.write_run_start(run.out, run_info, run.step // run.steps_per_epoch)
    if layers and run.step == 0:
        run.say(format_table(layers))
    processes = f", {launch.world} processes x {run.batch // launch.world} images per step" if launch.world > 1 else ""
    run.say(
        f"training {cfg.model} ({cfg.method}, density {cfg.density:g}) on {cfg.dataset}: "
        f"{run.train_x.shape[0]} images, {cfg.epochs} epochs x {run.steps_per_epoch} steps, device {run.device}"
        + processes
    )


# --------------------------------------------------------------------------- an epoch


def lr_at(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Linear warm-up, then lr * decay^floor(epoch / decay_every) (piecewise constant)."""
    warm = cfg.warmup_epochs * steps_per_epoch
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return cfg.lr * cfg.decay ** math.floor(step / steps_per_epoch / cfg.decay_every)


def step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % (2**63)


def batch_inputs(run: Run, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's share of the global batch at indices `idx`: images gathered, augmented and
    normalised (channels_last on CUDA), and labels. The whole global batch is augmented on every
    rank before each keeps its share, so a step draws the same random numbers for any number of
    processes."""
    data = run.data
    x = normalize(distributed.shard(augment(run.train_x[idx], data.pad, data.flip), run.launch), data.mean, data.std)
    if run.device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    return x, distributed.shard(run.train_y[idx], run.launch)


def graphed_body(run: Run, idx: torch.Tensor, optimizer, step: int) -> torch.Tensor:
    """The steps GraphedStep captures: the batch at `idx` and train_step under graph_autocast
    (a mask update's host part is GraphedStep's, before each replay)."""
    x, y = batch_inputs(run, idx)
    return train_step(run.model, optimizer, run.masking, x, y, step, graph_autocast, scheduled=True)


def train_step(model, optimizer, masking, x, y, step, amp, scheduled: bool = False) -> torch.Tensor:
    """One SGD step. With masking: the random mask is drawn before the forward pass, and on a
    mask-update step the masks change from the dense gradient and, as in the reference, the
    optimiser step is skipped. Under torchrun `model` is the DDP wrapper: the gradient is then
    the global batch's, so every rank updates weights and masks alike. `scheduled`: the mask
    update's host part (Masking.schedule_update) ran before, so this step is only device work
    (what a CUDA graph captures)."""
    optimizer.zero_grad(set_to_none=True)
    if masking is not None:
        masking.begin_step()
    with amp():
        loss = F.cross_entropy(model(x).float(), y)
    loss.backward()
    if masking is not None and masking.is_update_step(step):
        if scheduled:
            masking.exchange(optimizer)
        else:
            masking.update(step, optimizer)
        return loss.detach()
    if masking is not None:
        masking.mask_gradients()
    optimizer.step()
    if masking is not None:
        masking.end_step()
    return loss.detach()


def train_epoch(run: Run, epoch: int, show_bar: bool) -> dict[str, np.ndarray] | None:
    """The steps of one epoch, the averaging fold, then (rank 0) its metrics row and the
    checkpoint. Returns the logits when this epoch was evaluated."""
    t0 = time.time()
    churn_at_start = run.masking.churn() if run.masking is not None else (0, 0)
    losses = train_steps(run, epoch, show_bar)
    if run.average is not None and epoch + 1 >= run.cfg.avg_start:
        run.average.fold(
            run.masking.snapshot(run.model)
            if run.masking is not None
            else {n: p.detach().clone() for n, p in run.model.named_parameters()}
        )
    train_loss = float(distributed.mean(torch.stack(losses).mean())) if losses else None
    if not run.launch.main:
        return None
    row, logits = epoch_row(run, epoch, train_loss, churn_at_start)
    row["time_s"] = round(time.time() - t0, 3)
    runfiles.append_metrics(run.out, row)
    checkpoint(run)
    run.say(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    return logits


def train_steps(run: Run, epoch: int, show_bar: bool) -> list[torch.Tensor]:
    """The remaining steps of `epoch` (all of them unless resuming mid-epoch); their losses."""
    cfg, launch = run.cfg, run.launch
    order = epoch_order(run.train_x.shape[0], cfg.seed, epoch, run.device)
    run.model.train()
    first = run.step - epoch * run.steps_per_epoch
    bar = None
    if show_bar:
        from tqdm import tqdm

        bar = tqdm(total=run.steps_per_epoch, initial=first, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False)
    losses = []
    for b in range(first, run.steps_per_epoch):
        torch.manual_seed(step_seed(cfg.seed, run.step))
        idx = order[b * run.batch : (b + 1) * run.batch]
        lr = lr_at(cfg, run.step, run.steps_per_epoch)
        updates_masks = run.masking is not None and run.masking.is_update_step(run.step)
        loss = run.graph.step(idx, lr, run.step, updates_masks) if run.graph is not None else None
        if loss is None:  # eagerly: on CPU, under torchrun, while a graph warms up
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            x, y = batch_inputs(run, idx)
            loss = train_step(run.net, run.optimizer, run.masking, x, y, run.step, run.amp)
        losses.append(loss)
        if updates_masks and launch.world > 1:
            distributed.check_same_masks(run.masking.masks, run.step)
            run.mask_checks += 1
        run.step += 1
        if bar is not None:
            bar.update(1)
        # mid-epoch checkpoints only: an epoch's end is saved after its averaging fold and metrics
        stopping = run.stop is not None and run.stop.requested()
        saving = cfg.save_every_steps and run.step % cfg.save_every_steps == 0
        if b + 1 < run.steps_per_epoch and (stopping or saving):
            checkpoint(run)
            stop_if_asked(run)
    if bar is not None:
        bar.close()
    return losses


def epoch_row(run: Run, epoch: int, train_loss, churn_at_start) -> tuple[dict, dict[str, np.ndarray] | None]:
    """metrics.jsonl's row of an epoch (and the logits when the epoch is evaluated)."""
    cfg, masking = run.cfg, run.masking
    row = {
        "epoch": epoch + 1,
        "step": run.step,
        "lr": lr_at(cfg, run.step - 1, run.steps_per_epoch),
        "train_loss": train_loss,
        "density": masking.density() if masking is not None else 1.0,
    }
    if masking is not None:  # how much the masks moved this epoch
        updates, moved = (now - before for now, before in zip(masking.churn(), churn_at_start, strict=True))
        row |= {"mask_updates": updates, "mask_churn": moved / sum(masking.nnz.values())}
    if (epoch + 1) % cfg.eval_every and epoch + 1 != cfg.epochs:
        return row, None
    weights = masking.weights() if masking is not None else None
    logits = split_logits(run.model, run.eval_x, run.data, run.amp, weights)
    for split, split_logit in logits.items():
        row.update({f"{split}_{k}": v for k, v in split_metrics(split_logit, run.eval_y[split]).items()})
    return row, logits


def stop_if_asked(run: Run) -> None:
    """Raise Interrupted when Ctrl-C or SIGTERM came (train.interrupt); last.pt holds run.step."""
    if run.stop is not None and run.stop.requested():
        raise run.stop.interrupted(run.step, run.total_steps, run.cfg.out)


def execution(run: Run) -> dict:
    """How the run executes, which a resume may change (with a note: results are then not
    bit-identical): the device type, torch's CPU threads, torch.compile."""
    return {"device": run.device.type, "threads": torch.get_num_threads(), "compile": run.cfg.compile}


def _shown(settings: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in settings.items())


def checkpoint(run: Run) -> None:
    """last.pt (rank 0): everything needed to continue exactly where the run is."""
    if not run.launch.main:
        return
    runfiles.save_checkpoint(
        run.out / "last.pt",
        config=asdict(run.cfg),
        world_size=run.launch.world,
        **execution(run),
        step=run.step,
        model=run.model.state_dict(),
        optimizer=run.optimizer.state_dict(),
        sparse=run.masking.state_dict() if run.masking is not None else None,
        average=run.average.state_dict() if run.average is not None else None,
    )


# --------------------------------------------------------------------------- the product


def finish(run: Run, last_logits: dict[str, np.ndarray]) -> dict:
    """Evaluate the final weights (and the averaged model, and MC dropout when asked), pick
    the product, and write model.pt, predictions.npz and summary.json."""
    cfg, masking, data = run.cfg, run.masking, run.data
    if run.mask_checks:
        run.say(
            f"masks identical on all {run.launch.world} processes at each of {run.mask_checks} mask updates (checksum)"
        )
    masks = masking.finalize() if masking is not None else {}  # the parameters become w (they held u = scale * w)
    logits = {"final_weights": last_logits or split_logits(run.model, run.eval_x, data, run.amp)}
    products = {"final_weights": (run.model, masks)}
    if run.average is not None:
        products["averaged"] = averaged_model(run, masks)
        logits["averaged"] = split_logits(products["averaged"][0], run.eval_x, data, run.amp)
    if cfg.mc_samples:  # RigL+MC-DP: the final weights with K random masks, softmax averaged
        weights = masking.weights()  # after finalize: the trained weights w themselves
        logits["mc_dropout"] = mc_dropout_logits(
            run.model, run.eval_x, data, run.amp, weights, cfg.dpnum, cfg.mc_samples, cfg.seed
        )
    results = {name: evaluate(split_logit, run.eval_y) for name, split_logit in logits.items()}
    chosen = "averaged" if cfg.product == "averaged" else "final_weights"
    product, product_masks = products[chosen]
    summary = make_summary(cfg, product_masks, masking.nnz if masking else {}, results, chosen)
    summary |= confidence_guarantees(logits[chosen], run.eval_y, summary["temperature"], cfg.conformal, cfg.target_risk)
    if cfg.target_risk is not None and summary["selective"]["threshold"] is None:
        run.say(f"note: no abstain threshold keeps the risk <= {cfg.target_risk:g} on this validation split")
    if masking is not None:
        updates, moved = masking.churn()
        summary |= {"mask_updates": updates, "mask_churn": moved / sum(masking.nnz.values())}
    write_outputs(run, product, product_masks, summary, logits[chosen]["test"])
    return summary


def averaged_model(run: Run, masks: dict[str, torch.Tensor]) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The weight-and-mask average with batch-norm statistics recomputed from training batches
    drawn as training draws them: shuffled and augmented (benchmarks/bn_recalibration.py and
    docs/results compare the choices). Its support: where the average is nonzero."""
    data = run.data
    averaged = copy.deepcopy(run.model)
    run.average.apply_to(averaged)
    recalibrate_bn(
        averaged, shuffled_batches(run.train_x, run.batch, run.cfg.seed, data.mean, data.std, data.pad, data.flip)
    )
    return averaged, run.average.support(masks)


def write_outputs(run: Run, product: nn.Module, masks: dict, summary: dict, test_logits: np.ndarray) -> None:
    """model.pt, predictions.npz and summary.json of the shipped model, and the closing line."""
    cfg, data, out = run.cfg, run.data, run.out
    runfiles.save_model_file(
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
    runfiles.save_predictions(out / "predictions.npz", test_logits, run.eval_y["test"], data.classes)
    runfiles.write_json(out / "summary.json", summary)
    t = summary["test"]
    run.say(
        f"test accuracy {t['accuracy']:.4f}  ece {t['ece']:.4f}  nll {t['nll']:.4f}  "
        f"temperature {summary['temperature']:.3f}  density {summary['actual_density']:.4f} "
        f"(target {cfg.density:g})\nresults in {out}/ (summary.json, model.pt, metrics.jsonl)"
    )
