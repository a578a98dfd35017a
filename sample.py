"""SoFlow images from a checkpoint, ours or the authors' (DiT on SD-VAE latents, U-Net on pixels).

    python sample.py --ckpt runs/cifar10/checkpoints/0800000.pt --num-images 64             # a PNG grid
    torchrun --nproc_per_node=8 sample.py --ckpt XL-2-cond/ckpts/1200000.pt --num-images 50000 --npz \
        --out samples/xl2-1nfe                                                               # FID-50K files

    torchrun --nproc_per_node=8 sample.py --ckpt hf://zlab-princeton/SoFlow/XL-2-cond/ckpts/1200000.pt \
        --num-images 50000 --fid VIRTUAL_imagenet256_labeled.npz                             # FID-50K

Image i's class (when drawn at random), its noise x_1 and its re-noising noises (--nfe > 1, --sampler
renoise) come from a generator seeded by (--seed, i), as in EDM's generate.py: the same seed gives the same
images on any number of processes (and with any batch size, up to float rounding). Rank 0 gathers the images
and writes OUT.png and, with --npz, OUT.npz in the ADM evaluator's format: arr_0 uint8 NHWC, arr_1 the
labels of a class-conditional model. With --fid REF each batch goes straight into fid.py's Inception on its
own process (nothing is gathered but the grid): OUT.json holds the FID against REF.
"""
import argparse
import math
import os
import time
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm import tqdm

import fid
import soflow
from training import processes, settings
from training.checkpoints import checkpoint_file
from training.files import save_grid, to_uint8, try_write, write_json, write_npz
from training.loop import set_precision
from training.released import RELEASED_PRESETS, data_shape, open_checkpoint
from training.sampling import (
    VAE_NAME,
    Kept,
    checkpoint_vae,
    decode_latents,
    image_batches,
    per_image_draws,
    start_fid,
)

WRITE_AGAIN = "no output file is half-written, and the same command (with --overwrite) writes them"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="One- or few-step SoFlow samples: a PNG grid, FID files.")
    parser.add_argument("--ckpt", required=True,
                        help="ours (RUN/checkpoints/STEP.pt, or RUN for its newest) or a released one; "
                             "a file or hf://OWNER/REPO/FILE")
    parser.add_argument("--no-ema", action="store_true", help="the raw training weights instead of the EMA")
    parser.add_argument("--nfe", type=int, default=1, help="network calls per image, on an equal grid")
    parser.add_argument("--times", type=float, nargs="+", default=None, metavar="T",
                        help="a custom grid t_0 > ... > t_N instead, e.g. 1 0.3 0: N network calls")
    parser.add_argument("--sampler", default="renoise", choices=["renoise", "chain", "euler"],
                        help="renoise: jump to t = 0 and re-noise (released); chain: f(x, t_i, t_{i+1}); "
                             "euler: Euler steps along the velocity (Eq. 10), a flow-matching teacher's own")
    parser.add_argument("--class", dest="classes", type=int, nargs="+", default=None, metavar="C",
                        help="class indices, cycled over the images (default: one drawn at random per image)")
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64, help="images per process and network call")
    parser.add_argument("--seed", type=int, default=0,
                        help="image i draws from a generator seeded by (seed, i)")
    parser.add_argument("--out", default=None,
                        help="writes OUT.png (and OUT.npz); default samples/STEM-nfeN-seedS")
    parser.add_argument("--npz", action="store_true", help="also write OUT.npz for the ADM evaluator")
    parser.add_argument("--fid", default=None, metavar="REF",
                        help="FID against REF (mu and sigma in an .npz such as ADM's reference batch, or an "
                             "image set: fid.py's SOURCE), written to OUT.json")
    parser.add_argument("--inception-weights", default=None, metavar="PATH",
                        help="--fid: the Inception's weight file (default: downloaded once, see fid.py)")
    parser.add_argument("--grid", type=int, default=64, help="the first this many images go in the PNG grid")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("--vae", default=None,
                        help="latent models: a hub name or local folder, instead of the checkpoint's VAE "
                             f"(ours record it; the released ones used {VAE_NAME})")
    settings.add_flags(parser, names=("precision", "compile", "dist_timeout"))
    args = parser.parse_args(argv)
    for name, low in dict(nfe=1, num_images=1, batch_size=1, grid=1, seed=0).items():
        if getattr(args, name) < low:
            parser.error(f"--{name.replace('_', '-')} must be at least {low}")
    if args.times is not None and args.sampler == "euler":
        parser.error("--sampler euler takes --nfe equal steps, not --times")
    if args.times is not None:               # the check of soflow.sample, said before any loading
        if len(args.times) < 2 or any(b >= a for a, b in zip(args.times, args.times[1:])):
            parser.error(f"--times must decrease strictly, 2 points or more: {args.times}")
        args.nfe = len(args.times) - 1
    try:
        args.ckpt = args.ckpt if args.ckpt.startswith("hf://") else checkpoint_file(args.ckpt)
    except FileNotFoundError as e:
        raise SystemExit(f"sample.py: {e}") from e
    return args


def main(argv=None):
    args = parse_args(argv)
    with processes.started(args.dist_timeout) as procs:
        return generate(args, procs)


def generate(args, procs):
    """main's work on one process of many: load, draw, sample, then write the images or measure the FID."""
    started = time.perf_counter()
    paths = output_paths(args, procs)
    model = open_model(args, procs)
    precision, autocast = set_precision(args.precision, procs.device)
    inception, reference = (start_fid(args.fid, args.inception_weights, procs.device, args.batch_size,
                                      flag="sample.py: --fid") if args.fid else (None, None))
    stats = fid.FeatureStats(inception.feature_dim, procs.device) if args.fid else None
    batches = image_batches(args.num_images, args.batch_size, procs)
    procs.say(f"{model.name} on {'latents' if model.decode else 'pixels'} {model.shape}; {args.num_images} "
              f"images, {args.nfe} NFE ({args.sampler}), {procs.world_size} process(es), {precision}"
              f"{', compiled' if args.compile else ''}")
    # Rank 0 gathers what it writes: every image for --npz, else the grid's.
    kept = Kept(args.num_images if args.npz else min(args.grid, args.num_images), model.num_classes)
    for indices in tqdm(batches, desc="sampling", unit="batch", disable=not procs.main or len(batches) == 1):
        y, x1, eps = draws(args, model, indices, procs.device)
        with autocast:
            x0 = images(args, model, y, x1, eps)
        pixels = to_uint8(x0.float())                                         # (B, 3, H, W) uint8
        if stats is not None and len(indices):
            stats.add(fid.features(inception, pixels))
        kept.gather(indices, pixels, y, procs)
    fid_value = None
    if stats is not None:                    # every process adds its sums; rank 0 computes the distance
        stats.all_reduce()
        fid_value = fid.frechet_distance(*stats.mu_sigma(), *reference) if procs.main else None
    seconds = time.perf_counter() - started
    failure = write_outputs(args, paths, kept, fid_value, precision, seconds) if procs.main else None
    if failure := processes.first_failure(failure, procs):
        raise SystemExit(f"sample.py: {failure}")
    if fid_value is not None:
        procs.say(f"FID {fid_value:.4f} against {args.fid} ({args.num_images} images, {args.nfe} NFE)")
    procs.say(f"wrote {', '.join(paths)}: {args.num_images} images in {seconds:.1f} s with loading "
              "(python -m benchmarks.sampling --end-to-end times each part)")
    return dict(images=args.num_images, fid=fid_value, seconds=seconds)


# ----- The steps of generate -----
def output_paths(args, procs):
    """OUT.png, and OUT.npz and OUT.json if asked; refused if one exists (rank 0 sees), unless --overwrite."""
    stem = os.path.splitext(os.path.basename(args.ckpt))[0]
    out = args.out or os.path.join("samples", f"{stem}-nfe{args.nfe}-seed{args.seed}")
    out = out[:-4] if out.endswith((".png", ".npz")) else out
    paths = [out + ".png"] + ([out + ".npz"] if args.npz else []) + ([out + ".json"] if args.fid else [])
    existing = processes.gather_objects([p for p in paths if os.path.exists(p)], procs)[0]
    if existing and not args.overwrite:
        raise SystemExit(f"sample.py: {' and '.join(existing)} already there: pass --overwrite, "
                         "or another --out")
    return paths


@dataclass
class Model:
    """The network and what it needs to make images: its config, data shape, classes and decoder."""
    name: str                         # DiT(...) or UNet(...), with its constructor arguments
    net: torch.nn.Module              # compiled with --compile
    config: soflow.SoFlowConfig       # the SoFlowConfig it was trained with
    shape: tuple                      # one sample: (4, 32, 32) latents, (3, 32, 32) pixels
    num_classes: int                  # 0: unconditional
    decode: Callable = None           # latents -> images in [-1, 1] (the VAE); None for pixels


def open_model(args, procs):
    """The checkpoint's Model; ours store their config, a released one's is its config.yaml (or preset)."""
    try:
        net, config, note, recorded = open_checkpoint(args.ckpt, not args.no_ema, procs)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"sample.py: {e}") from e
    net = net.to(procs.device)
    if note:
        procs.say(note)
    arch, kw = type(net).__name__, net.init_kwargs
    if arch not in RELEASED_PRESETS:
        raise SystemExit(f"sample.py: {args.ckpt} holds a {arch}; images come from a DiT or a UNet")
    # Classes: checked against the model's, before any VAE loads.
    if args.classes and not net.num_classes:
        raise SystemExit("sample.py: this model is unconditional (no classes): drop --class")
    if bad := [c for c in args.classes or [] if not 0 <= c < net.num_classes]:
        raise SystemExit(f"sample.py: --class {bad[0]} is out of range: the model has classes 0 to "
                         f"{net.num_classes - 1}")
    # A DiT on 4 channels works on SD-VAE latents (decoded by the VAE they came from), the rest on pixels.
    shape = data_shape(net)
    decode = None
    if arch == "DiT" and shape[0] == 4:
        vae, scale = checkpoint_vae(recorded, args.vae, procs)
        decode = lambda z: decode_latents(vae, z, scale)       # noqa: E731
    name = f"{arch}({', '.join(f'{k}={v}' for k, v in kw.items())})"
    model = torch.compile(net) if args.compile else net
    return Model(name, model, config, shape, net.num_classes, decode)


def draws(args, model, indices, device):
    """(y, x1, eps) of the images `indices`, drawn on the CPU (the same on any device), then moved."""
    renoise_steps = args.nfe - 1 if args.sampler == "renoise" else 0
    y, x1, eps = per_image_draws(args.seed, indices, model.shape, model.num_classes, args.classes,
                                 renoise_steps)
    return None if y is None else y.to(device), x1.to(device), [e.to(device) for e in eps]


def images(args, model, y, x1, eps):
    """Samples in [-1, 1] (decoded, for latents): --nfe network calls on an equal grid, or --times."""
    if not len(x1):                                      # fewer images than processes
        return x1
    if args.sampler == "euler":
        x0 = soflow.sample_euler(model.net, x1, y, config=model.config, steps=args.nfe)
    else:
        x0 = soflow.sample(model.net, x1, y, eps=eps, config=model.config, steps=args.nfe, times=args.times,
                           mode=args.sampler)
    return model.decode(x0) if model.decode else x0


def write_outputs(args, paths, kept, fid_value, precision, seconds):
    """Rank 0 writes OUT.png, OUT.npz, OUT.json, atomically: None, or the message of a failed write."""
    grid = kept.pixels[:args.grid]
    failure = try_write(paths[0], lambda: save_grid(paths[0], grid, math.ceil(math.sqrt(len(grid)))),
                        WRITE_AGAIN)
    if args.npz and failure is None:
        arrays = dict(arr_0=kept.pixels, **({"arr_1": kept.labels} if kept.num_classes else {}))
        failure = try_write(paths[1], lambda: write_npz(paths[1], arrays), WRITE_AGAIN)
    if args.fid and failure is None:
        report = fid_report(args, fid_value, precision, seconds)
        failure = try_write(paths[-1], lambda: write_json(paths[-1], report), WRITE_AGAIN)
    return failure


def fid_report(args, value, precision, seconds):
    """OUT.json of --fid: the number and what it was computed from."""
    reference = args.fid if os.path.isfile(args.fid) else None
    return dict(fid=value, num_images=args.num_images, checkpoint=args.ckpt, ema=not args.no_ema,
                nfe=args.nfe, times=args.times, sampler=args.sampler, seed=args.seed, precision=precision,
                reference=args.fid, reference_sha256=fid.file_sha256(reference) if reference else None,
                inception_weights=args.inception_weights or fid.WEIGHTS_URL, seconds=seconds,
                images_per_s=args.num_images / seconds)


if __name__ == "__main__":
    main()
