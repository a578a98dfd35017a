"""Run a script of the project under torchrun (gloo on the CPU) for the end-to-end tests."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def torchrun(script, *flags, processes=2, check=True):
    """`torchrun --standalone --nproc_per_node=processes script flags` in the repository.

    Returns its CompletedProcess.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               str(ROOT / script), *flags]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    if check:
        assert run.returncode == 0, run.stderr[-3000:]
    return run
