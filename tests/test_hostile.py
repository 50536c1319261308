"""Hostile and broken inputs for the five tools: every one ends per the contract.

The contract (README "Errors"): bad input gets one `error: ...` line naming the problem and the
fix, exit code 2, no traceback, and no half-written output; an unreadable input among good ones
gives an error record (cigl-predict, exit 1); the server answers 4xx with {"error": ...} and keeps
serving. Every hostile file is generated here at test time from real digits images.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import make_model_pt
from fastapi.testclient import TestClient
from PIL import Image

from cigl.data import load_dataset
from cigl.errors import InputError
from cigl.export.cli import main as export_main
from cigl.serve.audit import main as audit_main
from cigl.serve.http import create_app
from cigl.serve.http import main as serve_main
from cigl.serve.predict import main as predict_main
from cigl.serve.predictor import Predictor
from cigl.train import main as train_main

# --------------------------------------------------------------------------- helpers


def run_tool(main, args: list[str], capsys) -> tuple[int, str, str]:
    """Run a CLI main in-process: (exit code, stdout, stderr). Any exception other than
    SystemExit escapes, so a traceback fails the test."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_clean_error(result: tuple[int, str, str], *needles: str) -> str:
    code, _, err = result
    lines = [line for line in err.strip().splitlines() if not line.startswith("warning: ")]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_error_lines_are_written_whole(monkeypatch):
    """One write per line: the processes of a torchrun launch fail at the same moment, and with
    print's two writes (text, then newline) their lines came out run together."""
    from cigl.errors import cli_entry

    writes = []

    class Recorder:
        def write(self, text):
            writes.append(text)

        def flush(self):
            pass

    monkeypatch.setattr("sys.stderr", Recorder())

    @cli_entry
    def fails(_argv=None):
        raise InputError("the batch of 63 images does not split evenly")

    with pytest.raises(SystemExit):
        fails()
    assert writes == ["error: the batch of 63 images does not split evenly\n"]


def png_with_size(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height over a tiny, truncated body: what an image
    bomb looks like to a decoder before it allocates."""
    buf = io.BytesIO()
    Image.new("L", (4, 4)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = data[12:29]  # b"IHDR" + 13 bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


@pytest.fixture(scope="module")
def digit_images(tmp_path_factory) -> tuple[Path, list[np.ndarray]]:
    """Three real digits upscaled to 24 x 24 (so the resize path runs), saved as 8-bit PNGs."""
    folder = tmp_path_factory.mktemp("digits-png")
    test = load_dataset("digits").test
    arrays = []
    for i in range(3):
        arr = np.kron(test.x[i, :, :, 0], np.ones((3, 3), np.uint8))
        Image.fromarray(arr).save(folder / f"digit{i}.png")
        arrays.append(arr)
    return folder, arrays


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """model.pt and its export (model.onnx, model.safetensors) for 8 x 8 grayscale digits."""
    src = make_model_pt(tmp_path_factory.mktemp("hostile") / "run" / "model.pt", "resnet20", density=0.2)
    assert export_main([str(src)]) == 0
    return src.parent


def onnx_with_card(exported: Path, tmp_path: Path, **changes: str) -> Path:
    proto = onnx.load(str(exported / "model.onnx"))
    meta = {p.key: p.value for p in proto.metadata_props} | changes
    del proto.metadata_props[:]
    for key, value in meta.items():
        proto.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    path = tmp_path / "edited.onnx"
    onnx.save(proto, str(path))
    return path


def model_pt_with(exported: Path, tmp_path: Path, edit) -> Path:
    ckpt = torch.load(exported / "model.pt", weights_only=True)
    edit(ckpt)
    path = tmp_path / "bad" / "model.pt"
    path.parent.mkdir()
    torch.save(ckpt, path)
    return path


# --------------------------------------------------------------------------- images: every mode, every size

MODES = {
    "I;16 (16-bit PNG)": lambda a: Image.fromarray(a.astype(np.uint16) * 257),
    "I;16 holding 8-bit values": lambda a: Image.fromarray(a.astype(np.uint16)),
    "I (32-bit)": lambda a: Image.fromarray(a.astype(np.int32) * 257),
    "F (float)": lambda a: Image.fromarray(a.astype(np.float32)),
    "P (palette)": lambda a: Image.fromarray(a).convert("P"),
    "LA": lambda a: Image.fromarray(a).convert("LA"),
    "RGB": lambda a: Image.fromarray(a).convert("RGB"),
    "RGBA": lambda a: Image.fromarray(a).convert("RGBA"),
    "CMYK": lambda a: Image.fromarray(a).convert("CMYK"),
    "1 (bilevel)": None,  # not lossless for gray: checked against its own 8-bit rendering below
}


@pytest.mark.parametrize("mode", [m for m, make in MODES.items() if make is not None])
def test_every_pillow_mode_gives_the_8bit_pixels(exported, digit_images, tmp_path, mode):
    _, arrays = digit_images
    image = MODES[mode](arrays[0])
    fmt = "TIFF" if image.mode in ("I", "F", "CMYK") else "PNG"
    path = tmp_path / f"digit.{fmt.lower()}"
    image.save(path, format=fmt)
    p = Predictor(exported / "model.onnx", device="cpu")
    ours = p.load_image(path)
    assert np.array_equal(ours, p.load_image(Image.fromarray(arrays[0])))
    assert np.array_equal(p.predict(p.normalize(ours[None]))[1], p.predict(p.normalize(p.load_image(image)[None]))[1])


def test_animated_gif_uses_its_first_frame(exported, digit_images, tmp_path):
    _, arrays = digit_images
    frames = [Image.fromarray(a).convert("P") for a in arrays]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    p = Predictor(exported / "model.onnx", device="cpu")
    assert np.array_equal(p.load_image(tmp_path / "anim.gif"), p.load_image(Image.fromarray(arrays[0])))


def test_out_of_range_high_bit_images_are_refused(exported, tmp_path):
    Image.fromarray(np.full((8, 8), -5.0, np.float32)).save(tmp_path / "neg.tiff")
    with pytest.raises(Exception, match="outside 0..65535"):
        Predictor(exported / "model.onnx", device="cpu").load_image(tmp_path / "neg.tiff")


@pytest.mark.parametrize("size", [(10_000, 10_000), (30_000, 30_000), (1, 50_000_000)])
def test_image_bombs_give_an_error_record_and_the_good_images_still_predict(
    exported, digit_images, tmp_path, capsys, size
):
    folder, _ = digit_images
    (tmp_path / "bomb.png").write_bytes(png_with_size(*size))
    code, out, err = run_tool(predict_main, [exported / "model.onnx", tmp_path / "bomb.png", folder], capsys)
    records = [json.loads(line) for line in out.splitlines()]
    assert code == 1 and "Traceback" not in err
    assert "pixels" in records[0]["error"] and "downscale" in records[0]["error"]
    assert len(records) == 4 and all("class" in r for r in records[1:])
    assert_clean_error(
        run_tool(predict_main, [exported / "model.onnx", tmp_path / "bomb.png", "--strict"], capsys), "pixels"
    )


def test_training_and_audit_refuse_a_bomb_in_an_image_folder(exported, digit_images, tmp_path, capsys, monkeypatch):
    folder, _ = digit_images
    for split in ("train", "test"):
        for label in ("0", "1"):
            (tmp_path / "data" / split / label).mkdir(parents=True)
            for f in folder.iterdir():
                (tmp_path / "data" / split / label / f.name).write_bytes(f.read_bytes())
    (tmp_path / "data" / "train" / "1" / "bomb.png").write_bytes(png_with_size(12_000, 12_000))
    train_args = ["--dataset", "imagefolder", "--data-dir", tmp_path / "data", "--out", tmp_path / "run"]
    assert_clean_error(run_tool(train_main, train_args, capsys), "bomb.png", "pixels")
    assert not (tmp_path / "run").exists()
    (tmp_path / "data" / "test" / "0" / "bomb.png").write_bytes(png_with_size(12_000, 12_000))
    audit_args = [exported / "model.onnx", "--data", tmp_path / "data" / "test", "--out", tmp_path / "audit"]
    assert_clean_error(run_tool(audit_main, audit_args, capsys), "bomb.png")
    (tmp_path / "data" / "test" / "0" / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n cut off")
    assert_clean_error(run_tool(audit_main, audit_args, capsys), "bomb.png", "replace or remove that file")
    # the audit holds every image at the model's size: a folder beyond the bound is refused before decoding
    (tmp_path / "data" / "test" / "0" / "bomb.png").unlink()
    monkeypatch.setattr("cigl.serve.audit_inputs.MAX_ARRAY_BYTES", 64)  # one 8 x 8 digit
    line = assert_clean_error(run_tool(audit_main, audit_args, capsys), "over the audit's limit of 64")
    assert f"holds {2 * len(list(folder.iterdir()))} images" in line and not (tmp_path / "audit").exists()


# --------------------------------------------------------------------------- cigl-predict


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    return buf.getvalue()


def _huge_header() -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": "<f4", "fortran_order": False, "shape": (10**14 // 64, 1, 8, 8)}
    )
    return b"\x93NUMPY\x01\x00" + buf.getvalue()[8:] + b"\0" * 64


NPY_CASES = {
    "0-d array": lambda: _npy_bytes(np.array(3.0)),
    "an .npz renamed": lambda: (lambda b: (np.savez(b, x=np.zeros((1, 1, 8, 8), np.float32)), b.getvalue())[1])(
        io.BytesIO()
    ),
    "10^14 declared elements": _huge_header,
    "truncated data": lambda: _npy_bytes(np.zeros((4, 1, 8, 8), np.float32))[:-100],
    "a pickled object array": lambda: _npy_bytes(np.array([{"x": 1}], dtype=object)),
    "5-d array": lambda: _npy_bytes(np.zeros((1, 1, 1, 8, 8), np.float32)),
    "strings": lambda: _npy_bytes(np.array([["a"] * 8] * 8)[None, None]),
    "random bytes": lambda: bytes(range(256)) * 4,
    "wrong channels (uint8 NHWC with 3)": lambda: _npy_bytes(np.zeros((2, 8, 8, 3), np.uint8)),
    "NaN inputs": lambda: _npy_bytes(np.full((2, 1, 8, 8), np.nan, np.float32)),
    "int64 images": lambda: _npy_bytes(np.zeros((2, 8, 8, 1), np.int64)),
}


@pytest.mark.parametrize("case", sorted(NPY_CASES))
def test_hostile_npy_inputs(exported, digit_images, tmp_path, capsys, case):
    folder, _ = digit_images
    bad = tmp_path / "bad.npy"
    bad.write_bytes(NPY_CASES[case]())
    code, out, err = run_tool(predict_main, [exported / "model.onnx", bad, folder / "digit0.png"], capsys)
    records = [json.loads(line) for line in out.splitlines()]
    assert code == 1 and "Traceback" not in err, err
    assert records[0]["source"] == str(bad) and records[0]["error"] and records[1]["class"]
    assert_clean_error(run_tool(predict_main, [exported / "model.onnx", bad, "--strict"], capsys))


@pytest.mark.parametrize("where", ["missing folder", "a folder", "under a file"])
def test_predict_out_paths(exported, digit_images, tmp_path, capsys, where):
    folder, _ = digit_images
    (tmp_path / "file").write_text("x")
    out = {
        "missing folder": tmp_path / "nope" / "p.jsonl",
        "a folder": tmp_path,
        "under a file": tmp_path / "file" / "p",
    }
    before = sorted(tmp_path.rglob("*"))
    assert_clean_error(run_tool(predict_main, [exported / "model.onnx", folder, "--out", out[where]], capsys))
    assert sorted(tmp_path.rglob("*")) == before


class _DiskFullAfter(io.FileIO):
    """A file on a disk with `room` bytes left in all: the write that would pass it fails with
    ENOSPC, as a real full disk fails it (torch.save reports that as a RuntimeError of its own)."""

    room = 0

    def write(self, data):
        if len(data) > _DiskFullAfter.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        _DiskFullAfter.room -= len(data)
        return super().write(data)


def _full_file(file, mode: str):
    """open(file, mode) for writing, on the full disk."""
    raw = io.BufferedWriter(_DiskFullAfter(file, mode.replace("b", "").replace("t", "").replace("+", "")))
    return raw if "b" in mode else io.TextIOWrapper(raw)


def _fill_disk(monkeypatch, disk: Path) -> None:
    """Make the filesystem of folder `disk` full (its room: _DiskFullAfter.room)."""
    monkeypatch.setattr("cigl.io.os.fdopen", _full_file)  # atomic_open's temp files
    real_open = open

    def open_full(file, mode="r", *args, **kwargs):  # appends and plain writes fill up the same way
        if any(c in mode for c in "wax") and str(file).startswith(str(disk)):
            return _full_file(file, mode)
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", open_full)
    monkeypatch.setattr("io.open", open_full)  # pathlib's write_text and write_bytes


def test_a_full_disk_is_one_line_and_leaves_no_partial_files(exported, digit_images, tmp_path, capsys, monkeypatch):
    """Every tool that writes: export (torch and safetensors writers), predict --out, the audit
    report and training (checkpoints and metrics.jsonl) name the file and the fix, exit 2, and
    leave no partial file behind."""
    folder, _ = digit_images
    probs = np.random.default_rng(0).dirichlet(np.ones(10), size=50)
    np.savez(tmp_path / "preds.npz", probs=probs, labels=probs.argmax(1))
    _fill_disk(monkeypatch, tmp_path)
    runs = {  # tool: (main, arguments, bytes left on the disk)
        "export": (export_main, [exported / "model.pt", "--out", tmp_path / "export"], 2000),
        "predict": (predict_main, [exported / "model.onnx", folder, "--out", tmp_path / "p.jsonl"], 100),
        "audit": (audit_main, [tmp_path / "preds.npz", "--out", tmp_path / "audit"], 2000),
        "train": (train_main, ["--method", "cigl", "--epochs", "1", "--out", tmp_path / "run", "--quiet"], 6000),
    }
    for tool, (main, args, room) in runs.items():
        _DiskFullAfter.room = room
        line = assert_clean_error(run_tool(main, args, capsys), "No space left on device", "free some space")
        assert f"cannot write {tmp_path}" in line, (tool, line)
    leftovers = {p.name for p in tmp_path.rglob("*") if p.is_file() and p.stat().st_size > 0}
    assert leftovers <= {"preds.npz", ".lock", "config.json", "metrics.jsonl"}, leftovers
    json.loads((tmp_path / "run" / "config.json").read_text())  # what training wrote before the disk filled is whole
    [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


CARD_CASES = {
    "fewer class names than outputs": {"classes": json.dumps(["a", "b"])},
    "two input_size entries": {"input_size": "[8, 8]"},
    "a 100000 x 100000 input": {"input_size": "[1, 100000, 100000]"},
    "input_size unlike the graph": {"input_size": "[1, 16, 16]"},
    "mean of the wrong length": {"mean": "[0.5, 0.5, 0.5]"},
    "zero std": {"std": "[0.0]"},
    "a NaN temperature": {"temperature": "nan"},
    "classes not a list": {"classes": "7"},
    "classes not JSON": {"classes": "[[[["},
    "an unknown preprocessing": {"preprocess": "someone-else:squash"},
}


@pytest.mark.parametrize("case", sorted(CARD_CASES))
def test_predict_checks_the_model_card(exported, digit_images, tmp_path, capsys, case):
    folder, _ = digit_images
    model = onnx_with_card(exported, tmp_path, **CARD_CASES[case])
    assert_clean_error(run_tool(predict_main, [model, folder], capsys), "edited.onnx")


@pytest.mark.parametrize("content", [b"", b"\x08\x01garbage" * 50, b"not a model"])
def test_predict_refuses_files_that_are_not_models(digit_images, tmp_path, capsys, content):
    folder, _ = digit_images
    (tmp_path / "m.onnx").write_bytes(content)
    assert_clean_error(run_tool(predict_main, [tmp_path / "m.onnx", folder], capsys), "m.onnx")


# --------------------------------------------------------------------------- cigl-export

MODEL_PT_CASES = {
    "classes an int": (lambda c: c.update(classes=3), "class names"),
    "classes shorter than num_classes": (lambda c: c.update(classes=["a", "b"]), "2 class names for 10 outputs"),
    "masks as a list": (lambda c: c.update(masks=[1, 2]), "masks must be a dictionary"),
    "empty model_kwargs": (lambda c: c.update(model_kwargs={}), "model_kwargs"),
    "a non-tensor weight": (lambda c: c["state_dict"].update({"fc.weight": [1.0, 2.0]}), "not tensors"),
    "weights outside the mask": (
        lambda c: next(c["state_dict"][n].fill_(1.0) for n, m in c["masks"].items() if not m.all()),
        "outside its mask",
    ),
    "a NaN temperature": (lambda c: c.update(temperature=float("nan")), "temperature"),
    "a huge image size": (lambda c: c["model_kwargs"].update(image_size=10**6), "image_size"),
    "std of zero": (lambda c: c.update(std=[0.0]), "std"),
    "a mask of another shape": (lambda c: c["masks"].update({"fc.weight": torch.ones(3, dtype=torch.bool)}), "shape"),
}


@pytest.mark.parametrize("case", sorted(MODEL_PT_CASES))
def test_export_refuses_malformed_model_files(exported, tmp_path, capsys, case):
    edit, needle = MODEL_PT_CASES[case]
    path = model_pt_with(exported, tmp_path, edit)
    assert_clean_error(run_tool(export_main, [path, "--out", tmp_path / "out"], capsys), needle)
    assert not (tmp_path / "out").exists()


def test_export_names_random_bytes_and_never_runs_a_pickle(tmp_path, capsys):
    (tmp_path / "random.pt").write_bytes(bytes(range(256)) * 8)
    line = assert_clean_error(run_tool(export_main, [tmp_path / "random.pt"], capsys), "not a torch file")
    assert "arbitrary code" not in line

    class Payload:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    torch.save({"format": "cigl-model", "x": Payload()}, tmp_path / "evil.pt")
    assert_clean_error(run_tool(export_main, [tmp_path / "evil.pt"], capsys), "arbitrary code")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("case", ["out is a file", "opset 999", "opset 5"])
def test_export_bad_out_and_opset_write_nothing(exported, tmp_path, capsys, case):
    (tmp_path / "file").write_text("x")
    args = {
        "out is a file": ["--out", tmp_path / "file"],
        "opset 999": ["--opset", "999", "--out", tmp_path / "D"],
        "opset 5": ["--opset", "5", "--out", tmp_path / "D"],
    }[case]
    assert_clean_error(run_tool(export_main, [exported / "model.pt", *args], capsys))
    assert not (tmp_path / "D").exists() and (tmp_path / "file").read_text() == "x"


def _safetensors_with_meta(exported: Path, tmp_path: Path, **changes: str) -> Path:
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(str(exported / "model.safetensors"), "np") as f:
        meta = f.metadata() | changes
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    path = tmp_path / "edited.safetensors"
    save_file(tensors, str(path), metadata=meta)
    return path


def _onnx_edit(exported: Path, tmp_path: Path, edit) -> Path:
    proto = onnx.load(str(exported / "model.onnx"))
    edit(proto)
    path = tmp_path / "edited.onnx"
    path.write_bytes(proto.SerializeToString())
    return path


def _drop_shape(proto) -> None:
    shapes = [i for i in proto.graph.initializer if i.name.endswith("::shape")]
    proto.graph.initializer.remove(shapes[0])


def _oversize_values(proto) -> None:
    values = next(i for i in proto.graph.initializer if i.name.endswith("::values"))
    values.dims[0] = values.dims[0] * 1000


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


INSPECT_CASES = {
    "zero-byte onnx": lambda e, t: _write(t / "empty.onnx", b""),
    "zero-byte safetensors": lambda e, t: _write(t / "empty.safetensors", b""),
    "random-bytes safetensors": lambda e, t: _write(t / "r.safetensors", b"\xff" * 64),
    "bad packed metadata": lambda e, t: _safetensors_with_meta(e, t, packed="{not json"),
    "packed metadata naming a missing tensor": lambda e, t: _safetensors_with_meta(e, t, packed='{"nope": [3, 3]}'),
    "onnx without a ::shape entry": lambda e, t: _onnx_edit(e, t, _drop_shape),
    "onnx weight larger than its data": lambda e, t: _onnx_edit(e, t, _oversize_values),
}


@pytest.mark.parametrize("case", sorted(INSPECT_CASES))
def test_inspect_checks_what_it_reads(exported, tmp_path, capsys, case):
    path = INSPECT_CASES[case](exported, tmp_path)
    assert_clean_error(run_tool(export_main, ["--inspect", path], capsys), path.name)


# --------------------------------------------------------------------------- confidence-audit


def _predictions(tmp_path: Path, **arrays) -> Path:
    rng = np.random.default_rng(0)
    base = {"logits": rng.normal(size=(50, 3)).astype(np.float32), "labels": rng.integers(0, 3, 50)}
    path = tmp_path / "p.npz"
    np.savez(path, **(base | arrays))
    return path


AUDIT_CASES = {
    "--bins 100000000": (lambda t: [_predictions(t), "--bins", "100000000"], "--bins"),
    "--bins 0": (lambda t: [_predictions(t), "--bins", "0"], "--bins"),
    "--bootstrap 10^9": (lambda t: [_predictions(t), "--bootstrap", "1000000000"], "--bootstrap"),
    "--out a file": (lambda t: [_predictions(t), "--out", _predictions(t)], "is a file"),
    "NaN logits": (lambda t: [_predictions(t, logits=np.full((50, 3), np.nan))], "p.npz"),
    "labels out of range": (lambda t: [_predictions(t, labels=np.full(50, 7))], "p.npz"),
    "no labels": (lambda t: [(np.savez(t / "q.npz", logits=np.zeros((2, 2))), t / "q.npz")[1]], "labels"),
    "object arrays": (
        lambda t: [(np.savez(t / "o.npz", logits=np.array([{}], object), labels=[0]), t / "o.npz")[1]],
        "o.npz",
    ),
    "a CSV row missing a cell": (
        lambda t: [(Path(t / "p.csv").write_text("a,b,label\n0.2,0.8,1\n0.5,1\n"), t / "p.csv")[1]],
        "line 3 has 2 cells",
    ),
    "a CSV with text": (lambda t: [(Path(t / "p.csv").write_text("a,b,label\n0.2,x,1\n"), t / "p.csv")[1]], "number"),
    "a binary CSV": (lambda t: [(Path(t / "p.csv").write_bytes(b"\xff\xfe\x00" * 30), t / "p.csv")[1]], "p.csv"),
}


@pytest.mark.parametrize("case", sorted(AUDIT_CASES))
def test_audit_refuses_bad_inputs_and_options(tmp_path, capsys, case):
    make, needle = AUDIT_CASES[case]
    args = make(tmp_path)
    if "--out" not in args:
        args += ["--out", tmp_path / "report"]
    assert_clean_error(run_tool(audit_main, args, capsys), needle)
    assert not (tmp_path / "report").exists()


# --------------------------------------------------------------------------- cigl-train

TRAIN_OPTION_CASES = [
    ("--lr", "nan"),
    ("--lr", "inf"),
    ("--lr", "0"),
    ("--wd", "-1"),
    ("--momentum", "1.5"),
    ("--decay", "nan"),
    ("--density", "2"),
    ("--density", "0"),
    ("--val-size", "1"),
    ("--train-per-class", "0"),
    ("--image-size", "0"),
    ("--image-size", "100000"),
    ("--epochs", "-1"),
    ("--batch-size", "0"),
    ("--dpnum", "1"),
    ("--mc-samples", "-1"),
    ("--warmup-epochs", "nan"),
    ("--update-end", "0"),
]


@pytest.mark.parametrize("option,value", TRAIN_OPTION_CASES)
def test_train_validates_every_number_before_writing(tmp_path, capsys, option, value):
    result = run_tool(train_main, [option, value, "--out", tmp_path / "run"], capsys)
    assert_clean_error(result, option)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "options,named",
    [
        (["--conformal", "raps", "--val-size", "0"], "--conformal"),
        (["--target-risk", "0.2", "--val-size", "0"], "--target-risk"),
        (["--mc-samples", "2", "--method", "rigl"], "--mc-samples"),
        (["--method", "dense", "--density", "0.5"], "--density"),
    ],
)
def test_train_refuses_options_that_would_be_ignored(tmp_path, capsys, options, named):
    result = run_tool(train_main, [*options, "--out", tmp_path / "run"], capsys)
    assert_clean_error(result, named)
    assert not (tmp_path / "run").exists()


def _damage(run: Path, how: str) -> None:
    if how == "invalid config.json":
        (run / "config.json").write_text("{not json")
    elif how == "config.json a list":
        (run / "config.json").write_text("[1, 2]")
    elif how == "last.pt with no state":
        torch.save({"format": "cigl-checkpoint", "version": 1}, run / "last.pt")
    elif how == "random bytes as last.pt":
        (run / "last.pt").write_bytes(b"\0" * 100)
    elif how == "a dense run's last.pt":
        state = torch.load(run / "last.pt", weights_only=True)
        torch.save(state | {"sparse": None}, run / "last.pt")


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("resume") / "run"
    assert train_main(["--method", "cigl", "--epochs", "1", "--batch-size", "256", "--out", str(run), "--quiet"]) == 0
    return run


@pytest.mark.parametrize(
    "how",
    [
        "invalid config.json",
        "config.json a list",
        "last.pt with no state",
        "random bytes as last.pt",
        "a dense run's last.pt",
    ],
)
def test_resume_names_a_damaged_run(small_run, tmp_path, capsys, how):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    _damage(run, how)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert_clean_error(run_tool(train_main, ["--resume", run, "--epochs", "2"], capsys), "run")
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_a_second_training_into_a_running_runs_folder_is_refused(tmp_path, capsys):
    """Two cigl-train with one --out (launched twice, two terminals) would write the same files:
    the run folder is locked by the process writing it, and the second stops before writing."""
    from cigl.runfiles import lock_run

    run = tmp_path / "run"
    held = lock_run(run)  # as a running cigl-train holds it
    result = run_tool(train_main, ["--epochs", "1", "--batch-size", "256", "--out", run], capsys)
    assert_clean_error(result, f"another cigl-train (process {os.getpid()}) is writing to {run} right now")
    assert sorted(p.name for p in run.iterdir()) == [".lock"]
    held.close()  # the first run ended (or was killed): the folder is free again
    assert train_main(["--epochs", "1", "--batch-size", "256", "--out", str(run), "--quiet"]) == 0
    assert (run / "summary.json").is_file()


def test_a_filesystem_without_locks_only_warns(tmp_path, monkeypatch):
    """flock failing for another reason than a holder (ENOLCK on some network mounts) must not
    stop every training there: the run goes on unguarded, with a warning."""
    import errno
    import fcntl

    from cigl.runfiles import lock_run

    def no_locks(*_):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.warns(UserWarning, match="cannot lock .*No locks available.*nothing stops a second run"):
        handle = lock_run(tmp_path / "run")
    handle.close()
    assert (tmp_path / "run" / ".lock").read_text() == f"{os.getpid()}\n"


@pytest.mark.parametrize(
    "method,extra,needle",
    [
        ("rigl", [], "has trained 20 steps (2 epochs) already, more than --epochs 1 gives; pass --epochs 2 or more"),
        ("cigl", ["--avg-start", "2"], "its weight averaging starts at epoch 2, so --epochs must be 2 or more"),
    ],
)
def test_resume_refuses_fewer_epochs_than_the_run_needs(tmp_path, capsys, method, extra, needle):
    """A shorter --epochs on resume would end before the steps already trained (the summary would
    claim fewer epochs than the weights had) or before the averaging starts: refused, run untouched."""
    run = tmp_path / "run"
    argv = ["--method", method, "--epochs", "2", "--batch-size", "128", *extra, "--out", str(run), "--quiet"]
    assert train_main(argv) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert_clean_error(run_tool(train_main, ["--resume", run, "--epochs", "1"], capsys), needle)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


@pytest.mark.parametrize("model", ["inception_v3", "convit_tiny"])
def test_a_timm_model_that_cannot_take_the_input_size_is_named(tmp_path, capsys, model):
    result = run_tool(train_main, ["--model", model, "--out", tmp_path / "run"], capsys)  # digits: 8 x 8
    assert_clean_error(result, model, "--image-size")
    assert not (tmp_path / "run").exists()


def test_fixed_size_timm_models_are_built_for_the_input_size():
    from cigl.models import create_model

    model = create_model("vit_tiny_patch16_224", num_classes=10, image_size=32).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_export_parity_tolerance_scales_with_the_logits():
    from cigl.export.cli import logits_mismatch

    rng = np.random.default_rng(0)
    ref = rng.normal(scale=60.0, size=(200, 10)).astype(np.float32)
    ref[0, 0] = 171.0
    assert logits_mismatch(ref + 1.7e-3, ref) is None  # 1e-5 of the logits' scale: float32 rounding
    assert "max |logits diff|" in logits_mismatch(ref + 0.1, ref)
    small = rng.normal(size=(200, 10)).astype(np.float32)
    assert logits_mismatch(small + 1e-3, small) is not None
    swapped = small.copy()
    swapped[:, [0, 1]] = swapped[:, [1, 0]]
    assert logits_mismatch(swapped, small) is not None


# --------------------------------------------------------------------------- cigl-serve


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--workers", "100000", "--workers must lie in 1..64, got 100000"),
        ("--max-batch", "0", "--max-batch must lie in 1..65536, got 0"),
        ("--max-body-mb", "nan", "--max-body-mb must be > 0 and <= 1024, got nan"),
        ("--max-body-mb", "inf", "--max-body-mb must be > 0 and <= 1024, got inf"),
    ],
)
def test_serve_bounds_its_sizes_before_loading_anything(tmp_path, capsys, option, value, message):
    with pytest.raises(SystemExit) as stop:
        serve_main([str(tmp_path / "model.onnx"), option, value])
    assert stop.value.code == 2 and capsys.readouterr().err == f"error: {message}\n"


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"threads": 10**6}, "threads must be an integer from 0 (all cores) to 1024, got 1000000"),
        ({"threads": -1}, "threads must be an integer from 0 (all cores) to 1024, got -1"),
        ({"max_batch": 0}, "max_batch must be an integer in 1..65536, got 0"),
    ],
)
def test_predictor_bounds_its_sizes(exported, setting, message):
    with pytest.raises(InputError, match=re.escape(message)):
        Predictor(exported / "model.onnx", **setting)


@pytest.fixture(scope="module")
def client(exported) -> TestClient:
    return TestClient(create_app(Predictor(exported / "model.onnx", device="cpu"), max_batch=64, max_body_mb=10))


def _nested(depth: int) -> bytes:
    return b'{"inputs": ' + b"[" * depth + b"]" * depth + b"}"


SERVE_CASES = {
    "JSON nested 100000 deep": lambda: {"content": _nested(100_000), "headers": {"content-type": "application/json"}},
    "JSON nested 5000 deep": lambda: {"content": _nested(5_000), "headers": {"content-type": "application/json"}},
    "invalid UTF-8 JSON": lambda: {"content": b"\xff\xfe{", "headers": {"content-type": "application/json"}},
    "strings as inputs": lambda: {"json": {"inputs": [["a"]]}},
    "NaN-like huge inputs": lambda: {
        "content": b'{"inputs": [[[[1e999]]]]}',
        "headers": {"content-type": "application/json"},
    },
    "ragged inputs": lambda: {"json": {"inputs": [[[1, 2], [3]]]}},
    "multipart framing error": lambda: {
        "content": b'--xyz\r\nContent-Disposition: form-data; name="f"; filename="a"\r\n\r\nabc',
        "headers": {"content-type": "multipart/form-data; boundary=xyz"},
    },
    "multipart without a boundary": lambda: {"content": b"abc", "headers": {"content-type": "multipart/form-data"}},
    "66 files": lambda: {"files": [("f", (f"{i}.png", b"x", "image/png")) for i in range(66)]},
    "an image bomb": lambda: {"files": [("f", ("bomb.png", png_with_size(20_000, 20_000), "image/png"))]},
    "not an image": lambda: {"files": [("f", ("a.png", b"hello", "image/png"))]},
    "a float image out of range": lambda: {
        "files": [("f", ("n.tiff", _tiff(np.full((8, 8), 1e6, np.float32)), "image/tiff"))]
    },
    "top_k 0": lambda: {"json": {"inputs": [np.zeros((1, 8, 8)).tolist()], "top_k": 0}},
    "an unknown field": lambda: {"json": {"inputs": [np.zeros((1, 8, 8)).tolist()], "shell": "rm"}},
}


def _tiff(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="TIFF")
    return buf.getvalue()


@pytest.mark.parametrize("case", sorted(SERVE_CASES))
def test_server_answers_4xx_with_error_and_keeps_serving(client, digit_images, case):
    folder, _ = digit_images
    r = client.post("/v1/predict", **SERVE_CASES[case]())
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    assert set(r.json()) == {"error"} and r.json()["error"]
    good = client.post("/v1/predict", files=[("f", ("d.png", (folder / "digit0.png").read_bytes(), "image/png"))])
    assert good.status_code == 200 and good.json()["predictions"][0]["class"]


def test_server_predicts_a_16bit_upload_like_its_8bit_original(client, digit_images):
    _, arrays = digit_images
    sixteen = io.BytesIO()
    Image.fromarray(arrays[1].astype(np.uint16) * 257).save(sixteen, format="PNG")
    eight = io.BytesIO()
    Image.fromarray(arrays[1]).save(eight, format="PNG")
    a = client.post("/v1/predict", files=[("f", ("a.png", sixteen.getvalue(), "image/png"))]).json()
    b = client.post("/v1/predict", files=[("f", ("b.png", eight.getvalue(), "image/png"))]).json()
    assert a["predictions"][0]["top_k"] == b["predictions"][0]["top_k"]


def test_pickles_in_uploads_are_never_executed(client, tmp_path):
    class Payload:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    r = client.post("/v1/predict", files=[("f", ("x.npy", pickle.dumps(Payload()), "application/octet-stream"))])
    assert r.status_code == 400 and not (tmp_path / "pwned").exists()


# --------------------------------------------------------------------------- library edges


def test_a_temperature_at_its_bound_is_reported():
    from cigl.calibration import fit_temperature

    logits = np.random.default_rng(0).normal(size=(500, 4))
    labels = logits.argmin(1)  # confidently wrong: NLL keeps falling as T grows
    with pytest.warns(RuntimeWarning, match="reached its bound 100"):
        assert fit_temperature(logits, labels) == pytest.approx(100.0)


def test_a_val_folder_is_the_validation_split(cifar_small, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(cifar_small, root)
    shutil.copytree(cifar_small / "test", root / "val")
    data = load_dataset("imagefolder", root, val_size=0.5)
    assert len(data.val) == 100 and len(data.train) == 300  # val/ as given; train/ not split
    assert np.array_equal(data.val.x, data.test.x)
