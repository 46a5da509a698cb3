"""The adapter examples run end to end (``--quick``) in a fresh interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--quick"], capture_output=True,
                         text=True, timeout=300, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.slow
def test_nni_dropin_example():
    pytest.importorskip("nni")
    text = _run("nni_dropin.py")
    assert "uniform 70%" in text and "Mix-and-Match 70%" in text
    assert "per-layer entries" in text and "L1 channels + speed-up: params" in text


@pytest.mark.slow
def test_torch_pruning_vit_example():
    pytest.importorskip("torch_pruning")
    text = _run("torch_pruning_vit.py")
    assert "consistency: max relative difference" in text
    assert "pruned accuracy after fine-tuning" in text and "pruning_ratio_dict:" in text
    err = float(text.split("channel-zeroed original ")[1].split()[0])
    assert err <= 1e-4


@pytest.mark.slow
def test_torch_pruning_dropin_example():
    pytest.importorskip("torch_pruning")
    text = _run("torch_pruning_dropin.py")
    kept = [float(line.split("MACs kept ")[1].split(",")[0]) for line in text.splitlines() if "MACs kept" in line]
    assert len(kept) == 2 and abs(kept[1] - kept[0]) <= 0.02 * kept[0]  # the same MACs as the MetaPruner call
