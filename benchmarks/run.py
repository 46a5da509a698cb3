"""The real-data comparison: Mix-and-Match against the allocation baselines on Fashion-MNIST.

For every model, sparsity and seed (the seed draws the calibration batches and orders fine-tuning):

* **baselines** (uniform magnitude, global magnitude, SNIP, GraSP, LAMP, ERK) and **Mix-and-Match**
  candidates, all pruning exactly ``round(S * N)`` weights;
* Mix-and-Match variants differ in the range source (``rules``: the model's preset; ``empirical``:
  the paper's nine runs). Each variant's 30 strategies are ranked on the **validation** split (a
  500-image screen, then the top 5 on all 5,000 validation images); ``mm`` is the validation-best
  over all variants' candidates. The test split is evaluated only for the report;
* ``oracle`` (best test accuracy among the rule strategies) and ``mean`` (their average) show what
  the selection costs; they are diagnostics, not methods (they peek at test);
* **one-shot**: masks (plus BatchNorm re-estimation on the same training batches for every method,
  drawn once per seed); **fine-tuned**: the same mask-keeping fine-tune (optimizer, steps, learning
  rate, and the same batches in the same order, drawn from the seed) for every fine-tuned method.

Results made before protocol 2 (``PROTOCOL``) drew new batches for each method from one shuffled
loader (the same seed, other batches); they are redone when the model is run again.

Results are saved after every (model, seed) so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import platform
import shutil
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from benchmarks.configs import FULL, QUICK, TINY
from benchmarks.tables import protocol_of
from mixmatch_plugin import baselines
from mixmatch_plugin._version import __version__
from mixmatch_plugin.adapters.depth_width import model_hash
from mixmatch_plugin.app import data
from mixmatch_plugin.app.train import TrainConfig, train_cached
from mixmatch_plugin.batches import resolve_device
from mixmatch_plugin.errors import BudgetError, MixMatchError
from mixmatch_plugin.evaluation import Choice, choose, evaluate, rank, reestimate_bn
from mixmatch_plugin.finetuning import finetune
from mixmatch_plugin.io import atomic_write_json, read_json
from mixmatch_plugin.layers import inventory
from mixmatch_plugin.masks import Masker, compute_masks
from mixmatch_plugin.models import build_model
from mixmatch_plugin.planning import Plan, PlanOptions, plan
from mixmatch_plugin.progress import progress_bar
from mixmatch_plugin.ranges import bounds, rule_ranges
from mixmatch_plugin.rules import load_rules, preset_for
from mixmatch_plugin.sensitivity import measure_curves
from mixmatch_plugin.signals import Signals, compute_grasp, compute_signals
from mixmatch_plugin.strategies import Strategy, distinct

logger = logging.getLogger(__name__)

SCHEMA = "mixmatch.bench/1"
#: 2: every method of a seed re-estimates BatchNorm on the same held batches and is fine-tuned on the
#: same batch order (1: each drew its own batches from one shuffled loader). Recorded with each model.
PROTOCOL = 2
BASELINES = ("uniform", "global_magnitude", "snip", "grasp", "lamp", "erk")
#: Images per evaluation batch. Not 1,000: at 1,000 images the ViT's attention and MLP activations
#: outgrow the CPU caches and it evaluates 1.5-1.7x slower (10,000 test images: 13.5 s against 8.1 s on
#: 2 cores), with the same predictions (checked on every test image, dense and pruned ViT and Swin).
EVAL_BATCH = 500


@dataclass
class BenchConfig:
    """Everything a benchmark run depends on (recorded in the results)."""

    models: dict[str, TrainConfig]
    sparsities: dict[str, tuple[float, ...]]
    seeds: tuple[int, ...] = (0, 1, 2)
    calib_samples: int = 1024
    screen_samples: int = 500
    top_k: int = 5
    bn_batches: int = 4
    finetune_steps: int = 100
    finetune_lr: float = 3e-4
    finetune_methods: tuple[str, ...] = (*BASELINES, "mm", "mm+search")
    search_trials: int = 40  # mm+search: this many Optuna trials after the whole pool (0: no mm+search rows)
    variants: tuple[str, ...] = ("rules", "empirical")
    measure: str | None = "wanda"  # the signal whose per-layer damage curves give the measured allocations (None: none)
    progressive: int = 10  # rounds of progressive SNIP in the pool (0: none)
    masks: tuple[str, ...] = ("magnitude", "product", "wanda")  # the winner's allocation is also tried with these masks
    test_samples: int | None = None  # None: the whole 10,000-image test split
    val_samples: int | None = None  # None: the whole 5,000-image validation split
    structured: bool = True
    structured_macs: tuple[float, ...] = (0.3, 0.5)  # MACs reductions of the structured rows

    @classmethod
    def full(cls) -> BenchConfig:
        return cls(models=dict(FULL), sparsities={"resnet18": (0.7, 0.9, 0.95, 0.98), "vit": (0.5, 0.7, 0.8), "swin": (0.5, 0.7, 0.8),
                                                  "resnet50": (0.7, 0.9, 0.95, 0.98), "mobilenetv3": (0.5, 0.7, 0.8), "regnetx": (0.5, 0.7, 0.8, 0.9, 0.95),
                                                  "levit": (0.8, 0.9, 0.95)})  # LARGER's, OUTSIDE's

    @classmethod
    def tiny(cls) -> BenchConfig:
        """Smoke-sized (seconds per seed), for the tests that kill and resume a run; not a benchmark."""
        return cls(models=dict(TINY), sparsities={"resnet": (0.5,)}, seeds=(0, 1, 2), calib_samples=64, screen_samples=64,
                   top_k=1, bn_batches=0, finetune_steps=2, finetune_methods=("uniform", "mm", "mm+search"), search_trials=2, variants=("rules",),
                   measure=None, progressive=0, masks=(), test_samples=128, val_samples=128, structured=False)

    @classmethod
    def quick(cls) -> BenchConfig:
        return cls(models=dict(QUICK), sparsities={"resnet": (0.7, 0.9), "swin": (0.5, 0.7)}, seeds=(0, 1), calib_samples=128,
                   screen_samples=64, top_k=1, bn_batches=1, finetune_steps=6, search_trials=8, test_samples=400, val_samples=300,
                   structured_macs=(0.5,))


def environment(device: torch.device | None = None) -> dict[str, Any]:
    import numpy
    import timm

    gpu = {"gpu": torch.cuda.get_device_name(device)} if device is not None and device.type == "cuda" else {}
    return {**gpu, "device": str(device or "cpu"),
        "mixmatch_plugin": __version__, "torch": torch.__version__, "timm": timm.__version__, "numpy": numpy.__version__,
        "python": platform.python_version(), "platform": platform.platform(), "processor": platform.processor(),
        "cpu": cpu_model(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else what :mod:`platform` knows): speeds differ between machines."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class MaskedEvaluator:
    """Masked strategies on one model (a shared :class:`~mixmatch_plugin.masks.Masker`), BatchNorm re-estimated."""

    def __init__(self, model: torch.nn.Module, scores: Signals, layers: Sequence[Any], bn: Sequence[Any], bn_batches: int) -> None:
        self.model, self.scores, self.layers = model, scores, layers
        self.masker = Masker(model, scores, layers=layers)
        self.bn, self.bn_batches = bn, bn_batches  # bn: held batches (Splits.held_batches), the same for every strategy

    def masked(self, s: Strategy) -> torch.nn.Module:
        work, _ = self.masker(s)
        if self.bn_batches:
            reestimate_bn(work, self.bn, self.bn_batches)
        return work

    def fine_tuned(self, s: Strategy, batches: Iterable[Any], steps: int, lr: float) -> tuple[torch.nn.Module, float]:
        """A copy of the masked model after ``steps`` mask-keeping Adam steps on ``batches``, and its realized sparsity."""
        work = copy.deepcopy(self.masked(s))
        ft = finetune(work, compute_masks(work, s, self.scores, layers=self.layers), batches, max_steps=steps, lr=lr)
        return work, ft.global_sparsity


class _PhaseClock:
    """Wall seconds spent per phase of one seed (where the benchmark's time goes)."""

    def __init__(self) -> None:
        self.seconds: defaultdict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - t0

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 1) for k, v in self.seconds.items()}


def variant_preset(variant: str, model: torch.nn.Module) -> str:
    """The preset a Mix-and-Match variant plans with: the paper's for ``empirical``, else the model's own."""
    return "paper" if variant == "empirical" else preset_for(model)


def ranges_digest(cfg: BenchConfig, name: str, model: torch.nn.Module | None = None) -> str:
    """A digest of what the presets fix for model ``name`` before any data: its layers, hard bounds and rule ranges.

    It keys the model's results, so rows measured before a preset changed what it gives this model (a
    rules file edited, constraints reordered) are redone rather than reused; an edit that changes
    nothing for this model keeps them. ``model`` is the model when the caller has it (weights do not
    matter here); else it is built from ``cfg``.
    """
    if model is None:
        tc = cfg.models[name]
        model = build_model(tc.model, model_kwargs=tc.model_kwargs)
    layers = inventory(model)
    parts: dict[str, Any] = {"layers": [(x.name, x.role, x.stage, x.params) for x in layers]}
    for variant in cfg.variants:
        rules = load_rules(variant_preset(variant, model))
        parts[variant] = {"bounds": bounds(layers, rules), "rules": rule_ranges(layers, rules) if rules.rules else None}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def eval_loaders(cfg: BenchConfig, splits: data.Splits) -> tuple[DataLoader, DataLoader]:
    """The validation and test loaders of a run: the whole splits, or the fixed subsets ``cfg`` asks for."""
    val = data.subset(splits.val, cfg.val_samples, 0) if cfg.val_samples else splits.val
    test = data.subset(splits.test, cfg.test_samples, 0) if cfg.test_samples else splits.test
    return data.loader(val, EVAL_BATCH), data.loader(test, EVAL_BATCH)


def screen_loader(cfg: BenchConfig, splits: data.Splits, seed: int) -> DataLoader:
    """The seed's ``cfg.screen_samples`` validation images, on which every candidate strategy is screened."""
    return data.loader(data.subset(splits.val, cfg.screen_samples, seed), EVAL_BATCH)


def run_model(
    name: str, cfg: BenchConfig, splits: data.Splits, dense: tuple[torch.nn.Module, dict[str, Any]], *,
    done: dict[str, Any] | None = None, on_seed: Any = None, progress: bool = True,
) -> dict[str, Any]:
    """Benchmark one model over all its sparsities and seeds.

    ``dense`` is the trained model and its training record (from :func:`train_cached`); ``done`` holds
    seeds finished earlier. A sparsity whose one-shot rows are kept without fine-tuned rows (an older
    protocol's, see :func:`reusable`) is only fine-tuned again, its strategies rebuilt by name.
    """
    model, info = dense
    model.eval()
    out: dict[str, Any] = done or {"dense": {k: v for k, v in info.items() if k != "history"}, "history": info.get("history"),
                                   "runs": [], "choices": [], "seconds": {}}
    val, test = eval_loaders(cfg, splits)
    out["dense"]["test_accuracy_eval"] = evaluate(model, test).accuracy
    out["dense"]["val_accuracy_eval"] = evaluate(model, val).accuracy
    for seed in cfg.seeds:
        done_here = {r["sparsity"] for r in out["runs"] if r["seed"] == seed}
        todo = [t for t in cfg.sparsities[name] if t not in done_here]
        # kept one-shot rows without some fine-tuned rows (see reusable) or without mm+search: only those are added
        refit = [t for t in cfg.sparsities[name] if t in done_here and _missing(out["runs"], seed, t, cfg)]
        top = cfg.sparsities[name][-1]
        needs_floor = bool(cfg.finetune_methods) and not any(
            r["seed"] == seed and r["sparsity"] == top and r["method"].endswith("_reseeded") for r in out["runs"])
        if not todo and not refit and not needs_floor:
            logger.info("%s seed %d already done: skipped", name, seed)
            continue
        if done_here:
            logger.info("%s seed %d: sparsities %s kept, running %s%s", name, seed, sorted(done_here),
                        todo or ("the noise floor" if needs_floor else "no new sparsity"), f", adding the rows they lack at {refit}" if refit else "")
        t0 = time.time()
        clock = _PhaseClock()
        torch.manual_seed(seed)
        calib = splits.calibration(cfg.calib_samples, 128, seed)
        screen = screen_loader(cfg, splits, seed)
        bn = splits.held_batches(cfg.bn_batches, seed=seed)

        def fine_tune_order(seed: int = seed) -> Any:  # a fresh loader: every method gets the same batches in the same order
            return data.loader(splits.train, 128, shuffle=True, seed=seed)

        with clock("signals"):
            scores = compute_signals(model, calib)
            scores.grasp = compute_grasp(model, calib, mean_gradient=scores.mean_gradient)
        curves = None
        if cfg.measure:  # once per seed, for every sparsity: up to every layer's limit (normalization stays dense)
            with clock("measured curves"):
                inv, ceiling = inventory(model), load_rules(preset_for(model)).max_layer_sparsity
                curves = measure_curves(model, inv, scores, calib, signal=cfg.measure,
                                        hi={x.name: 0.0 if x.kind == "norm" else ceiling for x in inv})
        layers = None
        rows: list[dict[str, Any]] = []
        for target in progress_bar(sorted(todo + refit), f"{name} seed {seed}", enable=progress):
            plans: dict[str, Plan] = {}
            for variant in cfg.variants:
                try:
                    with clock("strategies"):
                        plans[variant] = plan(model, calib, preset=variant_preset(variant, model), target=target,
                                              on_unreachable="extend", scores=scores,
                                              options=PlanOptions(measure=curves if variant == cfg.variants[0] else None,
                                                                  progressive=cfg.progressive if variant == cfg.variants[0] else 0))
                except BudgetError as exc:
                    logger.warning("%s at %.2f: variant %s skipped (%s)", name, target, variant, exc)
            variants = list(plans)
            if not variants:
                raise MixMatchError(
                    f"benchmark model {name}: no range variant ({', '.join(cfg.variants)}) reaches sparsity {target}; "
                    "change the configuration's sparsities"
                )
            layers = plans[variants[0]].layers
            signals = plans[variants[0]].signals or scores  # with this target's progressive scores
            ev = MaskedEvaluator(model, signals, layers, bn, cfg.bn_batches if has_batchnorm(model) else 0)
            base = {b: baselines.make(b, layers, scores, target) for b in BASELINES}
            cands: dict[str, Strategy] = {}
            for variant, p in plans.items():
                for s in p.strategies:
                    cands[f"{variant}/{s.name}"] = Strategy(f"{variant}/{s.name}", s.signal, s.ratios, s.global_sparsity, s.meta)
            methods: dict[str, Strategy]
            if target in refit:
                with clock("one-shot check"):
                    methods = {**base, **_recorded(out["runs"], name, seed, target, cfg.finetune_methods, base, cands, ev, test)}
                rec = next(c for c in out["choices"] if (c["seed"], c["sparsity"]) == (seed, target))
                screened: Sequence[Any] = []
                if cfg.search_trials and "search" not in rec:
                    with clock("validation choice"):  # the pool's screen again, to seed the search
                        screened = rank(model, list(cands.values()), screen, signals=signals, bn_loader=bn, bn_batches=ev.bn_batches)
            else:
                with clock("validation choice"):
                    choice = choose(model, list(cands.values()), screen, val, signals=signals, bn_loader=bn,
                                    bn_batches=ev.bn_batches, top_k=cfg.top_k, masks=cfg.masks)
                    steps = _ablation(ev, cands, choice, val, cfg.top_k)
                rec = {"seed": seed, "sparsity": target, "pool": len(cands), "twins": len(choice.twins), "winner": choice.strategy.name,
                       "evaluations": choice.evaluations, "seconds": round(choice.seconds, 1),
                       "finals": [asdict(r) for r in choice.finals], "ablation": {k: v.name for k, v in steps.items()}}
                out["choices"].append(rec)
                methods = {**base, "mm": choice.strategy, **{f"mm[{k}]": v for k, v in steps.items()}}
                screened = choice.screen
            if cfg.search_trials and "search" in rec:  # kept: rebuilt from its record
                methods["mm+search"] = _rebuilt(rec["search"], plans[variants[0]], cands)
            elif cfg.search_trials:
                with clock("search"):
                    methods["mm+search"], rec["search"] = _search(ev, plans[variants[0]], cands, screened, rec["finals"],
                                                                  (screen, val), cfg, seed)
            kept = {r["method"] for r in out["runs"] if (r["seed"], r["sparsity"], r["regime"]) == (seed, target, "one-shot")}
            measured: dict[str, tuple[float, float]] = {}  # a strategy named by several methods is measured once
            for method, s in methods.items():
                if method in kept:
                    continue
                if s.name not in measured:
                    with clock("one-shot evaluation"):
                        m = ev.masked(s)
                        measured[s.name] = (evaluate(m, val).accuracy, evaluate(m, test).accuracy)
                rows.append(_row(name, target, seed, method, "one-shot", s, *measured[s.name]))
            for method in _missing(out["runs"] + rows, seed, target, cfg):
                s = methods[method]
                with clock("fine-tuning"):
                    work, realized = ev.fine_tuned(s, fine_tune_order(), cfg.finetune_steps, cfg.finetune_lr)
                    r = _row(name, target, seed, method, "fine-tuned", s, evaluate(work, val).accuracy, evaluate(work, test).accuracy)
                r["realized_sparsity"] = realized
                rows.append(r)
        # the noise floor: the first fine-tuned method's strategy fine-tuned again with another data order
        if needs_floor:
            target = top
            layers = layers if layers is not None else inventory(model)
            s = baselines.make(cfg.finetune_methods[0], layers, scores, target)
            ev = MaskedEvaluator(model, scores, layers, bn, cfg.bn_batches if has_batchnorm(model) else 0)
            with clock("noise floor (reseeded fine-tune)"):
                work, _ = ev.fine_tuned(s, fine_tune_order(seed + 1000), cfg.finetune_steps, cfg.finetune_lr)
                r = _row(name, target, seed, cfg.finetune_methods[0] + "_reseeded", "fine-tuned", s, evaluate(work, val).accuracy,
                         evaluate(work, test).accuracy)
            rows.append(r)
        out["runs"] += rows
        # a seed extended by new sparsities keeps the time it took before (totals per seed)
        out["seconds"][str(seed)] = out["seconds"].get(str(seed), 0.0) + time.time() - t0
        phases = out.setdefault("phase_seconds", {}).setdefault(str(seed), {})
        for phase, sec in clock.as_dict().items():
            phases[phase] = phases.get(phase, 0.0) + sec
        if on_seed:
            on_seed(out)
    return out


def _recorded(runs: Sequence[dict[str, Any]], name: str, seed: int, target: float, wanted: Sequence[str],
              base: dict[str, Strategy], cands: dict[str, Strategy], ev: MaskedEvaluator, test: Any) -> dict[str, Strategy]:
    """The strategies that kept one-shot rows name, for the fine-tuned methods that are not baselines.

    Each is rebuilt by name (``<name>@<signal>``: remasked by that signal) and must score its
    recorded one-shot test accuracy again; otherwise the kept rows do not belong to this model and code.
    """
    found: dict[str, Strategy] = {}
    for method in wanted:
        if method in base or method == "mm+search":  # rebuilt from its choice record (_rebuilt)
            continue
        row = next((r for r in runs if (r["seed"], r["sparsity"], r["method"], r["regime"]) == (seed, target, method, "one-shot")), None)
        strategy = row["strategy"] if row else None
        s = _member(cands, strategy) if strategy else None
        if row is None or s is None or s.name != strategy:
            raise MixMatchError(f"{name} seed {seed} at sparsity {target}: the kept one-shot row of {method} names strategy "
                                f"{strategy!r}, which cannot be rebuilt; rerun with --fresh")
        m = evaluate(ev.masked(s), test)
        if abs(m.accuracy - row["test_accuracy"]) > 1.5 / m.samples:  # one image of slack: another thread count can flip a tie
            raise MixMatchError(f"{name} seed {seed} at sparsity {target}: {strategy} rebuilt scores {m.accuracy:.4f} on test, "
                                f"its kept one-shot row {row['test_accuracy']:.4f}: the kept rows were measured on another model "
                                "or code; rerun with --fresh")
        found[method] = s
    return found


def _member(cands: dict[str, Strategy], name: str) -> Strategy | None:
    """The pool member ``name``, or ``<member>@<signal>``: that member remasked by another signal (see ``choose``)."""
    if name in cands:
        return cands[name]
    base, _, signal = name.rpartition("@")
    return dataclasses.replace(cands[base], name=name, signal=signal, layer_signals={}) if base in cands else None


def _missing(runs: Sequence[dict[str, Any]], seed: int, target: float, cfg: BenchConfig) -> list[str]:
    """The fine-tuned methods without a fine-tuned row at (seed, target) (all, mm+search also without its one-shot row)."""
    have = {(r["method"], r["regime"]) for r in runs if r["seed"] == seed and r["sparsity"] == target}
    out = [m for m in cfg.finetune_methods if (m, "fine-tuned") not in have]
    if cfg.search_trials and ("mm+search", "one-shot") not in have and "mm+search" not in out:
        out.append("mm+search")
    return [m for m in out if m != "mm+search" or cfg.search_trials]


def _search(ev: MaskedEvaluator, plan_: Plan, cands: dict[str, Strategy], screened: Sequence[Any], finals: Sequence[dict[str, Any]],
            loaders: tuple[Any, Any], cfg: BenchConfig, seed: int) -> tuple[Strategy, dict[str, Any]]:
    """``mm+search``: an Optuna study in the pool space (every candidate a base, per-group log-odds shifts; TPE,
    seeded by the whole pool at its screen scores), ``cfg.search_trials`` trials on the screen's loss; the
    ``top_k`` searched points on all validation against the choice's finals. Returns the winner and its record.
    """
    from mixmatch_plugin.adapters import optuna as mmo
    from mixmatch_plugin.adapters.optuna.search import quiet

    quiet()
    screen, val = loaders
    t0 = time.perf_counter()
    known = {r.strategy: {"accuracy": r.accuracy, "loss": r.loss} for r in screened}

    def on_screen(s: Strategy) -> dict[str, float]:
        if s.name not in known:
            m = evaluate(ev.masked(s), screen)
            known[s.name] = {"accuracy": m.accuracy, "loss": m.loss}
        return known[s.name]

    pool = dataclasses.replace(plan_, strategies=list(cands.values()))
    res = mmo.search(pool, on_screen, mmo.SearchOptions(objective="single", space="pool", score="loss", sampler="tpe",
                                                        sampler_seed=seed, n_trials=len(cands) + cfg.search_trials))
    top = sorted((r for r in res.trials if r.seed is None), key=lambda r: r.accuracy)[: cfg.top_k]  # accuracy: the score (loss)
    full = {r["strategy"]: (r["accuracy"], r["loss"]) for r in finals}
    for r in top:
        m = evaluate(ev.masked(r.strategy), val)
        full[r.strategy.name] = (m.accuracy, m.loss)
    best = min(full, key=lambda k: (-full[k][0], full[k][1]))
    found = next((r.strategy for r in top if r.strategy.name == best), None) or _member(cands, best)
    assert found is not None  # the choice's finalists are pool members, or one remasked
    info = {"winner": best, "searched": best not in {r["strategy"] for r in finals}, "trials": cfg.search_trials,
            "evaluations": cfg.search_trials + len(top), "seconds": round(time.perf_counter() - t0, 1),
            "base": found.meta.get("base", best), "signal": found.signal, "shifts": found.meta.get("shifts", {})}
    return found, info


def _rebuilt(info: dict[str, Any], plan_: Plan, cands: dict[str, Strategy]) -> Strategy:
    """The ``mm+search`` winner again from its record (see :func:`_search`)."""
    base_name = info["base"].partition("@")[0]
    if base_name not in cands:
        raise MixMatchError(f"the recorded mm+search winner's base {info['base']!r} is not in the pool; rerun with --fresh")
    return plan_.space().shifted(cands[base_name], info["shifts"], info["winner"], info["signal"])


#: The ablation's nested pools, in order: each adds one kind of pool member to the one before.
POOLS = ("rules", "+score", "+wanda", "+free", "+measured", "+progressive")


def pool_step(s: Strategy) -> str:
    """The ablation step that brings strategy ``s`` into the pool (see :data:`POOLS`)."""
    if s.meta.get("family") is None:
        return "rules"
    if s.meta["family"] in ("measured", "progressive"):
        return "+" + s.meta["family"]
    return "+free" if s.meta.get("clip") == "free" else "+wanda" if s.signal == "wanda" else "+score"


def _ablation(ev: MaskedEvaluator, cands: dict[str, Strategy], choice: Choice, val: Any, top_k: int) -> dict[str, Strategy]:
    """Each nested pool's validation choice, by the same rule as ``choice`` (screen, then its top ``top_k`` on validation)."""
    screen = {r.strategy: r for r in choice.screen}
    full = {r.strategy: (r.accuracy, r.loss) for r in choice.finals}
    out: dict[str, Strategy] = {}
    before = 0
    for i, step in enumerate(POOLS):
        pool = distinct([s for s in cands.values() if pool_step(s) in POOLS[: i + 1]])  # a twin takes no finalist's place
        added, before = len(pool) > before, len(pool)
        if not pool or (out and not added):
            continue
        top = sorted(pool, key=lambda s: (-screen[s.name].accuracy, screen[s.name].loss))[:top_k] if screen else pool
        for s in top:
            if s.name not in full:
                m = evaluate(ev.masked(s), val)
                full[s.name] = (m.accuracy, m.loss)
        out[step] = min(top, key=lambda s: (-full[s.name][0], full[s.name][1]))
    return out


def has_batchnorm(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _row(model: str, target: float, seed: int, method: str, regime: str, s: Strategy | None,
         val_acc: float | None, test_acc: float) -> dict[str, Any]:
    return {"model": model, "sparsity": target, "seed": seed, "method": method, "regime": regime,
            "strategy": s.name if s else None, "realized_sparsity": s.global_sparsity if s else None,
            "val_accuracy": val_acc, "test_accuracy": test_acc}


@dataclass
class BenchResult:
    path: Path
    doc: dict[str, Any] = field(default_factory=dict)


def results_path(out: str | Path, *, quick: bool = False, name: str | None = None) -> Path:
    """Where :func:`run` keeps its results: ``out/<name>.json``, ``name`` defaulting to ``quick`` or ``full``."""
    return Path(out) / f"{name or ('quick' if quick else 'full')}.json"


def run(cfg: BenchConfig, out: str | Path, *, quick: bool = False, data_dir: str | None = None,
        cache_dir: str | Path | None = None, progress: bool = True, fresh: bool = False, name: str | None = None,
        device: str | torch.device | None = None) -> BenchResult:
    """Run the benchmark for every model in ``cfg`` and write ``out/<name>.json`` (resumable).

    ``name`` defaults to ``quick`` or ``full``. Results are written (atomically) after every
    (model, seed); a rerun with the same configuration skips what is done, unless ``fresh``.
    ``device`` (default: the CPU) is where the dense models are trained and every method is
    measured; it is recorded in the environment.
    """
    dev = resolve_device(device)
    out = Path(out)
    path = results_path(out, quick=quick, name=name)
    common = _cfg_dict(cfg)
    doc: dict[str, Any] = {}
    if path.exists() and not fresh:
        try:
            doc = read_json(path, "benchmark results")
        except MixMatchError as exc:
            raise MixMatchError(f"{exc}; or pass --fresh to start over") from None
        if not isinstance(doc, dict) or doc.get("schema") != SCHEMA or doc.get("config") != common:
            logger.warning("%s was made with another configuration or version: starting fresh", path)
            keep_copy(path)
            doc = {}
    elif path.exists():
        keep_copy(path)
    doc.setdefault("schema", SCHEMA)
    doc["config"] = common
    doc.setdefault("models", {})
    for kept in doc["models"].values():  # results kept from earlier runs remember where they were measured
        kept.setdefault("environment", doc.get("environment"))
    doc["environment"] = environment(dev)
    splits = data.fashion_mnist(data_dir, seed=0)
    t0 = time.time()
    for name in cfg.models:
        model, info = train_cached(cfg.models[name], splits, cache_dir=cache_dir, progress=progress, device=dev)
        model_cfg = {"train": asdict(cfg.models[name]), "sparsities": list(cfg.sparsities[name]),
                     "ranges": ranges_digest(cfg, name, model), "dense": model_hash(model), "protocol": PROTOCOL}
        done = reusable(name, doc["models"].get(name), model_cfg, info, has_bn=has_batchnorm(model))
        if done is not doc["models"].get(name) and name in doc["models"] and path.exists():  # rows replaced: copy first
            keep_copy(path)

        def save(partial: dict[str, Any], name: str = name, model_cfg: dict[str, Any] = model_cfg) -> None:
            partial["config"] = model_cfg
            partial.setdefault("environment", doc["environment"])
            doc["models"][name] = partial
            atomic_write_json(path, doc)

        result = run_model(name, cfg, splits, (model, info), done=done, on_seed=save, progress=progress)
        if cfg.structured and "structured" not in result:
            from benchmarks.structured import structured_rows

            t_structured = time.time()
            result["structured"] = structured_rows(name, cfg, splits, model)
            result["seconds"]["structured"] = time.time() - t_structured
        save(result)
    doc["seconds"] = time.time() - t0
    atomic_write_json(path, doc)
    return BenchResult(path, doc)


def adopt_one_shot(cfg: BenchConfig, out: str | Path) -> list[str]:
    """Start or extend ``out/full.json`` from ``out/one-shot.json``: the cells (seed, sparsity) of ``cfg``'s models that
    full.json lacks are copied over, so that :func:`run` adds only what they lack (fine-tuned rows, mm+search), each kept
    M&M strategy rebuilt and checked against its recorded one-shot test accuracy. Returns the models extended."""
    src, dst = results_path(out, name="one-shot"), results_path(out)
    if not src.is_file():
        raise MixMatchError(f"--from-one-shot: no {src}; run `python -m benchmarks --one-shot` first")
    one = read_json(src, "benchmark results")
    doc = read_json(dst, "benchmark results") if dst.is_file() else {"schema": SCHEMA, "environment": one.get("environment"), "models": {}}
    copied = []
    for m in (m for m in cfg.models if m in one.get("models", {})):
        new = {**one["models"][m], "environment": one["models"][m].get("environment") or one.get("environment")}
        have = doc["models"].setdefault(m, {**new, "runs": [], "choices": [], "seconds": {}, "phase_seconds": {}})
        if any(have["config"].get(k) != new["config"].get(k) for k in ("train", "ranges", "dense", "protocol")):
            raise MixMatchError(f"--from-one-shot: {m} in {src.name} was measured on other dense weights, ranges or protocol "
                                f"than in {dst.name}; measure it again with --one-shot")
        cells = {(r["seed"], r["sparsity"]) for r in have["runs"]}
        rows = [r for r in new["runs"] if (r["seed"], r["sparsity"]) not in cells]
        if not rows:
            continue
        have["runs"] += rows
        have["choices"] += [c for c in new["choices"] if (c["seed"], c["sparsity"]) not in cells]
        have["config"] = {**have["config"], "sparsities": sorted({*have["config"]["sparsities"], *new["config"]["sparsities"]})}
        overlapping = {r["seed"] for r in new["runs"] if (r["seed"], r["sparsity"]) in cells}
        for seed in {r["seed"] for r in rows} - overlapping:  # a seed whose every one-shot cell is new adds its time
            key = str(seed)
            have["seconds"][key] = have["seconds"].get(key, 0.0) + new["seconds"].get(key, 0.0)
            phases = have["phase_seconds"].setdefault(key, {})
            for k, v in new.get("phase_seconds", {}).get(key, {}).items():
                phases[k] = round(phases.get(k, 0.0) + v, 1)
        copied.append(m)
    doc["config"] = _cfg_dict(cfg)
    atomic_write_json(dst, doc)
    return copied


def reusable(
    name: str, done: dict[str, Any] | None, model_cfg: dict[str, Any], info: dict[str, Any] | None = None, *,
    has_bn: bool = True,
) -> dict[str, Any] | None:
    """What of a model's earlier results a run with ``model_cfg`` can keep.

    All of them unless the dense model differs (its training configuration, or its weights: a
    checkpoint trained again on another machine or torch version has other weights under the same
    configuration) or the presets give it other ranges (then nothing). ``model_cfg["dense"]`` is the
    hash of the cached weights; results saved before weights were hashed are matched by the
    checkpoint's training record ``info`` instead. Results are kept per (seed, sparsity), so a run
    asking for other sparsities measures only those it lacks, and the rows at sparsities it does not
    ask for stay in the file and the tables. Results of an older benchmark protocol are redone; on a
    model without BatchNorm (``has_bn=False``) their one-shot rows do not depend on the protocol's
    batches, so those are kept and only the fine-tuned rows are redone.
    """
    if done is None or done.get("config") == model_cfg:
        return done
    if done.get("config", {}).get("train") != model_cfg["train"]:
        logger.warning("%s: earlier results used another dense-model configuration: redone", name)
        return None
    recorded = done.get("config", {}).get("dense")
    if recorded is None:  # saved before weights were hashed: the training record identifies the checkpoint
        same = info is not None and all(done.get("dense", {}).get(k) == info.get(k) for k in ("train_seconds", "test_accuracy"))
    else:
        same = recorded == model_cfg.get("dense")
    if not same:
        logger.warning("%s: earlier results were measured on other dense weights than the cached checkpoint's (trained "
                       "again, e.g. on another machine or torch version): redone", name)
        return None
    if done.get("config", {}).get("ranges") != model_cfg["ranges"]:
        logger.warning("%s: the presets now give this model other ranges or bounds than its earlier results had: redone", name)
        return None
    old = protocol_of(done)
    if old != model_cfg.get("protocol", PROTOCOL):
        if has_bn:
            logger.warning("%s: earlier results were measured under benchmark protocol %s (each method drew its own "
                           "BatchNorm and fine-tuning batches): redone", name, old)
            return None
        logger.warning("%s: earlier results were measured under benchmark protocol %s (each method drew its own fine-tuning "
                       "batches): their one-shot rows are kept (no BatchNorm: they do not depend on the batches) and the "
                       "fine-tuned rows redone", name, old)
        done = _without_fine_tuned(done, old)
    have = sorted({r["sparsity"] for r in done["runs"]})
    logger.info("%s: results kept at sparsities %s; asked for %s", name, have, model_cfg["sparsities"])
    return done


def _without_fine_tuned(done: dict[str, Any], protocol: int) -> dict[str, Any]:
    """``done`` without its fine-tuned rows and their time, and a record of what was dropped."""
    kept = copy.deepcopy(done)
    kept["runs"] = [r for r in kept["runs"] if r["regime"] != "fine-tuned"]
    for seed, phases in kept.get("phase_seconds", {}).items():
        for phase in ("fine-tuning", "noise floor (reseeded fine-tune)"):
            kept["seconds"][seed] = kept["seconds"].get(seed, 0.0) - phases.pop(phase, 0.0)
    kept.setdefault("redone", []).append({"rows": "fine-tuned", "from_protocol": protocol, "date": time.strftime("%Y-%m-%d %H:%M:%S")})
    return kept


def keep_copy(path: Path) -> None:
    """Copy ``path`` aside before results in it are replaced: nothing measured is lost silently."""
    backup = path.with_name(f"{path.name}.before-{time.strftime('%Y%m%d-%H%M%S')}")
    shutil.copy2(path, backup)
    logger.warning("earlier results in %s are replaced; a copy is kept at %s", path, backup)


def _cfg_dict(cfg: BenchConfig) -> dict[str, Any]:
    """The settings shared by all models (per-model settings are stored with each model's results)."""
    d = asdict(cfg)
    for k in ("models", "sparsities", "structured", "structured_macs", "seeds"):  # seeds: results are kept per seed
        d.pop(k)
    for k in ("finetune_methods", "variants", "masks"):
        d[k] = list(d[k])
    return d
