"""Smoke test: the Optuna example runs end to end in a fresh process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import mixmatch_plugin as mm

pytest.importorskip("optuna")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "optuna_search.py"


@pytest.mark.slow
def test_optuna_example_quick_writes_study_plan_and_pareto_plot(tmp_path):
    import optuna

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MIXMATCH_QUIET": "1"}
    cmd = [sys.executable, str(EXAMPLE), "--quick", "--out", str(tmp_path), "--trials", "6"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Pareto front" in r.stdout and "best rule strategy" in r.stdout
    for name in ("search.db", "plan.json", "pareto.png", "history.png", "model.pt"):
        assert (tmp_path / name).exists(), name
    assert (tmp_path / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    plan = mm.load_plan(tmp_path / "plan.json")
    assert plan.meta["search"]["study"] == "example" and plan.meta["search"]["best"]
    study = optuna.load_study(study_name="example", storage=f"sqlite:///{tmp_path / 'search.db'}")
    assert len(study.trials) == 30  # the 30 rule seeds are queued; 6 of them ran
    assert len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 6
