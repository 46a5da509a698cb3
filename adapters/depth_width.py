"""Depth-and-width pruning chosen by CKA ("Pruning Everything, Everywhere, All at Once"), with Mix-and-Match widths.

Each iteration of :func:`prune_depth_width` builds a depth candidate (the least harmful block removed) and a width
candidate removing the same MACs, optionally fine-tunes both, and keeps the one with the higher CKA to its parent
on validation; it checkpoints atomically (``mixmatch.depth_width/1``) and resumes. The full description, the
checkpoint format and the resume rules: ``docs/adapters.md``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import nn

from mixmatch_plugin.cka import cka_to_parent, collect_features
from mixmatch_plugin.depth import (
    KINDS,
    SCORES,
    BlockScore,
    find_blocks,
    removable_blocks,
    remove_blocks,
    removed_blocks,
    score_blocks,
)
from mixmatch_plugin.errors import BudgetError, MixMatchError
from mixmatch_plugin.evaluation import evaluate
from mixmatch_plugin.finetuning import finetune_steps
from mixmatch_plugin.io import atomic_torch_save, safe_torch_load
from mixmatch_plugin.layers import inventory
from mixmatch_plugin.models import build_model
from mixmatch_plugin.planning import PlanOptions, plan
from mixmatch_plugin.signals import SIGNALS, SignalName, Signals, compute_signals
from mixmatch_plugin.strategies import SHAPES, Strategy, global_sparsity

from .torch_pruning import TPOptions, rebuild
from .torch_pruning import count_macs as tp_count_macs
from .torch_pruning import prune as tp_prune
from .torch_pruning.options import Fold

logger = logging.getLogger(__name__)

FORMAT = "mixmatch.depth_width/1"
Mode = Literal["cka", "depth", "width"]
Allocation = Literal["mm", "uniform"]
MODES: tuple[Mode, ...] = get_args(Mode)
ALLOCATIONS: tuple[Allocation, ...] = get_args(Allocation)
#: Configuration fields that only decide when to stop: they may differ when a run is resumed.
_STOP_FIELDS = ("target", "max_iterations")


@dataclass(frozen=True)
class DepthWidthConfig:
    """Settings of :func:`prune_depth_width` (all of them except ``target`` and ``max_iterations`` key the checkpoint).

    Attributes:
        target: fraction of the original MACs to remove, in (0, 1).
        mode: ``cka`` (both candidates, CKA chooses), ``depth`` or ``width`` (one kind only).
        min_blocks: blocks kept per stage; None: 2 for ResNets (the paper), 1 for ConvNeXt/ViT/Swin.
        block_score: ``kl`` (the paper) or ``cka`` (``1 - CKA`` of the penultimate features).
        allocation: width allocation, ``mm`` (Mix-and-Match strategy) or ``uniform`` (one ratio everywhere).
        strategies: Mix-and-Match strategies ``signal:shape`` to try for the width candidate; each is
            MACs-matched, and with several the one with the highest CKA to the parent (validation) wins.
        finetune_steps: brief fine-tuning of each candidate (0: none); Adam at ``finetune_lr``.
        cka_debiased: debiased (default) or biased minibatch CKA for the choice.
        cka_batches: validation batches for CKA (None: the whole loader).
        score_batches: calibration batches for block scores and gradient signals (None: all).
        width_step: MACs step (fraction of the original) when no depth candidate has ever existed.
        macs_tolerance: relative MACs mismatch at which the bisection stops early.
        bisect_steps: most bisection steps per width candidate.
        max_iterations: stop after this many iterations in total (None: no limit).
        schedule: ``mode="width"`` only: the MACs reduction (fraction of the original, increasing) to
            reach after each iteration, e.g. a depth-only run's, so that width-only baselines follow the
            same MACs schedule; later iterations use the depth candidate's MACs again.
        fold, round_to, max_ratio: passed to the Torch-Pruning adapter.
        preset, disable_constraints: passed to ``mm.plan`` (rules preset; structural constraints off).
        seed: seeds every iteration's fine-tuning (with the iteration number).
    """

    target: float
    mode: Mode = "cka"
    min_blocks: int | None = None
    block_score: BlockScore = "kl"
    allocation: Allocation = "mm"
    strategies: tuple[str, ...] = ("magnitude:midpoint",)
    finetune_steps: int = 0
    finetune_lr: float = 3e-4
    cka_debiased: bool = True
    cka_batches: int | None = None
    score_batches: int | None = None
    width_step: float = 0.1
    macs_tolerance: float = 0.02
    bisect_steps: int = 14
    max_iterations: int | None = None
    schedule: tuple[float, ...] = ()
    fold: Fold = "mean"
    round_to: int | None = None
    max_ratio: float = 0.95
    preset: str = "auto"
    disable_constraints: tuple[str, ...] = ()
    seed: int = 0

    def validate(self) -> None:
        """Raise :class:`MixMatchError` (one line) for any setting out of range."""
        t = self.target
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or not 0.0 < t < 1.0:
            raise MixMatchError(f"MACs target {t!r} is out of range: give the fraction of MACs to remove, in (0, 1)")
        if self.mode not in MODES:
            raise MixMatchError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.block_score not in SCORES:
            raise MixMatchError(f"block_score must be one of {', '.join(SCORES)}, got {self.block_score!r}")
        if self.allocation not in ALLOCATIONS:
            raise MixMatchError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}")
        if not self.strategies:
            raise MixMatchError("strategies must name at least one Mix-and-Match strategy, e.g. magnitude:midpoint")
        for s in self.strategies:
            parse_strategy(s)
        if self.min_blocks is not None and (isinstance(self.min_blocks, bool) or not isinstance(self.min_blocks, int)
                                            or self.min_blocks < 0):
            raise MixMatchError(f"min_blocks must be a non-negative integer, got {self.min_blocks!r}")
        checks = (
            (self.finetune_steps < 0, f"finetune_steps must be >= 0, got {self.finetune_steps}"),
            (not 0.0 < self.width_step < 1.0, f"width_step must lie in (0, 1), got {self.width_step}"),
            (not 0.0 < self.macs_tolerance < 1.0, f"macs_tolerance must lie in (0, 1), got {self.macs_tolerance}"),
            (self.bisect_steps < 1, f"bisect_steps must be >= 1, got {self.bisect_steps}"),
            (any(not 0.0 < v < 1.0 for v in self.schedule) or list(self.schedule) != sorted(self.schedule),
             f"schedule must be increasing MACs reductions in (0, 1), got {list(self.schedule)}"),
            (bool(self.schedule) and self.mode != "width",
             "a MACs schedule only applies to mode='width' (depth and CKA modes follow the blocks)"),
            (self.max_iterations is not None and self.max_iterations < 0, f"max_iterations must be >= 0, got {self.max_iterations}"),
        )
        for bad, msg in checks:
            if bad:
                raise MixMatchError(msg)

    def keyed(self) -> dict[str, Any]:
        """The settings that must match for a checkpoint to be resumed (plain JSON data)."""
        d = json.loads(json.dumps(asdict(self)))
        for k in _STOP_FIELDS:
            d.pop(k)
        return d


def parse_strategy(name: str) -> tuple[SignalName, str]:
    """``"magnitude:midpoint"`` -> ``("magnitude", "midpoint")``, validated."""
    signal, _, shape = str(name).partition(":")
    if signal not in SIGNALS or shape not in SHAPES:
        raise MixMatchError(
            f"width strategy {name!r} must be signal:shape with a signal of {', '.join(SIGNALS)} and a shape of "
            f"{', '.join(SHAPES)}"
        )
    return signal, shape


# ------------------------------------------------------------------------------------------ MACs
def _probe(example_inputs: Any) -> Any:
    """One sample of the example inputs: MACs are reported per input."""
    if isinstance(example_inputs, torch.Tensor):
        return example_inputs[:1]
    return example_inputs


def count_macs(model: nn.Module, example_inputs: Any) -> tuple[int, int]:
    """``(MACs, params)`` of ``model`` on one sample of ``example_inputs`` (Torch-Pruning's counter, eval mode)."""
    return tp_count_macs(model, _probe(example_inputs))


# ---------------------------------------------------------------------------------- width candidate
@dataclass
class WidthCandidate:
    """A structurally pruned copy that removes about ``wanted`` MACs.

    Attributes:
        model: the pruned copy.
        strategy: the strategy that was applied (per-layer targets).
        sparsity: the bisected target sparsity of that strategy.
        macs, params: of the pruned copy (MACs per input).
        removed: MACs removed; ``wanted``: MACs asked for; ``mismatch``: ``(removed - wanted) / wanted``.
        history, num_heads: what the adapter needs to rebuild the architecture.
        trials: bisection steps taken.
    """

    model: nn.Module
    strategy: Strategy
    sparsity: float
    macs: int
    params: int
    removed: int
    wanted: int
    history: list[list[Any]] = field(default_factory=list)
    num_heads: dict[str, int] = field(default_factory=dict)
    trials: int = 0

    @property
    def mismatch(self) -> float:
        return (self.removed - self.wanted) / max(self.wanted, 1)


def uniform_strategy(model: nn.Module, ratio: float) -> Strategy:
    """Every inventory layer except normalization layers at ``ratio`` (the width-only uniform baseline)."""
    layers = inventory(model)
    ratios = {layer.name: (0.0 if layer.kind == "norm" else float(ratio)) for layer in layers}
    return Strategy(f"uniform:{ratio:.4f}", "magnitude", ratios, global_sparsity(ratios, layers), {"shape": "uniform"})


def width_candidate(
    model: nn.Module,
    removed_macs: int,
    example_inputs: Any,
    *,
    calib: Iterable[Any] | None = None,
    strategy: str = "magnitude:midpoint",
    signals: Signals | None = None,
    config: DepthWidthConfig | None = None,
) -> WidthCandidate | None:
    """Structured pruning of a copy of ``model`` that removes about ``removed_macs`` MACs (per input).

    The target sparsity ``t`` of a budget-matched Mix-and-Match strategy (``config.allocation="mm"``:
    ``mm.plan(model, calib, target=t, on_unreachable="extend")`` with one ``signal:shape``) or of a
    uniform one (``allocation="uniform"``) is bisected in [0, 0.95]; each trial prunes with the
    Torch-Pruning adapter and measures the MACs. The closest trial is returned (re-pruned with
    verification against the channel-zeroed original); None when no trial removes anything.
    ``model`` is not changed. ``config`` gives the allocation, the bisection (``macs_tolerance``,
    ``bisect_steps``), the Torch-Pruning settings (``fold``, ``round_to``, ``max_ratio``), the plan's
    ``preset`` and ``disable_constraints``, and ``score_batches`` (default: :class:`DepthWidthConfig`'s).
    """
    cfg = config if config is not None else DepthWidthConfig(target=0.5)  # the target only ends the loop: unused here
    allocation, max_batches = cfg.allocation, cfg.score_batches
    if allocation not in ALLOCATIONS:
        raise MixMatchError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {allocation!r}")
    signal, shape = parse_strategy(strategy)
    if removed_macs <= 0:
        raise MixMatchError(f"the MACs to remove must be positive, got {removed_macs}")
    macs0, _ = count_macs(model, example_inputs)
    needs_calib = allocation == "mm" and signal != "magnitude"
    if needs_calib and calib is None:
        raise MixMatchError(f"strategy {strategy!r} ranks by {signal}, which needs calibration data (calib=...)")
    if allocation == "mm" and signals is None:
        signals = compute_signals(model, calib if needs_calib else None, signals=(signal,), max_batches=max_batches)

    def make(t: float) -> Strategy:
        if allocation == "uniform":
            return uniform_strategy(model, t)
        p = plan(model, calib, target=t, on_unreachable="extend", scores=signals, signals=(signal,), preset=cfg.preset,
                 options=PlanOptions(shapes=(shape,), disable_constraints=cfg.disable_constraints))
        return p.strategies[0]

    def trial(s: Strategy, verify: bool) -> Any:
        return tp_prune(model, s, example_inputs, calib=calib if s.signal != "magnitude" else None,
                        options=TPOptions(max_batches=max_batches, fold=cfg.fold, round_to=cfg.round_to,
                                          max_ratio=cfg.max_ratio, verify=verify))

    lo, hi = 0.0, 0.95
    best: tuple[float, Strategy, int] | None = None
    trials = 0
    for _ in range(cfg.bisect_steps):
        t = 0.5 * (lo + hi)
        trials += 1
        try:
            s = make(t)
        except BudgetError:
            hi = t
            continue
        res = trial(s, verify=False)
        got = macs0 - _per_input(res.report.macs_after, res.report.macs_before, macs0)
        if best is None or abs(got - removed_macs) < abs(best[2] - removed_macs):
            best = (t, s, got)
        if abs(got - removed_macs) <= cfg.macs_tolerance * removed_macs:
            break
        if got < removed_macs:
            lo = t
        else:
            hi = t
    if best is None or best[2] <= 0:
        return None
    t, s, _ = best
    res = trial(s, verify=True)
    macs, params = count_macs(res.model, example_inputs)
    res.model.eval()
    return WidthCandidate(res.model, s, t, macs, params, macs0 - macs, int(removed_macs), res.history,
                          dict(res.num_heads), trials)


def _per_input(macs_after: int, macs_before: int, macs0: int) -> int:
    """The adapter's MACs after pruning, rescaled to :func:`count_macs`'s per-input scale."""
    return round(macs_after * macs0 / max(macs_before, 1))


# ------------------------------------------------------------------------------------------ the loop
@dataclass
class DepthWidthResult:
    """The pruned model and what the loop did.

    Attributes:
        model: the final model (eval mode).
        log: one entry per iteration (candidates, their MACs, mismatch, CKA, validation accuracy, choice).
        ops: the architecture changes, in order (``depth``: block replaced by identity; ``width``: TP history).
        macs_original, params_original, macs, params: per input, before and after.
        stopped: why the loop ended (``target``, ``exhausted``, ``max_iterations``).
        start: validation metrics of the unpruned model.
        resumed_from: iterations found in the checkpoint when the run started (0 for a fresh run).
    """

    model: nn.Module
    log: list[dict[str, Any]]
    ops: list[dict[str, Any]]
    macs_original: int
    params_original: int
    macs: int
    params: int
    stopped: str
    start: dict[str, Any] = field(default_factory=dict)
    resumed_from: int = 0

    @property
    def macs_reduction(self) -> float:
        return 1.0 - self.macs / max(self.macs_original, 1)

    def summary(self) -> str:
        """One line per iteration, then the totals."""
        lines = [f"{'it':>3}  {'choice':<6} {'removed':<28} {'MACs red.':>9} {'mismatch':>8} {'CKA depth':>9} "
                 f"{'CKA width':>9} {'val acc':>7}"]
        for e in self.log:
            d, w = e.get("depth") or {}, e.get("width") or {}
            what = d.get("block", "") if e["choice"] == "depth" else w.get("strategy", "")
            lines.append(
                f"{e['iteration']:>3}  {e['choice']:<6} {what[:28]:<28} {e['macs_reduction']:>9.1%} "
                f"{_fmt(w.get('mismatch'), '+.1%'):>8} {_fmt(d.get('cka'), '.4f'):>9} {_fmt(w.get('cka'), '.4f'):>9} "
                f"{_fmt(e.get('val_accuracy'), '.4f'):>7}"
            )
        lines.append(
            f"MACs {self.macs_original:,} -> {self.macs:,} ({self.macs_reduction:.1%} removed); params "
            f"{self.params_original:,} -> {self.params:,}; stopped: {self.stopped}"
        )
        return "\n".join(lines)


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def model_hash(model: nn.Module) -> str:
    """SHA-256 (16 hex digits) of the names, shapes and values of the model's state dict."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes() if v.dtype != torch.bfloat16 else v.float().numpy().tobytes())
    return h.hexdigest()[:16]


def replay(model: nn.Module, ops: Sequence[Mapping[str, Any]], example_inputs: Any) -> nn.Module:
    """Apply checkpointed architecture changes to ``model`` (a fresh original), in place; return it.

    The weights are meaningless afterwards until the checkpoint's state dict is loaded.
    """
    for i, op in enumerate(ops):
        kind = op.get("kind")
        if kind == "depth":
            remove_blocks(model, [str(op["block"])], inplace=True)
        elif kind == "width":
            rebuild(model, op["history"], example_inputs, op.get("num_heads") or {})
        else:
            raise MixMatchError(f"checkpoint op {i} has unknown kind {kind!r}; the file is damaged or from a newer version")
    model.eval()
    return model


def _load_state(path: Path) -> dict[str, Any]:
    obj = safe_torch_load(path)
    if not isinstance(obj, Mapping) or obj.get("format") != FORMAT:
        raise MixMatchError(f"{path} is not a depth-and-width checkpoint ({FORMAT}); pass another path or delete it")
    return dict(obj)


def _check_resume(path: Path, state: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    for key in ("config", "meta", "input_shape", "model_hash"):
        got, want = state.get(key), expected[key]
        if got == want:
            continue
        if isinstance(got, Mapping) and isinstance(want, Mapping):
            diff = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
            what = f"{key} ({', '.join(diff[:4])})"
        else:
            what = "the model weights" if key == "model_hash" else key
        raise MixMatchError(
            f"resume file {path} was written by another configuration (differs in {what}); "
            "use another output path, or restart to overwrite it"
        )


def prune_depth_width(
    model: nn.Module,
    example_inputs: Any,
    calib: Iterable[Any],
    val_loader: Iterable[Any],
    *,
    config: DepthWidthConfig,
    train_loader: Iterable[Any] | None = None,
    state_path: str | Path | None = None,
    restart: bool = False,
    meta: Mapping[str, Any] | None = None,
    on_iteration: Callable[[nn.Module, dict[str, Any]], None] | None = None,
) -> DepthWidthResult:
    """Prune layers and channels together, keeping at each step the candidate closest to its parent by CKA.

    Args:
        model: the trained model; it is not changed (the loop works on a copy).
        example_inputs: inputs for tracing and MACs counting (MACs are reported per input).
        calib: labelled batches from the *training* split: block scores and gradient signals.
        val_loader: the *validation* split: CKA to the parent and the logged accuracy. Never pass test data.
        config: see :class:`DepthWidthConfig`.
        train_loader: training batches for the candidates' fine-tuning (needed when ``finetune_steps > 0``).
            A ``DataLoader``'s generator is reseeded every iteration.
        state_path: checkpoint file, written atomically after every iteration and resumed from when it exists.
        restart: ignore (and overwrite) an existing checkpoint.
        meta: JSON data describing how ``model`` and the loaders were made (model spec, data, seeds...);
            stored, and required to match on resume.
        on_iteration: called with the current model and each iteration's log entry after it is checkpointed
            (to report progress, or to measure something the loop does not, e.g. a test-set curve for a
            report); it must not change the model.

    Raises:
        MixMatchError: a setting out of range (the MACs target, the mode ...), a model without supported
            blocks in ``cka``/``depth`` mode, a checkpoint from another configuration.
    """
    config.validate()
    if config.finetune_steps and train_loader is None:
        raise MixMatchError("finetune_steps > 0 needs train_loader (training batches for the candidates' fine-tuning)")
    meta_json = json.loads(json.dumps(dict(meta or {})))
    work = copy.deepcopy(model).eval()
    probe = _probe(example_inputs)
    input_shape = list(probe.shape[1:]) if isinstance(probe, torch.Tensor) else []
    expected = {"model_hash": model_hash(model), "input_shape": input_shape, "config": config.keyed(), "meta": meta_json}
    path = Path(state_path) if state_path is not None else None

    log: list[dict[str, Any]] = []
    ops: list[dict[str, Any]] = []
    start: dict[str, Any] = {}
    macs0, params0 = count_macs(work, example_inputs)
    resumed = 0
    if path is not None and path.exists() and not restart:
        state = _load_state(path)
        _check_resume(path, state, expected)
        ops, log, start = list(state["ops"]), list(state["log"]), dict(state.get("start") or {})
        _load_weights(replay(work, ops, example_inputs), state, path)
        resumed = len(log)
        logger.info("resuming %s after iteration %d", path, resumed)
    if not start:
        m = evaluate(work, val_loader)
        start = {"val_accuracy": m.accuracy, "val_loss": m.loss, "macs": macs0, "params": params0}
    has_blocks = bool(find_blocks(work))
    if not has_blocks and config.mode != "width":
        removable_blocks(work)  # raises the one-line error naming the supported blocks
    run = _Run(example_inputs, calib, val_loader, train_loader, config, has_blocks)

    def save(stopped: str | None) -> None:
        if path is None:
            return
        atomic_torch_save(path, {
            "format": FORMAT, **expected, "ops": ops, "log": log, "start": start,
            "state_dict": {k: v.detach().cpu().clone() for k, v in work.state_dict().items()},
            "macs_original": macs0, "params_original": params0, "stopped": stopped,
        })

    stopped = ""
    last_step = next((e["step_macs"] for e in reversed(log) if e.get("depth")), None)
    while True:
        macs_now, _params_now = count_macs(work, example_inputs)
        if 1.0 - macs_now / macs0 >= config.target - 1e-12:
            stopped = "target"
            break
        if config.max_iterations is not None and len(log) >= config.max_iterations:
            stopped = "max_iterations"
            break
        it = len(log) + 1
        fallback = last_step if last_step is not None else round(config.width_step * macs0)
        entry = _iteration(run, work, it, macs_now, fallback, _scheduled(config, it, macs0, macs_now))
        if entry is None:
            stopped = "exhausted"
            break
        chosen, op, record = entry
        if record.get("depth"):
            last_step = record["step_macs"]
        work = chosen
        ops.append(op)
        macs_after, params_after = count_macs(work, example_inputs)
        record.update({"macs": macs_after, "params": params_after, "macs_reduction": 1.0 - macs_after / macs0})
        log.append(record)
        save(None)
        logger.info("iteration %d: kept the %s candidate (MACs %.1f%% removed)", it, record["choice"],
                    100 * record["macs_reduction"])
        if on_iteration is not None:
            on_iteration(work, record)
            work.eval()
    save(stopped)
    macs1, params1 = count_macs(work, example_inputs)
    return DepthWidthResult(work.eval(), log, ops, macs0, params0, macs1, params1, stopped, start, resumed)


@dataclass(frozen=True)
class _Run:
    """What stays fixed across the iterations of one :func:`prune_depth_width` run."""

    example_inputs: Any
    calib: Iterable[Any]
    val_loader: Iterable[Any]
    train_loader: Iterable[Any] | None
    cfg: DepthWidthConfig
    has_blocks: bool


def _iteration(
    run: _Run, work: nn.Module, it: int, macs_now: int, fallback_step: int, scheduled: int | None = None,
) -> tuple[nn.Module, dict[str, Any], dict[str, Any]] | None:
    """One iteration: candidates, fine-tuning, CKA, choice. None when nothing can be removed."""
    example_inputs, calib, val_loader, train_loader, cfg = run.example_inputs, run.calib, run.val_loader, run.train_loader, run.cfg
    t0 = time.perf_counter()
    record: dict[str, Any] = {"iteration": it, "parent_macs": macs_now, "depth": None, "width": None}
    # 1. depth candidate (also the MACs step of the width candidate)
    depth_model = None
    depth_info: dict[str, Any] | None = None
    if run.has_blocks and scheduled is None and (candidates := removable_blocks(work, example_inputs, min_blocks=cfg.min_blocks)):
        scores = score_blocks(work, calib, candidates, method=cfg.block_score, max_batches=cfg.score_batches)
        best = min(candidates, key=lambda b: scores[b.name])
        depth_model = remove_blocks(work, [best.name]).eval()
        dmacs, dparams = count_macs(depth_model, example_inputs)
        depth_info = {"block": best.name, "score": scores[best.name], "scores": scores, "macs": dmacs,
                      "params": dparams, "removed_macs": macs_now - dmacs}
    step = scheduled if scheduled is not None else depth_info["removed_macs"] if depth_info else fallback_step
    record["step_macs"] = int(step)
    if cfg.mode == "depth" and depth_model is None:
        return None
    # 2. width candidate with the same removed MACs
    width: WidthCandidate | None = None
    width_info: dict[str, Any] | None = None
    if cfg.mode != "depth" and step > 0 and (width := _best_width(work, step, example_inputs, calib, val_loader, cfg)) is not None:
        width_info = {"strategy": width.strategy.name, "sparsity": width.sparsity, "macs": width.macs,
                      "params": width.params, "removed_macs": width.removed, "wanted_macs": width.wanted,
                      "mismatch": width.mismatch, "bisect_trials": width.trials,
                      "out_of_range": len(width.strategy.meta.get("out_of_range", []))}
    if cfg.mode == "width":
        depth_model = None  # its MACs only set the step
        if depth_info is not None:
            depth_info = {"block": depth_info["block"], "removed_macs": depth_info["removed_macs"], "used": False}
    if depth_model is None and width is None:
        return None
    # 3. brief fine-tuning, same data order for both
    seed = cfg.seed * 1_000_003 + it
    for cand in (depth_model, width.model if width else None):
        if cfg.finetune_steps and cand is not None:
            assert train_loader is not None
            finetune_steps(cand, {}, train_loader, cfg.finetune_steps, lr=cfg.finetune_lr, seed=seed)
            cand.eval()
    # 4. CKA to the parent on validation, and the choice
    both = depth_model is not None and width is not None
    ref = collect_features(work, val_loader, max_batches=cfg.cka_batches) if both or cfg.mode == "cka" else None
    for info, cand in ((depth_info, depth_model), (width_info, width.model if width else None)):
        if info is None or cand is None:
            continue
        if ref is not None:
            info["cka"] = cka_to_parent(work, cand, val_loader, debiased=cfg.cka_debiased, max_batches=cfg.cka_batches,
                                        parent_features=ref)
        info["val_accuracy"] = evaluate(cand, val_loader).accuracy
    if depth_model is not None and (width is None or depth_info["cka"] >= width_info["cka"]):  # type: ignore[index]
        choice, chosen = "depth", depth_model
        op: dict[str, Any] = {"kind": "depth", "block": depth_info["block"]}  # type: ignore[index]
        tie = both and depth_info["cka"] == width_info["cka"]  # type: ignore[index]
        reason = ("equal CKA: a tie goes to depth" if tie else "higher CKA to the parent") if both else "no width candidate"
    else:
        assert width is not None and width_info is not None
        choice, chosen = "width", width.model
        op = {"kind": "width", "history": width.history, "num_heads": width.num_heads, "strategy": width.strategy.name,
              "sparsity": width.sparsity}
        reason = "higher CKA to the parent" if both else ("width-only mode" if cfg.mode == "width" else "no removable block left")
    record.update({"depth": depth_info, "width": width_info, "choice": choice, "reason": reason,
                   "val_accuracy": (depth_info if choice == "depth" else width_info)["val_accuracy"],  # type: ignore[index]
                   "removed_blocks": removed_blocks(chosen), "seconds": time.perf_counter() - t0})
    logger.info("iteration %d: depth %s CKA %s, width %s CKA %s -> %s", it, depth_info and depth_info.get("block"),
                depth_info and depth_info.get("cka"), width_info and width_info["strategy"], width_info and width_info.get("cka"),
                choice)
    return chosen, op, record


def _scheduled(cfg: DepthWidthConfig, it: int, macs0: int, macs_now: int) -> int | None:
    """The MACs step that reaches the schedule's point for iteration ``it`` (width mode), else None."""
    if cfg.mode != "width" or it > len(cfg.schedule):
        return None
    return max(1, round(cfg.schedule[it - 1] * macs0) - (macs0 - macs_now))


def _best_width(work: nn.Module, step: int, example_inputs: Any, calib: Iterable[Any], val_loader: Iterable[Any],
                cfg: DepthWidthConfig) -> WidthCandidate | None:
    """The MACs-matched width candidate; with several strategies, the one with the highest CKA (validation)."""
    strategies = cfg.strategies if cfg.allocation == "mm" else cfg.strategies[:1]
    signal_names = tuple(dict.fromkeys(parse_strategy(s)[0] for s in strategies))
    needs_calib = any(s != "magnitude" for s in signal_names)
    signals = (compute_signals(work, calib if needs_calib else None, signals=signal_names, max_batches=cfg.score_batches)
               if cfg.allocation == "mm" else None)
    found = [c for s in strategies
             if (c := width_candidate(work, step, example_inputs, calib=calib, strategy=s, signals=signals, config=cfg)) is not None]
    if len(found) <= 1:
        return found[0] if found else None
    ref = collect_features(work, val_loader, max_batches=cfg.cka_batches)
    scored = [(cka_to_parent(work, c.model, val_loader, debiased=cfg.cka_debiased, max_batches=cfg.cka_batches,
                             parent_features=ref), i) for i, c in enumerate(found)]
    return found[max(scored)[1]]


def load_depth_width(
    path: str | Path, model: nn.Module | None = None, *, example_inputs: Any = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a depth-and-width checkpoint; return ``(model, state without the weights)``.

    Args:
        model: a fresh copy of the *original* (unpruned) architecture; default: built from the
            checkpoint's ``meta["model"]`` spec (as ``mixmatch prune-dw`` records it).
        example_inputs: for re-tracing Torch-Pruning histories; default: zeros of the recorded input shape.
    """
    path = Path(path)
    state = _load_state(path)
    if model is None:
        spec = (state.get("meta") or {}).get("model") or {}
        if not spec.get("model"):
            raise MixMatchError(f"{path} does not record its model spec: pass the original model (model=...)")
        model = build_model(spec["model"], model_kwargs=spec.get("model_kwargs") or {})
    else:
        model = copy.deepcopy(model)
    if example_inputs is None:
        if not (shape := state.get("input_shape")):
            raise MixMatchError(f"{path} has no input shape: pass example_inputs")
        example_inputs = torch.zeros(1, *[int(v) for v in shape])
    _load_weights(replay(model.eval(), state["ops"], example_inputs), state, path)
    return model, {k: v for k, v in state.items() if k != "state_dict"}


def _load_weights(model: nn.Module, state: Mapping[str, Any], path: Path) -> None:
    try:
        model.load_state_dict(state["state_dict"], strict=True)
    except RuntimeError as exc:
        raise MixMatchError(f"the weights in {path} do not fit the rebuilt model ({str(exc).splitlines()[0][:160]})") from None
    model.eval()


__all__ = [
    "ALLOCATIONS", "FORMAT", "KINDS", "MODES", "DepthWidthConfig", "DepthWidthResult", "WidthCandidate", "count_macs",
    "load_depth_width", "model_hash", "parse_strategy", "prune_depth_width", "replay", "uniform_strategy",
    "width_candidate",
]
