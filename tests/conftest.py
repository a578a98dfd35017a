"""What several test files share."""
import pytest
import torch

import fid


@pytest.fixture(scope="module")
def one_thread():
    """One CPU thread for a module: tiny networks run many small ops, and on a 2-core machine shared with
    other processes two OpenMP threads wait on each other at every op (test_benchmarks.py took 40 s with 2
    threads on a busy machine, 4 s with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def keep_tf32():
    """Puts back the process-wide TF32 settings a test changes, through the installed torch's own API."""
    saved = fid.tf32_settings()
    yield
    fid.set_tf32(saved)
