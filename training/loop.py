"""The training loop: Algorithm 1 on one process or many, with micro-batches, EMA, precision, logs, sample
grids, FID, checkpoints, exact resume, the non-finite guard, and stop requests (SIGTERM, SIGINT).

A script starts its processes, builds its network, data and optimizer, then calls train(). The method itself
is soflow.py; this file holds no equation of it.
"""
import contextlib
import copy
import os
import signal
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn as nn

import fid
from soflow import sample, soflow_loss
from training import checkpoints, logs, processes, released, sampling, teachers
from training.data import rows_of_process
from training.files import save_grid, to_uint8, try_write
from training.settings import PRECISIONS


@dataclass(frozen=True)
class Data:
    """What the loop reads: num_examples rows, each of the given shape; batch(rows) -> (x0, y, cond).

    batch returns the rows' data on the device (augmented if the data is), y labels or None, cond or None."""
    num_examples: int
    shape: tuple
    batch: Callable


# ----- EMA and precision -----
def ema_decay_at(step, ema_decay, warmup=True):
    """The EMA's decay for update `step` (0, 1, ...): min(ema_decay, (1 + step) / (10 + step)) with warm-up.

    The network starts as the identity map (F = 0), so without a warm-up a short run's EMA is still mostly its
    initial weights: 0.9999 keeps 95% of them after 500 steps, and the samples are the input noise."""
    # Deviation: the released code has no warm-up (a constant 0.9999). The ramp reaches 0.9999 at step 89,990;
    # the final EMA weighs everything before that by 0.9999^(K - 89,990): 3e-14 after K = 400k steps, 1e-31
    # after 800k. At the end of a full run the two EMAs are the same to float precision.
    return min(ema_decay, (1 + step) / (10 + step)) if warmup else ema_decay


@torch.no_grad()
def ema_update(ema, net, ema_decay):
    """theta_ema <- ema_decay theta_ema + (1 - ema_decay) theta; buffers are copied."""
    for e, p in zip(ema.parameters(), net.parameters()):
        e.lerp_(p.detach().to(e.dtype), 1 - ema_decay)
    for e, b in zip(ema.buffers(), net.buffers()):
        e.copy_(b)


def set_precision(precision, device):
    """(precision, autocast) for --precision on this device; TF32 is switched to match (process-wide).

    bf16: matmuls and convolutions autocast to bfloat16 (7-bit mantissa), the rest fp32. tf32: fp32 tensors,
    matmuls and convolutions on TF32 tensor cores (10-bit mantissa). fp32: full fp32, TF32 off. "": bf16 on a
    GPU, fp32 on a CPU, which has no TF32."""
    precision = precision or ("bf16" if device.type == "cuda" else "fp32")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "tf32" and device.type != "cuda":
        raise SystemExit("--precision tf32 needs an NVIDIA GPU (TF32 is a mode of its matmuls): on a CPU "
                         "pass --precision fp32 or bf16")
    fid.set_tf32(precision == "tf32")
    return precision, torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16")


class StopRequest:
    """Inside it, SIGTERM (a cluster's preemption) or SIGINT (Ctrl-C) asks the loop to save and stop.

    A second signal acts at once; the previous handlers come back on exit."""
    def __enter__(self):
        self.signal = None
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def handle(self, signum, frame):
        self.signal = signal.Signals(signum).name
        signal.signal(signum, self.previous[signum])

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# ----- The loop -----
def train(settings, net, config, make_optimizer, data, run_config, procs, decode=lambda x: x,
          grid_labels=None, extras=None):
    """Algorithm 1 in a loop, on one process or many; resumes the run folder if it holds checkpoints.

    settings: the TrainSettings. config: the SoFlowConfig. net: the bare network, built with the same seed on
    every process. make_optimizer(params) -> optimizer. data: the Data to read.
    run_config: the script's settings that define the run (a resumed run must match them).
    procs: the script's Processes (it starts and ends them; the loop does neither).
    decode: x0 -> images in [-1, 1] for the sample grids. grid_labels: (N,) labels, None if unconditional.
    extras: what every checkpoint also stores (the VAE of latents, say).
    """
    # Setup: batch sizes, the EMA copy (before DDP: no 'module.' prefixes), seeds, resume.
    if settings.global_batch_size % procs.world_size:
        raise SystemExit(f"--global-batch-size {settings.global_batch_size} does not divide into "
                         f"{procs.world_size} processes: pick a multiple of the number of processes")
    local_batch = settings.global_batch_size // procs.world_size
    micro_batch = settings.micro_batch or local_batch
    if local_batch % micro_batch:
        raise SystemExit(f"--micro-batch {micro_batch} does not divide the per-process batch {local_batch}")
    net = net.to(procs.device)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    optimizer = make_optimizer(net.parameters())
    run_flags = ("global_batch_size", "global_seed", "steps", "ema_decay", "ema_every", "ema_warmup",
                 "teacher")
    run_config = {**run_config, "config": asdict(config), **{k: getattr(settings, k) for k in run_flags}}
    # The grid's noise: one example's shape, from its own generator.
    grid_shape = (32 if grid_labels is None else len(grid_labels), *data.shape)
    grid_generator = torch.Generator().manual_seed(settings.global_seed)
    grid_noise = torch.randn(grid_shape, generator=grid_generator).to(procs.device)
    # Each process draws its own noise and times.
    torch.manual_seed(settings.global_seed * procs.world_size + procs.rank)
    start, notes = checkpoints.resume(settings.results_dir, run_config, net, ema, optimizer, procs)
    if settings.init_from and start == 0:           # fine-tuning: a new run from another's weights
        notes.append(released.start_from_checkpoint(settings, net, ema, config, procs))
    elif settings.init_from:
        notes.append(f"{settings.results_dir} has checkpoints: resuming them (--init-from is for a new run)")
    teacher = None                                  # distillation (Sec. 4.2): the teacher's velocity field
    if settings.teacher:
        teacher, note = teachers.start_teacher(settings.teacher, net, data.shape, config, procs,
                                               settings.compile)
        notes.append(note)
    # The gradient pass goes through DDP, which all-reduces the gradients.
    model = nn.parallel.DistributedDataParallel(net) if procs.world_size > 1 else net
    model = torch.compile(model) if settings.compile else model
    precision, autocast = set_precision(settings.precision, procs.device)
    extras = {**(extras or {}), "precision": precision}
    end = min(settings.steps, settings.stop_at or settings.steps)
    os.makedirs(os.path.join(settings.results_dir, "samples"), exist_ok=True)
    tracker = logs.start_wandb(settings.wandb_project, settings.results_dir, run_config, procs)
    inception, reference = (sampling.start_fid(settings.fid_ref, settings.inception_weights, procs.device)
                            if settings.fid_every else (None, None))
    log = logs.RunLog(settings.results_dir, procs, start, end, tracker)
    for note in notes:
        log.say(note)
    millions = sum(p.numel() for p in net.parameters()) / 1e6
    log.say(f"{'resuming at' if start else 'starting'} step {start} of {settings.steps}: {procs.world_size} "
            f"process(es), {type(net).__name__} with {millions:.2f}M parameters, {precision}")
    bad_steps = 0
    # The bar closes first on any exit, so that a stop's message is the last line.
    with StopRequest() as stop_request, contextlib.closing(log.bar):
        for step in range(start + 1, end + 1):  # step: the number of updates made after it
            # One step: this process's rows of global batch step - 1, micro-batches, then one update.
            started = time.time()
            rows = rows_of_process(step - 1, settings.global_batch_size, data.num_examples,
                                   settings.global_seed, procs)
            optimizer.zero_grad(set_to_none=True)
            batches = [data.batch(part) for part in rows.split(micro_batch)]
            diagnostics = accumulate_gradients(model, batches, config, step - 1, settings.steps, autocast,
                                               teacher)
            grad_norm = nn.utils.clip_grad_norm_(net.parameters(), float("inf"))  # the same on every process
            bad_steps = 0 if torch.isfinite(grad_norm) else bad_steps + 1
            if bad_steps == 0:
                optimizer.step()
            else:  # skip the update: the weights stay finite
                log.say(f"step {step}: non-finite loss or gradient, update skipped ({bad_steps} in a row)")
                if bad_steps >= settings.max_bad_steps:
                    raise SystemExit(f"{bad_steps} non-finite steps in a row: lower the learning rate, "
                                     "check the data, or resume from an earlier checkpoint")
            if step % settings.ema_every == 0:
                step_ema_decay = ema_decay_at(step - 1, settings.ema_decay, settings.ema_warmup)
                ema_update(ema, net, step_ema_decay ** settings.ema_every)
            log.add({**diagnostics, "grad_norm": grad_norm}, time.time() - started)
            failure = None                      # rank 0's failed write of a metrics line or a grid
            if step % settings.log_every == 0 or step == end:
                failure = log.record(step, settings.global_batch_size)
            if procs.main and failure is None and (step % settings.sample_every == 0 or step == end):
                path = os.path.join(settings.results_dir, "samples", f"{step:07d}.png")
                failure = save_samples(path, ema, grid_noise, grid_labels, config, decode,
                                       settings.global_seed)
                if failure is None:
                    log.image("samples", path, step)
            if settings.fid_every and step % settings.fid_every == 0:          # every process samples
                num_classes = 0 if grid_labels is None else net.num_classes
                values = sampling.fid_of_ema(ema, settings, config, decode, inception, reference, data.shape,
                                             num_classes, micro_batch, autocast, procs)
                failure = failure or log.record_fid(step, values)
            # A stop asked for by a signal, or a failed write, on any process: every process acts on it.
            flags = torch.tensor([stop_request.signal is not None, failure is not None], device=procs.device)
            stop, failed = (processes.all_reduce_mean(flags.float(), procs) > 0).tolist()
            if failed:
                raise SystemExit(processes.first_failure(failure, procs))
            if step % settings.ckpt_every == 0 or step == end or stop:
                checkpoints.save_run(settings, step, net, ema, optimizer, config, run_config, procs, extras)
            if stop:
                log.say(f"{stop_request.signal}: saved step {step}; the same command resumes the run")
                break
    if tracker is not None:
        tracker.finish()
    return net, ema


def accumulate_gradients(model, batches, config, step, total_steps, autocast, teacher=None):
    """Backward of Algorithm 1 over micro-batches [(x0, y, cond), ...]; returns row-weighted diagnostics.

    teacher: None, or the velocity field to distil (soflow.soflow_loss).

    The gradient is that of the mean loss over all their rows; under DDP only the last one all-reduces it."""
    total_rows = sum(len(x0) for x0, _, _ in batches)
    sums = {}
    for i, (x0, y, cond) in enumerate(batches):
        last = i == len(batches) - 1
        with model.no_sync() if hasattr(model, "no_sync") and not last else contextlib.nullcontext():
            with autocast:
                loss, diagnostics = soflow_loss(model, x0, y, cond, config=config, step=step,
                                                total_steps=total_steps, teacher=teacher)
            (loss * len(x0) / total_rows).backward()
        for name, value in diagnostics.items():
            sums[name] = sums.get(name, 0) + value.float() * len(x0) / total_rows
    return sums


@torch.no_grad()
def save_samples(path, ema, noise, labels, config, decode, seed):
    """A PNG grid of EMA samples: one step, then two steps (the released sampler), 16 per row.

    Returns None, or the message of a failed write."""
    with torch.random.fork_rng(devices=[noise.device] if noise.is_cuda else []):  # training draws unchanged
        torch.manual_seed(seed)
        images = [decode(sample(ema, noise, labels, config=config, steps=k, mode="renoise")) for k in (1, 2)]
    pixels = to_uint8(torch.cat(images)).permute(0, 2, 3, 1).cpu().numpy()                    # NHWC
    return try_write(path, lambda: save_grid(path, pixels, columns=16))
