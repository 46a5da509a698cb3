"""The depth-and-width example runs end to end (``--quick``) in a fresh interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_depth_width_example(tmp_path):
    pytest.importorskip("torch_pruning")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "depth_width.py"), "--quick", "--out",
                          str(tmp_path / "dw.pt")], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    assert "iteration 1: kept " in text and "stopped: target" in text
    assert "pruned after fine-tuning" in text and "rebuilt ok: True" in text
    assert (tmp_path / "dw.pt").exists()
