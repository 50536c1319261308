"""One image preprocessing for training and serving (numpy + Pillow, no torch).

Training decodes ImageFolder files with `load_image`, and cigl-predict, cigl-serve and
confidence-audit do the same through the model card's `preprocess` entry, so a model sees the
same pixels when it is trained and when it is served, for any image size and mode:

1. Open with Pillow, refusing images over MAX_PIXELS before they are decoded (image bombs).
   Animated images give their first frame.
2. Bring every mode to 8 bits per channel: 16-bit and 32-bit integer or float images (I;16, I,
   F) are scaled by 255/65535 when they use the 16-bit range (any value > 255) and kept as they
   are otherwise, so a 16-bit copy of an 8-bit image gives that 8-bit image back; negative,
   non-finite or > 65535 values are refused. Palette, alpha and CMYK images are converted by
   Pillow (alpha dropped).
3. Grayscale ("L") for a 1-channel model, RGB for a 3-channel one.
4. To H x W: resize so the image covers H x W with its aspect ratio kept (bilinear), then crop
   the centre (RESIZE).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from cigl.errors import InputError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}
MAX_SIDE = 4096  # largest model input height/width (training, export and model cards alike)
MAX_PIXELS = 40_000_000  # 40 megapixels (e.g. 8000 x 5000); a decoded RGB image is then <= 120 MB
RESIZE = "cover-resize-center-crop"  # the policy of step 4, recorded in the model card
PREPROCESS = f"cigl-images-v1:{RESIZE}"  # what the model card's `preprocess` entry names
_HIGH_BIT = ("I", "F")  # modes with more than 8 bits per channel: I;16*, I, I;32*, F


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def image_files(folder: Path) -> list[Path]:
    """The image files (by extension) under `folder` and its subfolders, sorted. Hidden files and
    folders are skipped: .DS_Store, macOS's ._name.jpg copies, .ipynb_checkpoints."""
    return sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not _hidden(p, folder)
    )


def class_folders(root: Path) -> list[Path]:
    """The class folders of an ImageFolder tree: `root`'s subfolders, sorted, hidden ones skipped
    (a Jupyter .ipynb_checkpoints is not a class)."""
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def check_preprocess(name: str, source: str) -> None:
    """Refuse a model whose card asks for a preprocessing this version does not implement."""
    if name != PREPROCESS:
        raise InputError(f"{source} expects image preprocessing {name!r}; this cigl implements {PREPROCESS!r}")


class UnreadableImage(InputError):
    """The file is no image, or a damaged one (truncated, corrupt): the caller knows the fix."""


@contextlib.contextmanager
def folder_images() -> Iterator[None]:
    """Around decoding the images of a data folder (training, the audit): an unreadable one
    fails naming it and the fix, where a single image (predict, serve) only names it."""
    try:
        yield
    except UnreadableImage as exc:
        raise InputError(f"{exc}; replace or remove that file (a data folder holds only images)") from None


def load_image(source: Any, channels: int, size: tuple[int, int] | None, name: str | None = None) -> np.ndarray:
    """Decode `source` (a path, a binary file object or a PIL.Image) to uint8 (H, W, channels).

    `size` = (H, W) resizes and centre-crops (step 4); None keeps the image's own size.
    Raises InputError naming the image for unreadable, oversized or unrepresentable images."""
    from PIL import Image, UnidentifiedImageError

    label = name or ("image" if isinstance(source, Image.Image) else str(source))
    try:
        if isinstance(source, Image.Image):
            return _prepare(source, channels, size, label)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own, lower limit applies
            with Image.open(source) as im:
                return _prepare(im, channels, size, label)
    except InputError:
        raise
    except Image.DecompressionBombError:
        raise InputError(f"cannot read image {label}: {_too_large_note()}") from None
    except UnidentifiedImageError:
        raise UnreadableImage(f"cannot read image {label}: not a decodable image file") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise UnreadableImage(f"cannot read image {label}: {exc}") from None


def _prepare(im, channels: int, size: tuple[int, int] | None, label: str) -> np.ndarray:
    """Steps 1-4 on an opened (not yet decoded) Pillow image."""
    width, height = im.size
    if width * height > MAX_PIXELS:
        raise InputError(_too_large(label, width, height))
    arr = _to_8bit(im, channels, label)
    return arr if size is None else _cover_crop(arr, size)


def _too_large(label: str, width: int, height: int) -> str:
    return f"image {label} is {width} x {height} = {width * height:,} pixels; {_too_large_note()}"


def _too_large_note() -> str:
    return f"images over {MAX_PIXELS:,} pixels are refused: downscale it first"


def _to_8bit(im, channels: int, label: str) -> np.ndarray:
    """uint8 (H, W, channels) of an opened Pillow image in any mode (steps 2 and 3)."""
    from PIL import Image

    if im.mode.startswith(_HIGH_BIT):
        values = np.asarray(im, dtype=np.float64)
        if values.size and (not np.isfinite(values).all() or values.min() < 0 or values.max() > 65535):
            raise InputError(
                f"cannot read image {label}: mode {im.mode} values outside 0..65535; save it as an 8- or 16-bit image"
            )
        if values.size and values.max() > 255:
            values = values * (255.0 / 65535.0)
        im = Image.fromarray(np.round(values).astype(np.uint8), mode="L")
    im = im.convert("L" if channels == 1 else "RGB")
    arr = np.asarray(im, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def convert_channels(x: np.ndarray, channels: int) -> np.ndarray:
    """Step 3 on decoded uint8 images (N, H, W, C): RGB to grayscale ("L", Pillow's weights) for a
    1-channel model, grayscale repeated for a 3-channel one; unchanged when C == channels."""
    from PIL import Image

    if x.shape[3] == channels:
        return x
    if channels == 1:
        gray = [np.asarray(Image.fromarray(img).convert("L"), dtype=np.uint8) for img in x]
        return np.stack(gray)[..., None] if len(x) else np.zeros((*x.shape[:3], 1), np.uint8)
    return np.repeat(x, channels, axis=3)


def resize_images(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Step 4 on decoded uint8 images (N, H, W, C), e.g. datasets stored as arrays (digits, the
    CIFAR-10 python batches), so `--image-size` means the same for them as for image files."""
    if x.shape[1:3] == size:
        return x
    return np.stack([_cover_crop(img, size) for img in x]) if len(x) else np.zeros((0, *size, x.shape[3]), np.uint8)


def _cover_crop(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize (bilinear) so the image covers `size` = (H, W) with its aspect ratio kept, then crop
    the centre (step 4)."""
    from PIL import Image

    h, w = size
    if arr.shape[:2] == (h, w):
        return arr
    im = Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)
    scale = max(w / im.size[0], h / im.size[1])
    im = im.resize((max(w, round(im.size[0] * scale)), max(h, round(im.size[1] * scale))), Image.BILINEAR)
    left, top = (im.size[0] - w) // 2, (im.size[1] - h) // 2
    out = np.asarray(im.crop((left, top, left + w, top + h)), dtype=np.uint8)
    return out[..., None] if out.ndim == 2 else out
