import pytest
import torch

from cigl.errors import InputError
from cigl.models import create_model, list_models


@pytest.mark.parametrize("name", ["resnet20", "resnet32", "wrn22_2", "resnet18"])
@pytest.mark.parametrize("size,chans", [(8, 1), (32, 3)])
def test_small_inputs(name, size, chans):
    model = create_model(name, num_classes=7, in_chans=chans, image_size=size).eval()
    with torch.no_grad():
        assert model(torch.randn(2, chans, size, size)).shape == (2, 7)


@pytest.mark.parametrize("name", ["resnet20", "resnet18"])
def test_224_inputs(name):
    model = create_model(name, num_classes=10, image_size=224).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 10)


def test_timm_resnet_gets_cifar_stem_only_for_small_inputs():
    small = create_model("resnet50", num_classes=10, image_size=32)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, torch.nn.Identity)
    big = create_model("resnet50", num_classes=10, image_size=224)
    assert big.conv1.kernel_size == (7, 7) and not isinstance(big.maxpool, torch.nn.Identity)
    assert small.fc.out_features == 10


def test_cifar_resnet_sizes():
    params = {n: sum(p.numel() for p in create_model(n, num_classes=10).parameters()) for n in ("resnet20", "resnet56")}
    assert 0.26e6 < params["resnet20"] < 0.28e6  # He et al.: 0.27M
    assert 0.84e6 < params["resnet56"] < 0.87e6  # 0.85M
    assert set(list_models()) >= {"resnet20", "resnet32", "resnet56", "wrn22_2"}


def test_other_timm_model_and_unknown_name():
    model = create_model("mobilenetv3_small_050", num_classes=4, image_size=32).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    with pytest.raises(InputError, match="unknown model 'no_such_net'"):
        create_model("no_such_net", num_classes=10)
