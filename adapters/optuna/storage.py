"""Storages, the storage-wide lock, and recovery of trials whose worker died."""

from __future__ import annotations

import contextlib
import copy
import datetime
import hashlib
import logging
import os
import random
import socket
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from mixmatch_plugin.errors import MixMatchError

from .space import WORKER_ATTR

logger = logging.getLogger(__name__)

_JOURNAL_SUFFIXES = (".log", ".journal", ".jsonl")
_SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")


# ============================================================================== storage
@dataclass(frozen=True)
class StorageSpec:
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


def parse_storage(storage: str | os.PathLike[str] | None) -> StorageSpec:
    if storage is None:
        return StorageSpec("memory")
    text = os.fspath(storage).strip()
    if not text:
        raise MixMatchError("empty storage: pass an Optuna RDB URL (sqlite:///search.db, postgresql+psycopg2://...) or a journal file")
    if text.startswith("journal:"):
        rest = text[len("journal:"):]
        rest = rest[2:] if rest.startswith("//") else rest
        if not rest:
            raise MixMatchError(f"storage {text!r}: journal storage needs a file, e.g. journal:out/search.log")
        return StorageSpec("journal", path=Path(rest).expanduser().absolute())
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
        return StorageSpec("rdb", url=text)
    p = Path(text).expanduser()
    if p.suffix in _JOURNAL_SUFFIXES:
        return StorageSpec("journal", path=p.absolute())
    if p.suffix in _SQLITE_SUFFIXES:
        p.absolute().parent.mkdir(parents=True, exist_ok=True)
        return StorageSpec("rdb", url=f"sqlite:///{p.absolute()}")
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
    spec = parse_storage(storage)
    with storage_lock(spec):  # two workers creating the tables of a fresh database at once collide
        return open_spec(spec, heartbeat_interval, grace_period, max_retry)


def open_spec(spec: StorageSpec, heartbeat_interval: int | None, grace_period: int | None, max_retry: int | None) -> optuna.storages.BaseStorage:
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
    for attempt in range(SCHEMA_RACE_RETRIES + 1):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                return optuna.storages.RDBStorage(spec.url, **kwargs)
        except ImportError as exc:
            raise MixMatchError(f"storage {spec.display} needs a database driver that is not installed ({exc})") from None
        except SQLAlchemyError as exc:
            first = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0][:200]
            if attempt < SCHEMA_RACE_RETRIES and _lost_schema_race(exc):
                logger.info("storage %s: another process created its tables at the same moment (%s); opening again", spec.display, first)
                time.sleep(0.05 * 2**attempt * (1.0 + random.random()))
                continue
            raise MixMatchError(f"cannot open storage {spec.display} ({first}); check the URL and that the server is running") from None
    raise AssertionError("unreachable")


SCHEMA_RACE_RETRIES = 5
"""Times :func:`open_spec` opens a database again after losing the race to create its tables."""


def _lost_schema_race(exc: Exception) -> bool:
    """Optuna creates a new database's tables and stamps its schema version on first open, outside any
    lock: two processes opening one new database at once (two workers, a worker and a dashboard) can
    both try, and the loser fails with a duplicate table or version row. Opening again then finds the
    tables made."""
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    msg = str(getattr(exc, "orig", None) or exc).lower()
    if isinstance(exc, IntegrityError):
        return "alembic_version" in msg or "version_info" in msg
    return isinstance(exc, OperationalError | ProgrammingError) and "already exists" in msg


def heartbeat_on(storage: optuna.storages.BaseStorage) -> bool:
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
def storage_lock(spec: StorageSpec) -> Iterator[None]:
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


def worker_token(heartbeat: bool = False) -> dict[str, Any]:
    """What a worker records in each trial it runs: its host, pid and process start time, and whether it beats."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": _proc_start(pid), "heartbeat": heartbeat}


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


def _heartbeat_grace(storage: optuna.storages.BaseStorage) -> float | None:
    """The storage's grace period in seconds (Optuna's default: twice the heartbeat interval), None without a heartbeat."""
    if not heartbeat_on(storage):
        return None
    backend = getattr(storage, "_backend", storage)
    grace = getattr(backend, "grace_period", None)
    interval = getattr(backend, "heartbeat_interval", None)
    if grace is not None:
        return float(grace)
    return 2.0 * float(interval) if interval is not None else None


def _beating_trial_ids(storage: optuna.storages.BaseStorage, study_id: int) -> set[int] | None:
    """Ids of the study's RUNNING trials that have a heartbeat row; None when they cannot be read (not an RDB storage)."""
    backend = getattr(storage, "_backend", storage)
    if not isinstance(backend, optuna.storages.RDBStorage):
        return None
    import sqlalchemy
    from optuna.storages._rdb import models

    query = (
        sqlalchemy.select(models.TrialHeartbeatModel.trial_id)
        .join(models.TrialModel, models.TrialModel.trial_id == models.TrialHeartbeatModel.trial_id)
        .where(models.TrialModel.study_id == study_id, models.TrialModel.state == TrialState.RUNNING)
    )
    with backend.engine.connect() as conn:
        return {int(row[0]) for row in conn.execute(query)}


def _orphan_reason(trial: FrozenTrial, beating: set[int] | None, grace: float | None, now: datetime.datetime) -> str | None:
    """Why ``trial`` (RUNNING) has no live worker, or None when it may have one."""
    token = trial.user_attrs.get(WORKER_ATTR)
    if isinstance(token, Mapping) and _worker_alive(token) is False:
        return f"its worker (pid {token.get('pid')}) no longer exists"
    if beating is None or grace is None or trial._trial_id in beating or trial.datetime_start is None:
        return None
    if isinstance(token, Mapping) and token.get("heartbeat") is not True:
        return None  # a worker that runs without a heartbeat (``--heartbeat 0``, or a version that did not say) never writes one
    age = (now - trial.datetime_start).total_seconds()
    if age > grace:
        # a live worker writes its first heartbeat within moments of creating the trial; Optuna's stale-trial
        # check only looks at trials that have one, so a worker killed in between leaves its trial RUNNING for ever
        return f"it has had no heartbeat in the {age:.0f} s since it started (grace period {grace:.0f} s)"
    return None


def recover_orphans(study: optuna.Study, max_retry: int | None = 3) -> list[int]:
    """Fail the RUNNING trials that no worker is running any more, and re-queue them.

    A trial is orphaned when its worker token names a process on this host that no longer exists
    (any storage), or, on a storage with a heartbeat, when it has never recorded a heartbeat and
    started more than the grace period ago (its worker died between creating the trial and its first
    heartbeat, a window Optuna's own stale-trial check does not cover; this compares trial start
    times written by each worker's clock with this host's, so the hosts' clocks must agree to well
    within the grace period). Trials with a heartbeat are left to Optuna's check, trials whose worker
    token does not say it runs with a heartbeat are left alone, and workers on other hosts are otherwise
    never touched. Re-queuing goes through
    :class:`~optuna.storages.RetryHeartbeatStaleTrialCallback`, exactly as the RDB heartbeat does, so
    the retry records ``system_attrs["failed_trial"]`` and honours ``max_retry``. Returns the failed
    trial numbers.
    """
    storage = study._storage
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if not running:
        return []
    grace = _heartbeat_grace(storage)
    beating = _beating_trial_ids(storage, study._study_id) if grace is not None else None
    now = datetime.datetime.now()
    failed = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
    for t in running:
        reason = _orphan_reason(t, beating, grace, now)
        if reason is None:
            continue
        try:
            won = storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
        except UpdateFinishedTrialError:
            continue
        if not won:
            continue
        logger.warning("trial %d was left RUNNING by a dead worker (%s): failed and re-queued", t.number, reason)
        retry(study, copy.deepcopy(storage.get_trial(t._trial_id)))
        failed.append(t.number)
    return failed


class NoInterruptTraceback(logging.Filter):
    """Optuna logs a trial cut short by Ctrl-C as a failure, with its traceback, then its value (None);
    both records are dropped: the trial is re-queued (:func:`requeue_interrupted`), not failed."""

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


def requeue_interrupted(study: optuna.Study, trial: optuna.Trial, max_retry: int | None) -> None:
    """Re-queue a trial that Ctrl-C (or SIGTERM) cut short, as a killed worker's trial is: the rerun evaluates it.

    Optuna marks such a trial failed; without this, an interrupted rule seed would never be evaluated
    (a seed counts as present in any state). An interrupt that lands outside the objective (while Optuna
    writes the result, or stops the heartbeat thread) leaves the trial RUNNING: it is this process's
    own trial, so it is failed here and re-queued the same way.
    """
    storage = study._storage
    frozen = storage.get_trial(trial._trial_id)
    if frozen.state == TrialState.RUNNING:
        with contextlib.suppress(UpdateFinishedTrialError):  # finished meanwhile by another worker's heartbeat check
            storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        frozen = storage.get_trial(trial._trial_id)
    if frozen.state != TrialState.FAIL:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)(study, copy.deepcopy(frozen))
    logger.info("trial %d was interrupted: re-queued for the next run", frozen.number)


def fail_stale(study: optuna.Study) -> None:
    if heartbeat_on(study._storage):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
