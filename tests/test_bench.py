"""The benchmark pipeline end to end on reduced sizes (real Fashion-MNIST, or digits-free skip)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, replace

import pytest

from benchmarks import tables
from benchmarks.run import PROTOCOL, BenchConfig, keep_copy, reusable, run
from mixmatch_plugin.app import data
from mixmatch_plugin.app.train import TrainConfig
from mixmatch_plugin.errors import MixMatchError

pytestmark = pytest.mark.skipif(
    not data.has_fashion_mnist() and os.environ.get("CI") != "true",
    reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist); required in CI",
)


def tiny_config() -> BenchConfig:
    model = TrainConfig(model="mixmatch_plugin.models:tiny_resnet", model_kwargs={"width": 12}, epochs=1, lr=3e-3,
                        max_train=2000, warmup_steps=10)
    return BenchConfig(models={"resnet": model}, sparsities={"resnet": (0.8,)}, seeds=(0,), calib_samples=128,
                       screen_samples=64, top_k=1, bn_batches=1, finetune_steps=3, search_trials=4, test_samples=256,
                       val_samples=256, structured=False)


def test_bench_pipeline_end_to_end_and_resume(tmp_path):
    cfg = tiny_config()
    res = run(cfg, tmp_path / "out", quick=True, cache_dir=tmp_path / "cache", progress=False)
    doc = json.loads(res.path.read_text())
    assert doc["schema"] == "mixmatch.bench/1" and doc["environment"]["torch"] and doc["environment"]["cpu"]
    runs = doc["models"]["resnet"]["runs"]
    methods = {r["method"] for r in runs}
    assert {"uniform", "global_magnitude", "snip", "grasp", "lamp", "erk", "mm", "mm[rules]", "mm[+score]", "mm[+wanda]",
            "mm[+free]", "mm[+measured]", "mm+search", "uniform_reseeded"} <= methods
    one_shot = [r for r in runs if r["regime"] == "one-shot" and r["realized_sparsity"] is not None]
    assert all(abs(r["realized_sparsity"] - 0.8) < 1e-3 for r in one_shot)  # every method at the same sparsity
    ft = [r for r in runs if r["regime"] == "fine-tuned"]
    assert {r["method"] for r in ft} >= {"uniform", "global_magnitude", "snip", "grasp", "lamp", "erk", "mm", "mm+search"}
    assert all(abs(r["realized_sparsity"] - 0.8) < 2e-3 for r in ft)  # fine-tuning kept the masks
    # every choice was made on validation: the chosen strategy is the validation-best finalist, and the pool held
    # every kind of member (rules of both range variants, the score family, measured allocations, progressive SNIP)
    for c in doc["models"]["resnet"]["choices"]:
        assert c["finals"][0]["strategy"] == c["winner"] and c["finals"][0]["accuracy"] == max(f["accuracy"] for f in c["finals"])
        assert c["evaluations"] >= c["pool"] - c["twins"] and c["pool"] > 60 and 0 < c["twins"] < c["pool"] / 4 and set(c["ablation"]) == {"rules", "+score", "+wanda", "+free", "+measured", "+progressive"}
    chosen = {r["method"]: r for r in runs if r["regime"] == "one-shot"}
    choice = doc["models"]["resnet"]["choices"][0]
    assert chosen["mm"]["strategy"] == choice["winner"]
    # mm+search: the whole pool seeded the study, 4 trials more; its winner is the choice unless a searched point beat it
    found = choice["search"]
    assert found["trials"] == 4 and found["evaluations"] == 5 and chosen["mm+search"]["strategy"] == found["winner"]
    assert found["searched"] == (found["winner"] != choice["winner"]) and found["searched"] == bool(found["shifts"])
    assert chosen["mm+search"]["val_accuracy"] >= chosen["mm"]["val_accuracy"] - 1e-9
    # where the time went: every phase timed, and the phases account for (most of) the seed's wall time
    phases = doc["models"]["resnet"]["phase_seconds"]["0"]
    assert {"signals", "measured curves", "strategies", "validation choice", "search", "one-shot evaluation", "fine-tuning",
            "noise floor (reseeded fine-tune)"} <= set(phases)
    assert 0.5 * doc["models"]["resnet"]["seconds"]["0"] <= sum(phases.values()) <= doc["models"]["resnet"]["seconds"]["0"] + 0.5
    md = tables.markdown(doc, command="python -m benchmarks --quick")
    assert "noise floor" in md and "| 80% |" in md and "Minutes per seed by phase (mean of 1): " in md
    assert "what each kind of pool member adds" in md and "masked evaluations" in md
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench:start -->\nold\n<!-- bench:end -->\nrest\n")
    assert tables.update_readme(readme, md)
    text = readme.read_text()
    assert "old" not in text and "noise floor" in text and text.endswith("rest\n")
    files = tables.plots(doc, tmp_path / "out")
    assert files and all(os.path.getsize(f) > 0 for f in files.values())
    # --tables-only regenerates the tables and README section from the saved file, runs and writes nothing else
    from click.testing import CliRunner

    from benchmarks.cli import command

    saved = res.path.read_bytes()
    r = CliRunner().invoke(command, ["-q", "--quick", "--tables-only", "--models", "resnet", "--out", str(tmp_path / "out"),
                                  "--update-readme", str(readme)])
    assert r.exit_code == 0, r.output
    assert res.path.read_bytes() == saved
    text = readme.read_text()
    assert "--tables-only" in text and "Preliminary: 1 seed(s)" in text and "| 80% |" in text
    # results of another folder keep a section of their own, which may start empty; the README's summary follows them
    (tmp_path / "docs").mkdir()
    mine, summary = tmp_path / "docs" / "RESULTS.md", tmp_path / "README.md"
    mine.write_text("a\n<!-- other:start -->\n<!-- other:end -->\nb\n")
    summary.write_text("<!-- results:start -->\n<!-- results:end -->\n")
    r = CliRunner().invoke(command, ["-q", "--quick", "--tables-only", "--models", "resnet", "--out", str(tmp_path / "out"),
                                  "--update-readme", str(mine), "--section", "other"])
    assert r.exit_code == 0, r.output
    assert mine.read_text().startswith("a\n<!-- other:start -->\nGenerated by") and mine.read_text().endswith("<!-- other:end -->\nb\n")
    assert f"--out {tmp_path / 'out'}" in mine.read_text() and "| resnet (" in summary.read_text()
    r = CliRunner().invoke(command, ["--quick", "--tables-only", "--out", str(tmp_path / "empty")])
    assert r.exit_code == 2 and "no results at" in r.output
    # a rerun finds the seed done: nothing recomputed, nothing duplicated
    again = run(cfg, tmp_path / "out", quick=True, cache_dir=tmp_path / "cache", progress=False)
    assert len(again.doc["models"]["resnet"]["runs"]) == len(runs)
    assert again.doc["models"]["resnet"]["seconds"] == doc["models"]["resnet"]["seconds"]
    # results kept from before mm+search existed get only its rows (the search again, seeded by the pool's screen)
    original = res.path.read_text()
    older = json.loads(original)
    older["models"]["resnet"]["runs"] = [r for r in runs if r["method"] != "mm+search"]
    del older["models"]["resnet"]["choices"][0]["search"]
    res.path.write_text(json.dumps(older))
    added = run(cfg, tmp_path / "out", quick=True, cache_dir=tmp_path / "cache", progress=False).doc["models"]["resnet"]
    assert added["runs"][: len(runs) - 2] == older["models"]["resnet"]["runs"]
    assert sorted((r["method"], r["regime"]) for r in added["runs"][len(runs) - 2:]) == [("mm+search", "fine-tuned"), ("mm+search", "one-shot")]
    assert added["choices"][0]["search"]["winner"] == found["winner"]  # the same study again: the same winner
    res.path.write_text(original)
    # a higher sparsity added later runs only that sparsity (and its noise floor); the rows measured before stay
    marked = json.loads(res.path.read_text())
    for r in marked["models"]["resnet"]["runs"]:
        r["kept"] = True  # rows read back from the file keep this; recomputed rows would not have it
    res.path.write_text(json.dumps(marked))
    cfg.sparsities = {"resnet": (0.8, 0.85)}
    more = run(cfg, tmp_path / "out", quick=True, cache_dir=tmp_path / "cache", progress=False).doc["models"]["resnet"]
    assert [r for r in more["runs"] if r["sparsity"] == 0.8] == [{**r, "kept": True} for r in runs]
    new = [r for r in more["runs"] if r["sparsity"] == 0.85]
    assert {r["method"] for r in new} == methods  # baselines, M&M, diagnostics and the noise floor, at 0.85
    assert all(abs(r["realized_sparsity"] - 0.85) < 2e-3 for r in new if r["realized_sparsity"] is not None)
    assert more["seconds"]["0"] > doc["models"]["resnet"]["seconds"]["0"]  # the seed's total includes both runs
    assert more["phase_seconds"]["0"]["fine-tuning"] > phases["fine-tuning"]
    # asking for fewer sparsities recomputes nothing and loses nothing: the other rows stay in the file
    cfg.sparsities = {"resnet": (0.85,)}
    fewer = run(cfg, tmp_path / "out", quick=True, cache_dir=tmp_path / "cache", progress=False).doc["models"]["resnet"]
    assert fewer["runs"] == more["runs"] and fewer["seconds"] == more["seconds"]
    # a different dense model is not mixed with these results, and the file it replaces is copied aside first
    cfg.models = {"resnet": replace(cfg.models["resnet"], lr=1e-3)}
    assert reusable("resnet", fewer, {"train": asdict(cfg.models["resnet"]), "sparsities": [0.85]}) is None
    before = res.path.read_bytes()
    keep_copy(res.path)
    assert [p.read_bytes() for p in res.path.parent.glob("quick.json.before-*")] == [before]


def test_a_collapsed_baselines_spread_does_not_make_other_comparisons_ties():
    from benchmarks import tables

    def runs(method, accs, regime="one-shot"):
        return [{"regime": regime, "sparsity": 0.8, "method": method, "seed": i, "test_accuracy": a} for i, a in enumerate(accs)]

    doc = {"dense": {"test_accuracy_eval": 0.90, "val_accuracy_eval": 0.90},
           "runs": runs("mm", [0.80, 0.81, 0.79]) + runs("global_magnitude", [0.70, 0.70, 0.70])
           + runs("snip", [0.795, 0.80, 0.805]) + runs("grasp", [0.10, 0.40, 0.20])}
    row = next(line for line in tables.reduction_table("m", doc).splitlines() if line.startswith("| **M&M** | one-shot"))
    cells = [c.strip() for c in row.strip("|").split("|")][3:]
    by = dict(zip((*tables.FIGHT, "best"), cells, strict=True))
    # mm drops 10 points, global magnitude 20, both with stds far below the gap: a win of +50 %
    assert by["global_magnitude"] == "**win** +50 %"
    # SNIP is within mm's own seed spread: a tie, whatever GraSP's spread
    assert by["snip"].startswith("tie")
    assert by["grasp"].startswith("**win**")
    assert by["best"].startswith("tie") and by["best"].endswith("vs SNIP")  # the best of the free allocators
    assert tables.noise_floor(tables.drops(doc), "one-shot", 0.8, ("mm", "global_magnitude")) < 1.5


def test_one_seed_is_not_judged_a_win_or_a_loss():
    from benchmarks import tables

    doc = {"dense": {"test_accuracy_eval": 0.90, "val_accuracy_eval": 0.90},
           "runs": [{"regime": "one-shot", "sparsity": 0.9, "method": m, "seed": 0, "test_accuracy": a}
                    for m, a in (("mm", 0.89), ("global_magnitude", 0.80), ("lamp", 0.895))]}
    row = next(line for line in tables.reduction_table("m", doc).splitlines() if line.startswith("| **M&M** | one-shot"))
    by = dict(zip((*tables.FIGHT, "best"), [c.strip() for c in row.strip("|").split("|")][3:], strict=True))
    assert by["global_magnitude"] == "not judged, 1 seed (+90 %)"
    assert by["lamp"] == "not judged, 1 seed (-100 %)"
    assert "Preliminary: 1 seed(s) so far" in tables.model_table("m", doc)
    # a sparsity added after three seeds elsewhere: the note names it, and a configured one not yet run counts as 0
    doc["runs"] += [{**r, "sparsity": 0.7, "seed": i} for r in doc["runs"] for i in range(3)]
    doc["config"] = {"sparsities": [0.7, 0.9, 0.98]}
    assert "Preliminary: 1 seed(s) at 90%, 0 seed(s) at 98% so far" in tables.model_table("m", doc)
    doc["config"] = {"sparsities": [0.7]}
    doc["runs"] = [r for r in doc["runs"] if r["sparsity"] == 0.7]
    assert "Preliminary" not in tables.model_table("m", doc)


def test_no_relative_reduction_is_claimed_against_a_baseline_that_lost_nothing():
    from benchmarks import tables

    runs = [{"regime": "fine-tuned", "sparsity": 0.5, "method": m, "seed": i, "test_accuracy": a}
            for m, accs in (("mm", [0.905, 0.906]), ("uniform", [0.91, 0.912]), ("lamp", [0.80, 0.81]))
            for i, a in enumerate(accs)]
    doc = {"dense": {"test_accuracy_eval": 0.90, "val_accuracy_eval": 0.90}, "runs": runs}
    row = next(line for line in tables.reduction_table("m", doc).splitlines() if line.startswith("| **M&M** | fine-tuned"))
    by = dict(zip((*tables.FIGHT, "best"), [c.strip() for c in row.strip("|").split("|")][3:], strict=True))
    assert "no baseline drop" in by["uniform"] and "%" not in by["uniform"]  # uniform gained accuracy: no ratio
    assert by["lamp"].startswith("**win** +")


def test_tables_name_the_build_each_model_was_measured_under():
    """Models kept from an earlier run keep their environment: the header names every torch build, each model's line its own."""
    from benchmarks import tables

    def model(torch_version):
        runs = [{"regime": "one-shot", "sparsity": 0.5, "method": m, "seed": 0, "test_accuracy": 0.8} for m in ("mm", "lamp")]
        return {"dense": {"test_accuracy_eval": 0.9, "val_accuracy_eval": 0.9}, "runs": runs, "seconds": {"0": 60.0},
                "environment": {"torch": torch_version, "timm": "1.0.31", "threads": 2, "date": "2026-12-02 17:00:00"}}

    doc = {"environment": {"torch": "2.14.1", "timm": "1.0.31"}, "config": {}, "models": {"a": model("2.15.0"), "b": model("2.14.1")}}
    md = tables.markdown(doc, command="python -m benchmarks --tables-only")
    assert "measured under torch 2.14.1, 2.15.0," in md.splitlines()[0]
    assert "CPU threads, torch 2.15.0 (dense" in tables.model_table("a", doc["models"]["a"])
    assert "CPU threads, torch 2.14.1 (dense" in tables.model_table("b", doc["models"]["b"])
    doc["models"]["b"]["environment"]["cpu"] = "AMD EPYC"  # recorded since results name the CPU: speeds differ between machines
    assert "2 CPU threads (AMD EPYC), torch 2.14.1 (dense" in tables.model_table("b", doc["models"]["b"])
    doc["models"]["b"]["environment"].update(gpu="NVIDIA H200", device="cuda")  # `python -m benchmarks --device cuda`
    assert "on GPU NVIDIA H200 (cuda), torch 2.14.1 (dense" in tables.model_table("b", doc["models"]["b"])


def test_results_measured_under_other_preset_ranges_are_redone_and_others_kept(tmp_path, monkeypatch):
    from benchmarks.run import ranges_digest
    from mixmatch_plugin import rules as rules_module

    cfg = tiny_config()
    before = ranges_digest(cfg, "resnet")
    assert ranges_digest(cfg, "resnet") == before  # the same presets give the same digest
    copy = tmp_path / "rules"
    copy.mkdir()
    for f in rules_module.builtin_dir().glob("*.yaml"):
        (copy / f.name).write_text(f.read_text())
    monkeypatch.setattr(rules_module, "builtin_dir", lambda: copy)
    generic = copy / "generic.yaml"
    generic.write_text("# a comment changes nothing the model gets\n" + generic.read_text())
    assert ranges_digest(cfg, "resnet") == before
    generic.write_text(generic.read_text().replace("max_params: 9999", "max_params: 99"))  # another small-layer bound
    after = ranges_digest(cfg, "resnet")
    assert after != before
    done = {"config": {"train": asdict(cfg.models["resnet"]), "sparsities": [0.8], "ranges": before, "dense": "w",
                       "protocol": PROTOCOL}, "runs": []}
    asked = {"train": asdict(cfg.models["resnet"]), "sparsities": [0.8, 0.9], "dense": "w", "protocol": PROTOCOL}
    assert reusable("resnet", done, {**asked, "ranges": after}) is None
    assert reusable("resnet", done, {**asked, "ranges": before}) is done


def test_results_measured_on_other_dense_weights_are_redone(tmp_path):
    import torch

    from mixmatch_plugin.adapters.depth_width import model_hash
    from mixmatch_plugin.app.train import train_cached

    tc = tiny_config().models["resnet"]
    splits = data.fashion_mnist(None, seed=0)
    model, info = train_cached(tc, splits, cache_dir=tmp_path, progress=False)
    asked = {"train": asdict(tc), "sparsities": [0.8, 0.9], "ranges": "same", "dense": model_hash(model), "protocol": PROTOCOL}
    done = {"config": {**asked, "sparsities": [0.8]}, "dense": dict(info), "runs": []}
    assert reusable("resnet", done, asked, info) is done  # the same weights: kept
    # the checkpoint trained again elsewhere (another torch version): the same configuration, other weights
    ckpt = next(tmp_path.glob("*.pt"))
    blob = torch.load(ckpt, weights_only=True)
    name = next(k for k, v in blob["state_dict"].items() if v.is_floating_point() and v.ndim > 1)
    blob["state_dict"][name] = blob["state_dict"][name] + 1e-3
    torch.save(blob, ckpt)
    other, other_info = train_cached(tc, splits, cache_dir=tmp_path, progress=False)
    assert model_hash(other) != asked["dense"]
    assert reusable("resnet", done, {**asked, "dense": model_hash(other)}, other_info) is None
    # results saved before weights were hashed: the checkpoint's training record tells whether it is the same one
    legacy = {**done, "config": {k: v for k, v in done["config"].items() if k != "dense"}}
    assert reusable("resnet", legacy, asked, info) is legacy
    ckpt.unlink()
    _, retrained = train_cached(tc, splits, cache_dir=tmp_path, progress=False)
    assert retrained["train_seconds"] != info["train_seconds"]
    assert reusable("resnet", legacy, asked, retrained) is None


def test_every_method_of_a_seed_gets_the_same_batches():
    """The same strategy fine-tuned twice in a seed scores the same: BatchNorm and fine-tune batches do not depend on the turn."""
    from benchmarks.run import run_model
    from mixmatch_plugin.app.train import train_cached

    cfg = replace(BenchConfig.tiny(), seeds=(0,), bn_batches=1, finetune_steps=6, finetune_methods=("uniform", "mm", "uniform"),
                  test_samples=256, val_samples=256)  # 128 images could not tell two near-chance fine-tunes apart on some CPUs
    splits = data.fashion_mnist(None, seed=0)
    dense = train_cached(cfg.models["resnet"], splits, cache_dir=None, progress=False)
    runs = run_model("resnet", cfg, splits, dense, progress=False)["runs"]
    twice = [(r["val_accuracy"], r["test_accuracy"]) for r in runs if r["regime"] == "fine-tuned" and r["method"] == "uniform"]
    assert len(twice) == 2 and twice[0] == twice[1]
    reseeded = next(r for r in runs if r["method"] == "uniform_reseeded")  # another order: the noise floor still measures one
    assert (reseeded["val_accuracy"], reseeded["test_accuracy"]) != twice[0]


def test_older_protocol_keeps_one_shot_rows_of_a_model_without_batchnorm_and_fine_tunes_again(tmp_path):
    """A ViT (LayerNorm only): protocol-1 results keep their one-shot rows; the fine-tuned rows are measured again."""
    vit = TrainConfig(model="timm:vit_tiny_patch16_224", model_kwargs={"img_size": 28, "patch_size": 7, "in_chans": 1, "num_classes": 10,
                      "embed_dim": 64, "depth": 2, "num_heads": 2}, epochs=1, lr=1e-3, max_train=512, warmup_steps=5, augment=False)
    cfg = replace(BenchConfig.tiny(), models={"vit": vit}, sparsities={"vit": (0.5,)}, seeds=(0,), masks=("magnitude", "product", "wanda"),
                  variants=("rules", "empirical"), finetune_methods=("uniform", "mm"))
    first = run(cfg, tmp_path, cache_dir=tmp_path / "cache", progress=False, name="r")
    runs = first.doc["models"]["vit"]["runs"]
    one_shot = [r for r in runs if r["regime"] == "one-shot"]
    fine_tuned = [r for r in runs if r["regime"] == "fine-tuned"]
    assert {r["method"] for r in fine_tuned} == {"uniform", "mm", "uniform_reseeded"}

    def as_protocol_1(change_mm_by: float = 0.0) -> None:
        doc = json.loads(first.path.read_text())
        del doc["models"]["vit"]["config"]["protocol"]
        for r in doc["models"]["vit"]["runs"]:
            if r["regime"] == "fine-tuned":
                r["test_accuracy"] = -1.0  # would show if kept
            elif r["method"] == "mm":
                r["test_accuracy"] += change_mm_by
        first.path.write_text(json.dumps(doc))

    as_protocol_1()
    again = run(cfg, tmp_path, cache_dir=tmp_path / "cache", progress=False, name="r").doc["models"]["vit"]
    assert [r for r in again["runs"] if r["regime"] == "one-shot"] == one_shot  # kept, not measured again
    assert sorted(map(json.dumps, (r for r in again["runs"] if r["regime"] == "fine-tuned"))) == sorted(map(json.dumps, fine_tuned))
    assert again["config"]["protocol"] == PROTOCOL and again["redone"][0]["from_protocol"] == 1
    assert len(list(tmp_path.glob("r.json.before-*"))) == 1  # the rows it replaced were copied aside first
    assert "fine-tuned rows were redone under protocol 2" in tables.model_table("vit", again) + tables._when(again)
    # kept rows that this model and code do not reproduce are refused, not fine-tuned on top of
    as_protocol_1(change_mm_by=0.25)
    with pytest.raises(MixMatchError, match=r"rebuilt scores .* rerun with --fresh"):
        run(cfg, tmp_path, cache_dir=tmp_path / "cache", progress=False, name="r")
    # the tables' header explains protocol 1 only while some model is still measured under it
    older = json.loads(first.path.read_text())
    assert "protocol" not in older["models"]["vit"]["config"] and "*protocol 1*" in tables.markdown(older, command="c")
    assert "*protocol 1*" not in tables.markdown({**older, "models": {"vit": again}}, command="c")
    # a model with BatchNorm has batch-dependent one-shot rows: protocol-1 results are redone whole
    done = {"config": {"train": {}, "ranges": "x", "dense": "w"}, "runs": one_shot + fine_tuned}
    assert reusable("m", done, {"train": {}, "ranges": "x", "dense": "w", "protocol": PROTOCOL}, has_bn=True) is None


def test_a_one_shot_run_is_completed_by_the_full_run_without_measuring_it_again(tmp_path):
    from benchmarks.run import adopt_one_shot

    cfg = replace(BenchConfig.tiny(), seeds=(0,))
    one = run(replace(cfg, finetune_methods=()), tmp_path, cache_dir=tmp_path / "cache", progress=False, name="one-shot").doc
    kept = one["models"]["resnet"]["runs"]
    assert {r["regime"] for r in kept} == {"one-shot"} and "mm+search" in {r["method"] for r in kept}
    assert adopt_one_shot(cfg, tmp_path) == ["resnet"] and adopt_one_shot(cfg, tmp_path) == []  # copied once
    full = run(cfg, tmp_path, cache_dir=tmp_path / "cache", progress=False).doc["models"]["resnet"]
    assert full["runs"][: len(kept)] == kept  # checked, not measured again
    added = full["runs"][len(kept):]
    assert sorted(r["method"] for r in added if r["regime"] == "fine-tuned") == sorted([*cfg.finetune_methods, "uniform_reseeded"])
    assert all(r["regime"] == "fine-tuned" for r in added)
    # a later one-shot run at another sparsity extends the full run's model, cell by cell
    lower = replace(cfg, sparsities={"resnet": (0.3,)})
    run(replace(lower, finetune_methods=()), tmp_path, cache_dir=tmp_path / "cache", progress=False, name="one-shot")
    assert adopt_one_shot(lower, tmp_path) == ["resnet"] and adopt_one_shot(lower, tmp_path) == []
    both = replace(cfg, sparsities={"resnet": (0.3, 0.5)})
    again = run(both, tmp_path, cache_dir=tmp_path / "cache", progress=False).doc["models"]["resnet"]
    assert again["runs"][: len(full["runs"])] == full["runs"]  # the full run's cell is kept as it was
    assert {(r["sparsity"], r["regime"]) for r in again["runs"]} == {(t, g) for t in (0.3, 0.5) for g in ("one-shot", "fine-tuned")}
    assert {c["sparsity"] for c in again["choices"]} == {0.3, 0.5}
