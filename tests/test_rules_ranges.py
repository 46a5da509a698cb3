"""Rule presets as data, structural constraints, empirical ranges and their combination."""

from __future__ import annotations

import warnings

import pytest
import timm

import mixmatch_plugin as mm
from mixmatch_plugin.errors import RulesError
from mixmatch_plugin.ranges import bounds, clamp_ranges, combine, rule_ranges

from .helpers import small_swin


def ranges_of(model, preset, **kw):
    layers = mm.inventory(model)
    rules = mm.load_rules(preset)
    if kw.get("off"):
        rules = rules.without(*kw["off"])
    return {layer.name: r for layer, r in zip(layers, clamp_ranges(rule_ranges(layers, rules), bounds(layers, rules)).values(), strict=True)}


def test_presets_are_detected_from_the_model_class():
    assert mm.preset_for(timm.create_model("resnet18")) == "resnet"
    assert mm.preset_for(small_swin()) == "swin"
    assert mm.preset_for(timm.create_model("levit_128s")) == "levit"
    assert mm.preset_for(timm.create_model("vgg11")) == "vgg"
    assert mm.preset_for(timm.create_model("convnext_atto")) == "generic"
    assert {"generic", "swin", "resnet", "levit", "vgg", "paper"} <= set(mm.builtin_presets())


def test_swin_preset_follows_the_authors_table():
    m = timm.create_model("swin_tiny_patch4_window7_224")
    r = ranges_of(m, "swin", off=["small_layers"])
    for s in range(4):
        qkv = r[f"layers.{s}.blocks.0.attn.qkv"]
        assert qkv == pytest.approx((0.10 + 0.05 * s, 0.30 + 0.05 * s))
        assert r[f"layers.{s}.blocks.0.attn.proj"] == pytest.approx((0.20 + 0.05 * s, 0.40 + 0.05 * s))
        assert r[f"layers.{s}.blocks.0.mlp.fc1"] == pytest.approx((0.30 + 0.05 * s, 0.45 + 0.05 * s))
        assert r[f"layers.{s}.blocks.0.mlp.fc2"] == pytest.approx((0.25 + 0.05 * s, 0.40 + 0.05 * s))
    assert r["patch_embed.proj"] == (0.0, 0.10) and r["layers.1.downsample.reduction"] == (0.05, 0.20)
    assert r["head.fc"] == (0.0, 0.15)
    assert r["layers.0.blocks.0.norm1"] == (0.0, 0.0)  # the norm constraint overrides the table's [0, .05]


def test_resnet_preset_and_small_layer_constraint():
    m = timm.create_model("resnet18", in_chans=1, num_classes=10)
    r = ranges_of(m, "resnet")
    assert r["layer1.0.conv1"] == (0.30, 0.50) and r["layer4.0.conv2"] == (0.75, 0.95)
    assert r["layer3.0.downsample.0"] == (0.0, 0.20) and r["bn1"] == (0.0, 0.0)
    assert r["layer2.0.downsample.0"] == (0.0, 0.10)  # 8,192 weights: small
    assert r["conv1"] == (0.0, 0.10)  # 3,136 weights < 10K: capped at 0.10
    assert ranges_of(m, "resnet", off=["small_layers"])["conv1"] == (0.0, 0.30)


def test_paper_constraints_clamp_patch_embedding():
    layers = mm.inventory(timm.create_model("vit_tiny_patch16_224", depth=1))
    hard = bounds(layers, mm.load_rules("paper"))
    assert hard["patch_embed.proj"] == (0.15, 0.30) and hard["norm"] == (0.0, 0.0)
    hard_generic = bounds(layers, mm.load_rules("generic"))
    assert hard_generic["patch_embed.proj"] == (0.0, 0.99)


@pytest.mark.parametrize("preset", sorted(mm.builtin_presets()))
def test_every_preset_keeps_every_norm_dense_even_inside_the_patch_embedding(preset):
    # Swin's patch embedding holds a LayerNorm; the paper's patch_embed clamp [0.15, 0.30] once beat the
    # norm constraint there (last match wins) and pruned 15 % of its scales
    layers = mm.inventory(small_swin())
    assert "patch_embed.norm" in {layer.name for layer in layers}
    hard = bounds(layers, mm.load_rules(preset))
    assert {layer.name: hard[layer.name] for layer in layers if layer.kind == "norm"} == {
        layer.name: (0.0, 0.0) for layer in layers if layer.kind == "norm"
    }
    if preset == "paper":
        assert hard["patch_embed.proj"] == (0.15, 0.15)  # small (< 10K) and a patch embedding: the later clamp wins


def test_user_file_extends_and_overrides(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text(
        "schema: mixmatch.rules/1\nname: mine\nextends: swin\n"
        "constraints: {small_layers: null}\n"
        "rules:\n  - {role: mlp_fc1, stage: 1, range: [0.6, 0.8]}\n"
    )
    rules = mm.load_rules(f)
    assert rules.name == "mine" and "small_layers" not in {c.id for c in rules.constraints}
    m = small_swin()
    layers = mm.inventory(m)
    r = rule_ranges(layers, rules)
    assert r["layers.1.blocks.0.mlp.fc1"] == (0.6, 0.8)
    assert r["layers.0.blocks.0.mlp.fc1"] == (0.30, 0.45)  # falls through to the swin rules


def test_toml_rules_file(tmp_path):
    f = tmp_path / "r.toml"
    f.write_text('schema = "mixmatch.rules/1"\nname = "t"\n[[rules]]\nrole = "conv"\nrange = [0.2, 0.4]\n[[rules]]\nrange = [0.0, 0.1]\n')
    rules = mm.load_rules(f)
    assert rules.rules[0].range == (0.2, 0.4) and len(rules.rules) == 2


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("rules: [{role: mlp, range: [0.1, 0.2]}]", "unknown role 'mlp'"),
        ("rules: [{role: conv, range: [0.5, 0.2]}]", "must satisfy 0 <= low <= high < 1"),
        ("rules: [{role: conv, range: [0.1, 1.0]}]", "must satisfy"),
        ("rules: [{role: conv}]", "missing 'range"),
        ("rules: [{role: conv, range: [0.1, 0.2], colour: red}]", "unknown key 'colour'"),
        ("rules: [{name: '(', range: [0.1, 0.2]}]", "not a valid regular expression"),
        ("rules: [{role: conv, range: [0.1, 0.2]}", "not valid YAML"),
        ("!!python/object/apply:os.system ['echo pwned']", "YAML tags that construct objects are not allowed"),
        ("schema: mixmatch.rules/9\nrules: []", "upgrade mixmatch-plugin"),
        ("- just a list", "must hold a mapping"),
        ("constraints: {norm: {role: norm}}\nrules: [{range: [0, 0.1]}]", "needs 'clamp"),
    ],
)
def test_bad_rules_files_name_the_problem(tmp_path, text, match):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(RulesError, match=match):
        mm.load_rules(f)


def test_unknown_preset_and_constraint():
    with pytest.raises(RulesError, match="unknown preset"):
        mm.load_rules("nope")
    with pytest.raises(RulesError, match="unknown constraint"):
        mm.load_rules("generic").without("colour")


def test_rule_without_catch_all_is_reported(tmp_path):
    f = tmp_path / "partial.yaml"
    f.write_text("rules: [{role: conv, range: [0.1, 0.2]}]\n")
    layers = mm.inventory(timm.create_model("resnet18"))
    with pytest.raises(RulesError, match=r"no rule of preset 'partial' gives a range for layer 'conv1' \(role stem"):
        rule_ranges(layers, mm.load_rules(f))


def test_combine_union_and_intersection():
    a = {"x": (0.2, 0.5), "y": (0.0, 0.1)}
    b = {"x": (0.4, 0.8), "y": (0.3, 0.4)}
    assert combine(a, b, "union") == {"x": (0.2, 0.8), "y": (0.0, 0.4)}
    inter = combine(a, b, "intersection")
    assert inter["x"] == (0.4, 0.5) and inter["y"] == pytest.approx((0.2, 0.2))
    assert combine(a, None, "rules") == a
    with pytest.raises(mm.MixMatchError, match="needs empirical ranges"):
        combine(a, None, "union")


def test_empirical_ranges_follow_the_paper(calib, trained_tiny_resnet):
    p = mm.plan(trained_tiny_resnet, calib, preset="paper")
    assert p.meta["ranges"] == "empirical"
    layers = p.layers
    runs = [
        mm.baselines.make(m, layers, p.signals, s).ratios
        for m in ("global_magnitude", "snip", "grasp") for s in (0.7, 0.8, 0.9)
    ]
    for layer in layers:
        lo = min(r[layer.name] for r in runs)
        hi = max(r[layer.name] for r in runs)
        b = p.bounds[layer.name]
        expect = (min(max(lo, b[0]), b[1]), max(min(hi, b[1]), b[0]))
        assert p.ranges[layer.name] == pytest.approx(expect)


def test_pinned_names_the_constraint_that_fixes_an_open_range():
    from mixmatch_plugin.ranges import pinned

    from .helpers import small_vit

    layers = mm.inventory(small_vit())  # embed 32: every linear layer is under the paper's 10K-weight size
    rules = mm.load_rules("paper")
    raw = {layer.name: (0.3, 0.6) for layer in layers}
    raw["head"] = (0.1, 0.1)  # a range the rules already closed is the rules' choice, not a constraint's
    final = clamp_ranges(raw, bounds(layers, rules))
    got = pinned(layers, raw, final, rules)
    assert got["patch_embed"] == ["patch_embed.proj"] and final["patch_embed.proj"] == (0.15, 0.15)
    small = got["small_layers"]
    assert "blocks.0.attn.proj" in small and "blocks.1.mlp.fc2" in small and "head" not in small
    assert all(final[n] == (0.1, 0.1) and next(x for x in layers if x.name == n).params < 10_000 for n in small)
    kept_dense = [x.name for x in layers if x.kind == "norm"]
    assert kept_dense and not set(kept_dense) & {n for names in got.values() for n in names}  # [0, 0] is not reported
    off = rules.without("small_layers")
    assert "small_layers" not in pinned(layers, raw, clamp_ranges(raw, bounds(layers, off)), off)


def test_plan_warns_when_constraints_fix_many_weights(calib):
    from .helpers import small_vit

    model = small_vit(embed_dim=96)  # the benchmark ViT's width: only the 96x96 attention projections are under 10K
    with pytest.warns(UserWarning, match="small_layers") as got:  # visible from Python without configuring logging
        p = mm.plan(model, calib, preset="paper", target=0.5, on_unreachable="extend")
    warned = [str(w.message) for w in got if "small_layers" in str(w.message)]
    assert len(warned) == 1 and "--no-constraint small_layers" in warned[0] and warned[0] in p.meta["warnings"]
    assert "blocks.0.attn.proj" in p.meta["pinned"]["small_layers"]
    assert all(s.ratios["blocks.0.attn.proj"] == pytest.approx(0.1, abs=1.5e-3) for s in p.strategies if s.meta.get("clip") != "free")
    assert mm.Plan.from_dict(p.to_dict()).meta["pinned"] == p.meta["pinned"]  # recorded in the plan file
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        q = mm.plan(model, calib, preset="paper", target=0.5, on_unreachable="extend", options=mm.PlanOptions(disable_constraints=["small_layers"]))
    assert "small_layers" not in q.meta["pinned"] and not [w for w in rec if "constraint" in str(w.message)]
    assert len({round(s.ratios["blocks.0.attn.proj"], 3) for s in q.strategies}) > 1  # the search space opens again
