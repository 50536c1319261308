"""Corrupted copies of images for the distribution-shift audit (numpy + Pillow, no torch).

A CIFAR-10-C-style set (Hendrycks & Dietterich, ICLR 2019): each corruption at 5 severities,
with the parameters of their CIFAR-10-C generation script, applied to uint8 images (N, H, W, C)
at the model's input size. Deterministic: the random draws of (corruption, severity) come from
a generator seeded by their names and `seed`, so the same call gives the same bytes.

Not reproduced (they need assets or heavy dependencies): motion and glass blur, snow, frost,
fog, elastic transform.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageFilter

from cigl.errors import InputError

SEVERITIES = (1, 2, 3, 4, 5)

# per-corruption parameters at severities 1..5 (CIFAR-10-C)
GAUSSIAN_NOISE = (0.04, 0.06, 0.08, 0.09, 0.10)  # std of additive noise on [0, 1] pixels
SHOT_NOISE = (500, 250, 100, 75, 50)  # photons per unit intensity (Poisson)
IMPULSE_NOISE = (0.01, 0.02, 0.03, 0.05, 0.07)  # share of salt-and-pepper pixels
SPECKLE_NOISE = (0.06, 0.10, 0.12, 0.16, 0.20)  # std of multiplicative noise
GAUSSIAN_BLUR = (0.4, 0.6, 0.7, 0.8, 1.0)  # blur sigma in pixels
CONTRAST = (0.75, 0.5, 0.4, 0.3, 0.15)  # factor on the distance from the image mean
BRIGHTNESS = (0.05, 0.1, 0.15, 0.2, 0.3)  # added to the HSV value channel
JPEG_QUALITY = (80, 65, 58, 50, 40)
PIXELATE = (0.95, 0.9, 0.85, 0.75, 0.65)  # share of the side kept before scaling back up


def _unit(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float64) / 255.0


def _uint8(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def _per_image(x: np.ndarray, fn: Callable[[Image.Image], Image.Image]) -> np.ndarray:
    """Apply a PIL operation to every image of (N, H, W, C) uint8 (C = 1 or 3)."""
    gray = x.shape[3] == 1
    out = [np.asarray(fn(Image.fromarray(img[..., 0] if gray else img))) for img in x]
    return np.stack(out)[..., None] if gray else np.stack(out)


def gaussian_noise(x, s, rng):
    return _uint8(_unit(x) + rng.normal(size=x.shape, scale=GAUSSIAN_NOISE[s - 1]))


def shot_noise(x, s, rng):
    c = SHOT_NOISE[s - 1]
    return _uint8(rng.poisson(_unit(x) * c) / c)


def impulse_noise(x, s, rng):
    out = x.copy()
    hit = rng.random(x.shape) < IMPULSE_NOISE[s - 1]
    out[hit] = np.where(rng.random(int(hit.sum())) < 0.5, 0, 255)
    return out


def speckle_noise(x, s, rng):
    u = _unit(x)
    return _uint8(u + u * rng.normal(size=x.shape, scale=SPECKLE_NOISE[s - 1]))


def gaussian_blur(x, s, _rng):
    return _per_image(x, lambda im: im.filter(ImageFilter.GaussianBlur(GAUSSIAN_BLUR[s - 1])))


def contrast(x, s, _rng):
    u = _unit(x)
    mean = u.mean(axis=(1, 2, 3), keepdims=True)
    return _uint8((u - mean) * CONTRAST[s - 1] + mean)


def brightness(x, s, _rng):
    if x.shape[3] == 1:
        return _uint8(_unit(x) + BRIGHTNESS[s - 1])

    def brighten(im: Image.Image) -> Image.Image:
        hsv = np.asarray(im.convert("HSV")).astype(np.float64)
        hsv[..., 2] = np.clip(hsv[..., 2] + 255.0 * BRIGHTNESS[s - 1], 0, 255)
        return Image.fromarray(hsv.round().astype(np.uint8), "HSV").convert("RGB")

    return _per_image(x, brighten)


def jpeg_compression(x, s, _rng):
    def recompress(im: Image.Image) -> Image.Image:
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=JPEG_QUALITY[s - 1])
        return Image.open(io.BytesIO(buf.getvalue())).convert(im.mode)

    return _per_image(x, recompress)


def pixelate(x, s, _rng):
    h, w = x.shape[1:3]
    small = (max(1, round(w * PIXELATE[s - 1])), max(1, round(h * PIXELATE[s - 1])))
    return _per_image(x, lambda im: im.resize(small, Image.Resampling.BOX).resize((w, h), Image.Resampling.BOX))


CORRUPTIONS: dict[str, Callable[[np.ndarray, int, np.random.Generator], np.ndarray]] = {
    f.__name__: f
    for f in (
        gaussian_noise,
        shot_noise,
        impulse_noise,
        speckle_noise,
        gaussian_blur,
        contrast,
        brightness,
        jpeg_compression,
        pixelate,
    )
}


def corrupt(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """`images` (N, H, W, C) uint8, C = 1 or 3, with corruption `name` at `severity` 1..5."""
    if name not in CORRUPTIONS:
        raise InputError(f"unknown corruption {name!r}; choose one of {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise InputError(f"severity must be 1..5, got {severity}")
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] not in (1, 3):
        raise InputError(f"images must be uint8 (N, H, W, 1 or 3), got {images.dtype} {images.shape}")
    rng = np.random.default_rng([zlib.crc32(name.encode()), severity, seed])
    return CORRUPTIONS[name](images, severity, rng)
