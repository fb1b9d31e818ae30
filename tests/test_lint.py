"""Static check of every Python file of the repo (package, backends, bench scripts, tests):
ruff's syntax errors and pyflakes rules (E9, F: undefined names, unused imports, redefinitions).
The bench scripts only run on a GPU, so this is where a name they lost is caught on the CPU."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATHS = ["mamba3_kernels", "backends", "autotune", "reference", "bench", "tests", "setup.py"]


def test_pyflakes_rules_pass():
    if importlib.util.find_spec("ruff") is None:
        pytest.skip("ruff is not installed (it is in the dev extra that `make test` installs)")
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--isolated", "--select", "E9,F",
                        "--line-length", "120", "--output-format", "concise", *PATHS],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
