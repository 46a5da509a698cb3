"""The depth-and-width loop: MACs-matched width candidates, CKA choice on validation, checkpoints and resume."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

pytest.importorskip("torch_pruning")

import mixmatch_plugin as mm
from mixmatch_plugin import depth
from mixmatch_plugin.adapters.depth_width import (
    FORMAT,
    DepthWidthConfig,
    count_macs,
    load_depth_width,
    prune_depth_width,
    width_candidate,
)
from mixmatch_plugin.errors import MixMatchError

from .helpers import MLP, small_vit

timm = pytest.importorskip("timm")


def _resnet():
    torch.manual_seed(0)
    return timm.create_model("resnet18", num_classes=10, in_chans=1, stem_type="deep", stem_width=8,
                             channels=(16, 32, 64, 128))


@pytest.fixture(scope="module")
def trained(digits_loaders):
    """resnet18 layout at small widths, trained briefly on digits (a few seconds)."""
    model = _resnet()
    train, _, _ = digits_loaders
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(2):
        for x, y in train:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def example(calib):
    return next(iter(calib))[0][:4]


CFG = DepthWidthConfig(target=0.4, min_blocks=1, finetune_steps=4, bisect_steps=10, macs_tolerance=0.03)


@pytest.fixture(scope="module")
def full_run(trained, example, calib, digits_loaders, tmp_path_factory):
    train, val, _ = digits_loaders
    path = tmp_path_factory.mktemp("dw") / "run.pt"
    before = copy.deepcopy(trained.state_dict())
    seen = []
    res = prune_depth_width(trained, example, calib, val, config=CFG, train_loader=train, state_path=path,
                            meta={"test": "full"}, on_iteration=lambda _m, e: seen.append(e))
    return res, path, before, seen


# ------------------------------------------------------------------------------------- configuration
@pytest.mark.parametrize("kw, match", [
    ({"target": 0.0}, "MACs target 0.0 is out of range"),
    ({"target": 1.0}, "MACs target 1.0 is out of range"),
    ({"target": float("nan")}, "MACs target nan is out of range"),
    ({"target": 0.5, "mode": "both"}, "mode must be one of"),
    ({"target": 0.5, "strategies": ("magnitude:median",)}, "width strategy 'magnitude:median'"),
    ({"target": 0.5, "allocation": "erk"}, "allocation must be one of"),
    ({"target": 0.5, "block_score": "l1"}, "block_score must be one of"),
    ({"target": 0.5, "min_blocks": -1}, "min_blocks"),
])
def test_settings_out_of_range_are_one_line_errors(kw, match):
    with pytest.raises(MixMatchError, match=match) as info:
        DepthWidthConfig(**kw).validate()
    assert "\n" not in str(info.value)


def test_finetuning_needs_a_train_loader(trained, example, calib, digits_loaders):
    with pytest.raises(MixMatchError, match="needs train_loader"):
        prune_depth_width(trained, example, calib, digits_loaders[1], config=DepthWidthConfig(0.3, finetune_steps=2))


# --------------------------------------------------------------------------------------- width candidate
@pytest.mark.parametrize("allocation", ["mm", "uniform"])
def test_width_candidate_removes_the_asked_macs_through_the_tp_adapter(trained, example, allocation):
    macs0, _ = count_macs(trained, example)
    before = copy.deepcopy(trained.state_dict())
    want = round(0.25 * macs0)
    cand = width_candidate(trained, want, example, config=DepthWidthConfig(0.5, allocation=allocation, macs_tolerance=0.02))
    assert cand is not None
    assert abs(cand.mismatch) <= 0.05, cand.mismatch
    assert cand.removed == macs0 - count_macs(cand.model, example)[0]
    assert cand.model(example).shape == (4, 10)
    assert cand.history and all(len(h) == 3 for h in cand.history)
    assert all(torch.equal(before[k], v) for k, v in trained.state_dict().items())
    widths = {n: m.out_channels for n, m in cand.model.named_modules() if isinstance(m, nn.Conv2d)}
    orig = {n: m.out_channels for n, m in trained.named_modules() if isinstance(m, nn.Conv2d)}
    kept = {round(widths[n] / orig[n], 2) for n in orig if n.startswith("layer") and "downsample" not in n}
    if allocation == "uniform":
        assert len(kept) <= 3, kept  # one ratio, up to channel rounding
    else:
        assert len(kept) > 3, kept  # Mix-and-Match: per-stage ratios differ


def test_width_candidate_refuses_bad_requests(trained, example):
    with pytest.raises(MixMatchError, match="must be positive"):
        width_candidate(trained, 0, example)
    with pytest.raises(MixMatchError, match="needs calibration data"):
        width_candidate(trained, 1000, example, strategy="gradient:midpoint")


# ------------------------------------------------------------------------------------------- the loop
def test_loop_builds_both_candidates_matches_macs_and_keeps_the_higher_cka(full_run, trained, example):
    res, _, before, seen = full_run
    assert res.stopped == "target" and res.macs_reduction >= CFG.target
    assert seen == res.log and [e["iteration"] for e in res.log] == list(range(1, len(res.log) + 1))
    assert len(res.log) >= 2
    reductions = [e["macs_reduction"] for e in res.log]
    assert reductions == sorted(reductions) and reductions[-1] == pytest.approx(res.macs_reduction)
    for e in res.log:
        d, w = e["depth"], e["width"]
        if d is not None and w is not None:
            # same removed MACs (matched by bisection) and both measured against the parent on validation
            assert abs(w["removed_macs"] - d["removed_macs"]) / d["removed_macs"] == pytest.approx(abs(w["mismatch"]))
            assert abs(w["mismatch"]) <= 0.2
            assert 0.0 < d["cka"] <= 1.0 + 1e-9 and 0.0 < w["cka"] <= 1.0 + 1e-9
            assert e["choice"] == ("depth" if d["cka"] >= w["cka"] else "width")
            assert d["scores"][d["block"]] == min(d["scores"].values())
        assert e["val_accuracy"] == (d if e["choice"] == "depth" else w)["val_accuracy"]
    assert {e["choice"] for e in res.log} <= {"depth", "width"}
    # the user's model is untouched; the result runs and has what the log says
    assert all(torch.equal(before[k], v) for k, v in trained.state_dict().items())
    assert all(not isinstance(m, depth.IdentityBlock) for m in trained.modules())
    assert count_macs(res.model, example)[0] == res.log[-1]["macs"] == res.macs
    assert sorted(depth.removed_blocks(res.model)) == sorted(e["depth"]["block"] for e in res.log if e["choice"] == "depth")
    assert "stopped: target" in res.summary()


def test_checkpoint_is_plain_data_and_rebuilds_the_model(full_run, trained, example):
    res, path, _, _ = full_run
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["format"] == FORMAT and raw["stopped"] == "target"
    assert len(raw["ops"]) == len(raw["log"]) == len(res.log)
    assert [op["kind"] for op in raw["ops"]] == [e["choice"] for e in res.log]
    rebuilt, state = load_depth_width(path, trained)
    assert torch.allclose(rebuilt(example), res.model(example), atol=1e-5)
    assert state["meta"] == {"test": "full"} and "state_dict" not in state


def test_rerun_resumes_and_refuses_another_configuration(full_run, trained, example, calib, digits_loaders, tmp_path):
    res, path, _, _ = full_run
    train, val, _ = digits_loaders
    again = prune_depth_width(trained, example, calib, val, config=CFG, train_loader=train, state_path=path,
                              meta={"test": "full"})
    assert again.resumed_from == len(res.log) and again.log == res.log
    assert all(torch.equal(a, b) for a, b in zip(again.model.state_dict().values(), res.model.state_dict().values(),
                                                  strict=True))
    other = DepthWidthConfig(**{**CFG.__dict__, "block_score": "cka"})
    with pytest.raises(MixMatchError, match=r"another configuration \(differs in config \(block_score\)\)"):
        prune_depth_width(trained, example, calib, val, config=other, train_loader=train, state_path=path,
                          meta={"test": "full"})
    with pytest.raises(MixMatchError, match=r"differs in meta \(test\)"):
        prune_depth_width(trained, example, calib, val, config=CFG, train_loader=train, state_path=path,
                          meta={"test": "other"})
    with pytest.raises(MixMatchError, match="differs in the model weights"):
        prune_depth_width(_resnet().eval(), example, calib, val, config=CFG, train_loader=train, state_path=path,
                          meta={"test": "full"})
    bogus = tmp_path / "bogus.pt"
    torch.save({"format": "something else"}, bogus)
    with pytest.raises(MixMatchError, match="is not a depth-and-width checkpoint"):
        prune_depth_width(trained, example, calib, val, config=CFG, train_loader=train, state_path=bogus)


def test_interrupted_run_resumes_to_the_same_result(full_run, trained, example, calib, digits_loaders, tmp_path):
    """Stop after one iteration (max_iterations is not part of the key), then continue: equal to one go."""
    res, _, _, _ = full_run
    train, val, _ = digits_loaders
    path = tmp_path / "part.pt"
    first = prune_depth_width(trained, example, calib, val, config=DepthWidthConfig(**{**CFG.__dict__, "max_iterations": 1}),
                              train_loader=train, state_path=path, meta={"test": "full"})
    assert first.stopped == "max_iterations" and len(first.log) == 1
    rest = prune_depth_width(trained, example, calib, val, config=CFG, train_loader=train, state_path=path,
                             meta={"test": "full"})
    assert rest.resumed_from == 1
    assert [e["iteration"] for e in rest.log] == [e["iteration"] for e in res.log]
    assert [e["choice"] for e in rest.log] == [e["choice"] for e in res.log]
    for a, b in zip(rest.model.state_dict().values(), res.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_depth_only_and_width_only_modes(trained, example, calib, digits_loaders):
    _, val, _ = digits_loaders
    d = prune_depth_width(trained, example, calib, val, config=DepthWidthConfig(0.9, mode="depth", min_blocks=1))
    assert d.stopped == "exhausted" and {e["choice"] for e in d.log} == {"depth"}
    assert all(e["width"] is None for e in d.log)
    kept = [b.stage for b in depth.find_blocks(d.model) if not b.removed]
    assert sorted(kept) == ["layer1", "layer2", "layer3", "layer4"] and len(d.log) == 4  # min 1 per stage
    w = prune_depth_width(trained, example, calib, val, config=DepthWidthConfig(
        0.9, mode="width", min_blocks=1, allocation="uniform", bisect_steps=8, max_iterations=2))
    assert w.stopped == "max_iterations" and [e["choice"] for e in w.log] == ["width", "width"]
    assert depth.removed_blocks(w.model) == []
    assert all(e["step_macs"] == e["depth"]["removed_macs"] for e in w.log)  # the depth candidate sets the step
    # a given MACs schedule (e.g. a depth-only run's) replaces the depth candidate's step
    sched = (0.12, 0.25)
    s = prune_depth_width(trained, example, calib, val, config=DepthWidthConfig(
        0.9, mode="width", allocation="uniform", schedule=sched, max_iterations=2, bisect_steps=8))
    assert [e["depth"] for e in s.log] == [None, None]
    assert [e["macs_reduction"] for e in s.log] == pytest.approx(list(sched), abs=0.02)
    with pytest.raises(MixMatchError, match="schedule must be increasing"):
        DepthWidthConfig(0.5, mode="width", schedule=(0.3, 0.2)).validate()
    with pytest.raises(MixMatchError, match="only applies to mode='width'"):
        DepthWidthConfig(0.5, schedule=(0.2,)).validate()


def test_models_without_blocks_run_width_only_or_are_refused(calib, digits_loaders):
    _, val, _ = digits_loaders
    mlp = MLP().eval()
    x = next(iter(calib))[0][:4]
    with pytest.raises(MixMatchError, match="MLP has no block that depth pruning supports"):
        prune_depth_width(mlp, x, calib, val, config=DepthWidthConfig(0.3))
    res = prune_depth_width(mlp, x, calib, val, config=DepthWidthConfig(0.25, mode="width", width_step=0.1,
                                                                        disable_constraints=("small_layers",)))
    assert res.stopped == "target" and len(res.log) >= 2
    assert all(e["step_macs"] == round(0.1 * res.macs_original) for e in res.log)


def test_one_iteration_on_a_vit(calib, digits_loaders, tmp_path):
    _, val, _ = digits_loaders
    vit = small_vit(depth=3).eval()
    x = next(iter(calib))[0][:4]
    res = prune_depth_width(vit, x, calib, val, state_path=tmp_path / "vit.pt",
                            config=DepthWidthConfig(0.2, max_iterations=1, disable_constraints=("small_layers",)))
    e = res.log[0]
    assert e["depth"]["block"].startswith("blocks.") and abs(e["width"]["mismatch"]) <= 0.1
    rebuilt, _ = load_depth_width(tmp_path / "vit.pt", vit)
    assert torch.allclose(rebuilt(x), res.model(x), atol=1e-5)
    assert mm.evaluate(res.model, val).samples == len(val.dataset)
