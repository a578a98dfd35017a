"""train_cifar.py: the CIFAR-10 archive, loading and downloading, EDM's augmentation, the script end to end.

The archive is a small one in the real format; the script runs on a CIFAR-format folder of a few dozen images:
one process, and two under torchrun (gloo); exact resume, SIGTERM, grids and the errors a user meets first.
"""
import hashlib
import io
import json
import math
import os
import pickle
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_cifar
import training.data
from distributed import torchrun

PER_BATCH = 6  # 30 training images


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """A cifar-10-python.tar.gz of random images in the real layout: (path, md5, images, labels)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (5 * PER_BATCH, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (5 * PER_BATCH,), generator=g)
    path = tmp_path_factory.mktemp("src") / training.data.ARCHIVE
    with tarfile.open(path, "w:gz") as tar:
        def add(name, obj):
            data = pickle.dumps(obj)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for i, name in enumerate(training.data.TRAIN_BATCHES + ["test_batch"]):
            rows = slice(i * PER_BATCH, (i + 1) * PER_BATCH) if i < 5 else slice(0, PER_BATCH)
            # Channel-major rows as in the real files: (n, 3, 32, 32) -> (n, 3072).
            add(f"{training.data.FOLDER}/{name}", {b"batch_label": name.encode(), b"filenames": [],
                                       b"labels": labels[rows].tolist(),
                                       b"data": images[rows].reshape(-1, 3072).numpy()})
        add("../escape", {b"data": None})  # members outside the folder must never be written
        add(f"{training.data.FOLDER}/extra", {b"data": None})
    md5 = hashlib.md5(path.read_bytes()).hexdigest()
    return path, md5, images, labels


def check_loaded(got, archive):
    x, y = got
    assert x.dtype == torch.uint8 and x.shape == (5 * PER_BATCH, 3, 32, 32)
    assert y.dtype == torch.int64
    assert torch.equal(x, archive[2]) and torch.equal(y, archive[3])


# ----- Loading -----

def test_load_from_archive_then_folders(tmp_path, archive):
    path, md5, *_ = archive
    (tmp_path / training.data.ARCHIVE).write_bytes(path.read_bytes())
    check_loaded(training.data.load_cifar10(tmp_path, download=False, md5=md5), archive)  # extracts it
    assert not (tmp_path.parent / "escape").exists() and not (tmp_path / "escape").exists()
    # no temporary folder
    assert sorted(os.listdir(tmp_path)) == sorted([training.data.ARCHIVE, training.data.FOLDER])
    assert sorted(os.listdir(tmp_path / training.data.FOLDER)) == training.data.TRAIN_BATCHES + ["test_batch"]
    (tmp_path / training.data.ARCHIVE).unlink()
    check_loaded(training.data.load_cifar10(tmp_path, download=False), archive)  # root holds the folder
    # root is it
    check_loaded(training.data.load_cifar10(tmp_path / training.data.FOLDER, download=False), archive)


def test_download_via_url(tmp_path, archive):
    path, md5, *_ = archive
    folder = training.data.download_cifar10(tmp_path / "dl", url=path.as_uri(), md5=md5)
    assert folder == str(tmp_path / "dl" / training.data.FOLDER)
    assert (tmp_path / "dl" / training.data.ARCHIVE).read_bytes() == path.read_bytes()
    check_loaded(training.data.load_cifar10(tmp_path / "dl", download=False), archive)
    check_loaded(training.data.load_cifar10(tmp_path / "dl2", url=path.as_uri(), md5=md5), archive)


def test_download_wrong_md5_keeps_nothing(tmp_path, archive):
    path, md5, *_ = archive
    with pytest.raises(ValueError) as e:
        training.data.download_cifar10(tmp_path, url=path.as_uri(), md5="0" * 32)
    msg = str(e.value)
    assert md5 in msg and "0" * 32 in msg and training.data.ARCHIVE in msg and "--data-path" in msg
    assert os.listdir(tmp_path) == []


def test_existing_archive_wrong_md5(tmp_path, archive):
    (tmp_path / training.data.ARCHIVE).write_bytes(archive[0].read_bytes()[:-10])
    with pytest.raises(ValueError, match="Delete it"):
        training.data.load_cifar10(tmp_path)
    assert os.listdir(tmp_path) == [training.data.ARCHIVE]  # the user's file stays; nothing extracted


def test_download_failure_says_what_to_do(tmp_path):
    with pytest.raises(RuntimeError, match="by hand to .*cifar-10-python.tar.gz.*--data-path"):
        training.data.download_cifar10(tmp_path, url=(tmp_path / "nowhere.tar.gz").as_uri())
    assert os.listdir(tmp_path) == []


def test_missing_without_download(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        training.data.load_cifar10(tmp_path, download=False)
    for looked_for in ["data_batch_1", training.data.FOLDER, training.data.ARCHIVE]:
        assert looked_for in str(e.value)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("batch", [b"not a pickle", {b"data": [[1, 2]], b"labels": [0]},
                                   {b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]},
                                   {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}])
def test_corrupt_batch(tmp_path, archive, batch):
    path, md5, *_ = archive
    training.data.download_cifar10(tmp_path, url=path.as_uri(), md5=md5)
    content = batch if isinstance(batch, bytes) else pickle.dumps(batch)
    (tmp_path / training.data.FOLDER / "data_batch_3").write_bytes(content)
    with pytest.raises(ValueError, match="data_batch_3.*extract the archive again"):
        training.data.load_cifar10(tmp_path)


def test_model_range_round_trip():
    u = torch.arange(256, dtype=torch.uint8)
    x = train_cifar.to_model_range(u)
    assert x.dtype == torch.float32 and x[0] == -1 and x[-1] == 1
    assert torch.equal((x * 127.5 + 128).clamp(0, 255).to(torch.uint8), u)  # DESIGN section 6


# ----- Augmentation -----

def images(n, size=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g, dtype=dtype) * 2 - 1


def edm_theta(w_scale, a, b, tx, ty, H, W, aniso_sign=1.0):
    """Our own reading of EDM's G_inv as 3x3 products, from the labels, as theta for affine_grid."""
    def m(*rows):
        return torch.tensor(rows, dtype=torch.float64)
    def rot(t):
        return m([math.cos(t), -math.sin(t), 0], [math.sin(t), math.cos(t), 0], [0, 0, 1])
    # The labels give (w cos r, w sin r); the pair (w, r) is read back as (+-|.|, atan2).
    w, r = aniso_sign * math.hypot(a, b), math.atan2(b, a)
    s, q = 2 ** (0.2 * w_scale), 2 ** (0.2 * w)
    G_inv = (m([1 / s, 0, 0], [0, 1 / s, 0], [0, 0, 1]) @ rot(-r)
             @ m([1 / q, 0, 0], [0, q, 0], [0, 0, 1]) @ rot(r)
             @ m([1, 0, -tx * W / 8], [0, 1, -ty * H / 8], [0, 0, 1]))
    to_unit = m([2 / W, 0, 0], [0, 2 / H, 0], [0, 0, 1])
    return (to_unit @ G_inv @ torch.linalg.inv(to_unit))[:2]


def warp(x, theta):
    grid = F.affine_grid(theta[None].to(x.dtype), [1, *x.shape], align_corners=False)
    return F.grid_sample(x[None], grid, padding_mode="reflection", align_corners=False)[0]


def test_p0_is_identity():
    x = images(64)
    y, labels = train_cifar.augment(x, p=0)
    assert torch.equal(y, x) and labels.shape == (64, train_cifar.AUGMENT_DIM) and not labels.any()


def test_flip_only_is_exact():
    x = images(256)
    g = torch.Generator().manual_seed(1)
    y, labels = train_cifar.augment(x, p=0.12, generator=g, scale=0, aniso=0, translate=0)
    flipped = labels[:, 0] == 1
    assert not labels[:, 1:].any() and 0.35 < flipped.float().mean() < 0.65
    assert torch.equal(y[flipped], x[flipped].flip(3)) and torch.equal(y[~flipped], x[~flipped])


def test_seeded_generator_is_deterministic():
    x = images(64)
    a = train_cifar.augment(x, p=0.5, generator=torch.Generator().manual_seed(3))
    b = train_cifar.augment(x, p=0.5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    torch.manual_seed(3)
    c = train_cifar.augment(x, p=0.5)
    assert torch.equal(a[1], c[1])  # generator=None draws from the global RNG


def test_integer_translation_against_a_shift():
    # w = 0.25 moves by 0.25 * 32 * 0.125 = 1 pixel (right in x, down in y); border pixels repeat.
    x = images(1, size=32)[0]
    zero = torch.zeros(1)
    theta = train_cifar.affine_theta(zero, zero, zero, torch.tensor([[0.25], [-0.5]]), 32, 32)[0]
    expect = torch.cat([x[:, :, :1], x[:, :, :-1]], 2)  # 1 px right
    expect = torch.cat([expect[:, 2:], expect[:, -1:], expect[:, -2:-1]], 1)  # 2 px up, reflected
    assert torch.allclose(warp(x, theta), expect, atol=1e-5)


def test_isotropic_scale_against_bilinear_by_hand():
    x = images(1, size=32, dtype=torch.float64)[0]
    zero = torch.zeros(1, dtype=torch.float64)
    five, no_shift = zero + 5, torch.zeros(2, 1, dtype=torch.float64)
    theta = train_cifar.affine_theta(five, zero, zero, no_shift, 32, 32)[0]  # 2 ** (5 * 0.2) = 2x zoom
    # Output pixel i samples the input at (i - 15.5) / 2 + 15.5: linear interpolation matrix A.
    pos = (torch.arange(32, dtype=torch.float64) - 15.5) / 2 + 15.5
    A = torch.zeros(32, 32, dtype=torch.float64)
    i0 = pos.floor().long()
    A[torch.arange(32), i0] = 1 - (pos - i0)
    A[torch.arange(32), i0 + 1] = pos - i0
    assert torch.allclose(warp(x, theta), A @ x @ A.T, atol=1e-12)


def test_theta_matches_edm_composition():
    # The labels cannot tell an anisotropic stretch from its inverse, so check the convention here:
    # w = 5, r = 0 stretches x by 2 (output x samples the input at x / 2) and squeezes y by 2.
    zero = torch.zeros(1, dtype=torch.float64)
    theta = train_cifar.affine_theta(zero, zero + 5, zero, torch.zeros(2, 1, dtype=torch.float64), 8, 8)[0]
    assert torch.allclose(theta, torch.tensor([[0.5, 0, 0], [0, 2, 0]], dtype=torch.float64))
    g = torch.Generator().manual_seed(5)
    w_scale, w_aniso, r = torch.randn(3, 20, generator=g, dtype=torch.float64)
    w_t = torch.randn(2, 20, generator=g, dtype=torch.float64)
    thetas = train_cifar.affine_theta(w_scale, w_aniso, r, w_t, 8, 12)
    for i in range(20):
        w, ri = w_aniso[i].item(), r[i].item()
        expect = edm_theta(w_scale[i].item(), w * math.cos(ri), w * math.sin(ri), w_t[0, i].item(),
                           w_t[1, i].item(), 8, 12, math.copysign(1, w))
        assert torch.allclose(thetas[i], expect, atol=1e-12)


@pytest.mark.parametrize("kind", ["scale", "translate", "aniso", "all"])
def test_labels_reproduce_the_output(kind):
    x = images(300, dtype=torch.float64)
    only = {} if kind == "all" else dict(scale=0, aniso=0, translate=0) | {kind: 1}
    y, labels = train_cifar.augment(x, p=0.5, generator=torch.Generator().manual_seed(2), **only)
    moved = labels[:, 1:].any(1).nonzero().squeeze(1)
    assert len(moved) > 50
    unflipped = torch.where(labels[:, :1, None, None] == 1, x.flip(3), x)
    for i in moved.tolist():
        w_scale, a, b, tx, ty = labels[i, 1:].tolist()
        # The aniso labels fit two inverse stretches; the output must match one of them. The labels
        # hold float32 products (w cos r, w sin r), hence the tolerance.
        errors = [(warp(unflipped[i], edm_theta(w_scale, a, b, tx, ty, 8, 8, sign)) - y[i])
                  .abs().max() for sign in (1.0, -1.0)]
        assert min(errors) < 1e-6, (i, labels[i], errors)
        if kind in ("scale", "translate"):
            assert errors[0] < 1e-10
    still = labels[:, 1:].eq(0).all(1)
    assert torch.equal(y[still], unflipped[still])


def test_range_and_rates():
    x = images(20000, size=4)
    x[:, :, 0] = 1.0  # images at both ends of the range
    x[:, :, -1] = -1.0
    y, labels = train_cifar.augment(x, generator=torch.Generator().manual_seed(4))
    assert y.min() >= -1 and y.max() <= 1
    rate = (labels != 0).float().mean(0)
    assert abs(rate[0] - 0.5) < 0.02
    for col in [1, 2, 4, 5]:  # scale, aniso, translate x and y: each about p = 0.12
        assert abs(rate[col] - 0.12) < 0.015, (col, rate)
    assert abs(rate[3] / rate[2] - 0.5) < 0.06  # half of the anisotropic stretches are rotated
    assert torch.equal(labels[:, 4] != 0, labels[:, 5] != 0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtype_and_device(dtype):
    x = images(128, dtype=torch.float32).to(dtype)
    y, labels = train_cifar.augment(x, p=0.5)
    assert y.dtype == labels.dtype == dtype and y.device == labels.device == x.device
    assert labels[:, 1:].any() and y.float().abs().max() <= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda():
    x = images(256).cuda()
    y, labels = train_cifar.augment(x, p=0.5, generator=torch.Generator("cuda").manual_seed(0))
    assert y.is_cuda and labels.is_cuda
    still = labels.eq(0).all(1)
    assert torch.equal(y[still], x[still])


# ----- The script end to end -----

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "UNet-T", "--global-batch-size", "8", "--steps", "4", "--log-every", "1",
        "--sample-every", "100"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A cifar-10-batches-py folder of 40 random images with labels."""
    folder = tmp_path_factory.mktemp("cifar") / training.data.FOLDER
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in training.data.TRAIN_BATCHES + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (8, 3072), dtype=np.uint8),
                 b"labels": list(rng.integers(0, 10, 8))}
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
    assert len(straight["rng"]) == 2
    assert not torch.equal(straight["rng"][0]["torch"], straight["rng"][1]["torch"])
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


def test_distilling_a_flow_matching_run_and_resuming_only_with_the_same_teacher(data, tmp_path):
    flags = [*TINY, "--data-path", data]
    teacher = str(tmp_path / "fm")
    train_cifar.main([*flags, "--flow-matching", "--ema-every", "1", "--results-dir", teacher])
    assert checkpoint(teacher, 4)["config"]["lam"] == 1.0
    student = str(tmp_path / "student")
    distil = [*flags, "--teacher", teacher, "--init-from", teacher, "--results-dir", student]
    train_cifar.main([*distil, "--stop-at", "2"])
    log = (Path(student) / "log.txt").read_text()
    assert f"distilling {teacher}/checkpoints/0000004.pt: a UNet trained as flow matching" in log
    assert f"a new run from the EMA weights of {teacher}" in log
    assert checkpoint(student, 2)["run_config"]["teacher"] == teacher
    from_data = str(tmp_path / "from_data")                              # the same start, no teacher
    train_cifar.main([*flags, "--init-from", teacher, "--results-dir", from_data, "--stop-at", "2"])
    weights = checkpoint(student, 2)["model"], checkpoint(from_data, 2)["model"]
    assert not all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    for other in (["--teacher", str(tmp_path / "other")], []):
        with pytest.raises(SystemExit, match=f"teacher: '{teacher}' in the run, '.*' now"):
            train_cifar.main([*flags, *other, "--results-dir", student])
    train_cifar.main(distil)                                             # the same teacher: resumed
    assert checkpoint(student, 4)["step"] == 4
    with pytest.raises(SystemExit, match=f"--teacher {teacher}: it has 0 classes, the student 10"):
        train_cifar.main([*flags, "--class-cond", "--teacher", teacher, "--results-dir", str(tmp_path / "c")])
    assert not (tmp_path / "c" / "checkpoints").exists()


def test_clear_errors(data, tmp_path, capsys):
    with pytest.raises(SystemExit,
                       match="FileNotFoundError: CIFAR-10 not found: looked for .*empty/cifar-10-batches-py"):
        train_cifar.main([*TINY, "--data-path", str(tmp_path / "empty"), "--no-download",
                          "--results-dir", str(tmp_path / "r")])
    with pytest.raises(SystemExit, match="--micro-batch 3 does not divide the per-process batch 8"):
        train_cifar.main([*TINY, "--data-path", data, "--micro-batch", "3",
                          "--results-dir", str(tmp_path / "r")])
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


# ----- Faults a long run meets: a failed save, a dead worker -----

FULL_DISK = """import errno, sys, torch
sys.path.insert(0, {root!r})
save = torch.save
def full_disk(obj, f, *args, **kwargs):         # a file fails as on a full disk; in-memory pickling works
    if isinstance(f, str):
        raise OSError(errno.ENOSPC, "No space left on device")
    return save(obj, f, *args, **kwargs)
torch.save = full_disk
import train_cifar
train_cifar.main()
"""


def full_disk_script(tmp_path):
    """train_cifar.py on a disk that is full by the time of its first save."""
    script = tmp_path / "train_cifar_full_disk.py"
    script.write_text(FULL_DISK.format(root=str(ROOT)))
    return script


def test_a_failed_save_ends_the_script_with_one_line_and_no_traceback(data, tmp_path):
    run = tmp_path / "run"
    flags = [*TINY, "--data-path", data, "--results-dir", str(run), "--ckpt-every", "1"]
    train_cifar.main([*flags, "--stop-at", "1"])
    kept = (run / "checkpoints" / "0000001.pt").read_bytes()
    done = subprocess.run([sys.executable, str(full_disk_script(tmp_path)), *flags], cwd=ROOT, timeout=300,
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 1 and "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    path = run / "checkpoints" / "0000002.pt"
    assert last.startswith(f"could not write {path} (OSError: [Errno 28] No space left on device)")
    assert "the same command resumes the run once the cause is fixed" in last
    assert (run / "checkpoints" / "0000001.pt").read_bytes() == kept
    assert sorted(os.listdir(run / "checkpoints")) == ["0000001.pt"]


@pytest.mark.slow
def test_a_failed_save_ends_both_processes_within_seconds(data, tmp_path):
    script = full_disk_script(tmp_path)
    started = time.time()
    done = torchrun(str(script), *TINY, "--data-path", data, "--results-dir", str(tmp_path / "run"),
                    check=False)
    assert done.returncode != 0 and time.time() - started < 60     # not the collective timeout of minutes
    # Rank 0 failed to write; rank 1 learnt it at the save's collective: both stop with the message.
    assert done.stderr.count("could not write ") >= 2, done.stderr[-3000:]


def worker_pids(parent):
    """The pids of the processes whose parent is `parent` (torchrun's workers), from /proc."""
    children = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path("/proc", entry, "stat").read_text()
        except OSError:                                                  # gone, or not a process
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent:          # field 4: the parent's pid
            children.append(int(entry))
    return children


@pytest.mark.slow
def test_a_killed_worker_is_restarted_and_the_run_ends_as_a_straight_one(data, tmp_path):
    """SIGKILL (the OOM killer) under torchrun --max-restarts=1 --rdzv-backend=c10d.

    The group restarts, resumes from the last checkpoint and ends with the weights and random states of a run
    that never stopped."""
    flags = [*TINY, "--steps", "8", "--data-path", data, "--ckpt-every", "2"]
    torchrun("train_cifar.py", *flags, "--results-dir", str(tmp_path / "straight"))
    with socket.socket() as s:                                         # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
               "--max-restarts=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
               str(ROOT / "train_cifar.py"), *flags, "--results-dir", str(tmp_path / "killed")]
    agent = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    first = tmp_path / "killed" / "checkpoints" / "0000002.pt"
    deadline = time.time() + 120
    while not first.exists() and time.time() < deadline and agent.poll() is None:
        time.sleep(0.05)
    workers = worker_pids(agent.pid)
    assert first.exists() and len(workers) == 2, workers
    os.kill(workers[1], signal.SIGKILL)
    out, err = agent.communicate(timeout=240)
    assert agent.returncode == 0, err[-3000:]
    log = (tmp_path / "killed" / "log.txt").read_text()
    assert log.count("resuming at step") == 1, log                    # the restarted group resumed once
    assert_same_run(checkpoint(tmp_path / "straight", 8), checkpoint(tmp_path / "killed", 8))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*is not the 2015-12-05 weights file")        # random weights, on purpose
def test_fid_during_training_is_the_same_on_one_and_two_processes(data, tmp_path):
    """The real Inception (random weights of its layout, saved to a file), 2 EMA samples at step 2."""
    import fid
    torch.manual_seed(0)
    weights = tmp_path / "inception.pth"
    torch.save(fid.InceptionV3().state_dict(), weights)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "images.npz", arr_0=rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8))
    reference = str(tmp_path / "ref.npz")
    fid.main(["ref", str(tmp_path / "images.npz"), reference, "--inception-weights", str(weights)])
    flags = [*TINY, "--data-path", data, "--steps", "2", "--fid-every", "2", "--fid-ref", reference,
             "--fid-images", "2", "--inception-weights", str(weights)]
    train_cifar.main([*flags, "--results-dir", str(tmp_path / "one")])
    torchrun("train_cifar.py", *flags, "--results-dir", str(tmp_path / "two"))
    fids = []
    for run in ("one", "two"):
        records = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        fids.append([r["fid_1nfe"] for r in records if "fid_1nfe" in r])
    assert len(fids[0]) == 1 and fids[0] == pytest.approx(fids[1], rel=1e-5) and fids[0][0] > 0
