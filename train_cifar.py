"""Train SoFlow on CIFAR-10 (unconditional, 32x32 pixels) with the released data and augmentation.

    torchrun --nproc_per_node=8 train_cifar.py --data-path data/cifar10 --results-dir runs/cifar10
    torchrun --nproc_per_node=8 train_cifar.py ... --teacher runs/fm --init-from runs/fm   # distil (Sec. 4.2)
    python train_cifar.py --model UNet-T --global-batch-size 32 --steps 500 --results-dir runs/try   # CPU
"""
import argparse
from dataclasses import replace

import torch
import torch.nn.functional as F

import soflow
from training import loop, processes, settings
from training.data import ARCHIVE, FOLDER, load_cifar10


# ----- CIFAR-10 (training.data reads the archive) -----
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


# ----- Training: the flags and the data of CIFAR-10; the loop is training.loop.train -----
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Train SoFlow on CIFAR-10 pixels (one process or torchrun).")
    add = parser.add_argument_group("CIFAR-10, the network and the method").add_argument
    add("--data-path", default="data/cifar10", help=f"folder with {FOLDER}/ or {ARCHIVE}")
    add("--no-download", action="store_true", help="fail instead of downloading the archive")
    add("--model", default="UNet-CIFAR10", choices=sorted(soflow.UNet_models))
    add("--preset", default="cifar10", choices=["cifar10", "cifar10-paper"],
        help="cifar10: the released recipe; cifar10-paper: the paper's App. A values")
    add("--lr", type=float, default=1e-4)
    add("--augment-p", type=float, default=0.12, help="EDM augmentation probability (0: off)")
    add("--class-cond", action="store_true", help="class labels and CFG (not in the paper)")
    add("--cfg-w", type=float, default=2.0, help="--class-cond: CFG strength w (Eq. 18)")
    add("--cfg-m", type=float, default=0.5, help="--class-cond: velocity mix ratio (Eq. 19)")
    add("--cfg-drop", type=float, default=0.1, help="--class-cond: label drop probability")
    add("--cfg-decay", default="exp", choices=soflow.DECAYS, help="--class-cond: g(t)")
    add("--flow-matching", action="store_true", help="train a teacher to distil (--teacher): flow matching "
        "alone (lam = 1, no guidance; labels are still dropped, so the null label learns)")
    # The released recipe: global batch 1024, 800k steps, EMA 0.9999 applied every 16 steps as 0.9999^16.
    settings.add_flags(parser, global_batch_size=1024, steps=800_000, ema_every=16)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    config = soflow.PRESETS[args.preset]
    if args.class_cond:
        config = replace(config, w=args.cfg_w, m=args.cfg_m, drop=args.cfg_drop, decay=args.cfg_decay)
    if args.flow_matching:
        config = replace(config, lam=1.0, w=1.0)
    with processes.started(args.dist_timeout) as procs:
        train(args, config, procs)


def train(args, config, procs):
    """main's work, inside the processes it started."""
    # Data: rank 0 downloads (once), then every process reads the archive into memory.
    try:
        with processes.rank0_first(procs):
            images, labels = load_cifar10(args.data_path, download=procs.main and not args.no_download)
    except (OSError, ValueError, RuntimeError) as e:      # the message says what to do: no traceback
        raise SystemExit(f"{type(e).__name__}: {e}") from e
    images, labels = images.to(procs.device), labels.to(procs.device)    # uint8: 150 MB for the 50,000 images

    def batch(rows):
        rows = rows.to(procs.device)
        x0, augment_labels = augment(to_model_range(images[rows]), p=args.augment_p)  # (B, 3, 32, 32), (B, 6)
        return x0, labels[rows] if args.class_cond else None, augment_labels

    # Network: the same initial weights on every process.
    torch.manual_seed(args.global_seed)
    net = soflow.UNet_models[args.model](num_classes=10 if args.class_cond else 0)

    def make_optimizer(params):
        return torch.optim.RAdam(params, lr=args.lr, betas=(0.9, 0.999))             # the released optimizer

    run_config = dict(model=args.model, preset=args.preset, lr=args.lr, augment_p=args.augment_p,
                      class_cond=args.class_cond)
    grid_labels = torch.arange(32, device=procs.device) % 10 if args.class_cond else None
    data = loop.Data(len(images), tuple(images.shape[1:]), batch)
    loop.train(settings.settings_from_args(args), net, config, make_optimizer, data, run_config, procs,
               grid_labels=grid_labels)


if __name__ == "__main__":
    main()
