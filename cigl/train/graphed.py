"""The training step as one CUDA graph, replayed.

An eager step of a CIFAR-sized model is bound by the host: each of its few hundred kernels
(gather and augment the batch, forward, backward, sparse bookkeeping, SGD) is a launch from
Python, and the GPU idles between them. Captured once as a CUDA graph, the whole step is one
launch; per step the host copies in the batch's indices and the learning rate, which the graph
reads from device tensors.

The first WARMUP steps run eagerly (cuDNN/cuBLAS set-up, the momentum buffers). Mask-update steps
(the dense gradient, drop and grow, no SGD) are a second graph, captured at the second such step
(the first runs eagerly): the host sets the update's share on the device
(`Masking.schedule_update`) before each replay, and the replay changes the masks, the gradient
multiplier and the random mask's active positions in place, so the replays after it use the new
masks. Run eagerly, an update cost about 5.5 graphed steps of ResNet-50 on an H100 (61 vs 11 ms
at e44da82), which held the step ratio with updates every 100 steps at 1.06. Randomness is
graph-safe: a replay draws from the CUDA generator's state at replay time, which the loop re-seeds
from (seed, step) before every step, so a graphed run is deterministic too.

If capturing fails, that kind of step runs eagerly from then on, with a one-line note;
`--no-cuda-graph` turns both graphs off.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

import torch

WARMUP = 3  # eager steps before the capture
UPDATE_WARMUP = 1  # eager mask-update steps before theirs (the SGD steps' warm-up set the rest up)

# bf16 autocast for a captured step: with its cache of cast weights, the casts would be made once
# at capture, in memory the replays do not refresh
graph_autocast = functools.partial(torch.autocast, "cuda", torch.bfloat16, cache_enabled=False)


class GraphSGD:
    """torch.optim.SGD's update (momentum, weight decay; no dampening, no Nesterov: the trainer's
    optimiser) on that optimiser's own parameters and momentum buffers, with the learning rate
    read from a device tensor. In a graph, SGD's float lr would be frozen at capture, and SGD with
    a tensor lr reads it back to the host."""

    def __init__(self, optimizer: torch.optim.SGD, lr: torch.Tensor) -> None:
        (group,) = optimizer.param_groups
        if group["dampening"] or group["nesterov"] or group["maximize"]:
            raise ValueError("GraphSGD implements SGD without dampening, Nesterov or maximize")
        self.params = [p for p in group["params"] if p.requires_grad]
        self.momentum, self.wd, self.lr = group["momentum"], group["weight_decay"], lr
        if self.momentum:  # torch's first step sets buf = grad, as buf = 0 * momentum + grad does
            for p in self.params:
                optimizer.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
        self.state = optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:  # noqa: ARG002 (always to None, as the trainer asks)
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        params = [p for p in self.params if p.grad is not None]
        step = [p.grad for p in params]
        if self.wd:
            step = torch._foreach_add(step, params, alpha=self.wd)
        if self.momentum:
            bufs = [self.state[p]["momentum_buffer"] for p in params]
            torch._foreach_mul_(bufs, self.momentum)
            torch._foreach_add_(bufs, step)
            step = bufs
        torch._foreach_sub_(params, torch._foreach_mul(step, self.lr))


class GraphedStep:
    """Replays `body(idx, optimizer, step)`, the training step on the batch at indices `idx`
    (a device tensor the graph reads) stepping `optimizer`, captured at the call after WARMUP
    eager ones. The body gets a GraphSGD over `optimizer` that reads the learning rate from a
    device tensor too. With `schedule` (Masking.schedule_update), mask-update steps are replayed
    from a graph of their own, captured at the second one, after `schedule(step)`; without it
    they always run eagerly. The body's mask update must then leave the host's part to
    `schedule` (train_step(..., scheduled=True)).

    `step(idx, lr, step, update)` returns the step's loss, or None when the caller must run this
    step eagerly (during warm-up, or after a failed capture)."""

    def __init__(
        self,
        body: Callable[[torch.Tensor, GraphSGD, int], torch.Tensor],
        optimizer: torch.optim.SGD,
        batch: int,
        schedule: Callable[[int], None] | None = None,
    ) -> None:
        self.body, self.optimizer, self.schedule = body, optimizer, schedule
        device = optimizer.param_groups[0]["params"][0].device
        self.idx = torch.zeros(batch, dtype=torch.long, device=device)
        self.lr = torch.zeros((), device=device)
        # per kind of step (False: an SGD step, True: a mask update): its graph and loss output,
        # the steps run eagerly before its capture, and whether it runs eagerly for good (its
        # capture failed, or for mask updates: there is no schedule to run before a replay)
        self.graphs: dict[bool, torch.cuda.CUDAGraph] = {}
        self.losses: dict[bool, torch.Tensor] = {}
        self.eager = {False: 0, True: 0}
        self.failed = {False: False, True: schedule is None}

    @property
    def graph(self) -> torch.cuda.CUDAGraph | None:
        """The SGD step's graph, once captured."""
        return self.graphs.get(False)

    def step(self, idx: torch.Tensor, lr: float, step: int, update: bool = False) -> torch.Tensor | None:
        if self.failed[update]:
            return None
        if update not in self.graphs:
            if self.eager[update] < (UPDATE_WARMUP if update else WARMUP):
                self.eager[update] += 1
                return None
            self.capture(step, update)
            if self.failed[update]:
                return None
        self.idx.copy_(idx)
        self.lr.fill_(lr)
        if update:
            self.schedule(step)
        self.graphs[update].replay()
        return self.losses[update].clone()

    def capture(self, step: int, update: bool = False) -> None:
        """Record the step (nothing runs while recording); on failure, note it and run that kind
        of step eagerly."""
        kind = "mask-update step" if update else "step"
        try:
            graph = torch.cuda.CUDAGraph()
            sgd = GraphSGD(self.optimizer, self.lr)  # before capturing: it may create momentum buffers
            with torch.cuda.graph(graph):
                loss = self.body(self.idx, sgd, step)
        except Exception as exc:  # capture raises RuntimeError or backend errors; training goes on eagerly
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            print(
                f"note: CUDA graph capture of the {kind} failed ({reason}); it runs eagerly",
                file=sys.stderr,
                flush=True,
            )
            self.failed[update] = True
            return
        self.graphs[update], self.losses[update] = graph, loss
