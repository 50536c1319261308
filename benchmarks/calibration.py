"""ECE and the audit metric set on 1,000,000 x 10 logits, against torchmetrics on the same logits.

Goals: our ECE <= 0.5x torchmetrics' multiclass calibration error; our full audit set (ECE,
adaptive ECE, MCE, NLL, Brier, accuracy) <= 1.0x torchmetrics' ECE. Softmax is included for
both (each receives logits).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torchmetrics.functional.classification import multiclass_calibration_error

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_time, write_results

from cigl import calibration as cal


def main() -> None:
    n, k = 1_000_000, 10
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(n, k)) * 3).astype(np.float32)
    labels = rng.integers(0, k, size=n)
    t_logits, t_labels = torch.from_numpy(logits), torch.from_numpy(labels)

    def theirs():
        return float(multiclass_calibration_error(t_logits, t_labels, num_classes=k, n_bins=10, norm="l1"))

    ours_ece = median_time(lambda: cal.ece(logits, labels, kind="logits"))
    ours_all = median_time(lambda: cal.summary(logits, labels, kind="logits"))
    tm = median_time(theirs)
    agree = abs(cal.ece(logits, labels, kind="logits") - theirs())
    results = {
        "shape": [n, k],
        "torchmetrics_ece_s": tm,
        "cigl_ece_s": ours_ece,
        "cigl_audit_set_s": ours_all,
        "ece_ratio": ours_ece / tm,
        "audit_set_ratio": ours_all / tm,
        "goals": {"ece_ratio": 0.5, "audit_set_ratio": 1.0},
        "abs_difference_vs_torchmetrics": agree,
    }
    print(write_results("calibration", results))
    for key in ("torchmetrics_ece_s", "cigl_ece_s", "cigl_audit_set_s", "ece_ratio", "audit_set_ratio"):
        print(f"{key:>22}: {results[key]:.4f}")


if __name__ == "__main__":
    main()
