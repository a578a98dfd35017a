r"""Sampling throughput on the same DiT and the same batch of noise: the bare network forward F(x_1, 1, 0, y),
SoFlow's one-step sampler x_0 = f(x_1, 1, 0) (soflow.sample, 1 NFE) and flow matching's Euler sampler
(soflow.sample_euler).

    python -m benchmarks.sampling               # CPU default: DiT-S/4, batch 16, ~1 min on 2 cores
    python -m benchmarks.sampling --model DiT-XL/2 --batch-size 256 --device cuda --precision bf16 --compile \
        --json s.json
    python -m benchmarks.sampling --end-to-end  # also sample.py on the same network: a few minutes on a CPU

The one-call samplers first run --warmup times; then --repeats interleaved rounds each run every sampler once
(the Euler sampler, 50 network calls, only in the first --euler-repeats rounds). Under torch.no_grad, between
torch.cuda.synchronize() calls on a GPU. Printed: images/s from the median time, the spread (from the slowest
and the fastest run), and the ratio to the bare forward, whose images/s is the ceiling of a 1-NFE sampler.

--end-to-end then runs sample.py's steps in this process on a checkpoint of the same network (--e2e-images
images, the same batch size, --precision and --compile, 1 NFE, a PNG grid and an .npz), each part on its own
clock: per-image noise, generation, VAE decoding, conversion to uint8 (and gathering), writing. The VAE is by
default the SD VAE's architecture with random weights, built offline: its cost is that of
stabilityai/sd-vae-ft-mse; --vae takes a hub name or a local folder.
"""
import argparse
import os
import statistics
import tempfile
import time
from dataclasses import asdict

import torch

import soflow
from benchmarks.common import CONFIG, add_setup_args, describe, sample_py_by_part, setup, sync, write_json


def samplers(euler_steps):
    """name -> (function of (net, x1, y) -> images, network calls per image)."""
    def forward(net, x1, y):
        t = torch.ones(x1.shape[0], device=x1.device)
        return net(x1, t, torch.zeros_like(t), y)
    return {
        "network forward F(x_1, 1, 0)": (forward, 1),
        "SoFlow 1-NFE": (lambda net, x1, y: soflow.sample(net, x1, y, config=CONFIG), 1),
        f"flow matching, {euler_steps} Euler steps": (
            lambda net, x1, y: soflow.sample_euler(net, x1, y, config=CONFIG, steps=euler_steps),
            euler_steps),
    }


@torch.no_grad()
def timed(fn, net, x1, y, autocast):
    """Seconds for one call of a sampler, synchronized on a GPU."""
    sync(x1.device)
    start = time.perf_counter()
    with autocast:
        fn(net, x1, y)
    sync(x1.device)
    return time.perf_counter() - start


def sd_vae_random():
    """The SD VAE's architecture (stabilityai/sd-vae-ft-mse: 4 levels of 128-512 channels, 2 layers each) with
    random weights: decoding costs what the real one costs, without a download."""
    from diffusers import AutoencoderKL
    return AutoencoderKL(block_out_channels=(128, 256, 512, 512),
                         down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
                         norm_num_groups=32, sample_size=256)


def end_to_end(args, net, forward_images_per_s):
    """sample.py's steps on a checkpoint of net, in this process, each part on its own clock; its generation
    rate over the bare forward."""
    num_images = args.e2e_images or args.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "net.pt")
        weights = {k: v.cpu() for k, v in net.state_dict().items()}
        torch.save(dict(arch="DiT", arch_kwargs=net.init_kwargs, model=weights, ema=weights,
                        config=asdict(CONFIG)), ckpt)
        vae = args.vae
        if vae == "sd-random":
            vae = os.path.join(tmp, "vae")
            sd_vae_random().save_pretrained(vae)
        stats = sample_py_by_part(["--ckpt", ckpt, "--vae", vae, "--num-images", str(num_images),
                                   "--batch-size", str(args.batch_size), "--precision", args.precision,
                                   "--seed", str(args.seed), "--npz", "--out", os.path.join(tmp, "samples")]
                                  + (["--compile"] if args.compile else []))
    seconds, loop_seconds = stats["seconds"], stats["loop_seconds"]
    stats["generation_to_forward"] = stats["generate_images_per_s"] / forward_images_per_s
    parts = {"noise": "per-image noise (CPU generators)", "generate": "generation (soflow.sample)",
             "decode": f"VAE decoding ({args.vae})", "convert": "to uint8 NHWC, gather",
             "write": "write PNG and .npz"}
    print(f"\nsample.py, {num_images} images in batches of {args.batch_size}, 1 NFE:")
    print(f"{'part':<44}{'seconds':>9}{'images/s':>10}{'share':>8}")
    for name, label in parts.items():
        part_seconds = seconds[name]
        rate = f"{num_images / part_seconds:.2f}" if part_seconds > 0 else "-"
        print(f"{label:<44}{part_seconds:>9.3f}{rate:>10}{part_seconds / loop_seconds:>8.1%}")
    print(f"{'end to end':<44}{loop_seconds:>9.3f}{stats['end_to_end_images_per_s']:>10.2f}")
    print(f"generation / bare forward: {stats['generation_to_forward']:.3f} (goal >= 0.9); end to end / bare "
          f"forward: {stats['end_to_end_images_per_s'] / forward_images_per_s:.3f}")
    return stats


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawTextHelpFormatter)
    add_setup_args(parser)
    parser.add_argument("--euler-steps", type=int, default=50, help="flow matching's Euler steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls of each one-call sampler")
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds of the one-call samplers")
    parser.add_argument("--euler-repeats", type=int, default=2, help="timed runs of the Euler sampler")
    parser.add_argument("--end-to-end", action="store_true", help="also run sample.py on the same network")
    parser.add_argument("--e2e-images", type=int, default=0, help="--end-to-end: images (0: one batch)")
    parser.add_argument("--vae", default="sd-random",
                        help="--end-to-end: 'sd-random', a hub name or a local folder")
    args = parser.parse_args(argv)
    if args.end_to_end and torch.device(args.device).type != ("cuda" if torch.cuda.is_available() else "cpu"):
        raise SystemExit("--end-to-end: sample.py runs on the GPU when there is one, else the CPU: "
                         "pass that --device")
    # Setup: one network in eval mode, one batch of noise.
    device, net, model, x1, y, autocast = setup(args)
    net.eval()
    table = samplers(args.euler_steps)
    euler = list(table)[-1]
    print(describe(args, device))
    # Warm up: the one-call samplers, and the Euler sampler with one step (it passes t as both times of F,
    # which a compiled network compiles anew for). Then interleaved rounds.
    for name, (fn, nfe) in table.items():
        for _ in range(args.warmup if nfe == 1 else 0):
            timed(fn, model, x1, y, autocast)
    timed(lambda net, x, y_: soflow.sample_euler(net, x, y_, config=CONFIG, steps=1), model, x1, y, autocast)
    times = {name: [] for name in table}
    rounds = max(args.repeats, args.euler_repeats)
    for k in range(rounds):
        ms = []
        for name, (fn, _) in table.items():
            if k < (args.euler_repeats if name == euler else args.repeats):
                times[name].append(timed(fn, model, x1, y, autocast))
                ms.append(f"{times[name][-1] * 1e3:.0f}")
        print(f"round {k + 1}/{rounds}, ms: {', '.join(ms)}", flush=True)
    # Table: images/s (median run; spread from the slowest and fastest runs), ratio to the bare forward.
    rows = []
    for name, (_, nfe) in table.items():
        ips = [args.batch_size / s for s in times[name]]
        rows.append(dict(sampler=name, nfe=nfe, images_per_s=args.batch_size / statistics.median(times[name]),
                         min_images_per_s=min(ips), max_images_per_s=max(ips), runs=len(ips),
                         ms_median=statistics.median(times[name]) * 1e3))
    ceiling = rows[0]["images_per_s"]
    print(f"\n{'sampler':<34}{'NFE':>4}{'images/s':>10}{'min-max':>19}{'/ forward':>11}")
    for r in rows:
        r["ratio_to_forward"] = r["images_per_s"] / ceiling
        spread = f"{r['min_images_per_s']:.2f}-{r['max_images_per_s']:.2f}"
        print(f"{r['sampler']:<34}{r['nfe']:>4}{r['images_per_s']:>10.2f}{spread:>19}"
              f"{r['ratio_to_forward']:>11.3f}")
    e2e = end_to_end(args, net, ceiling) if args.end_to_end else None
    if args.json:
        write_json(args.json, dict(config=vars(args), threads=torch.get_num_threads(),
                                   torch=torch.__version__, samplers=rows,
                                   **({"end_to_end": e2e} if e2e else {})))
    return rows


if __name__ == "__main__":
    main()
