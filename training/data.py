"""Data: the CIFAR-10 archive (downloaded, checked, read into memory) and the rows each step reads.

fid.py reads CIFAR-10 through this module too, so it imports nothing of the project but the standard library,
numpy, torch and tqdm.
"""
import hashlib
import os
import pickle
import tarfile
import tempfile
import urllib.request
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

# ----- CIFAR-10: the archive and the training set in memory -----
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE, FOLDER = "cifar-10-python.tar.gz", "cifar-10-batches-py"
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
BY_HAND = f"or pass --data-path to a folder holding {FOLDER}/"


def download_cifar10(root, url=CIFAR10_URL, md5=CIFAR10_MD5):
    """Fetch the archive into root unless there, check its MD5, extract it; returns the folder."""
    # Fixed file names: in a distributed run rank 0 calls this first (processes.rank0_first).
    os.makedirs(root, exist_ok=True)
    archive = os.path.join(root, ARCHIVE)
    if os.path.exists(archive):
        if (found := hashlib.md5(Path(archive).read_bytes()).hexdigest()) != md5:
            raise ValueError(f"{archive} has MD5 {found}, expected {md5}: it is corrupt or another "
                             f"file. Delete it and run again to download it afresh, {BY_HAND}")
    else:
        fd, part = tempfile.mkstemp(prefix=ARCHIVE + ".", suffix=".part", dir=root)
        try:
            with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=60) as r, tqdm(
                    total=int(r.headers.get("Content-Length") or 0) or None, unit="B",
                    unit_scale=True, desc=ARCHIVE, disable=None) as bar:  # no bar in logs
                while block := r.read(1 << 20):
                    bar.update(f.write(block))
            if (found := hashlib.md5(Path(part).read_bytes()).hexdigest()) != md5:
                raise ValueError(f"{url} gave MD5 {found}, expected {md5}; nothing was kept as "
                                 f"{archive}. Download it again, {BY_HAND}")
            os.replace(part, archive)  # atomic: an interrupted run leaves no half archive behind
        except OSError as e:
            raise RuntimeError(f"could not download {url} ({e}). Download the archive by hand to "
                               f"{archive} (MD5 {md5}), {BY_HAND}") from e
        finally:
            if os.path.exists(part):
                os.remove(part)
    # Only the batch files, as regular files with their exact names: a crafted archive cannot
    # write elsewhere. Each file lands in place atomically, so a crash leaves no half batch.
    wanted = {f"{FOLDER}/{n}" for n in TRAIN_BATCHES + ["test_batch", "batches.meta"]}
    with tarfile.open(archive, "r:gz") as tar, tempfile.TemporaryDirectory(dir=root) as tmp:
        members = [m for m in tar.getmembers() if m.isfile() and m.name in wanted]
        if missing := {f"{FOLDER}/{n}" for n in TRAIN_BATCHES} - {m.name for m in members}:
            raise ValueError(f"{archive} lacks {sorted(missing)}: it is not CIFAR-10 for python")
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.11.4
        tar.extractall(tmp, members, **safe)
        os.makedirs(os.path.join(root, FOLDER), exist_ok=True)
        for m in members:
            os.replace(os.path.join(tmp, m.name), os.path.join(root, m.name))
    return os.path.join(root, FOLDER)


def load_cifar10(root, download=True, url=CIFAR10_URL, md5=CIFAR10_MD5):
    """The 50,000 training images, uint8 (N, 3, 32, 32), and their labels, int64 (N,), in memory."""
    # root is the folder cifar-10-batches-py, or holds it, or holds (or receives) the archive.
    root = os.path.expanduser(str(root))
    looked = [os.path.join(root, n) for n in (TRAIN_BATCHES[0], FOLDER, ARCHIVE)]
    if os.path.isfile(looked[0]) or os.path.isdir(looked[1]):
        folder = root if os.path.isfile(looked[0]) else looked[1]
    elif download or os.path.isfile(looked[2]):
        folder = download_cifar10(root, url, md5)
    else:
        raise FileNotFoundError(f"CIFAR-10 not found: looked for {', '.join(looked)}. Allow the "
                                f"download, or put the archive ({url}) there, {BY_HAND}")
    batches = []
    for path in [os.path.join(folder, n) for n in TRAIN_BATCHES]:
        with open(path, "rb") as f:
            try:  # a truncated or foreign pickle fails in many ways
                batch = pickle.load(f, encoding="bytes")
                x, y = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"], dtype=np.int64)
                if not (x.dtype == np.uint8 and x.ndim == 2 and x.shape[1] == 3 * 32 * 32
                        and y.shape == (len(x),) and np.isin(y, range(10)).all()):
                    raise ValueError(f"data {x.dtype} {x.shape}, labels {y.shape}; expected "
                                     f"uint8 (n, 3072) and n labels in 0..9")
            except Exception as e:
                raise ValueError(f"{path} is not a CIFAR-10 batch ({type(e).__name__}: {e}). "
                                 f"Delete {folder} and extract the archive again") from e
        batches.append((x, y))
    # Rows are channel-major: 1024 red, then green, then blue values, each image row by row.
    images = torch.from_numpy(np.concatenate([x for x, _ in batches]).reshape(-1, 3, 32, 32))
    return images, torch.from_numpy(np.concatenate([y for _, y in batches]))  # (N, 3, 32, 32), (N,)


def is_cifar10(path):
    """Whether path is CIFAR-10 as load_cifar10 takes it (the batches' folder, a folder that holds it or the
    archive), or the archive itself."""
    if os.path.isfile(path):
        return os.path.basename(path) == ARCHIVE
    return any(check(os.path.join(path, name)) for check, name in
               ((os.path.isfile, TRAIN_BATCHES[0]), (os.path.isdir, FOLDER), (os.path.isfile, ARCHIVE)))


# ----- Global batches: which dataset rows each step and process reads -----
@lru_cache(maxsize=2)
def epoch_order(num_examples, seed, epoch):
    """The shuffled order of the dataset's rows in one epoch (kept for the next steps: it is not cheap)."""
    return torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def global_batch_indices(step, global_batch_size, num_examples, seed):
    """Dataset rows of global batch `step` in an endless run of epochs, each shuffled by (seed, epoch).

    A function of the step alone: a resumed run reads what it would have read, on any number of processes."""
    positions = step * global_batch_size + torch.arange(global_batch_size)
    epochs = positions // num_examples
    indices = torch.empty_like(positions)
    for epoch in epochs.unique().tolist():
        at = epochs == epoch
        indices[at] = epoch_order(num_examples, seed, epoch)[positions[at] % num_examples]
    return indices


def rows_of_process(step, global_batch_size, num_examples, seed, procs):
    """This process's dataset rows of global batch `step`: its rank-th of world_size equal slices."""
    rows = global_batch_indices(step, global_batch_size, num_examples, seed)
    local_batch = global_batch_size // procs.world_size
    return rows[procs.rank * local_batch:(procs.rank + 1) * local_batch]
