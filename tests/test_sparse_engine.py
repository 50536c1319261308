"""cigl's sparse CPU engine: the same logits as onnxruntime on real exported models, the kernels
against torch's convolution, the fallback for graphs it does not run, and --engine."""

from __future__ import annotations

import json
import os
import platform
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import assert_one_line_error, make_model_pt, run_cli

from cigl.errors import FormatError
from cigl.serve.engines import AUTO_MARGIN, Auto, OnnxRuntime, open_engine
from cigl.serve.predictor import Predictor
from cigl.serve.sparse_engine import SparseEngine, kernels
from cigl.serve.sparse_engine.layers import Conv, Linear, SparseWeight, Subsample
from cigl.serve.sparse_engine.layout import Planes
from cigl.serve.sparse_engine.ops import pool
from cigl.train import TrainConfig, train

pytest.importorskip("numba")

BIN = os.path.dirname(sys.executable)
EXPORT, PREDICT = os.path.join(BIN, "cigl-export"), os.path.join(BIN, "cigl-predict")
ARCHS = ("resnet20", "wrn22_2", "resnet18")


def assert_matches(engine_out, ort_out) -> None:
    """The issue's parity bar: max |logits diff| <= 1e-4 of the logits' scale, same argmax."""
    (logits, probs), (ref_logits, ref_probs) = engine_out, ort_out
    scale = np.abs(ref_logits).max()
    assert np.abs(logits - ref_logits).max() <= 1e-4 * scale
    assert np.abs(probs - ref_probs).max() <= 1e-4
    np.testing.assert_array_equal(logits.argmax(1), ref_logits.argmax(1))


@pytest.fixture(scope="module")
def digits_models(tmp_path_factory) -> dict[str, str]:
    """Each architecture trained with CigL on digits (1 epoch) and exported."""
    root = tmp_path_factory.mktemp("engine")
    out = {}
    for arch in ARCHS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "only 3 mask updates": a short run on purpose
            cfg = TrainConfig(method="cigl", model=arch, epochs=1, batch_size=64, update_every=3, out=str(root / arch))
            train(cfg, quiet=True)
        assert run_cli(EXPORT, str(root / arch / "model.pt")).returncode == 0
        out[arch] = str(root / arch / "model.onnx")
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_engine_matches_onnxruntime_on_trained_digits_models(digits_models, arch):
    from cigl.data import load_dataset

    ort = Predictor(digits_models[arch], device="cpu", engine="onnxruntime")
    sparse = Predictor(digits_models[arch], device="cpu", engine="sparse")
    assert (ort.provider, sparse.provider) == ("CPUExecutionProvider", "sparse")
    x = ort.normalize(load_dataset("digits").test.x)
    assert_matches(sparse.predict(x), ort.predict(x))
    assert_matches(sparse.predict(x[:1]), ort.predict(x[:1]))  # batch 1 takes the same path
    # packed weights stay packed: no dense copy of a sparse layer in the engine
    program = sparse.engine.program
    assert program.packed and not set(program.packed) & set(program.consts)
    assert all(w.index.size < np.prod(w.shape) for w in program.packed.values())


AVX2_RUN = """
import sys
import numpy as np
from cigl.data import load_dataset
from cigl.serve.predictor import Predictor
from cigl.serve.sparse_engine import kernels, quads
assert kernels.VEC == quads.VEC == 8 and quads.QUAD_VECTORS == 3, (kernels.VEC, quads.VEC)
out, outputs = sys.argv[1], {}
for i, path in enumerate(sys.argv[2:]):
    x = None
    for name, engine, quad_from in (("ort", "onnxruntime", None), ("rows", "sparse", 2.0), ("quads", "sparse", 0.0)):
        if quad_from is not None:
            quads.QUAD_MIN_DENSITY = quad_from  # every layer on one kernel
        predictor = Predictor(path, device="cpu", engine=engine)
        x = predictor.normalize(load_dataset("digits").test.x) if x is None else x
        for batch in (len(x), 1):
            outputs[f"{i}-{name}-{batch}"] = np.stack(predictor.predict(x[:batch]))
np.savez(out, **outputs)
"""


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="AVX2 code is x86-64's")
def test_avx2_code_matches_onnxruntime(tmp_path, digits_models):
    """The kernels compiled for a CPU without AVX-512 (8-float row tiles, 4 x 3 quad tiles: what
    an AVX2-only machine runs, and what an AVX-512 CI machine never would) give onnxruntime's
    outputs, each kernel forced onto every layer, at full batch and at batch 1 (strided layers,
    residuals, partial sums and short rows)."""
    env = {**os.environ, "NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": "", "NUMBA_CACHE_DIR": str(tmp_path / "nc")}
    paths = [digits_models[arch] for arch in ARCHS]
    proc = run_cli("-c", AVX2_RUN, str(tmp_path / "out.npz"), *paths, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outputs = np.load(tmp_path / "out.npz")
    references = [key for key in outputs.files if "-ort-" in key]
    assert len(references) == 2 * len(paths)  # full batch and batch 1
    for key in references:
        for kind in ("rows", "quads"):
            assert_matches(tuple(outputs[key.replace("-ort-", f"-{kind}-")]), tuple(outputs[key]))


def test_engine_thread_counts_do_not_leak_between_engines(digits_models, monkeypatch):
    """numba's thread count is global: an engine limited to one thread must not leave another
    engine (or a later run) on one thread (every run here is large enough for all cores)."""
    import numba

    from cigl.serve import sparse_engine

    monkeypatch.setattr(sparse_engine, "SERIAL_MACS", 0)
    model = Path(digits_models["resnet20"]).read_bytes()
    one, every = SparseEngine(model, threads=1), SparseEngine(model)
    x = np.zeros((2, *next(iter(every.inputs.values()))[1:]), np.float32)
    one.run(x)
    assert numba.get_num_threads() == 1
    every.run(x)
    assert numba.get_num_threads() == numba.config.NUMBA_NUM_THREADS


@pytest.mark.skipif(os.cpu_count() < 2, reason="one core: every run is on one thread")
def test_a_small_run_takes_one_thread_while_the_worker_sleeps(digits_models, monkeypatch):
    """With threads 0 a run of fewer than SERIAL_MACS multiply-adds runs on one thread (waking
    the sleeping worker costs more than it saves) unless a run on several threads ended less
    than IDLE ago (the worker still spins); a larger one runs on every core; the count is made
    at load (the model fixes its image size), so the first run already takes one thread, and an
    explicit thread count always holds."""
    import types

    import numba

    from cigl.serve import sparse_engine

    model = Path(digits_models["resnet20"]).read_bytes()
    engine, two = SparseEngine(model), SparseEngine(model, threads=2)
    x = np.random.default_rng(0).standard_normal((8, *next(iter(engine.inputs.values()))[1:])).astype(np.float32)
    per_image = sum(step["macs_per_image"] for step in engine.profile(x[:1]))
    assert per_image > 100_000  # a ResNet-20 on 8x8 digits at density 0.1
    monkeypatch.setattr(sparse_engine, "SERIAL_MACS", 4 * per_image)
    reference = {batch: two.run(x[:batch])[0] for batch in (2, 3, 4, 8)}
    assert numba.get_num_threads() == 2
    clock = [0.0]  # seconds; each run below starts 1 s after the last unless `soon`
    monkeypatch.setattr(sparse_engine, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(sparse_engine, "_parallel_end", -float("inf"))
    cores = numba.config.NUMBA_NUM_THREADS
    engine, threads = SparseEngine(model), {}
    runs = [(2, False), (2, False), (3, False), (4, False), (3, True), (2, True), (8, False), (2, False), (2, True)]
    for batch, soon in runs:
        clock[0] += sparse_engine.IDLE / 2 if soon else 1.0
        logits, _ = engine.run(x[:batch])
        threads.setdefault(batch, []).append(numba.get_num_threads())
        np.testing.assert_allclose(logits, reference[batch], rtol=0, atol=0)  # same sums either way
    # soon after a run on all cores (batch 4): all cores; soon after one on one thread: still one
    assert threads == {2: [1, 1, cores, 1, 1], 3: [1, cores], 4: [cores], 8: [cores]}


CIFAR_CASES = [
    ("resnet20", 32),
    ("wrn22_2", 32),
    ("resnet18", 32),
    ("resnet18", 72),
    ("resnet10t", 32),
    ("seresnet18", 32),
    ("resnet50", 32),
    ("densenet121", 32),
    ("repvgg_a0", 32),
    ("regnetx_002", 32),
    ("resnext26ts", 32),
    ("mobilenetv2_050", 32),
    ("mobilenetv3_small_050", 32),
    ("cspresnet50", 32),
]


def _on_cifar_images(tmp_path, cifar_small, arch: str, size: int) -> Predictor:
    """`arch` with ERK masks at density 0.05, exported, on the 100 real CIFAR-10 test JPEGs: the
    sparse engine's predictions match onnxruntime's (assert_matches). Returns its Predictor."""
    from cigl.data import CIFAR10_CLASSES

    src = make_model_pt(
        tmp_path / "run" / "model.pt",
        arch,
        dataset="cifar10",
        data_dir=str(cifar_small),
        in_chans=3,
        size=size,
        classes=CIFAR10_CLASSES,
        density=0.05,
    )
    assert run_cli(EXPORT, str(src), "--check-data", str(cifar_small / "test")).returncode == 0
    model = src.parent / "model.onnx"
    ort = Predictor(model, device="cpu", engine="onnxruntime")
    sparse = Predictor(model, device="cpu", engine="sparse")
    assert isinstance(sparse.engine, SparseEngine)  # no fallback
    files = sorted((cifar_small / "test").rglob("*.jpg"))
    x = ort.normalize(np.stack([ort.load_image(f) for f in files]))
    assert len(x) == 100
    assert_matches(sparse.predict(x), ort.predict(x))
    return sparse


@pytest.mark.parametrize(("arch", "size"), CIFAR_CASES)
def test_engine_matches_onnxruntime_on_cifar_images(tmp_path, cifar_small, arch, size):
    """Exported ERK-sparse models on real CIFAR-10 test JPEGs, and the steps each one needs.
    Above 64 pixels timm's ResNet-18 keeps its 7x7 stride-2 stem and max pool; resnet10t has a
    deep stem and average-pool shortcuts; seresnet18 a squeeze-and-excitation gate in every block
    (ReduceMean, 1x1 convolutions, Sigmoid, then a per-channel Mul that takes the block's
    residual Add and ReLU); resnet50 bottlenecks; densenet121 concatenated features and
    average-pool transitions; repvgg_a0 (as trained: 3x3, 1x1 and identity branches added);
    regnetx_002 grouped convolutions; resnext26ts grouped convolutions and SiLU (x * Sigmoid(x),
    one step on planes); the MobileNets depthwise convolutions, ReLU6 (Clip), HardSwish and
    HardSigmoid gates; cspresnet50 LeakyRelu and Split."""
    sparse = _on_cifar_images(tmp_path, cifar_small, arch, size)
    kinds = {s.label for s in sparse.engine.program.steps}
    assert ("MaxPool" in kinds) == (size > 64 or arch in ("resnet10t", "densenet121", "resnext26ts", "cspresnet50"))
    assert ("Concat" in kinds) == (arch in ("densenet121", "cspresnet50"))
    assert ("Split" in kinds) == ("LeakyRelu" in kinds) == (arch == "cspresnet50")
    assert ("Clip" in kinds) == (arch == "mobilenetv2_050")
    assert ("HardSwish" in kinds) == ("HardSigmoid" in kinds) == (arch == "mobilenetv3_small_050")
    assert ("Mul+Add+Relu" in kinds) == (arch == "seresnet18")
    assert ("SiLU" in kinds) == (arch == "resnext26ts") and ("Sigmoid" in kinds) == (arch == "seresnet18")
    convs = [s.layer for s in sparse.engine.program.steps if isinstance(s.layer, Conv)]
    assert any(c.groups > 1 for c in convs) == (arch in ("regnetx_002", "resnext26ts") or "mobilenet" in arch)


# the rest of the architectures README lists as supported (resnet34, resnext50_32x4d and
# wide_resnet50_2 are resnet18's and resnet50's blocks at other depths and widths: not repeated)
OTHER_SUPPORTED = (
    "resnet18d",
    "resnetrs50",
    "seresnext26d_32x4d",
    "regnety_002",
    "regnetz_005",
    "dla34",
    "vovnet39a",
    "selecsls42b",
    "gernet_s",
    "resnetv2_50",
    "efficientnet_b0",
    "mnasnet_050",
    "lcnet_050",
    "ghostnet_050",
    "rexnet_100",
    "mixnet_s",
)


@pytest.mark.parametrize("arch", OTHER_SUPPORTED)
def test_every_other_supported_architecture_matches_onnxruntime_on_cifar_images(tmp_path, cifar_small, arch):
    _on_cifar_images(tmp_path, cifar_small, arch, 32)


CONV_CASES = [  # (in, out, kernel, stride, pads top/left/bottom/right, height, width, groups)
    (8, 16, 3, 1, (1, 1, 1, 1), 9, 7, 1),  # direct
    (8, 16, 1, 1, (0, 0, 0, 0), 6, 6, 1),  # direct, 1x1
    (8, 16, 3, 2, (1, 1, 1, 1), 9, 8, 1),  # stride phases, written straight into planes
    (8, 16, 1, 2, (0, 0, 0, 0), 8, 8, 1),  # 1x1 downsample
    (3, 8, 7, 2, (3, 3, 3, 3), 16, 15, 1),  # timm stem: phases reach 3 steps, scattered
    (4, 6, 5, 1, (2, 2, 2, 2), 7, 7, 1),  # padding 2
    (4, 6, 3, 1, (0, 0, 0, 0), 7, 7, 1),  # valid convolution
    (4, 6, 2, 1, (0, 0, 1, 1), 5, 6, 1),  # asymmetric padding
    (8, 16, 3, 1, (1, 1, 1, 1), 9, 7, 4),  # grouped (ResNeXt, RegNet)
    (8, 8, 3, 2, (1, 1, 1, 1), 9, 8, 8),  # depthwise, strided (MobileNets, EfficientNets)
]


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kind", ["rows", "quads"])
def test_sparse_conv_matches_torch(case, threads, kind, monkeypatch):
    """Every convolution geometry, grouped ones too, on either kernel (the density rule forced each way)."""
    import numba

    from cigl.serve.sparse_engine import quads

    monkeypatch.setattr(quads, "QUAD_MIN_DENSITY", 0.0 if kind == "quads" else 2.0)
    c_in, c_out, k, stride, pads, h, w, groups = case
    gen = torch.Generator().manual_seed(0)
    shape = (c_out, c_in // groups, k, k)
    weight = torch.randn(*shape, generator=gen) * (torch.rand(*shape, generator=gen) < (0.3 if groups == 1 else 0.6))
    bias, x = torch.randn(c_out, generator=gen), torch.randn(3, c_in, h, w, generator=gen)
    conv = Conv(SparseWeight.from_dense(weight.numpy()), bias.numpy(), (stride, stride), pads, groups)
    residual = torch.randn(3, c_out, *conv.output_size(h, w), generator=gen)
    padded = torch.nn.functional.pad(x, (pads[1], pads[3], pads[0], pads[2]))
    conv2d = torch.nn.functional.conv2d(padded, weight, bias, stride=stride, groups=groups)
    expected = torch.relu(conv2d + residual).numpy()
    numba.set_num_threads(threads)
    try:
        out = conv(Planes.from_nchw(x.numpy()), Planes.from_nchw(residual.numpy()), relu=True)
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    np.testing.assert_allclose(out.nchw(), expected, rtol=1e-5, atol=1e-5)
    assert {type(t) for t in conv.tables.values()} == {quads.QuadTables if kind == "quads" else kernels.RowTables}
    with pytest.raises(FormatError, match=f"a convolution of {c_in} input channels is given {c_in + 1}"):
        conv(Planes.from_nchw(torch.randn(3, c_in + 1, h, w, generator=gen).numpy()))  # a malformed graph's
    # padding of the output planes stays zero: the next convolution reads it
    kept = out.data.copy()
    out.grid.interior(kept)[...] = 0
    assert not kept.any()


@pytest.mark.parametrize("kind", ["rows", "quads"])
@pytest.mark.parametrize("length", [1, 7, 8, 13, 16, 25, 40, 63, 64, 65, 81, 95, 97, 120, 200])
@pytest.mark.parametrize(("epilogue", "parts"), [(True, 1), (False, 1), (True, 3)], ids=["epilogue", "plain", "parts"])
def test_sparse_conv_kernels_cover_every_output_length(length, epilogue, parts, kind):
    """Both kernels (row tables, and quad tables: four rows at a time by tap pattern) against a
    float64 loop of their formula, for outputs shorter than a vector (scalar path), tiles of
    every width (the last one overlapping; a row shorter than a tile in one tile whose last
    vector overlaps: 25, 63 and 120 with 16-float vectors), rows cut into parts (partial sums carried between
    them), empty rows (the bias), rows longer than a tile's worth of nonzeros, a last quad of
    three rows, a tap given twice in a row, and both job orders (block by block at the short
    lengths, where the tables outweigh the input); nothing outside out[:, shift : shift +
    length] is written."""
    from cigl.serve.sparse_engine import kernels, quads

    rng = np.random.default_rng(length)
    n_planes, reach, shift = 5, 11, 3
    counts = [0, 1, 3, 9, 0, 70, 2]
    rows = np.repeat(np.arange(len(counts)), counts)
    planes = rng.integers(0, n_planes, rows.size)
    widest = 8 * kernels.VEC if kind == "rows" else quads.QUAD_VECTORS * quads.VEC
    span = kernels.WINDOW_BYTES // 4 // (-(-n_planes // parts)) - widest  # n_planes in `parts` parts
    offs = rng.integers(0, reach + 1, rows.size)
    vals, bias = rng.standard_normal(rows.size).astype(np.float32), rng.standard_normal(len(counts)).astype(np.float32)
    if kind == "rows":
        tables = kernels.row_tables(rows, planes, offs, vals, span, len(counts))
        assert tables.bounds.shape == (parts, len(counts) + 1)
    else:
        tables = quads.quad_tables(rows, planes, offs, vals, span, len(counts))
        assert tables.bounds.shape == (parts, 2, 16)
    src = rng.standard_normal((n_planes, length + reach)).astype(np.float32)
    width = shift + length + 2
    if epilogue:
        residual = rng.standard_normal((len(counts), width)).astype(np.float32)
        keep = (rng.random(width) < 0.7).astype(np.float32)
    else:
        residual, keep = kernels.NO_RESIDUAL, kernels.NO_MASK
    out = np.full((len(counts), width), np.nan, np.float32)
    tables.call(src, bias, out, shift, length, residual, keep, epilogue)()
    expected = np.zeros((len(counts), length))
    for o in range(len(counts)):
        expected[o] = bias[o]
        for k in np.flatnonzero(rows == o):
            expected[o] += np.float64(vals[k]) * src[planes[k], offs[k] : offs[k] + length]
    if epilogue:
        expected = np.maximum(expected + residual[:, shift : shift + length], 0) * keep[shift : shift + length]
    np.testing.assert_allclose(out[:, shift : shift + length], expected, rtol=1e-5, atol=1e-5)
    assert np.isnan(out[:, :shift]).all() and np.isnan(out[:, shift + length :]).all()
    # a layer without output rows is a no-op, not a division by zero in the job split
    empty = kernels.row_tables(rows[:0], planes[:0], offs[:0], vals[:0], span, 0)
    empty.call(src, bias[:0], out[:0], shift, length, residual[:0], keep, epilogue)()
    empty = quads.quad_tables(rows[:0], planes[:0], offs[:0], vals[:0], span, 0)
    empty.call(src, bias[:0], out[:0], shift, length, residual[:0], keep, epilogue)()


def test_layers_from_quad_min_density_run_on_quads():
    """The documented rule: a layer whose weight density reaches QUAD_MIN_DENSITY (0.12 with
    AVX-512, 0.45 with AVX2) runs on quad tiles, a sparser one on rows; both give torch's result."""
    from cigl.serve.sparse_engine import quads

    assert (0.12 if quads.VEC == 16 else 0.45) == quads.QUAD_MIN_DENSITY
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 16, 9, 9, generator=gen)
    for density in (quads.QUAD_MIN_DENSITY + 0.05, quads.QUAD_MIN_DENSITY - 0.05):
        weight = torch.randn(8, 16, 3, 3, generator=gen) * (torch.rand(8, 16, 3, 3, generator=gen) < density)
        conv = Conv(SparseWeight.from_dense(weight.numpy()), np.zeros(8, np.float32), (1, 1), (1, 1, 1, 1))
        out = conv(Planes.from_nchw(x.numpy()))
        expected = torch.nn.functional.conv2d(x, weight, padding=1).numpy()
        np.testing.assert_allclose(out.nchw(), expected, rtol=1e-5, atol=1e-5)
        kind = quads.QuadTables if conv.weight.density >= quads.QUAD_MIN_DENSITY else kernels.RowTables
        assert [type(t) for t in conv.tables.values()] == [kind]
        assert kind is (quads.QuadTables if density > quads.QUAD_MIN_DENSITY else kernels.RowTables)


def test_part_bounds_cut_rows_by_plane_groups():
    """Nonzeros sorted by group of the planes they read (a part: at most as many as fit the
    window, the parts as even as can be), then row, then plane; a row's nonzeros in a part are
    one run (an empty row: an empty run), and a part is one run of the tables."""
    from cigl.serve.sparse_engine import kernels

    span = kernels.WINDOW_BYTES // 16 - 8 * kernels.VEC  # a plane's window is a quarter of WINDOW_BYTES
    rows = np.array([0, 0, 0, 2, 2, 2, 2])
    planes = np.array([9, 0, 4, 3, 8, 1, 2])
    order, bounds = kernels.part_bounds(rows, planes, span, 3)
    # planes 5-7 are read by no nonzero: the seven read go in parts of four and three
    np.testing.assert_array_equal(planes[order], [0, 1, 2, 3, 4, 9, 8])
    np.testing.assert_array_equal(rows[order], [0, 2, 2, 2, 0, 0, 2])
    np.testing.assert_array_equal(bounds, [[0, 1, 1, 4], [4, 6, 6, 7]])
    # nine planes at up to four a part: three parts of three, not 4 + 4 + 1
    order, bounds = kernels.part_bounds(np.zeros(9, int), np.arange(9)[::-1], span, 1)
    np.testing.assert_array_equal(bounds, [[0, 3], [3, 6], [6, 9]])


def test_taps_hold_plane_and_offset_in_one_int32():
    """A nonzero's plane and offset share one int32 (offset in the low bits); tables that would
    need more than 31 bits are refused, not wrapped."""
    from cigl.serve.sparse_engine import kernels

    planes, offsets = np.array([0, 5, 300, 2**15]), np.array([7, 0, 70, 1])
    taps, bits = kernels.pack_taps(planes, offsets)
    assert taps.dtype == np.int32 and bits == 7
    np.testing.assert_array_equal(taps >> bits, planes)
    np.testing.assert_array_equal(taps & (2**bits - 1), offsets)
    with pytest.raises(ValueError, match="do not fit the kernel's 31-bit taps"):
        kernels.pack_taps(np.array([2**20]), np.array([2**11]))


@pytest.mark.parametrize("taps", [[(1, 1)], [(0, 2), (2, 0)], []], ids=["centre", "corners", "none"])
def test_strided_conv_gathers_only_the_phases_its_nonzeros_read(taps):
    """A stride-2 3x3 weight whose nonzeros sit at some kernel positions only: the stride phases
    no nonzero reads are not gathered, and the result still matches torch (all-zero: the bias)."""
    gen = torch.Generator().manual_seed(1)
    weight = torch.zeros(6, 4, 3, 3)
    for kh, kw in taps:
        weight[:, :, kh, kw] = torch.randn(6, 4, generator=gen)
    bias, x = torch.randn(6, generator=gen), torch.randn(2, 4, 9, 10, generator=gen)
    conv = Conv(SparseWeight.from_dense(weight.numpy()), bias.numpy(), (2, 2), (1, 1, 1, 1))
    assert list(conv.used_phases) == sorted({(kh % 2) * 2 + kw % 2 for kh, kw in taps})
    expected = torch.nn.functional.conv2d(x, weight, bias, stride=2, padding=1).numpy()
    np.testing.assert_allclose(conv(Planes.from_nchw(x.numpy())).nchw(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("h", "w"), [(9, 10), (8, 8), (7, 5)])
def test_readers_of_a_shared_gather_match_torch(monkeypatch, h, w):
    """After a 3x3 stride-2 convolution gathers an input's stride phases, a 1x1 stride-2
    convolution and an option-A subsampling of the same input read them instead of gathering
    again, on even and odd sizes, and still give torch's and numpy's results; the subsampling
    zeroes its zero channels in a reused buffer that held other values."""
    from cigl.serve.sparse_engine import kernels
    from cigl.serve.sparse_engine.layout import BufferPool

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, h, w, generator=gen)
    w3, w1 = torch.randn(6, 4, 3, 3, generator=gen), torch.randn(5, 4, 1, 1, generator=gen)
    w3[w3.abs() < 0.5] = 0
    b3, b1 = torch.randn(6, generator=gen), torch.randn(5, generator=gen)
    conv3 = Conv(SparseWeight.from_dense(w3.numpy()), b3.numpy(), (2, 2), (1, 1, 1, 1))
    conv1 = Conv(SparseWeight.from_dense(w1.numpy()), b1.numpy(), (2, 2), (0, 0, 0, 0))
    sub = Subsample([2, 2], [0, 0], before=1, after=2)
    gathers = []
    monkeypatch.setattr(kernels, "gather_phases", lambda *a, run=kernels.gather_phases: gathers.append(a) or run(*a))
    planes = Planes.from_nchw(x.numpy())
    out3, out1, subsampled = conv3(planes).nchw(), conv1(planes).nchw(), sub(planes).nchw()
    assert len(gathers) == 1 and len(planes.phases) == 1
    torch_conv = torch.nn.functional.conv2d
    np.testing.assert_allclose(out3, torch_conv(x, w3, b3, stride=2, padding=1).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out1, torch_conv(x, w1, b1, stride=2).numpy(), rtol=1e-5, atol=1e-5)
    expected = np.pad(x.numpy()[:, :, ::2, ::2], [(0, 0), (1, 2), (0, 0), (0, 0)])
    np.testing.assert_array_equal(subsampled, expected)
    pool = BufferPool()
    stale = sub(planes, pool)
    stale.grid.interior(stale.data)[...] = 7.0  # a buffer handed back holds old values (its padding zero)
    pool.give(stale.data, planes=True)
    again = sub(planes, pool)
    assert again.data is stale.data
    np.testing.assert_array_equal(again.nchw(), expected)


def test_bound_calls_rewrite_all_they_own_on_every_run():
    """A schedule's calls run again and again on buffers that other values use in between (a
    buffer goes back to the pool after its value's last read, and later steps write it). So the
    calls must write every element of their output each time: an option-A shortcut's zero
    channels too. numpy's per-run ops are recomputed by their calls, and a view of a value
    follows it with no call."""
    from cigl.serve.sparse_engine.graph import computed
    from cigl.serve.sparse_engine.layout import run_calls

    x = np.random.default_rng(4).standard_normal((2, 3, 7, 6)).astype(np.float32)
    sub = Subsample([2, 2], [0, 0], before=2, after=1)
    out, calls = sub.bind(Planes.from_nchw(x))
    expected = np.pad(x[:, :, ::2, ::2], [(0, 0), (2, 1), (0, 0), (0, 0)])
    for _ in range(2):
        out.grid.interior(out.data)[...] = 7.0  # another value's, written between two runs
        run_calls(calls)
        np.testing.assert_array_equal(out.nchw(), expected)

    values = np.zeros((2, 3), np.float32)
    view, none = computed(lambda v: v[0].reshape(3, 2), [values])
    total, sums = computed(lambda v: v[0].sum(axis=1), [values])
    assert none == [] and len(sums) == 1
    values[:] = np.arange(6).reshape(2, 3)
    run_calls(sums)
    assert total.tolist() == [3.0, 12.0] and view.tolist() == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]


def test_a_run_returns_its_own_outputs(digits_models):
    """Runs of one input shape share the schedule's buffers; the logits and probabilities a run
    returns are copies, left as they were by the runs after it."""
    from cigl.data import load_dataset

    engine = SparseEngine(Path(digits_models["resnet20"]).read_bytes())
    x = Predictor(digits_models["resnet20"], device="cpu").normalize(load_dataset("digits").test.x[:16])
    first, second = engine.run(x[:8]), engine.run(x[8:])
    assert list(engine.program.schedules) == [(1, *x.shape[1:]), x[:8].shape]  # the trial run at load, then one
    fresh = SparseEngine(Path(digits_models["resnet20"]).read_bytes())
    for got, images in ((first, x[:8]), (second, x[8:])):
        for a, b in zip(got, fresh.run(images), strict=True):
            np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], second[0])


@pytest.mark.parametrize(
    ("steps", "starts"), [((1, 1), (0, 0)), ((2, 2), (0, 0)), ((2, 3), (1, 2)), ((1, 2), (0, 1)), ((3, 1), (2, 0))]
)
def test_subsample_writes_planes_of_the_strided_slice_with_zero_channels(steps, starts):
    """An option-A shortcut (x[:, :, a::s, b::t], then zero channels) straight into planes: the
    elements of numpy's slice and pad, and zeros everywhere else in the layout."""
    x = np.random.default_rng(2).standard_normal((3, 4, 9, 7)).astype(np.float32)
    sub = Subsample(list(steps), list(starts), before=2, after=3)
    out = sub(Planes.from_nchw(x))
    (sh, sw), (a, b) = steps, starts
    expected = np.pad(x[:, :, a::sh, b::sw], [(0, 0), (2, 3), (0, 0), (0, 0)])
    np.testing.assert_array_equal(out.nchw(), expected)
    np.testing.assert_array_equal(sub.nchw(x), expected)
    kept = out.data.copy()
    out.grid.interior(kept)[...] = 0
    assert not kept.any()


def test_reused_buffers_keep_the_layouts_zero_padding(digits_models):
    """Activation buffers are reused from run to run without clearing their padding, so only
    buffers of planes (zero padding) may come back as planes: never a scratch buffer of the same
    shape. Repeated runs on real images give the first run's logits exactly."""
    from cigl.data import load_dataset
    from cigl.serve.sparse_engine.layout import BufferPool, Grid

    grid, buffers = Grid(2, 5, 4), BufferPool()
    scratch = np.full((3, grid.length), np.nan, np.float32)  # a scratch buffer of a planes shape
    buffers.give(scratch)
    fresh = Planes.empty(3, grid, buffers)
    assert fresh.data is not scratch and buffers.take(scratch.shape) is scratch
    assert not fresh.data[:, : grid.row + 1].any() and not fresh.data[:, grid.n * grid.block + grid.row + 1 :].any()
    buffers.give(fresh.data, planes=True)
    assert Planes.empty(3, grid, buffers).data is fresh.data

    engine = SparseEngine(Path(digits_models["resnet20"]).read_bytes())
    x = Predictor(digits_models["resnet20"], device="cpu").normalize(load_dataset("digits").test.x[:24])
    first = engine.run(x[:12])[0].copy()
    engine.run(x[12:])
    np.testing.assert_array_equal(engine.run(x[:12])[0], first)


def test_buffers_and_plans_are_kept_for_a_few_input_sizes_only(digits_models):
    """A server meets many batch sizes. Schedules (with their buffers) are kept for the SCHEDULES most recent input
    shapes and call plans for PLANS sizes per convolution (kept for every size, a CIFAR ResNet-18
    held 4.7 GB after batches of 1 to 64); a size met again after its buffers went gives the same
    logits as a fresh engine."""
    from cigl.data import load_dataset
    from cigl.serve.sparse_engine import graph, layers

    engine = SparseEngine(Path(digits_models["resnet18"]).read_bytes())
    x = Predictor(digits_models["resnet18"], device="cpu").normalize(load_dataset("digits").test.x[:12])
    first = engine.run(x[:5])[0].copy()
    for n in range(1, 13):
        engine.run(x[:n])
    program = engine.program
    assert list(program.schedules) == [x[:n].shape for n in range(13 - graph.SCHEDULES, 13)]
    convs = [s.layer for s in program.steps if isinstance(s.layer, Conv)]
    assert convs and all(len(c.plans) == layers.PLANS for c in convs)
    np.testing.assert_array_equal(engine.run(x[:5])[0], first)
    np.testing.assert_array_equal(SparseEngine(Path(digits_models["resnet18"]).read_bytes()).run(x[:5])[0], first)


def test_a_convolution_keeps_tables_for_a_few_image_sizes_only():
    """Tables are per image size (a plane's row length is in every offset). A graph with free
    height and width lets a caller send ever new sizes: a convolution keeps tables (and plans)
    for the PLANS most recent ones, and a size met again after its tables went gives torch's
    result."""
    from cigl.serve.sparse_engine import layers

    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(6, 4, 3, 3, generator=gen)
    weight[weight.abs() < 0.7] = 0
    bias = torch.randn(6, generator=gen)
    for stride in ((1, 1), (2, 2)):
        conv = Conv(SparseWeight.from_dense(weight.numpy()), bias.numpy(), stride, (1, 1, 1, 1))
        sizes = [(h, h + 1) for h in range(3, 4 + layers.PLANS)]
        for h, w in [*sizes, sizes[0]]:
            x = torch.randn(2, 4, h, w, generator=gen)
            expected = torch.nn.functional.conv2d(x, weight, bias, stride=stride, padding=1).numpy()
            np.testing.assert_allclose(conv(Planes.from_nchw(x.numpy())).nchw(), expected, rtol=1e-5, atol=1e-5)
        assert len(conv.tables) == len(conv.plans) == layers.PLANS
        assert {key[:2] for key in conv.tables} == {*sizes[2:], sizes[0]}


@pytest.mark.parametrize("name", ["sparse", "onnxruntime"])
def test_engines_refuse_an_input_of_a_shape_the_model_does_not_take(digits_models, name):
    """Called directly (not through the Predictor's friendlier checks), both engines stop a
    wrong input with the same one-line InputError. The sparse engine computed answers for
    3-channel input to a 1-channel model, its first convolution reading past its buffer."""
    from cigl.errors import InputError

    model = Path(digits_models["resnet20"]).read_bytes()
    engine = open_engine(model, engine=name, device="cpu")
    x = np.zeros((2, 1, 8, 8), np.float32)
    assert engine.run(x)[0].shape == (2, 10)
    for bad in (np.zeros((2, 3, 8, 8)), x[:, :, :6], x[0], x[:0]):
        message = "empty batch: pass at least one image" if len(bad) == 0 else None
        message = message or f"the model takes inputs of shape (N, 1, 8, 8), got {bad.shape}"
        with pytest.raises(InputError) as info:
            engine.run(bad.astype(np.float32))
        assert str(info.value) == message


@pytest.mark.parametrize("arch", ARCHS)
def test_strided_shortcut_reads_the_phases_its_block_gathered(monkeypatch, digits_models, arch):
    """A downsampling block's 3x3 stride-2 convolution and its shortcut (a 1x1 stride-2
    convolution, or ResNet-20's option-A subsampling) read the same input: its stride phases are
    gathered once per block, not once per reader, and the logits still match onnxruntime on
    real digits images."""
    from cigl.data import load_dataset
    from cigl.serve.sparse_engine import kernels

    model = Path(digits_models[arch]).read_bytes()
    engine = SparseEngine(model)
    convs = [s.layer for s in engine.program.steps if s.kind == "Conv"]
    blocks = sum(c.stride == (2, 2) and c.weight.shape[2] == 3 for c in convs)
    if arch == "resnet20":
        shortcuts = [s for s in engine.program.steps if s.kind == "Slice"]
    else:
        shortcuts = [c for c in convs if c.stride == (2, 2) and c.weight.shape[2] == 1]
    assert blocks == len(shortcuts) == {"resnet20": 2, "wrn22_2": 2, "resnet18": 3}[arch]
    gathers = []
    monkeypatch.setattr(kernels, "gather_phases", lambda *a, run=kernels.gather_phases: gathers.append(a) or run(*a))
    x = Predictor(digits_models[arch], device="cpu").normalize(load_dataset("digits").test.x[:16])
    for _ in range(2):  # the plans are made on the first run, then reused
        gathers.clear()
        assert_matches(engine.run(x), open_engine(model, engine="onnxruntime", device="cpu").run(x))
        assert len(gathers) == blocks


def test_option_a_shortcut_is_one_step_on_planes(digits_models):
    """ResNet-20's Slice, Slice and Pad of each downsampling shortcut run as one planes step."""
    program = SparseEngine(Path(digits_models["resnet20"]).read_bytes()).program
    kinds = [s.label for s in program.steps]
    assert kinds[-3:] == ["Flatten", "Gemm", "Mul+Softmax"]  # the temperature folded into the Softmax
    assert kinds.count("Slice+Slice+Pad") == 2
    assert "Pad" not in kinds and "Slice" not in kinds


def test_linear_and_pooling_match_torch():
    from cigl.serve.sparse_engine import kernels

    gen = torch.Generator().manual_seed(1)
    # global average pooling of planes: per image, the sum of its block (elements and zero padding)
    planes = Planes.from_nchw(torch.randn(5, 3, 7, 6, generator=gen).numpy() + 2.0)
    means = np.empty((5, 3), np.float32)
    g = planes.grid
    kernels.plane_means(planes.data, g.n, g.block, g.h * g.w, means)
    np.testing.assert_allclose(means, planes.nchw().astype(np.float64).mean(axis=(2, 3)), rtol=1e-6)
    weight = torch.randn(10, 64, generator=gen) * (torch.rand(10, 64, generator=gen) < 0.2)
    bias, x = torch.randn(10, generator=gen), torch.randn(5, 64, generator=gen)
    out = Linear(SparseWeight.from_dense(weight.numpy()), bias.numpy())(x.numpy())
    np.testing.assert_allclose(out, torch.nn.functional.linear(x, weight, bias).numpy(), rtol=1e-5, atol=1e-5)
    f = torch.nn.functional
    for size, kernel, stride, pad, ceil in [(9, 3, 2, 1, 0), (8, 2, 2, 0, 1), (9, 2, 2, 0, 1), (10, 3, 2, 1, 1)]:
        images = torch.randn(2, 3, size, size, generator=gen)
        attrs = {"kernel_shape": [kernel] * 2, "strides": [stride] * 2, "pads": [pad] * 4, "ceil_mode": ceil}
        expected = f.max_pool2d(images, kernel, stride, pad, ceil_mode=bool(ceil)).numpy()
        np.testing.assert_array_equal(pool(images.numpy(), attrs, "MaxPool"), expected)
        for include in (0, 1):
            expected = f.avg_pool2d(images, kernel, stride, pad, ceil_mode=bool(ceil), count_include_pad=bool(include))
            got = pool(images.numpy(), {**attrs, "count_include_pad": include}, "AveragePool")
            np.testing.assert_allclose(got, expected.numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("attrs", "axes"),
    [
        ({}, [2, 3]),
        ({"keepdims": 0}, [1]),
        ({}, [-1, -2]),
        ({"keepdims": 0}, None),
        ({"noop_with_empty_axes": 1}, None),
    ],
)
def test_reduce_mean_and_sigmoid_match_the_onnx_reference(attrs, axes):
    """The numpy ops of a squeeze-and-excitation gate against onnx's reference implementation
    (opset 18: ReduceMean's axes are an input); Sigmoid with no overflow warning at +-100."""
    from onnx import TensorProto, helper
    from onnx.reference import ReferenceEvaluator

    from cigl.serve.sparse_engine.ops import OPS

    x = np.random.default_rng(3).standard_normal((2, 3, 4, 5)).astype(np.float32) * 30
    x[0, 0, 0, :3] = [-100, 100, 0]
    inputs = ["x"] + (["axes"] * (axes is not None))
    nodes = [helper.make_node("ReduceMean", inputs, ["m"], **attrs), helper.make_node("Sigmoid", ["x"], ["s"])]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("m", "s")],
        [helper.make_tensor("axes", TensorProto.INT64, [len(axes)], axes)] if axes is not None else [],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    with np.errstate(over="ignore", invalid="ignore"):  # the reference's own Sigmoid overflows at -100
        mean, sigmoid = ReferenceEvaluator(model).run(None, {"x": x})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got_mean = OPS["ReduceMean"]([x, None if axes is None else np.array(axes)], attrs)[0]
        got_sigmoid = OPS["Sigmoid"]([x], {})[0]
    assert got_mean.shape == mean.shape and got_sigmoid.dtype == np.float32
    np.testing.assert_allclose(got_mean, mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_sigmoid, sigmoid, rtol=1e-6, atol=1e-7)


def _one_input_model(nodes: list, x: np.ndarray, outputs: tuple[str, ...], weights: dict) -> onnx.ModelProto:
    """A hand-made ONNX model (opset 17) of `nodes` reading input "x" of x's shape."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _onnxruntime_outputs(model: onnx.ModelProto, x: np.ndarray, outputs: tuple[str, ...]) -> dict:
    ort = OnnxRuntime(model.SerializeToString(), device="cpu", threads=1, source="g")
    return dict(zip(outputs, ort.session.run(None, {"x": x}), strict=True))


def test_gate_mul_runs_on_planes_with_its_residual_and_relu_else_in_numpy(monkeypatch):
    """Conv -> (global mean -> Sigmoid) gate -> Mul -> Add (block input) -> Relu, as a hand-made
    ONNX graph: the Mul takes the Add and Relu and runs on planes; a Mul by a constant
    1 x C x 1 x 1 scale with the same Add and Relu runs in numpy. Both match onnxruntime."""
    from onnx import helper

    from cigl.serve.sparse_engine.graph import Program

    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 4, 6, 5)).astype(np.float32)
    weight = (rng.standard_normal((4, 4, 3, 3)) * (rng.random((4, 4, 3, 3)) < 0.4)).astype(np.float32)
    scale = rng.standard_normal((1, 4, 1, 1)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c"], ["p"]),
        helper.make_node("Sigmoid", ["p"], ["g"]),
        helper.make_node("Mul", ["c", "g"], ["m"]),
        helper.make_node("Add", ["m", "x"], ["a"]),
        helper.make_node("Relu", ["a"], ["gated"]),
        helper.make_node("Conv", ["x", "w"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Mul", ["scale", "r2"], ["m2"]),
        helper.make_node("Add", ["x", "m2"], ["a2"]),
        helper.make_node("Relu", ["a2"], ["scaled"]),
    ]
    model = _one_input_model(nodes, x, ("gated", "scaled"), {"w": weight, "scale": scale})
    program = Program(model)
    kinds = [s.label for s in program.steps]
    assert kinds.count("Mul+Add+Relu") == 2
    passes = []
    monkeypatch.setattr(kernels, "scale_channels", lambda *a, run=kernels.scale_channels: passes.append(a) or run(*a))
    got = program.run(x)
    assert len(passes) == 1  # the gate; the constant scale ran in numpy
    expected = _onnxruntime_outputs(model, x, ("gated", "scaled"))
    for name in ("gated", "scaled"):
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-5)


def test_silu_is_one_step_on_planes_and_saturates_without_warnings():
    """Conv -> x * Sigmoid(x) -> Add (the block input) -> Relu, as a hand-made ONNX graph with
    outputs far past where exp overflows (+-300): one SiLU step that takes the Add and Relu,
    equal to onnxruntime's, with no overflow warning. A Sigmoid read by something else too
    stays a step of its own."""
    from onnx import helper

    from cigl.serve.sparse_engine.graph import Program

    rng = np.random.default_rng(6)
    x = (rng.standard_normal((2, 4, 5, 6)) * 60).astype(np.float32)
    weight = (rng.standard_normal((4, 4, 3, 3)) * (rng.random((4, 4, 3, 3)) < 0.5)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["c"], ["s"]),
        helper.make_node("Mul", ["c", "s"], ["m"]),
        helper.make_node("Add", ["m", "x"], ["a"]),
        helper.make_node("Relu", ["a"], ["silu"]),
        helper.make_node("Conv", ["x", "w"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["c2"], ["s2"]),
        helper.make_node("Mul", ["s2", "c2"], ["m2"]),
        helper.make_node("Add", ["m2", "s2"], ["shared"]),
    ]
    model = _one_input_model(nodes, x, ("silu", "shared"), {"w": weight})
    program = Program(model)
    kinds = [s.label for s in program.steps]
    assert kinds.count("SiLU+Add+Relu") == 1 and kinds.count("Sigmoid") == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = program.run(x)
    expected = _onnxruntime_outputs(model, x, ("silu", "shared"))
    assert np.abs(expected["silu"]).max() > 300 and (expected["silu"] == 0).mean() > 0.2
    for name in ("silu", "shared"):
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-4)


def test_pointwise_activations_and_split_run_on_planes_and_match_onnxruntime():
    """ReLU6 (Clip 0..6), LeakyRelu (alpha below and above 1), HardSwish, a Clip with one bound,
    HardSigmoid and Split (channels, and height) in a hand-made graph of 3x3 convolutions. An
    activation that keeps 0 at 0 runs on the planes (the next convolution reads them as they are)
    and a channel Split is a view of the planes' rows (no call); one that maps 0 elsewhere (Clip
    from 0.5, HardSigmoid) runs in numpy, or the next convolution would read that value as its
    zero padding. All match onnxruntime, the image borders included."""
    from onnx import helper

    from cigl.serve.sparse_engine.graph import Program

    rng = np.random.default_rng(9)
    x = (rng.standard_normal((2, 4, 7, 6)) * 4).astype(np.float32)
    weight = (rng.standard_normal((4, 4, 3, 3)) * (rng.random((4, 4, 3, 3)) < 0.5)).astype(np.float32)
    conv = dict(pads=[1, 1, 1, 1])
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c1"], **conv),
        helper.make_node("Clip", ["c1", "zero", "six"], ["relu6"]),
        helper.make_node("Conv", ["relu6", "w"], ["c2"], **conv),
        helper.make_node("LeakyRelu", ["c2"], ["leaky"], alpha=0.1),
        helper.make_node("Conv", ["leaky", "w"], ["c3"], **conv),
        helper.make_node("HardSwish", ["c3"], ["swish"]),
        helper.make_node("Clip", ["swish", "", "six"], ["capped"]),
        helper.make_node("Clip", ["capped", "half"], ["raised"]),
        helper.make_node("Conv", ["raised", "w"], ["c4"], **conv),
        helper.make_node("HardSigmoid", ["c4"], ["gate"], alpha=0.3, beta=0.4),
        helper.make_node("Split", ["c4", "parts"], ["first", "rest"], axis=1),
        helper.make_node("Conv", ["rest", "w3"], ["c5"], **conv),
        helper.make_node("LeakyRelu", ["c1"], ["steep"], alpha=2.0),
        helper.make_node("Split", ["c2", "rows"], ["top", "bottom"], axis=2),
    ]
    outputs = ("gate", "first", "c5", "steep", "top", "bottom")
    weights = {
        "w": weight,
        "w3": weight[:, :3],
        "zero": np.array(0, np.float32),
        "six": np.array(6, np.float32),
        "half": np.array(0.5, np.float32),
        "parts": np.array([1, 3], np.int64),
        "rows": np.array([3, 4], np.int64),
    }
    model = _one_input_model(nodes, x, outputs, weights)
    program = Program(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = program.run(x)
    expected = _onnxruntime_outputs(model, x, outputs)
    gate = expected["gate"]
    assert ((gate > 0) & (gate < 1)).any() and (gate == 0).any() and (gate == 1).any()
    assert (expected["steep"] < -1).any()
    for name in outputs:  # sums of products at scale 100: rounding differs by a few 1e-7 of it
        np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=1e-5 * max(1, np.abs(expected[name]).max()))
    calls = dict(zip((s.output for s in program.steps), program.schedules[x.shape].calls, strict=True))
    assert [len(calls[n]) for n in ("relu6", "c2", "leaky", "c3", "swish", "capped")] == [1] * 6  # no layout change
    assert len(calls["c4"]) == 2  # planes made of raised (numpy): a copy, then the convolution
    assert calls["first"] == calls["rest"] == [] and len(calls["c5"]) == 1


def test_softmax_folds_the_temperature_and_matches_onnxruntime():
    """Logits -> Mul by a scalar (cigl's 1 / T) -> Softmax over the last axis: one kernel step,
    also for logits far past where exp overflows; a scaled value that is an output itself keeps
    its Mul step, and a Softmax over another axis or rank runs in numpy. All match onnxruntime."""
    from onnx import helper

    from cigl.serve.sparse_engine.graph import Program

    rng = np.random.default_rng(8)
    x = (rng.standard_normal((5, 10)) * 300).astype(np.float32)
    nodes = [
        helper.make_node("Mul", ["x", "t"], ["scaled"]),
        helper.make_node("Softmax", ["scaled"], ["probs"]),
        helper.make_node("Mul", ["t", "x"], ["kept"]),
        helper.make_node("Softmax", ["kept"], ["probs_kept"], axis=1),
        helper.make_node("Softmax", ["x"], ["columns"], axis=0),
        helper.make_node("Unsqueeze", ["x", "axes"], ["x3"]),
        helper.make_node("Softmax", ["x3"], ["probs3"]),
    ]
    outputs = ("probs", "kept", "probs_kept", "columns", "probs3")
    weights = {"t": np.array([0.37], np.float32), "axes": np.array([0], np.int64)}
    model = _one_input_model(nodes, x, outputs, weights)
    program = Program(model)
    assert [s.label for s in program.steps] == [
        "Mul+Softmax",
        "Mul",
        "Softmax",
        "Softmax",
        "Unsqueeze",
        "Softmax",
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = program.run(x)
    expected = _onnxruntime_outputs(model, x, outputs)
    assert (expected["probs"] > 0.999).any() and (expected["probs"] < 1e-30).any()
    for name in outputs:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-6)


def _with_erf(src: str, dst) -> None:
    """The model with its first Relu swapped for an Erf (an op the engine does not run)."""
    model = onnx.load(src)
    first = next(n for n in model.graph.node if n.op_type == "Relu")
    first.op_type = "Erf"
    onnx.save(model, str(dst))


def test_unsupported_graph_falls_back_to_onnxruntime_with_a_note(tmp_path, digits_models):
    from cigl.data import load_dataset

    model = tmp_path / "model.onnx"
    _with_erf(digits_models["resnet20"], model)
    with pytest.warns(UserWarning, match="uses operator Erf, which it does not run; using onnxruntime"):
        p = Predictor(model, device="cpu", engine="sparse")
    assert p.provider == "CPUExecutionProvider"
    images = load_dataset("digits").test.x[:5]
    np.save(tmp_path / "x.npy", images)
    proc = run_cli(PREDICT, str(model), str(tmp_path / "x.npy"), "--engine", "sparse")
    assert proc.returncode == 0, proc.stderr
    notes = [line for line in proc.stderr.splitlines() if "sparse engine" in line]
    note = f"warning: sparse engine: {model} uses operator Erf, which it does not run; using onnxruntime"
    assert notes == [note]
    assert proc.stdout.count("\n") == 5


def _with_input_steps(src: str, dst, nodes: list, weights: dict, open_size: bool = False) -> None:
    """The model with `nodes` (reading "images", writing "images_in") before its first layer,
    which then reads images_in; with `open_size`, the input's height and width are left open."""
    from onnx import numpy_helper

    model = onnx.load(src)
    for node in model.graph.node:
        node.input[:] = ["images_in" if n == "images" else n for n in node.input]
    first = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend([*nodes, *first])
    model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in weights.items())
    if open_size:
        dims = model.graph.input[0].type.tensor_type.shape.dim
        dims[2].dim_param, dims[3].dim_param = "height", "width"
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))


def test_a_graph_the_engine_reads_but_cannot_run_falls_back_at_load(tmp_path, digits_models):
    """A crop by a negative Pad of the images (which onnxruntime runs) fails only when the engine
    binds its steps to an input size: with the size fixed, that happens at load, so --engine
    sparse falls back to onnxruntime there with a one-line note naming the node, instead of
    failing every request; and shape arithmetic with Clip on integers runs on the engine."""
    from onnx import helper

    from cigl.data import load_dataset

    images = load_dataset("digits").test.x[:6]
    crop = tmp_path / "crop.onnx"
    pads = {"pads": np.array([0, 0, -1, -1, 0, 0, -1, -1], np.int64)}
    _with_input_steps(
        digits_models["resnet20"], crop, [helper.make_node("Pad", ["images", "pads"], ["images_in"], name="crop")], pads
    )
    with pytest.warns(
        UserWarning, match=r"uses Pad node crop: negative Pad amounts, which it does not run; using onnxruntime"
    ):
        p = Predictor(crop, device="cpu", engine="sparse")
    assert p.provider == "CPUExecutionProvider" and p.predict(images)[0].shape == (6, 10)

    clipped = tmp_path / "clip.onnx"
    nodes = [  # images + zeros of shape clip(shape(images), 0, 1) = (1, 1, 1, 1)
        helper.make_node("Shape", ["images"], ["shape"]),
        helper.make_node("Clip", ["shape", "zero", "one"], ["ones"]),
        helper.make_node("ConstantOfShape", ["ones"], ["nothing"], value=helper.make_tensor("v", 1, [1], [0.0])),
        helper.make_node("Add", ["images", "nothing"], ["images_in"]),
    ]
    _with_input_steps(digits_models["resnet20"], clipped, nodes, {"zero": np.array(0), "one": np.array(1)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparse = Predictor(clipped, device="cpu", engine="sparse")
    assert sparse.provider == "sparse"
    assert_matches(sparse.predict(images), Predictor(clipped, device="cpu", engine="onnxruntime").predict(images))


def test_a_size_the_graph_cannot_take_is_an_input_error_and_the_engine_keeps_running(tmp_path, digits_models):
    """With the input's height and width left open, there is nothing to bind at load: a size at
    which a step fails (a Reshape to 64 values per image, at 12 x 12) is a one-line InputError
    naming the step, and the engine then runs other sizes as before."""
    from onnx import helper

    from cigl.errors import InputError

    model = tmp_path / "open.onnx"
    nodes = [  # images + 0 x (the image as 64 values)
        helper.make_node("Reshape", ["images", "flat"], ["row"], name="as_row"),
        helper.make_node("MatMul", ["row", "zeros"], ["column"]),
        helper.make_node("Reshape", ["column", "nchw"], ["nothing"]),
        helper.make_node("Add", ["images", "nothing"], ["images_in"]),
    ]
    weights = {"flat": np.array([0, 64]), "zeros": np.zeros((64, 1), np.float32), "nchw": np.array([0, 1, 1, 1])}
    _with_input_steps(digits_models["resnet20"], model, nodes, weights, open_size=True)
    engine = SparseEngine(model.read_bytes())
    images = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)
    expected = engine.run(images)
    with pytest.raises(
        InputError, match=r"^the sparse engine cannot run inputs of shape \(3, 1, 12, 12\): Reshape node as_row: "
    ):
        engine.run(np.zeros((3, 1, 12, 12), np.float32))
    np.testing.assert_array_equal(engine.run(images)[0], expected[0])


def test_auto_tries_the_sparse_engine_quietly(tmp_path, digits_models):
    """Auto on a graph the sparse engine does not run (a ViT's Erf) is plain
    onnxruntime, without the warning that --engine sparse gives: the user asked for no engine."""
    model = tmp_path / "model.onnx"
    _with_erf(digits_models["resnet20"], model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Predictor(model, device="cpu").provider == "CPUExecutionProvider"
    np.save(tmp_path / "x.npy", np.zeros((3, 1, 8, 8), np.float32))
    proc = run_cli(PREDICT, str(model), str(tmp_path / "x.npy"))
    assert proc.returncode == 0 and proc.stdout.count("\n") == 3
    assert proc.stderr == "3 predicted, 0 unreadable, 0 abstained (CPUExecutionProvider)\n"


def test_engine_option_end_to_end_and_its_errors(tmp_path, digits_models):
    from cigl.data import load_dataset

    np.save(tmp_path / "x.npy", load_dataset("digits").test.x[:40])
    outputs = {}
    for engine in ("onnxruntime", "sparse", "auto"):
        proc = run_cli(PREDICT, digits_models["wrn22_2"], str(tmp_path / "x.npy"), "--engine", engine, "--top-k", "3")
        assert proc.returncode == 0, proc.stderr
        outputs[engine] = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(outputs["onnxruntime"]) == 40
    for engine in ("sparse", "auto"):
        for got, ref in zip(outputs[engine], outputs["onnxruntime"], strict=True):
            assert got["class"] == ref["class"]
            assert got["confidence"] == pytest.approx(ref["confidence"], abs=1e-5)
    proc = run_cli(PREDICT, digits_models["wrn22_2"], str(tmp_path / "x.npy"), "--engine", "sparse")
    assert proc.stderr.endswith("40 predicted, 0 unreadable, 0 abstained (sparse)\n")
    proc = run_cli(PREDICT, digits_models["wrn22_2"], str(tmp_path / "x.npy"), "--engine", "sparse", "--device", "cuda")
    assert_one_line_error(proc, "the sparse engine runs on the CPU")
    proc = run_cli(PREDICT, digits_models["wrn22_2"], str(tmp_path / "x.npy"), "--engine", "fast")
    assert proc.returncode == 2 and "invalid choice: 'fast'" in proc.stderr


@pytest.mark.parametrize("gap", [0.0, 0.005, 0.5])
def test_each_timed_run_follows_its_own_engine_after_a_settle(monkeypatch, gap):
    """time_in_turn: every timed run comes `gap` after an untimed run of the same engine, and at
    least SETTLE after the other engine's last run (its spinning threads would take a core from
    it); the order changes from round to round, and the medians are each engine's own."""
    from cigl.serve import engines

    log = []

    class Fake:
        def __init__(self, name, seconds):
            self.name, self.seconds = name, seconds

        def run(self, _x):
            log.append(self.name)
            clock[0] += self.seconds

    clock = [0.0]
    monkeypatch.setattr(engines.time, "sleep", lambda s: log.append(s))
    monkeypatch.setattr(engines.time, "perf_counter", lambda: clock[0])
    seconds = engines.time_in_turn({"a": Fake("a", 2.0), "b": Fake("b", 3.0)}, np.zeros(1), rounds=6, gap=gap)
    assert seconds == {"a": 2.0, "b": 3.0}
    names = [e for e in log[2:] if isinstance(e, str)][::2]  # the engine of each turn
    settle = [engines.SETTLE - gap] if gap < engines.SETTLE else []  # idle before the untimed run
    turn = {n: [*settle, n, *([gap] if gap else []), n] for n in "ab"}
    assert log == ["a", "b"] + [entry for n in names for entry in turn[n]]  # warm-up runs, then the turns
    rounds = [set(names[i : i + 2]) for i in range(0, len(names), 2)]
    assert len(names) == 12 and all(r == {"a", "b"} for r in rounds)
    assert set(names[::2]) == {"a", "b"}  # each engine goes first in some rounds


def test_auto_times_both_engines_and_keeps_only_what_it_uses(digits_models, monkeypatch):
    """Batch 1 is timed with a gap before each timed run (single requests find cold caches), the
    large batch back to back."""
    from cigl.serve import engines

    with open(digits_models["resnet20"], "rb") as f:
        model = f.read()
    timed, time_in_turn = {}, engines.time_in_turn

    def recording(pair, x, rounds, gap=0.0):
        timed[len(x)] = (rounds, gap)
        return time_in_turn(pair, x, rounds, gap)

    monkeypatch.setattr(engines, "time_in_turn", recording)
    engine = open_engine(model, engine="auto", device="cpu")
    monkeypatch.undo()
    assert timed == {1: (engines.AUTO_ROUNDS[1], engines.AUTO_PAUSE), 16: (engines.AUTO_ROUNDS[0], 0.0)}
    assert set(engine.seconds) == {1, 16}
    for timing in engine.seconds.values():
        assert set(timing) == {"onnxruntime", "sparse"} and all(t > 0 for t in timing.values())
    # the sparse engine is picked only when clearly faster: ties keep onnxruntime
    t = engine.seconds[1]
    assert engine.small == ("sparse" if t["sparse"] < AUTO_MARGIN[1] * t["onnxruntime"] else "onnxruntime")
    t = engine.seconds[16]
    assert engine.large == ("sparse" if t["sparse"] < AUTO_MARGIN[0] * t["onnxruntime"] else "onnxruntime")
    assert set(engine.engines) == {engine.small, engine.large}
    x = np.random.default_rng(0).standard_normal((20, 1, 8, 8)).astype(np.float32)
    ort = open_engine(model, engine="onnxruntime", device="cpu")
    assert_matches(engine.run(x), ort.run(x))
    assert_matches(engine.run(x[:2]), ort.run(x[:2]))


def test_auto_drops_a_sparse_engine_that_disagrees_with_onnxruntime(digits_models, monkeypatch):
    """Before timing, auto runs both engines on a random batch: a sparse engine whose logits are
    off by more than PARITY of their scale, or that raises, is dropped with a one-line warning
    and onnxruntime serves (a graph the engine reads but gets wrong costs speed, not answers)."""
    from cigl.serve import engines, sparse_engine

    with open(digits_models["resnet20"], "rb") as f:
        model = f.read()
    run = sparse_engine.SparseEngine.run

    def off(self, x):
        logits, probs = run(self, x)
        return logits * (1 + 10 * engines.PARITY), probs

    monkeypatch.setattr(sparse_engine.SparseEngine, "run", off)
    with pytest.warns(UserWarning, match=r"^sparse engine: its outputs on m\.onnx differ from onnxruntime's \(max "):
        engine = open_engine(model, engine="auto", device="cpu", source="m.onnx")
    assert isinstance(engine, OnnxRuntime)

    def broken(self, x):
        raise IndexError("index 7 is out of bounds for axis 0 with size 3\nmore")

    monkeypatch.setattr(sparse_engine.SparseEngine, "run", broken)
    with pytest.warns(UserWarning) as caught:
        engine = open_engine(model, engine="auto", device="cpu", source="m.onnx")
    assert isinstance(engine, OnnxRuntime)
    assert [str(w.message) for w in caught] == [
        "sparse engine: it failed on m.onnx (IndexError: index 7 is out of bounds for axis 0 with size 3); "
        "using onnxruntime"
    ]
    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert isinstance(open_engine(model, engine="auto", device="cpu"), Auto)  # the real engine agrees


def test_auto_keeps_onnxruntime_for_a_dense_model_without_timing(tmp_path, monkeypatch):
    """The card's density decides before the weights are read as nonzeros (a dense ResNet-50
    would hold all 25M of them in the engine's tables only for auto to drop them)."""
    from cigl.serve import sparse_engine

    src = make_model_pt(tmp_path / "run" / "model.pt", "resnet20", density=1.0)
    assert run_cli(EXPORT, str(src)).returncode == 0
    with monkeypatch.context() as m:
        m.setattr(sparse_engine, "SparseEngine", None)  # calling it would fail
        p = Predictor(src.parent / "model.onnx", device="cpu")
    assert p.provider == "CPUExecutionProvider"
    assert isinstance(SparseEngine((src.parent / "model.onnx").read_bytes()).density, float)


def test_a_sparse_model_written_outside_a_run_says_its_density_and_auto_times_it(tmp_path):
    """A model.pt whose summary lacks actual_density (save_model_file outside cigl-train) had a
    card claiming 1.0, so auto kept onnxruntime for a 90%-sparse model without timing it: the
    card now counts the masks."""
    src = make_model_pt(tmp_path / "run" / "model.pt", "resnet20", density=0.1)
    assert run_cli(EXPORT, str(src)).returncode == 0
    model = (src.parent / "model.onnx").read_bytes()
    ort = OnnxRuntime(model, device="cpu", threads=0, source="model")
    engine = SparseEngine(model)
    assert float(ort.metadata["actual_density"]) == pytest.approx(engine.density, abs=1e-6)
    assert 0.09 < engine.density < 0.11
    assert isinstance(open_engine(model, engine="auto", device="cpu"), Auto)


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="checks folder ownership")
def test_kernel_cache_falls_back_where_the_install_is_read_only(tmp_path, monkeypatch):
    """An installed, read-only package with no writable home (a hardened container) used to fail
    at import ("no locator available"): the compiled kernels then go to a private cache folder,
    never to a shared one someone else could fill, and with nowhere to write they compile each time."""
    from numba.core import config as numba_config

    from cigl.serve.sparse_engine import kernels

    (tmp_path / "file").write_text("")
    monkeypatch.setattr(numba_config, "CACHE_DIR", "")
    monkeypatch.setattr(kernels, "__file__", str(tmp_path / "file" / "kernels.py"))  # __pycache__ cannot be made
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert kernels._compile_cache()
    assert Path(numba_config.CACHE_DIR) == tmp_path / "xdg" / "cigl" / "numba"

    monkeypatch.setattr(numba_config, "CACHE_DIR", "")
    shared = tmp_path / "shared" / "cigl" / "numba"
    shared.mkdir(parents=True)
    shared.chmod(0o777)  # writable by anyone: not used
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "shared"))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    assert kernels._compile_cache()
    assert Path(numba_config.CACHE_DIR) == tmp_path / "tmp" / f"cigl-numba-{os.getuid()}"

    monkeypatch.setattr(numba_config, "CACHE_DIR", "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "file"))
    with pytest.warns(UserWarning, match="compile in every process; set NUMBA_CACHE_DIR"):
        assert not kernels._compile_cache()
    assert not numba_config.CACHE_DIR
