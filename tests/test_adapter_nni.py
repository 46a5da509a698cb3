"""NNI adapter: schema-valid config lists, the drop-in for uniform configs, pruning, and speed-up on torch >= 2.2.

Every trap of REFERENCE section 5 is exercised against the real NNI 3.0 (no mocks): first the trap
itself, then the adapter's way around it.
"""

from __future__ import annotations

import copy
import logging
import re
import subprocess
import sys
import warnings
from collections import defaultdict

import numpy as np
import pytest
import torch
from torch import nn

import mixmatch_plugin as mm
from mixmatch_plugin.errors import MixMatchError

from .helpers import small_vit

timm = pytest.importorskip("timm")
pytest.importorskip("nni")

from mixmatch_plugin.adapters import nni as mnni  # noqa: E402  (after the importorskip)


def _nni():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from nni.compression import pruning
        from nni.compression.base.config import default_config_schema, select_modules_by_config
    logging.getLogger("nni").setLevel(logging.WARNING)
    return pruning, default_config_schema, select_modules_by_config


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    m = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    p = mm.plan(m, signals=("magnitude",), target=0.4, on_unreachable="extend")
    return m, x, p


@pytest.fixture(scope="module")
def vit():
    m = small_vit().eval()
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    p = mm.plan(m, signals=("magnitude",), target=0.3, on_unreachable="extend", options=mm.PlanOptions(disable_constraints=("small_layers",)))
    return m, x, p


def _validate(cfg):
    _, schema, _ = _nni()
    s = schema("pruning")
    for e in cfg:
        s.validate(e)


def _names(cfg):
    out = []
    for e in cfg:
        out += e.get("op_names", [])
    return out


# ---------------------------------------------------------------------------------------- config_list
def test_level_config_is_one_entry_per_layer_with_python_floats(resnet):
    m, _, p = resnet
    s = p.strategy("magnitude:alpha-0.7")
    cfg = mnni.config_list(s, m)
    _validate(cfg)
    layers = {layer.name: layer for layer in p.layers}
    assert _names(cfg) == [n for n, layer in layers.items() if layer.kind != "norm"]  # every Conv/Linear, once
    for e in cfg:
        assert set(e) == {"op_names", "sparse_ratio"} and isinstance(e["op_names"], list) and len(e["op_names"]) == 1
        assert type(e["sparse_ratio"]) is float
        assert e["sparse_ratio"] == s.ratios[e["op_names"][0]]
    # the plan's layers can stand in for the model
    assert mnni.config_list(s, layers=p.layers) == cfg
    assert all(e["sparse_ratio"] > 0 for e in mnni.config_list(s, m, include_zero=False))


def test_trap_selectors_must_be_lists_and_ratios_python_floats():
    _, schema, _ = _nni()
    s = schema("pruning")
    with pytest.raises(Exception, match="should be instance of 'list'"):
        s.validate({"op_types": "Linear", "sparse_ratio": 0.5})
    with pytest.raises(Exception, match="should be instance of 'float'"):
        s.validate({"op_types": ["Linear"], "sparse_ratio": 0})
    with pytest.raises(Exception, match="should be instance of 'float'"):
        s.validate({"op_types": ["Linear"], "sparse_ratio": np.float32(0.5)})
    m = small_vit()
    zero = mm.baselines.uniform(mm.inventory(m), None, 0.3)
    zero.ratios = {k: 0.0 for k in zero.ratios}  # a strategy of zeros (ints would be rejected)
    cfg = mnni.config_list(zero, m)
    _validate(cfg)
    assert cfg and all(type(e["sparse_ratio"]) is float and e["sparse_ratio"] == 0.0 for e in cfg)
    np_ratios = mm.baselines.uniform(mm.inventory(m), None, 0.3)
    np_ratios.ratios = {k: float(np.float32(v)) for k, v in np_ratios.ratios.items()}
    _validate(mnni.config_list(np_ratios, m))


def test_trap_op_names_re_is_a_prefix_match_so_patterns_are_anchored():
    _, _, select = _nni()
    deit = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, num_classes=10, img_size=32,
                             patch_size=8, depth=1, embed_dim=48, num_heads=3)
    raw, _, _ = select(deit, {"op_names_re": ["head"]})
    assert {"head", "head_dist", "head_drop"} <= set(raw)  # "head" also selects head_dist (and the dropout)
    s = mm.baselines.uniform(mm.inventory(deit), None, 0.3)
    cfg = mnni.config_list(s, deit, selector="op_names_re")
    _validate(cfg)
    for e in cfg:
        (pattern,) = e["op_names_re"]
        assert pattern.startswith("^") and pattern.endswith("$")
        chosen, _, _ = select(deit, {"op_names_re": [pattern]})
        assert len(chosen) == 1, pattern
    assert any(e["op_names_re"] == ["^head$"] for e in cfg)


def test_trap_first_matching_entry_wins_and_each_layer_is_listed_once(resnet):
    pruning, _, _ = _nni()
    m, _, p = resnet
    work = copy.deepcopy(m)
    pr = pruning.LevelPruner(work, [{"op_names": ["conv1"], "sparse_ratio": 0.25},
                                    {"op_types": ["Conv2d"], "sparse_ratio": 0.75}])
    _, masks = pr.compress()
    pr.unwrap_model()
    assert float(1 - masks["conv1"]["weight"].mean()) == pytest.approx(0.25, abs=0.01)  # the first entry won
    cfg = mnni.config_list(p.strategy("magnitude:late-heavy"), m)
    names = _names(cfg)
    assert len(names) == len(set(names))
    assert mnni.coverage([{"op_names": ["conv1"], "sparse_ratio": 0.25},
                          {"op_types": ["Conv2d"], "sparse_ratio": 0.75}], m)["conv1"] == 0.25


def test_trap_only_some_module_types_are_selectable():
    pruning, _, _ = _nni()
    m = small_vit()
    with pytest.raises(AssertionError, match="LayerNorm is not registered"):
        pruning.LevelPruner(copy.deepcopy(m), [{"op_names": ["blocks.0.norm1"], "sparse_ratio": 0.5}])
    s = mm.baselines.uniform(mm.inventory(m), None, 0.3)
    cfg = mnni.config_list(s, m)
    types = {type(m.get_submodule(n)).__name__ for n in _names(cfg)}
    assert types <= set(mnni.SELECTABLE) and "LayerNorm" not in types


def test_trap_legacy_total_sparsity_is_broken_and_refused():
    pruning, _, _ = _nni()
    m = small_vit()
    with pytest.raises(Exception, match="group_id"):
        pruning.LevelPruner(copy.deepcopy(m), [{"op_types": ["Linear"], "total_sparsity": 0.5}])
    with pytest.raises(MixMatchError, match="total_sparsity' is broken"):
        mnni.from_uniform([{"op_types": ["Linear"], "total_sparsity": 0.5}], m)
    with pytest.raises(MixMatchError, match="must be a list of strings"):
        mnni.from_uniform([{"op_types": "Linear", "sparse_ratio": 0.5}], m)


def test_trap_global_group_ignores_max_ratio_and_the_adapter_never_uses_it(resnet):
    pruning, _, _ = _nni()
    m, x, p = resnet
    work = copy.deepcopy(m)
    pr = pruning.L1NormPruner(work, [{"op_types": ["Conv2d"], "sparse_ratio": 0.5, "global_group_id": 0,
                                      "max_sparse_ratio": 0.8}])
    _, masks = pr.compress()
    pr.unwrap_model()
    emptied = [n for n, mk in masks.items() if float(mk["weight"].mean()) == 0.0]
    assert len(emptied) >= 10  # whole convs at 100 % despite max_sparse_ratio 0.8
    for mode, kw in (("level", {}), ("channel", {"example_inputs": x})):
        cfg = mnni.config_list(p.strategy("magnitude:all-max"), m, mode=mode, **kw)
        assert all("global_group_id" not in e for e in cfg)


# ------------------------------------------------------------------------------------- dependency groups
def test_channel_config_has_one_ratio_per_dependency_group(resnet):
    from mixmatch_plugin.adapters import torch_pruning as mtp

    m, x, p = resnet
    s = p.strategy("magnitude:all-max")
    cfg = mnni.config_list(s, m, mode="channel", example_inputs=x)
    _validate(cfg)
    groups = {tuple(sorted(g.producers)): g for g in mtp.plan_groups(m, s, x)}
    ids = [e["dependency_group_id"] for e in cfg if "dependency_group_id" in e]
    assert len(ids) == len(set(ids))
    for e in cfg:
        g = groups[tuple(sorted(e["op_names"]))]
        assert int(g.channels * e["sparse_ratio"]) == g.channels - g.keep  # NNI prunes int(C·r) channels
    residual = next(e for e in cfg if "layer1.1.conv2" in e["op_names"])
    assert set(residual["op_names"]) == {"conv1", "layer1.0.conv2", "layer1.1.conv2"}


def test_trap_dependency_group_members_need_one_ratio_and_nni_misses_residual_convs(resnet):
    pruning, _, _ = _nni()
    m, x, p = resnet
    work = copy.deepcopy(m)
    pr = pruning.L1NormPruner(work, [{"op_names": ["layer1.0.conv2"], "sparse_ratio": 0.5, "dependency_group_id": 1},
                                     {"op_names": ["layer1.1.conv2"], "sparse_ratio": 0.3, "dependency_group_id": 1}])
    with pytest.raises(AssertionError):
        pr.compress()
    pr.unwrap_model()
    # NNI's own grouping (traced under the compatibility layer) leaves layerN.1.conv2 out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from nni.common.concrete_trace_utils import concrete_trace
        from nni.compression.speedup.dependency import auto_set_denpendency_group_ids
    with mnni.speedup_compat():
        gm = concrete_trace(copy.deepcopy(m), {"x": x})
        auto = auto_set_denpendency_group_ids(gm, [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}])
    nni_groups = defaultdict(set)
    for e in auto:
        if "dependency_group_id" in e:
            nni_groups[e["dependency_group_id"]].add(e["op_names"][0])
    g2 = next(g for g in nni_groups.values() if "layer2.0.downsample.0" in g)
    assert "layer2.1.conv2" not in g2
    ours = mnni.config_list(p.strategy("magnitude:all-max"), m, mode="channel", example_inputs=x)
    assert any({"layer2.0.downsample.0", "layer2.0.conv2", "layer2.1.conv2"} == set(e["op_names"]) for e in ours)


# ------------------------------------------------------------------------------------------ from_uniform
def test_from_uniform_covers_the_same_layers_at_the_same_sparsity(resnet):
    m, _, _ = resnet
    uniform = [{"op_types": ["Conv2d"], "exclude_op_names": ["conv1"], "sparse_ratio": 0.6}]
    cfg = mnni.from_uniform(uniform, m)
    _validate(cfg)
    covered = mnni.coverage(uniform, m)
    assert set(_names(cfg)) == set(covered) and "conv1" not in covered and "fc" not in covered
    n = {name: m.get_submodule(name).weight.numel() for name in covered}
    overall = sum(e["sparse_ratio"] * n[e["op_names"][0]] for e in cfg) / sum(n.values())
    assert overall == pytest.approx(0.6, abs=1e-4)
    assert len({e["sparse_ratio"] for e in cfg}) > 3  # per-layer, not uniform
    # NNI applies it: the realized sparsity over the covered layers is the same
    pruning, _, _ = _nni()
    work = copy.deepcopy(m)
    pr = pruning.LevelPruner(work, cfg)
    _, masks = pr.compress()
    pr.unwrap_model()
    zeros = sum(float((1 - masks[k]["weight"]).sum()) for k in covered)
    assert zeros / sum(n.values()) == pytest.approx(0.6, abs=1e-3)


def test_from_uniform_channel_mode_and_regex_configs(resnet, calib):
    m, x, _ = resnet
    uniform = [{"op_names_re": [r"layer[34]\."], "op_types": ["Conv2d"], "sparse_ratio": 0.5}]
    cfg = mnni.from_uniform(uniform, m, mode="channel", example_inputs=x)
    _validate(cfg)
    covered = mnni.coverage(uniform, m)
    assert all(n in covered for n in _names(cfg))
    assert any("dependency_group_id" in e for e in cfg)
    w = {k: m.get_submodule(k).weight.numel() for k in _names(cfg)}
    ratio = {n: e["sparse_ratio"] for e in cfg for n in e["op_names"]}
    mean = sum(ratio[k] * w[k] for k in w) / sum(w.values())
    assert mean == pytest.approx(0.5, abs=0.06)  # channel rounding


# -------------------------------------------------------------------------------------------- pruning
@pytest.mark.parametrize("pruner", ["level", "l1", "l2", "fpgm"])
def test_prune_makes_the_masks_permanent(resnet, pruner):
    m, x, p = resnet
    before = {k: v.clone() for k, v in m.state_dict().items()}
    s = p.strategy("magnitude:alpha-0.7")
    res = mnni.prune(m, s, pruner, example_inputs=x)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert not any(hasattr(mod, "_nni_wrapper") for mod in res.model.modules())
    for name, mk in res.masks.items():
        assert set(mk) >= {"weight"}
        w = res.model.get_submodule(name).weight
        assert torch.count_nonzero(w[mk["weight"] == 0]) == 0
    if pruner == "level":
        for name, sp in res.sparsity.items():
            assert sp == pytest.approx(s.ratios[name], abs=2.0 / res.model.get_submodule(name).weight.numel())
    else:  # whole output channels, the same ones across a dependency group
        g = [res.model.get_submodule(n).weight for n in ("layer2.0.downsample.0", "layer2.0.conv2", "layer2.1.conv2")]
        dead = [set(torch.nonzero(w.flatten(1).abs().sum(1) == 0).flatten().tolist()) for w in g]
        assert dead[0] == dead[1] == dead[2] and dead[0]


def test_trap_unwrap_model_restores_dense_weights(resnet):
    pruning, _, _ = _nni()
    m, _, _ = resnet
    work = copy.deepcopy(m)
    pr = pruning.LevelPruner(work, [{"op_names": ["layer1.0.conv1"], "sparse_ratio": 0.5}])
    _, masks = pr.compress()
    pr.unwrap_model()
    assert torch.count_nonzero(work.layer1[0].conv1.weight == 0) == 0  # dense again
    assert float(masks["layer1.0.conv1"]["weight"].mean()) == pytest.approx(0.5, abs=0.01)


def test_taylor_pruner_runs_with_a_traced_optimizer_and_leaves_weights_unchanged(resnet, calib):
    m, x, p = resnet
    batches = [(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))) for _ in range(2)]
    res = mnni.prune(m, p.strategy("magnitude:all-max"), "taylor", example_inputs=x, calib=batches)
    assert res.masks
    kept = {n: mk["weight"] for n, mk in res.masks.items()}
    for n, mask in kept.items():  # lr 0: kept weights are the original ones
        w0, w1 = m.get_submodule(n).weight, res.model.get_submodule(n).weight
        assert torch.equal(w1[mask.bool()], w0[mask.bool()])
    assert all(torch.equal(a, b) for (ka, a), (kb, b) in zip(m.named_buffers(), res.model.named_buffers(), strict=True)
               if "running" in ka)  # BatchNorm statistics untouched
    with pytest.raises(MixMatchError, match="needs calibration data"):
        mnni.prune(m, p.strategy("magnitude:all-max"), "taylor", example_inputs=x)


# -------------------------------------------------------------------------------------------- speed-up
def test_speedup_on_resnet18_removes_the_channels_and_keeps_the_output(resnet):
    m, x, p = resnet
    res = mnni.prune(m, p.strategy("magnitude:all-max"), "l1", example_inputs=x)
    fast = mnni.speedup(res.model, res.masks, x)
    assert not fast.training and not any(mod.training for mod in fast.modules())
    groups = {tuple(sorted(e["op_names"])): e["sparse_ratio"] for e in res.config}
    for names, r in groups.items():
        for n in names:
            c0 = m.get_submodule(n).out_channels
            assert fast.get_submodule(n).out_channels == c0 - int(c0 * r), n
    assert sum(q.numel() for q in fast.parameters()) < sum(q.numel() for q in m.parameters())
    with torch.no_grad():
        assert torch.allclose(fast(x), res.model(x), atol=1e-5, rtol=1e-4)
    assert not mnni.is_active()


def test_speedup_on_vit_fc1_and_refusal_for_qkv(vit):
    m, x, p = vit
    s = p.strategy("magnitude:all-max")
    res = mnni.prune(m, s, "l1", example_inputs=x, only=["mlp_fc1"])
    assert _names(res.config) == ["blocks.1.mlp.fc1", "blocks.0.mlp.fc1"] or set(_names(res.config)) == {
        "blocks.0.mlp.fc1", "blocks.1.mlp.fc1"}
    fast = mnni.speedup(res.model, res.masks, x)
    for e in res.config:
        (n,) = e["op_names"]
        assert fast.get_submodule(n).out_features == 128 - int(128 * e["sparse_ratio"]) < 128
    with torch.no_grad():
        assert torch.allclose(fast(x), res.model(x), atol=1e-5, rtol=1e-4)
    full = mnni.prune(m, s, "l1", example_inputs=x)
    with pytest.raises(MixMatchError, match=r"cannot remove the pruned channels of .*torch_pruning"):
        mnni.speedup(full.model, full.masks, x)


def _speedup_raw(model, masks, x, fixes, updaters=True):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from nni.compression.speedup import ModelSpeedup
    logging.getLogger("nni").setLevel(logging.CRITICAL)
    with mnni.speedup_compat(fixes=fixes), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NNI's mask inference warns about std() on batch-1 tensors
        ModelSpeedup(model, x, masks, customized_mask_updaters=mnni.mask_updaters() if updaters else None).speedup_model()


@pytest.mark.parametrize("missing", [("tensorbase",), ("is_impure",), ("bytecode",), ("assert",),
                                     ("handle_torch_function", "assert")])
def test_trap_each_speedup_fix_is_needed(vit, missing):
    m, x, p = vit
    res = mnni.prune(m, p.strategy("magnitude:all-max"), "l1", example_inputs=x, only=["mlp_fc1"])
    fixes = tuple(f for f in mnni.FIXES if f not in missing)
    with pytest.raises(Exception):  # noqa: B017 - each cause fails differently inside NNI
        _speedup_raw(copy.deepcopy(res.model), res.masks, x, fixes)
    _speedup_raw(copy.deepcopy(res.model), res.masks, x, mnni.FIXES)  # and with all five it works


def test_trap_handle_torch_function_is_a_leaf_of_the_tracer(vit):
    """Cause 4: the tracer records handle_torch_function as an opaque leaf; timm's _assert reaches it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from nni.common.concrete_trace_utils import concrete_tracer as ct
    leaf = ct.ConcreteTracer.default_autowrap_leaf_function
    assert torch.overrides.handle_torch_function in leaf
    with mnni.speedup_compat():
        assert torch.overrides.handle_torch_function not in ct.ConcreteTracer.default_autowrap_leaf_function
    assert ct.ConcreteTracer.default_autowrap_leaf_function is leaf
    m, x, p = vit
    res = mnni.prune(m, p.strategy("magnitude:all-max"), "l1", example_inputs=x, only=["mlp_fc1"])
    without_both = tuple(f for f in mnni.FIXES if f not in ("handle_torch_function", "assert"))
    with pytest.raises(TypeError, match=r"no implementation found for 'torch\._assert'"):
        _speedup_raw(copy.deepcopy(res.model), res.masks, x, without_both)


def test_trap_vit_needs_the_layernorm_mask_updater(vit):
    m, x, p = vit
    res = mnni.prune(m, p.strategy("magnitude:all-max"), "l1", example_inputs=x, only=["mlp_fc1"])
    with pytest.raises(Exception, match="empty"):
        _speedup_raw(copy.deepcopy(res.model), res.masks, x, mnni.FIXES, updaters=False)


def test_trap_batchnorm_comes_back_in_training_mode(resnet):
    m, x, p = resnet
    res = mnni.prune(m, p.strategy("magnitude:all-max"), "l1", example_inputs=x)
    raw = copy.deepcopy(res.model).eval()
    _speedup_raw(raw, res.masks, x, mnni.FIXES)
    assert any(mod.training for mod in raw.modules() if isinstance(mod, nn.BatchNorm2d))
    fast = mnni.speedup(res.model, res.masks, x)
    assert not any(mod.training for mod in fast.modules())


def test_compat_layer_patches_nothing_outside_the_block():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from nni.common.concrete_trace_utils import concrete_proxy as cp
        from nni.common.concrete_trace_utils import concrete_tracer as ct
    import timm.layers.patch_embed as pe

    before = (ct.ConcreteTracer.trace, ct.node_is_impure_wrapper, cp.dis, cp.ConcreteProxy.jump_opcodes,
              ct.ConcreteTracer.default_autowrap_leaf_function, pe._assert)
    with mnni.speedup_compat():
        assert ct.ConcreteTracer.trace is not before[0] and pe._assert is not before[5]
        assert mnni.is_active()
    after = (ct.ConcreteTracer.trace, ct.node_is_impure_wrapper, cp.dis, cp.ConcreteProxy.jump_opcodes,
             ct.ConcreteTracer.default_autowrap_leaf_function, pe._assert)
    assert all(a is b for a, b in zip(before, after, strict=True)) and pe._assert is torch._assert
    with pytest.raises(ValueError, match="unknown fix"), mnni.speedup_compat(fixes=("nope",)):
        pass


def test_importing_the_adapter_neither_imports_nni_nor_warns():
    code = (
        "import sys, warnings\n"
        "warnings.simplefilter('error')\n"
        "import mixmatch_plugin.adapters.nni\n"
        "assert 'nni' not in sys.modules, 'nni imported eagerly'\n"
        "import mixmatch_plugin\n"
        "assert not any(k == 'nni' or k.startswith('nni.') for k in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-800:]


def test_prune_and_speedup_emit_no_warnings(resnet):
    m, x, p = resnet
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = mnni.prune(m, p.strategy("magnitude:all-max"), "l1", example_inputs=x)
        mnni.speedup(res.model, res.masks, x)
    assert not [w for w in caught if re.search("nni", str(w.filename))], [str(w.message) for w in caught][:3]


def test_channel_masks_cover_batchnorm_so_the_masked_model_equals_the_sped_up_one(trained_tiny_resnet, digits):
    m = trained_tiny_resnet
    x = digits.val.tensors[0][:8]
    p = mm.plan(m, signals=("magnitude",), target=0.4, on_unreachable="extend")
    res = mnni.prune(m, p.strategy("magnitude:all-max"), "l1", example_inputs=x)
    bns = [n for n in res.masks if isinstance(res.model.get_submodule(n), nn.BatchNorm2d)]
    assert bns, "the BatchNorms of removed channels are masked too"
    fast = mnni.speedup(res.model, res.masks, x)  # verifies output equality itself
    with torch.no_grad():
        assert torch.allclose(fast(x), res.model(x), atol=1e-4, rtol=1e-4)
    # NNI's own masks (Conv/Linear rows only) leave the BatchNorm shift of a removed channel alive
    conv_only = {n: mk for n, mk in res.masks.items() if n not in bns}
    masked = copy.deepcopy(m)
    with torch.no_grad():
        for n, mk in conv_only.items():
            mod = masked.get_submodule(n)
            mod.weight.mul_(mk["weight"])
            if mk.get("bias") is not None and mod.bias is not None:
                mod.bias.mul_(mk["bias"])
    raw = copy.deepcopy(masked)
    _speedup_raw(raw, conv_only, x, mnni.FIXES)
    raw.eval()
    with torch.no_grad():
        assert (raw(x) - masked(x)).abs().max() > 1e-3


def test_from_uniform_infers_channel_mode_from_the_pruner(resnet):
    # pasted into an L1NormPruner script: grouped channel entries, the mode asked of NNI itself
    m, x, _ = resnet
    pruning, _, _ = _nni()
    uniform = [{"op_names_re": [r"layer[34]\."], "op_types": ["Conv2d"], "sparse_ratio": 0.5}]
    assert mnni.nni_mode(pruning.L1NormPruner) == "channel" and mnni.nni_mode("LevelPruner") == "level"
    cfg = mnni.from_uniform(uniform, m, mode=pruning.L1NormPruner, example_inputs=x)
    assert cfg == mnni.from_uniform(uniform, m, mode="channel", example_inputs=x)
    assert any("dependency_group_id" in e for e in cfg)
    with pytest.raises(MixMatchError, match="wraps another pruner"):
        mnni.from_uniform(uniform, m, mode="AGPPruner", example_inputs=x)
    with pytest.raises(MixMatchError, match="an NNI pruner"):
        mnni.from_uniform(uniform, m, mode="LevelPrunr")


def test_speedup_of_timm_mobilenetv3_through_the_shim():
    # NNI 3.0: '_output_randomize' typo, BatchNormAct2d traced into, timm's Linear not replaced
    pruning, _, _ = _nni()
    from nni.compression.speedup import ModelSpeedup

    torch.manual_seed(0)
    m = timm.create_model("mobilenetv3_small_100", pretrained=False, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = m(x)
        assert mnni.plain_timm_layers(m) and float((m(x) - want).abs().max()) == 0.0
    convs = [n for n, c in m.named_modules() if isinstance(c, nn.Conv2d) and c.groups == 1 and ".se." not in n and n != "conv_stem"]
    pr = pruning.L1NormPruner(m, [{"op_names": convs, "sparse_ratio": 0.5}])
    _, masks = pr.compress()
    pr.unwrap_model()
    before = sum(p.numel() for p in m.parameters())
    with mnni.speedup_compat(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ModelSpeedup(m, x, masks, customized_mask_updaters=mnni.mask_updaters()).speedup_model()
    m.eval()
    assert m(x).shape == (2, 10) and sum(p.numel() for p in m.parameters()) < 0.8 * before
    # the adapter's own path converts them itself (and maps the BatchNorm masks to the new names)
    torch.manual_seed(0)
    fresh = timm.create_model("mobilenetv3_small_100", pretrained=False, num_classes=10).eval()
    p = mm.plan(fresh, signals=("magnitude",), target=0.3, on_unreachable="extend")
    res = mnni.prune(fresh, p.strategy("magnitude:midpoint"), "l1", example_inputs=x)
    fast = mnni.speedup(res.model, res.masks, x)  # raises unless it equals the masked model
    assert sum(q.numel() for q in fast.parameters()) < 0.8 * before
