"""What confidence-audit audits: prediction files (.npz, .csv) loaded and checked, and exported
models run over labelled images (numpy, onnxruntime; no torch)."""

from __future__ import annotations

import csv
import math
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cigl import calibration as cal
from cigl.errors import FormatError, InputError
from cigl.images import class_folders, folder_images
from cigl.io import MAX_ARRAY_BYTES, npz_declared_bytes
from cigl.runfiles import export_hint
from cigl.serve.predictor import Predictor


@dataclass
class Predictions:
    name: str
    scores: np.ndarray
    labels: np.ndarray
    kind: str  # "logits" or "probs"
    classes: list[str] | None = None
    model: dict | None = None  # for an audited .onnx: its sparsity and recorded calibration
    predictor: Predictor | None = None  # for an audited .onnx: runs the shift and OOD checks
    images: np.ndarray | None = None  # for an audited .onnx: the uint8 images it was audited on


def _load_npz(path: Path) -> tuple[np.ndarray, np.ndarray, str, list[str] | None]:
    unreadable = (OSError, ValueError, zipfile.BadZipFile, EOFError)
    try:
        declared = npz_declared_bytes(path)  # checked before np.load decompresses anything
    except unreadable as exc:
        raise FormatError(f"{path} is not a readable .npz file ({exc})") from None
    if declared > MAX_ARRAY_BYTES:
        raise InputError(f"{path} declares {declared:,} bytes of arrays, over the limit of {MAX_ARRAY_BYTES:,}")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except unreadable as exc:
        raise FormatError(f"{path} is not a readable .npz file ({exc})") from None
    kind = "logits" if "logits" in arrays else "probs" if "probs" in arrays else None
    if kind is None or "labels" not in arrays:
        raise FormatError(f"{path} needs arrays 'labels' and 'logits' or 'probs'; it has {sorted(arrays)}")
    classes = [str(c) for c in arrays["classes"]] if "classes" in arrays else None
    labels = arrays["labels"]
    if labels.dtype.kind in "US":  # class names as labels, as a CSV may hold them
        labels = _indices_of_names(path, labels.astype(str), classes)
    return arrays[kind], labels, kind, classes


def _indices_of_names(path: Path, names: np.ndarray, classes: list[str] | None) -> np.ndarray:
    """Class indices of labels given as class names, looked up in the file's `classes` array."""
    if classes is None:
        raise FormatError(
            f"{path}: 'labels' holds class names but there is no 'classes' array naming the score columns; "
            "add one or save class indices"
        )
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted(set(names.ravel().tolist()) - index.keys())
    if unknown:
        raise FormatError(f"{path}: label {unknown[0]!r} is not one of the classes {', '.join(classes)}")
    return np.vectorize(index.__getitem__, otypes=[np.int64])(names) if names.size else names.astype(np.int64)


MAX_CSV_BYTES = 256 * 2**20
_DECIMAL_COMMA = re.compile(r"^(\s*[-+]?\d*),(\d+(?:[eE][-+]?\d+)?\s*)$")  # 0,25 or -1,5e-3


def _load_csv(path: Path, label_column: str, kind: str) -> tuple[np.ndarray, np.ndarray, str, list[str]]:
    """(scores, labels, kind, classes) of a CSV: a header naming the label column and one column
    per class; cells separated by commas, semicolons or tabs (as the header shows), with decimal
    commas where the separator is not a comma; a label is a class index or a class column's name."""
    if path.stat().st_size > MAX_CSV_BYTES:  # parsed cells take about 10x the file's size in memory
        raise InputError(
            f"{path} is {path.stat().st_size:,} bytes, over the CSV limit of {MAX_CSV_BYTES:,}; "
            "save the predictions as .npz (logits or probs, labels) instead"
        )
    try:
        with open(path, newline="") as f:
            first = f.readline()
            delimiter = max(",;\t", key=first.count)  # the separator the header uses most
            f.seek(0)
            rows = [row for row in csv.reader(f, delimiter=delimiter) if row]  # blank lines are not rows
    except (UnicodeDecodeError, csv.Error) as exc:
        raise FormatError(f"{path} is not a readable CSV file ({exc})") from None
    if len(rows) < 2:
        raise FormatError(f"{path} needs a header row and at least one prediction row")
    header = [name.strip() for name in rows[0]]
    if label_column not in header:
        raise FormatError(f"{path} has no '{label_column}' column (columns: {', '.join(header)}); use --label-column")
    li = header.index(label_column)
    classes = [c for i, c in enumerate(header) if i != li]
    index = {name: str(i) for i, name in enumerate(classes)}
    table = []
    for number, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise FormatError(f"{path}: line {number} has {len(row)} cells but the header has {len(header)}")
        if delimiter != ",":  # spreadsheets that separate cells with ; or tabs may write 0,25 for 0.25
            row = [_DECIMAL_COMMA.sub(r"\1.\2", cell) for cell in row]
        if not _is_number(row[li]):  # a class name as the label (a number is always an index)
            row[li] = index.get(row[li].strip(), row[li])
        try:
            table.append([float(v) for v in row])
        except ValueError:
            bad = next(v for v in row if not _is_number(v))
            what = f"a class index or one of {', '.join(classes)}" if bad == row[li] else "a number"
            raise FormatError(f"{path}: line {number} holds {bad!r} where {what} belongs") from None
    table = np.array(table, dtype=np.float64)
    return np.delete(table, li, axis=1), table[:, li], kind, classes


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def load_predictions(spec: str, *, label_column: str = "label", csv_kind: str = "probs") -> Predictions:
    """`NAME=path` or `path` (named by its stem) -> validated Predictions."""
    name, _, path = spec.rpartition("=")
    path = Path(path)
    name = name or path.stem
    if not path.is_file():
        raise InputError(f"prediction file not found: {path}")
    if path.suffix == ".npz":
        scores, labels, kind, classes = _load_npz(path)
    elif path.suffix == ".csv":
        scores, labels, kind, classes = _load_csv(path, label_column, csv_kind)
    else:  # a model.pt or safetensors meant as the model: name the export that makes its model.onnx
        raise InputError(export_hint(path) or f"{path}: expected a .npz or .csv prediction file")
    try:
        scores, labels = cal.validate(scores, labels, kind)
    except InputError as exc:
        message = str(exc).replace("pass kind='logits'", "pass --csv-kind logits") if path.suffix == ".csv" else exc
        raise InputError(f"{path}: {message}") from None
    return Predictions(name, scores, labels, kind, classes)


def _audit_images(predictor: Predictor, data: str | None, dataset: str | None, data_dir: str | None):
    """uint8 images (N, H, W, C) and labels a model is audited on: an ImageFolder (`data`)
    decoded as cigl-predict would, or a dataset's test split (the split training used)."""
    from cigl.data import load_dataset, test_folder
    from cigl.serve.predict import expand_inputs

    classes = predictor.card.classes
    if data:
        root = test_folder(Path(data))
        if not root.is_dir():
            raise InputError(f"--data folder not found: {root}")
        folders = class_folders(root)
        unknown = [f.name for f in folders if f.name not in classes]
        if not folders or unknown:
            raise InputError(
                f"{root} needs one folder per class named as the model's classes "
                f"({', '.join(classes)}); unexpected: {', '.join(unknown) or 'no class folders'}"
            )
        files = [(f, classes.index(folder.name)) for folder in folders for f in expand_inputs([str(folder)])]
        decoded = len(files) * math.prod(predictor.card.input_size)  # the audit holds them all, as uint8
        if decoded > MAX_ARRAY_BYTES:
            raise InputError(
                f"{root} holds {len(files):,} images, {decoded:,} bytes decoded at the model's size, over the "
                f"audit's limit of {MAX_ARRAY_BYTES:,}; audit a sample (e.g. a few hundred images per class)"
            )
        with folder_images():
            images = np.stack([predictor.load_image(f) for f, _ in files])
        return images, np.array([label for _, label in files], dtype=np.int64)
    c, h, w = predictor.card.input_size
    split = load_dataset(dataset, data_dir, val_size=0, image_size=h if h == w else None).test  # as trained
    if split.x.shape[1:] != (h, w, c):
        raise InputError(f"{dataset} images are {split.x.shape[1:]}, the model takes {(h, w, c)} (H, W, C)")
    return split.x, split.y


def model_logits(predictor: Predictor, images: np.ndarray) -> np.ndarray:
    """Logits of uint8 images, in batches."""
    return np.concatenate(
        [predictor.predict(predictor.normalize(images[i : i + 256]))[0] for i in range(0, len(images), 256)]
    )


def is_model(spec: str) -> bool:
    """Whether `NAME=path` (or `path`) names an exported model, a .onnx file or a run directory
    (its model.onnx), rather than a prediction file."""
    path = spec.rpartition("=")[2]
    return path.endswith(".onnx") or Path(path).is_dir()


def onnx_predictions(spec: str, data: str | None, dataset: str | None, data_dir: str | None) -> Predictions:
    """Run an exported model over the audit data; the report then treats it like a file."""
    name, _, path = spec.rpartition("=")
    predictor = Predictor(path, device="cpu")
    images, labels = _audit_images(predictor, data, dataset, data_dir)
    card = predictor.card
    model = {
        "path": path,
        "provider": predictor.provider,
        "target_density": card.number("target_density"),
        "actual_density": card.number("actual_density"),
        "temperature_in_model": card.temperature,
        "recorded": card.recorded(),
    }
    logits = model_logits(predictor, images)
    return Predictions(name or Path(path).stem, logits, labels, "logits", card.classes, model, predictor, images)
