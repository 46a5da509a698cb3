"""Optuna refinement around the rule strategies: resumable, multi-worker, seeded by the 30 rules.

The search space is the plan's own :class:`~mixmatch_plugin.strategies.StrategySpace`: one
interpolation ``alpha`` in ``[0, 1]`` per role group (``"alpha:<role>@<stage>"``, e.g.
``alpha:attn_qkv@1``) plus the signal as a categorical (``"signal"``). Every rule strategy of the
plan is a point of that space (its ``meta["alphas"]`` and signal), so the rules are enqueued first,
named in ``user_attrs["mixmatch_seed"]``, and the samplers refine around them::

    import mixmatch_plugin as mm
    from mixmatch_plugin.adapters import optuna as mmo

    p = mm.plan(model, calib)                                   # 30 rule strategies, native sparsity
    ev = mmo.ProxyEvaluator(model, val_loader, signals=p.signals)
    res = mmo.search(p, ev, storage="sqlite:///out/search.db", study_name="resnet", n_trials=70)
    res.best                                                    # the feasible Pareto front
    mmo.export(res, "out/plan.json")                            # searched points as plan strategies
    mmo.plot_pareto(res, "out/pareto.png")

**Objectives.** ``objective="multi"`` (default): validation accuracy up and global sparsity (or the
sparse-MACs reduction, ``metric="macs"``) up; the result is the Pareto front. ``objective="single"``:
accuracy up, with the budget ``metric >= target`` as a constraint through
:meth:`optuna.trial.Trial.set_constraint` (never the deprecated ``constraints_func``). For a
single-objective search at a sparsity target, make the plan budget-matched at that target
(``mm.plan(..., target=S)``): every point then prunes exactly ``round(S * N)`` weights and the
comparison with the rules is at equal sparsity.

**Samplers.** ``nsga2`` (multi-objective default; its population defaults to the number of seeds, so
generation 0 is exactly the rules), ``tpe`` (single-objective default; multivariate, constant liar)
and ``gp``; or any :class:`optuna.samplers.BaseSampler`.

**Evaluation** is any callable ``strategy -> {"accuracy": ..., ...}`` (:class:`Evaluator`):
:class:`ProxyEvaluator` (masked validation accuracy and loss, optional BatchNorm re-estimation on
training batches), :class:`FinetuneEvaluator` (a short fine-tune that keeps the masks, then
validation), :class:`CallbackEvaluator` (a user function). Only the loaders you pass are read: pass
the *validation* split, never the test split.

**Storage, resume, workers.** ``storage`` is an Optuna RDB URL (``sqlite:///x.db``,
``postgresql+psycopg2://user@host/db``, ``mysql+pymysql://...``), a journal file
(``journal:PATH`` or a path ending in ``.log``/``.journal``/``.jsonl``), a ``.db``/``.sqlite`` path
(SQLite), an Optuna storage object, or None (in memory). RDB storages record a heartbeat: a trial
whose worker died (SIGKILL, lost machine) is failed once its heartbeat is ``grace_period`` old and
re-queued by :class:`optuna.storages.RetryHeartbeatStaleTrialCallback` (up to ``max_retry`` times).
Journal files have no heartbeat: a RUNNING trial whose worker process (same host name) no longer
exists is failed and re-queued the same way at the start of every run and after every trial.
Opening the storage, creating or loading the study and seeding run under one storage-wide lock
(PostgreSQL advisory lock, MySQL ``GET_LOCK``, or an ``flock`` beside a SQLite/journal file), and
seeding skips seeds whose name the study already holds, so re-runs and concurrent workers enqueue
every rule exactly once (and never race to create the tables of a fresh database).

**MACs.** :class:`MacsProfile` measures each weight layer's dense MACs once with forward hooks
(output positions x weight elements, i.e. output spatial size x kernel MACs) and estimates a
strategy's unstructured *sparse-MACs count* as ``sum_l (1 - ratio_l) * MACs_l``. Only the MACs of
weight layers (convolutions, linear layers) are counted: attention score products, normalization and
element-wise operations are not.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import re
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from mixmatch_plugin.batches import LossFn
from mixmatch_plugin.errors import MixMatchError
from mixmatch_plugin.evaluate import evaluate, reestimate_bn
from mixmatch_plugin.finetune import finetune
from mixmatch_plugin.inventory import Layer, inventory
from mixmatch_plugin.masks import Masker
from mixmatch_plugin.plan import Plan, load_plan
from mixmatch_plugin.progress import progress_bar
from mixmatch_plugin.signals import SIGNALS, Signals
from mixmatch_plugin.strategies import SHAPES, Strategy, StrategySpace

try:
    import optuna
    from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
    from optuna.trial import FrozenTrial, TrialState
except ImportError as _exc:  # pragma: no cover - depends on the environment
    raise MixMatchError(
        f"the Optuna adapter needs optuna ({_exc}); install it with: pip install 'mixmatch-plugin[optuna]'"
    ) from None

logger = logging.getLogger(__name__)

__all__ = [
    "ALPHA_PREFIX", "RESULT_ATTR", "SEED_ATTR", "SIGNAL_PARAM", "WORKER_ATTR", "CallbackEvaluator", "Evaluator",
    "FinetuneEvaluator", "MacsProfile", "ProxyEvaluator", "SearchResult", "TrialRecord", "export", "make_sampler",
    "open_storage", "param_importances", "params_of", "plan_fingerprint", "plot_history", "plot_importances",
    "plot_pareto", "recover_orphans", "result_of", "rule_seeds", "search", "search_space", "seed_study",
    "storage_lock", "strategy_of",
]

SIGNAL_PARAM = "signal"
ALPHA_PREFIX = "alpha:"
SEED_ATTR = "mixmatch_seed"
WORKER_ATTR = "mixmatch_worker"
RESULT_ATTR = "mixmatch_result"
_STUDY_ATTR = "mixmatch"
OBJECTIVES = ("multi", "single")
METRICS = ("sparsity", "macs")
SAMPLERS = ("nsga2", "tpe", "gp")
SCORES = ("accuracy", "loss")
_JOURNAL_SUFFIXES = (".log", ".journal", ".jsonl")
_SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")


# ============================================================================ evaluators
@runtime_checkable
class Evaluator(Protocol):
    """Scores one strategy: returns metrics with at least ``"accuracy"`` (a fraction) and ideally ``"loss"``.

    Implementations must read only training and validation data. Extra metrics are stored in the
    trial's ``user_attrs["metrics"]``.
    """

    def __call__(self, strategy: Strategy) -> Mapping[str, float]: ...


class _MaskingEvaluator:
    """Shared state of the built-in evaluators: the core's :class:`~mixmatch_plugin.masks.Masker`."""

    deterministic = True

    def __init__(self, model: nn.Module, signals: Signals | None) -> None:
        self.masker = Masker(model, signals)
        self.layers, self.signals, self.work = self.masker.layers, self.masker.signals, self.masker.work

    def _masked(self, strategy: Strategy) -> dict[str, torch.Tensor]:
        return self.masker(strategy)[1]


class ProxyEvaluator(_MaskingEvaluator):
    """The cheap proxy of the core: prune a working copy, optionally re-estimate BatchNorm, evaluate on validation.

    Args:
        model: the trained model (copied; never changed).
        val_loader: the *validation* loader.
        signals: per-weight scores (``plan.signals`` or :func:`~mixmatch_plugin.compute_signals`);
            magnitude only when omitted.
        bn_loader, bn_batches: re-estimate BatchNorm statistics on that many *training* batches after
            masking (EagleEye's adaptive BN); ``bn_batches=0`` switches it off.
        loss_fn, max_batches: see :func:`~mixmatch_plugin.evaluate`.
    """

    name = "proxy"

    def __init__(
        self,
        model: nn.Module,
        val_loader: Iterable[Any],
        *,
        signals: Signals | None = None,
        bn_loader: Iterable[Any] | None = None,
        bn_batches: int = 0,
        loss_fn: LossFn | None = None,
        max_batches: int | None = None,
    ) -> None:
        if bn_batches < 0:
            raise MixMatchError(f"bn_batches must be 0 or more, got {bn_batches}")
        if bn_batches and bn_loader is None:
            raise MixMatchError("BatchNorm re-estimation needs bn_loader=<training loader> (never validation or test)")
        super().__init__(model, signals)
        self.val_loader = val_loader
        self.bn_loader = bn_loader
        self.bn_batches = bn_batches
        self.loss_fn = loss_fn
        self.max_batches = max_batches

    def __call__(self, strategy: Strategy) -> dict[str, float]:
        self._masked(strategy)
        if self.bn_batches and self.bn_loader is not None:
            reestimate_bn(self.work, self.bn_loader, self.bn_batches)
        m = evaluate(self.work, self.val_loader, loss_fn=self.loss_fn, max_batches=self.max_batches)
        return {"accuracy": m.accuracy, "loss": m.loss}


class FinetuneEvaluator(_MaskingEvaluator):
    """A short fine-tune that keeps the masks (:func:`~mixmatch_plugin.finetune`), then validation.

    Each call restarts from the original weights with the same seed, and re-seeds the training
    loader's generator when it has one, so a strategy always gets the same score.

    Args:
        model: the trained model (copied; never changed).
        train_loader: *training* batches for the fine-tune.
        val_loader: the *validation* loader for the score.
        signals: per-weight scores, as for :class:`ProxyEvaluator`.
        steps: optimizer steps per evaluation.
        lr, optimizer, loss_fn: see :func:`~mixmatch_plugin.finetune`.
        max_batches: validation batches to score on (default: all).
        seed: torch seed set before every fine-tune.
    """

    name = "finetune"

    def __init__(
        self,
        model: nn.Module,
        train_loader: Iterable[Any],
        val_loader: Iterable[Any],
        *,
        signals: Signals | None = None,
        steps: int = 100,
        lr: float = 1e-4,
        optimizer: str = "adam",
        loss_fn: LossFn | None = None,
        max_batches: int | None = None,
        seed: int = 0,
    ) -> None:
        if steps < 1:
            raise MixMatchError(f"fine-tune steps must be at least 1, got {steps}")
        super().__init__(model, signals)
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.steps = steps
        self.lr = lr
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.max_batches = max_batches
        self.seed = seed

    def __call__(self, strategy: Strategy) -> dict[str, float]:
        masks = self._masked(strategy)
        torch.manual_seed(self.seed)
        gen = getattr(self.train_loader, "generator", None)
        if isinstance(gen, torch.Generator):
            gen.manual_seed(self.seed)
        try:
            per_epoch = len(self.train_loader) if isinstance(self.train_loader, Sized) else self.steps
        except TypeError:  # a DataLoader over an IterableDataset has __len__ but no length
            per_epoch = self.steps
        epochs = max(1, math.ceil(self.steps / max(per_epoch, 1)))
        res = finetune(
            self.work, masks, self.train_loader, epochs=epochs, max_steps=self.steps, lr=self.lr,
            optimizer=self.optimizer, loss_fn=self.loss_fn,
        )
        m = evaluate(self.work, self.val_loader, loss_fn=self.loss_fn, max_batches=self.max_batches)
        return {"accuracy": m.accuracy, "loss": m.loss, "realized_sparsity": res.global_sparsity, "steps": float(res.steps)}


class CallbackEvaluator:
    """Wraps a user function ``fn(strategy)`` returning the accuracy (a float) or a metrics mapping."""

    name = "callback"

    def __init__(self, fn: Callable[[Strategy], float | Mapping[str, float]], *, deterministic: bool = False) -> None:
        if not callable(fn):
            raise MixMatchError(f"the evaluation callback must be callable, got {type(fn).__name__}")
        self.fn = fn
        self.deterministic = deterministic

    def __call__(self, strategy: Strategy) -> dict[str, float]:
        out = self.fn(strategy)
        if isinstance(out, Mapping):
            return {str(k): float(v) for k, v in out.items()}
        return {"accuracy": float(out)}


# ================================================================================== MACs
@dataclass(frozen=True)
class MacsProfile:
    """Dense multiply-accumulates per inventory layer for one input sample, measured once with forward hooks.

    ``layer_macs[name]`` = output positions x weight elements (for a convolution: output spatial size x
    kernel MACs x output channels; for a linear layer: tokens x in x out). Normalization and embedding
    layers count 0. A strategy's *sparse-MACs count* is ``sum_l (1 - ratio_l) * layer_macs[l]``, the
    MACs left when every pruned weight's multiplications are skipped (unstructured sparsity).
    """

    layer_macs: dict[str, float]

    @classmethod
    def measure(
        cls, model: nn.Module, input_shape: Sequence[int] | None = None, *, example: torch.Tensor | None = None,
        layers: Sequence[Layer] | None = None,
    ) -> MacsProfile:
        """Run one forward pass of ``example`` (or zeros of ``(1, *input_shape)``) and record every layer's MACs."""
        if example is None:
            if input_shape is None:
                raise MixMatchError("measuring MACs needs input_shape=(C, H, W) or an example input")
            example = torch.zeros(1, *(int(v) for v in input_shape))
        layers = list(layers) if layers is not None else inventory(model)
        macs: dict[str, float] = {layer.name: 0.0 for layer in layers}
        hooks = []

        def hook_for(name: str) -> Callable[..., None]:
            def hook(module: nn.Module, _inp: Any, out: Any) -> None:
                w = getattr(module, "weight", None)
                out_t = out[0] if isinstance(out, (tuple, list)) else out
                if not isinstance(w, torch.Tensor) or w.dim() < 2 or not isinstance(out_t, torch.Tensor):
                    return
                if isinstance(module, nn.Embedding):
                    return
                positions = out_t.numel() / max(int(example.shape[0]), 1) / int(w.shape[0])
                macs[name] += positions * w.numel()

            return hook

        for layer in layers:
            for mod_name in (layer.name, *layer.aliases):
                hooks.append(model.get_submodule(mod_name).register_forward_hook(hook_for(layer.name)))
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                p = next(model.parameters(), None)
                model(example.to(p.device if p is not None else "cpu"))
        except RuntimeError as exc:
            raise MixMatchError(
                f"measuring MACs failed on an input of shape {tuple(example.shape)} ({str(exc).strip().splitlines()[0][:160]}); "
                "check the input shape"
            ) from None
        finally:
            for h in hooks:
                h.remove()
            model.train(was)
        unused = [layer.name for layer in layers if macs[layer.name] == 0 and layer.kind in ("conv", "linear")]
        if unused:
            logger.info("%d weight layer(s) did not run in the MACs pass (%s): counted as 0 MACs", len(unused), ", ".join(unused[:4]))
        return cls(macs)

    @property
    def dense(self) -> float:
        """Total dense MACs of the weight layers, per sample."""
        return float(sum(self.layer_macs.values()))

    def sparse(self, strategy: Strategy) -> float:
        """The strategy's sparse-MACs count per sample: ``sum_l (1 - ratio_l) * MACs_l``."""
        return float(sum((1.0 - strategy.ratios.get(n, 0.0)) * m for n, m in self.layer_macs.items()))

    def reduction(self, strategy: Strategy) -> float:
        """Fraction of the dense weight-layer MACs that the strategy's zeros remove, in [0, 1)."""
        dense = self.dense
        return 0.0 if dense <= 0 else 1.0 - self.sparse(strategy) / dense


# ============================================================================ the space
def search_space(space: StrategySpace, signals: Sequence[str]) -> dict[str, optuna.distributions.BaseDistribution]:
    """Optuna distributions of a strategy space: ``signal`` (categorical) and one ``alpha:<group>`` in [0, 1] per group."""
    dists: dict[str, optuna.distributions.BaseDistribution] = {
        SIGNAL_PARAM: optuna.distributions.CategoricalDistribution(list(signals))
    }
    for g in space.groups:
        dists[ALPHA_PREFIX + g] = optuna.distributions.FloatDistribution(0.0, 1.0)
    return dists


def params_of(strategy: Strategy) -> dict[str, Any]:
    """The search-space point of a strategy built from alphas (every rule strategy is one)."""
    alphas = strategy.meta.get("alphas")
    if not isinstance(alphas, Mapping):
        raise MixMatchError(f"strategy {strategy.name!r} has no per-group alphas (meta['alphas']): it is not a point of the space")
    return {SIGNAL_PARAM: strategy.signal, **{ALPHA_PREFIX + g: float(a) for g, a in alphas.items()}}


def strategy_of(space: StrategySpace, params: Mapping[str, Any], name: str, meta: Mapping[str, Any] | None = None) -> Strategy:
    """Rebuild the strategy of a search-space point (``params`` as Optuna stores them)."""
    alphas = {k[len(ALPHA_PREFIX):]: float(v) for k, v in params.items() if k.startswith(ALPHA_PREFIX)}
    return space.strategy(name, str(params[SIGNAL_PARAM]), alphas, meta)


def rule_seeds(plan: Plan, signals: Sequence[str] | None = None) -> list[Strategy]:
    """The plan's rule strategies (``meta["shape"]`` one of the ten shapes) for ``signals``, checked to be
    reproduced *exactly* by the plan's space (else the plan was made by another version: regenerate it)."""
    space = plan.space()
    keep = set(signals) if signals is not None else None
    out = []
    for s in plan.strategies:
        if s.meta.get("shape") not in SHAPES or not isinstance(s.meta.get("alphas"), Mapping):
            continue
        if keep is not None and s.signal not in keep:
            continue
        again = strategy_of(space, params_of(s), s.name)
        if again.ratios != s.ratios:
            worst = max(s.ratios, key=lambda k: abs(s.ratios[k] - again.ratios[k]))
            raise MixMatchError(
                f"rule strategy {s.name!r} is not reproduced by the plan's search space (layer {worst!r}: "
                f"{s.ratios[worst]} vs {again.ratios[worst]}); regenerate the plan with this version (`mixmatch plan`)"
            )
        out.append(s)
    return out


def plan_fingerprint(plan: Plan) -> str:
    """A short hash of what defines the search space: layers, sizes, ranges, bounds, target."""
    obj = {
        "layers": [[layer.name, layer.params, layer.role, layer.stage] for layer in plan.layers],
        "ranges": {k: list(v) for k, v in sorted(plan.ranges.items())},
        "bounds": {k: list(v) for k, v in sorted(plan.bounds.items())},
        "target": plan.meta.get("target"),
        "extend": bool(plan.meta.get("extend_ranges")),
    }
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


# ============================================================================== storage
@dataclass(frozen=True)
class _StorageSpec:
    kind: str  # "memory", "rdb", "journal", "object"
    url: str | None = None
    path: Path | None = None

    @property
    def display(self) -> str:
        if self.kind == "rdb" and self.url:
            from sqlalchemy.engine import make_url

            return make_url(self.url).render_as_string(hide_password=True)
        if self.kind == "journal":
            return f"journal:{self.path}"
        return self.kind


def _parse_storage(storage: str | os.PathLike[str] | None) -> _StorageSpec:
    if storage is None:
        return _StorageSpec("memory")
    text = os.fspath(storage).strip()
    if not text:
        raise MixMatchError("empty storage: pass an Optuna RDB URL (sqlite:///search.db, postgresql+psycopg2://...) or a journal file")
    if text.startswith("journal:"):
        rest = text[len("journal:"):]
        rest = rest[2:] if rest.startswith("//") else rest
        if not rest:
            raise MixMatchError(f"storage {text!r}: journal storage needs a file, e.g. journal:out/search.log")
        return _StorageSpec("journal", path=Path(rest).expanduser().absolute())
    if "://" in text:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError, NoSuchModuleError

        try:
            url = make_url(text)
            url.get_dialect()
        except ArgumentError:
            raise MixMatchError(
                f"bad storage URL {text!r}: expected an RDB URL such as sqlite:///search.db or "
                "postgresql+psycopg2://user@host:5432/db, or a journal file (journal:PATH)"
            ) from None
        except NoSuchModuleError:
            raise MixMatchError(
                f"bad storage URL {text!r}: unknown database {url.drivername!r}; use sqlite, postgresql or mysql "
                "(or a journal file: journal:PATH)"
            ) from None
        except ImportError as exc:
            raise MixMatchError(f"storage URL {text!r} needs a database driver that is not installed ({exc})") from None
        if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
            Path(url.database).expanduser().absolute().parent.mkdir(parents=True, exist_ok=True)
        return _StorageSpec("rdb", url=text)
    p = Path(text).expanduser()
    if p.suffix in _JOURNAL_SUFFIXES:
        return _StorageSpec("journal", path=p.absolute())
    if p.suffix in _SQLITE_SUFFIXES:
        p.absolute().parent.mkdir(parents=True, exist_ok=True)
        return _StorageSpec("rdb", url=f"sqlite:///{p.absolute()}")
    raise MixMatchError(
        f"bad storage {text!r}: pass an RDB URL (sqlite:///search.db, postgresql+psycopg2://user@host/db), "
        "a journal file (journal:PATH or *.log), or a *.db SQLite file"
    )


def open_storage(
    storage: str | os.PathLike[str] | optuna.storages.BaseStorage | None,
    *,
    heartbeat_interval: int | None = 10,
    grace_period: int | None = None,
    max_retry: int | None = 3,
) -> optuna.storages.BaseStorage:
    """Open ``storage`` (see the module docstring) as an Optuna storage.

    RDB storages get ``heartbeat_interval`` (seconds; None switches the heartbeat off), ``grace_period``
    (default ``2 * heartbeat_interval``) and a :class:`~optuna.storages.RetryHeartbeatStaleTrialCallback`
    with ``max_retry``. Connection problems become one-line :class:`MixMatchError`.
    """
    if isinstance(storage, optuna.storages.BaseStorage):
        return storage
    spec = _parse_storage(storage)
    with storage_lock(spec):  # two workers creating the tables of a fresh database at once collide
        return _open(spec, heartbeat_interval, grace_period, max_retry)


def _open(spec: _StorageSpec, heartbeat_interval: int | None, grace_period: int | None, max_retry: int | None) -> optuna.storages.BaseStorage:
    if heartbeat_interval is not None and heartbeat_interval < 1:
        raise MixMatchError(f"heartbeat_interval must be a positive number of seconds (or None), got {heartbeat_interval}")
    if grace_period is not None and grace_period < 1:
        raise MixMatchError(f"grace_period must be a positive number of seconds (or None), got {grace_period}")
    if max_retry is not None and max_retry < 0:
        raise MixMatchError(f"max_retry must be 0 or more (or None for unlimited), got {max_retry}")
    if spec.kind == "memory":
        return optuna.storages.InMemoryStorage()
    if spec.kind == "journal":
        assert spec.path is not None
        spec.path.parent.mkdir(parents=True, exist_ok=True)
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(str(spec.path)))
    assert spec.url is not None
    from sqlalchemy.exc import SQLAlchemyError

    kwargs: dict[str, Any] = {}
    if spec.url.startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    if heartbeat_interval is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            kwargs.update(
                heartbeat_interval=int(heartbeat_interval),
                grace_period=int(grace_period) if grace_period is not None else None,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry),
            )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            return optuna.storages.RDBStorage(spec.url, **kwargs)
    except ImportError as exc:
        raise MixMatchError(f"storage {spec.display} needs a database driver that is not installed ({exc})") from None
    except SQLAlchemyError as exc:
        first = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0][:200]
        raise MixMatchError(f"cannot open storage {spec.display} ({first}); check the URL and that the server is running") from None


def _heartbeat_on(storage: optuna.storages.BaseStorage) -> bool:
    from optuna.storages._heartbeat import is_heartbeat_enabled

    return is_heartbeat_enabled(storage)


# ================================================================================= locks
_LOCAL_LOCKS: dict[str, threading.Lock] = {}
_LOCAL_LOCKS_GUARD = threading.Lock()


_PG_LOCK_KEY = int.from_bytes(hashlib.sha256(b"mixmatch-plugin:storage").digest()[:8], "big", signed=True)


@contextlib.contextmanager
def _local_lock(key: str) -> Iterator[None]:
    with _LOCAL_LOCKS_GUARD:
        lock = _LOCAL_LOCKS.setdefault(key, threading.Lock())
    with lock:
        yield


@contextlib.contextmanager
def _file_lock(path: Path, key: str) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (released by the kernel if the process dies), plus a thread lock."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        logger.warning("no fcntl on this platform: seeding of %s is serialized within this process only", path)
        with _local_lock(key):
            yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with _local_lock(key), open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def storage_lock(spec: _StorageSpec) -> Iterator[None]:
    """A lock shared by every worker of a storage, held while it opens the storage, the study, and seeds.

    PostgreSQL: a session advisory lock; MySQL: ``GET_LOCK``; SQLite and journal files: an ``flock`` on
    ``<file>.mixmatch-lock``. The database or the kernel releases each of them when the holder dies,
    so a killed worker never leaves the lock held. Not re-entrant.
    """
    key = spec.display
    if spec.kind == "journal":
        assert spec.path is not None
        with _file_lock(spec.path.with_name(spec.path.name + ".mixmatch-lock"), key):
            yield
        return
    if spec.kind != "rdb":
        with _local_lock(key):
            yield
        return
    assert spec.url is not None
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError
    from sqlalchemy.pool import NullPool

    url = make_url(spec.url)
    backend = url.get_backend_name()
    if backend == "sqlite":
        db = url.database
        if not db or db == ":memory:":
            with _local_lock(key):
                yield
            return
        p = Path(db).expanduser().absolute()
        with _file_lock(p.with_name(p.name + ".mixmatch-lock"), key):
            yield
        return
    if backend not in ("postgresql", "mysql", "mariadb"):
        logger.warning("no cross-process lock for %s storages: concurrent first runs may enqueue a seed twice", backend)
        with _local_lock(key):
            yield
        return
    engine = create_engine(spec.url, poolclass=NullPool)
    try:
        with _local_lock(key):
            try:
                conn = engine.connect()
            except SQLAlchemyError as exc:
                first = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0][:200]
                raise MixMatchError(f"cannot open storage {spec.display} ({first}); check the URL and that the server is running") from None
            with conn:
                if backend == "postgresql":
                    conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _PG_LOCK_KEY})
                    conn.commit()
                    try:
                        yield
                    finally:
                        conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_LOCK_KEY})
                        conn.commit()
                else:
                    conn.execute(text("SELECT GET_LOCK('mixmatch-plugin:storage', 600)"))
                    try:
                        yield
                    finally:
                        conn.execute(text("SELECT RELEASE_LOCK('mixmatch-plugin:storage')"))
    finally:
        engine.dispose()


# ======================================================================== orphan trials
def _proc_start(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            stat = fh.read()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    return fields[19] if len(fields) > 19 else None


def _worker_token() -> dict[str, Any]:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": _proc_start(pid)}


def _worker_alive(token: Mapping[str, Any]) -> bool | None:
    """False when the worker process is known dead (same host), True when alive, None when unknown (other host)."""
    if token.get("host") != socket.gethostname():
        return None
    pid = token.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    start = token.get("start")
    return start is None or _proc_start(pid) in (None, start)


def recover_orphans(study: optuna.Study, max_retry: int | None = 3) -> list[int]:
    """Fail the RUNNING trials whose worker process on this host no longer exists, and re-queue them.

    For storages without a heartbeat (journal files). Re-queuing goes through
    :class:`~optuna.storages.RetryHeartbeatStaleTrialCallback`, exactly as the RDB heartbeat does, so
    the retry records ``system_attrs["failed_trial"]`` and honours ``max_retry``. Returns the failed
    trial numbers. Workers on other hosts are never touched.
    """
    storage = study._storage
    failed = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        token = t.user_attrs.get(WORKER_ATTR)
        if not isinstance(token, Mapping) or _worker_alive(token) is not False:
            continue
        try:
            won = storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
        except UpdateFinishedTrialError:
            continue
        if not won:
            continue
        logger.warning("trial %d was left RUNNING by a dead worker (pid %s): failed and re-queued", t.number, token.get("pid"))
        retry(study, copy.deepcopy(storage.get_trial(t._trial_id)))
        failed.append(t.number)
    return failed


class _NoInterruptTraceback(logging.Filter):
    """Optuna logs a trial cut short by Ctrl-C as a failure, with its traceback, then its value (None);
    both records are dropped: the trial is re-queued (:func:`_requeue_interrupted`), not failed."""

    def __init__(self) -> None:
        super().__init__()
        self.dropped: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        msg = record.getMessage()
        if isinstance(exc, KeyboardInterrupt):
            self.dropped.add(msg.split(" failed", 1)[0])  # "Trial 7"
            return False
        return not any(msg.startswith(f"{t} failed with value") for t in self.dropped)


def _requeue_interrupted(study: optuna.Study, trial: optuna.Trial, max_retry: int | None) -> None:
    """Re-queue a trial that Ctrl-C (or SIGTERM) cut short, as a killed worker's trial is: the rerun evaluates it.

    Optuna marks such a trial failed; without this, an interrupted rule seed would never be evaluated
    (a seed counts as present in any state).
    """
    frozen = study._storage.get_trial(trial._trial_id)
    if frozen.state != TrialState.FAIL:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)(study, copy.deepcopy(frozen))
    logger.info("trial %d was interrupted: re-queued for the next run", frozen.number)


def _fail_stale(study: optuna.Study) -> None:
    if _heartbeat_on(study._storage):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)


# ================================================================================ seeding
def seed_study(study: optuna.Study, seeds: Sequence[Strategy]) -> int:
    """Enqueue the seed strategies the study does not hold yet (by name, in ``user_attrs``); returns how many.

    Call it under :func:`storage_lock` when several workers may seed at once (:func:`search` does).
    A seed counts as present in any state (waiting, running, done, failed, or re-queued).
    """
    have = {t.user_attrs.get(SEED_ATTR) for t in study.get_trials(deepcopy=False)}
    added = 0
    for s in seeds:
        if s.name in have:
            continue
        study.enqueue_trial(params_of(s), user_attrs={SEED_ATTR: s.name})
        added += 1
    return added


def quiet() -> None:
    """Silence Optuna's per-trial INFO lines (the CLI does this unless ``-v``)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)


# ============================================================================== samplers
def make_sampler(
    name: str | optuna.samplers.BaseSampler | None, objective: str, *, seed: int | None = None,
    population_size: int | None = None, n_seeds: int = 0, deterministic: bool = False,
) -> optuna.samplers.BaseSampler:
    """``nsga2`` (multi-objective default), ``tpe`` (single-objective default) or ``gp``, or a sampler object."""
    if isinstance(name, optuna.samplers.BaseSampler):
        return name
    if name is None:
        name = "nsga2" if objective == "multi" else "tpe"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        if name == "nsga2":
            pop = population_size if population_size is not None else max(n_seeds, 10)
            if pop < 2:
                raise MixMatchError(f"population_size must be at least 2, got {pop}")
            return optuna.samplers.NSGAIISampler(seed=seed, population_size=pop)
        if name == "tpe":
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)
        if name == "gp":
            return optuna.samplers.GPSampler(seed=seed, deterministic_objective=deterministic)
    raise MixMatchError(f"unknown sampler {name!r}; choose {', '.join(SAMPLERS)}")


# ================================================================================ results
@dataclass
class TrialRecord:
    """One finished trial: its strategy and what it scored.

    Attributes:
        number: the Optuna trial number.
        strategy: the strategy (named after the seed for rule strategies, ``<signal>:search-<study>-t<n>`` otherwise).
        accuracy: validation accuracy (the score; loss when ``score="loss"``).
        x: the second axis, global sparsity or the sparse-MACs reduction.
        seed: the rule strategy's name for seed trials, else None.
        feasible: every constraint <= 0.
        seconds: evaluation wall time.
        metrics: everything the evaluator returned.
    """

    number: int
    strategy: Strategy
    accuracy: float
    x: float
    seed: str | None
    feasible: bool
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)
    retry_of: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "trial": self.number, "strategy": self.strategy.name, "signal": self.strategy.signal,
            "accuracy": self.accuracy, "x": self.x, "global_sparsity": self.strategy.global_sparsity,
            "seed": self.seed, "feasible": self.feasible, "seconds": self.seconds, "metrics": self.metrics,
            "retry_of": self.retry_of,
        }


@dataclass
class SearchResult:
    """What :func:`search` returns.

    Attributes:
        study: the Optuna study (still attached to its storage).
        plan: the plan searched.
        trials: every COMPLETE trial, in trial order.
        best: the feasible Pareto front (multi-objective, by ascending ``x``) or the best feasible
            trial (single-objective); empty when no trial is feasible.
        best_rule: the best feasible seed under the same criterion (for single-objective: highest
            score; for multi-objective: highest score among seeds).
    """

    study: optuna.Study
    plan: Plan
    objective: str
    metric: str
    score: str
    target: float | None
    trials: list[TrialRecord]
    best: list[TrialRecord]
    best_rule: TrialRecord | None
    storage: str
    evaluator: str = "evaluator"

    @property
    def x_label(self) -> str:
        return "global sparsity" if self.metric == "sparsity" else "MACs removed (sparse-MACs count)"

    @property
    def seconds_per_trial(self) -> float:
        """Mean evaluation wall time of the completed trials (seconds)."""
        return float(np.mean([t.seconds for t in self.trials])) if self.trials else float("nan")

    @property
    def wall_per_trial(self) -> float:
        """Mean wall time from trial start to completion, storage and sampler included (seconds)."""
        spans = [
            (t.datetime_complete - t.datetime_start).total_seconds()
            for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.datetime_start and t.datetime_complete
        ]
        return float(np.mean(spans)) if spans else float("nan")

    def states(self) -> dict[str, int]:
        """Number of trials per state (COMPLETE, FAIL, RUNNING, WAITING ...)."""
        out: dict[str, int] = {}
        for t in self.study.get_trials(deepcopy=False):
            out[t.state.name] = out.get(t.state.name, 0) + 1
        return out


def _better(score: str) -> Callable[[TrialRecord], tuple[float, float]]:
    sign = 1.0 if score == "accuracy" else -1.0
    return lambda r: (sign * r.accuracy, r.x)


def _records(study: optuna.Study, space: StrategySpace, info: Mapping[str, Any], study_name: str) -> list[TrialRecord]:
    out = []
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", study_name).strip("-") or "study"
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        seed = t.user_attrs.get(SEED_ATTR)
        name = seed if isinstance(seed, str) else f"{t.params[SIGNAL_PARAM]}:search-{slug}-t{t.number}"
        metrics = dict(t.user_attrs.get("metrics") or {})
        meta: dict[str, Any] = {"source": "optuna", "study": study_name, "trial": t.number}
        if isinstance(seed, str):
            meta["seed"] = seed
        s = strategy_of(space, t.params, name, meta)
        values = list(t.values or [])
        acc = float(metrics.get(info["score"], values[0] if values else float("nan")))
        res = t.user_attrs.get(RESULT_ATTR) or {}
        x = float(res.get("x", s.global_sparsity))
        feasible = all(v <= 0.0 for v in t.constraints.values())
        out.append(TrialRecord(
            t.number, s, acc, x, seed if isinstance(seed, str) else None, feasible,
            float(res.get("seconds", float("nan"))), metrics, t.system_attrs.get("failed_trial"),
        ))
    return out


def _pareto(records: Sequence[TrialRecord], score: str) -> list[TrialRecord]:
    sign = 1.0 if score == "accuracy" else -1.0
    pts = [r for r in records if r.feasible]
    front = []
    for r in pts:
        a, x = sign * r.accuracy, r.x
        dominated = any(
            (sign * o.accuracy >= a and o.x >= x) and (sign * o.accuracy > a or o.x > x) for o in pts if o is not r
        )
        if not dominated:
            front.append(r)
    front.sort(key=lambda r: (r.x, -sign * r.accuracy, r.number))
    # identical points (a seed and a searched copy of it): keep the first trial
    uniq: list[TrialRecord] = []
    for r in front:
        if not any(u.x == r.x and u.accuracy == r.accuracy for u in uniq):
            uniq.append(r)
    return uniq


# ================================================================================= search
def _check_target(target: float | None) -> float | None:
    if target is None:
        return None
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not math.isfinite(target) or not 0.0 <= target < 1.0:
        raise MixMatchError(f"target must be a number in [0, 1), got {target!r}")
    return float(target)


def _validate(
    p: Plan, *, objective: str, metric: str, score: str, sampler: Any, target: float | None, n_trials: int | None,
    total_trials: int | None, timeout: float | None, macs: MacsProfile | None, study_name: str,
) -> float | None:
    """Check :func:`search`'s arguments (one-line errors); returns the effective target."""
    if objective not in OBJECTIVES:
        raise MixMatchError(f"unknown objective {objective!r}; choose multi or single")
    if metric not in METRICS:
        raise MixMatchError(f"unknown metric {metric!r}; choose sparsity or macs")
    if score not in SCORES:
        raise MixMatchError(f"unknown score {score!r}; choose accuracy or loss")
    if isinstance(sampler, str) and sampler not in SAMPLERS:
        raise MixMatchError(f"unknown sampler {sampler!r}; choose {', '.join(SAMPLERS)}")
    if not isinstance(sampler, (str, optuna.samplers.BaseSampler)) and sampler is not None:
        raise MixMatchError(f"sampler must be one of {', '.join(SAMPLERS)} or an optuna sampler, got {type(sampler).__name__}")
    target = _check_target(target)
    if n_trials is not None and n_trials < 0:
        raise MixMatchError(f"n_trials must be 0 or more, got {n_trials}")
    if total_trials is not None and total_trials < 1:
        raise MixMatchError(f"total_trials must be at least 1, got {total_trials}")
    if n_trials is None and total_trials is None and timeout is None:
        raise MixMatchError("give n_trials, total_trials or timeout: the search would never stop")
    if metric == "macs" and macs is None:
        raise MixMatchError("metric 'macs' needs macs=MacsProfile.measure(model, input_shape)")
    if not re.fullmatch(r"[^\x00-\x1f]{1,200}", study_name or ""):
        raise MixMatchError(f"study name {study_name!r} must be 1-200 printable characters")
    plan_target = p.meta.get("target")
    if objective == "single" and target is None:
        if metric == "sparsity" and plan_target is not None:
            target = float(plan_target)
        else:
            what = "fraction of MACs removed" if metric == "macs" else "global sparsity"
            raise MixMatchError(
                f"a single-objective search needs target=<{what} in [0, 1)> (CLI: --target), "
                "or for sparsity a plan budget-matched at it (`mixmatch plan --target S`)"
            )
    if metric == "sparsity" and target is not None and plan_target is not None and target > float(plan_target) + 1e-9:
        raise MixMatchError(
            f"the plan is budget-matched at sparsity {plan_target}: no point reaches target {target}; "
            f"make the plan at that target (`mixmatch plan --target {target}`) or lower the target"
        )
    if objective == "multi" and metric == "sparsity" and plan_target is not None:
        logger.warning(
            "the plan is budget-matched at %s: every point has that sparsity, so the front has one point; "
            "use objective='single' or metric='macs'", plan_target,
        )
    return target


def search(
    plan: Plan | str | os.PathLike[str],
    evaluator: Evaluator | Callable[[Strategy], float | Mapping[str, float]],
    *,
    storage: str | os.PathLike[str] | optuna.storages.BaseStorage | None = None,
    study_name: str = "mixmatch",
    n_trials: int | None = 40,
    total_trials: int | None = None,
    timeout: float | None = None,
    objective: str = "multi",
    metric: str = "sparsity",
    target: float | None = None,
    score: str = "accuracy",
    sampler: str | optuna.samplers.BaseSampler | None = None,
    sampler_seed: int | None = None,
    population_size: int | None = None,
    signals: Sequence[str] | None = None,
    macs: MacsProfile | None = None,
    seed_rules: bool = True,
    heartbeat_interval: int | None = 10,
    grace_period: int | None = None,
    max_retry: int | None = 3,
    catch: tuple[type[Exception], ...] = (),
    callbacks: Sequence[Callable[[optuna.Study, FrozenTrial], None]] = (),
    progress: bool = False,
) -> SearchResult:
    """Refine the plan's rule strategies with Optuna; resumable and safe for many workers.

    Args:
        plan: a :class:`~mixmatch_plugin.Plan` or the path of its JSON.
        evaluator: an :class:`Evaluator` (or a plain function, wrapped in :class:`CallbackEvaluator`).
        storage: see :func:`open_storage`; None keeps the study in memory (no resume).
        study_name: the study; workers sharing ``storage`` and ``study_name`` share the search.
        n_trials: trials this call runs (Optuna's meaning); None runs until ``total_trials`` or ``timeout``.
        total_trials: stop once the study holds this many COMPLETE trials (all workers together);
            the way to resume a killed run to the same end point.
        timeout: stop starting new trials after this many seconds.
        objective: ``"multi"`` (score and ``metric`` both up; Pareto front) or ``"single"`` (score up,
            ``metric >= target`` as a constraint).
        metric: ``"sparsity"`` (global sparsity) or ``"macs"`` (sparse-MACs reduction; needs ``macs``).
        target: the budget in [0, 1): constraint ``metric >= target`` (``set_constraint("budget", ...)``).
            Single-objective with ``metric="sparsity"`` defaults to the plan's own target.
        score: ``"accuracy"`` (maximized) or ``"loss"`` (minimized), read from the evaluator's metrics.
        sampler: ``"nsga2"``, ``"tpe"``, ``"gp"`` or a sampler object (default by objective).
        sampler_seed: the sampler's seed. Give each worker a different one (or None), or they
            propose the same points.
        population_size: NSGA-II population (default: the number of seeds, at least 10).
        signals: the signals the search may choose (default: the plan's).
        macs: a :class:`MacsProfile` of the model (needed for ``metric="macs"``; recorded when given).
        seed_rules: enqueue the plan's rule strategies first.
        heartbeat_interval, grace_period, max_retry: see :func:`open_storage`.
        catch: exception types that fail a trial without stopping the search.
        callbacks: Optuna callbacks run after every trial.
        progress: show a progress bar over this call's trials.

    Raises:
        MixMatchError: bad arguments, a storage that cannot be opened, a study that exists with
            another objective or for another plan.
    """
    p = plan if isinstance(plan, Plan) else load_plan(Path(plan))
    target = _validate(
        p, objective=objective, metric=metric, score=score, sampler=sampler, target=target, n_trials=n_trials,
        total_trials=total_trials, timeout=timeout, macs=macs, study_name=study_name,
    )
    if not callable(evaluator):
        raise MixMatchError(f"the evaluator must be callable (strategy -> metrics), got {type(evaluator).__name__}")
    ev = evaluator

    space = p.space()
    if not space.groups:
        raise MixMatchError("the plan's ranges leave nothing to search (every layer has low == high); widen the ranges")
    plan_signals = [s for s in (p.meta.get("signals") or []) if s in SIGNALS] or sorted({s.signal for s in p.strategies if s.signal in SIGNALS})
    choices = list(signals) if signals is not None else plan_signals
    bad = [s for s in choices if s not in SIGNALS]
    if bad or not choices:
        raise MixMatchError(f"signals {list(choices)!r}: choose from {', '.join(SIGNALS)}")
    have = getattr(ev, "signals", None)
    if isinstance(have, Signals):
        missing = [s for s in choices if s not in have.available]
        if missing:
            raise MixMatchError(
                f"the evaluator has no {missing[0]!r} scores: build it with signals=compute_signals(model, calib), "
                f"or search only {', '.join(have.available)} (signals=...)"
            )
    seeds = rule_seeds(p, choices) if seed_rules else []
    # a budget-matched point prunes round(S * N) weights: allow half a weight of rounding below the target
    tol = 0.5 / max(float(space.n.sum()), 1.0) if metric == "sparsity" else 1e-9

    spec = _parse_storage(storage) if not isinstance(storage, optuna.storages.BaseStorage) else _StorageSpec("object")
    first_dir = optuna.study.StudyDirection.MAXIMIZE if score == "accuracy" else optuna.study.StudyDirection.MINIMIZE
    directions = [first_dir] + ([optuna.study.StudyDirection.MAXIMIZE] if objective == "multi" else [])
    smp = make_sampler(
        sampler, objective, seed=sampler_seed, population_size=population_size, n_seeds=len(seeds),
        deterministic=bool(getattr(ev, "deterministic", False)),
    )
    info = {
        "plan": plan_fingerprint(p), "objective": objective, "metric": metric, "target": target, "score": score,
        "signals": choices, "groups": list(space.groups),
    }
    study, added = _open_study(spec, storage, study_name, smp, directions, info, seeds, heartbeat_interval, grace_period, max_retry)
    if added:
        logger.info("enqueued %d rule strategies as seeds of study %r", added, study_name)
    heartbeat = _heartbeat_on(study._storage)
    if heartbeat:
        _fail_stale(study)
    else:
        recover_orphans(study, max_retry)

    current: list[optuna.Trial] = []

    def run(trial: optuna.Trial) -> float | tuple[float, float]:
        current[:] = [trial]
        return _objective(trial, space, ev, info, choices, macs, target, tol, study_name)

    t_start = time.monotonic()
    counter: Iterable[int] = range(n_trials) if n_trials is not None else _forever()
    quiet = _NoInterruptTraceback()
    optimize_logger = logging.getLogger("optuna.study._optimize")
    optimize_logger.addFilter(quiet)
    try:
        for _ in progress_bar(counter, f"search {study_name}", enable=progress, total=n_trials):
            if total_trials is not None and len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) >= total_trials:
                break
            if timeout is not None and time.monotonic() - t_start >= timeout:
                break
            current.clear()
            try:
                study.optimize(run, n_trials=1, catch=catch, callbacks=list(callbacks), gc_after_trial=False)
            except KeyboardInterrupt:
                if current:
                    _requeue_interrupted(study, current[0], max_retry)
                raise
            if not heartbeat:
                recover_orphans(study, max_retry)
    finally:
        optimize_logger.removeFilter(quiet)
    if heartbeat:
        _fail_stale(study)
    return result_of(study, p, evaluator_name=str(getattr(ev, "name", "evaluator")), storage=spec.display)


def _open_study(
    spec: _StorageSpec, storage: Any, study_name: str, sampler: optuna.samplers.BaseSampler,
    directions: Sequence[optuna.study.StudyDirection], info: Mapping[str, Any], seeds: Sequence[Strategy],
    heartbeat_interval: int | None, grace_period: int | None, max_retry: int | None,
) -> tuple[optuna.Study, int]:
    """Open the storage, create or load the study, check it, enqueue the missing seeds: all under one lock."""
    with storage_lock(spec):
        store = storage if isinstance(storage, optuna.storages.BaseStorage) else _open(spec, heartbeat_interval, grace_period, max_retry)
        try:
            study = optuna.create_study(storage=store, sampler=sampler, study_name=study_name, directions=directions, load_if_exists=True)
        except Exception as exc:
            from sqlalchemy.exc import SQLAlchemyError

            if isinstance(exc, SQLAlchemyError):
                first = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0][:200]
                raise MixMatchError(f"cannot open study {study_name!r} in {spec.display} ({first})") from None
            raise
        _check_study(study, info, directions, spec)
        return study, seed_study(study, seeds)


def _forever() -> Iterator[int]:
    i = 0
    while True:
        yield i
        i += 1


def _check_study(
    study: optuna.Study, info: Mapping[str, Any], directions: Sequence[optuna.study.StudyDirection], spec: _StorageSpec
) -> None:
    if list(study.directions) != list(directions):
        raise MixMatchError(
            f"study {study.study_name!r} in {spec.display} exists with {len(study.directions)} objective(s) "
            f"({', '.join(d.name.lower() for d in study.directions)}); use another --study name for this objective"
        )
    old = study.user_attrs.get(_STUDY_ATTR)
    if old is None:
        study.set_user_attr(_STUDY_ATTR, dict(info))
        return
    for key in ("plan", "objective", "metric", "target", "score", "signals"):
        if old.get(key) != info.get(key):
            raise MixMatchError(
                f"study {study.study_name!r} in {spec.display} was made with {key} {old.get(key)!r}, not {info.get(key)!r}; "
                "use the same settings to resume, or another --study name"
            )


def _objective(
    trial: optuna.Trial, space: StrategySpace, ev: Callable[[Strategy], Any], info: Mapping[str, Any], choices: Sequence[str],
    macs: MacsProfile | None, target: float | None, tol: float, study_name: str,
) -> float | tuple[float, float]:
    trial.set_user_attr(WORKER_ATTR, _worker_token())
    signal = trial.suggest_categorical(SIGNAL_PARAM, list(choices))
    alphas = {g: trial.suggest_float(ALPHA_PREFIX + g, 0.0, 1.0) for g in space.groups}
    seed = trial.user_attrs.get(SEED_ATTR)
    strategy = space.strategy(seed if isinstance(seed, str) else f"{signal}:search-t{trial.number}", str(signal), alphas)
    t0 = time.perf_counter()
    raw = ev(strategy)
    seconds = time.perf_counter() - t0
    metrics = {str(k): float(v) for k, v in raw.items()} if isinstance(raw, Mapping) else {"accuracy": float(raw)}
    key = str(info["score"])
    if key not in metrics:
        raise MixMatchError(f"the evaluator returned {sorted(metrics)} but no {key!r}; return a mapping with {key!r}")
    value = float(metrics[key])
    x = macs.reduction(strategy) if info["metric"] == "macs" and macs is not None else strategy.global_sparsity
    # two attribute writes per trial (each is a storage round trip): the evaluator's metrics, and ours
    trial.set_user_attr("metrics", {k: v for k, v in metrics.items() if math.isfinite(v)})
    result: dict[str, Any] = {"x": x, "global_sparsity": strategy.global_sparsity, "seconds": seconds}
    if macs is not None:
        result["macs_reduction"] = macs.reduction(strategy)
    trial.set_user_attr(RESULT_ATTR, result)
    if target is not None:
        trial.set_constraint("budget", target - x - tol)
    if not math.isfinite(value):
        logger.warning("trial %d: the evaluator returned %s %s: the trial fails", trial.number, key, value)
    return (value, x) if info["objective"] == "multi" else value


def result_of(study: optuna.Study, plan: Plan, *, evaluator_name: str = "evaluator", storage: str = "") -> SearchResult:
    """Collect a study's finished trials into a :class:`SearchResult` (also for a study loaded later)."""
    info = study.user_attrs.get(_STUDY_ATTR)
    if not isinstance(info, Mapping):
        raise MixMatchError(f"study {study.study_name!r} was not made by mixmatch search")
    if info.get("plan") != plan_fingerprint(plan):
        raise MixMatchError(f"study {study.study_name!r} was made for another plan; pass the plan it was searched on")
    space = plan.space()
    records = _records(study, space, info, study.study_name)
    score = str(info["score"])
    key = _better(score)
    feasible = [r for r in records if r.feasible]
    if info["objective"] == "multi":
        best = _pareto(records, score)
    else:
        best = sorted(feasible, key=lambda r: (*key(r), -r.number), reverse=True)[:1]
    seeds = [r for r in feasible if r.seed is not None]
    best_rule = max(seeds, key=lambda r: (*key(r), -r.number)) if seeds else None
    return SearchResult(
        study, plan, str(info["objective"]), str(info["metric"]), score,
        info.get("target"), records, best, best_rule, storage, evaluator_name,
    )


# ================================================================================= export
def export(
    result: SearchResult, path: str | os.PathLike[str] | None = None, *, which: str = "best", top: int | None = None,
) -> Plan:
    """The plan with the searched strategies appended as ordinary strategies; written atomically to ``path``.

    Args:
        result: from :func:`search`.
        path: where to write the plan JSON. When it already holds a plan for the same model and
            ranges, the strategies are added to *that* plan (replacing earlier exports of the same
            names), so several studies can export into one file.
        which: ``"best"`` (the Pareto front or the single best) or ``"all"`` (every completed trial).
        top: keep at most this many (the best by score; for a front, evenly spaced along it).

    Seeds among the exported trials are already in the plan under their rule names and are not
    duplicated; ``plan.meta["search"]["best"]`` lists the names of the best strategies either way.
    """
    if which not in ("best", "all"):
        raise MixMatchError(f"which must be 'best' or 'all', got {which!r}")
    if top is not None and top < 1:
        raise MixMatchError(f"top must be at least 1, got {top}")
    picked = list(result.best if which == "best" else result.trials)
    if top is not None and len(picked) > top:
        if which == "best" and result.objective == "multi":
            idx = np.unique(np.round(np.linspace(0, len(picked) - 1, top)).astype(int))
            picked = [picked[i] for i in idx]
        else:
            picked = sorted(picked, key=_better(result.score), reverse=True)[:top]
    base = result.plan
    if path is not None and Path(path).exists():
        existing = load_plan(Path(path))
        if plan_fingerprint(existing) != plan_fingerprint(result.plan):
            raise MixMatchError(f"{path} holds a plan for another model or ranges; export to a new file")
        base = existing
    out = Plan(
        list(base.layers), dict(base.ranges), dict(base.bounds), [copy.deepcopy(s) for s in base.strategies],
        copy.deepcopy(base.sensitivity), copy.deepcopy(base.meta), signals=result.plan.signals,
    )
    names = {s.name for s in out.strategies}
    added = []
    for r in picked:
        if r.seed is not None:
            continue
        s = copy.deepcopy(r.strategy)
        s.meta.update({
            "objective": result.objective, "metric": result.metric, "score": result.score,
            "validation": {result.score: r.accuracy, **r.metrics}, "x": r.x, "evaluator": result.evaluator,
        })
        if s.name in names:
            out.strategies = [t for t in out.strategies if t.name != s.name]
        out.strategies.append(s)
        added.append(s.name)
    out.meta["search"] = {
        "study": result.study.study_name, "storage": result.storage, "objective": result.objective,
        "metric": result.metric, "score": result.score, "target": result.target, "evaluator": result.evaluator,
        "trials": len(result.trials), "best": [r.strategy.name for r in result.best],
        "best_rule": result.best_rule.strategy.name if result.best_rule else None,
    }
    if path is not None:
        out.save(Path(path))
        logger.info("exported %d searched strategies to %s", len(added), path)
    return out


# ================================================================================== plots
_SIGNAL_STYLE = {"magnitude": ("^", "tab:blue"), "gradient": ("s", "tab:orange"), "product": ("D", "tab:green")}


def _score_label(result: SearchResult) -> str:
    return f"validation {result.score} ({result.evaluator})"


def _save(fig: Any, path: str | os.PathLike[str]) -> Path:
    import io as _io

    from mixmatch_plugin.io import atomic_write_bytes

    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=130, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def _figure(w: float = 7.5, h: float = 5.0) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(w, h))
    ax.grid(True, alpha=0.3)
    return fig, ax


def plot_pareto(result: SearchResult, path: str | os.PathLike[str]) -> Path:
    """PNG: score against sparsity (or MACs removed); searched trials, the rule seeds by signal, and the front."""
    fig, ax = _figure()
    searched = [r for r in result.trials if r.seed is None]
    seeds = [r for r in result.trials if r.seed is not None]
    if searched:
        ax.scatter([r.x for r in searched], [r.accuracy for r in searched], s=18, c="0.55", alpha=0.7,
                   label=f"searched ({len(searched)})", zorder=2)
    for sig, (marker, color) in _SIGNAL_STYLE.items():
        pts = [r for r in seeds if r.strategy.signal == sig]
        if pts:
            ax.scatter([r.x for r in pts], [r.accuracy for r in pts], marker=marker, s=46, facecolor="none",
                       edgecolor=color, linewidths=1.4, label=f"rule, {sig} ({len(pts)})", zorder=3)
    infeasible = [r for r in result.trials if not r.feasible]
    if infeasible:
        ax.scatter([r.x for r in infeasible], [r.accuracy for r in infeasible], marker="x", s=22, c="0.3",
                   linewidths=0.8, label=f"below the budget ({len(infeasible)})", zorder=4)
    if result.best:
        xs, ys = [r.x for r in result.best], [r.accuracy for r in result.best]
        if result.objective == "multi" and len(result.best) > 1:
            ax.step(xs, ys, where="pre", color="tab:red", lw=1.4, zorder=4)
        ax.scatter(xs, ys, s=70, marker="*", c="tab:red", edgecolor="k", linewidths=0.5, zorder=5,
                   label="Pareto front" if result.objective == "multi" else "best feasible")
    if result.best_rule is not None:
        ax.annotate("best rule", (result.best_rule.x, result.best_rule.accuracy), xytext=(-28, -22),
                    textcoords="offset points", fontsize=8, color="0.2", ha="right",
                    arrowprops={"arrowstyle": "-", "color": "0.4", "lw": 0.6})
    if result.target is not None:
        ax.axvline(result.target, color="tab:purple", ls="--", lw=1, label=f"budget {result.target:g}")
    xs_all = [r.x for r in result.trials] + ([result.target] if result.target is not None else [])
    if xs_all and max(xs_all) - min(xs_all) < 1e-3:
        c = float(np.mean(xs_all))
        ax.set_xlim(c - 0.01, c + 0.01)
    ax.set_xlabel(result.x_label)
    ax.set_ylabel(_score_label(result))
    ax.set_title(f"study {result.study.study_name!r}: {len(result.trials)} trials, {len(seeds)} rule seeds", fontsize=10)
    if result.trials:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return _save(fig, path)


def plot_history(result: SearchResult, path: str | os.PathLike[str]) -> Path:
    """PNG: score per trial, rule seeds against searched trials, with the best feasible so far."""
    fig, ax = _figure(8.0, 4.5)
    sign = 1.0 if result.score == "accuracy" else -1.0
    searched = [r for r in result.trials if r.seed is None]
    if searched:
        ax.scatter([r.number for r in searched], [r.accuracy for r in searched], s=16, c="0.55", label="searched", zorder=2)
    for sig, (marker, color) in _SIGNAL_STYLE.items():
        pts = [r for r in result.trials if r.seed is not None and r.strategy.signal == sig]
        if pts:
            ax.scatter([r.number for r in pts], [r.accuracy for r in pts], marker=marker, s=40, facecolor="none",
                       edgecolor=color, linewidths=1.3, label=f"rule, {sig}", zorder=3)
    best: list[tuple[int, float]] = []
    cur = None
    for r in sorted(result.trials, key=lambda r: r.number):
        if r.feasible and (cur is None or sign * r.accuracy > sign * cur):
            cur = r.accuracy
        if cur is not None:
            best.append((r.number, cur))
    if best:
        ax.step([b[0] for b in best], [b[1] for b in best], where="post", color="tab:red", lw=1.3, label="best so far" + (" (within the budget)" if result.target is not None else ""))
    if result.best_rule is not None:
        ax.axhline(result.best_rule.accuracy, color="tab:blue", ls=":", lw=1, label="best rule")
    ax.set_xlabel("trial number")
    ax.set_ylabel(_score_label(result))
    ax.set_title(f"study {result.study.study_name!r}: rule seeds first, then the sampler", fontsize=10)
    if result.trials:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return _save(fig, path)


def param_importances(result: SearchResult) -> dict[str, float]:
    """Optuna's parameter importances for the score (objective 0); empty when they cannot be computed."""
    study = result.study
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(done) < 3:
        return {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return dict(optuna.importance.get_param_importances(
                study, target=lambda t: float(t.values[0]),
                evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0),
            ))
    except (RuntimeError, ValueError) as exc:
        logger.info("parameter importances unavailable (%s)", exc)
        return {}


def plot_importances(result: SearchResult, path: str | os.PathLike[str], *, top: int = 20) -> Path | None:
    """PNG: horizontal bars of the parameter importances (fANOVA) for the score; None when unavailable."""
    imp = param_importances(result)
    if not imp:
        return None
    items = sorted(imp.items(), key=lambda kv: kv[1], reverse=True)[:top]
    labels = [k[len(ALPHA_PREFIX):] if k.startswith(ALPHA_PREFIX) else k for k, _ in items]
    fig, ax = _figure(7.0, 0.35 * len(items) + 1.4)
    ax.barh(range(len(items)), [v for _, v in items], color="tab:blue")
    ax.set_yticks(range(len(items)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"importance for the {result.score} (fANOVA, normalized)")
    ax.set_title(f"parameter importances over {len(result.trials)} trials (alpha:<role>@<stage>, signal)", fontsize=10)
    ax.grid(True, axis="y", alpha=0)
    return _save(fig, path)
