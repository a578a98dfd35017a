"""Sampling throughput on the same DiT and the same batch of noise: the bare network forward F(x_1, 1, 0, y), SoFlow's
one-step sampler x_0 = f(x_1, 1, 0) (soflow.sample, 1 NFE) and flow matching's Euler sampler (soflow.sample_euler).

    python -m benchmarks.sampling                            # CPU default: DiT-S/4, batch 16, ~1 min on 2 cores
    python -m benchmarks.sampling --model DiT-XL/2 --batch-size 256 --device cuda --dtype bf16 --compile --json s.json

The one-call samplers first run --warmup times; then --repeats interleaved rounds each run every sampler once (the
Euler sampler, 50 network calls, only in the first --euler-repeats rounds). Under torch.no_grad, between
torch.cuda.synchronize() calls on a GPU. Printed: images/s from the median time, the spread (from the slowest and
the fastest run), and the ratio to the bare forward, whose images/s is the ceiling of a 1-NFE sampler.
"""
import argparse
import statistics
import time

import torch

import soflow
from benchmarks.common import CONFIG, add_setup_args, describe, setup, sync, write_json


def samplers(euler_steps):
    """name -> (function of (net, x1, y) -> images, network calls per image)."""
    def forward(net, x1, y):
        t = torch.ones(x1.shape[0], device=x1.device)
        return net(x1, t, torch.zeros_like(t), y)
    return {
        "network forward F(x_1, 1, 0)": (forward, 1),
        "SoFlow 1-NFE": (lambda net, x1, y: soflow.sample(net, x1, y, cfg=CONFIG), 1),
        f"flow matching, {euler_steps} Euler steps": (
            lambda net, x1, y: soflow.sample_euler(net, x1, y, cfg=CONFIG, steps=euler_steps), euler_steps),
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_setup_args(parser)
    parser.add_argument("--euler-steps", type=int, default=50, help="flow matching's Euler steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls of each one-call sampler")
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds of the one-call samplers")
    parser.add_argument("--euler-repeats", type=int, default=2, help="timed runs of the Euler sampler")
    args = parser.parse_args(argv)
    # Setup: one network in eval mode, one batch of noise.
    device, net, model, x1, y, autocast = setup(args)
    net.eval()
    table = samplers(args.euler_steps)
    euler = list(table)[-1]
    print(describe(args, device))
    # Warm up: the one-call samplers, and the Euler sampler with one step (it passes t as both times of F, which a
    # compiled network compiles anew for). Then interleaved rounds.
    for name, (fn, nfe) in table.items():
        for _ in range(args.warmup if nfe == 1 else 0):
            timed(fn, model, x1, y, autocast)
    timed(lambda net, x, y_: soflow.sample_euler(net, x, y_, cfg=CONFIG, steps=1), model, x1, y, autocast)
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
        print(f"{r['sampler']:<34}{r['nfe']:>4}{r['images_per_s']:>10.2f}{spread:>19}{r['ratio_to_forward']:>11.3f}")
    if args.json:
        write_json(args.json, dict(config=vars(args), threads=torch.get_num_threads(), torch=torch.__version__,
                                   samplers=rows))
    return rows


if __name__ == "__main__":
    main()
