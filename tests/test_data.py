import errno
import os
import pickle
import re
import shutil

import numpy as np
import pytest
import torch
from conftest import ROOT, assert_one_line_error, run_cli

import cigl.data as data
import cigl.pipeline as pipeline
from cigl.errors import FormatError, InputError


def test_digits_splits_are_deterministic_and_disjoint():
    a = data.load_dataset("digits")
    b = data.load_dataset("digits")
    for split in ("train", "val", "test"):
        assert np.array_equal(getattr(a, split).x, getattr(b, split).x)
        assert np.array_equal(getattr(a, split).y, getattr(b, split).y)
    assert len(a.train) + len(a.val) + len(a.test) == 1797
    assert len(a.test) == 359 and len(a.val) == 143
    rows = {
        split: {getattr(a, split).x[i].tobytes() for i in range(len(getattr(a, split)))}
        for split in ("train", "val", "test")
    }
    # digits has a handful of duplicate images; a split leak would share far more
    assert len(rows["train"] & rows["test"]) <= 3 and len(rows["train"] & rows["val"]) <= 3
    assert a.train.x.dtype == np.uint8 and a.train.x.shape[1:] == (8, 8, 1)
    # stratified: every class has its share of the validation split
    assert np.bincount(a.val.y).min() >= 13


def test_digits_are_scikit_learns_read_without_importing_it(monkeypatch):
    """The shipped table is read directly (importing scikit-learn costs a run 2 s); where the
    file is not found, load_digits gives the same table."""
    from sklearn.datasets import load_digits

    d = load_digits()
    expected = np.column_stack([d.data, d.target])
    code = "import sys, cigl.data as d; t = d._digits_table(); print(t.shape, 'sklearn' in sys.modules)"
    proc = run_cli("-c", code)
    assert proc.returncode == 0 and proc.stdout.split() == ["(1797,", "65)", "False"], proc.stderr
    assert np.array_equal(data._digits_table(), expected)
    monkeypatch.setattr(data.Path, "is_file", lambda _self: False)
    assert np.array_equal(data._digits_table(), expected)


def test_stratified_split_partitions_the_indices():
    y = np.repeat(np.arange(5), 20)
    keep, held = data.stratified_split(y, 0.25, seed=0)
    assert np.intersect1d(keep, held).size == 0
    assert np.array_equal(np.sort(np.concatenate([keep, held])), np.arange(100))
    assert np.array_equal(np.bincount(y[held]), np.full(5, 5))
    assert np.array_equal(held, data.stratified_split(y, 0.25, seed=0)[1])


def test_a_val_split_that_takes_every_training_image_is_refused():
    with pytest.raises(InputError, match=r"--val-size 0.6 holds out all 10 training images .*lower --val-size"):
        data.load_dataset("digits", val_size=0.6, train_per_class=1)  # round(0.6) = 1 per class: none left


def test_val_size_zero_keeps_all_training_images():
    d = data.load_dataset("digits", val_size=0)
    assert len(d.val) == 0 and len(d.train) == 1797 - 359


def test_cifar_image_folder_loads_real_jpegs(cifar_small):
    d = data.load_dataset("cifar10", cifar_small, val_size=0.1)
    assert d.classes == data.CIFAR10_CLASSES
    assert d.train.x.shape == (270, 32, 32, 3) and len(d.val) == 30 and len(d.test) == 100
    assert np.array_equal(np.bincount(d.test.y), np.full(10, 10))
    assert 60 < d.train.x.mean() < 200  # real photos, not blank arrays


def test_cache_is_reused_and_invalidated(tmp_path, cifar_small, monkeypatch):
    root = tmp_path / "c"
    shutil.copytree(cifar_small, root)
    first, _ = data.load_image_folder(root / "test")
    calls = []
    real_decode = data._decode
    monkeypatch.setattr(data, "_decode", lambda p, s: calls.append(p) or real_decode(p, s))
    again, _ = data.load_image_folder(root / "test")
    assert calls == [] and np.array_equal(first.x, again.x)
    # replace one image's content: the cache key changes and everything is decoded again
    cat = sorted((root / "test" / "cat").iterdir())
    shutil.copy(sorted((root / "test" / "dog").iterdir())[0], cat[0])
    rebuilt, _ = data.load_image_folder(root / "test")
    assert len(calls) == 100
    assert not np.array_equal(rebuilt.x, first.x)
    # a damaged cache file is decoded again and replaced; a cache that cannot be written only warns
    newest = max(data.cache_dir().glob("images-*.npz"), key=lambda f: f.stat().st_mtime_ns)  # rebuilt's
    newest.write_bytes(b"PK\3\4 damaged")
    calls.clear()
    assert np.array_equal(data.load_image_folder(root / "test")[0].x, rebuilt.x) and len(calls) == 100
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("CIGL_CACHE", str(tmp_path / "a-file" / "cache"))
    with pytest.warns(UserWarning, match="cannot write the image cache .* set CIGL_CACHE to a writable folder"):
        uncached, _ = data.load_image_folder(root / "test")
    assert np.array_equal(uncached.x, rebuilt.x)
    monkeypatch.setenv("CIGL_CACHE", str(tmp_path / "full"))  # a full disk only warns too

    def full_disk(*_args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("cigl.io.os.fsync", full_disk)
    with pytest.warns(UserWarning, match=r"image cache .* \(No space left on device\); the next run decodes"):
        assert np.array_equal(data.load_image_folder(root / "test")[0].x, rebuilt.x)
    assert not list((tmp_path / "full").iterdir())  # no partial cache file


def test_python_batches_format(tmp_path, cifar_small):
    src = data.load_dataset("cifar10", cifar_small, val_size=0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()

    def dump(name, split):
        flat = split.x.transpose(0, 3, 1, 2).reshape(len(split), -1)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": flat, b"labels": split.y.tolist()}, f)

    for i in range(1, 6):
        dump(f"data_batch_{i}", data.Split(src.train.x[i - 1 :: 5], src.train.y[i - 1 :: 5]))
    dump("test_batch", src.test)
    d = data.load_dataset("cifar10", tmp_path, val_size=0)
    assert np.array_equal(d.test.x, src.test.x) and np.array_equal(d.test.y, src.test.y)
    assert len(d.train) == len(src.train)
    # --image-size resizes array sources as it resizes image files: the same pixels either way
    d, src = (data.load_dataset("cifar10", root, val_size=0, image_size=24) for root in (tmp_path, cifar_small))
    assert d.test.x.shape[1:] == (24, 24, 3) and np.array_equal(d.test.x, src.test.x)
    assert d.train.x.shape == src.train.x.shape and d.pad == src.pad == 3


def test_image_size_resizes_digits():
    from PIL import Image

    d8, d16 = data.load_dataset("digits"), data.load_dataset("digits", image_size=16)
    assert d16.train.x.shape[1:] == (16, 16, 1) and d16.test.x.shape[1:] == (16, 16, 1)
    assert (d8.pad, d16.pad) == (1, 2) and np.array_equal(d16.test.y, d8.test.y)
    expected = np.asarray(Image.fromarray(d8.test.x[5, :, :, 0]).resize((16, 16), Image.BILINEAR))
    assert np.array_equal(d16.test.x[5, :, :, 0], expected)


def test_python_batch_with_code_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (shutil.copy, (__file__, str(marker)))

    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (tmp_path / name).write_bytes(pickle.dumps({b"data": Payload(), b"labels": [0]}))
    with pytest.raises(FormatError, match="refusing to load shutil.copy"):
        data.load_dataset("cifar10", tmp_path)
    assert not marker.exists()


def test_corrupt_jpeg_is_named(tmp_path, cifar_small):
    root = tmp_path / "c"
    shutil.copytree(cifar_small, root)
    bad = root / "train" / "cat" / "0003.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    with pytest.raises(InputError, match="cannot read image .*0003.jpg: .*; replace or remove that file"):
        data.load_dataset("cifar10", root)
    proc = run_cli(
        str(ROOT / "tools" / "train.py"),
        "--dataset",
        "imagefolder",
        "--data-dir",
        str(root),
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "run"),
    )
    assert_one_line_error(proc, "0003.jpg")
    assert not (tmp_path / "run").exists()
    truncated = root / "train" / "cat" / "0004.jpg"  # a cut-off download
    truncated.write_bytes(truncated.read_bytes()[:400])
    bad.unlink()
    with pytest.raises(InputError, match="cannot read image .*0004.jpg: .*; replace or remove that file"):
        data.load_dataset("cifar10", root)


def test_empty_class_folder_and_missing_folder(tmp_path, cifar_small):
    root = tmp_path / "c"
    shutil.copytree(cifar_small, root)
    (root / "train" / "zebra").mkdir()
    with pytest.raises(InputError, match="zebra has no images"):
        data.load_dataset("imagefolder", root)
    shutil.copytree(root / "train", tmp_path / "classes")
    with pytest.raises(
        InputError, match=re.escape(f"folders are the classes, move them into {tmp_path / 'classes' / 'train'}")
    ):
        data.load_dataset("imagefolder", tmp_path / "classes")  # class folders, no split
    with pytest.raises(InputError, match=re.escape(f"it is a split of {root}, which has them: pass --data-dir {root}")):
        data.load_dataset("imagefolder", root / "train")  # one split of a dataset
    with pytest.raises(
        InputError,
        match=re.escape(
            f"needs train/ and test/ subfolders with one folder per class; {root} has them: pass --data-dir {root}"
        ),
    ):
        data.load_dataset("imagefolder", tmp_path)  # the dataset is one level down
    (tmp_path / "archive" / "images.tar.xz").parent.mkdir()
    (tmp_path / "archive" / "images.tar.xz").write_bytes(b"")
    with pytest.raises(InputError, match="images.tar.xz is an archive: extract it"):
        data.load_dataset("imagefolder", tmp_path / "archive")
    with pytest.raises(InputError, match="images.tar.xz is an archive: extract it .* and pass the folder it makes"):
        data.load_dataset("imagefolder", tmp_path / "archive" / "images.tar.xz")  # the archive itself
    with pytest.raises(InputError, match="not found"):
        data.load_dataset("imagefolder", tmp_path / "nowhere")
    with pytest.raises(InputError, match="--data-dir"):
        data.load_dataset("cifar10")
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "test").mkdir()
    with pytest.raises(InputError, match="no class folders in .*train"):
        data.load_dataset("imagefolder", empty)


def test_a_held_out_split_may_lack_a_class_but_not_add_one(tmp_path, cifar_small, monkeypatch):
    """test/ (or val/) without a training class is labelled by train/'s class names, with a
    warning naming the class; the cached decode of the same folder under other class names is
    not reused; a class folder training lacks is refused, naming it."""
    monkeypatch.setenv("CIGL_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "c"
    shutil.copytree(cifar_small, root)
    full = data.load_dataset("imagefolder", root)
    shutil.rmtree(root / "test" / "bird")
    with pytest.warns(UserWarning, match=re.escape(f"{root / 'test'} has no images of class bird")):
        lacking = data.load_dataset("imagefolder", root)
    assert lacking.classes == full.classes and "bird" in lacking.classes
    kept = full.test.y != full.classes.index("bird")
    np.testing.assert_array_equal(lacking.test.y, full.test.y[kept])
    np.testing.assert_array_equal(lacking.test.x, full.test.x[kept])
    # the same test/ files, labelled by a train/ without "airplane": other labels, not the cache's
    shutil.rmtree(root / "train" / "airplane")
    shutil.rmtree(root / "test" / "airplane")
    with pytest.warns(UserWarning, match="no images of class bird"):
        fewer = data.load_dataset("imagefolder", root)
    assert fewer.classes == [c for c in full.classes if c != "airplane"]
    assert [fewer.classes[i] for i in fewer.test.y] == [full.classes[i] for i in full.test.y[kept & (full.test.y != 0)]]
    (root / "test" / "zebra").mkdir()
    shutil.copy(next((root / "test" / "cat").iterdir()), root / "test" / "zebra")
    with pytest.raises(InputError, match=r"test that the training data lacks: zebra .*add them to the training folder"):
        data.load_dataset("imagefolder", root)


def test_mixed_sizes_need_image_size(tmp_path, cifar_small):
    from PIL import Image

    root = tmp_path / "c"
    shutil.copytree(cifar_small, root)
    Image.new("RGB", (40, 36), (10, 20, 30)).save(root / "train" / "cat" / "big.png")
    with pytest.raises(InputError, match="mixed sizes.*--image-size"):
        data.load_dataset("imagefolder", root)
    d = data.load_dataset("imagefolder", root, image_size=24)
    assert d.train.x.shape[1:] == (24, 24, 3) and d.test.x.shape[1:] == (24, 24, 3)


def test_image_folders_recurse_and_skip_hidden_entries(tmp_path, cifar_small):
    """As torchvision's ImageFolder: images in subfolders of a class folder count. Unlike it, hidden
    entries are skipped: a Jupyter .ipynb_checkpoints folder is not a class, and macOS's ._x.jpg
    copies and .DS_Store are not images (they made the load fail)."""
    from cigl.serve.predict import expand_inputs

    root = tmp_path / "c"
    shutil.copytree(cifar_small, root)
    cat = root / "train" / "cat"
    moved = sorted(cat.iterdir())[:3]
    (cat / "batch2").mkdir()
    for f in moved:
        f.rename(cat / "batch2" / f.name)
    (root / "train" / ".ipynb_checkpoints").mkdir()
    (cat / "._0001.jpg").write_bytes(b"\0\5\x16\7 AppleDouble")
    (cat / ".DS_Store").write_bytes(b"\0")
    d = data.load_dataset("imagefolder", root, val_size=0)
    before = data.load_dataset("imagefolder", cifar_small, val_size=0)
    assert d.classes == before.classes and len(d.train) == len(before.train)
    assert sorted(map(tuple, d.train.x.reshape(len(d.train), -1)[:, :8].tolist())) == sorted(
        map(tuple, before.train.x.reshape(len(before.train), -1)[:, :8].tolist())
    )
    assert expand_inputs([str(cat)]) == sorted(
        [*(cat / "batch2" / f.name for f in moved), *(f for f in cat.glob("*.jpg") if not f.name.startswith("."))]
    )


def test_one_class_is_refused_before_training(tmp_path, cifar_small):
    """One class trained to the end, then failed in calibration ("logits need at least 2
    classes"), leaving a half-written run: refused when the data loads."""
    for split in ("train", "test"):
        shutil.copytree(cifar_small / split / "cat", tmp_path / "one" / split / "cat")
    expected = f"at least 2 classes; the training images ({tmp_path / 'one' / 'train'}) have 1: cat"
    with pytest.raises(InputError, match=re.escape(expected)):
        data.load_dataset("imagefolder", tmp_path / "one")


def test_non_square_images_need_image_size(tmp_path, cifar_small):
    """Images of one size that is not square would train, then fail at export (models, cards and
    serving take N x N): refused at load, naming the fix."""
    from PIL import Image

    for src in cifar_small.rglob("*.jpg"):
        dst = tmp_path / "wide" / src.relative_to(cifar_small).with_suffix(".png")
        dst.parent.mkdir(parents=True, exist_ok=True)
        Image.open(src).resize((48, 32)).save(dst)
    with pytest.raises(InputError, match=r"48 x 32 \(width x height\).*--image-size 32"):
        data.load_dataset("imagefolder", tmp_path / "wide")
    assert data.load_dataset("imagefolder", tmp_path / "wide", image_size=32).train.x.shape[1:] == (32, 32, 3)


def test_augment_is_a_padded_crop_or_its_mirror():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    out = pipeline.augment(x, pad=2, flip=True)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    flips = 0
    for i in range(16):
        views = {
            (oy, ox, f): (
                padded[i, :, oy : oy + 8, ox : ox + 8].flip(2) if f else padded[i, :, oy : oy + 8, ox : ox + 8]
            )
            for oy in range(5)
            for ox in range(5)
            for f in (0, 1)
        }
        matches = [k for k, v in views.items() if torch.equal(v, out[i])]
        assert matches, f"image {i} is not a crop of its padded input"
        flips += matches[0][2]
    assert 0 < flips < 16
    assert torch.equal(pipeline.augment(x, pad=0, flip=False), x)


def test_normalize_matches_formula():
    x = torch.tensor([[[[0, 255]]]], dtype=torch.uint8)
    y = pipeline.normalize(x, (0.5,), (0.25,))
    assert torch.allclose(y, torch.tensor([[[[-2.0, 2.0]]]]))


def test_epoch_order_depends_on_seed_and_epoch_only():
    a = pipeline.epoch_order(100, 0, 3, torch.device("cpu"))
    assert torch.equal(a, pipeline.epoch_order(100, 0, 3, torch.device("cpu")))
    assert not torch.equal(a, pipeline.epoch_order(100, 0, 4, torch.device("cpu")))
    assert sorted(a.tolist()) == list(range(100))
