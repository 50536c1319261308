"""Models by name, in the spirit of timm's registry.

`create_model(name, num_classes=..., in_chans=..., image_size=...)` builds:
- the CIFAR networks registered here: `resnet20`, `resnet32`, `resnet56` (He et al., 2016,
  option-A shortcuts) and `wrn22_2` (Zagoruyko & Komodakis, 2016);
- any timm model; timm ResNets get a CIFAR stem (3x3 conv, stride 1, no max-pool) when the
  input is at most 64 px, so `resnet50` on CIFAR-10 is the reference's CIFAR ResNet-50.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cigl.errors import InputError

SMALL_INPUT = 64
_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    """Decorator: make a constructor available to `create_model` under `name`."""

    def add(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = fn
        return fn

    return add


def list_models() -> list[str]:
    """Names registered by cigl (every timm name is accepted as well)."""
    return sorted(_REGISTRY)


# --------------------------------------------------------------------------- CIFAR ResNet


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.stride, self.extra = stride, c_out - c_in

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        """Option A: subsample and zero-pad channels (no parameters)."""
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra:
            x = F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images: 16-32-64 channels, three stages of n blocks."""

    def __init__(self, depth: int, num_classes: int = 10, in_chans: int = 3):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, c_in = [], 16
        for stage, width in enumerate((16, 32, 64)):
            for i in range(n):
                layers.append(_BasicBlock(c_in, width, 2 if stage > 0 and i == 0 else 1))
                c_in = width
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


for _depth in (20, 32, 56):
    register(f"resnet{_depth}")(lambda depth=_depth, **kw: CifarResNet(depth, **kw))


# --------------------------------------------------------------------------- WideResNet


class _WideBlock(nn.Module):
    """Pre-activation block; a 1x1 conv shortcut where the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        y = self.conv1(o)
        y = self.conv2(F.relu(self.bn2(y)))
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Module):
    """WRN-depth-widen for small images (16, 16k, 32k, 64k channels)."""

    def __init__(self, depth: int = 22, widen: int = 2, num_classes: int = 10, in_chans: int = 3):
        super().__init__()
        n = (depth - 4) // 6
        widths = [16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False)
        blocks, c_in = [], 16
        for stage, width in enumerate(widths):
            for i in range(n):
                blocks.append(_WideBlock(c_in, width, 2 if stage > 0 and i == 0 else 1))
                c_in = width
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(c_in)
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.blocks(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


register("wrn22_2")(lambda **kw: WideResNet(22, 2, **kw))


# --------------------------------------------------------------------------- factory


def _cifar_stem(model: nn.Module, in_chans: int) -> nn.Module:
    """Replace a timm ResNet's 7x7/2 stem and max-pool by a 3x3/1 conv (CIFAR variant)."""
    old = model.conv1
    model.conv1 = nn.Conv2d(in_chans, old.out_channels, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


def check_model_name(name: str) -> None:
    """InputError unless `name` is a cigl or timm model."""
    if name in _REGISTRY:
        return
    import timm

    if not timm.is_model(name):
        raise InputError(
            f"unknown model {name!r}; use one of {', '.join(list_models())} or any timm model name "
            "(see timm.list_models())"
        )


def create_model(name: str, *, num_classes: int, in_chans: int = 3, image_size: int = 32) -> nn.Module:
    """Build a model by name; `num_classes` always comes from the dataset."""
    check_model_name(name)
    if name in _REGISTRY:
        return _REGISTRY[name](num_classes=num_classes, in_chans=in_chans)
    import timm

    kw = {"pretrained": False, "num_classes": num_classes, "in_chans": in_chans}
    try:  # models built for one input size (ViTs, ...) take it as img_size
        model = timm.create_model(name, img_size=image_size, **kw)
    except TypeError:
        model = timm.create_model(name, **kw)
    except (AssertionError, ValueError, RuntimeError) as exc:
        raise InputError(_size_error(name, image_size, exc)) from None
    from timm.models.resnet import ResNet

    if isinstance(model, ResNet) and isinstance(model.conv1, nn.Conv2d) and image_size <= SMALL_INPUT:
        model = _cifar_stem(model, in_chans)
    _check_input_size(model, name, in_chans, image_size)
    return model


def _size_error(name: str, image_size: int, exc: Exception) -> str:
    reason = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
    return (
        f"timm model {name!r} cannot take {image_size} x {image_size} images ({reason}); "
        "pass --image-size with a size it takes (e.g. 224) or choose another --model"
    )


@torch.no_grad()
def _check_input_size(model: nn.Module, name: str, in_chans: int, image_size: int) -> None:
    """One forward pass of two blank images, so a timm model that cannot take this input size
    fails here with the fix rather than as a traceback in the first training step."""
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(2, in_chans, image_size, image_size))
    except (AssertionError, ValueError, RuntimeError) as exc:
        raise InputError(_size_error(name, image_size, exc)) from None
    finally:
        model.train(was_training)
