"""Datasets as uint8 arrays, decoded once and cached (numpy and pillow only, no torch).

Sources: scikit-learn's bundled digits, CIFAR-10 (ImageFolder JPEGs or the standard
`cifar-10-batches-py` folder) and any ImageFolder (train/ and test/, one folder per class).
Images are held as uint8 (N, H, W, C); decoded image folders are cached on disk under a key
derived from the files' content, so a second run skips decoding and a changed file rebuilds.
Training turns them into batches with cigl.pipeline; serving and auditing use them directly.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import os
import pickle
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from cigl.errors import CiglError, FormatError, InputError
from cigl.images import class_folders, folder_images, image_files, load_image, resize_images
from cigl.io import atomic_save_npz

DATASETS = ("digits", "cifar10", "imagefolder")
CIFAR10_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
_CACHE_VERSION = "2"  # 2: cigl.images preprocessing (cover-resize + centre crop, 16-bit scaled)


@dataclass
class Split:
    x: np.ndarray  # uint8 (N, H, W, C)
    y: np.ndarray  # int64 (N,)

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass
class Dataset:
    """Train/val/test splits plus what a model needs to know about its inputs."""

    name: str
    classes: list[str]
    train: Split
    val: Split
    test: Split
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pad: int  # random-crop padding used for training augmentation
    flip: bool  # random horizontal flips

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> int:
        return int(self.train.x.shape[1])

    @property
    def channels(self) -> int:
        return int(self.train.x.shape[3])


# --------------------------------------------------------------------------- splitting


def stratified_split(y: np.ndarray, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, held_out): `fraction` of every class held out, chosen by a seeded shuffle."""
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        held.append(idx[: round(fraction * idx.size)])
    held_out = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
    keep = np.setdiff1d(np.arange(y.size), held_out)
    return keep, held_out


def per_class_subset(y: np.ndarray, per_class: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of a class-balanced subset with `per_class` samples of each class."""
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        if idx.size < per_class:
            raise InputError(f"--train-per-class {per_class} but class {c} has only {idx.size} training images")
        chosen.append(rng.choice(idx, per_class, replace=False))
    return np.sort(np.concatenate(chosen))


# --------------------------------------------------------------------------- sources


def _digits_table() -> np.ndarray:
    """scikit-learn's digits as its (1797, 65) table: 64 pixels (0..16) and the label per row.
    Read from the file scikit-learn ships, without importing scikit-learn (2 s of a run's start),
    through load_digits where that file is not found."""
    spec = importlib.util.find_spec("sklearn")  # finds the package without running it
    if spec is None or spec.origin is None:
        raise InputError("the digits dataset comes with scikit-learn: pip install scikit-learn")
    shipped = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    if shipped.is_file():
        with gzip.open(shipped, "rt") as f:
            return np.loadtxt(f, delimiter=",", dtype=np.float64)
    from sklearn.datasets import load_digits

    d = load_digits()
    return np.column_stack([d.data, d.target])


def _digits() -> tuple[Split, Split, list[str]]:
    table = _digits_table()
    x = np.clip(table[:, :64].reshape(-1, 8, 8) * 16.0, 0, 255).astype(np.uint8)[..., None]  # 0..16 -> 0..255
    y = table[:, 64].astype(np.int64)
    train_idx, test_idx = stratified_split(y, 0.2, seed=0)
    return Split(x[train_idx], y[train_idx]), Split(x[test_idx], y[test_idx]), [str(i) for i in range(10)]


def _list_image_folder(root: Path, classes: list[str] | None = None) -> tuple[list[Path], np.ndarray, list[str]]:
    """(files, labels, class names) of an ImageFolder tree. With `classes` (the training
    classes), the folders may be a subset of them, labelled by name: a held-out split of a small
    dataset can lack a class (a warning says which); a folder training lacks is refused."""
    if not root.is_dir():
        raise InputError(f"folder not found: {root} (expected one subfolder per class)")
    found = [p.name for p in class_folders(root)]
    if not found:
        raise InputError(f"no class folders in {root}: put the images of each class in {root}/<class>/")
    names = found if classes is None else classes
    unknown = [name for name in found if name not in names]
    if unknown:
        raise InputError(
            f"class folders of {root} that the training data lacks: {', '.join(unknown)} (training classes: "
            f"{', '.join(names)}); remove them, or add them to the training folder and train again"
        )
    if len(found) < len(names):
        missing = ", ".join(name for name in names if name not in found)
        warnings.warn(f"{root} has no images of class {missing}; its metrics cover the other classes", stacklevel=3)
    files, labels = [], []
    for name in found:
        images = image_files(root / name)
        if not images:
            raise InputError(f"class folder {root / name} has no images; add images or remove the folder")
        files += images
        labels += [names.index(name)] * len(images)
    return files, np.asarray(labels, dtype=np.int64), names


def _decode(path: Path, image_size: int | None) -> np.ndarray:
    """uint8 (H, W, 3) by the preprocessing serving uses too (cigl.images)."""
    return load_image(path, 3, None if image_size is None else (image_size, image_size))


def _content_key(files: list[Path], root: Path, image_size: int | None, names: list[str]) -> str:
    """The cache key of a decoded folder: its files' paths and bytes, the image size, and the
    class names its labels index (a test/ folder lacking a class is labelled by train/'s)."""
    h = hashlib.sha256(f"cigl-images-v{_CACHE_VERSION}|{image_size}|{chr(10).join(names)}".encode())
    for f in files:
        h.update(str(f.relative_to(root)).encode())
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:32]


def cache_dir() -> Path:
    """Where decoded datasets are cached: $CIGL_CACHE, else ~/.cache/cigl."""
    return Path(os.environ.get("CIGL_CACHE", Path.home() / ".cache" / "cigl"))


def test_folder(root: Path) -> Path:
    """The class folders of held-out images under `root`: root/test of a dataset folder with
    train/ and test/, else root itself."""
    return root / "test" if (root / "test").is_dir() else root


def load_image_folder(
    root: Path, image_size: int | None = None, classes: list[str] | None = None
) -> tuple[Split, list[str]]:
    """Decode every image of an ImageFolder tree (cached by content) into a uint8 Split."""
    files, labels, found = _list_image_folder(root, classes)
    key = _content_key(files, root, image_size, found)
    cached = cache_dir() / f"images-{key}.npz"
    if cached.is_file():
        try:
            with np.load(cached, allow_pickle=False) as z:
                return Split(z["x"], z["y"]), found
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            pass  # a damaged cache file: decode again and replace it
    with folder_images():
        images = [_decode(f, image_size) for f in files]
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise InputError(
            f"images in {root} have mixed sizes ({', '.join(sorted(str(s[:2]) for s in shapes)[:4])}); "
            "pass --image-size N to resize them all to N x N"
        )
    split = Split(np.stack(images), labels)
    try:
        atomic_save_npz(cached, x=split.x, y=split.y)
    except (OSError, CiglError) as exc:  # a cache is a speed-up: without one the next run decodes again
        reason = getattr(exc, "strerror", None) or str(exc)
        warnings.warn(
            f"cannot write the image cache in {cache_dir()} ({reason}); the next run decodes the images "
            "again: set CIGL_CACHE to a writable folder",
            stacklevel=2,
        )
    return split, found


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: no code from the file runs."""

    _ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _cifar_batch(path: Path) -> Split:
    if not path.is_file():
        raise InputError(f"missing CIFAR-10 batch file {path}")
    try:
        d = _ArrayUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
        data = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return Split(np.ascontiguousarray(data), np.asarray(d[b"labels"], dtype=np.int64))
    except (pickle.UnpicklingError, KeyError, ValueError, TypeError, EOFError) as exc:
        raise FormatError(f"{path} is not a CIFAR-10 python batch: {exc}") from None


def _cifar10(root: Path, image_size: int | None) -> tuple[Split, Split, list[str]]:
    batches = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
    if (batches / "data_batch_1").is_file():
        parts = [_cifar_batch(batches / f"data_batch_{i}") for i in range(1, 6)]
        train = Split(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]))
        return train, _cifar_batch(batches / "test_batch"), list(CIFAR10_CLASSES)
    return _image_folder_pair(root, image_size)


ARCHIVES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".tar.bz2", ".zip")


def _layout_hint(root: Path) -> str:
    """What the user probably meant when `root` lacks train/ and test/: a folder inside it that
    has them, an archive still to extract, or class folders with no split."""
    parent = root.resolve().parent
    if (parent / "train").is_dir() and (parent / "test").is_dir():  # given one split of a dataset
        return f"; it is a split of {root.parent}, which has them: pass --data-dir {root.parent}"
    inside = sorted(p for p in root.iterdir() if (p / "train").is_dir() and (p / "test").is_dir())
    if inside:
        return f"; {inside[0]} has them: pass --data-dir {inside[0]}"
    archives = sorted(p.name for p in root.iterdir() if p.is_file() and p.name.lower().endswith(ARCHIVES))
    if archives:
        return f"; {archives[0]} is an archive: extract it (tar -xf {root / archives[0]}), pass the folder it makes"
    if any(p.is_dir() for p in root.iterdir()):
        train, test = root / "train", root / "test"
        return f"; if its folders are the classes, move them into {train} and a held-out share into {test}"
    return ""


def _image_folder_pair(root: Path, image_size: int | None) -> tuple[Split, Split, list[str]]:
    if root.is_file() and root.name.lower().endswith(ARCHIVES):
        raise InputError(f"{root} is an archive: extract it (tar -xf {root}) and pass the folder it makes")
    if not root.is_dir():
        raise InputError(f"data folder not found: {root}")
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise InputError(f"{root} needs train/ and test/ subfolders with one folder per class{_layout_hint(root)}")
    train, classes = load_image_folder(root / "train", image_size)
    test, _ = load_image_folder(root / "test", image_size, classes)
    if test.x.shape[1:] != train.x.shape[1:]:
        raise InputError(f"test images of {root} differ in size from train images; pass --image-size N")
    return train, test, classes


def _check_classes(classes: list[str], data_dir: str | Path | None) -> None:
    if len(classes) < 2:
        where = f" ({Path(data_dir) / 'train'})" if data_dir is not None else ""
        raise InputError(
            f"a classifier needs at least 2 classes; the training images{where} have {len(classes)}: "
            f"{', '.join(classes) or 'none'}"
        )


def _check_square(train: Split) -> None:
    """Models, model cards and serving take N x N inputs."""
    height, width = train.x.shape[1:3]
    if height != width:
        raise InputError(
            f"the images are {width} x {height} (width x height); cigl trains on square images: pass "
            f"--image-size N to resize and centre-crop them to N x N (e.g. --image-size {min(height, width)})"
        )


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    *,
    val_size: float = 0.1,
    image_size: int | None = None,
    train_per_class: int | None = None,
) -> Dataset:
    """Load a dataset by name. The val split is the data folder's val/ (one folder per class,
    as train/ and test/) when it has one, else a fixed, stratified `val_size` share of train."""
    if name not in DATASETS:
        raise InputError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if not 0 <= val_size < 1:
        raise InputError(f"--val-size must lie in [0, 1), got {val_size}")
    val = None
    if name == "digits":
        train, test, classes = _digits()
        mean, std, flip = (0.5,), (0.5,), False
    else:
        if data_dir is None:
            raise InputError(f"--dataset {name} needs --data-dir DIR")
        root = Path(data_dir)
        if name == "cifar10":
            train, test, classes = _cifar10(root, image_size)
            mean, std = CIFAR10_MEAN, CIFAR10_STD
        else:
            train, test, classes = _image_folder_pair(root, image_size)
            mean, std = (0.5,) * 3, (0.5,) * 3
        flip = True
        if (root / "val").is_dir():
            val, _ = load_image_folder(root / "val", image_size, classes)
            if val.x.shape[1:] != train.x.shape[1:]:
                raise InputError(f"val images of {root} differ in size from train images; pass --image-size N")
    _check_classes(classes, data_dir)
    if train_per_class is not None:
        sub = per_class_subset(train.y, train_per_class)
        train = Split(train.x[sub], train.y[sub])
    if image_size is not None:  # array sources (digits, CIFAR-10 batches) come at their own size
        train, test = (Split(resize_images(part.x, (image_size, image_size)), part.y) for part in (train, test))
        val = None if val is None else Split(resize_images(val.x, (image_size, image_size)), val.y)
    _check_square(train)
    pad = max(1, train.x.shape[1] // 8)
    if val is None:
        keep, held = stratified_split(train.y, val_size, seed=0)
        if keep.size == 0:
            raise InputError(
                f"--val-size {val_size:g} holds out all {held.size} training images for validation; "
                "lower --val-size or train on more images"
            )
        train, val = Split(train.x[keep], train.y[keep]), Split(train.x[held], train.y[held])
    return Dataset(
        name=name,
        classes=classes,
        train=train,
        val=val,
        test=test,
        mean=mean,
        std=std,
        pad=pad,
        flip=flip,
    )


def extract_archive_subset(archive: str | Path, dest: str | Path, per_class: dict[str, int]) -> Path:
    """Copy the first `per_class[split]` images of every class of an ImageFolder tarball
    (<root>/<split>/<class>/<file>, e.g. the offline CIFAR-10 copy) into `dest`."""
    import tarfile

    dest = Path(dest)
    seen: dict[tuple[str, str], int] = {}
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) != 4 or parts[1] not in per_class:
                continue
            key = (parts[1], parts[2])
            if seen.get(key, 0) >= per_class[parts[1]]:
                continue
            seen[key] = seen.get(key, 0) + 1
            target = dest / parts[1] / parts[2] / parts[3]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(member).read())
    return dest
