"""What both benchmarks share: the DiT sizes, the command-line flags of the setup, the setup itself (one
network and one batch on one device), GPU synchronisation and an atomic JSON write."""
import time
from functools import partial

import torch

import soflow
import training.files
import training.loop
import training.settings

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
