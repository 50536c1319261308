"""Which tensors are masked and how many nonzeros each keeps (ERK or uniform).

Every convolution and linear weight is masked, the first conv and the classifier included;
biases and normalisation parameters stay dense.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cigl.errors import InputError
from cigl.tables import tensor_row

INITS = ("erk", "uniform")


def masked_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """name -> weight of every Conv and Linear module, in module order."""
    found = {}
    for module_name, module in model.named_modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            found[f"{module_name}.weight" if module_name else "weight"] = module.weight
    if not found:
        raise InputError("the model has no convolution or linear layers to sparsify")
    lazy = [name for name, p in found.items() if isinstance(p, nn.parameter.UninitializedParameter)]
    if lazy:
        raise InputError(f"{lazy[0]} is not initialised yet (a lazy layer): run one forward pass before sparsifying")
    return found


def erk_densities(shapes: dict[str, tuple[int, ...]], density: float) -> dict[str, float]:
    """Erdos-Renyi-Kernel: density_l = eps * sum(shape_l) / prod(shape_l), with eps chosen so the
    model's overall density is `density`; a layer that would exceed 1 is made dense and the
    remaining budget is spread over the others (repeated until no layer exceeds 1)."""
    numel = {n: math.prod(s) for n, s in shapes.items()}
    raw = {n: sum(s) / numel[n] for n, s in shapes.items()}
    budget = density * sum(numel.values())
    dense: set[str] = set()
    while True:
        rest = [n for n in shapes if n not in dense]
        eps = (budget - sum(numel[n] for n in dense)) / sum(raw[n] * numel[n] for n in rest)
        over = [n for n in rest if eps * raw[n] > 1.0]
        if not over:
            break
        dense.add(max(over, key=lambda n: raw[n]))
    return {n: 1.0 if n in dense else eps * raw[n] for n in shapes}


def layer_nnz(shapes: dict[str, tuple[int, ...]], density: float, init: str) -> dict[str, int]:
    """Nonzeros per masked tensor for overall `density` under `init` ('erk' or 'uniform')."""
    if not 0.0 < density <= 1.0:
        raise InputError(f"density must lie in (0, 1], got {density}")
    if init not in INITS:
        raise InputError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    dens = erk_densities(shapes, density) if init == "erk" else {n: density for n in shapes}
    return {n: max(1, min(math.prod(s), round(dens[n] * math.prod(s)))) for n, s in shapes.items()}


def random_masks(
    params: dict[str, torch.Tensor], nnz: dict[str, int], generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Boolean masks with exactly nnz[name] active entries, placed uniformly at random."""
    masks = {}
    for name, p in params.items():
        flat = torch.zeros(p.numel(), dtype=torch.bool)
        flat[torch.randperm(p.numel(), generator=generator)[: nnz[name]]] = True
        masks[name] = flat.view(p.shape).to(p.device)
    return masks


def layer_table(masks: dict[str, torch.Tensor]) -> list[dict]:
    """Per-layer rows (cigl.tables.tensor_row) for config.json and printing."""
    return [tensor_row(name, m.shape, int(m.sum())) for name, m in masks.items()]
