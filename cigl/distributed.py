"""Data-parallel training over processes started by torchrun: which process this is, its share
of each batch, and the check that every process holds the same sparse masks.

Every rank runs the whole training loop on 1/world of each global batch; DDP averages the dense
gradient over the ranks during backward, so each rank sees the same gradient and takes the same
optimiser step. The masks stay identical because everything that decides them is identical on
every rank: the averaged gradient (RigL's growth), the weights (drop), and torch's generator,
re-seeded from (seed, step) on every rank (the random mask R, SET's growth, augmentation).
Batch-norm statistics are per rank (DDP copies rank 0's to the others at each forward).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cigl.errors import InputError


@dataclass(frozen=True)
class Launch:
    """This process's place in a torchrun launch (rank 0 of 1 when started without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 alone prints, evaluates and writes the run directory."""
        return self.rank == 0


def from_env() -> Launch:
    """The launch torchrun describes in RANK, WORLD_SIZE and LOCAL_RANK."""
    try:
        launch = Launch(
            rank=int(os.environ.get("RANK", 0)),
            world=int(os.environ.get("WORLD_SIZE", 1)),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        )
    except ValueError:
        raise InputError(
            "RANK, WORLD_SIZE and LOCAL_RANK must be integers; start several processes with torchrun"
        ) from None
    if launch.world < 1 or not 0 <= launch.rank < launch.world:
        raise InputError(f"RANK={launch.rank} is not in [0, WORLD_SIZE={launch.world}); launch with torchrun")
    return launch


def device_for(launch: Launch, cuda: bool) -> torch.device:
    """cuda:LOCAL_RANK (one GPU per process) or the CPU."""
    if not cuda:
        return torch.device("cpu")
    if launch.local_rank >= torch.cuda.device_count():
        raise InputError(
            f"process {launch.local_rank} of this machine has no GPU ({torch.cuda.device_count()} visible): "
            "start at most one process per GPU (torchrun --nproc-per-node) or pass --device cpu"
        )
    return torch.device("cuda", launch.local_rank)


@contextmanager
def process_group(launch: Launch, device: torch.device) -> Iterator[None]:
    """torch.distributed for the duration of a run with several processes: NCCL between GPUs,
    gloo between CPU processes. Without torchrun (world 1) nothing is set up."""
    if launch.world == 1:
        yield
        return
    # torch.distributed.nn (imported by timm) binds the default group as a default argument at
    # import: imported after init_process_group it would keep the group, and gloo's threads,
    # alive until interpreter shutdown, where they can abort the exiting process (SIGABRT)
    import torch.distributed.nn

    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=launch.rank, world_size=launch.world)
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def leave() -> None:
    """End the collective part of a run on every rank together: wait for all, then close the
    group while the interpreter is fully alive (its threads are joined here, not at exit)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def shard(batch: torch.Tensor, launch: Launch) -> torch.Tensor:
    """This rank's contiguous 1/world of a global batch (the ranks' shares never overlap)."""
    per = batch.shape[0] // launch.world
    return batch[launch.rank * per : (launch.rank + 1) * per]


def mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over all ranks (the tensor itself when training alone)."""
    if not dist.is_initialized():
        return value
    total = value.clone()
    dist.all_reduce(total)
    return total / dist.get_world_size()


def mask_checksum(masks: dict[str, torch.Tensor]) -> torch.Tensor:
    """Two int64 numbers that change when any mask entry does: the number of active entries and
    a sum of hashed positions (Knuth's multiplicative hash over the concatenated masks)."""
    nnz, hashed, offset = 0, 0, 0
    for mask in masks.values():
        pos = torch.nonzero(mask.reshape(-1)).squeeze(1) + offset
        nnz += pos.numel()
        hashed += int(((pos * 2654435761) % 2**32).sum())
        offset += mask.numel()
    return torch.tensor([nnz, hashed], dtype=torch.int64)


class MaskDivergenceError(RuntimeError):
    """The ranks disagree on the masks: a bug, so training stops rather than drifting apart."""


def check_same_masks(masks: dict[str, torch.Tensor], step: int) -> None:
    """All-reduce the masks' checksum (min and max over ranks) and fail loudly if they differ."""
    if not dist.is_initialized():
        return
    device = next(iter(masks.values())).device
    local = mask_checksum(masks).to(device)
    low, high = local.clone(), local.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise MaskDivergenceError(
            f"rank {dist.get_rank()}: the sparse masks differ between the {dist.get_world_size()} processes "
            f"after the mask update at step {step} (checksums range {low.tolist()} .. {high.tolist()}); "
            "training stopped because the ranks would train different networks"
        )
