"""tools/study.py: its checks before any run starts, and the report's rows and paper comparison."""

import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import study


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


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--jobs", "0"], "error: --jobs must lie in 1..64, got 0"),
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


def test_failed_runs_make_a_nonzero_exit(tmp_path, capsys):
    """Runs that fail (here: a data folder without train/ and test/) are listed and counted."""
    argv = ["run", "--runs", str(tmp_path / "runs"), "--data-dir", str(tmp_path), "--seeds", "0", "--jobs", "3"]
    assert study.main(argv) == 1
    out = capsys.readouterr().out
    assert out.count("FAILED error: ") == 3 and "needs train/ and test/" in out
    assert "3 of 3 runs failed" in out
