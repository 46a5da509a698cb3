"""Interrupted work, with real process kills: `mixmatch prune`, `bench` and `search` killed at random moments.

What must hold whatever the moment (the delays are drawn at random on every run and shown on failure):

* the output is absent, or the previous/complete file: never a partial one (writes are temp file + rename);
* SIGINT (Ctrl-C) ends a command with the one line ``error: interrupted`` and status 130, no traceback;
* SIGTERM ends it with ``error: terminated (SIGTERM)`` and status 143;
* after SIGKILL a temp file may be left (nothing runs in a killed process), never a partial output;
* a rerun finishes the work: the benchmark skips the seeds it saved, `search` re-runs the seed that was cut short.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import mixmatch_plugin as mm
from mixmatch_plugin.app.data import has_fashion_mnist

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MIXMATCH_QUIET": "1"}
TINY_SPEC = {"model": "mixmatch_plugin.models:tiny_resnet", "model_kwargs": {"num_classes": 10, "in_chans": 1, "width": 8},
             "input_shape": [1, 16, 16]}
RNG = random.Random()
ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def default_sigint() -> None:
    """In the child: Ctrl-C as in a terminal. A shell's background job (``pytest &``) has SIGINT ignored,
    and children inherit that; the CLI rightly leaves an ignored SIGINT ignored (``nohup``)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mixmatch_plugin", "-q", *args], env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=default_sigint)


def start_bench(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "benchmarks", "-q", *args], env=ENV, text=True, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=default_sigint)


def kill_after(p: subprocess.Popen, seconds: float, sig: int) -> tuple[int, str]:
    """Send ``sig`` after ``seconds`` (unless the process already ended); return its status and stderr."""
    try:
        p.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        p.send_signal(sig)
    _, err = p.communicate(timeout=300)
    return p.returncode, err


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.strip().splitlines() if not ln.startswith(("WARNING", "INFO"))]


def assert_interrupted_cleanly(code: int, stderr: str, what: str) -> None:
    """Either the command had finished (0) or it says, in one line, that it was interrupted (130)."""
    assert code in (0, 130), (what, code, stderr[-2000:])
    assert "Traceback" not in stderr, (what, stderr[-2000:])
    if code == 130:
        assert error_lines(stderr) == ["error: interrupted"], (what, stderr[-2000:])


def temps(folder: Path, name: str) -> set[str]:
    """The temp files of ``name`` in ``folder``; anything else but ``name`` itself fails the test."""
    if not folder.exists():
        return set()
    others = {p.name for p in folder.iterdir()} - {name}
    assert all(n.startswith(f".{name}.") and n.endswith(".tmp") for n in others), others
    return others


# ------------------------------------------------------------------------------------------- prune
@pytest.fixture(scope="module")
def prune_plan(tmp_path_factory, calib):
    from mixmatch_plugin.models import tiny_resnet

    torch.manual_seed(0)
    model = tiny_resnet(num_classes=10, in_chans=1, width=8)
    p = mm.plan(model, calib, target=0.5, on_unreachable="extend")
    p.meta["model_spec"] = TINY_SPEC
    return p.save(tmp_path_factory.mktemp("kill") / "plan.json")


def test_prune_killed_at_random_moments_leaves_no_partial_file(prune_plan, tmp_path):
    from mixmatch_plugin.adapters.artifact import load_pruned

    out = tmp_path / "out"
    target = out / "pruned.pt"
    args = ("prune", "--plan", str(prune_plan), "--strategy", "product:alpha-0.7", "--calib", "digits",
            "--calib-samples", "64", "--out", str(target))

    def state() -> dict | None:
        if not target.exists():
            return None
        model, meta = load_pruned(target)  # a partial file would fail here
        assert meta["strategy"]["name"] == "product:alpha-0.7"
        return model.state_dict()

    # SIGKILL anywhere, start-up included: no handler runs, only the atomic rename protects the file
    t_kill = RNG.uniform(0.2, 8.0)
    kill_after(start(*args), t_kill, signal.SIGKILL)
    after_kill = state()
    left = temps(out, target.name)

    # SIGINT once the command runs: one line, status 130, and no temp file of its own
    t_int = RNG.uniform(0.5, 6.0)
    code, err = kill_after(start(*args), t_int, signal.SIGINT)
    assert_interrupted_cleanly(code, err, f"SIGINT after {t_int:.2f} s")
    after_int = state()
    if after_kill is not None:
        assert after_int is not None  # an existing good file is never lost
    assert temps(out, target.name) <= left, f"SIGINT after {t_int:.2f} s left a temp file"

    # a rerun completes
    r = subprocess.run([sys.executable, "-m", "mixmatch_plugin", "-q", *args], env=ENV, text=True, capture_output=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    final = state()
    assert final is not None and temps(out, target.name) <= left, f"SIGKILL after {t_kill:.2f} s"
    for earlier in (after_kill, after_int):
        if earlier is not None:  # the same strategy, the same weights: complete files are identical
            assert all(torch.equal(earlier[k], final[k]) for k in final)


def run_probe(tmp_path: Path, source: str, *args: str, **extra_env: str) -> subprocess.CompletedProcess:
    """Run ``source`` as a module under ``python -m`` (as the ``mixmatch`` executable runs), Ctrl-C as in a terminal."""
    (tmp_path / "mm_probe.py").write_text(source)
    env = {**ENV, **extra_env, "PYTHONPATH": os.pathsep.join([str(tmp_path), ENV.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "mm_probe", *args], env=env, text=True, capture_output=True,
                          timeout=120, cwd=tmp_path, preexec_fn=default_sigint)


PROBE = '''
from mixmatch_plugin.app.cli import main, run

@main.command("probe")
def probe() -> None:
    # Ctrl-C while a string is being exec'd, as when a dataclass is created during a lazy import
    exec("import os, signal\\nos.kill(os.getpid(), signal.SIGINT)\\nfor _ in range(10**8): pass")

run()
'''


def test_ctrl_c_inside_exec_under_python_m_exits_130(tmp_path):
    r = run_probe(tmp_path, PROBE, "probe")
    assert_interrupted_cleanly(r.returncode, r.stderr, "SIGINT inside exec")
    assert r.returncode == 130


LATE = '''
import atexit, os, signal, time
from mixmatch_plugin.app.cli import main, run

@main.command("probe")
def probe() -> None:
    # the work is done; Ctrl-C lands while the interpreter shuts down (here: in an atexit callback)
    atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(0.2)))

run()
'''


def test_ctrl_c_after_the_work_is_done_keeps_status_0(tmp_path):
    r = run_probe(tmp_path, LATE, "probe")
    assert (r.returncode, r.stderr) == (0, "")


# ------------------------------------------------------------------------------------------- bench
@pytest.mark.skipif(not has_fashion_mnist(), reason="needs Fashion-MNIST (apt-get install dataset-fashion-mnist)")
def test_bench_killed_mid_run_resumes_where_it_stopped(tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    results = out / "tiny.json"
    args = ("--tiny", "--seeds", "0,1", "--out", str(out), "--cache-dir", str(cache))
    p = start_bench(*args)
    deadline = time.monotonic() + 400
    seen = 0
    while time.monotonic() < deadline and p.poll() is None:
        if results.exists():
            doc = json.loads(results.read_text())  # every read is a complete file, even while the run writes
            seen += 1
            if doc["models"].get("resnet", {}).get("runs"):
                break
        time.sleep(0.2)
    assert seen, p.communicate()[1][-2000:]
    t_kill = RNG.uniform(0.0, 3.0)  # somewhere in the second seed (or, rarely, after it)
    kill_after(p, t_kill, signal.SIGKILL)
    doc = json.loads(results.read_text())
    done = {r["seed"] for r in doc["models"]["resnet"]["runs"]}
    assert 0 in done and done <= {0, 1}
    first_seconds = doc["models"]["resnet"]["seconds"]["0"]
    first_rows = [r for r in doc["models"]["resnet"]["runs"] if r["seed"] == 0]

    r = subprocess.run([sys.executable, "-m", "benchmarks", "-q", *args], env=ENV, text=True, capture_output=True,
                       timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads(results.read_text())
    m = doc["models"]["resnet"]
    assert {r["seed"] for r in m["runs"]} == {0, 1}
    assert m["seconds"]["0"] == first_seconds  # seed 0 was resumed from the file, not computed again
    assert [r for r in m["runs"] if r["seed"] == 0] == first_rows
    # besides the results and plots, at most the temp file of a write the kill landed in
    left = {p.name for p in out.iterdir()} - {"tiny.json", "resnet-one-shot.png", "resnet-fine-tuned.png"}
    assert all(n.startswith(".") and n.endswith(".tmp") for n in left), f"SIGKILL after {t_kill:.2f} s: {left}"


# ------------------------------------------------------------------------------------------ search
@pytest.fixture(scope="module")
def search_files(trained_tiny_resnet, calib, tmp_path_factory):
    d = tmp_path_factory.mktemp("search-kill")
    torch.save(trained_tiny_resnet.state_dict(), d / "model.pt")
    mm.plan(trained_tiny_resnet, calib, signals=("magnitude",)).save(d / "plan.json")
    return d


def test_search_interrupted_by_ctrl_c_reruns_the_cut_trial(search_files, tmp_path):
    optuna = pytest.importorskip("optuna")
    SEED_ATTR = pytest.importorskip("mixmatch_plugin.adapters.optuna.search").SEED_ATTR
    state = optuna.trial.TrialState
    out = tmp_path / "out"
    storage = f"sqlite:///{out / 'search.db'}"
    args = ("search", "--plan", str(search_files / "plan.json"), "--model", TINY_SPEC["model"],
            "--model-kwargs", json.dumps(TINY_SPEC["model_kwargs"]), "--checkpoint", str(search_files / "model.pt"),
            "--calib", "digits", "--calib-samples", "64", "--val-samples", "64", "--evaluator", "finetune",
            "--finetune-steps", "5", "--heartbeat", "1", "--grace", "2", "--out", str(out), "--no-plots")
    p = start(*args, "--n-trials", "40")
    deadline = time.monotonic() + 400
    done = 0
    while time.monotonic() < deadline and p.poll() is None and done < 3:
        time.sleep(0.3)
        if (out / "search.db").exists():
            try:
                done = len(optuna.load_study(study_name="mixmatch", storage=storage).get_trials(states=(state.COMPLETE,)))
            except Exception:  # the worker is still creating the study
                done = 0
    assert done >= 3, p.communicate()[1][-2000:]
    t_int = RNG.uniform(0.0, 1.0)
    code, err = kill_after(p, t_int, signal.SIGINT)
    assert code == 130, (code, err[-2000:])
    assert_interrupted_cleanly(code, err, f"SIGINT after {t_int:.2f} s")
    study = optuna.load_study(study_name="mixmatch", storage=storage)
    trials = study.get_trials()
    # the trial cut short is failed (Ctrl-C in the evaluation) or, when the Ctrl-C landed in Optuna's own
    # bookkeeping, left RUNNING until its heartbeat goes stale; every finished trial is kept
    cut = [t for t in trials if t.state in (state.FAIL, state.RUNNING)]
    assert len(cut) <= 1 and len([t for t in trials if t.state == state.COMPLETE]) >= 3
    for name in ("plan.json", "search.json"):  # written at the end only: absent, or complete
        assert not (out / name).exists() or json.loads((out / name).read_text())

    time.sleep(2.5)  # past the grace period: a trial left RUNNING is stale, failed and retried by the rerun
    r = subprocess.run([sys.executable, "-m", "mixmatch_plugin", "-q", *args, "--n-trials", "40", "--total-trials", "12"],
                       env=ENV, text=True, capture_output=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    study = optuna.load_study(study_name="mixmatch", storage=storage)
    complete = study.get_trials(states=(state.COMPLETE,))
    seeds = {t.user_attrs.get(SEED_ATTR) for t in complete} - {None}
    # every rule seed evaluated, the cut one too; except when the Ctrl-C landed inside Optuna's `ask`, after the
    # trial was set RUNNING and before its first heartbeat: Optuna never fails a trial that has no heartbeat
    # (RDBStorage._get_stale_trial_ids skips it), so its seed stays taken by a RUNNING trial
    with contextlib.closing(sqlite3.connect(out / "search.db")) as db:
        beating = {n for (n,) in db.execute("SELECT number FROM trials JOIN trial_heartbeats USING (trial_id)")}
    silent = {t.user_attrs.get(SEED_ATTR) for t in study.get_trials(states=(state.RUNNING,)) if t.number not in beating}
    assert len(silent) <= 1 and seeds | silent == {f"magnitude:{shape}" for shape in mm.SHAPES}, (seeds, silent)
    assert mm.load_plan(out / "plan.json").meta["search"]["trials"] >= 12


# ---------------------------------------------------------------------------------- every command
COMMAND_ARGS = {
    "inspect": ["--model", "timm:resnet18"], "plan": ["--model", "timm:resnet18"],
    "prune": ["--plan", "p.json", "--strategy", "s", "--out", "o.pt"], "search": ["--plan", "p.json", "--model", "timm:resnet18"],
    "demo": [], "report": ["r.json"],
}


@pytest.mark.parametrize("name", sorted(COMMAND_ARGS))
@pytest.mark.parametrize(("exc", "code", "line"), [(KeyboardInterrupt, 130, "error: interrupted"),
                                                    (None, 143, "error: terminated (SIGTERM)")])
def test_every_command_turns_an_interrupt_into_one_line(monkeypatch, name, exc, code, line):
    """Whatever a command is doing when Ctrl-C (or SIGTERM) arrives, the group says it in one line."""
    from click.testing import CliRunner

    from mixmatch_plugin.app.cli import Interrupted, main

    def interrupted(*args, **kwargs):
        raise (exc or (lambda: Interrupted(signal.SIGTERM)))()

    monkeypatch.setattr(main.commands[name], "callback", interrupted)
    r = CliRunner().invoke(main, ["-q", name, *COMMAND_ARGS[name]], catch_exceptions=False)
    assert r.exit_code == code and r.stderr == line + "\n" and r.stdout == "", (r.exit_code, r.output)


def test_sigterm_unwinds_the_command_like_ctrl_c(tmp_path):
    """SIGTERM (schedulers, timeouts) reaches the command as an exception: one line, status 143."""
    p = start_bench("--tiny", "--out", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c"))
    code, err = kill_after(p, 1.5, signal.SIGTERM)
    assert code == 143 and error_lines(err) == ["error: terminated (SIGTERM)"] and "Traceback" not in err, (code, err[-2000:])


STRAY_THREAD = """
import threading, click
from mixmatch_plugin.app.cli import guarded, run

@click.command()
@click.pass_context
def work(ctx):
    def body():  # Ctrl-C lands just after a library started a worker thread it meant to stop on the way out
        threading.Thread(target=threading.Event().wait).start()
        raise KeyboardInterrupt
    guarded(ctx, body)

run(work)
"""


def test_an_interrupt_that_strands_a_library_thread_still_ends_the_process():
    """A thread a library started and never got to stop (Optuna's heartbeat, cut in its start) must not hang the exit."""
    r = subprocess.run([sys.executable, "-c", STRAY_THREAD], env=ENV, text=True, capture_output=True, timeout=60)
    assert r.returncode == 130 and error_lines(r.stderr) == ["error: interrupted"], (r.returncode, r.stderr[-2000:])


def test_a_library_error_raised_while_an_interrupt_unwinds_is_still_an_interrupt():
    """Optuna 5.1's _run_trial raises UnboundLocalError from its finally when Ctrl-C lands in its tell; the CLI
    said "error: unexpected UnboundLocalError" and exited 1 (seen in the search interrupt test above)."""
    import click
    from click.testing import CliRunner

    from mixmatch_plugin.app.cli import guarded

    @click.command()
    @click.pass_context
    def work(ctx):
        def body():
            try:
                raise KeyboardInterrupt
            finally:
                raise UnboundLocalError("cannot access local variable 'updated_state'")
        guarded(ctx, body)

    r = CliRunner().invoke(work, [])
    assert r.exit_code == 130 and "error: interrupted" in r.output and "Unbound" not in r.output, r.output
