"""What both benchmarks share: the DiT sizes, the command-line flags of the setup, the setup itself (one
network and one batch on one device), GPU synchronisation and an atomic JSON write."""
import time
from functools import partial

import torch

import fid
import sample
import soflow
import training.files
import training.loop
import training.settings
from training import processes
from training.files import to_uint8
from training.sampling import Kept, image_batches, start_fid

# DiT sizes: soflow's table, plus DiT's S/4 (Peebles & Xie 2023), the CPU default.
SIZES = {**soflow.DiT_models,
         "DiT-S/4": partial(soflow.DiT, depth=12, hidden_size=384, num_heads=6, patch_size=4)}
CONFIG = soflow.PRESETS["imagenet"]     # the samplers read its schedule and parameterization


def add_setup_args(parser):
    parser.add_argument("--model", default="DiT-S/4", choices=sorted(SIZES),
                        help="DiT size (32x32x4 latents)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=training.settings.PRECISIONS,
                        help="bf16: autocast; tf32: TF32 matmuls (GPU); fp32: TF32 off (set_precision)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--seed", type=int, default=0)


def open_device(args):
    """--device (checked), --threads and --seed: the device a benchmark runs on."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch sees no GPU: run on a GPU machine or pass --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return device


def setup(args):
    """(device, net, model, x, y, autocast): a class-conditional DiT (model: compiled if asked, else net), a
    batch of (B, 4, 32, 32) latents with labels, and the autocast context of --precision. Random weights: the
    cost ignores them."""
    device = open_device(args)
    net = SIZES[args.model](input_size=32, in_channels=4, num_classes=1000).to(device)
    model = torch.compile(net) if args.compile else net
    x = torch.randn(args.batch_size, 4, 32, 32, device=device)
    y = torch.randint(0, 1000, (args.batch_size,), device=device)
    _, autocast = training.loop.set_precision(args.precision, device)
    return device, net, model, x, y, autocast


def describe(args, device):
    return (f"{args.model}, batch {args.batch_size} of 4x32x32 latents, {device.type} {args.precision}"
            f"{' compiled' if args.compile else ''}, {torch.get_num_threads()} threads")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    """Seconds that fn() takes, the GPU's queue included."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


write_json = training.files.write_json       # atomically: an interrupted run never leaves a truncated file


def sample_py_by_part(argv):
    """sample.py's steps (sample.generate's order) on this process, each part on its own clock.

    argv: sample.py's flags. Loading and the first call of each batch size (compiling) stay off the clocks.
    Returns the images, the seconds by part (noise, generate, decode, convert and gather, fid, write), the
    loop's seconds, the images/s of generation alone and end to end, and the FID if --fid was given."""
    flags = sample.parse_args(argv)
    with processes.started() as procs:
        paths = sample.output_paths(flags, procs)
        model = sample.open_model(flags, procs)
        precision, autocast = training.loop.set_precision(flags.precision, procs.device)
        inception = reference = stats = None
        if flags.fid:
            inception, reference = start_fid(flags.fid, flags.inception_weights, procs.device,
                                             flags.batch_size)
            stats = fid.FeatureStats(inception.feature_dim, procs.device)
        batches = image_batches(flags.num_images, flags.batch_size, procs)
        for indices in {len(b): b for b in batches if len(b)}.values():      # one batch of each size
            with torch.no_grad(), autocast:
                sample.images(flags, model, *sample.draws(flags, model, indices, procs.device))
        seconds = dict(noise=0.0, generate=0.0, decode=0.0, convert=0.0, fid=0.0, write=0.0)
        kept = Kept(flags.num_images if flags.npz else min(flags.grid, flags.num_images),
                           model.num_classes)

        def clock(part, started):
            sync(procs.device)
            seconds[part] += time.perf_counter() - started
            return time.perf_counter()

        loop_start = now = time.perf_counter()
        for indices in batches:
            y, x1, eps = sample.draws(flags, model, indices, procs.device)
            now = clock("noise", now)
            with torch.no_grad(), autocast:
                x0 = soflow.sample(model.net, x1, y, eps=eps, config=model.config, steps=flags.nfe,
                                   times=flags.times, mode=flags.sampler)
                now = clock("generate", now)
                x0 = model.decode(x0) if model.decode else x0
            now = clock("decode", now)
            pixels = to_uint8(x0.float())
            kept.gather(indices, pixels, y, procs)
            now = clock("convert", now)
            if stats is not None:
                stats.add(fid.features(inception, pixels))
                now = clock("fid", now)
        value = None
        if stats is not None:
            value = fid.frechet_distance(*stats.all_reduce().mu_sigma(), *reference)
            now = clock("fid", now)
        failure = sample.write_outputs(flags, paths, kept, value, precision, now - loop_start)
        clock("write", now)
        if failure:
            raise SystemExit(failure)
    loop_seconds = time.perf_counter() - loop_start
    return dict(images=flags.num_images, seconds=seconds, loop_seconds=loop_seconds, fid=value,
                generate_images_per_s=flags.num_images / seconds["generate"],
                end_to_end_images_per_s=flags.num_images / loop_seconds)
