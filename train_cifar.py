"""Train SoFlow on CIFAR-10 (unconditional, 32x32 pixels) with the released data and augmentation.

    torchrun --nproc_per_node=8 train_cifar.py --data-path data/cifar10 --results-dir runs/cifar10
    python train_cifar.py --model UNet-T --global-batch-size 32 --steps 500 --results-dir runs/try   # CPU
"""
import argparse
import hashlib
import os
import pickle
import tarfile
import tempfile
import urllib.request
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import soflow
import training

# ----- CIFAR-10: the archive and the training set in memory -----
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE, FOLDER = "cifar-10-python.tar.gz", "cifar-10-batches-py"
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
BY_HAND = f"or pass --data-path to a folder holding {FOLDER}/"


def download_cifar10(root, url=CIFAR10_URL, md5=CIFAR10_MD5):
    """Fetch the archive into root unless there, check its MD5, extract it; returns the folder."""
    # Fixed file names: in a distributed run, rank 0 calls this, then barrier().
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


def to_model_range(x):
    """uint8 -> float32 in [-1, 1]; sample grids invert it: clamp(x * 127.5 + 128, 0, 255)."""
    return x.float() / 127.5 - 1


# ----- EDM's non-leaking augmentation (Karras et al. 2022, training/augment.py) -----
# Each transformation is applied with probability p and its parameters reach the network as labels;
# sampling passes zero labels (no transformation), so augmentations do not leak into the samples.
# The released recipe: AugmentPipe(p=0.12, xflip=1e8, scale=1, aniso=1, translate_frac=1), no yflip
# or rotation, hence 6 labels in EDM's order (w ~ N(0, 1), and 0 where a transformation is unused):
#   [xflip 0/1, scale w, aniso w cos r, aniso w sin r, translate wx, wy]
AUGMENT_DIM = 6
SCALE_STD, ANISO_STD, TRANSLATE_STD = 0.2, 0.2, 0.125  # EDM's defaults: log2 scales, image sizes


def affine_theta(w_scale, w_aniso, r, w_t, H, W):
    """Draws (n,), w_t (2, n) -> theta (n, 2, 3): output pixel -> input point, in [-1, 1] units."""
    def rot(a):
        return torch.stack([a.cos(), -a.sin(), a.sin(), a.cos()], -1).view(-1, 2, 2)
    s, a = 2 ** (w_scale * SCALE_STD), 2 ** (w_aniso * ANISO_STD)
    # EDM's G_inv in pixels about the centre: scale_inv(s, s) @ R(-r) @ scale_inv(a, 1/a) @ R(r),
    # then translate_inv(t): output p samples L (p - t), so content moves by t = w * size * std.
    L = rot(-r) @ torch.diag_embed(torch.stack([1 / (s * a), a / s], -1)) @ rot(r)  # (n, 2, 2)
    t = w_t.T * w_t.new_tensor([W * TRANSLATE_STD, H * TRANSLATE_STD])  # (n, 2)
    G_inv = torch.cat([L, -(L @ t[:, :, None])], 2)  # (n, 2, 3)
    # align_corners=False puts pixel centre x at 2 (x + 0.5) / W - 1 = 2 u / W, u from the centre.
    return G_inv.new_tensor([[2 / W], [2 / H]]) * G_inv * G_inv.new_tensor([W / 2, H / 2, 1])


def augment(images, p=0.12, generator=None, xflip=1e8, scale=1.0, aniso=1.0, translate=1.0):
    """(B, C, H, W) -> (augmented images, labels (B, 6)); xflip, scale, ...: EDM's multipliers."""
    B, C, H, W = images.shape
    kw = dict(device=images.device, generator=generator)

    def keep(w, prob):  # w where a coin of P(heads) = prob says so, else 0; EDM's draws and order
        return torch.where(torch.rand(B, **kw) < prob, w, 0.0)
    flip = keep(torch.randint(2, (B,), **kw).float(), xflip * p)  # xflip=1e8: P(flip) = 1/2
    w_scale = keep(torch.randn(B, **kw), scale * p)
    w_aniso, r = torch.randn(B, **kw), (torch.rand(B, **kw) * 2 - 1) * torch.pi
    w_aniso, r = keep(w_aniso, aniso * p), keep(r, 0.5)  # half of the stretches along the axes
    w_t = keep(torch.randn(2, B, **kw), translate * p)  # (2, B)
    labels = torch.stack([flip, w_scale, w_aniso * r.cos(), w_aniso * r.sin(), *w_t], 1)  # (B, 6)

    out = torch.where(flip.view(B, 1, 1, 1) == 1, images.flip(3), images)
    moved = ((w_scale != 0) | (w_aniso != 0) | (w_t != 0).any(0)).nonzero().squeeze(1)
    # Deviation: EDM pads by reflection about the edge pixel, upsamples 2x with its sym6 wavelet
    # filter, warps and filters back down, for every image (identities too). We warp once,
    # bilinearly with reflection about the border: softer, but untouched images stay bit-identical
    # and the convex weights keep the warped ones in [-1, 1] (EDM's filter can overshoot).
    if len(moved):
        ctype = torch.promote_types(images.dtype, torch.float32)  # no bf16 grid coordinates
        theta = affine_theta(*(v.to(ctype) for v in (w_scale, w_aniso, r, w_t)), H, W)[moved]
        grid = F.affine_grid(theta, [len(moved), C, H, W], align_corners=False)
        out[moved] = F.grid_sample(out[moved].to(ctype), grid, mode="bilinear",
                                   padding_mode="reflection", align_corners=False).to(images.dtype)
    return out, labels.to(images.dtype)


# ----- Training: the flags and the data of CIFAR-10; the loop is training.train -----
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Train SoFlow on CIFAR-10 pixels (one process or torchrun).")
    parser.add_argument("--data-path", default="data/cifar10", help=f"folder with {FOLDER}/ or {ARCHIVE}")
    parser.add_argument("--no-download", action="store_true", help="fail instead of downloading the archive")
    parser.add_argument("--model", default="UNet-CIFAR10", choices=sorted(soflow.UNet_models))
    parser.add_argument("--preset", default="cifar10", choices=["cifar10", "cifar10-paper"],
                        help="cifar10: the released recipe; cifar10-paper: the paper's App. A values")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--augment-p", type=float, default=0.12, help="EDM augmentation probability (0: off)")
    parser.add_argument("--class-cond", action="store_true", help="class labels and CFG (not in the paper)")
    parser.add_argument("--cfg-w", type=float, default=2.0, help="--class-cond: CFG strength w (Eq. 18)")
    parser.add_argument("--cfg-m", type=float, default=0.5, help="--class-cond: velocity mix ratio (Eq. 19)")
    parser.add_argument("--cfg-drop", type=float, default=0.1, help="--class-cond: label drop probability")
    parser.add_argument("--cfg-decay", default="exp", choices=soflow.DECAYS, help="--class-cond: g(t)")
    # The released recipe: global batch 1024, 800k steps, EMA 0.9999 applied every 16 steps as 0.9999^16.
    training.add_training_args(parser, global_batch_size=1024, steps=800_000, ema_every=16)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    config = soflow.PRESETS[args.preset]
    if args.class_cond:
        config = replace(config, w=args.cfg_w, m=args.cfg_m, drop=args.cfg_drop, decay=args.cfg_decay)
    rank, world_size, device = training.init_distributed(args.dist_timeout)
    try:
        if rank == 0:                                     # one process downloads, the others wait
            images, labels = load_cifar10(args.data_path, download=not args.no_download)
        if world_size > 1:
            dist.barrier()
        if rank > 0:
            images, labels = load_cifar10(args.data_path, download=False)
    except (OSError, ValueError, RuntimeError) as e:      # the message says what to do: no traceback
        raise SystemExit(f"{type(e).__name__}: {e}") from e
    images, labels = images.to(device), labels.to(device)            # uint8: 150 MB for the 50,000 images
    torch.manual_seed(args.global_seed)                   # the same initial weights on every process
    net = soflow.UNet_models[args.model](num_classes=10 if args.class_cond else 0)

    def get_batch(rows):
        rows = rows.to(device)
        x0, augment_labels = augment(to_model_range(images[rows]), p=args.augment_p)  # (B, 3, 32, 32), (B, 6)
        return x0, labels[rows] if args.class_cond else None, augment_labels

    def make_optimizer(params):
        return torch.optim.RAdam(params, lr=args.lr, betas=(0.9, 0.999))             # the released optimizer

    run_config = dict(model=args.model, preset=args.preset, lr=args.lr, augment_p=args.augment_p,
                      class_cond=args.class_cond)
    grid_labels = torch.arange(32, device=device) % 10 if args.class_cond else None
    settings = training.settings_from_args(args)
    training.train(settings, net, config, make_optimizer, len(images), get_batch, run_config,
                   grid_labels=grid_labels)


if __name__ == "__main__":
    main()
