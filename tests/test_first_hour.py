"""What a new user meets in the first hour: plans that remember how they were made, warnings visible from
Python, and messages that explain themselves (issue 30). Real computations on tiny models."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

import mixmatch_plugin as mm
from mixmatch_plugin.errors import MixMatchError, first_line

from .test_cli import invoke


def _small_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))


def _calib() -> list:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(2)]


def test_collapsed_strategies_raise_a_visible_user_warning_and_are_recorded():
    with pytest.warns(UserWarning, match="strategies equal another one") as got:
        p = mm.plan(_small_mlp(), _calib(), target=0.8, on_unreachable="extend")
    rules = [s for s in p.strategies if "shape" in s.meta]  # the score family comes on top of the rule strategies
    assert len(rules) < 30 and len(p.meta["collapsed"]) == 30 - len(rules)
    collapsed = next(str(w.message) for w in got if "equal another" in str(w.message))
    assert collapsed in p.meta["warnings"] and f"{30 - len(rules)} of 30" in collapsed
    assert any("outside the ranges' reach" in w for w in p.meta["warnings"])  # ranges moved: warned too
    assert got[0].filename == __file__  # points at the caller's line, not into the library
    text = repr(p)  # says how many it holds, and why fewer than 30
    assert text.startswith("Plan(Sequential: 2 layers") and f"{len(p.strategies)} strategies" in text and "collapsed" in text
    back = mm.Plan.from_dict(json.loads(json.dumps(p.to_dict())))
    assert back.meta["warnings"] == p.meta["warnings"] and repr(back) == repr(p)
    for name in p.meta["collapsed"]:  # a dropped name (a default such as magnitude:midpoint) gives the strategy it equals
        same = p.strategy(name)
        assert name in same.meta["same_as"] and same.signal == name.split(":")[0] and back.strategy(name).name == same.name


def test_a_plan_without_collapse_warns_nothing():
    from mixmatch_plugin.models import tiny_resnet

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        p = mm.plan(tiny_resnet(width=8), signals=("magnitude",), options=mm.PlanOptions(disable_constraints=("small_layers",)))
    assert len(p.strategies) == 10 and p.meta["warnings"] == [] and "collapsed" not in repr(p)


def test_first_line_never_cuts_a_word():
    msg = "expected input[2, 1, 16, 16] to have 3 channels, but got 1 channels instead " * 5
    cut = first_line(RuntimeError(msg + "\nsecond line"), limit=60)
    assert cut.endswith(" ...") and msg.startswith(cut[:-4]) and msg[len(cut) - 4] == " "
    assert first_line(ValueError()) == "ValueError" and first_line(RuntimeError("short\nmore")) == "short"


def test_unknown_timm_name_suggests_real_ones():
    from mixmatch_plugin.models import build_model

    with pytest.raises(MixMatchError, match="did you mean resnet18"):
        build_model("timm:resnt18")


def test_finetune_bar_counts_the_steps_it_will_run(capsys):
    from mixmatch_plugin.progress import set_progress

    model, data = _small_mlp(), _calib() * 5  # 10 batches, 3 steps
    set_progress(True)
    try:
        mm.finetune(model, {}, data, epochs=1, max_steps=3, progress=True)
    finally:
        set_progress(False)
    err = capsys.readouterr().err
    assert "/3 " in err or "3/3" in err
    assert "/10" not in err


def test_plan_then_prune_reuses_the_recorded_input_shape_and_calibration(tmp_path):
    """`plan --calib random` on a 3-channel timm model, then `prune --plan` with no data options (issue 30)."""
    plan = tmp_path / "plan.json"
    r = invoke("plan", "--model", "timm:efficientnet_b0", "--calib", "random", "--calib-samples", "8", "--batch-size", "4",
               "--signals", "magnitude,product", "--out", str(plan))
    assert r.returncode == 0, r.stderr
    meta = json.loads(plan.read_text())["meta"]
    assert meta["model_spec"]["input_shape"] == [3, 32, 32]
    assert meta["calib_spec"] == {"calib": "random", "data_dir": None, "calib_samples": 8, "batch_size": 4, "seed": 0}
    r = invoke("prune", "--plan", str(plan), "--strategy", "product:midpoint", "--out", str(tmp_path / "pruned.pt"))
    assert r.returncode == 0, r.stderr
    assert "global sparsity" in r.stdout
    # an explicit flag overrides the record: digits are 1-channel, the model wants 3 -> one clear line
    r = invoke("prune", "--plan", str(plan), "--strategy", "product:midpoint", "--calib", "digits", "--input-shape", "1,16,16",
               "--out", str(tmp_path / "other.pt"))
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "3 channels" in r.stderr


def test_cli_prints_a_plan_warning_as_one_line(tmp_path):
    r = invoke("plan", "--model", "timm:efficientnet_b0", "--calib", "random", "--calib-samples", "4", "--batch-size", "4",
               "--signals", "magnitude", "--target", "0.95", "--extend-ranges", "--out", str(tmp_path / "p.json"))
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("warning: ")]
    assert any("outside the ranges' reach" in ln for ln in lines)


def test_search_reuses_the_plans_model_and_data(tmp_path):
    plan = tmp_path / "plan.json"
    r = invoke("plan", "--model", "mixmatch_plugin.models:tiny_resnet", "--model-kwargs", '{"width": 8}', "--calib", "digits",
               "--calib-samples", "64", "--signals", "magnitude", "--out", str(plan))
    assert r.returncode == 0, r.stderr
    r = invoke("search", "--plan", str(plan), "--n-trials", "1", "--no-plots", "--out", str(tmp_path / "s"))  # no --model, no --calib
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "s" / "search.json").read_text())["states"]["COMPLETE"] == 1
