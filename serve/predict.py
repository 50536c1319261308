"""`cigl-predict MODEL.onnx INPUT...`: calibrated predictions for images, folders and .npy arrays
(onnxruntime, or cigl's sparse engine with --engine; see cigl.serve.engines).

One record per input (JSON lines or CSV): source, class, confidence (the calibrated
probability of the predicted class), top_k, abstained (confidence < --abstain-below, by default
the model card's certified threshold), prediction_set with --alpha (conformal, from the card), and
`error` for an input that could not be read. Exit codes: 0 all predicted, 1 some inputs
unreadable (reported in their records), 2 bad usage or, with --strict, any unreadable input.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from cigl.errors import ArgumentParser, InputError, cli_entry
from cigl.images import image_files
from cigl.io import MAX_ARRAY_BYTES, atomic_open, npy_header
from cigl.serve.engines import add_engine_option
from cigl.serve.predictor import Predictor
from cigl.serve.session import add_device_option


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files as given; folders searched recursively for images (sorted)."""
    out = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = image_files(path)
            if not found:
                raise InputError(f"no images found under {path}")
            out += found
        elif path.is_file():
            out.append(path)
        else:
            raise InputError(f"input not found: {path}")
    return out


MakeRecords = Callable[[list[str], np.ndarray], list[dict]]  # (sources, probs) -> records


def load_npy(path: Path) -> np.ndarray:
    """A .npy file's array after checking its header: the .npy format (not an .npz or pickle),
    uint8 or float, 3 or 4 dimensions, and a declared size that the file really holds
    and that stays under MAX_ARRAY_BYTES; InputError names what is wrong otherwise."""
    try:
        with open(path, "rb") as f:
            shape, dtype = npy_header(f)
            offset = f.tell()
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(f"{path} is not a .npy array file ({exc}); save arrays with numpy.save") from None
    if not (dtype == np.uint8 or dtype.kind == "f") or len(shape) not in (3, 4):
        raise InputError(
            f"{path}: need uint8 images (N, H, W, C) or float32 normalised (N, C, H, W), "
            f"got dtype {dtype} with shape {shape}"
        )
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > MAX_ARRAY_BYTES:
        raise InputError(f"{path} declares {nbytes:,} bytes of data, over the limit of {MAX_ARRAY_BYTES:,}; split it")
    if path.stat().st_size - offset < nbytes:
        raise InputError(f"{path} is truncated: its header declares {nbytes:,} bytes of data")
    return np.load(path, allow_pickle=False)


def _npy_batches(predictor: Predictor, path: Path, batch: int) -> Iterator[tuple[list[str], np.ndarray]]:
    arr = load_npy(path)
    if arr.ndim == 3:  # one image; slices below cut the batch axis
        arr = arr[None]
    for i in range(0, len(arr), batch):  # normalised batch by batch: a float copy of all is 4x the size
        yield [f"{path}[{j}]" for j in range(i, min(i + batch, len(arr)))], predictor.as_batch(arr[i : i + batch])


def _progress(total: int, enabled: bool):
    """A tqdm bar over `total` files on stderr, or None (disabled, or tqdm not installed)."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="file", file=sys.stderr, leave=False)


def _npy_records(predictor: Predictor, path: Path, batch: int, make_records: MakeRecords) -> list[dict]:
    """One record per array of a .npy file."""
    return [
        record
        for sources, x in _npy_batches(predictor, path, batch)
        for record in make_records(sources, predictor.predict(x)[1])
    ]


def predict_all(
    predictor: Predictor,
    paths: list[Path],
    *,
    batch: int,
    make_records: MakeRecords,
    strict: bool,
    progress: bool,
) -> Iterator[dict]:
    """Records for every input, in input order, as soon as they are known: image files are
    decoded one by one and run in batches of `batch`, their probabilities turned into records by
    `make_records` (e.g. Predictor.records with the chosen top-k, abstain threshold and alpha);
    an unreadable input gets an error record (or raises with `strict`)."""
    records: list[dict] = []  # in input order, since the last batch ran
    pending: list[tuple[int, np.ndarray]] = []  # (record slot, decoded image)

    def flush() -> Iterator[dict]:
        if pending:
            slots = [slot for slot, _ in pending]
            _, probs = predictor.predict(predictor.normalize(np.stack([img for _, img in pending])))
            found = make_records([records[s]["source"] for s in slots], probs)
            for slot, record in zip(slots, found, strict=True):
                records[slot] = record
            pending.clear()
        yield from records
        records.clear()

    bar = _progress(len(paths), progress)
    for path in paths:
        try:
            if path.suffix.lower() == ".npy":
                yield from flush()
                yield from _npy_records(predictor, path, batch, make_records)
            else:
                pending.append((len(records), predictor.load_image(path)))
                records.append({"source": str(path)})
        except InputError as exc:
            if strict:
                raise
            records.append({"source": str(path), "error": str(exc)})
        if len(pending) == batch:
            yield from flush()
        if bar is not None:
            bar.update(1)
    yield from flush()
    if bar is not None:
        bar.close()


CSV_COLUMNS = ["source", "class", "confidence", "top_k", "abstained", "prediction_set", "error"]


def render(records: Iterable[dict], fmt: str) -> Iterator[str]:
    """The text of `records` in `fmt` (jsonl: a line each; csv: a header, then a row each)."""
    if fmt == "csv":
        yield _csv_line(CSV_COLUMNS)
    for r in records:
        if fmt == "jsonl":
            yield json.dumps(r) + "\n"
            continue
        top = ";".join(f"{c}:{p}" for c, p in r.get("top_k", []))
        found = ";".join(r.get("prediction_set", []))
        cells = [r["source"], r.get("class", ""), r.get("confidence", ""), top, r.get("abstained", ""), found]
        yield _csv_line([*cells, r.get("error", "")])


def _csv_line(cells: list) -> str:
    buf = io.StringIO()
    csv.writer(buf).writerow(cells)
    return buf.getvalue()


class _Tally:
    """Counts the records streaming past on their way to the output."""

    def __init__(self, records: Iterable[dict]) -> None:
        self.records, self.total, self.failed, self.abstained = records, 0, 0, 0

    def __iter__(self) -> Iterator[dict]:
        for r in self.records:
            self.total += 1
            self.failed += "error" in r
            self.abstained += bool(r.get("abstained"))
            yield r


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="cigl-predict",
        description="Calibrated predictions of an exported model.onnx (onnxruntime; no torch needed).",
        epilog="exit codes: 0 ok, 1 some inputs unreadable, 2 error",
        examples=[
            "cigl-predict runs/demo-cigl/model.onnx cat.jpg dog.png --top-k 3",
            "cigl-predict model.onnx images/ --format csv --out predictions.csv --abstain-below 0.6",
            "cigl-predict model.onnx batch.npy                     # uint8 NHWC or normalised float NCHW",
            "cigl-predict model.onnx images/ --engine sparse       # cigl's sparse CPU engine (cigl[sparse])",
        ],
    )
    p.add_argument("model", help="model.onnx written by cigl-export")
    p.add_argument(
        "inputs",
        nargs="+",
        help="image files, folders (searched recursively) or .npy arrays "
        "(float32 normalised NCHW, or uint8 images NHWC)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="images per onnxruntime call (default 64)")
    p.add_argument("--top-k", type=int, default=1, help="classes listed per record (default 1)")
    p.add_argument(
        "--abstain-below",
        type=float,
        metavar="P",
        help="flag predictions whose calibrated confidence is below P (default: the threshold the model "
        "card certifies for its --target-risk, else 0)",
    )
    p.add_argument(
        "--alpha",
        type=float,
        help="add the conformal prediction set that holds the true class with probability >= 1 - ALPHA "
        "(an alpha calibrated in the model card: 0.1, 0.05 or 0.01)",
    )
    p.add_argument("--format", choices=("jsonl", "csv"), default="jsonl", help="output format (default jsonl)")
    p.add_argument("--out", help="write records to FILE (default stdout)")
    p.add_argument("--strict", action="store_true", help="an unreadable input is an error (exit 2, nothing written)")
    add_device_option(p)
    add_engine_option(p)
    return p


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for option, value in (("--batch-size", args.batch_size), ("--top-k", args.top_k)):
        if value < 1:
            raise InputError(f"{option} must be >= 1, got {value}")
    if args.abstain_below is not None and not 0 <= args.abstain_below <= 1:
        raise InputError(f"--abstain-below must lie in [0, 1], got {args.abstain_below}")
    predictor = Predictor(args.model, device=args.device, engine=args.engine)
    if args.alpha is not None:
        predictor.card.conformal_threshold(args.alpha)  # an alpha the card lacks fails before any work
    paths = expand_inputs(args.inputs)
    tally = _Tally(
        predict_all(
            predictor,
            paths,
            batch=min(args.batch_size, predictor.max_batch),
            make_records=functools.partial(
                predictor.records, top_k=args.top_k, abstain_below=args.abstain_below, alpha=args.alpha
            ),
            strict=args.strict,
            progress=sys.stderr.isatty(),
        )
    )
    lines = render(tally, args.format)
    if args.out:  # streamed into a temp file, renamed into place when complete
        with atomic_open(args.out, "w") as f:
            f.writelines(lines)
    elif args.strict:  # all or nothing: an unreadable input must leave stdout empty
        sys.stdout.write("".join(lines))
    else:  # each record as soon as it is known, also into a pipe (block-buffered otherwise)
        for line in lines:
            sys.stdout.write(line)
            sys.stdout.flush()
    print(
        f"{tally.total - tally.failed} predicted, {tally.failed} unreadable, {tally.abstained} abstained "
        f"({predictor.provider})",
        file=sys.stderr,
    )
    return 1 if tally.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
