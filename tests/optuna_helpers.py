"""Helpers for the Optuna tests: a throw-away PostgreSQL server and `mixmatch search` worker processes."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

MODEL = "mixmatch_plugin.models:tiny_resnet"
MODEL_KWARGS = '{"num_classes": 10, "in_chans": 1, "width": 8}'


def search_args(d: Path, *extra: str) -> list[str]:
    """`search` arguments for the tiny ResNet checkpoint and plan saved in ``d`` (digits, small validation subset)."""
    return [
        "search", "--plan", str(d / "plan.json"), "--model", MODEL, "--model-kwargs", MODEL_KWARGS,
        "--checkpoint", str(d / "model.pt"), "--calib", "digits", "--calib-samples", "256", "--batch-size", "64",
        "--val-samples", "128", *extra,
    ]


def worker(d: Path, *extra: str, log: Path | None = None) -> subprocess.Popen:
    """Start ``mixmatch -q search ...`` as a separate process (a worker)."""
    cmd = [sys.executable, "-c", "from mixmatch_plugin.app.cli import run; run()", "-q", *search_args(d, *extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MIXMATCH_QUIET": "1"}
    out = open(log, "wb") if log is not None else subprocess.DEVNULL  # noqa: SIM115 - closed with the process
    return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pg_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    return found[-1] if found else shutil.which(name)


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """Start PostgreSQL on 127.0.0.1 (free port, trust auth) in a temporary folder; yield a SQLAlchemy URL.

    As root the server runs as the ``postgres`` user (PostgreSQL refuses to run as root). Raises
    RuntimeError with the reason when no server can be started.
    """
    initdb, pg_ctl, createdb = _pg_bin("initdb"), _pg_bin("pg_ctl"), _pg_bin("createdb")
    if not (initdb and pg_ctl and createdb):
        raise RuntimeError("PostgreSQL server binaries (initdb, pg_ctl) not found; apt-get install postgresql")
    prefix: list[str] = []
    tmp = Path(tempfile.mkdtemp(prefix="mixmatch-pg-"))
    if os.geteuid() == 0:
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RuntimeError("running as root and there is no 'postgres' user to run the server") from None
        os.chown(tmp, pw.pw_uid, pw.pw_gid)
        runuser = shutil.which("runuser")
        prefix = [runuser, "-u", "postgres", "--"] if runuser else ["su", "postgres", "-s", "/bin/sh", "-c"]

    def run(*cmd: str) -> None:
        full = [*prefix, " ".join(cmd)] if prefix[:1] == ["su"] else [*prefix, *cmd]
        r = subprocess.run(full, capture_output=True, text=True, timeout=60, cwd=tmp)
        if r.returncode != 0:
            raise RuntimeError(f"{Path(cmd[0]).name} failed: {(r.stderr or r.stdout).strip()[-400:]}")

    data = tmp / "data"
    started = False
    try:
        run(initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        for _attempt in range(3):
            port = _free_port()
            try:
                run(pg_ctl, "-D", str(data), "-l", str(tmp / "server.log"), "-w", "-t", "30", "-o",
                    f"-h 127.0.0.1 -p {port} -k {tmp} -c fsync=off -c synchronous_commit=off -c full_page_writes=off",
                    "start")
                started = True
                break
            except RuntimeError:
                continue
        if not started:
            log = (tmp / "server.log").read_text(errors="replace")[-400:] if (tmp / "server.log").exists() else ""
            raise RuntimeError(f"the PostgreSQL server did not start: {log}")
        run(createdb, "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "mixmatch")
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/mixmatch"
    finally:
        if started:
            with contextlib.suppress(Exception):
                run(pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(tmp, ignore_errors=True)
