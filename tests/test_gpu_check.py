"""benchmarks/gpu_check.sh: JSON lines on stdout, a log per stage, and a failing exit status when a
stage fails (the full CPU smoke run, `--device cpu --quick`, takes minutes and is not run here)."""

import json
import subprocess
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


def run(tmp_path, *args):
    out = subprocess.run(["bash", str(SCRIPT), "--log-dir", str(tmp_path), *args],
                         capture_output=True, text=True, timeout=300)
    return out.returncode, [json.loads(line) for line in out.stdout.splitlines()]


def test_env_stage_passes_on_cpu_and_prints_json_lines(tmp_path):
    rc, rows = run(tmp_path, "--device", "cpu", "--only", "env")
    assert rc == 0, rows
    env, stage, summary = rows
    assert env["device"] == "cpu" and env["missing_packages"] == [] and env["csr_float32"]
    assert stage == {**stage, "stage": "env", "status": "ok", "exit": 0}
    assert summary["gpu_check"] == "pass" and summary["failed"] == []
    assert (tmp_path / "env.log").is_file()
    assert [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()] == rows


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_missing_cuda_fails_the_check(tmp_path):
    rc, rows = run(tmp_path, "--only", "env")  # --device cuda is the default
    assert rc == 1
    assert rows[-2]["stage"] == "env" and rows[-2]["status"] == "fail"
    assert rows[-1]["gpu_check"] == "fail" and rows[-1]["failed"] == ["env"]


def test_bad_option_is_refused(tmp_path):
    out = subprocess.run(["bash", str(SCRIPT), "--colour"], capture_output=True, text=True)
    assert out.returncode == 2 and "unknown option --colour" in out.stderr
