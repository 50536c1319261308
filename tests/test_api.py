"""The public Python API: README's examples run as they stand, and the docstring examples."""

import doctest
import os
import re
import subprocess
import sys
from pathlib import Path

import cigl.export
import cigl.sparse.masking
import cigl.train.config

README = Path(__file__).resolve().parents[1] / "README.md"


def _api_examples() -> list[str]:
    section = README.read_text().split("## Python API", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_api_examples_run(tmp_path):
    examples = _api_examples()
    assert len(examples) == 2
    env = os.environ | {"PYTHONWARNINGS": "error::DeprecationWarning:cigl"}
    outputs = []
    for code in examples:
        proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        outputs.append(proc.stdout)
    density, updates = re.search(r"density (\S+), (\d+) mask updates", outputs[0]).groups()
    assert abs(float(density) - 0.1) < 0.002 and int(updates) >= 10
    product, accuracy, _ = outputs[1].splitlines()[0].split()
    assert product == "averaged" and float(accuracy) > 0.6
    assert (tmp_path / "runs/api-demo/model.onnx").is_file() and "ECE 0." in outputs[1]


def test_docstring_examples():
    for module, examples in ((cigl.sparse.masking, 5), (cigl.train.config, 2), (cigl.export, 5)):
        result = doctest.testmod(module, verbose=False)
        assert result.attempted >= examples and result.failed == 0, module.__name__


def test_import_cigl_stays_torch_free_and_loads_entry_points_lazily():
    code = (
        "import sys, cigl\n"
        "assert 'torch' not in sys.modules\n"
        "cigl.calibration.ece\n"
        "assert 'torch' not in sys.modules and cigl.Predictor.__name__ == 'Predictor'\n"
        "assert 'torch' not in sys.modules\n"
        "print(cigl.Masking.__name__, cigl.TrainConfig().method)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["Masking", "cigl"]
