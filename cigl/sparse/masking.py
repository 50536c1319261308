"""The sparse state of a model during training: masks M, the random mask R and updates.

Each training step runs the model on effective weights w * mult, where mult = M * R * scale
lives in one flat buffer (per-layer views), so the random mask is applied and undone with a
single index write of O(nnz/DPNUM) entries. Gradients reaching w are therefore zero outside
M and at dropped entries; parameters stay exactly zero outside M.
"""

from __future__ import annotations

import torch
from torch import nn

from cigl.sparse import random_mask
from cigl.sparse.allocation import layer_nnz, layer_table, masked_parameters, random_masks
from cigl.sparse.method import Method, drop_and_grow
from cigl.sparse.schedule import drop_fraction, is_update_step


class Masking:
    """Masks of every conv/linear weight of `model`, updated by `method` on RigL's schedule."""

    def __init__(
        self,
        model: nn.Module,
        method: Method,
        *,
        density: float,
        init: str = "erk",
        alpha: float = 0.3,
        update_every: int = 100,
        update_end: int = 0,
        dpnum: int | None = None,
        seed: int = 0,
    ) -> None:
        self.params = masked_parameters(model)
        self.method = method
        self.alpha, self.update_every, self.update_end = alpha, update_every, update_end
        if dpnum is not None:
            random_mask.check_dpnum(dpnum)
        self.dpnum = dpnum
        self.scale = random_mask.scale(dpnum) if dpnum else 1.0
        shapes = {n: tuple(p.shape) for n, p in self.params.items()}
        self.nnz = layer_nnz(shapes, density, init)
        self.target_density = density
        self.masks = random_masks(self.params, self.nnz, torch.Generator().manual_seed(seed))
        device = next(iter(self.params.values())).device
        sizes = [p.numel() for p in self.params.values()]
        self._offsets = torch.tensor([0, *sizes], device=device).cumsum(0)
        self._mult = torch.empty(int(self._offsets[-1]), device=device)
        segments = torch.split(self._mult, sizes)
        self._mult_views = {
            n: seg.view(p.shape) for (n, p), seg in zip(self.params.items(), segments, strict=True)
        }
        self._dropped = torch.zeros(0, dtype=torch.long, device=device)
        self._saved: list[tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor]] = []
        self._refresh()
        self.apply_masks()

    # ------------------------------------------------------------------ state

    def _refresh(self) -> None:
        """Rebuild mult = M * scale and the flat list of active positions after a mask change."""
        for name, mask in self.masks.items():
            self._mult_views[name].copy_(mask).mul_(self.scale)
        self._active = torch.cat(
            [
                torch.nonzero(m.reshape(-1)).squeeze(1) + off
                for m, off in zip(self.masks.values(), self._offsets[:-1], strict=True)
            ]
        )

    @torch.no_grad()
    def apply_masks(self) -> None:
        for name, p in self.params.items():
            p.mul_(self.masks[name])

    def state_dict(self) -> dict:
        return {"masks": {n: m.clone() for n, m in self.masks.items()}}

    def load_state_dict(self, state: dict) -> None:
        for name, mask in state["masks"].items():
            self.masks[name].copy_(mask)
        self._refresh()

    def table(self) -> list[dict]:
        return layer_table(self.masks)

    def density(self) -> float:
        nnz = sum(int(m.sum()) for m in self.masks.values())
        return nnz / sum(m.numel() for m in self.masks.values())

    # ------------------------------------------------------------------ a training step

    def is_update_step(self, step: int) -> bool:
        return self.method.updates and is_update_step(step, self.update_every, self.update_end)

    def effective_weights(self, step_random: bool, keep_grad: bool = False) -> dict[str, torch.Tensor]:
        """name -> w * M * R * scale for a forward pass. With `step_random`, a fresh R is drawn
        (kept until `restore`); with `keep_grad`, the tensors keep their (dense) gradients."""
        if step_random and self.dpnum:
            pos = random_mask.sample_dropped(self._active.numel(), self.dpnum, self._active.device)
            self._dropped = self._active[pos]
            self._mult[self._dropped] = 0.0
        weights = {}
        for name, p in self.params.items():
            w = p * self._mult_views[name]
            if keep_grad:
                w.retain_grad()
            weights[name] = w
        return weights

    @torch.no_grad()
    def hold_dropped(self) -> None:
        """Remember the dropped weights' values before the optimiser step (which would move them
        through momentum and weight decay)."""
        self._saved = []
        if not self.dpnum or self._dropped.numel() == 0:
            return
        counts = torch.searchsorted(self._dropped, self._offsets).diff().tolist()
        chunks = torch.split(self._dropped, counts)
        for p, chunk, off in zip(self.params.values(), chunks, self._offsets[:-1], strict=True):
            if chunk.numel():
                index = torch.unravel_index(chunk - off, p.shape)
                self._saved.append((p, index, p[index].clone()))

    @torch.no_grad()
    def restore_dropped(self) -> None:
        """Put the dropped weights back as they were and undo R in the multiplier."""
        for p, index, values in self._saved:
            p[index] = values
        self._saved = []
        if self.dpnum and self._dropped.numel():
            self._mult[self._dropped] = self.scale

    @torch.no_grad()
    def update(
        self, step: int, dense_grads: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer
    ) -> None:
        """Drop and grow in every layer; new and dropped weights (and their momentum) become 0."""
        frac = drop_fraction(step, self.alpha, self.update_end)
        for name, p in self.params.items():
            mask = self.masks[name]
            n = int(frac * self.nnz[name])
            if n == 0:
                continue
            scores = self.method.grow_scores(p, dense_grads.get(name))
            new = drop_and_grow(p, mask, scores, n)
            cleared = ~new | (new & ~mask)
            p.masked_fill_(cleared, 0.0)
            buf = optimizer.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                buf.masked_fill_(cleared, 0.0)
            mask.copy_(new)
        self._refresh()
        if self.dpnum:
            self._dropped = self._dropped[:0]

    @torch.no_grad()
    def snapshot(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Every parameter of `model`, masked ones as the effective weights of the last step."""
        if self.dpnum and self._dropped.numel():
            self._mult[self._dropped] = 0.0
        eff = {n: p * self._mult_views[n] for n, p in self.params.items()}
        if self.dpnum and self._dropped.numel():
            self._mult[self._dropped] = self.scale
        return {n: eff.get(n, p).detach().clone() for n, p in model.named_parameters()}
