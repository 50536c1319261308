"""cigl-export: packed safetensors round trips, ONNX checks against torch on real images, safety."""

import json
import math
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from conftest import assert_one_line_error, make_model_pt, run_cli
from safetensors.torch import load_file

import cigl.export as cx
from cigl.errors import FormatError, InputError
from cigl.export import onnx_export
from cigl.models import create_model
from cigl.serve.session import open_session

EXPORT = os.path.join(os.path.dirname(sys.executable), "cigl-export")


@pytest.fixture(scope="module")
def digits_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    src = make_model_pt(root / "run" / "model.pt", "resnet20")
    proc = run_cli(EXPORT, str(src))
    assert proc.returncode == 0, proc.stderr
    return src, proc.stdout


def test_fp32_round_trip_is_exact(digits_export):
    src, stdout = digits_export
    ckpt = torch.load(src, weights_only=True)
    state = cx.load_state_dict(src.parent / "model.safetensors")
    assert state.keys() == ckpt["state_dict"].keys()
    for k, v in ckpt["state_dict"].items():
        assert torch.equal(state[k], v), k
    model = cx.load_model(src.parent / "model.safetensors")
    x = torch.randn(4, 1, 8, 8)
    ref = create_model("resnet20", num_classes=10, in_chans=1, image_size=8)
    ref.load_state_dict(ckpt["state_dict"])
    assert torch.equal(model(x), ref.eval()(x))
    assert "compression" in stdout and "layers.8.conv2.weight" in stdout


def test_save_refuses_masks_for_tensors_the_model_lacks(digits_export, tmp_path):
    """A mask under a name the state dict does not have (a typo, another model's masks) was
    silently dropped, leaving that layer unpacked and its sparsity unrecorded."""
    src, _ = digits_export
    ckpt = torch.load(src, weights_only=True)
    masks = dict(ckpt["masks"]) | {"layer9.conv1.weight": torch.ones(3, 3, dtype=torch.bool)}
    with pytest.raises(InputError, match="masks name 1 tensor.*'layer9.conv1.weight'"):
        cx.save(ckpt["state_dict"], tmp_path / "m.safetensors", masks=masks)
    assert not (tmp_path / "m.safetensors").exists()


def _formula_bytes(ckpt):
    """4 x nnz + numel / 8 for packed tensors, plus every other tensor at its size."""
    expected = 0
    for name, t in ckpt["state_dict"].items():
        mask = ckpt["masks"].get(name)
        if mask is not None and not bool(mask.all()):
            expected += 4 * int(mask.sum()) + math.ceil(t.numel() / 8)
        else:
            expected += t.numel() * t.element_size()
    return expected


def test_file_size_matches_formula(tmp_path, digits_export):
    src, _ = digits_export
    path = src.parent / "model.safetensors"
    header = int.from_bytes(path.read_bytes()[:8], "little")
    # the data section is exactly the formula; the rest is the JSON header (names, shapes, card)
    assert path.stat().st_size - 8 - header == _formula_bytes(torch.load(src, weights_only=True))
    # for a model of some size the header is noise: within 2% of the formula (CIFAR ResNet-50, density 0.1)
    wrn = make_model_pt(tmp_path / "r50" / "model.pt", "resnet50", in_chans=3, size=32)
    assert run_cli(EXPORT, str(wrn), "--no-onnx").returncode == 0
    expected = _formula_bytes(torch.load(wrn, weights_only=True))
    assert expected <= (wrn.parent / "model.safetensors").stat().st_size <= 1.02 * expected


def test_fp16_within_rounding(tmp_path, digits_export):
    src, _ = digits_export
    assert run_cli(EXPORT, str(src), "--fp16", "--no-onnx", "--out", str(tmp_path)).returncode == 0
    half, full = (
        cx.load_state_dict(tmp_path / "model.safetensors"),
        cx.load_state_dict(src.parent / "model.safetensors"),
    )
    for k, v in full.items():
        assert torch.equal(half[k] == 0, v == 0)
        assert torch.allclose(half[k].float(), v.float(), rtol=1e-3, atol=1e-4), k
    assert (tmp_path / "model.safetensors").stat().st_size < 0.7 * (src.parent / "model.safetensors").stat().st_size
    assert not (tmp_path / "model.onnx").exists()


def test_onnx_metadata_probs_and_sparse_storage(digits_export):
    src, _ = digits_export
    proto = onnx.load(str(src.parent / "model.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.opset_import[0].version >= 17
    meta = {p.key: p.value for p in proto.metadata_props}
    st_meta = cx.read_metadata(src.parent / "model.safetensors")
    assert {k: v for k, v in st_meta.items() if k not in ("packed", "format", "format_version")} == meta
    assert json.loads(meta["input_size"]) == [1, 8, 8] and float(meta["temperature"]) == pytest.approx(1.3)
    assert json.loads(meta["classes"]) == [str(i) for i in range(10)] and meta["arch"] == "resnet20"
    assert [i.name for i in proto.graph.input] == ["images"]
    assert [o.name for o in proto.graph.output] == ["logits", "probs"]
    session = open_session((src.parent / "model.onnx").read_bytes(), threads=1)
    x = np.random.default_rng(0).normal(size=(5, 1, 8, 8)).astype(np.float32)
    logits, probs = session.run(None, {"images": x})
    z = logits / 1.3
    expected = np.exp(z - z.max(1, keepdims=True))
    assert np.allclose(probs, expected / expected.sum(1, keepdims=True), atol=1e-6)
    # the packed ONNX is much smaller than the dense weights
    dense_bytes = sum(4 * v.numel() for v in torch.load(src, weights_only=True)["state_dict"].values())
    assert (src.parent / "model.onnx").stat().st_size < 0.3 * dense_bytes


def test_reexport_is_byte_identical(tmp_path, digits_export):
    src, _ = digits_export
    assert run_cli(EXPORT, str(src), "--out", str(tmp_path)).returncode == 0
    for name in ("model.safetensors", "model.onnx"):
        assert (tmp_path / name).read_bytes() == (src.parent / name).read_bytes(), name


@pytest.mark.parametrize("arch", ["resnet20", "wrn22_2", "resnet18"])
def test_onnx_matches_torch_on_cifar_images(tmp_path, cifar_small, arch):
    src = make_model_pt(
        tmp_path / "run" / "model.pt", arch, dataset="cifar10", data_dir=str(cifar_small), in_chans=3, size=32
    )
    proc = run_cli(EXPORT, str(src))  # the export itself compares ORT with torch on the run's test images
    assert proc.returncode == 0, proc.stderr
    from cigl.data import load_dataset
    from cigl.pipeline import normalize, to_device

    x, _ = to_device(load_dataset("cifar10", cifar_small).test, torch.device("cpu"))
    images = normalize(x, (0.5,) * 3, (0.25,) * 3)
    model = cx.load_model(src.parent / "model.safetensors")
    with torch.no_grad():
        ref = model(images).numpy()
    logits, _ = open_session((src.parent / "model.onnx").read_bytes(), threads=1).run(None, {"images": images.numpy()})
    assert np.abs(logits - ref).max() <= 1e-4 and np.array_equal(logits.argmax(1), ref.argmax(1))


def test_dense_safetensors_load_into_fresh_timm_model(tmp_path, cifar_small):
    import timm

    src = make_model_pt(
        tmp_path / "run" / "model.pt",
        "mobilenetv3_small_050",
        dataset="cifar10",
        data_dir=str(cifar_small),
        in_chans=3,
        size=32,
    )
    proc = run_cli(EXPORT, str(src), "--dense", "--check-data", str(cifar_small / "test"))
    assert proc.returncode == 0, proc.stderr
    fresh = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=10)
    fresh.load_state_dict(load_file(src.parent / "model.safetensors"), strict=True)
    ckpt = torch.load(src, weights_only=True)
    assert torch.equal(fresh.state_dict()["conv_stem.weight"], ckpt["state_dict"]["conv_stem.weight"])


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_malformed_inputs_give_one_line_errors(tmp_path, digits_export):
    src, _ = digits_export
    good = src.read_bytes()
    cases = []
    truncated = tmp_path / "truncated" / "model.pt"
    truncated.parent.mkdir()
    truncated.write_bytes(good[: len(good) // 2])
    cases.append((truncated, "corrupt or truncated"))
    evil = tmp_path / "evil" / "model.pt"
    evil.parent.mkdir()
    marker = tmp_path / "pwned"
    with open(evil, "wb") as f:
        pickle.dump({"format": "cigl-model", "x": _Payload(str(marker))}, f)
    cases.append((evil, "needs arbitrary code"))
    nomask = tmp_path / "nomask" / "model.pt"
    nomask.parent.mkdir()
    ckpt = torch.load(src, weights_only=True)
    torch.save({k: v for k, v in ckpt.items() if k != "masks"}, nomask)
    cases.append((nomask, "lacks masks"))
    nan = tmp_path / "nan" / "model.pt"
    nan.parent.mkdir()
    bad = dict(ckpt)
    bad["state_dict"] = dict(ckpt["state_dict"])
    bad["state_dict"]["fc.bias"] = torch.full((10,), float("nan"))
    torch.save(bad, nan)
    cases.append((nan, "NaN or Inf"))
    for path, needle in cases:
        proc = run_cli(EXPORT, str(path))
        assert_one_line_error(proc, needle)
        assert sorted(p.name for p in path.parent.iterdir()) == ["model.pt"], path  # nothing written
    assert not marker.exists()
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    assert_one_line_error(run_cli(EXPORT, "--inspect", str(corrupt)), "not a valid safetensors file")
    with pytest.raises(FormatError, match="it is a torch file .*: cigl-export writes the safetensors"):
        cx.load_model(src)  # the model.pt where its safetensors belongs
    with pytest.raises(InputError, match="file not found"):
        cx.load_state_dict(tmp_path / "none.safetensors")
    assert_one_line_error(run_cli(EXPORT, str(src), "--opset", "13"), "--opset must be >= 17")


def test_exporting_a_checkpoint_names_the_model_to_export(digits_export, tmp_path):
    """last.pt is the training checkpoint: export names the run's model.pt, or how to get one."""
    src, _ = digits_export
    torch.save({"format": "cigl-checkpoint", "version": 1, "step": 3}, tmp_path / "last.pt")
    unfinished = run_cli(EXPORT, str(tmp_path / "last.pt"))
    assert_one_line_error(unfinished, f"training checkpoint: cigl-train --resume {tmp_path} finishes the run")
    shutil.copy(src, tmp_path / "model.pt")
    assert_one_line_error(run_cli(EXPORT, str(tmp_path / "last.pt")), f"pass {tmp_path / 'model.pt'}, the model")


def test_inspect_prints_the_table(digits_export, tmp_path):
    src, _ = digits_export
    for name in ("model.safetensors", "model.onnx", ""):  # "": the run folder stands for its safetensors
        proc = run_cli(EXPORT, "--inspect", str(src.parent / name))
        assert proc.returncode == 0, proc.stderr
        assert "packed" in proc.stdout and "arch: resnet20" in proc.stdout and "nonzeros" in proc.stdout
    (tmp_path / "model.pt").write_bytes(src.read_bytes())
    assert_one_line_error(run_cli(EXPORT, "--inspect", str(tmp_path)), f"cigl-export {tmp_path / 'model.pt'} writes it")
    # a reader that stops early (`cigl-export --inspect F | head -1`) is not an error
    proc = subprocess.Popen([EXPORT, "--inspect", str(src.parent)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    assert proc.wait() == 0 and proc.stderr.read() == b""


def test_check_data_in_other_channels_and_conflicting_options(digits_export, cifar_small, tmp_path):
    """A 1-channel model checked on RGB images converts them to grayscale, as cigl-predict does;
    --fp16 with --dense (which packs nothing to store as float16) is refused, writing nothing."""
    src, _ = digits_export
    proc = run_cli(EXPORT, str(src), "--check-data", str(cifar_small), "--out", str(tmp_path / "rgb"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "rgb" / "model.onnx").is_file()
    assert_one_line_error(run_cli(EXPORT, str(src), "--fp16", "--dense", "--out", str(tmp_path / "x")), "drop one")
    assert not (tmp_path / "x").exists()


def test_a_model_torch_cannot_export_is_a_one_line_error(capfd):
    """torch.onnx fails on adaptive pooling to a size that does not divide the input: the user
    gets why in one line, without the TorchScript graph torch dumps to stdout."""
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten())
    with pytest.raises(FormatError) as err:
        onnx_export.torch_to_onnx(model, 1.0, (1, 9, 9), 18)
    message = str(err.value)
    assert message.startswith("torch cannot export this model to ONNX at input [1, 9, 9] (Unsupported: ")
    assert "adaptive_avg_pool2d" in message and message.endswith("pass --no-onnx to write model.safetensors only")
    assert "\n" not in message and "Please feel free" not in message
    out, errors = capfd.readouterr()
    assert "graph" not in out + errors
