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
import gc
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import soflow
import training

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
    parser.add_argument("--sampler", default="renoise", choices=["renoise", "chain"],
                        help="renoise: jump to t = 0 and re-noise (released); chain: f(x, t_i, t_{i+1})")
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
                             f"(ours record it; the released ones used {training.VAE_NAME})")
    training.add_precision_arg(parser)
    parser.add_argument("--compile", action="store_true", help="torch.compile the network")
    training.add_dist_timeout(parser)
    args = parser.parse_args(argv)
    for name, low in dict(nfe=1, num_images=1, batch_size=1, grid=1, seed=0).items():
        if getattr(args, name) < low:
            parser.error(f"--{name.replace('_', '-')} must be at least {low}")
    if args.times is not None:               # the check of soflow.sample, said before any loading
        if len(args.times) < 2 or any(b >= a for a, b in zip(args.times, args.times[1:])):
            parser.error(f"--times must decrease strictly, 2 points or more: {args.times}")
        args.nfe = len(args.times) - 1
    try:
        args.ckpt = args.ckpt if args.ckpt.startswith("hf://") else training.checkpoint_file(args.ckpt)
    except FileNotFoundError as e:
        raise SystemExit(f"sample.py: {e}") from e
    return args


def fid_report(args, value, precision, seconds):
    """OUT.json of --fid: the number and what it was computed from."""
    import fid
    reference = args.fid if os.path.isfile(args.fid) else None
    return dict(fid=value, num_images=args.num_images, checkpoint=args.ckpt, ema=not args.no_ema,
                nfe=args.nfe, times=args.times, sampler=args.sampler, seed=args.seed, precision=precision,
                reference=args.fid, reference_sha256=fid.file_sha256(reference) if reference else None,
                inception_weights=args.inception_weights or fid.WEIGHTS_URL, seconds=seconds,
                images_per_s=args.num_images / seconds)


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    rank, world_size, device = training.init_distributed(args.dist_timeout)
    try:
        return generate(args, rank, world_size, device, started)
    finally:                                # also on an error: a clean exit for every process
        if world_size > 1:
            dist.destroy_process_group()
            # Garbage left in reference cycles can hold gloo's work objects; freed at interpreter exit, they
            # abort the process now and then ("terminate called without an active exception"). Free it now.
            gc.collect()


def generate(args, rank, world_size, device, started):
    """main's work on one process: returns the timings."""
    say = print if rank == 0 else (lambda *a, **k: None)
    # Outputs: refuse to replace files unless asked (rank 0's view decides for every process).
    stem = os.path.splitext(os.path.basename(args.ckpt))[0]
    out = args.out or os.path.join("samples", f"{stem}-nfe{args.nfe}-seed{args.seed}")
    out = out[:-4] if out.endswith((".png", ".npz")) else out
    paths = [out + ".png"] + ([out + ".npz"] if args.npz else []) + ([out + ".json"] if args.fid else [])
    existing = training.gather_objects([p for p in paths if os.path.exists(p)], world_size)[0]
    if existing and not args.overwrite:
        raise SystemExit(f"sample.py: {' and '.join(existing)} already there: pass --overwrite, "
                         "or another --out")
    # Network and config: ours store their SoFlowConfig, a released one's is its config.yaml (or its preset).
    try:
        net, config, note, recorded = training.open_network(args.ckpt, not args.no_ema, rank, world_size)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"sample.py: {e}") from e
    net = net.to(device)
    if note:
        say(note)
    arch, kw = type(net).__name__, net.init_kwargs
    if arch not in training.RELEASED_PRESETS:
        raise SystemExit(f"sample.py: {args.ckpt} holds a {arch}; images come from a DiT or a UNet")
    # Data kind: a DiT on 4 channels works on SD-VAE latents, everything else on pixels.
    shape = (kw["in_channels"],) + (kw.get("input_size") or kw["img_resolution"],) * 2
    latent = arch == "DiT" and shape[0] == 4
    # Classes: checked against the model's.
    num_classes = net.num_classes
    if args.classes and not num_classes:
        raise SystemExit("sample.py: this model is unconditional (no classes): drop --class")
    if bad := [c for c in args.classes or [] if not 0 <= c < num_classes]:
        raise SystemExit(f"sample.py: --class {bad[0]} is out of range: the model has classes 0 to "
                         f"{num_classes - 1}")
    vae = vae_scale = None
    if latent:                               # the VAE its latents came from, unless --vae says otherwise
        vae, vae_scale = training.checkpoint_vae(recorded, args.vae, device, rank, world_size, say)
    precision, autocast = training.set_precision(args.precision, device)
    # FID: the Inception and the reference statistics on every process; each adds its own images' features.
    inception = reference = stats = None
    if args.fid:
        import fid
        inception, reference = training.start_fid(args.fid, args.inception_weights, device, args.batch_size,
                                                  flag="sample.py: --fid")
        stats = fid.FeatureStats(inception.feature_dim, device)
    model = torch.compile(net) if args.compile else net
    renoise_steps = args.nfe - 1 if args.sampler == "renoise" else 0
    run = dict(config=config, steps=args.nfe, times=args.times, mode=args.sampler)
    say(f"{arch}({', '.join(f'{k}={v}' for k, v in kw.items())}) on {'latents' if latent else 'pixels'} "
        f"{shape}; {args.num_images} images, {args.nfe} NFE ({args.sampler}), {world_size} process(es), "
        f"{precision}{', compiled' if args.compile else ''}")
    # Image indices: EDM's split into a multiple of world_size batches; rank r takes batches r, r + W, ...
    num_batches = math.ceil(args.num_images / (args.batch_size * world_size)) * world_size
    batches = torch.arange(args.num_images).tensor_split(num_batches)[rank::world_size]

    def draws(indices):     # drawn on the CPU, then moved: the same noise on any device
        y, x1, eps = training.per_image_draws(args.seed, indices, shape, num_classes, args.classes,
                                              renoise_steps)
        return None if y is None else y.to(device), x1.to(device), [e.to(device) for e in eps]

    # Untimed, a batch of each size (EDM's split gives at most two): compiling and first calls stay out of
    # images/s.
    for indices in {len(b): b for b in batches if len(b)}.values():
        y, x1, eps = draws(indices)
        with autocast:
            soflow.sample(model, x1, y, eps=eps, **run)

    def clock():
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    seconds = dict(noise=0.0, generate=0.0, decode=0.0, convert=0.0, fid=0.0, write=0.0)
    kept = args.num_images if args.npz else min(args.grid, args.num_images)    # the images rank 0 gathers
    pixels = labels = None
    if world_size > 1:                      # the clocks start together: no process waits in the first gather
        dist.barrier()
    loop_start = clock()
    for indices in tqdm(batches, desc="sampling", unit="batch", disable=rank > 0 or len(batches) == 1):
        t0 = clock()
        y, x1, eps = draws(indices)
        t1 = clock()
        with autocast:
            x0 = soflow.sample(model, x1, y, eps=eps, **run) if len(indices) else x1
            t2 = clock()
            x0 = training.decode_latents(vae, x0, vae_scale) if latent and len(indices) else x0
        t3 = clock()
        # uint8 = clamp(x * 127.5 + 128, 0, 255), NCHW: what the Inception takes.
        uint8 = training.to_uint8(x0.float())
        t4 = clock()
        if stats is not None and len(indices):
            stats.add(fid.features(inception, uint8))
        t5 = clock()
        keep = indices < kept
        batch = uint8[keep.to(uint8.device)].permute(0, 2, 3, 1).cpu().numpy()        # NHWC, as ADM reads
        part = (indices[keep].numpy(), batch, None if y is None else y[keep.to(y.device)].cpu().numpy())
        parts = training.gather_to_rank0(part, rank, world_size)
        for idx, part, part_labels in [p for p in parts or [] if len(p[0])]:    # fewer images than processes
            if pixels is None:
                pixels = np.empty((kept, *part.shape[1:]), np.uint8)
                labels = np.empty(kept, np.int64) if num_classes else None
            pixels[idx] = part
            if part_labels is not None:
                labels[idx] = part_labels
        t6 = clock()
        for name, dt in zip(seconds, (t1 - t0, t2 - t1, t3 - t2, t4 - t3 + t6 - t5, t5 - t4)):
            seconds[name] += dt
    fid_value = None
    if stats is not None:                    # every process adds its sums; rank 0 computes the distance
        t0 = clock()
        stats.all_reduce()
        fid_value = fid.frechet_distance(*stats.mu_sigma(), *reference) if rank == 0 else None
        seconds["fid"] += clock() - t0
    # Rank 0 writes, atomically; the others wait for it and learn whether it failed.
    failure = None
    if rank == 0:
        t0 = clock()
        grid = pixels[:args.grid]
        columns = math.ceil(math.sqrt(len(grid)))
        failure = training.try_write(paths[0], lambda: training.save_grid(paths[0], grid, columns),
                                     WRITE_AGAIN)
        if args.npz and failure is None:
            arrays = dict(arr_0=pixels, **({"arr_1": labels} if num_classes else {}))
            failure = training.try_write(paths[1], lambda: training.write_npz(paths[1], arrays), WRITE_AGAIN)
        if args.fid and failure is None:
            report = fid_report(args, fid_value, precision, clock() - loop_start)
            failure = training.try_write(paths[-1], lambda: training.write_json(paths[-1], report),
                                         WRITE_AGAIN)
            say(f"FID {fid_value:.4f} against {args.fid} ({args.num_images} images, {args.nfe} NFE)")
        seconds["write"] = clock() - t0
    loop_seconds = clock() - loop_start
    reports = training.gather_objects((seconds, failure), world_size)
    if failure := reports[0][1]:
        raise SystemExit(f"sample.py: {failure}")
    # Generation alone: the sampler on the process that spent longest in it.
    generate_seconds = max(report["generate"] for report, _ in reports)
    stats = dict(images=args.num_images, fid=fid_value, seconds=seconds, loop_seconds=loop_seconds,
                 total_seconds=time.perf_counter() - started,
                 generate_images_per_s=args.num_images / generate_seconds,
                 end_to_end_images_per_s=args.num_images / loop_seconds)
    say(f"wrote {', '.join(paths)}\n{args.num_images} images in {loop_seconds:.2f} s: "
        f"{stats['end_to_end_images_per_s']:.2f} images/s end to end, {stats['generate_images_per_s']:.2f} "
        "generation alone (seconds on rank 0: " + ", ".join(f"{k} {v:.2f}" for k, v in seconds.items())
        + f"; {stats['total_seconds']:.1f} s with loading)")
    if world_size > 1:
        dist.barrier()
    return stats


if __name__ == "__main__":
    main()
