"""Several `mixmatch search` workers on one PostgreSQL study, and SIGKILL in the middle of a trial then resume.

The server is a real PostgreSQL started in a temporary folder on 127.0.0.1 (see ``optuna_helpers``).
Locally these tests skip when no server can start; with ``CI=true`` they must run.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

import pytest
import torch

import mixmatch_plugin as mm

from .optuna_helpers import postgres_server, worker

optuna = pytest.importorskip("optuna")
search_module = pytest.importorskip("mixmatch_plugin.adapters.optuna.search")
SEED_ATTR, open_storage = search_module.SEED_ATTR, search_module.open_storage
TrialState = optuna.trial.TrialState

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


@pytest.fixture(scope="module")
def postgres_url():
    cm = postgres_server()
    try:
        url = cm.__enter__()
    except RuntimeError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the PostgreSQL tests must run in CI, but no server could start: {exc}")
        pytest.skip(f"no PostgreSQL server could start: {exc}")
    try:
        yield url
    finally:
        cm.__exit__(None, None, None)


@pytest.fixture(scope="module")
def files(trained_tiny_resnet, calib, tmp_path_factory):
    d = tmp_path_factory.mktemp("pg")
    torch.save(trained_tiny_resnet.state_dict(), d / "model.pt")
    mm.plan(trained_tiny_resnet, calib).save(d / "plan.json")
    return d


def finish(procs, timeout=240):
    deadline = time.monotonic() + timeout
    for p in procs:
        p.wait(timeout=max(1.0, deadline - time.monotonic()))
    return [p.returncode for p in procs]


def test_two_workers_share_one_study_without_duplicate_seeds_or_lost_trials(postgres_url, files, tmp_path):
    args = ("--storage", postgres_url, "--study", "two-workers", "--n-trials", "20", "--no-plots")
    procs = [
        worker(files, *args, "--out", str(tmp_path / f"w{i}"), "--sampler-seed", str(i), log=tmp_path / f"w{i}.log")
        for i in range(2)
    ]
    codes = finish(procs)
    assert codes == [0, 0], [(tmp_path / f"w{i}.log").read_text()[-2000:] for i in range(2)]
    study = optuna.load_study(study_name="two-workers", storage=postgres_url)
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 40  # 20 asked of each worker: none lost, none extra
    assert all(t.state == TrialState.COMPLETE for t in trials)
    seeds = [t.user_attrs[SEED_ATTR] for t in trials if SEED_ATTR in t.user_attrs]
    rules = [s.name for s in mm.load_plan(files / "plan.json").strategies]
    assert sorted(seeds) == sorted(rules) and len(seeds) == 30  # every rule exactly once
    assert sorted(t.number for t in trials if SEED_ATTR in t.user_attrs) == list(range(30))  # seeded first, under the lock


def kill_inside_a_trial(files, args, storage, study_name, log):
    """Start a worker, SIGKILL it once three trials are complete and a fourth is running; the trials after the kill."""
    proc = worker(files, *args, "--n-trials", "40", log=log)
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None, log.read_text()[-2000:]
        assert time.monotonic() < deadline, "the worker never reached its fourth trial"
        try:
            study = optuna.load_study(study_name=study_name, storage=storage)
            states = Counter(t.state for t in study.get_trials(deepcopy=False))
        except KeyError:  # the study does not exist yet
            states = Counter()
        if states[TrialState.COMPLETE] >= 3 and states[TrialState.RUNNING] == 1:
            time.sleep(0.05)  # let the trial's heartbeat thread write its first beat (Optuna checks trials that have one)
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return {t.number: t for t in study.get_trials(deepcopy=True)}


def test_sigkill_mid_trial_then_resume_keeps_completed_trials_and_retries_the_killed_one(postgres_url, files, tmp_path):
    storage = open_storage(postgres_url, heartbeat_interval=None)
    for attempt in range(3):  # the trial seen running can end in the moment before the kill lands: then try again
        study_name = f"kill-{attempt}"
        # fine-tune trials (about 0.3 s each) so the worker is inside a trial when it is killed; magnitude only: 10 seeds
        args = ("--storage", postgres_url, "--study", study_name, "--signals", "magnitude", "--evaluator", "finetune",
                "--finetune-steps", "10", "--heartbeat", "1", "--grace", "2", "--no-plots", "--out", str(tmp_path / f"out-{attempt}"))
        before = kill_inside_a_trial(files, args, storage, study_name, tmp_path / f"first-{attempt}.log")
        killed = [t for t in before.values() if t.state == TrialState.RUNNING]
        if len(killed) == 1:
            break
    else:
        pytest.fail("SIGKILL did not land inside a trial in three tries")
    killed_trial = killed[0]
    done_before = {n: t.values for n, t in before.items() if t.state == TrialState.COMPLETE}

    time.sleep(3)  # past the grace period: the killed trial's heartbeat is stale
    proc = worker(files, *args, "--n-trials", "40", "--total-trials", "12", log=tmp_path / "second.log")
    assert finish([proc]) == [0], (tmp_path / "second.log").read_text()[-2000:]

    after = {t.number: t for t in optuna.load_study(study_name=study_name, storage=storage).get_trials(deepcopy=True)}
    assert not [t for t in after.values() if t.state == TrialState.RUNNING]  # nothing left RUNNING
    for n, values in done_before.items():  # no completed trial lost or changed
        assert after[n].state == TrialState.COMPLETE and after[n].values == values
    assert after[killed_trial.number].state == TrialState.FAIL
    retries = [t for t in after.values() if t.system_attrs.get("failed_trial") == killed_trial.number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    # the kill may land before all parameters were suggested: the retry keeps those that were, and a
    # seed's retry is the seed point itself
    assert killed_trial.params.items() <= retries[0].params.items()
    if SEED_ATTR in killed_trial.user_attrs:
        assert retries[0].params == killed_trial.system_attrs["fixed_params"]
        assert retries[0].user_attrs[SEED_ATTR] == killed_trial.user_attrs[SEED_ATTR]
    complete = [t for t in after.values() if t.state == TrialState.COMPLETE]
    assert len(complete) == 12
    seeds = Counter(t.user_attrs.get(SEED_ATTR) for t in complete if SEED_ATTR in t.user_attrs)
    assert len(seeds) == 10 and set(seeds.values()) == {1}  # every magnitude rule completed exactly once
