"""tools/study.py's report: the rows a run contributes and the comparison with the paper."""

import sys

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
