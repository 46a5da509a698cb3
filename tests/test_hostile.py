"""Hostile and broken inputs, through the Python API and through every command.

Every refusal is one line (``error: ...`` on stderr, exit status 2, no traceback) and leaves nothing in
the output folder: no output file and no temp file. Files that would run code if loaded carelessly
(a pickle payload, a YAML tag, a factory named in a plan or pruned-model file) carry a payload that
creates a marker file; the marker must never appear.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import mixmatch_plugin as mm
from mixmatch_plugin.app.cli import main
from mixmatch_plugin.errors import MixMatchError, PlanMismatchError

from .helpers import MLP, tied_mlp

TINY = "mixmatch_plugin.models:tiny_resnet"
TINY_KW = '{"num_classes": 10, "in_chans": 1, "width": 8}'
WIDER_KW = '{"num_classes": 10, "in_chans": 1, "width": 16}'


class Payload:
    """Unpickling this runs ``touch <marker>``: a checkpoint that needs code execution to load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def cli(*args: str):
    return CliRunner().invoke(main, ["-q", *args], catch_exceptions=False)


def assert_refused(r, out: Path, *fragments: str) -> None:
    """Exit 2, exactly one ``error:`` line on stderr, no traceback, and nothing left in ``out``."""
    assert r.exit_code == 2, (r.exit_code, r.output)
    lines = [ln for ln in r.stderr.strip().splitlines() if not ln.startswith(("WARNING", "INFO"))]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.output
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    assert not out.exists() or not list(out.iterdir()), sorted(p.name for p in out.iterdir())


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A plan of the tiny ResNet (width 8) recording its model, a tied-weights plan, and hostile variants."""
    d = tmp_path_factory.mktemp("hostile")
    from mixmatch_plugin.models import tiny_resnet

    torch.manual_seed(0)
    model = tiny_resnet(num_classes=10, in_chans=1, width=8)
    torch.save(model.state_dict(), d / "model.pt")
    p = mm.plan(model, signals=("magnitude",), target=0.5, on_unreachable="extend")
    p.meta["model_spec"] = {"model": TINY, "model_kwargs": TINY_KW, "input_shape": [1, 16, 16]}
    p.save(d / "plan.json")
    good = (d / "plan.json").read_text()
    (d / "truncated.json").write_text(good[: len(good) // 3])
    (d / "newer.json").write_text(good.replace("mixmatch.plan/1", "mixmatch.plan/2"))
    doc = json.loads(good)
    doc["meta"]["model_spec"] = {"model": "os:system", "model_kwargs": {"command": f"touch {d / 'PWNED'}"},
                                 "input_shape": [1, 16, 16]}
    (d / "evil_factory.json").write_text(json.dumps(doc))
    doc = json.loads(good)
    doc["layers"][2]["params"] = "many"
    (d / "bad_layer.json").write_text(json.dumps(doc))
    tied = mm.plan(tied_mlp(), signals=("magnitude",), target=0.3, on_unreachable="extend", options=mm.PlanOptions(disable_constraints=("small_layers",)))
    tied.meta["model_spec"] = {"model": "tests.helpers:tied_mlp", "model_kwargs": "{}", "input_shape": [1, 16, 16]}
    tied.save(d / "tied.json")
    torch.save({"state_dict": model.state_dict(), "extra": Payload(d / "PWNED")}, d / "evil.pt")
    (d / "evil.yaml").write_text(f"!!python/object/apply:os.system ['touch {d / 'PWNED'}']\n")
    (d / "newer_demo.json").write_text(json.dumps({"schema": "mixmatch.demo/7", "rows": []}))
    (d / "broken_demo.json").write_text(json.dumps({"schema": "mixmatch.demo/1", "model": "x"}))
    return d


# ----------------------------------------------------------------------------------------- the command
def _cases(d: Path, out: Path) -> dict[str, tuple[list[str], list[str]]]:
    plan, o = str(d / "plan.json"), str(out / "x")
    search = ["search", "--model", TINY, "--model-kwargs", TINY_KW, "--calib", "digits", "--out", str(out)]
    return {
        "prune truncated plan": (["prune", "--plan", str(d / "truncated.json"), "--strategy", "magnitude:midpoint", "--out", o],
                                 ["not valid JSON", "truncated"]),
        "prune newer plan": (["prune", "--plan", str(d / "newer.json"), "--strategy", "magnitude:midpoint", "--out", o],
                             ["newer than this version reads"]),
        "search newer plan": ([*search, "--plan", str(d / "newer.json")], ["newer than this version reads"]),
        "search truncated plan": ([*search, "--plan", str(d / "truncated.json")], ["not valid JSON"]),
        "report newer plan": (["report", str(d / "newer.json"), "--out", o], ["newer than this version reads"]),
        "report newer demo": (["report", str(d / "newer_demo.json"), "--out", o], ["newer than this version reads"]),
        "report broken demo": (["report", str(d / "broken_demo.json"), "--out", o], ["malformed"]),
        "report invalid layer": (["report", str(d / "bad_layer.json"), "--out", o], ["field 'params'"]),
        "prune invalid layer": (["prune", "--plan", str(d / "bad_layer.json"), "--strategy", "magnitude:midpoint", "--out", o],
                                ["field 'params'"]),
        **{f"prune plan of another model ({b})": (
            ["prune", "--plan", plan, "--strategy", "magnitude:midpoint", "--backend", b, "--model", TINY,
             "--model-kwargs", WIDER_KW, "--calib", "none", "--out", o], ["shape", "regenerate the plan"])
           for b in ("torch", "nni", "tp")},
        "search plan of another model": ([*search, "--plan", plan, "--model-kwargs", WIDER_KW], ["shape"]),
        "prune factory named by the plan": (
            ["prune", "--plan", str(d / "evil_factory.json"), "--strategy", "magnitude:midpoint", "--out", o],
            ["'os:system'", "a file may not choose which code runs", "pass --model"]),
        "prune pickle checkpoint": (["prune", "--plan", plan, "--strategy", "magnitude:midpoint", "--checkpoint",
                                     str(d / "evil.pt"), "--calib", "none", "--out", o], ["refusing to load checkpoint", "weights_only=True"]),
        "search pickle checkpoint": ([*search, "--plan", plan, "--checkpoint", str(d / "evil.pt")], ["refusing to load checkpoint"]),
        "plan pickle checkpoint": (["plan", "--model", TINY, "--model-kwargs", TINY_KW, "--checkpoint", str(d / "evil.pt"),
                                    "--calib", "none", "--signals", "magnitude", "--out", o], ["refusing to load checkpoint"]),
        "plan YAML object tag": (["plan", "--model", TINY, "--model-kwargs", TINY_KW, "--preset", str(d / "evil.yaml"),
                                  "--calib", "none", "--signals", "magnitude", "--out", o], ["YAML tags that construct objects"]),
        **{f"prune tied weights ({b})": (
            ["prune", "--plan", str(d / "tied.json"), "--strategy", "magnitude:midpoint", "--backend", b,
             "--model", "tests.helpers:tied_mlp", "--calib", "none", "--out", o], ["tied weights", "--backend torch"])
           for b in ("nni", "tp")},
        "plan model without Conv or Linear": (["plan", "--model", "torch.nn:LayerNorm", "--model-kwargs", '{"normalized_shape": 4}',
                                               "--calib", "none", "--signals", "magnitude", "--out", o], ["no prunable layer"]),
        "inspect model without Conv or Linear": (["inspect", "--model", "torch.nn:LayerNorm", "--model-kwargs",
                                                  '{"normalized_shape": 4}'], ["no prunable layer"]),
        "plan empty module name": (["plan", "--model", ":net", "--out", o], ["cannot import module"]),
        "plan missing factory": (["plan", "--model", "mixmatch_plugin.models:no_such_net", "--out", o], ["no callable 'no_such_net'"]),
        "plan negative target": (["plan", "--model", TINY, "--model-kwargs", TINY_KW, "--calib", "none", "--signals", "magnitude",
                                  "--target", "-0.2", "--out", o], ["[0, 1)"]),
        "demo target of one": (["demo", "--target", "1.0", "--out", o], ["[0, 1)"]),
        "demo NaN target": (["demo", "--target", "nan", "--out", o], ["[0, 1)"]),
    }


CASES = list(_cases(Path("d"), Path("o")))


@pytest.mark.parametrize("case", CASES)
def test_every_command_refuses_hostile_input_in_one_line(files, tmp_path, case):
    out = tmp_path / "out"
    args, fragments = _cases(files, out)[case]
    r = cli(*args)
    assert_refused(r, out, *fragments)
    assert not (files / "PWNED").exists(), "a hostile file ran code"


def test_hostile_files_never_run_code_through_the_api(files, tmp_path):
    from mixmatch_plugin.adapters.artifact import load_pruned, save_pruned
    from mixmatch_plugin.models import build_model, tiny_resnet

    with pytest.raises(MixMatchError, match="refusing to load checkpoint"):
        build_model(TINY, model_kwargs=json.loads(TINY_KW), checkpoint=files / "evil.pt")
    with pytest.raises(MixMatchError, match="YAML tags"):
        mm.load_rules(files / "evil.yaml")
    model = tiny_resnet(num_classes=10, in_chans=1, width=8)
    s = mm.load_plan(files / "plan.json").strategy("magnitude:midpoint")
    spec = {"model": "os:system", "model_kwargs": {"command": f"touch {files / 'PWNED'}"}, "input_shape": [1, 16, 16]}
    save_pruned(tmp_path / "p.pt", model, backend="torch", model_spec=spec, strategy=s.to_dict())
    with pytest.raises(MixMatchError, match="a file may not choose which code runs"):
        load_pruned(tmp_path / "p.pt")
    # build_model, although in mixmatch_plugin.models, is not a factory a file may name: it imports anything
    spec = {"model": "mixmatch_plugin.models:build_model", "model_kwargs": {"spec": "os:system"}, "input_shape": [1, 16, 16]}
    save_pruned(tmp_path / "q.pt", model, backend="torch", model_spec=spec, strategy=s.to_dict())
    with pytest.raises(MixMatchError, match="a file may not choose which code runs"):
        load_pruned(tmp_path / "q.pt")
    # the user names the model: it loads
    back, meta = load_pruned(tmp_path / "p.pt", model=tiny_resnet(num_classes=10, in_chans=1, width=8))
    assert meta["backend"] == "torch" and all(torch.equal(a, b) for a, b in zip(back.state_dict().values(),
                                                                               model.state_dict().values(), strict=True))
    torch.save({"format": "mixmatch.pruned/1", "backend": "torch"}, tmp_path / "broken.pt")
    with pytest.raises(MixMatchError, match="malformed pruned-model file"):
        load_pruned(tmp_path / "broken.pt")
    torch.save({"format": "mixmatch.pruned/1", "payload": Payload(files / "PWNED")}, tmp_path / "evil_pruned.pt")
    with pytest.raises(MixMatchError, match="weights_only=True"):
        load_pruned(tmp_path / "evil_pruned.pt")
    assert not (files / "PWNED").exists()


# --------------------------------------------------------------------------------------- the plan file
@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: d["layers"][0].update(params="many"), "field 'params'"),
        (lambda d: d["layers"][0].update(shape=[3, 3]), "field 'shape'"),
        (lambda d: d["layers"][0].update(kind="quantum"), "field 'kind'"),
        (lambda d: d["layers"].append(dict(d["layers"][0])), "listed twice"),
        (lambda d: d["layers"].__setitem__(0, "conv1"), "must be a JSON object"),
        (lambda d: d["strategies"][0].update(signal="astrology"), "unknown signal 'astrology'"),
        (lambda d: d["strategies"][0].update(global_sparsity=float("nan")), "global_sparsity"),
        (lambda d: d["strategies"][0]["layers"].update({"conv1": -0.1}), r"\[0, 1\)"),
        (lambda d: d["meta"].update(target="0.5"), "meta target"),
        (lambda d: d["meta"].update(model_spec={"model": "x:y", "input_shape": [1, -16, 16]}), "input_shape"),
        (lambda d: d["meta"].update(model_spec="timm:resnet18"), "model_spec"),
        (lambda d: d.update(sensitivity=[1, 2]), "malformed plan"),
    ],
)
def test_hostile_plan_fields_are_refused(files, tmp_path, mutate, match):
    d = json.loads((files / "plan.json").read_text())
    mutate(d)
    (tmp_path / "p.json").write_text(json.dumps(d))  # json writes NaN as a bare literal, as a hand-edited file might
    with pytest.raises(MixMatchError, match=match):
        mm.load_plan(tmp_path / "p.json")


def test_plan_applied_to_another_model_is_refused(files):
    from mixmatch_plugin.models import tiny_resnet

    p = mm.load_plan(files / "plan.json")
    wider = tiny_resnet(num_classes=10, in_chans=1, width=16)
    with pytest.raises(PlanMismatchError, match="shape"):
        p.apply(wider, "magnitude:midpoint")
    with pytest.raises(PlanMismatchError, match="does not have"):
        p.apply(MLP(), "magnitude:midpoint")


# -------------------------------------------------------------------------------- sparsities and rules
@pytest.mark.parametrize("bad", [1.0, -0.1, float("nan"), float("inf")])
def test_impossible_sparsities_are_refused_everywhere(files, bad):
    from mixmatch_plugin.adapters import nni as mnni
    from mixmatch_plugin.adapters import torch_pruning as mtp
    from mixmatch_plugin.models import tiny_resnet

    model = tiny_resnet(num_classes=10, in_chans=1, width=8)
    p = mm.load_plan(files / "plan.json")
    s = p.strategy("magnitude:midpoint")
    s.ratios = {**s.ratios, "layer1.0.conv1": bad}
    with pytest.raises(MixMatchError, match=r"\[0, 1\)"):
        mm.apply(model, s)
    with pytest.raises(MixMatchError, match=r"\[0, 1\)"):
        mtp.prune(model, s, torch.zeros(1, 1, 16, 16))
    with pytest.raises(MixMatchError, match=r"\[0, 1\)"):
        mnni.config_list(s, model)
    with pytest.raises(MixMatchError, match=r"\[0, 1\)"):
        mm.plan(model, signals=("magnitude",), target=bad)
    with pytest.raises(MixMatchError, match=r"\[0, 1\)"):
        mm.baselines.make("uniform", p.layers, p.signals or mm.compute_signals(model, signals=("magnitude",)), bad)
    with pytest.raises(MixMatchError, match=r"\[0, 1\)"):
        mm.StrategySpace(p.layers, p.ranges, p.bounds, target=bad)
    alpha = 1.5 if bad == 1.0 else bad  # an alpha of 1 is the range's top: allowed
    with pytest.raises(MixMatchError, match=r"must lie in \[0, 1\]"):
        p.space().strategy("x", "magnitude", dict.fromkeys(p.space().groups, alpha))


@pytest.mark.parametrize(
    ("rules", "match"),
    [
        ({"rules": [{"range": [0.1, 0.2], "per_stage": float("nan")}]}, "'per_stage' must be a finite number"),
        ({"rules": [{"range": [0.1, 0.2], "per_depth": "0.1"}]}, "'per_depth' must be a finite number"),
        ({"rules": [{"range": [0.1, 0.2]}], "max_layer_sparsity": "lots"}, "'max_layer_sparsity' must be a finite number"),
        ({"rules": [{"range": [0.1, 0.2]}], "max_layer_sparsity": 1.0}, r"must lie in \(0, 1\)"),
        ({"source": "empirical", "empirical": {"sparsities": [0.5, 1.0]}}, r"must lie in \(0, 1\)"),
        ({"source": "empirical", "empirical": {"methods": "snip"}}, "'empirical.methods'"),
        ({"rules": [{"range": [float("nan"), 0.2]}]}, "must satisfy 0 <= low <= high < 1"),
    ],
)
def test_hostile_rule_values_are_refused(rules, match):
    with pytest.raises(mm.RulesError, match=match):
        mm.load_rules(rules)


def test_an_unknown_empirical_method_is_refused_where_the_ranges_are_made(tiny_resnet, calib):
    rules = {"extends": "generic", "source": "empirical", "empirical": {"methods": ["rm -rf"]}}
    with pytest.raises(mm.RulesError, match=r"<rules mapping>: 'empirical\.methods' names 'rm -rf'"):
        mm.plan(tiny_resnet, calib, preset=rules)


def test_global_baselines_never_empty_a_layer():
    """A layer whose weights all score lowest would be pruned whole by one global threshold: ratio 1.0,
    which no plan file may hold. Each layer keeps its best weight; the count stays exact."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(256, 16), nn.ReLU(), nn.Linear(16, 10))
    with torch.no_grad():
        model[3].weight.mul_(1e-6)  # the head scores lowest everywhere
    layers = mm.inventory(model)
    sig = mm.compute_signals(model, signals=("magnitude",))
    n = sum(layer.params for layer in layers)
    for name in ("global_magnitude", "lamp", "uniform", "erk"):
        s = mm.baselines.make(name, layers, sig, 0.9)
        assert all(r < 1.0 for r in s.ratios.values()), (name, s.ratios)
        assert sum(round(s.ratios[layer.name] * layer.params) for layer in layers) == round(0.9 * n)
    assert mm.baselines.make("global_magnitude", layers, sig, 0.9).ratios["3"] == pytest.approx(159 / 160)


# ------------------------------------------------------------------------------------ calibration data
def _batch(x=(4, 1, 16, 16), y=None, dtype=torch.float32):
    return (torch.randn(*x).to(dtype), torch.zeros(x[0], dtype=torch.long) if y is None else y)


@pytest.mark.parametrize(
    ("loader", "match"),
    [
        ([], "yielded no batches"),
        ((b for b in []), "yielded no batches"),
        (7, "must be an iterable of batches"),
        (torch.randn(4, 1, 16, 16), "must be an iterable of batches"),
        ([_batch((0, 1, 16, 16))], "holds no samples"),
        ([_batch(y=torch.zeros(4, 1, dtype=torch.long))], "one class index per sample"),
        ([_batch(y=torch.zeros(3, dtype=torch.long))], "one class index per sample"),
        ([_batch(dtype=torch.float64)], "dtype torch.float64"),
        ([_batch(dtype=torch.float16)], "dtype torch.float16"),
        ([_batch((4, 3, 9, 9))], "could not run a batch of shape"),
        ([_batch(), _batch((4, 1, 8, 8))], "could not run a batch of shape"),
        ([_batch(y=torch.full((4,), 0.5))], "integer class indices"),
        ([(torch.randn(4, 1, 16, 16).numpy(), torch.zeros(4).numpy())], r"must be \(inputs, labels\) tensors"),
    ],
)
def test_bad_calibration_data_gets_one_clear_error(loader, match):
    with pytest.raises(MixMatchError, match=match) as info:
        mm.plan(MLP(), loader)
    assert "\n" not in str(info.value)


def test_integer_labels_of_any_width_give_the_same_scores():
    torch.manual_seed(0)
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))
    model = MLP().eval()
    ref = mm.compute_signals(model, [(x, y)])
    for dtype in (torch.int32, torch.uint8, torch.int16):
        got = mm.compute_signals(model, [(x, y.to(dtype))])
        assert torch.equal(got.score("a", "gradient"), ref.score("a", "gradient"))


# ------------------------------------------------------------------- tied weights and empty models
def test_tied_weights_are_pruned_once_by_masks_and_refused_by_the_pruners():
    from mixmatch_plugin.adapters import nni as mnni
    from mixmatch_plugin.adapters import torch_pruning as mtp

    model = tied_mlp().eval()
    layers = mm.inventory(model)
    assert [layer.aliases for layer in layers if layer.aliases] == [("c",)]
    p = mm.plan(model, signals=("magnitude",), target=0.4, on_unreachable="extend", options=mm.PlanOptions(disable_constraints=("small_layers",)))
    res = p.apply(model, p.strategies[0])
    assert res.model.c.weight is res.model.b.weight  # still tied in the pruned copy
    assert res.global_sparsity == pytest.approx(p.strategies[0].global_sparsity)
    x = torch.randn(2, 1, 16, 16)
    for call in (lambda: mtp.prune(model, p.strategies[0], x), lambda: mtp.pruning_ratio_dict(model, p.strategies[0], x),
                 lambda: mnni.prune(model, p.strategies[0], "level"), lambda: mnni.config_list(p.strategies[0], model),
                 lambda: mnni.config_list(p.strategies[0], layers=p.layers)):
        with pytest.raises(MixMatchError, match="tied weights"):
            call()
    assert model.c.weight is model.b.weight  # the refusals left the model alone


def test_model_without_conv_or_linear_is_refused():
    model = nn.Sequential(nn.LayerNorm(8), nn.ReLU())
    for call in (lambda: mm.plan(model, signals=("magnitude",)), lambda: mm.compute_signals(model),
                 lambda: mm.compute_signals(nn.Sequential(nn.ReLU()))):
        with pytest.raises(MixMatchError, match="no prunable layer"):
            call()


# ------------------------------------------------------------------------------------- file output
def test_outputs_get_ordinary_permissions(tmp_path):
    from mixmatch_plugin.io import atomic_write_text

    path = atomic_write_text(tmp_path / "report.md", "x")
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not the temp file's 0600
    path.chmod(0o640)
    atomic_write_text(path, "y")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # a replaced file keeps its mode


def test_large_inputs_are_resized_lazily(digits):
    """A 3x224x224 --input-shape used to resize a whole split up front (33 GB for Fashion-MNIST)."""
    from mixmatch_plugin.app import data

    train = data.fit_input(digits.train, (3, 64, 64))
    assert isinstance(train, data.Resized) and train.tensors[0].shape[1:] == (1, 16, 16)  # stored small
    x, _ = next(iter(data.loader(data.subset(train, 8), 4)))
    assert x.shape == (4, 3, 64, 64)
    expect = nn.functional.interpolate(digits.train.tensors[0][:1], size=(64, 64), mode="bilinear", align_corners=False)
    assert torch.allclose(train[0][0], expect[0].repeat(3, 1, 1))


def test_the_package_and_the_command_start_without_torch():
    code = "import sys, mixmatch_plugin, mixmatch_plugin.app.cli; assert 'torch' not in sys.modules, 'torch imported'"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    # importing a submodule does not replace the function of the same name on the package
    import mixmatch_plugin.finetuning
    import mixmatch_plugin.planning  # noqa: F401 - imported for what the import does to the package, not for a name

    assert all(callable(f) for f in (mm.plan, mm.inventory, mm.evaluate, mm.finetune))


def test_an_unusable_cached_checkpoint_is_trained_again(digits, tmp_path):
    """The checkpoint cache is the plugin's own: a broken entry is rebuilt, not a dead end."""
    from mixmatch_plugin.app.train import TrainConfig, train_cached
    from mixmatch_plugin.io import safe_torch_load

    cfg = TrainConfig(model=TINY, model_kwargs={"width": 4}, dataset="digits", epochs=1, max_train=64, warmup_steps=1,
                      augment=False)
    path = tmp_path / f"tiny_resnet-{cfg.key()}.pt"
    path.write_bytes(b"PK\x03\x04 not a checkpoint")
    model, info = train_cached(cfg, digits, cache_dir=tmp_path, progress=False)
    assert info["config"]["model"] == TINY and not model.training
    blob = safe_torch_load(path)  # replaced by a good one
    assert set(blob["state_dict"]) == set(model.state_dict())
