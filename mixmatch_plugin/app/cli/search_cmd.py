"""``mixmatch search``: Optuna refinement around a plan's rule strategies (resumable, multi-worker)."""

from __future__ import annotations

import importlib
import math
from pathlib import Path
from typing import Any

import click

from mixmatch_plugin.app.cli.common import (
    SIGNAL_LIST,
    data_options,
    from_plan,
    load_data,
    load_model,
    model_options,
    table,
)
from mixmatch_plugin.errors import MixMatchError


def _callback(spec: str) -> Any:
    mod_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise MixMatchError(f"cannot import {mod_name!r} from --evaluator {spec!r} ({exc})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise MixMatchError(f"module {mod_name!r} has no callable {attr!r} (from --evaluator {spec!r})")
    return fn


@click.command("search")
@click.option("--plan", "plan_path", required=True, type=click.Path(dir_okay=False),
              help="The plan JSON (from `mixmatch plan`) whose rule strategies seed the search.")
@model_options(required=False)
@data_options
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="search-out", show_default=True,
              help="Folder for the study database (default storage), the exported plan and the plots.")
@click.option("--storage", default=None, metavar="URL",
              help="Optuna storage: sqlite:///x.db, postgresql+psycopg2://user@host/db, mysql+pymysql://..., "
                   "or a journal file journal:PATH. Default: sqlite:///<out>/search.db.")
@click.option("--study", "study_name", default="mixmatch", show_default=True,
              help="Study name; workers with the same --storage and --study share one search.")
@click.option("--n-trials", type=click.IntRange(0), default=70, show_default=True,
              help="Trials this worker runs; in a new study the 30 rule seeds come first (70 = 30 seeds + 40 searched).")
@click.option("--total-trials", type=click.IntRange(1), default=None,
              help="Stop once the study holds this many completed trials (all workers); use it to resume to an end point.")
@click.option("--timeout", type=click.FloatRange(0, min_open=True), default=None, help="Start no trial after this many seconds.")
@click.option("--objective", type=click.Choice(["multi", "single"]), default="multi", show_default=True,
              help="multi: accuracy and --metric both up (Pareto front). single: accuracy up with --metric >= --target.")
@click.option("--metric", type=click.Choice(["sparsity", "macs"]), default="sparsity", show_default=True,
              help="Second objective or budget: global sparsity, or the fraction of weight-layer MACs removed (sparse-MACs count).")
@click.option("--target", type=float, default=None,
              help="Budget in [0, 1): a constraint metric >= target. Single-objective default: the plan's target.")
@click.option("--space", type=click.Choice(["rules", "pool"]), default="rules", show_default=True,
              help="rules: per-group alphas inside the ranges, seeded by the rule strategies. pool: every strategy of the "
                   "plan (rules, score family, measured) is a base, moved by per-group log-odds shifts at the plan's budget; "
                   "needs --objective single and a plan made with --target.")
@click.option("--score", type=click.Choice(["accuracy", "loss"]), default="accuracy", show_default=True,
              help="What the evaluator's result is judged by (accuracy maximized, loss minimized).")
@click.option("--sampler", type=click.Choice(["nsga2", "tpe", "gp"]), default=None,
              help="Default: nsga2 for multi-objective, tpe for single-objective.")
@click.option("--sampler-seed", type=int, default=None, help="Sampler seed; give each worker its own (or none).")
@click.option("--population", "population_size", type=click.IntRange(2), default=None,
              help="NSGA-II population (default: the number of rule seeds).")
@click.option("--signals", "signal_list", type=SIGNAL_LIST, default=None, help="Signals the search may choose (default: the plan's).")
@click.option("--evaluator", "evaluator_kind", default="proxy", show_default=True, metavar="proxy|finetune|MODULE:FN",
              help="proxy: masked validation accuracy; finetune: a short masked fine-tune first; MODULE:FN: FN(strategy) "
                   "returns the accuracy or a dict with 'accuracy'.")
@click.option("--val-samples", type=click.IntRange(1), default=None,
              help="Score on a fixed random subset of the validation split (default: all of it).")
@click.option("--bn-batches", type=click.IntRange(0), default=0, show_default=True,
              help="Re-estimate BatchNorm statistics on this many training batches after masking (proxy).")
@click.option("--finetune-steps", type=click.IntRange(1), default=50, show_default=True, help="Steps per finetune evaluation.")
@click.option("--finetune-lr", type=float, default=1e-4, show_default=True)
@click.option("--heartbeat", "heartbeat_interval", type=click.IntRange(0), default=10, show_default=True,
              help="Seconds between heartbeats of a running trial (RDB storages); 0 switches it off.")
@click.option("--grace", "grace_period", type=click.IntRange(1), default=None,
              help="A running trial without a heartbeat for this long is failed and retried (default: 2 x --heartbeat).")
@click.option("--max-retry", type=click.IntRange(0), default=3, show_default=True,
              help="How often a trial killed with its worker is retried.")
@click.option("--export", "export_which", type=click.Choice(["best", "all"]), default="best", show_default=True,
              help="Which searched trials go into <out>/plan.json as strategies.")
@click.option("--top", type=click.IntRange(1), default=None, help="Export at most this many.")
@click.option("--no-plots", is_flag=True, help="Skip the PNG plots.")
@click.pass_context
def command(ctx: click.Context, plan_path: str, model_spec: str | None, model_kwargs: dict | None, checkpoint: str | None,
            input_shape: tuple[int, int, int] | None, calib: str, data_dir: str | None, calib_samples: int, batch_size: int, seed: int,
            out_dir: str, storage: str | None, study_name: str, n_trials: int, total_trials: int | None,
            timeout: float | None, objective: str, metric: str, target: float | None, space: str, score: str, sampler: str | None,
            sampler_seed: int | None, population_size: int | None, signal_list: tuple[str, ...] | None, evaluator_kind: str,
            val_samples: int | None, bn_batches: int, finetune_steps: int, finetune_lr: float, heartbeat_interval: int,
            grace_period: int | None, max_retry: int, export_which: str, top: int | None, no_plots: bool) -> None:
    """Search around the plan's 30 rule strategies with Optuna; resumable, and shareable by many workers.

    Evaluates on the validation split of the --calib dataset (never the test split). Writes the study
    (default SQLite), <out>/plan.json with the best searched strategies added, <out>/search.json and
    the plots pareto.png, history.png and importances.png.

    \b
    Example:
      mixmatch plan --model mixmatch_plugin.models:tiny_resnet --checkpoint m.pt --calib digits --out plan.json
      mixmatch search --plan plan.json --model mixmatch_plugin.models:tiny_resnet --checkpoint m.pt \\
                      --calib digits --out search-out
    Several workers (any machines): the same command with --storage postgresql+psycopg2://user@db/mm
    --study resnet-80 on each. Killed? Run the same command again: the study continues (add
    --total-trials N to stop at the same end point); a trial cut short is failed and retried.
    """
    from mixmatch_plugin.adapters import optuna as mmo
    from mixmatch_plugin.adapters.optuna.search import quiet
    from mixmatch_plugin.app import data as mmdata
    from mixmatch_plugin.io import atomic_write_json
    from mixmatch_plugin.layers import inventory
    from mixmatch_plugin.masks import check_strategy
    from mixmatch_plugin.planning import load_plan
    from mixmatch_plugin.signals import SIGNALS, compute_signals

    if not (ctx.find_root().obj or {}).get("verbose"):
        quiet()
    out = Path(out_dir)
    plan = load_plan(plan_path)
    spec, kwargs, calib, data_dir, calib_samples, batch_size, seed, shape = from_plan(
        plan.meta, plan_path, model_spec, model_kwargs, calib=calib, data_dir=data_dir, calib_samples=calib_samples,
        batch_size=batch_size, seed=seed, input_shape=input_shape)
    model = load_model(spec, kwargs, checkpoint).eval()
    layers = inventory(model)
    if plan.strategies:
        check_strategy(plan.strategies[0], layers, plan.layers)
    choices = signal_list
    wanted = choices or tuple(plan.meta.get("signals") or SIGNALS)
    if space == "pool" and not choices:  # the pool's bases keep their own signals
        wanted = tuple({*wanted, *(s.signal for s in plan.strategies if s.signal in SIGNALS)})
    builtin = evaluator_kind in ("proxy", "finetune")
    if not builtin and ":" not in evaluator_kind:
        raise MixMatchError(f"--evaluator {evaluator_kind!r}: choose proxy, finetune, or MODULE:FN")
    needs_grad = any(s in ("gradient", "product") for s in wanted)
    if calib == "none" and (builtin or needs_grad):
        raise MixMatchError("mixmatch search scores on the validation split of a dataset: pass --calib digits|fashion-mnist|random")
    splits = load_data(calib, data_dir, shape, seed) if calib != "none" else None
    signals = None
    if splits is not None:
        calib_loader = splits.calibration(calib_samples, batch_size, seed)
        signals = compute_signals(model, calib_loader, layers=layers, progress=True, signals=(
            "magnitude", *(("gradient",) if needs_grad else ()), *(("wanda",) if "wanda" in wanted else ())))
    if builtin:
        assert splits is not None
        val = mmdata.subset(splits.val, val_samples, seed) if val_samples else splits.val
        val_loader = mmdata.loader(val, max(batch_size, 128))
        train_loader = mmdata.loader(splits.train, batch_size, shuffle=True, seed=seed)
        if evaluator_kind == "proxy":
            evaluator: Any = mmo.ProxyEvaluator(model, val_loader, signals=signals, bn_loader=train_loader, bn_batches=bn_batches)
        else:
            evaluator = mmo.FinetuneEvaluator(model, train_loader, val_loader, signals=signals, steps=finetune_steps,
                                              lr=finetune_lr, seed=seed)
    else:
        evaluator = mmo.CallbackEvaluator(_callback(evaluator_kind))
    macs_shape = shape or (splits.input_shape if splits is not None else None)
    if macs_shape is None and metric == "macs":
        raise MixMatchError("--metric macs needs --input-shape C,H,W (or --calib data) to measure the MACs")
    macs = mmo.MacsProfile.measure(model, macs_shape, layers=layers) if macs_shape is not None else None
    store = storage or f"sqlite:///{(out / 'search.db').absolute()}"

    options = mmo.SearchOptions(
        n_trials=n_trials, total_trials=total_trials, timeout=timeout, objective=objective, metric=metric,
        target=target, space=space, score=score, sampler=sampler, sampler_seed=sampler_seed,
        population_size=population_size, signals=choices, macs=macs, heartbeat_interval=heartbeat_interval or None,
        grace_period=grace_period, max_retry=max_retry,
    )
    res = mmo.search(plan, evaluator, options, storage=store, study_name=study_name, progress=True)
    mmo.export(res, out / "plan.json", which=export_which, top=top)
    written: list[Path] = [out / "plan.json"]
    summary = {
        "study": res.study.study_name, "storage": res.storage, "objective": res.objective, "metric": res.metric,
        "score": res.score, "target": res.target, "evaluator": res.evaluator, "states": res.states(),
        "seconds_per_trial": res.seconds_per_trial, "wall_per_trial": res.wall_per_trial,
        "best": [r.to_dict() for r in res.best], "best_rule": res.best_rule.to_dict() if res.best_rule else None,
        "trials": [r.to_dict() for r in res.trials],
    }
    written.append(atomic_write_json(out / "search.json", _jsonable(summary)))
    if not no_plots and res.trials:
        written += [mmo.plot_pareto(res, out / "pareto.png"), mmo.plot_history(res, out / "history.png")]
        if (imp := mmo.plot_importances(res, out / "importances.png")) is not None:
            written.append(imp)

    xname = "sparsity" if metric == "sparsity" else "MACs removed"
    rows = [(r.strategy.name, r.number, f"{r.x:.4f}", f"{r.accuracy:.4f}", "rule" if r.seed else "searched") for r in res.best]
    click.echo(table(rows, ("best strategy", "trial", xname, f"val {score}", "from")) if rows else "no feasible completed trial yet")
    if res.best_rule is not None:
        r = res.best_rule
        click.echo(f"best rule strategy: {r.strategy.name} ({xname} {r.x:.4f}, val {score} {r.accuracy:.4f})")
    states = ", ".join(f"{v} {k.lower()}" for k, v in sorted(res.states().items()))
    click.echo(f"study {res.study.study_name!r} in {res.storage}: {states}; "
               f"{res.seconds_per_trial:.2f} s evaluation, {res.wall_per_trial:.2f} s wall per trial")
    for p in written:
        click.echo(f"wrote {p}")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj
