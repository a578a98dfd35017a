"""The data side of train_imagenet.py: reading latents against the training step, and `prepare`'s images/s.

    python -m benchmarks.imagenet_data    # CPU default: DiT-S/4, batch 16, tiny VAE; ~1 min on 2 cores
    python -m benchmarks.imagenet_data --model DiT-B/4 --batch-size 256 --device cuda --precision bf16 \
        --full-vae

Latent reading: train_imagenet.latent_batches' batch (the rows of global_batch_indices, a gather from the
memory-mapped mean and std, the posterior draw (mean + std * eps) * 0.18215, the copy to the device) on a
folder of --num-latents random posteriors written like `prepare` writes them (4x32x32, with flipped copies),
against the bare Algorithm 1 step (PRESETS["imagenet"], AdamW) of the DiT at the same batch; interleaved,
--rounds rounds, medians.
The files were just written, so they are read from the page cache, as they are after the first epoch on a
machine whose memory holds them (42 GB for ImageNet in float32); a colder disk costs more.
prepare: train_imagenet.main(["prepare", ...]) on --images generated JPEGs of ImageNet's typical size
(500 x 375) at 256 x 256, with a tiny randomly initialised AutoencoderKL (3x256x256 -> 4x32x32, the SD VAE's
layout at 1/16 of its widths), or with --full-vae the SD VAE's architecture (random weights: the cost of
stabilityai/sd-vae-ft-mse); images/s of the whole command (listing, JPEG decoding and cropping in --workers
processes, encoding, writing) beside the VAE's encoder alone on the same batches.
"""
import argparse
import contextlib
import io
import os
import statistics
import tempfile
import time

import numpy as np
import torch

import soflow
import train_imagenet
import training.data
import training.files
import training.sampling
from benchmarks.common import add_setup_args, describe, setup, sync, timed, write_json

CONFIG = soflow.PRESETS["imagenet"]


def write_latents(folder, count, seed):
    """A folder like `prepare` writes: count images with flipped copies, float32 posteriors, 1000 classes."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder)
    for name in ("mean", "std"):
        array = np.lib.format.open_memmap(os.path.join(folder, f"{name}.npy"), "w+", np.float32,
                                          (2 * count, 4, 32, 32))
        for a in range(0, 2 * count, 10_000):
            chunk = rng.standard_normal((min(10_000, 2 * count - a), 4, 32, 32), dtype=np.float32)
            array[a:a + len(chunk)] = np.abs(chunk) * 0.1 if name == "std" else chunk
        array.flush()
    np.save(os.path.join(folder, "labels.npy"), rng.integers(0, 1000, count))
    training.files.write_json(os.path.join(folder, "manifest.json"), dict(
        complete=True,
        settings=dict(num_images=count, vae=training.sampling.VAE_NAME, listing_sha256="random"),
        scale=training.sampling.VAE_SCALE, copies=2, shape=[4, 32, 32],
        classes=list(range(1000)), arrays=dict(mean="mean.npy", std="std.npy", labels="labels.npy")))


def reading(args, device, net, model, autocast, folder):
    """(seconds of get_batch, seconds of the bare step) per round."""
    manifest, arrays = train_imagenet.open_latents(folder)
    data = train_imagenet.latent_batches(manifest, arrays, device)
    get_batch, count = data.batch, data.num_examples
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0)
    x0, y, _ = get_batch(torch.arange(args.batch_size))
    data, step = [], []
    for k in range(args.warmup + args.rounds):
        sync(device)
        start = time.perf_counter()
        rows = training.data.global_batch_indices(k, args.batch_size, count, args.seed)
        x0, y, _ = get_batch(rows)
        sync(device)
        middle = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss, _ = soflow.soflow_loss(model, x0, y, config=CONFIG, step=k, total_steps=400_000)
        loss.backward()
        opt.step()
        sync(device)
        if k >= args.warmup:
            data.append(middle - start)
            step.append(time.perf_counter() - middle)
    return data, step


def write_images(folder, count, seed):
    from PIL import Image
    rng = np.random.default_rng(seed)
    for i in range(count):
        os.makedirs(os.path.join(folder, f"n{i % 4:08d}"), exist_ok=True)
        pixels = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"n{i % 4:08d}", f"{i:05d}.JPEG"), quality=90)


def make_vae(folder, full):
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    if full:            # stabilityai/sd-vae-ft-mse's configuration
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512),
                            down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
                            sample_size=256)
    else:
        # The SD VAE's 8x downsampling (its mid-block attention over 32x32 latents), at 1/16 of its widths.
        vae = AutoencoderKL(block_out_channels=(8, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=1,
                            norm_num_groups=4)
    vae.save_pretrained(folder)


def preparing(args, device, root):
    """(images/s of the prepare command, images/s of the VAE encoder alone on the same batch size)."""
    images, vae_path = os.path.join(root, "images"), os.path.join(root, "vae")
    write_images(images, args.images, args.seed)
    make_vae(vae_path, args.full_vae)
    argv = ["prepare", "--data-path", images, "--latents", os.path.join(root, "out"), "--vae", vae_path,
            "--batch-size", str(args.prepare_batch), "--workers", str(args.workers)]
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        train_imagenet.main(argv)
    command = args.images / (time.perf_counter() - start)
    vae = training.sampling.load_vae(vae_path, device)
    x = torch.randn(args.prepare_batch, 3, 256, 256, device=device)
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda")
    seconds = []
    with torch.no_grad(), autocast:
        for _ in range(3):
            sync(device)
            start = time.perf_counter()
            vae.encode(x).latent_dist
            sync(device)
            seconds.append(time.perf_counter() - start)
    return command, args.prepare_batch / statistics.median(seconds)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_setup_args(parser)
    parser.add_argument("--num-latents", type=int, default=20_000,
                        help="images in the latent folder (x2 flips)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--images", type=int, default=64, help="prepare: generated JPEGs")
    parser.add_argument("--prepare-batch", type=int, default=16, help="prepare: --batch-size")
    parser.add_argument("--workers", type=int, default=2, help="prepare: --workers")
    parser.add_argument("--full-vae", action="store_true",
                        help="prepare: the SD VAE's size, not the tiny one")
    args = parser.parse_args(argv)
    device, net, model, _, _, autocast = setup(args)
    results = {}
    with tempfile.TemporaryDirectory() as root:
        write_latents(os.path.join(root, "latents"), args.num_latents, args.seed)
        data, step = reading(args, device, net, model, autocast, os.path.join(root, "latents"))
        results["data_ms"], results["step_ms"] = statistics.median(data) * 1e3, statistics.median(step) * 1e3
        print(f"{describe(args, device)}; {args.num_latents} images x 2 copies of latents, "
              f"{args.rounds} rounds")
        print(f"{'part':<52}{'ms':>10}{'images/s':>12}{'/ step':>9}")
        for name, ms in (("data: get_batch (memmap gather, posterior draw)", results["data_ms"]),
                         ("bare Algorithm 1 step (loss, backward, AdamW)", results["step_ms"])):
            print(f"{name:<52}{ms:>10.2f}{args.batch_size / ms * 1e3:>12.1f}{ms / results['step_ms']:>9.3f}")
        results["data_over_step"] = results["data_ms"] / results["step_ms"]
        manifest, arrays = train_imagenet.open_latents(os.path.join(root, "latents"))
        data = train_imagenet.latent_batches(manifest, arrays, device)
        get_batch, count = data.batch, data.num_examples
        big = [timed(lambda: get_batch(training.data.global_batch_indices(k, 256, count, args.seed)), device)
               for k in range(args.rounds)]
        results["data_ms_at_256"] = statistics.median(big) * 1e3
        rows_of = training.data.global_batch_indices
        gather = [timed(lambda: [arrays[n][rows_of(k, 256, count, args.seed).numpy()]
                                 for n in ("mean", "std")], device) for k in range(args.rounds)]
        results["gather_ms_at_256"] = statistics.median(gather) * 1e3
        for name, key in (("data alone at batch 256 (the released global batch)", "data_ms_at_256"),
                          ("  of which the memmap gather of mean and std", "gather_ms_at_256")):
            print(f"{name:<52}{results[key]:>10.2f}{256 / results[key] * 1e3:>12.1f}")
        command, encoder = preparing(args, device, root)
    results.update(prepare_images_per_s=command, encoder_images_per_s=encoder)
    vae = "the SD VAE's architecture" if args.full_vae else "a tiny VAE"
    print(f"prepare, {args.images} JPEGs of 500x375 -> 256x256, {vae}, batch {args.prepare_batch}, "
          f"{args.workers} workers: {command:.1f} images/s for the whole command; "
          f"the encoder alone {encoder:.1f}")
    if args.json:
        write_json(args.json, {"args": vars(args), **results})
    return results


if __name__ == "__main__":
    main()
