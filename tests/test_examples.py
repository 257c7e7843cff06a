"""The examples run as they are (shortened)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASES = {
    "ase_md.py": ["--steps", "10"],
    "openmm_md.py": ["--steps", "10"],
    "openmm_mlmm.py": ["--steps", "10"],
    "npt_integrators.py": ["--steps", "20"],
    "train_your_data.py": ["--minutes", "0.05", "--max-frames", "12"],
}


@pytest.mark.parametrize("script", sorted(CASES))
def test_example_runs(script, tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "examples", script), *CASES[script],
           "--out", str(tmp_path)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, f"{script} failed:\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}"
    assert os.listdir(tmp_path), f"{script} wrote nothing"
