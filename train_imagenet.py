"""Train SoFlow on ImageNet 256 latents (the SD VAE's 4x32x32), class-conditional with CFG, as the paper's headline.

    torchrun --nproc_per_node=8 train_imagenet.py prepare --data-path /data/imagenet/train --latents data/in256
    torchrun --nproc_per_node=8 train_imagenet.py --latents data/in256 --results-dir runs/in256-B4 --model DiT-B/4
"""
import torch

# ----- The SD VAE (diffusers, optional: imported only here) -----
VAE_NAME = "stabilityai/sd-vae-ft-mse"
VAE_SCALE = 0.18215                       # latents are scaled by this before training, divided by it to decode


def load_vae(name_or_path=VAE_NAME, device="cpu"):
    """The SD VAE (diffusers AutoencoderKL) in eval mode, from the hub name or a local folder."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise SystemExit(f"the SD VAE needs diffusers ({e}): pip install diffusers") from e
    return AutoencoderKL.from_pretrained(name_or_path).to(device).eval().requires_grad_(False)


@torch.no_grad()
def decode_latents(vae, z):
    """(B, 4, H/8, W/8) scaled latents -> (B, 3, H, W) images in [-1, 1]."""
    return vae.decode(z / VAE_SCALE).sample.clamp(-1, 1)
