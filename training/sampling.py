"""Sampling many images: per-image draws, FID of the EMA during training, and the SD VAE that decodes latents.

Image i draws its class, noise and re-noising noises from its own generator (per_image_draws): the same images
on any number of processes and with any batch size, as EDM's generate.py does it.
"""
import math
import time

import numpy as np
import torch

import fid
from soflow import sample
from training import processes
from training.files import to_uint8


# ----- Sampling many images: per-image draws, each process its batches, rank 0 the images it writes -----
def per_image_draws(seed, indices, shape, num_classes, classes, renoise_steps):
    """(y, x1, eps) of the images `indices`: y (B,) labels or None, x1 (B, *shape), eps steps x (B, *shape).

    Each image draws from its own generator, in this order: its class (if random), x_1, the re-noising noises.
    numpy's, seeded by the pair (seed, i): a torch CPU generator keeps only the low 32 bits of its seed, so no
    injective (seed, i) -> seed map exists for it."""
    B = len(indices)
    y = torch.empty(B, dtype=torch.long) if num_classes else None
    x1, eps = torch.empty(B, *shape), [torch.empty(B, *shape) for _ in range(renoise_steps)]
    for b, i in enumerate(indices.tolist()):
        rng = np.random.default_rng([seed, i])
        if num_classes:
            y[b] = classes[i % len(classes)] if classes else int(rng.integers(num_classes))
        x1[b] = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))
        for e in eps:
            e[b] = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))
    return y, x1, eps


def image_batches(num_images, batch_size, procs):
    """This process's image indices: EDM's split into a multiple of W batches; rank r takes r, r + W, ..."""
    num_batches = math.ceil(num_images / (batch_size * procs.world_size)) * procs.world_size
    return torch.arange(num_images).tensor_split(num_batches)[procs.rank::procs.world_size]


class Kept:
    """The images rank 0 writes, gathered batch by batch: indices below `count`, with their labels."""
    def __init__(self, count, num_classes):
        self.count, self.num_classes = count, num_classes
        self.pixels = self.labels = None

    def gather(self, indices, pixels, y, procs):
        """Every process calls it with its batch; rank 0 stores the kept ones, NHWC as ADM reads them."""
        keep = indices < self.count
        batch = pixels[keep.to(pixels.device)].permute(0, 2, 3, 1).cpu().numpy()
        labels = None if y is None else y[keep.to(y.device)].cpu().numpy()
        parts = processes.gather_to_rank0((indices[keep].numpy(), batch, labels), procs) or []
        for idx, part, part_labels in [p for p in parts if len(p[0])]:        # fewer images than processes
            if self.pixels is None:
                self.pixels = np.empty((self.count, *part.shape[1:]), np.uint8)
                self.labels = np.empty(self.count, np.int64) if self.num_classes else None
            self.pixels[idx] = part
            if part_labels is not None:
                self.labels[idx] = part_labels


# ----- FID of the EMA during training (fid.py) -----
def start_fid(reference, weights, device, batch_size=100, flag="--fid-every"):
    """(Inception, reference (mu, sigma)) on every process (fid.py), for FID in training and sample.py --fid;
    a clear stop, naming the flag, if either cannot be had."""
    try:
        inception = fid.load_inception(weights or None, device)
        return inception, fid.reference_stats(reference, inception, batch_size)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"{flag}: {e}") from e


@torch.no_grad()
def fid_of_ema(ema, settings, config, decode, inception, reference, shape, num_classes, batch_size, autocast,
               procs):
    """{fid_Knfe: FID of settings.fid_images EMA samples at K steps, fid_images, fid_seconds}.

    Image i draws from its own generator (per_image_draws, seed global_seed): the same images at every
    evaluation, on any number of processes, and the training's random streams untouched. Every process
    samples batches rank, rank + W, ... and adds their features; the sums are all-reduced."""
    device, started = next(ema.parameters()).device, time.time()
    batches = torch.arange(settings.fid_images).split(batch_size)[procs.rank::procs.world_size]
    values = {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):    # none drawn: a guard
        for nfe in settings.fid_nfe:
            stats = fid.FeatureStats(inception.feature_dim, device)
            for indices in batches:
                y, x1, eps = per_image_draws(settings.global_seed, indices, shape, num_classes, None, nfe - 1)
                y = None if y is None else y.to(device)
                with autocast:
                    x0 = sample(ema, x1.to(device), y, eps=[e.to(device) for e in eps], config=config,
                                steps=nfe, mode="renoise")
                    images = decode(x0)
                stats.add(fid.features(inception, to_uint8(images.float())))
            values[f"fid_{nfe}nfe"] = fid.frechet_distance(*stats.all_reduce().mu_sigma(), *reference)
    return {**values, "fid_images": settings.fid_images, "fid_seconds": time.time() - started}


# ----- The SD VAE of latent models (diffusers: optional, imported only where used) -----
VAE_NAME = "stabilityai/sd-vae-ft-mse"


VAE_SCALE = 0.18215                   # latents are scaled by this before training, divided by it to decode


def load_vae(name_or_path=VAE_NAME, device="cpu", procs=processes.Processes()):
    """The SD VAE (diffusers AutoencoderKL) in eval mode, from a hub name or a local folder."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise SystemExit(f"the SD VAE needs diffusers ({e}): pip install diffusers") from e
    with processes.rank0_first(procs):          # rank 0 fills the download cache
        vae = AutoencoderKL.from_pretrained(name_or_path, low_cpu_mem_usage=False)
    return vae.to(device).eval().requires_grad_(False)


def checkpoint_vae(recorded, override, procs):
    """(vae, scale) that decode a latent checkpoint's samples: the VAE and scale it records (recorded, from
    open_checkpoint; the released DiTs used VAE_NAME), or the override (--vae), which rank 0 reports."""
    stored = recorded.get("vae") or dict(name=VAE_NAME, scale=VAE_SCALE)
    if override and override != stored["name"]:
        procs.say(f"decoding with --vae {override}, not the checkpoint's {stored['name']}")
    return load_vae(override or stored["name"], procs.device, procs), stored["scale"]


@torch.no_grad()
def decode_latents(vae, z, scale=VAE_SCALE):
    """(B, 4, H/8, W/8) latents scaled by `scale` -> (B, 3, H, W) images in [-1, 1]."""
    return vae.decode(z / scale).sample.clamp(-1, 1)
