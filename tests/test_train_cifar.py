"""train_cifar.py end to end on a CIFAR-format folder of a few dozen images: one process in this one, two under
torchrun (gloo); exact resume, SIGTERM, grids and the errors a user meets first."""
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import train_cifar
from distributed import torchrun

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "UNet-T", "--global-batch-size", "8", "--steps", "4", "--log-every", "1", "--sample-every", "100"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A cifar-10-batches-py folder of 40 random images with labels."""
    folder = tmp_path_factory.mktemp("cifar") / train_cifar.FOLDER
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in train_cifar.TRAIN_BATCHES + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (8, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, 8))}
        (folder / name).write_bytes(pickle.dumps(batch))
    return str(folder.parent)


def checkpoint(run, step):
    return torch.load(Path(run) / "checkpoints" / f"{step:07d}.pt", weights_only=False)


def assert_same_run(a, b):
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][name], b[key][name]) for name in a[key]), key
    assert [s["torch"].tolist() for s in a["rng"]] == [s["torch"].tolist() for s in b["rng"]]


def test_one_process_resumes_exactly_with_augmentation_and_micro_batches(data, tmp_path):
    flags = [*TINY, "--data-path", data, "--micro-batch", "4", "--ckpt-every", "2"]
    train_cifar.main([*flags, "--results-dir", str(tmp_path / "straight")])
    train_cifar.main([*flags, "--results-dir", str(tmp_path / "resumed"), "--stop-at", "2"])
    train_cifar.main([*flags, "--results-dir", str(tmp_path / "resumed")])
    assert_same_run(checkpoint(tmp_path / "straight", 4), checkpoint(tmp_path / "resumed", 4))
    ckpt = checkpoint(tmp_path / "straight", 4)
    assert ckpt["arch"] == "UNet" and ckpt["config"]["lam"] == 0.0 and ckpt["run_config"]["augment_p"] == 0.12
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])


@pytest.mark.slow
def test_two_processes_resume_exactly_and_draw_different_noise(data, tmp_path):
    flags = [*TINY, "--data-path", data, "--class-cond", "--sample-every", "4"]
    torchrun("train_cifar.py", *flags, "--results-dir", str(tmp_path / "straight"))
    torchrun("train_cifar.py", *flags, "--results-dir", str(tmp_path / "resumed"), "--stop-at", "2")
    torchrun("train_cifar.py", *flags, "--results-dir", str(tmp_path / "resumed"))
    straight = checkpoint(tmp_path / "straight", 4)
    assert_same_run(straight, checkpoint(tmp_path / "resumed", 4))
    # Every process's random state is saved, and they differ: each draws its own noise and times.
    assert len(straight["rng"]) == 2 and not torch.equal(straight["rng"][0]["torch"], straight["rng"][1]["torch"])
    # A grid of 32 one-step and 32 two-step samples, 16 to a row.
    import matplotlib.pyplot as plt
    assert plt.imread(tmp_path / "straight" / "samples" / "0000004.png").shape[:2] == (4 * 32, 16 * 32)
    assert "2 process(es)" in (tmp_path / "straight" / "log.txt").read_text()


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_the_same_command_resumes(data, tmp_path):
    run = str(tmp_path / "run")
    flags = [*TINY, "--data-path", data, "--results-dir", run, "--steps", "100000"]
    process = subprocess.Popen([sys.executable, str(ROOT / "train_cifar.py"), *flags], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = Path(run) / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2) and time.time() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err[-2000:]
    assert "SIGTERM: saved step" in out
    saved = int(out.split("SIGTERM: saved step ")[1].split(";")[0])
    assert 2 <= saved < 100000 and checkpoint(run, saved)["step"] == saved
    train_cifar.main([*flags, "--stop-at", str(saved + 1)])                  # the same command resumes
    assert "resuming at step" in (Path(run) / "log.txt").read_text()
    assert checkpoint(run, saved + 1)["step"] == saved + 1


def test_clear_errors(data, tmp_path, capsys):
    with pytest.raises(SystemExit, match="FileNotFoundError: CIFAR-10 not found: looked for .*empty/cifar-10-batches-py"):
        train_cifar.main([*TINY, "--data-path", str(tmp_path / "empty"), "--no-download",
                          "--results-dir", str(tmp_path / "r")])
    with pytest.raises(SystemExit, match="--micro-batch 3 does not divide the per-process batch 8"):
        train_cifar.main([*TINY, "--data-path", data, "--micro-batch", "3", "--results-dir", str(tmp_path / "r")])
    for flag in (["--preset", "imagenet"], ["--model", "UNet-XL"]):
        with pytest.raises(SystemExit):
            train_cifar.main([*TINY, *flag, "--data-path", data, "--results-dir", str(tmp_path / "r")])
        assert "invalid choice" in capsys.readouterr().err


@pytest.mark.slow
def test_global_batch_must_divide_into_the_processes(data, tmp_path):
    run = torchrun("train_cifar.py", *TINY, "--global-batch-size", "7", "--data-path", data,
                   "--results-dir", str(tmp_path / "r"), check=False)
    assert run.returncode != 0
    assert "--global-batch-size 7 does not divide into 2 processes" in run.stderr + run.stdout
