"""benchmarks/gpu_check.py without a GPU: its CPU reference runs, and it says that the CUDA
stages did not (the CUDA stages themselves need a GPU machine)."""

import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO

pytestmark = pytest.mark.slow


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script runs every stage")
def test_gpu_check_without_cuda_runs_the_reference_and_says_so(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/gpu_check.py"), "--threads", "1",
         "--work", str(tmp_path / "work")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    stages = [line for line in lines if line.startswith("[")]
    assert len(stages) == 2, done.stdout
    assert stages[0].startswith("[ok  ] reference: cpu fp32 cam train+maps")
    assert stages[1].startswith("[ok  ] reference: cpu fp32 cpal train+maps")
    assert lines[-1].startswith("no CUDA device here: only the CPU reference ran")
