"""The sparse state of a model during training: masks M, the random mask R and mask updates.

Per step the work is O(nnz/DPNUM) plus one in-place pass over the gradients:

- Masked parameters hold u = scale * w, where w is the weight of the method and scale =
  DPNUM/(DPNUM-1) (1 without a random mask). The forward pass then needs w * R * scale = u * R,
  which is u with the dropped entries zeroed in place: no full-size multiply, no copy.
- SGD on u with gradient scale^2 * dL/du (and weight decay on u) moves w = u / scale exactly
  as SGD on w with dL/dw would (dL/dw = scale * dL/du). The gradient is multiplied in place by
  M * scale^2, with zeros at the dropped entries; this pass is also what keeps every weight
  outside M at exactly zero (no gradient, so no momentum there).
- A dropped entry is written back after the optimiser step, so it keeps its value.

The masked weights live in one flat buffer (each parameter a view of its piece, laid out as
before), so a step's dropped entries are one index list over all layers. They are drawn as
geometric gaps over the active entries with a fixed-size sample whose spare slots point at
scratch entries past the weights (random_mask.sample_dropped): O(nnz/DPNUM) work in a handful of
operators for any depth, no host-device synchronisation, nothing of data-dependent shape, so a
CUDA graph can capture the step and torch.compile traces it whole. One gradient multiply per
weight remains: about 12 bytes of memory traffic per weight and step.

`weights()` gives w (for evaluation and export), `snapshot()` the effective weights u * R of
the last step (for weight-and-mask averaging).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch import nn

from cigl.errors import InputError, is_int_in
from cigl.sparse import random_mask
from cigl.sparse.allocation import layer_nnz, layer_table, masked_parameters, random_masks
from cigl.sparse.method import Method, drop_and_grow
from cigl.sparse.schedule import cosine_drop_fraction, default_update_every, is_update_step, update_count


def shaped_views(buffer: torch.Tensor, like: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Consecutive pieces of a flat buffer as views with the shape and strides of each tensor
    in `like` (contiguous or channels_last), so foreach ops pair them element by element."""
    like = list(like)
    pieces = torch.split(buffer, [t.numel() for t in like])
    return [torch.as_strided(piece, t.shape, t.stride()) for piece, t in zip(pieces, like, strict=True)]


# model -> its current Masking: a new Masking on the same model ends the one before
_ATTACHED: weakref.WeakKeyDictionary[nn.Module, weakref.ref] = weakref.WeakKeyDictionary()


class Masking:
    """Masks of every conv/linear weight of `model`, updated by `method` on RigL's schedule.

    In your own training loop, give `total_steps` and call `step(optimizer)` in place of
    `optimizer.step()`: the random mask is then drawn at each training forward pass, masks are
    updated every `update_every` steps (default: 100, fewer on short runs, see
    cigl.sparse.schedule) until 75% of the steps, and `finalize()` leaves the trained weights.

    Args:
        model: any torch module with Conv/Linear layers (all their weights are masked).
        method: "static", "set", "rigl", "cigl" (= rigl with a random mask, dpnum 100) or a Method.
        density: share of weights kept overall (ERK or uniform per layer, `init`).
        total_steps: the loop's number of steps; sets the update schedule and turns on the
            automatic random mask. Without it (cigl's own trainer), `update_until` and
            `begin_step`/`mask_gradients`/`end_step`/`update` are driven by the caller.
        dpnum: random mask drop probability 1/dpnum (None: no random mask; "cigl": 100).

    Example:
        >>> import torch, cigl
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.Flatten(), torch.nn.Linear(288, 10))
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> masking = cigl.Masking(model, "cigl", density=0.2, total_steps=50)
        >>> for step in range(50):
        ...     x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
        ...     optimizer.zero_grad()
        ...     torch.nn.functional.cross_entropy(model(x), y).backward()
        ...     masking.step(optimizer)
        >>> masks = masking.finalize()
        >>> round(masking.density(), 2), masking.updates > 0
        (0.2, True)
    """

    def __init__(  # noqa: PLR0913 (keyword-only settings with defaults)
        self,
        model: nn.Module,
        method: Method | str = "rigl",
        *,
        density: float = 0.1,
        init: str = "erk",
        alpha: float = 0.3,
        update_every: int | None = None,
        update_until: int = 0,
        total_steps: int | None = None,
        dpnum: int | None = None,
        seed: int = 0,
    ) -> None:
        self.params = masked_parameters(model)
        if isinstance(method, str):
            from cigl.sparse import METHODS, PRESETS  # the registry imports this module

            if method not in PRESETS:
                raise InputError(f"method must be one of {', '.join(PRESETS)} or a Method, got {method!r}")
            base, default_dpnum = PRESETS[method]
            dpnum = default_dpnum if dpnum is None else dpnum
            method = METHODS[base]
        for name, value in (("total_steps", total_steps), ("update_every", update_every)):
            if value is not None and not is_int_in(value, 1):
                raise InputError(f"{name} must be an integer >= 1, got {value!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 <= alpha < 1:
            raise InputError(
                f"alpha (the share of a layer's weights exchanged per update) must lie in [0, 1), got {alpha!r}"
            )
        if total_steps is not None:
            update_until = update_until or int(0.75 * total_steps)
        update_every = update_every or (default_update_every(update_until) if total_steps else 100)
        self.method = method
        self.alpha, self.update_every, self.update_until = alpha, update_every, update_until
        self.updates = 0  # mask updates made so far
        device = next(iter(self.params.values())).device
        self._moved = torch.zeros((), dtype=torch.long, device=device)  # weights grown by them (no host sync)
        self._share = torch.zeros((), dtype=torch.float64, device=device)  # of each layer, exchanged by the next update
        if dpnum is not None:
            random_mask.check_dpnum(dpnum)
        self.dpnum = dpnum
        self.scale = random_mask.scale(dpnum) if dpnum else 1.0
        shapes = {n: tuple(p.shape) for n, p in self.params.items()}
        self.nnz = layer_nnz(shapes, density, init)
        # the most weights an update exchanges in a layer: the share never exceeds alpha
        self._most = {name: int(alpha * nnz) for name, nnz in self.nnz.items()}
        masks = random_masks(self.params, self.nnz, torch.Generator().manual_seed(seed))
        previous = _ATTACHED.get(model, lambda: None)()
        if previous is not None and not previous.finalized:  # e.g. a notebook cell run again
            previous.finalize()  # one Masking per model: its hook would refuse the weights moved below
        _ATTACHED[model] = weakref.ref(self)
        self._total, self._nactive = sum(p.numel() for p in self.params.values()), -1
        # the masks: views of one flat buffer laid out as the weights, so a refresh is one pass
        self._mask_flat = torch.empty(self._total, dtype=torch.bool, device=device)
        self.masks = dict(zip(self.params, shaped_views(self._mask_flat, self.params.values()), strict=True))
        for name, mask in self.masks.items():
            mask.copy_(masks[name])
        self._refresh()
        with torch.no_grad():
            for name, p in self.params.items():
                p.mul_(self.masks[name]).mul_(self.scale)
        self.steps = 0  # steps taken through step()
        self._drawn = False  # the random mask of the current step is applied
        self.finalized = False  # finalize() ended training: no more steps or mask updates
        self._hook = model.register_forward_pre_hook(self._draw) if total_steps and self.dpnum else None

    # ------------------------------------------------------------------ state

    def _home(self, size: int) -> torch.Tensor:
        """Move the masked weights into one flat buffer of `size` entries (zeros past them): each
        parameter becomes a view of its piece, with its own shape and strides, so optimisers,
        DDP and torch.compile keep seeing the same Parameter objects."""
        params = list(self.params.values())
        if len({id(p) for p in params}) < len(params):
            raise InputError("a weight is shared by several layers; Masking needs one weight per conv/linear layer")
        if len({(p.dtype, p.device) for p in params}) > 1:
            raise InputError("Masking needs all conv/linear weights in one dtype on one device; convert the model")
        buffer = torch.zeros(size, dtype=params[0].dtype, device=params[0].device)
        with torch.no_grad():
            for p, view in zip(params, shaped_views(buffer[: self._total], params), strict=True):
                view.copy_(p)
                p.data = view
        return buffer

    def _check_home(self) -> None:
        """Fail clearly if the weights no longer live in the flat buffer (the model was moved or
        converted after Masking was made, or Masking was finalized): steps would drop nothing."""
        if [p.data_ptr() for p in self.params.values()] != self._homes:
            raise InputError(
                "the model's weights were replaced after Masking was created (model.to(...), a new memory "
                "format) or Masking was finalized; create Masking after moving and converting the model"
            )

    def _allocate(self, active: int) -> None:
        """The step's buffers for `active` active entries (again if a mask edit changes the count;
        drop and grow never does): with a random mask the weights move into one flat buffer
        followed by the sample's scratch slots; the gradient multiplier; the active positions
        then the scratch slots (where each position of a sample points); the draw and the last
        step's dropped entries and their values."""
        device, dtype, total = self._moved.device, next(iter(self.params.values())).dtype, self._total
        spare = random_mask.sample_size(active, self.dpnum) if self.dpnum else 0
        self._nactive = active
        self._flat = self._home(total + spare) if self.dpnum else None
        self._homes = [p.data_ptr() for p in self.params.values()]  # where the step expects the weights
        self._grad_scale = torch.empty(total + spare, device=device)  # M * scale^2, 0 where dropped
        self._grad_views = shaped_views(self._grad_scale[:total], self.params.values())
        self._active = torch.empty(active + spare, dtype=torch.long, device=device)
        self._active[active:] = torch.arange(total, total + spare, device=device)
        self._gaps = torch.empty(spare, dtype=torch.float64, device=device)
        self._dropped = torch.empty(spare, dtype=torch.long, device=device)
        self._kept = torch.empty(spare, dtype=dtype, device=device)
        self._forget_dropped()

    def _refresh(self, count: int | None = None) -> None:
        """Rebuild the gradient multiplier and the active positions after a mask change (in
        place: a captured CUDA graph reads them). Only the random mask's draw reads the active
        positions, so without one there is nothing to find (and no host sync). `count`: the
        number of active entries when it is known (drop and grow keeps it): they are then
        found in a tensor of that size, with no host sync either."""
        active = None
        if self.dpnum:  # flat positions
            mask = self._mask_flat
            active = torch.nonzero(mask) if count is None else torch.nonzero_static(mask, size=count)
            active = active.squeeze(1)
        count = 0 if active is None else active.numel()
        if count != self._nactive:
            self._allocate(count)
        torch.mul(self._mask_flat, self.scale**2, out=self._grad_scale[: self._total])
        if active is not None:
            self._active[:count] = active

    def state_dict(self) -> dict:
        return {
            "masks": {n: m.clone() for n, m in self.masks.items()},
            "updates": self.updates,
            "moved": int(self._moved),
        }

    def load_state_dict(self, state: dict) -> None:
        for name, mask in state["masks"].items():
            self.masks[name].copy_(mask)
        self.updates = int(state.get("updates", 0))  # absent in checkpoints of cigl <= 0.1
        self._moved.fill_(int(state.get("moved", 0)))
        self._refresh()

    def churn(self) -> tuple[int, int]:
        """(mask updates so far, weights they moved): a moved weight is one grown where the mask
        was inactive, so moved / nnz is the share of the active weights that changed place."""
        return self.updates, int(self._moved)

    def table(self) -> list[dict]:
        return layer_table(self.masks)

    def density(self) -> float:
        nnz = sum(int(m.sum()) for m in self.masks.values())
        return nnz / sum(m.numel() for m in self.masks.values())

    @torch.no_grad()
    def weights(self) -> dict[str, torch.Tensor]:
        """name -> w = u / scale: the trained weights, for evaluation and saving."""
        return {n: p.detach() / self.scale for n, p in self.params.items()}

    @torch.no_grad()
    def snapshot(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Every parameter of `model`; masked ones as the effective weights u * R of the last step."""
        snap = {n: p.detach().clone() for n, p in model.named_parameters()}
        if self._flat is not None:  # a random mask, before finalize()
            effective = self._flat.index_fill(0, self._dropped, 0.0)[: self._total]
            for name, view in zip(self.params, shaped_views(effective, self.params.values()), strict=True):
                snap[name] = view
        return snap

    # ------------------------------------------------------------------ a training step

    def is_update_step(self, step: int) -> bool:
        return self.method.updates and is_update_step(step, self.update_every, self.update_until)

    def planned_updates(self) -> int:
        """How many mask updates the schedule makes in all (0 for a method whose masks never change)."""
        return update_count(self.update_every, self.update_until) if self.method.updates else 0

    @torch.no_grad()
    def begin_step(self) -> None:
        """Draw R and zero the dropped weights in place for the forward pass (values kept)."""
        if not torch.compiler.is_compiling():
            self._check_home()
        if not self.dpnum:
            return
        pos = random_mask.sample_dropped(self._nactive, self.dpnum, self._gaps)
        torch.index_select(self._active, 0, pos, out=self._dropped)
        torch.index_select(self._flat, 0, self._dropped, out=self._kept)
        self._flat.index_fill_(0, self._dropped, 0.0)
        self._grad_scale.index_fill_(0, self._dropped, 0.0)

    @torch.no_grad()
    def mask_gradients(self) -> None:
        """grad *= M * scale^2 (0 at dropped entries): the gradient of w, carried over to u."""
        pairs = [(p.grad, view) for p, view in zip(self.params.values(), self._grad_views, strict=True)]
        pairs = [(grad, view) for grad, view in pairs if grad is not None]
        if pairs:  # one foreach multiply over all layers
            torch._foreach_mul_([grad for grad, _ in pairs], [view for _, view in pairs])

    @torch.no_grad()
    def end_step(self) -> None:
        """Put the dropped weights back as they were before the step."""
        if self._flat is not None:
            self._flat.index_put_((self._dropped,), self._kept)
            self._grad_scale.index_fill_(0, self._dropped, self.scale**2)

    # ------------------------------------------------------------------ in a user's own loop

    def _draw(self, module: nn.Module, _inputs) -> None:
        """Forward pre-hook: draw the step's random mask at its first training forward pass."""
        if module.training and not self._drawn:
            self.begin_step()
            self._drawn = True

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """After loss.backward(), in place of optimizer.step(): mask the gradients and step (or, on
        a mask-update step, change the masks from the dense gradient and skip the step, as RigL
        does), then put the dropped weights back."""
        self._check_training()
        if self.is_update_step(self.steps):
            self.update(self.steps, optimizer)
        else:
            self.mask_gradients()
            optimizer.step()
            self.end_step()
        self.steps += 1
        self._drawn = False

    @torch.no_grad()
    def finalize(self) -> dict[str, torch.Tensor]:
        """End training: the parameters become the trained weights w (they held u = scale * w);
        returns the masks. The model is then an ordinary (sparse) torch model."""
        self._check_training()
        self.end_step()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        for name, w in self.weights().items():
            self.params[name].copy_(w)
        self.scale = 1.0
        self._refresh()
        self._forget_dropped()
        for p in self.params.values():  # each weight in its own memory again; the buffer goes
            p.data = p.data.clone()
        self._flat = None
        self.finalized = True
        return {n: m.clone() for n, m in self.masks.items()}

    def _check_training(self) -> None:
        if self.finalized:
            raise InputError(
                "Masking was finalized: training with it is over (its masks no longer change and "
                "weights are no longer masked); create a new Masking to train further"
            )

    @torch.no_grad()
    def update(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        """Drop and grow in every layer from the dense gradient in p.grad; new and dropped
        weights (and their momentum) become 0. The optimiser step is skipped, as in the reference.
        `schedule_update(step)` then `exchange(optimizer)`."""
        self.schedule_update(step)
        self.exchange(optimizer)

    def schedule_update(self, step: int) -> None:
        """The host's part of the mask update at `step`: count it and put its share of each layer
        (the cosine schedule) on the device, where `exchange` reads it. A CUDA graph that
        captured `exchange` replays after this has run."""
        self._check_training()
        self._share.fill_(cosine_drop_fraction(step, self.alpha, self.update_until))
        self.updates += 1

    @torch.no_grad()
    def exchange(self, optimizer: torch.optim.Optimizer) -> None:
        """The device's part of the mask update `schedule_update` set up: in each layer,
        floor(share * nnz) weights dropped and as many grown (`drop_and_grow` with a tensor
        count), the momentum of both cleared, the masks refreshed. No host-device
        synchronisation and nothing of data-dependent shape: a CUDA graph captures it."""
        self.end_step()
        new = self._mask_flat.clone()  # the new masks, laid out as the current ones
        for (name, p), layer in zip(self.params.items(), shaped_views(new, self.params.values()), strict=True):
            if self._most[name]:
                n = torch.floor(self._share * self.nnz[name])  # as int(share * nnz) in Python
                scores = self.method.grow_scores(p, p.grad)
                layer.copy_(drop_and_grow(p, self.masks[name], scores, n, self._most[name]))
        grown = new & ~self._mask_flat
        self._moved += grown.sum()
        cleared_views = shaped_views(~new | grown, self.params.values())
        for (name, p), cleared in zip(self.params.items(), cleared_views, strict=True):
            # grown and dropped weights, and their momentum, start at 0 (the rest outside the
            # masks is 0 already: no gradient reaches it)
            if self._most[name]:
                p.masked_fill_(cleared, 0.0)
                buf = optimizer.state.get(p, {}).get("momentum_buffer")
                if buf is not None:
                    buf.masked_fill_(cleared, 0.0)
        self._mask_flat.copy_(new)
        self._refresh(self._nactive)  # drop and grow keeps the number of active weights
        self._forget_dropped()

    def _forget_dropped(self) -> None:
        """No entry dropped until the next draw: the dropped list points at the scratch slots."""
        self._dropped.copy_(self._active[self._nactive :])
        self._kept.zero_()
