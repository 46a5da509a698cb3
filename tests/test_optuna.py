"""Optuna refinement: the space holds every rule strategy, seeding, objectives, samplers, storages, export, CLI.

Real Optuna, real storages (in memory, SQLite files, journal files), a real trained model; no mocks.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import warnings

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import mixmatch_plugin as mm
from mixmatch_plugin.app import data
from mixmatch_plugin.errors import MixMatchError

mmo = pytest.importorskip("mixmatch_plugin.adapters.optuna")
optuna = pytest.importorskip("optuna")
from mixmatch_plugin.adapters.optuna.plots import param_importances  # noqa: E402
from mixmatch_plugin.adapters.optuna.search import SEED_ATTR, pool_bases, search_space, strategy_of  # noqa: E402

TrialState = optuna.trial.TrialState


@pytest.fixture(scope="module")
def plan(trained_tiny_resnet, calib):
    return mm.plan(trained_tiny_resnet, calib)


@pytest.fixture(scope="module")
def evaluator(trained_tiny_resnet, digits_loaders, plan):
    _, val, _ = digits_loaders
    return mmo.ProxyEvaluator(trained_tiny_resnet, val, signals=plan.signals, max_batches=2)


def seeds_of(study):
    return [t.user_attrs.get(SEED_ATTR) for t in study.get_trials(deepcopy=False) if t.user_attrs.get(SEED_ATTR)]


def test_every_rule_strategy_is_a_point_and_the_seeds_run_first(plan, evaluator):
    res = mmo.search(plan, evaluator, mmo.SearchOptions(n_trials=32, sampler_seed=0))
    trials = res.study.get_trials(deepcopy=False)
    assert len(trials) == 32 and all(t.state == TrialState.COMPLETE for t in trials)
    rules = [s for s in plan.strategies if s.meta.get("shape")]
    assert len(rules) == 30
    space = plan.space()
    for rule, t in zip(rules, trials[:30], strict=True):
        assert t.user_attrs[SEED_ATTR] == rule.name
        again = strategy_of(space, t.params, rule.name)
        assert again.signal == rule.signal
        assert again.ratios == rule.ratios  # exactly, not approximately
        assert t.values[1] == rule.global_sparsity
    assert all(SEED_ATTR not in t.user_attrs for t in trials[30:])
    # the records carry the rule names, and the searched ones are named by trial
    assert [r.seed for r in res.trials[:30]] == [s.name for s in rules]
    assert res.trials[31].strategy.name.endswith("-t31")
    # the Pareto front is non-dominated and sorted by sparsity
    front = res.best
    assert front and [r.x for r in front] == sorted(r.x for r in front)
    for r in front:
        assert not any(o.accuracy >= r.accuracy and o.x >= r.x and (o.accuracy > r.accuracy or o.x > r.x) for o in res.trials)


def test_rerun_on_sqlite_never_enqueues_a_seed_twice(plan, evaluator, tmp_path):
    url = f"sqlite:///{tmp_path / 'search.db'}"
    mmo.search(plan, evaluator, mmo.SearchOptions(n_trials=3), storage=url, study_name="s")
    res = mmo.search(plan, evaluator, mmo.SearchOptions(n_trials=3), storage=url, study_name="s")
    study = optuna.load_study(study_name="s", storage=url)
    seeds = seeds_of(study)
    assert len(seeds) == len(set(seeds)) == 30
    assert len(study.trials) == 30
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    assert [t.number for t in done] == list(range(6))
    assert len(res.trials) == 6


OPENER = """
import pathlib, sys, time
from mixmatch_plugin.adapters.optuna.search import open_storage, storage_lock
ready, go = pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])
ready.touch()
while not go.exists():
    time.sleep(0.001)
try:
    with storage_lock(sys.argv[1]):  # as search() opens it
        open_storage(sys.argv[1])
except Exception as exc:
    sys.exit(str(exc))
"""


def test_processes_opening_one_new_database_at_once_all_get_it(tmp_path):
    # Optuna creates a new database's tables on first open, outside any lock: without the storage lock about
    # 2 in 5 of four simultaneous openers failed ("UNIQUE constraint failed: alembic_version", "table
    # studies already exists"), e.g. two workers started at once on a new study file
    for round_ in range(2):
        url, go = f"sqlite:///{tmp_path / f'new{round_}.db'}", tmp_path / f"go{round_}"
        ready = [tmp_path / f"ready{round_}-{k}" for k in range(4)]
        procs = [subprocess.Popen([sys.executable, "-c", OPENER, url, str(r), str(go)], stderr=subprocess.PIPE, text=True)
                 for r in ready]
        deadline = time.monotonic() + 120
        while not all(r.exists() for r in ready) and time.monotonic() < deadline:
            time.sleep(0.01)
        go.touch()  # all four open the database at the same moment
        errors = [p.communicate(timeout=120)[1].strip().splitlines()[-1:] for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0, 0], errors
    study = optuna.create_study(storage=url, study_name="after")
    assert study.study_name == "after"


def test_proxy_evaluator_reestimates_every_trial_on_the_same_batches(trained_tiny_resnet, plan, digits, digits_loaders):
    _, val, _ = digits_loaders
    shuffled = data.loader(digits.train, 16, shuffle=True, seed=3)  # a new draw on every pass
    ev = mmo.ProxyEvaluator(trained_tiny_resnet, val, signals=plan.signals, bn_loader=shuffled, bn_batches=1)
    s = plan.strategies[0]
    first = ev(s)
    ev(plan.strategies[1])
    assert ev(s) == first  # the same strategy scores the same in every trial


def test_single_objective_at_a_budget_uses_set_constraint(trained_tiny_resnet, calib, digits_loaders):
    _, val, _ = digits_loaders
    p = mm.plan(trained_tiny_resnet, calib, target=0.6, signals=("magnitude", "product"))
    ev = mmo.ProxyEvaluator(trained_tiny_resnet, val, signals=p.signals, max_batches=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = mmo.search(p, ev, mmo.SearchOptions(objective="single", n_trials=24, sampler="tpe", sampler_seed=1))
    assert not [w for w in caught if "constraints_func" in str(w.message)]
    assert res.target == 0.6  # the plan's target by default
    n = sum(layer.params for layer in p.layers)
    for t in res.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        assert set(t.constraints) == {"budget"} and t.constraints["budget"] <= 0.0
    for r in res.trials:
        assert round(r.x * n) == round(0.6 * n)  # every point prunes exactly the budget
    assert len(res.best) == 1
    assert res.best[0].accuracy == max(r.accuracy for r in res.trials)
    assert res.best[0].accuracy >= res.best_rule.accuracy
    assert res.study.best_trial.number == res.best[0].number


def test_pool_space_seeds_every_plan_strategy_and_moves_budget_between_groups(trained_tiny_resnet, calib, digits_loaders):
    _, val, _ = digits_loaders
    p = mm.plan(trained_tiny_resnet, calib, target=0.6, signals=("magnitude", "product"))
    families = {s.meta.get("family") for s in p.strategies}
    assert "score" in families and None in families  # rules and the score family are both bases
    ev = mmo.ProxyEvaluator(trained_tiny_resnet, val, signals=p.signals, max_batches=2)
    n_seeds = len(p.strategies)
    res = mmo.search(p, ev, mmo.SearchOptions(objective="single", space="pool", n_trials=n_seeds + 8, sampler="tpe", sampler_seed=0))
    assert [r.seed for r in res.trials[:n_seeds]] == [s.name for s in p.strategies]
    by_name = {s.name: s for s in p.strategies}
    for r in res.trials[:n_seeds]:  # a seed is its base exactly
        assert r.strategy.ratios == by_name[r.seed].ratios and r.strategy.signal == by_name[r.seed].signal
    total = sum(layer.params for layer in p.layers)
    searched = res.trials[n_seeds:]
    assert len(searched) == 8
    for r in searched:
        assert round(r.x * total) == round(0.6 * total)  # the budget is kept exactly
        base = by_name[r.strategy.meta["base"]]
        assert r.strategy.meta["shifts"] and r.strategy.ratios != base.ratios  # budget moved between groups
        for layer in p.layers:  # inside the hard bounds, widened only to hold the base
            lo, hi = p.bounds[layer.name]
            assert min(lo, base.ratios[layer.name]) - 1 / layer.params <= r.strategy.ratios[layer.name] <= max(hi, base.ratios[layer.name]) + 1 / layer.params
    assert res.best[0].accuracy == max(r.accuracy for r in res.trials)
    exported = mmo.export(res)  # a searched point is an ordinary strategy, and not a base of the next search
    assert {s.name for s in pool_bases(exported).values()} == set(by_name)
    with pytest.raises(MixMatchError, match="objective='single'"):
        mmo.search(p, ev, mmo.SearchOptions(space="pool", n_trials=1))


def test_native_plan_single_objective_marks_points_below_the_target_infeasible(plan, evaluator):
    xs = sorted(s.global_sparsity for s in plan.strategies)
    target = xs[len(xs) // 2]
    res = mmo.search(plan, evaluator, mmo.SearchOptions(objective="single", target=target, n_trials=10, signals=("magnitude",)))
    assert [r.seed for r in res.trials] == [f"magnitude:{shape}" for shape in mm.SHAPES]  # only the magnitude seeds
    tol = 0.5 / sum(layer.params for layer in plan.layers)
    for r in res.trials:
        assert r.feasible == (r.x >= target - tol)
    assert any(not r.feasible for r in res.trials) and any(r.feasible for r in res.trials)
    assert res.best[0].feasible and res.best[0].x >= target - tol


@pytest.mark.parametrize("sampler", ["tpe", "gp", "nsga2"])
def test_samplers_propose_points_inside_the_space(plan, evaluator, sampler):
    objective = "multi" if sampler == "nsga2" else "single"
    target = None if objective == "multi" else 0.55
    res = mmo.search(plan, evaluator, mmo.SearchOptions(objective=objective, target=target, sampler=sampler, n_trials=12, seed_rules=False, sampler_seed=0, population_size=4 if sampler == "nsga2" else None))
    assert len(res.trials) == 12 and all(r.seed is None for r in res.trials)
    expected = {"tpe": optuna.samplers.TPESampler, "gp": optuna.samplers.GPSampler, "nsga2": optuna.samplers.NSGAIISampler}
    assert isinstance(res.study.sampler, expected[sampler])
    space = plan.space()
    for r in res.trials:
        for name, ratio in r.strategy.ratios.items():
            lo, hi = space.lo[space.names.index(name)], space.hi[space.names.index(name)]
            assert lo - 1e-12 <= ratio <= hi + 1e-12


class CtrlCAt:
    """An evaluator that raises KeyboardInterrupt (as Ctrl-C does) in its ``at``-th call."""

    def __init__(self, inner, at: int) -> None:
        self.inner, self.at, self.calls = inner, at, 0
        self.signals = inner.signals

    def __call__(self, strategy):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return self.inner(strategy)


def test_ctrl_c_in_a_trial_fails_it_keeps_the_finished_ones_and_the_rerun_evaluates_the_cut_seed(plan, evaluator, tmp_path):
    url = f"sqlite:///{tmp_path / 'search.db'}"
    with pytest.raises(KeyboardInterrupt):
        mmo.search(plan, CtrlCAt(evaluator, at=4), mmo.SearchOptions(n_trials=6), storage=url, study_name="s")
    trials = optuna.load_study(study_name="s", storage=url).get_trials(deepcopy=False)
    assert [t.number for t in trials if t.state == TrialState.COMPLETE] == [0, 1, 2]
    cut = [t for t in trials if t.state == TrialState.FAIL]
    assert [t.number for t in cut] == [3] and not [t for t in trials if t.state == TrialState.RUNNING]
    res = mmo.search(plan, evaluator, mmo.SearchOptions(n_trials=30), storage=url, study_name="s")
    done = [t.user_attrs[SEED_ATTR] for t in res.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if SEED_ATTR in t.user_attrs]
    assert cut[0].user_attrs[SEED_ATTR] in done and len(done) == len(set(done)) == 30  # each seed once, the cut one too


def test_export_appends_searched_strategies_that_load_and_reproduce(plan, evaluator, trained_tiny_resnet, tmp_path):
    res = mmo.search(plan, evaluator, mmo.SearchOptions(n_trials=40, sampler_seed=3))
    path = tmp_path / "plan.json"
    out = mmo.export(res, path, which="all")
    again = mm.load_plan(path)
    searched = [s for s in again.strategies if s.meta.get("source") == "optuna"]
    assert len(searched) == 10 and len(again.strategies) == 40
    space = again.space()
    for s in searched:
        assert space.strategy(s.name, s.signal, s.meta["alphas"]).ratios == s.ratios
        assert s.meta["validation"]["accuracy"] == pytest.approx(next(r.accuracy for r in res.trials if r.strategy.name == s.name))
    assert again.meta["search"]["best"] == [r.strategy.name for r in res.best]
    assert [s.name for s in out.strategies] == [s.name for s in again.strategies]
    mmo.export(res, path, which="all")  # idempotent: the same names are replaced, not added twice
    assert len(mm.load_plan(path).strategies) == 40
    # searched strategies prune like any other
    pruned = again.apply(trained_tiny_resnet, searched[0], signals=plan.signals)
    assert pruned.global_sparsity == pytest.approx(searched[0].global_sparsity, abs=1e-6)


def test_plots_are_written(plan, evaluator, tmp_path):
    res = mmo.search(plan, evaluator, mmo.SearchOptions(n_trials=34, sampler_seed=0))
    for fn, name in ((mmo.plot_pareto, "pareto.png"), (mmo.plot_history, "history.png"), (mmo.plot_importances, "imp.png")):
        p = fn(res, tmp_path / name)
        assert p is not None and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    imp = param_importances(res)
    assert set(imp) <= set(search_space(plan.space(), ["magnitude"])) and abs(sum(imp.values()) - 1) < 1e-6


def test_macs_profile_counts_conv_and_linear_macs():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    prof = mmo.MacsProfile.measure(model, (1, 8, 8))
    assert prof.layer_macs == {"0": 64 * 4 * 9, "3": 256 * 10}
    s = mm.Strategy("x", "magnitude", {"0": 0.5, "3": 0.25}, 0.0)
    assert prof.sparse(s) == pytest.approx(0.5 * 2304 + 0.75 * 2560)
    assert prof.reduction(s) == pytest.approx(1 - prof.sparse(s) / (2304 + 2560))


def test_macs_objective_on_a_transformer():
    from .helpers import small_vit

    model = small_vit().eval()
    p = mm.plan(model, signals=("magnitude",))
    prof = mmo.MacsProfile.measure(model, (1, 16, 16))
    # qkv of a 17-token ViT with width 32: 17 tokens x 32 x 96
    assert prof.layer_macs["blocks.0.attn.qkv"] == 17 * 32 * 96
    res = mmo.search(p, lambda s: 1.0 - s.global_sparsity / 2, mmo.SearchOptions(metric="macs", macs=prof, n_trials=12))
    for r in res.trials:
        assert r.x == pytest.approx(prof.reduction(r.strategy))


def test_finetune_evaluator_keeps_masks_and_is_deterministic(trained_tiny_resnet, digits_loaders, plan):
    train, val, _ = digits_loaders
    ev = mmo.FinetuneEvaluator(trained_tiny_resnet, train, val, signals=plan.signals, steps=3, lr=1e-3, max_batches=2)
    s = plan.strategy("product:alpha-0.7")
    a, b = ev(s), ev(s)
    assert a == b
    assert a["realized_sparsity"] == pytest.approx(s.global_sparsity, abs=1e-9)
    cb = mmo.CallbackEvaluator(lambda st: 0.5)
    assert cb(s) == {"accuracy": 0.5}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"storage": "nosuchdb://x/y"}, "bad storage URL"),
        ({"storage": "postgresql+psycopg2://nobody@127.0.0.1:1/none"}, "cannot open storage"),
        ({"storage": "search.txt"}, "bad storage"),
        ({"sampler": "cmaes"}, "unknown sampler"),
        ({"target": 1.0}, r"target must be a number in \[0, 1\)"),
        ({"target": -0.1}, r"target must be a number in \[0, 1\)"),
        ({"objective": "pareto"}, "unknown objective"),
        ({"metric": "macs"}, "needs macs="),
        ({"objective": "single", "metric": "macs", "macs": mmo.MacsProfile({})}, "needs target=<fraction of MACs"),
        ({"objective": "single"}, "needs target=<global sparsity"),
        ({"n_trials": None}, "would never stop"),
    ],
)
def test_user_errors_are_one_line(plan, kwargs, message):
    storage = kwargs.pop("storage", None)
    with pytest.raises(MixMatchError, match=message) as info:
        mmo.search(plan, lambda s: 0.0, mmo.SearchOptions(**kwargs), storage=storage)
    assert "\n" not in str(info.value)


def test_a_study_refuses_another_objective_or_plan(plan, evaluator, trained_tiny_resnet, calib, tmp_path):
    url = tmp_path / "s.db"
    mmo.search(plan, evaluator, mmo.SearchOptions(n_trials=1), storage=url, study_name="a")
    with pytest.raises(MixMatchError, match="exists with 2 objective"):
        mmo.search(plan, evaluator, mmo.SearchOptions(n_trials=1, objective="single", target=0.5), storage=url, study_name="a")
    other = mm.plan(trained_tiny_resnet, calib, target=0.6)
    with pytest.raises(MixMatchError, match="was made with plan"):
        mmo.search(other, evaluator, mmo.SearchOptions(n_trials=1), storage=url, study_name="a")


def test_budget_plan_rejects_a_higher_target(trained_tiny_resnet, calib):
    p = mm.plan(trained_tiny_resnet, calib, target=0.6, signals=("magnitude",))
    with pytest.raises(MixMatchError, match=r"budget-matched at sparsity 0\.6"):
        mmo.search(p, lambda s: 0.0, mmo.SearchOptions(objective="single", target=0.62))


@pytest.fixture(scope="module")
def cli_files(trained_tiny_resnet, plan, tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    torch.save(trained_tiny_resnet.state_dict(), d / "model.pt")
    plan.save(d / "plan.json")
    return d


def cli_args(d, *extra):
    return [
        "search", "--plan", str(d / "plan.json"), "--model", "mixmatch_plugin.models:tiny_resnet",
        "--model-kwargs", '{"num_classes": 10, "in_chans": 1, "width": 8}', "--checkpoint", str(d / "model.pt"),
        "--calib", "digits", "--calib-samples", "256", "--batch-size", "64", "--val-samples", "128", *extra,
    ]


def test_cli_search_writes_sqlite_study_plan_and_plots(cli_files, tmp_path):
    from mixmatch_plugin.app.cli import main

    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["-q", *cli_args(cli_files, "--n-trials", "32", "--out", str(out), "--sampler-seed", "0")])
    assert r.exit_code == 0, r.output
    for name in ("search.db", "plan.json", "search.json", "pareto.png", "history.png", "importances.png"):
        assert (out / name).exists(), name
    summary = json.loads((out / "search.json").read_text())
    assert summary["states"] == {"COMPLETE": 32} and len(summary["trials"]) == 32
    assert "best rule strategy:" in r.output and "per trial" in r.output
    study = optuna.load_study(study_name="mixmatch", storage=f"sqlite:///{out / 'search.db'}")
    assert len(study.trials) == 32
    exported = mm.load_plan(out / "plan.json")
    assert exported.meta["search"]["trials"] == 32
    # resume the same study to a total: 4 more trials, seeds untouched
    r = CliRunner().invoke(main, ["-q", *cli_args(cli_files, "--n-trials", "10", "--total-trials", "36", "--out", str(out),
                                                  "--no-plots")])
    assert r.exit_code == 0, r.output
    study = optuna.load_study(study_name="mixmatch", storage=f"sqlite:///{out / 'search.db'}")
    assert len(study.trials) == 36 and len(seeds_of(study)) == 30


def test_cli_pool_search_seeds_the_whole_budget_matched_plan(trained_tiny_resnet, calib, cli_files, tmp_path):
    from mixmatch_plugin.app.cli import main

    p = mm.plan(trained_tiny_resnet, calib, target=0.6)
    p.save(tmp_path / "plan.json")
    (tmp_path / "model.pt").write_bytes((cli_files / "model.pt").read_bytes())
    out, n = tmp_path / "out", len(p.strategies)
    r = CliRunner().invoke(main, ["-q", *cli_args(tmp_path, "--space", "pool", "--out", str(out))])
    assert r.exit_code == 2 and "--objective single" in r.output and r.output.count("\n") == 1
    r = CliRunner().invoke(main, ["-q", *cli_args(tmp_path, "--space", "pool", "--objective", "single", "--n-trials", str(n + 3),
                                                  "--sampler-seed", "0", "--export", "all", "--out", str(out), "--no-plots")])
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "search.json").read_text())
    assert [t["seed"] for t in summary["trials"][:n]] == [s.name for s in p.strategies]  # wanda's score family included
    exported = mm.load_plan(out / "plan.json")
    searched = [s for s in exported.strategies if s.meta.get("source") == "optuna"]
    assert len(searched) == 3 and all(s.meta["base"] in {t.name for t in p.strategies} for s in searched)


def test_cli_errors_are_one_line(cli_files, tmp_path):
    from mixmatch_plugin.app.cli import main

    r = CliRunner().invoke(main, cli_args(cli_files, "--storage", "nosuchdb://x", "--out", str(tmp_path)))
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "bad storage URL" in r.output
    r = CliRunner().invoke(main, cli_args(cli_files, "--target", "1.5", "--out", str(tmp_path)))
    assert r.exit_code == 2 and "target must be a number in [0, 1)" in r.output
