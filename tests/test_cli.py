"""The mixmatch command, end to end in subprocesses: exit codes, files written, one-line errors.

The table of bad inputs runs in this process through click's runner (``invoke``): the same command
and error handling without a process start-up (about 5 s of torch and timm imports) per case; the
other tests here start real processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mixmatch_plugin as mm

TINY = ["--model", "mixmatch_plugin.models:tiny_resnet", "--model-kwargs", '{"width": 8}']
ENV = {**os.environ, "MIXMATCH_QUIET": "1", "OMP_NUM_THREADS": "1"}


def run(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mixmatch_plugin", *args], capture_output=True, text=True,
                          cwd=cwd, env=ENV, timeout=timeout)


def invoke(*args: str) -> subprocess.CompletedProcess:
    """``mixmatch -q ARGS`` in this process, with the exit status and the two streams ``run`` reports."""
    from click.testing import CliRunner

    from mixmatch_plugin.app.cli import main

    r = CliRunner().invoke(main, ["-q", *args], prog_name="mixmatch")
    return subprocess.CompletedProcess(["mixmatch", "-q", *args], r.exit_code, r.stdout, r.stderr)


def invoke_bench(*args: str) -> subprocess.CompletedProcess:
    """``python -m benchmarks -q ARGS`` in this process."""
    from click.testing import CliRunner

    from benchmarks.cli import command

    r = CliRunner().invoke(command, ["-q", *args], prog_name="python -m benchmarks")
    return subprocess.CompletedProcess(["python", "-m", "benchmarks", *args], r.exit_code, r.stdout, r.stderr)


def assert_one_line_error(p: subprocess.CompletedProcess, *fragments: str) -> None:
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    lines = [ln for ln in p.stderr.strip().splitlines() if not ln.startswith(("WARNING", "INFO"))]
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert "Traceback" not in p.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def test_every_subcommand_help_has_an_example():
    top = run("--help")
    assert top.returncode == 0
    commands = [c for c in ("inspect", "plan", "demo", "report", "prune", "search", "prune-dw") if f"  {c} " in top.stdout]
    assert {"inspect", "plan", "demo", "report"} <= set(commands)
    for c in commands:
        h = run(c, "--help")
        assert h.returncode == 0 and "Example" in h.stdout, c


def test_inspect_json(tmp_path):
    p = run("inspect", *TINY, "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    roles = {x["name"]: x["role"] for x in doc["layers"]}
    assert doc["preset"] == "resnet" and roles["conv1"] == "stem" and roles["fc"] == "head"
    table = run("inspect", *TINY)
    assert "layer4.0.conv2" in table.stdout and "range" in table.stdout


def test_plan_writes_a_loadable_plan(tmp_path):
    out = tmp_path / "plan.json"
    p = run("plan", *TINY, "--calib", "digits", "--calib-samples", "128", "--target", "0.6", "--extend-ranges",
            "--measure", "wanda", "--out", str(out))
    assert p.returncode == 0, p.stderr
    plan = mm.load_plan(out)
    assert sum("shape" in s.meta for s in plan.strategies) == 30 and plan.meta["target"] == 0.6
    assert {s.meta["clip"] for s in plan.strategies if s.meta.get("family") == "score"} == {"ranges", "bounds", "free"}
    assert [s.name for s in plan.strategies if s.meta.get("family") == "measured"] == [
        "wanda:measured-ranges", "wanda:measured-bounds", "wanda:measured-free"]
    assert all(abs(s.global_sparsity - 0.6) < 0.003 for s in plan.strategies)
    assert "wrote" in p.stdout and "product:early-heavy" in p.stdout
    r = run("report", str(out), "--out", str(tmp_path / "r.html"))
    assert r.returncode == 0, r.stderr
    page = (tmp_path / "r.html").read_text()
    assert page.count("data:image/png;base64") >= 3 and "product:alpha-0.7" in page


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["plan", *TINY, "--calib", "none", "--signals", "magnitude", "--target", "1.0"], ["target sparsity must lie in [0, 1)"]),
        (["plan", *TINY, "--calib", "none", "--signals", "magnitude", "--target", "nan"], ["[0, 1)"]),
        (["plan", "--model", "no_such_pkg.models:net"], ["cannot import module 'no_such_pkg.models'"]),
        (["plan", "--model", "timm:resnet_nonexistent"], ["timm has no model"]),
        (["plan", *TINY[:2], "--model-kwargs", "{width: 8"], ["'--model-kwargs'", "not valid JSON"]),
        (["plan", *TINY, "--calib", "none"], ["need calibration data"]),
        (["plan", *TINY, "--calib", "none", "--signals", "magnitude", "--no-constraint", "colour"], ["unknown constraint 'colour'"]),
        (["plan", *TINY, "--calib", "none", "--signals", "magnitude", "--protect", "^nope$"], ["matches no layer"]),
        (["plan", *TINY, "--calib", "digits", "--input-shape", "3,x,2"], ["must be C,H,W"]),
        (["plan", *TINY, "--calib", "none", "--signals", "magnitude", "--target", "0.99"], ["outside the reachable interval"]),
        (["plan", *TINY, "--calib", "none", "--signals", "magnitude", "--target", "0.99", "--extend-ranges"], ["hard bounds"]),
        (["inspect", *TINY, "--role", "^fc$=mlp"], ["unknown role"]),
        (["report", "missing.json"], ["does not exist"]),
        (["python -m benchmarks", "--tiny", "--sparsities", "0.7,1.5"], ["each --sparsities entry", "1.5"]),
        (["python -m benchmarks", "--tiny", "--sparsities", "0.7,x"], ["each --sparsities entry must be a number", "'x'"]),
        (["python -m benchmarks", "--tiny", "--device", "tpu9"], ["unknown device 'tpu9'", "use cpu, cuda or cuda:N"]),
        (["python -m benchmarks", "--tiny", "--device", "meta"], ["device 'meta'", "only cpu and cuda"]),
        pytest.param(["python -m benchmarks", "--tiny", "--device", "cuda"], ["has no CUDA GPU", "omit --device"],
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")),
        (["python -m benchmarks", "--quick", "--models", "resnet50"], ["unknown benchmark model 'resnet50'", "choose from resnet, swin"]),
        (["python -m benchmarks", "--tiny", "--update-readme", "NOPE.md"], ["no such file"]),
    ],
)
def test_bad_input_gets_one_clear_line(tmp_path, monkeypatch, args, fragments):
    monkeypatch.chdir(tmp_path)
    if args[0] == "python -m benchmarks":
        p = invoke_bench(*args[1:])
    else:
        p = invoke(*args, "--out", str(tmp_path / "x.json")) if args[0] == "plan" else invoke(*args)
    assert_one_line_error(p, *fragments)
    assert not (tmp_path / "x.json").exists()


def test_bad_rules_file_and_checkpoint(tmp_path):
    rules = tmp_path / "r.yaml"
    rules.write_text("rules: [{role: conv, range: [0.2, 0.1]}]\n")
    p = run("plan", *TINY, "--calib", "none", "--signals", "magnitude", "--preset", str(rules), "--out", str(tmp_path / "p.json"))
    assert_one_line_error(p, "must satisfy 0 <= low <= high < 1")
    ckpt = tmp_path / "evil.pt"
    import torch

    torch.save({"state_dict": {}, "payload": Path("x")}, ckpt)  # a pickled class instance: needs code execution
    p = run("inspect", *TINY, "--checkpoint", str(ckpt))
    assert_one_line_error(p, "refusing to load checkpoint", "weights_only=True")


def test_verbose_shows_the_traceback():
    p = run("-v", "plan", *TINY, "--calib", "none", "--signals", "magnitude", "--target", "2")
    assert p.returncode != 0 and "Traceback" in p.stderr


def test_demo_quick_end_to_end(tmp_path):
    p = run("demo", "--quick", "--dataset", "digits", "--out", str(tmp_path / "d"), "--cache-dir", str(tmp_path / "cache"), timeout=600)
    assert p.returncode == 0, p.stderr
    for f in ("plan.json", "summary.json", "report.md", "strategies.png", "ranges.png", "accuracy_vs_sparsity.png", "sensitivity.png"):
        assert (tmp_path / "d" / f).stat().st_size > 0, f
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert summary["chosen"].split(":")[1] in mm.SHAPES or summary["chosen"].split(":")[1].startswith("score-")
    assert all(abs(r["sparsity"] - 0.9) < 1e-3 for r in summary["rows"])
    assert "Mix-and-Match" in p.stdout and "global_magnitude" in p.stdout
    plan = mm.load_plan(tmp_path / "d" / "plan.json")
    assert {"global_magnitude", "uniform", "lamp", "erk", "snip", "grasp"} <= {s.name for s in plan.strategies}
