"""``mixmatch prune-dw``: a SIGKILLed run resumes and finishes like an uninterrupted one; one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from mixmatch_plugin.app.cli import main

pytest.importorskip("torch_pruning")
pytest.importorskip("timm")

ROOT = Path(__file__).resolve().parents[1]
KWARGS = json.dumps({"num_classes": 10, "in_chans": 1, "stem_type": "deep", "stem_width": 4, "channels": [8, 16, 32, 64]})
ARGS = ["--model", "timm:resnet18", "--model-kwargs", KWARGS, "--data", "digits", "--target", "0.2", "--min-blocks", "1",
        "--finetune-steps", "2", "--calib-samples", "64", "--bisect-steps", "6", "--macs-tolerance", "0.05"]


def _cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mixmatch_plugin", "-q", "prune-dw", *ARGS, "--out", str(out), *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "MIXMATCH_QUIET": "1"}


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_sigkilled_run_resumes_and_ends_like_an_uninterrupted_one(tmp_path):
    out = tmp_path / "dw.pt"
    proc = subprocess.Popen(_cmd(out), cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not out.exists():  # the first checkpoint appears after iteration 1
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        assert time.time() < deadline, "no checkpoint after 240 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # mid-iteration 2: the process gets no chance to clean up
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    killed = _state(out)
    done = len(killed["log"])
    assert killed["stopped"] is None and done >= 1

    resumed = subprocess.run(_cmd(out), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed {out} after iteration {done}" in resumed.stdout
    ran = [int(line.split()[1].rstrip(":")) for line in resumed.stdout.splitlines() if line.startswith("iteration ")]
    assert ran and ran[0] == done + 1  # nothing finished before the kill is repeated
    final = _state(out)
    its = [e["iteration"] for e in final["log"]]
    assert its == list(range(1, len(its) + 1)) and final["stopped"] == "target"
    assert final["log"][:done] == killed["log"]

    whole = tmp_path / "whole.pt"
    straight = subprocess.run(_cmd(whole), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-2000:]
    ref = _state(whole)
    assert [e["choice"] for e in ref["log"]] == [e["choice"] for e in final["log"]]
    assert ref["ops"] == final["ops"]
    assert ref["state_dict"].keys() == final["state_dict"].keys()
    assert all(torch.equal(ref["state_dict"][k], final["state_dict"][k]) for k in ref["state_dict"])


def _invoke(*args: str):
    return CliRunner().invoke(main, ["-q", "prune-dw", *args])


def test_out_of_range_target_and_bad_strategy_are_one_line_errors(tmp_path):
    res = _invoke(*[a if a != "0.2" else "1.5" for a in ARGS], "--out", str(tmp_path / "x.pt"))
    assert res.exit_code == 2 and "error: MACs target 1.5 is out of range" in res.output
    assert len(res.output.strip().splitlines()) == 1
    res = _invoke(*ARGS, "--strategy", "magnitude:sideways", "--out", str(tmp_path / "x.pt"))
    assert res.exit_code == 2 and "error: width strategy 'magnitude:sideways'" in res.output


def test_resume_file_from_another_configuration_is_refused(tmp_path):
    out = tmp_path / "dw.pt"
    first = _invoke(*ARGS, "--max-iterations", "0", "--out", str(out))
    assert first.exit_code == 0, first.output
    assert _state(out)["log"] == []
    res = _invoke(*ARGS, "--block-score", "cka", "--out", str(out))
    assert res.exit_code == 2
    assert "another configuration (differs in config (block_score))" in res.output
    res = _invoke(*ARGS, "--seed", "1", "--out", str(out))
    assert res.exit_code == 2 and "differs in config (seed)" in res.output
    again = _invoke(*ARGS, "--block-score", "cka", "--max-iterations", "0", "--restart", "--out", str(out))
    assert again.exit_code == 0, again.output


def test_a_model_without_supported_blocks_is_named(tmp_path):
    res = _invoke("--model", "timm:mobilenetv3_small_050", "--model-kwargs", '{"num_classes": 10}', "--data", "random",
                  "--input-shape", "3,32,32", "--target", "0.3", "--out", str(tmp_path / "m.pt"))
    assert res.exit_code == 2
    assert "MobileNetV3 has no block that depth pruning supports" in res.output and "use width pruning only" in res.output
