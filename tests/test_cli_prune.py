"""``mixmatch prune``: every backend writes a file that rebuilds the pruned model."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from mixmatch_plugin.adapters import torch_pruning as mtp
from mixmatch_plugin.adapters.artifact import load_pruned
from mixmatch_plugin.app.cli import main
from mixmatch_plugin.planning import load_plan

from .helpers import small_vit


def _run(*args: str):
    return CliRunner().invoke(main, ["-q", *args], catch_exceptions=False)


@pytest.fixture(scope="module")
def resnet_plan(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    plan = d / "plan.json"
    r = _run("plan", "--model", "mixmatch_plugin.models:tiny_resnet",
             "--model-kwargs", '{"num_classes": 10, "in_chans": 1, "width": 8}', "--calib", "digits",
             "--calib-samples", "128", "--target", "0.5", "--extend-ranges", "--progressive", "3", "--out", str(plan))
    assert r.exit_code == 0, r.output
    return plan


def test_prune_by_progressive_snip_recomputes_its_masks_from_the_plans_calibration(tmp_path, resnet_plan):
    p = load_plan(resnet_plan)
    s = p.strategy("product:progressive")
    assert s.signal == "progressive" and s.meta["rounds"] == 3
    out = tmp_path / "prog.pt"
    r = _run("prune", "--plan", str(resnet_plan), "--strategy", s.name, "--out", str(out))
    assert r.exit_code == 0, r.output
    model, _ = load_pruned(out)
    mods = dict(model.named_modules())
    zeros = {n: int((mods[n].weight == 0).sum()) for n in s.ratios if s.ratios[n] > 0}
    assert zeros == {n: round(s.ratios[n] * mods[n].weight.numel()) for n in zeros}  # the planned count in every layer
    r = _run("prune", "--plan", str(resnet_plan), "--strategy", s.name, "--calib", "none", "--out", str(tmp_path / "x.pt"))
    assert r.exit_code == 2 and "needs calibration data" in r.output


@pytest.mark.parametrize(("backend", "extra"), [("torch", []), ("nni", ["--nni-pruner", "level"]),
                                                ("nni", ["--nni-pruner", "l1"]), ("tp", [])])
def test_prune_writes_a_model_that_rebuilds(tmp_path, resnet_plan, backend, extra):
    out = tmp_path / f"pruned_{backend}.pt"
    r = _run("prune", "--plan", str(resnet_plan), "--strategy", "product:alpha-0.7", "--backend", backend,
             "--out", str(out), "--calib-samples", "64", *extra)
    assert r.exit_code == 0, r.output
    assert f"wrote {out}" in r.output
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # atomic: no temp file left behind
    model, meta = load_pruned(out)
    assert meta["backend"] == backend and meta["strategy"]["name"] == "product:alpha-0.7"
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        assert model(x).shape == (3, 10)
    n = sum(p.numel() for p in model.parameters())
    raw = torch.load(out, weights_only=True)
    assert set(raw["state_dict"]) == set(model.state_dict())
    if backend == "tp":
        assert "MACs" in r.output and "realized" in r.output
        assert n == meta["report"]["params_after"] < meta["report"]["params_before"]
    else:
        convs = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        zeros = sum(int((m.weight == 0).sum()) for m in convs) / sum(m.weight.numel() for m in convs)
        assert zeros > 0.3


def test_prune_tp_macs_budget(tmp_path, resnet_plan):
    out = tmp_path / "macs.pt"
    r = _run("prune", "--plan", str(resnet_plan), "--strategy", "magnitude:midpoint", "--backend", "tp", "--macs", "0.5",
             "--out", str(out), "--calib-samples", "64")
    assert r.exit_code == 0, r.output
    model, meta = load_pruned(out)
    assert abs(meta["report"]["macs_after"] / meta["report"]["macs_before"] - 0.5) <= 0.05  # an 8-wide model: coarse steps
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 10)
    r = CliRunner().invoke(main, ["prune", "--plan", str(resnet_plan), "--strategy", "magnitude:midpoint", "--macs", "0.5",
                                  "--out", str(tmp_path / "x.pt")])
    assert r.exit_code != 0 and "--backend tp" in r.output


def test_prune_tp_latency_budget_reports_the_measured_ratio(tmp_path, resnet_plan):
    out = tmp_path / "latency.pt"
    r = _run("prune", "--plan", str(resnet_plan), "--strategy", "magnitude:midpoint", "--backend", "tp", "--latency", "0.8",
             "--out", str(out), "--calib-samples", "64", "--batch-size", "64")
    assert r.exit_code == 0, r.output
    _, meta = load_pruned(out)
    assert 0.5 < meta["report"]["latency_ratio"] < 1.0 and "of the dense model's, measured on this machine" in r.output
    assert meta["report"]["macs_after"] < meta["report"]["macs_before"]


def test_prune_tp_vit_rebuilds_attention(tmp_path):
    plan = tmp_path / "vit.json"
    r = _run("plan", "--model", "tests.helpers:small_vit", "--calib", "digits", "--calib-samples", "64",
             "--signals", "magnitude", "--target", "0.3", "--extend-ranges", "--no-constraint", "small_layers",
             "--out", str(plan))
    assert r.exit_code == 0, r.output
    out = tmp_path / "vit.pt"
    # the plan records a factory outside mixmatch_plugin: a file may not choose code to run, so name it
    r = _run("prune", "--plan", str(plan), "--strategy", "magnitude:all-max", "--backend", "tp", "--out", str(out),
             "--calib", "none", "--input-shape", "1,16,16", "--model", "tests.helpers:small_vit")
    assert r.exit_code == 0, r.output
    model, _ = load_pruned(out, model=small_vit())
    raw = torch.load(out, weights_only=True)
    for blk in model.blocks:
        a = blk.attn
        assert a.qkv.out_features == 3 * a.num_heads * a.head_dim and a.scale == pytest.approx(a.head_dim ** -0.5)
    original = small_vit().eval()
    p = load_plan(plan)
    direct = mtp.prune(original, p.strategy("magnitude:all-max"), torch.zeros(2, 1, 16, 16), options=mtp.TPOptions(verify=False))
    direct.model.load_state_dict(raw["state_dict"])
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model(x), direct.model.eval()(x), atol=1e-6)


def test_prune_best_chooses_on_the_validation_split_and_writes_that_strategy(tmp_path, resnet_plan):
    out = tmp_path / "best.pt"
    r = _run("prune", "--plan", str(resnet_plan), "--strategy", "best", "--out", str(out), "--calib-samples", "64")
    assert r.exit_code == 0, r.output
    chosen = r.output.split("chose ", 1)[1].split(" ", 1)[0]
    finals = [line.split()[0] for line in r.output.split("finalist", 1)[1].splitlines()[2:] if line.strip()][:1]
    assert finals == [chosen]  # the best-scoring finalist, listed first
    model, meta = load_pruned(out)
    names = {s.name for s in load_plan(resnet_plan).strategies}
    assert meta["strategy"]["name"] == chosen and chosen.partition("@")[0] in names
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    zeros = sum(int((m.weight == 0).sum()) for m in convs) / sum(m.weight.numel() for m in convs)
    assert zeros == pytest.approx(0.5, abs=0.05)  # the plan's target (the classifier counts too)
    for extra in (["--backend", "tp"], ["--calib", "random"]):
        r = _run("prune", "--plan", str(resnet_plan), "--strategy", "best", "--out", str(tmp_path / "x.pt"), *extra)
        assert r.exit_code == 2 and "--strategy best chooses by masked validation accuracy" in r.output


def test_prune_errors_are_one_line(tmp_path, resnet_plan):
    r = CliRunner().invoke(main, ["prune", "--plan", str(resnet_plan), "--strategy", "nope:nope", "--out",
                                  str(tmp_path / "x.pt")])
    assert r.exit_code == 2 and r.output.startswith("error: no strategy 'nope:nope'") and r.output.count("\n") == 1
    bad = tmp_path / "bad.json"
    d = json.loads(resnet_plan.read_text())
    d["meta"].pop("model_spec")
    bad.write_text(json.dumps(d))
    r = CliRunner().invoke(main, ["prune", "--plan", str(bad), "--strategy", "magnitude:midpoint", "--out",
                                  str(tmp_path / "x.pt")])
    assert r.exit_code == 2 and "pass --model" in r.output
    assert not (tmp_path / "x.pt").exists()


def test_prune_help_has_an_example():
    r = CliRunner().invoke(main, ["prune", "--help"])
    assert r.exit_code == 0 and "mixmatch prune --plan plan.json" in r.output and "--backend" in r.output
