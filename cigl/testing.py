"""Fabricated run products for tests and benchmarks: a model.pt exactly as cigl-train writes it,
without the training (torch)."""

from __future__ import annotations

from pathlib import Path

import torch

from cigl.models import create_model
from cigl.runfiles import save_model_file
from cigl.sparse import Masking


def fake_model_file(  # noqa: PLR0913 (keyword-only: what a test varies)
    path: Path,
    arch: str,
    *,
    density: float = 0.1,
    in_chans: int = 3,
    image_size: int = 32,
    classes: list[str] | None = None,
    temperature: float = 1.0,
    dataset: str = "digits",
    data_dir: str | None = None,
) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """Write a model.pt of an untrained `arch` with ERK masks at `density` (seeded, so the same
    every time), batch norms that look trained (non-default scales and statistics: timm
    zero-initialises some BN weights, which would fold into all-zero, deduplicated ONNX
    convolutions), a temperature and a config naming the dataset export checks against.
    Returns (model, masks)."""
    classes = classes or [str(i) for i in range(10)]
    torch.manual_seed(0)
    model = create_model(arch, num_classes=len(classes), in_chans=in_chans, image_size=image_size)
    masks = Masking(model, "rigl", density=density).masks
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_model_file(
        path,
        arch=arch,
        model=model,
        masks=masks,
        classes=classes,
        mean=(0.5,) * in_chans,
        std=(0.25,) * in_chans,
        in_chans=in_chans,
        image_size=image_size,
        temperature=temperature,
        method="rigl",
        config={"dataset": dataset, "data_dir": data_dir, "density": density},
        summary={"target_density": density, "test": {"accuracy": 0.5, "ece": 0.1, "nll": 1.2}},
    )
    return model, masks
