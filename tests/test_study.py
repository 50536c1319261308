"""tools/study.py: its checks before any run starts, and the report's rows and paper comparison."""

import json
import shutil
import sys
from dataclasses import asdict

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import study

from cigl.train.cli import build_parser as train_parser
from cigl.train.cli import config_from_args
from cigl.train.config import resolve


def _summary(method, density, accuracy, ece, old_names=False):
    name = "acc" if old_names else "accuracy"
    metrics = {name: accuracy, "ece": ece, "nll": 0.3, "brier": 0.1}
    s = {"method": method, "target_density": density, "actual_density": density, "seed": 0, "product": "final_weights"}
    s |= {"test": metrics, "test_calibrated": metrics, "temperature": 1.0, "final_weights": {"test": metrics}}
    if method == "cigl":
        s |= {"product": "averaged", "averaged": {"test": metrics, "test_calibrated": metrics, "temperature": 1.0}}
    return s


def test_cigl_runs_add_the_weight_dropout_row_and_old_metric_names_are_read():
    labels = [label for label, _ in study.rows_of(_summary("cigl", 0.1, 0.93, 0.016))]
    assert labels == ["CigL, density 0.1", "RigL+W-DP (CigL's final weights), density 0.1"]
    _, row = study.rows_of(_summary("rigl", 0.1, 0.92, 0.03, old_names=True))[0]
    assert study.metric(row["test"], "accuracy") == 0.92


def test_paper_table_puts_our_wrn_rows_beside_the_paper():
    groups = {}
    for method, density, accuracy, ece in (
        ("rigl", 0.1, 0.921, 0.031),
        ("rigl", 0.1, 0.925, 0.029),
        ("cigl", 0.05, 0.91, 0.015),
    ):
        for label, row in study.rows_of(_summary(method, density, accuracy, ece)):
            groups.setdefault(label, []).append(row)
    lines = study.paper_table(groups).splitlines()
    assert lines[2] == "| CigL, density 0.05 | 1 | 91.00 | 91.34 | 0.0150 | 0.0131 |"
    assert lines[3] == "| RigL, density 0.1 | 2 | 92.30 | 92.26 | 0.0300 | 0.0272 |"
    assert len(lines) == 4  # RigL+W-DP and dense rows have no paper counterpart here


def test_repro_gpu_is_the_papers_seven_run_grid_and_later_options_override_it():
    """make repro-gpu, the GPU lease script and the GPU suite all name the grid as --repro-gpu, and
    make repro-gpu its report as report --repro-gpu."""
    args = study.build_parser().parse_args(["run", "--repro-gpu", "--seeds", "1"])
    settings = (args.model, args.epochs, args.jobs, args.runs, args.paper)
    assert settings == ("wrn22_2", 250, 7, "runs/paper-wrn22_2", True)
    runs = dict(study.grid(args))
    assert list(runs) == ["dense-s1"] + [f"{m}-d{d}-s1" for d in (0.2, 0.1, 0.05) for m in ("rigl", "cigl")]
    cigl = runs["cigl-d0.05-s1"]
    assert cigl[cigl.index("--avg-start") + 1] == "200" and "--val-size" in cigl and "--train-per-class" not in cigl
    shorter = study.build_parser().parse_args(["run", "--repro-gpu", "--epochs", "3", "--runs", "elsewhere"])
    assert (shorter.epochs, shorter.runs, shorter.model) == (3, "elsewhere", "wrn22_2")
    assert not hasattr(study.build_parser().parse_args(["run"]), "repro_gpu")
    report = study.build_parser().parse_args(["report", "--repro-gpu"])
    assert (report.runs, report.out) == ("runs/paper-wrn22_2", "docs/results/paper-wrn22_2")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--jobs", "0"], "error: --jobs must lie in 1..64, got 0"),
        (["--minutes", "0"], "error: --minutes must be a positive number of minutes, got 0.0"),
        (["--densities", "0.1", "1.5"], "error: --density must lie in (0, 1], got 1.5"),
        (["--epochs", "0"], "error: --epochs must lie in 1..100000, got 0"),
        (["--model", "nope"], "error: unknown model 'nope'"),
        (["--data-dir", "nowhere"], "error: data folder not found: nowhere; `make data`"),
    ],
)
def test_run_checks_the_whole_grid_before_starting(tmp_path, capsys, options, message):
    runs = tmp_path / "runs"
    argv = ["run", "--runs", str(runs), "--data-dir", str(tmp_path), *options]
    with pytest.raises(SystemExit) as stop:
        study.main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith(message) and len(err.strip().splitlines()) == 1
    assert not runs.exists()


def test_failed_runs_make_a_nonzero_exit(tmp_path, capsys, cifar_small):
    """Runs that fail (here: interrupted runs whose last.pt is damaged) are listed and counted."""
    runs = tmp_path / "runs"
    argv = ["run", "--runs", str(runs), "--data-dir", str(cifar_small), "--per-class", "5", "--seeds", "0"]
    for name, options in study.grid(study.build_parser().parse_args(argv)):
        (runs / name).mkdir(parents=True)
        saved = asdict(resolve(config_from_args(train_parser().parse_args(options))[0]))
        (runs / name / "config.json").write_text(json.dumps(saved))
        (runs / name / "last.pt").write_bytes(b"\0" * 100)
    assert study.main([*argv, "--jobs", "3"]) == 1
    out = capsys.readouterr().out
    assert out.count("FAILED error: ") == 3 and out.count("last.pt") >= 3
    assert "3 of 3 runs failed" in out


def test_run_checks_the_data_once_before_starting(tmp_path, capsys, cifar_small):
    """A data problem (here: mixed image sizes) stops the study before any run, in one line that
    names the fix, and the fix (--image-size) exists in the study's own options."""
    from PIL import Image

    data = tmp_path / "data"
    shutil.copytree(cifar_small, data)
    Image.new("RGB", (40, 36), (10, 20, 30)).save(data / "train" / "cat" / "big.png")
    argv = ["run", "--runs", str(tmp_path / "runs"), "--data-dir", str(data), "--per-class", "5"]
    with pytest.raises(SystemExit) as stop:
        study.main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "mixed sizes" in err and "--image-size" in err
    assert not (tmp_path / "runs").exists()
    first_run = study.grid(study.build_parser().parse_args([*argv, "--image-size", "24"]))[0]
    assert "--image-size 24" in " ".join(first_run[1])


def test_run_refuses_an_earlier_run_with_other_settings(tmp_path, capsys, cifar_small):
    """`run` skips finished runs: one made with other settings would be reported as this study's."""
    runs = tmp_path / "runs"
    argv = ["run", "--runs", str(runs), "--data-dir", str(cifar_small), "--per-class", "5", "--seeds", "0"]
    options = dict(study.grid(study.build_parser().parse_args(argv)))["rigl-d0.1-s0"]
    saved = asdict(resolve(config_from_args(train_parser().parse_args(options))[0])) | {"train_per_class": 400}
    (runs / "rigl-d0.1-s0").mkdir(parents=True)
    (runs / "rigl-d0.1-s0" / "config.json").write_text(json.dumps(saved))
    with pytest.raises(SystemExit) as stop:
        study.main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert f"{runs / 'rigl-d0.1-s0'} was trained with --train-per-class 400, not 5" in err


def test_a_deadline_stops_runs_at_a_checkpoint_and_run_continues_them(tmp_path, capsys, cifar_small):
    """--minutes (a job's time limit, a GPU lease): at the deadline the running run is stopped with
    SIGTERM, so it saves the step it is on, runs not begun are not started, and the next `run`
    continues the stopped run where it was instead of starting over."""
    runs, data = tmp_path / "runs", tmp_path / "data"
    shutil.copytree(cifar_small, data)
    argv = ["run", "--runs", str(runs), "--data-dir", str(data), "--per-class", "5", "--seeds", "0"]
    argv += ["--epochs", "2000", "--jobs", "1"]  # no run can finish
    assert study.main([*argv, "--minutes", "0.25"]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"dense-s0: {study.STOPPED}",
        f"rigl-d0.1-s0: {study.NOT_STARTED}",
        f"cigl-d0.1-s0: {study.NOT_STARTED}",
        "3 of 3 runs unfinished at the deadline; run the same command again to continue",
    ]
    metrics = runs / "dense-s0" / "metrics.jsonl"
    first = [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()]
    assert (runs / "dense-s0" / "last.pt").is_file() and first == list(range(1, len(first) + 1))
    moved = data.rename(tmp_path / "moved")  # the next lease's machine may keep the data elsewhere
    argv[argv.index(str(data))] = str(moved)
    assert study.main([*argv, "--minutes", "0.15"]) == 1
    assert capsys.readouterr().out.splitlines()[0] == f"dense-s0: {study.STOPPED}"
    both = [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()]
    assert len(both) > len(first) and both == list(range(1, len(both) + 1))  # continued, not restarted
