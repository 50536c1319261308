"""One image preprocessing for training and serving (cigl.images), on real CIFAR-10 images."""

import os
import sys

import numpy as np
import pytest
import torch
from conftest import run_cli
from PIL import Image

from cigl.data import load_dataset
from cigl.images import MAX_PIXELS, PREPROCESS, load_image
from cigl.models import create_model
from cigl.pipeline import normalize, to_device
from cigl.serve.predictor import Predictor
from cigl.train import TrainConfig, train

EXPORT = os.path.join(os.path.dirname(sys.executable), "cigl-export")
SIZES = [(40, 24), (24, 56), (33, 33), (64, 48), (17, 29)]


@pytest.fixture(scope="module")
def mixed_sizes(tmp_path_factory, cifar_small):
    """The CIFAR slice re-saved at assorted non-square sizes (PNG, so no further JPEG loss)."""
    root = tmp_path_factory.mktemp("mixed")
    for split in ("train", "test"):
        for folder in sorted((cifar_small / split).iterdir()):
            (root / split / folder.name).mkdir(parents=True)
            for i, f in enumerate(sorted(folder.iterdir())):
                Image.open(f).resize(SIZES[i % len(SIZES)], Image.BICUBIC).save(root / split / folder.name / f"{i}.png")
    return root


def test_training_and_serving_see_the_same_pixels(tmp_path, mixed_sizes):
    """Trained with --image-size on mixed sizes, exported: the ONNX model through cigl's serving
    path gives the predictions torch gives on the training pipeline's decoding of the same files."""
    out = tmp_path / "run"
    train(
        TrainConfig(
            dataset="imagefolder",
            data_dir=str(mixed_sizes),
            image_size=24,
            method="dense",
            epochs=2,
            batch_size=64,
            out=str(out),
        ),
        quiet=True,
    )
    assert run_cli(EXPORT, str(out / "model.pt")).returncode == 0
    data = load_dataset("imagefolder", mixed_sizes, val_size=0, image_size=24)
    ckpt = torch.load(out / "model.pt", weights_only=True)
    model = create_model("resnet20", **ckpt["model_kwargs"]).eval()
    model.load_state_dict(ckpt["state_dict"])
    x, _ = to_device(data.test, torch.device("cpu"))
    with torch.no_grad():
        reference = torch.softmax(model(normalize(x, data.mean, data.std)) / ckpt["temperature"], 1).numpy()

    predictor = Predictor(out / "model.onnx", device="cpu")
    assert predictor.card.raw["preprocess"] == PREPROCESS
    files = sorted(f for folder in sorted((mixed_sizes / "test").iterdir()) for f in folder.iterdir())
    files = sorted(files, key=lambda f: (f.parent.name, f.name))
    images = np.stack([predictor.load_image(f) for f in files])
    assert np.array_equal(images, data.test.x)  # the very same pixels
    _, probs = predictor.predict(predictor.normalize(images))
    assert np.array_equal(probs.argmax(1), reference.argmax(1))
    assert np.abs(probs - reference).max() < 1e-4


def test_cover_resize_keeps_the_aspect_ratio(tmp_path):
    """A 2:1 image is scaled to cover the target and its centre kept, not squashed."""
    arr = np.zeros((20, 40), np.uint8)
    arr[:, 10:30] = 255  # a white centre square-ish band in a wide image
    Image.fromarray(arr).save(tmp_path / "wide.png")
    out = load_image(tmp_path / "wide.png", 1, (10, 10))[..., 0]
    assert out.shape == (10, 10) and out[:, 1:-1].min() == 255  # the crop is the white centre
    assert out.min() > 128  # squashed to 10 x 10, the black quarters on either side would be ~0


def test_oversized_images_are_refused_before_decoding(tmp_path):
    Image.new("1", (MAX_PIXELS // 1000 + 1, 1000)).save(tmp_path / "big.png")
    with pytest.raises(ValueError, match="pixels"):
        load_image(tmp_path / "big.png", 3, (32, 32))
