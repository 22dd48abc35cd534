"""scripts/gpu_check.sh on a machine without a GPU: its arguments, the commands it would run, and its refusal to run
without CUDA (the GPU run itself is the script's job, not the suite's)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.sh"


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def test_dry_run_prints_the_three_stages_into_one_folder(tmp_path):
    done = run("--dry-run", str(tmp_path / "results"))
    assert done.returncode == 0, done.stderr
    out = str(tmp_path / "results")
    lines = done.stdout.splitlines()
    assert f"results go to {out}" in lines
    stages = [line for line in lines if line.startswith("== ")]
    assert [line.split()[1] for line in stages] == ["pytest_gpu", "throughput", "overhead"]
    assert "-m pytest -m gpu" in stages[0] and f"--junitxml {out}/pytest_gpu.xml" in stages[0]
    for line in stages[1:]:
        assert "--device cuda" in line and f"--output_dir {out}" in line
    assert "--omp_impls numba,torch --overhead_batch_sizes 64,256,1024" in stages[2]
    limits = [int(line.split("at most ")[1].split()[0]) for line in stages]
    assert sum(limits) <= 600, "the stages must fit in 10 minutes"
    assert not (tmp_path / "results").exists(), "a dry run writes nothing"


def test_the_default_folder_is_gpu_results_where_it_is_called(tmp_path):
    done = run("-n", cwd=tmp_path)
    assert done.returncode == 0 and f"results go to {tmp_path}/gpu_results" in done.stdout


@pytest.mark.parametrize("args", [["--bogus"], ["a", "b"]])
def test_bad_arguments_are_refused_with_the_usage(args):
    done = run(*args)
    assert done.returncode == 2 and "usage: scripts/gpu_check.sh" in done.stderr


def test_help():
    done = run("--help")
    assert done.returncode == 0 and "usage: scripts/gpu_check.sh" in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible: the script would run the check")
def test_without_cuda_it_refuses_and_writes_nothing(tmp_path):
    done = run(str(tmp_path / "results"))
    assert done.returncode == 3 and "no CUDA GPU visible" in done.stderr
    assert not (tmp_path / "results").exists()
