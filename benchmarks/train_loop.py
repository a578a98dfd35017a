r"""The training script's own step against the bare Algorithm 1 step, on the same U-Net and the same batch
size: what the loop around the loss costs (data, augmentation, grad norm, EMA, logs, checks).

    python -m benchmarks.train_loop      # CPU default: UNet-T, batch 16, 1 thread, ~1 min on 2 cores
    python -m benchmarks.train_loop --model UNet-CIFAR10 --batch-size 128 --device cuda --precision bf16 \
        --json loop.json

Bare step: zero_grad, soflow.soflow_loss (PRESETS["cifar10"]), backward and a RAdam step (the script's: lr
1e-4, betas (0.9, 0.999)) on one batch made beforehand, already in [-1, 1], with its augmentation labels as
cond (the network does the script's work: the U-Net runs its augmentation layer either way). No data work, no
EMA, no logs. Script step: train_cifar.main itself, on a CIFAR-format folder of random uint8 images that the
benchmark writes once (5 pickled training batches, loaded by the script before its first step): the images in
memory on the device, global_batch_indices, to_model_range, EDM's augment with its labels as cond, the step of
training.loop.train (accumulate_gradients, the grad norm, RAdam, EMA every 16 steps), its logs (--log-every;
default every step, the worst case), the stop check; a grid and a checkpoint only at the run's end (huge
--sample-every, --ckpt-every).

How: training.loop.train starts each step by calling training.data.global_batch_indices. For each run the
benchmark wraps that function in a clock, which runs one bare step and then each part below alone (timed on
their own), and reads the time before and after that work (torch.cuda.synchronize first on a GPU); then the
original runs. Script step k is the time from the clock's exit in step k to its entry in step k + 1: the whole
of the loop's step, with everything it does between two steps, and none of the clock's work. So the bare and
the script steps strictly alternate (the finest interleaving: a change in the machine's load touches both
alike; each follows one of the other), and the run's start-up and end (network, EMA copy, grid, checkpoint)
are left out exactly, where differencing the wall times of two runs of different lengths would only cancel
them up to their noise. A round is one script run of --warmup untimed steps, --window timed steps and one more
(its start closes the window); each of its lines is the mean ms/step over the window. A window of a multiple
of 16 steps holds one EMA update per 16 steps: the amortised cost. Printed: the median over --rounds rounds,
the spread (fastest and slowest round), images/s, the ratio script / bare of the medians and the overhead
(ratio - 1). "its own timer": training.loop.train's images_per_s in metrics.jsonl (time.time from the step's
start to after the EMA update: no logs or checks), less the clock's work. (On a GPU the clock's synchronize
costs nothing more: training.loop.train already waits for the GPU each step, at its isfinite(grad_norm) and
stop tests.) The parts, each timed alone on the bare step's network and data, once per step:
global_batch_indices, the gather and to_model_range; augment; the grad norm (clip_grad_norm_(inf) and its
isfinite test); ema_update, counted 1 / 16; and, with records in the window, what the loop does after its own
timer stops: script - its own timer, per round (the log record, tqdm, the stop check). "the rest": script -
bare - those parts (accumulate_gradients' scaling and diagnostics, zero_grad's and the clock's calls, and
noise: it can come out below zero). On a CPU that other processes share, more than one thread makes OpenMP
threads wait on each other at every op (a UNet-T step took 5 s with 2 threads on a busy 2-core machine, 0.26 s
with 1): the default is --threads 1.
"""
import argparse
import contextlib
import copy
import io
import json
import math
import os
import pickle
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

import soflow
import train_cifar
import training.data
import training.loop
import training.processes
import training.settings
from benchmarks.common import sync, timed, write_json

CONFIG = soflow.PRESETS["cifar10"]  # train_cifar's default --preset
TOTAL_STEPS = 800_000               # train_cifar's default --steps: r(k, K) of the released run's first steps
EMA_DECAY = 0.9999                  # its default --ema-decay
AFTER = "logs, tqdm, stop check (script - own timer)"


def write_cifar_folder(root, images_per_batch, seed):
    """root/cifar-10-batches-py/data_batch_{1..5}: random uint8 images with labels, as pickled by CIFAR-10."""
    folder = os.path.join(root, training.data.FOLDER)
    os.makedirs(folder)
    rng = np.random.default_rng(seed)
    for name in training.data.TRAIN_BATCHES:
        batch = {b"data": rng.integers(0, 256, (images_per_batch, 3 * 32 * 32), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, images_per_batch).tolist()}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(batch, f)
    return root


@contextlib.contextmanager
def step_clock(device, calls, between=lambda: None):
    """While inside, each call of training.data.global_batch_indices (the loop's first act in a step)
    runs between() and appends (the time before it, the time after it) to calls; then the original runs."""
    original = training.data.global_batch_indices

    def clocked(*args, **kwargs):
        sync(device)
        before = time.perf_counter()
        between()
        sync(device)
        calls.append((before, time.perf_counter()))
        return original(*args, **kwargs)
    training.data.global_batch_indices = clocked
    try:
        yield
    finally:
        training.data.global_batch_indices = original


def script_argv(args, data_dir, results_dir, steps):
    return ["--data-path", data_dir, "--no-download", "--model", args.model, "--results-dir", results_dir,
            "--global-batch-size", str(args.batch_size), "--stop-at", str(steps),
            "--log-every", str(args.log_every), "--sample-every", str(10 ** 9), "--ckpt-every", str(10 ** 9),
            "--keep-ckpts", "1", "--global-seed", str(args.seed), "--precision", args.precision]


def loop_timer(results_dir, first, last, batch_size, inside):
    """Mean seconds/step by training.loop.train's own timer over steps first..last, from the records of
    metrics.jsonl that cover only those steps (a record at step k covers the steps since the previous record),
    less inside[k - 1], the seconds the clock spent inside step k (that timer starts before
    global_batch_indices); None if no record fits."""
    with open(os.path.join(results_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    seconds, steps, previous = 0.0, 0, 0
    for r in records:
        n = r["step"] - previous
        if previous >= first - 1 and r["step"] <= last:
            seconds += n * batch_size / r["images_per_s"] - sum(inside[previous:r["step"]])
            steps += n
        previous = r["step"]
    return seconds / steps if steps else None


def script_run(args, data_dir, results_dir, device, between):
    """One train_cifar.main run of warmup + window + 1 steps, between() run by the clock at the start of each:
    (seconds of each script step in the window, the loop's own mean seconds/step over it or None)."""
    steps, calls, output = args.warmup + args.window + 1, [], io.StringIO()
    try:
        with step_clock(device, calls, between), contextlib.redirect_stdout(output), \
                contextlib.redirect_stderr(output):                # tqdm's bar and the start line
            train_cifar.main(script_argv(args, data_dir, results_dir, steps))
    except BaseException:
        print(output.getvalue()[-3000:], file=sys.stderr)
        raise
    if len(calls) != steps:
        raise RuntimeError(f"training.loop.train called global_batch_indices {len(calls)} times in "
                           f"{steps} steps: the clock expects one call at the start of each step; "
                           "update step_clock")
    # Step k runs from the clock's exit in call k to its entry in call k + 1 (calls[k - 1], calls[k]).
    window = [calls[k][0] - calls[k - 1][1] for k in range(args.warmup + 1, args.warmup + args.window + 1)]
    inside = [after - before for before, after in calls]
    own = loop_timer(results_dir, args.warmup + 1, args.warmup + args.window, args.batch_size, inside)
    shutil.rmtree(results_dir)
    return window, own


def bare_step(net, opt, x0, cond, step, autocast, device):
    """Seconds for one step of Algorithm 1 alone: zero_grad, loss, backward, RAdam step."""
    sync(device)
    start = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    with autocast:
        loss, _ = soflow.soflow_loss(net, x0, None, cond, config=CONFIG, step=step, total_steps=TOTAL_STEPS)
    loss.backward()
    opt.step()
    sync(device)
    return time.perf_counter() - start


def parts(args, images, net, ema, device):
    """name -> (function timed alone, the fraction of steps that run it). net must hold gradients."""
    B, N = args.batch_size, len(images)
    x = train_cifar.to_model_range(images[:B])
    step, indices = iter(range(10 ** 9)), training.data.global_batch_indices    # the original, not the clock

    def data():
        rows = indices(next(step), B, N, args.seed).to(device)
        train_cifar.to_model_range(images[rows])

    def grad_norm():
        norm = torch.nn.utils.clip_grad_norm_(net.parameters(), float("inf"))
        bool(torch.isfinite(norm))
    return {
        "batch rows, gather, to_model_range": (data, 1.0),
        "EDM augment (p 0.12)": (lambda: train_cifar.augment(x, p=0.12), 1.0),
        "grad norm (clip_grad_norm_ inf) + isfinite": (grad_norm, 1.0),
        f"EMA update, 1 step in {args.ema_every}": (
            lambda: training.loop.ema_update(ema, net, EMA_DECAY ** args.ema_every), 1 / args.ema_every),
    }


def spread(values):
    ms = [v * 1e3 for v in values]
    return dict(ms_median=statistics.median(ms), ms_min=min(ms), ms_max=max(ms), ms_all=ms)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="UNet-T", choices=sorted(soflow.UNet_models))
    parser.add_argument("--batch-size", type=int, default=16,
                        help="the script's --global-batch-size (one process)")
    parser.add_argument("--device", default=None,
                        help="default (and the only choice): the device train_cifar.py picks, cuda if torch "
                             "sees one, else cpu")
    parser.add_argument("--precision", default="", choices=training.settings.PRECISIONS,
                        help="of the bare step and the script (training.loop.set_precision; default bf16 on "
                             "CUDA, fp32 on a CPU)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (0: torch's default)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--window", type=int, default=16,
                        help="timed steps per round (a multiple of 16: one EMA update per 16 steps, "
                             "as in the script)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each script run")
    parser.add_argument("--log-every", type=int, default=1,
                        help="the script's --log-every (1: the worst case)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if min(args.batch_size, args.rounds, args.window, args.log_every) < 1 or args.warmup < 0:
        parser.error("--batch-size, --rounds, --window and --log-every must be positive, --warmup >= 0")
    args.ema_every = train_cifar.parse_args(["--results-dir", "-"]).ema_every      # the released recipe's 16
    if args.threads:
        torch.set_num_threads(args.threads)
    with training.processes.started() as procs:        # the script's device, by the script's rule
        device = procs.device
    asked = torch.device(args.device or device)
    if asked.type != device.type or asked.index not in (None, device.index):
        raise SystemExit(f"--device {args.device}: train_cifar.py would run on {device}; the two steps must "
                         "share a device (leave --device out)")
    args.precision, autocast = training.loop.set_precision(args.precision, device)     # the script's too

    with tempfile.TemporaryDirectory(prefix="train_loop_") as tmp:
        # Data: a CIFAR-format folder (enough images for a run's rows in one epoch), loaded here once for the
        # bare batch and the parts; the script loads it itself, before its steps (outside the clock).
        per_file = max(256, math.ceil(args.batch_size * (args.warmup + args.window + 2) / 5))
        data_dir = write_cifar_folder(os.path.join(tmp, "data"), per_file, args.seed)
        images = training.data.load_cifar10(data_dir, download=False)[0].to(device)
        # The bare step: the script's network (same seed), optimizer, and one fixed augmented batch.
        torch.manual_seed(args.seed)
        net = soflow.UNet_models[args.model](num_classes=0).to(device)
        opt = torch.optim.RAdam(net.parameters(), lr=1e-4, betas=(0.9, 0.999))
        x0, cond = train_cifar.augment(train_cifar.to_model_range(images[:args.batch_size]), p=0.12)
        ema = copy.deepcopy(net).eval().requires_grad_(False)           # for the EMA part
        n_params = sum(p.numel() for p in net.parameters())
        print(f"{args.model} ({n_params / 1e6:.2f}M parameters), batch {args.batch_size} of 3x32x32, "
              f"{device} {args.precision}, {torch.get_num_threads()} threads; "
              f"{args.rounds} rounds of {args.window} steps; the script logs every {args.log_every}, "
              f"EMA every {args.ema_every}")
        table = parts(args, images, net, ema, device)
        step = iter(range(10 ** 9))                              # the bare step's k, for r(k, K)
        bare_step(net, opt, x0, cond, next(step), autocast, device)   # a cold first call of each
        for fn, _ in table.values():
            fn()
        times = {"bare": [], "script": [], "own": [], **{name: [] for name in table}}
        done = {"bare": [], **{name: [] for name in table}}    # every call's time in the current run

        def between():
            """One bare step, then each part alone: the clock runs this before each script step."""
            done["bare"].append(bare_step(net, opt, x0, cond, next(step), autocast, device))
            for name, (fn, share) in table.items():
                done[name].append(timed(fn, device) * share)

        for r in range(args.rounds):
            for v in done.values():
                v.clear()
            window, own = script_run(args, data_dir, os.path.join(tmp, f"run{r}"), device, between)
            times["script"].append(statistics.fmean(window))
            if own is not None:
                times["own"].append(own)
            for name, v in done.items():       # the calls before the window's script steps, one before each
                times[name].append(statistics.fmean(v[args.warmup:args.warmup + args.window]))
            print(f"round {r + 1}/{args.rounds}, ms/step: bare {times['bare'][-1] * 1e3:.1f}, "
                  f"script {times['script'][-1] * 1e3:.1f}", flush=True)

    # The table: median over rounds, the spread, images/s; the ratio and the overhead from the medians.
    bare, script = spread(times["bare"]), spread(times["script"])
    for row in (bare, script):
        row["images_per_s"] = args.batch_size / row["ms_median"] * 1e3
    ratio = script["ms_median"] / bare["ms_median"]
    overhead_pct = (ratio - 1) * 100
    round_ratios = [s / b for s, b in zip(times["script"], times["bare"])]
    own = spread(times["own"]) if times["own"] else None
    part_rows = {name: spread(times[name]) for name in table}
    if own is not None:      # what the loop does after its timer stops: per round, script - its own timer
        part_rows[AFTER] = spread([s - o for s, o in zip(times["script"], times["own"])])
    rest_ms = script["ms_median"] - bare["ms_median"] - sum(p["ms_median"] for p in part_rows.values())

    def line(name, row):
        s = f"{row['ms_min']:.1f}-{row['ms_max']:.1f}"
        ips = args.batch_size / row["ms_median"] * 1e3
        return (f"{name:<44}{row['ms_median']:>9.1f}{s:>15}{ips:>10.1f}"
                f"{row['ms_median'] / bare['ms_median']:>8.3f}")
    print(f"\n{'':<44}{'ms/step':>9}{'min-max':>15}{'img/s':>10}{'/ bare':>8}")
    print(line("bare step (loss, backward, RAdam)", bare))
    print(line("script step (train_cifar.py, training.loop.train)", script))
    if own is not None:
        print(line("  its own timer (metrics.jsonl images_per_s)", own))
    print(f"overhead: {overhead_pct:+.1f}% (script / bare {ratio:.3f}; per round {min(round_ratios):.3f}-"
          f"{max(round_ratios):.3f}), target < 5%: {'met' if overhead_pct < 5 else 'NOT met'}")
    print(f"\n{'parts of the overhead, each timed alone':<44}{'ms/step':>9}{'min-max':>15}{'% bare':>10}")
    for name, row in part_rows.items():
        s = f"{row['ms_min']:.2f}-{row['ms_max']:.2f}"
        print(f"  {name:<42}{row['ms_median']:>9.2f}{s:>15}"
              f"{row['ms_median'] / bare['ms_median'] * 100:>9.1f}%")
    print(f"  {'the rest (script - bare - the parts above)':<42}{rest_ms:>9.2f}{'':>15}"
          f"{rest_ms / bare['ms_median'] * 100:>9.1f}%")
    results = dict(config=vars(args), device=str(device), n_params=n_params,
                   threads=torch.get_num_threads(), torch=torch.__version__, bare=bare, script=script,
                   script_own_timer=own, ratio=ratio, overhead_pct=overhead_pct, round_ratios=round_ratios,
                   parts=part_rows, rest_ms=rest_ms)
    if args.json:
        write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
