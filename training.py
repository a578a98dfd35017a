"""The machinery train_cifar.py, train_imagenet.py and sample.py share: processes, global batches, precision,
the training loop of Algorithm 1 with micro-batches and EMA, logs (and wandb), sample grids, FID during
training, atomic checkpoints with every process's random state, exact resume, SIGTERM and SIGINT, the
non-finite guard; the released checkpoints (hf:// paths, their config.yaml, fine-tuning from them); and the SD
VAE of latents.

One code path: `python script.py` is a world of one process; under torchrun every process drives one GPU
(NCCL), or one CPU worker (gloo). The method itself is soflow.py; this file holds no equation of it.
"""
import contextlib
import copy
import gc
import json
import os
import posixpath
import random
import signal
import time
import uuid
from dataclasses import asdict, dataclass, fields, replace
from datetime import timedelta
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from einops import rearrange
from tqdm import tqdm

import fid
import soflow
from soflow import sample, soflow_loss


# ----- Settings of a run (the method's hyperparameters are soflow.SoFlowConfig) -----
@dataclass(frozen=True)
class TrainSettings:
    """How a run trains: its folder, batch, length, EMA and bookkeeping (the scripts' flags map onto it)."""
    results_dir: str               # the run folder: log.txt, metrics.jsonl, samples/, checkpoints/; resumed
    global_batch_size: int         # rows per step over all processes
    steps: int                     # training steps K (r(k, K) depends on it)
    micro_batch: int = 0           # rows per process and forward pass; 0: the whole per-process batch
    global_seed: int = 0           # process r of W draws from seed global_seed * W + r
    ema_decay: float = 0.9999      # per-step EMA decay, once warmed up
    ema_every: int = 1             # update the EMA every this many steps, raising its decay to the ema_every
    ema_warmup: bool = True        # the decay ramps up from 0.1 (ema_decay_at); False: the released constant
    log_every: int = 100           # steps per record in metrics.jsonl and log.txt
    ckpt_every: int = 10_000       # steps per checkpoint
    sample_every: int = 10_000     # steps per EMA sample grid (1 and 2 NFE)
    keep_ckpts: int = 3            # checkpoints kept on disk, the newest
    stop_at: int = 0               # save and stop after this step (0: run to `steps`)
    compile: bool = False          # torch.compile the network
    max_bad_steps: int = 10        # stop after this many non-finite steps in a row
    dist_timeout: float = 5.0      # minutes a process waits for the others before the job ends
    precision: str = ""            # "bf16", "tf32", "fp32" (set_precision); "": bf16 on a GPU, fp32 on a CPU
    init_from: str = ""            # a new run starts from this checkpoint's weights (file, run folder, hf://)
    init_from_raw: bool = False    # ... its raw training weights instead of its EMA
    wandb_project: str = ""        # also log to this wandb project (rank 0)
    fid_every: int = 0             # steps per FID of the EMA (fid.py; 0: none)
    fid_ref: str = ""              # ... against these reference statistics (or images: fid.py's SOURCE)
    fid_images: int = 10_000       # ... of this many samples, spread over the processes
    fid_nfe: tuple = (1,)          # ... at these numbers of steps
    inception_weights: str = ""    # the Inception's weight file ("": downloaded once, see fid.load_inception)

def add_training_args(parser, global_batch_size, steps, ema_every=1):
    """The flags both training scripts share (names as in DiT's train.py where one exists)."""
    add = parser.add_argument
    add("--results-dir", required=True, help="run folder; an existing one is resumed")
    add("--global-batch-size", type=int, default=global_batch_size)
    add("--micro-batch", type=int, default=0, help="rows per process and forward pass (0: all)")
    add("--global-seed", type=int, default=0)
    add("--steps", type=int, default=steps, help="training steps K (r(k, K) depends on it)")
    add("--ema-decay", type=float, default=0.9999)
    add("--ema-every", type=int, default=ema_every, help="update the EMA every N steps")
    add("--no-ema-warmup", dest="ema_warmup", action="store_false",
        help="the released code's constant EMA decay from step 1 (default: a warm-up, see ema_decay_at)")
    add("--log-every", type=int, default=100)
    add("--ckpt-every", type=int, default=10_000)
    add("--sample-every", type=int, default=10_000, help="EMA sample grid (1 and 2 NFE)")
    add("--keep-ckpts", type=int, default=3, help="checkpoints kept on disk, the newest")
    add("--stop-at", type=int, default=0, help="save and stop after this step (0: none)")
    add("--compile", action="store_true", help="torch.compile the network")
    add("--max-bad-steps", type=int, default=10, help="stop after this many non-finite steps in a row")
    add_precision_arg(parser)
    add("--init-from", default="", metavar="CKPT",
        help="fine-tune: a new run starts from this checkpoint's EMA weights (ours or released; a file, a "
             "run folder or hf://OWNER/REPO/FILE) with a fresh optimizer at step 0")
    add("--init-from-raw", action="store_true", help="--init-from: its raw training weights instead")
    add("--wandb-project", default="", metavar="NAME", help="also log to wandb (pip install wandb)")
    add("--fid-every", type=int, default=0, metavar="N", help="FID of the EMA every N steps (0: none)")
    add("--fid-ref", default="", metavar="REF", help="--fid-every: reference statistics (from fid.py ref)")
    add("--fid-images", type=int, default=10_000, metavar="K", help="--fid-every: samples per FID")
    add("--fid-nfe", type=int, nargs="+", default=[1], metavar="NFE", help="--fid-every: e.g. 1 2")
    add("--inception-weights", default="", metavar="PATH", help="--fid-every: the weight file (see fid.py)")
    add_dist_timeout(parser)

def add_dist_timeout(parser):
    """--dist-timeout: a lost peer (a dead node, a hung process) ends the job in minutes, not in 10-30."""
    parser.add_argument("--dist-timeout", type=float, default=5.0, metavar="MINUTES",
                        help="minutes a process waits for the others in a collective before the job ends")

PRECISIONS = ("bf16", "tf32", "fp32")

def add_precision_arg(parser):
    """--precision, with one meaning in every script (set_precision)."""
    parser.add_argument("--precision", default="", choices=PRECISIONS,
                        help="bf16: autocast (the default on a GPU); tf32: fp32 with TF32 matmuls, the "
                             "released code's numerics; fp32: TF32 off (the default on a CPU)")

def settings_from_args(args):
    """The TrainSettings of parsed flags (those of add_training_args)."""
    settings = TrainSettings(**{field.name: getattr(args, field.name) for field in fields(TrainSettings)})
    if settings.fid_every and not settings.fid_ref:
        raise SystemExit("--fid-every needs --fid-ref: statistics from `python fid.py ref SOURCE OUT.npz` or "
                         "ADM's reference batch")
    if settings.fid_every and (settings.fid_images < 2 or min(settings.fid_nfe) < 1):
        raise SystemExit("--fid-images must be at least 2 and --fid-nfe at least 1")
    return replace(settings, fid_nfe=tuple(settings.fid_nfe))


def ema_decay_at(step, ema_decay, warmup=True):
    """The EMA's decay for update `step` (0, 1, ...): min(ema_decay, (1 + step) / (10 + step)) with warm-up.

    The network starts as the identity map (F = 0), so without a warm-up a short run's EMA is still mostly its
    initial weights: 0.9999 keeps 95% of them after 500 steps, and the samples are the input noise."""
    # Deviation: the released code has no warm-up (a constant 0.9999). The ramp reaches 0.9999 at step 89,990;
    # the final EMA weighs everything before that by 0.9999^(K - 89,990): 3e-14 after K = 400k steps, 1e-31
    # after 800k. At the end of a full run the two EMAs are the same to float precision.
    return min(ema_decay, (1 + step) / (10 + step)) if warmup else ema_decay


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

@torch.no_grad()
def ema_update(ema, net, ema_decay):
    """theta_ema <- ema_decay theta_ema + (1 - ema_decay) theta; buffers are copied."""
    for e, p in zip(ema.parameters(), net.parameters()):
        e.lerp_(p.detach().to(e.dtype), 1 - ema_decay)
    for e, b in zip(ema.buffers(), net.buffers()):
        e.copy_(b)


# ----- Processes and global batches -----
def init_distributed(timeout_minutes=5.0):
    """(rank, world_size, device): torchrun sets RANK, WORLD_SIZE, LOCAL_RANK; a plain run is 0 of 1.

    timeout_minutes: how long a collective waits for a lost peer before it fails and the job ends."""
    cuda = torch.cuda.is_available()
    if "RANK" in os.environ and not dist.is_initialized():
        timeout = timedelta(minutes=timeout_minutes)
        store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
        # torchrun --max-restarts keeps its store across restarts: each attempt's keys get their own prefix,
        # or a restarted process may read a dead peer's address and fail to connect.
        store = dist.PrefixStore(f"attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}", store)
        dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=rank, world_size=world_size,
                                timeout=timeout)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    # LOCAL_RANK, not the global rank, picks the GPU: on a second node rank 8 drives cuda:0.
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return rank, world_size, device

def all_reduce_mean(values, world_size):
    """The mean over processes of a 1D tensor (itself in a world of one)."""
    if world_size == 1:
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values / world_size

def gather_objects(obj, world_size):
    """[obj of rank 0, obj of rank 1, ...] on every process."""
    objects = [obj] * world_size
    if world_size > 1:
        dist.all_gather_object(objects, obj)
    return objects

def gather_to_rank0(obj, rank, world_size):
    """[obj of rank 0, obj of rank 1, ...] on rank 0, None elsewhere: only rank 0 holds them all (images)."""
    if world_size == 1:
        return [obj]
    objects = [None] * world_size if rank == 0 else None
    dist.gather_object(obj, objects, dst=0)
    return objects

def first_failure(failure, world_size):
    """Every process calls it (a barrier too): the first process's failure message, or None if none failed."""
    return next((message for message in gather_objects(failure, world_size) if message), None)

@lru_cache(maxsize=2)
def epoch_order(num_examples, seed, epoch):
    """The shuffled order of the dataset's rows in one epoch (kept for the next steps: it is not cheap)."""
    return torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))

def global_batch_indices(step, global_batch_size, num_examples, seed):
    """Dataset rows of global batch `step` in an endless run of epochs, each shuffled by (seed, epoch).

    A function of the step alone: a resumed run reads what it would have read, on any number of processes."""
    positions = step * global_batch_size + torch.arange(global_batch_size)
    epochs = positions // num_examples
    indices = torch.empty_like(positions)
    for epoch in epochs.unique().tolist():
        at = epochs == epoch
        indices[at] = epoch_order(num_examples, seed, epoch)[positions[at] % num_examples]
    return indices

def process_rows(step, global_batch_size, num_examples, seed, rank, world_size):
    """This process's part of global batch `step`: its rank-th of world_size equal slices."""
    rows = global_batch_indices(step, global_batch_size, num_examples, seed)
    local_batch = global_batch_size // world_size
    return rows[rank * local_batch:(rank + 1) * local_batch]


# ----- Files written atomically, random states, signals, logs -----
def atomic_write(path, write):
    """write(tmp) to a temporary file beside path, then rename it: never a half-written file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.isfile(tmp):
            os.remove(tmp)

RESUME_HINT = "the checkpoints on disk are kept, and the same command resumes the run"

def try_write(path, write, hint=RESUME_HINT):
    """write() -> None, or the one-line message of its failure: the file, the error, what is kept, what to do.

    Any error counts: a full disk, a quota, a file system gone away, a folder where the file goes."""
    try:
        write()
    except Exception as e:
        return (f"could not write {path} ({type(e).__name__}: {e}); {hint} once the cause is fixed "
                "(disk space, quota, permissions)")
    return None

def write_json(path, obj):
    """obj as JSON at path, atomically (a manifest, a report)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1) + "\n"))

def write_npz(path, arrays):
    """np.savez(path, **arrays), atomically."""
    def write(tmp):
        with open(tmp, "wb") as f:       # a file object: np.savez would append ".npz" to a temporary name
            np.savez(f, **arrays)
    atomic_write(path, write)

def save_checkpoint(path, **state):
    """torch.save(state) atomically."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))

def to_uint8(x):
    """[-1, 1] -> uint8 pixels as the ADM evaluator expects: clamp(x * 127.5 + 128, 0, 255)."""
    return (x * 127.5 + 128).clamp(0, 255).to(torch.uint8)

def save_grid(path, pixels, columns):
    """(N, H, W, C) uint8 -> a PNG with `columns` images per row (channel 0 in grey if C != 3), atomically."""
    from PIL import Image  # Pillow comes with matplotlib
    N, H, W, C = pixels.shape
    pixels = np.concatenate([pixels, np.zeros((-N % columns, H, W, C), np.uint8)])
    grid = rearrange(pixels, "(r c) h w ch -> (r h) (c w) ch", c=columns)
    grid = grid if C == 3 else np.repeat(grid[..., :1], 3, axis=-1)
    atomic_write(path, lambda tmp: Image.fromarray(grid).save(tmp, format="PNG"))

def rng_state():
    """Every random state a run draws from, for an exact resume."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state(), cuda=cuda)

def set_rng_state(state):
    """Restore what rng_state() returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

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

def start_wandb(project, results_dir, run_config, rank, world_size):
    """With --wandb-project, rank 0's wandb run for this run folder, else None; a resumed run continues it.

    Its id is kept in RUN/wandb_id.txt. A failure to start stops every process with its message."""
    if not project:
        return None
    try:
        import wandb  # optional: only with --wandb-project
    except ImportError as e:
        raise SystemExit(f"--wandb-project needs wandb ({e}): pip install wandb, or drop the flag") from e
    tracker, failure = None, None
    if rank == 0:
        id_file = os.path.join(results_dir, "wandb_id.txt")
        try:
            if not os.path.exists(id_file):
                atomic_write(id_file, lambda tmp: Path(tmp).write_text(uuid.uuid4().hex[:8] + "\n"))
            run_id = Path(id_file).read_text().strip()
            tracker = wandb.init(project=project, id=run_id, resume="allow", dir=results_dir,
                                 config=run_config, name=os.path.basename(os.path.abspath(results_dir)))
        except Exception as e:                                       # not logged in, no network, a full disk
            failure = (f"wandb could not start ({type(e).__name__}: {e}); `wandb login`, or "
                       "WANDB_MODE=offline to log locally and `wandb sync` later, or drop --wandb-project")
    if (failure := first_failure(failure, world_size)) is not None:
        raise SystemExit(failure)
    return tracker

class RunLog:
    """A tqdm bar, log.txt, metrics.jsonl and wandb if asked (rank 0 writes): means since the last record."""
    def __init__(self, results_dir, rank, start, end, tracker=None):
        self.active, self.sums, self.steps, self.seconds = rank == 0, {}, 0, 0.0
        self.tracker, self.postfix, self.latest = tracker, {}, {}     # the bar: the last record, the FIDs
        self.bar = tqdm(total=end, initial=start, disable=not self.active, dynamic_ncols=True)
        if self.active:
            self.text = open(os.path.join(results_dir, "log.txt"), "a")
            self.jsonl = open(os.path.join(results_dir, "metrics.jsonl"), "a")

    def say(self, message):
        if self.active:
            tqdm.write(message)
            print(message, file=self.text, flush=True)

    def add(self, values, seconds):
        """One step's diagnostics (tensors) and how long it took."""
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0) + value.float()
        self.steps, self.seconds = self.steps + 1, self.seconds + seconds
        self.bar.update(1)

    def record(self, step, world_size, images_per_step, device):
        """Every process calls it (the means are all-reduced); rank 0 writes: None, or why it could not."""
        names = sorted(self.sums)
        means = all_reduce_mean(torch.stack([self.sums[n] for n in names]) / self.steps, world_size)
        record = {"step": step, **dict(zip(names, means.tolist())),
                  "images_per_s": self.steps * images_per_step / self.seconds}
        if device.type == "cuda":
            record["max_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        self.sums, self.steps, self.seconds = {}, 0, 0.0
        if not self.active:
            return None
        shown = ("loss", "fm_mse", "fm_weight", "scm_mse", "scm_weight", "grad_norm", "images_per_s",
                 "max_memory_gb")
        self.postfix = {k: f"{record[k]:.3g}" for k in shown if k in record}
        self.bar.set_postfix({**self.postfix, **self.latest})
        return self.write(record)

    def write(self, record):
        """One record (a dict with its step) to metrics.jsonl, log.txt and wandb: None, or why it failed."""
        def write():
            print(json.dumps(record), file=self.jsonl, flush=True)
            print(" ".join(f"{k}={v:.4g}" for k, v in record.items()), file=self.text, flush=True)
        if self.tracker is not None:
            self.tracker.log(record, step=record["step"])
        return try_write(self.jsonl.name, write)

    def record_fid(self, step, values):
        """Rank 0 writes FIDs (and shows them on the bar): None, or why it could not."""
        if not self.active:
            return None
        self.latest = {k: f"{v:.4g}" for k, v in values.items() if k.endswith("nfe")}
        self.bar.set_postfix({**self.postfix, **self.latest})
        return self.write({"step": step, **values})

    def image(self, name, path, step):
        """A PNG (a sample grid) to wandb, if tracked."""
        if self.tracker is not None:
            import wandb
            self.tracker.log({name: wandb.Image(path)}, step=step)


# ----- Checkpoints and resume -----
def checkpoint_paths(results_dir):
    """Our checkpoints in a run folder, oldest first."""
    folder = os.path.join(results_dir, "checkpoints")
    names = sorted(n for n in os.listdir(folder) if n.endswith(".pt")) if os.path.isdir(folder) else []
    return [os.path.join(folder, n) for n in names]

CHECKPOINT_KEYS = ("arch", "arch_kwargs", "model", "ema", "optimizer", "step", "config", "run_config", "rng")

def read_checkpoint(path):
    """(the checkpoint, "") or (None, why it cannot be resumed from): a load error or a missing key."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:              # truncated, empty, not a zip archive, unreadable: all the same here
        return None, f"{type(e).__name__}: {e}"
    missing = [key for key in CHECKPOINT_KEYS if key not in ckpt] if isinstance(ckpt, dict) else ["all"]
    return (None, f"no {', '.join(missing)}") if missing else (ckpt, "")

def move_aside(path):
    """Rename an unreadable checkpoint to PATH.corrupt (or .corrupt2, ...): kept, but no longer listed."""
    target, n = f"{path}.corrupt", 1
    while os.path.exists(target):
        n += 1
        target = f"{path}.corrupt{n}"
    os.replace(path, target)
    return target

def newest_readable_checkpoint(results_dir, notes):
    """Rank 0: (path, checkpoint, problems) of the newest checkpoint that loads with every key.

    The newer unreadable ones are then moved aside (and said in notes). If none can be read, nothing is moved:
    path and checkpoint are None and problems lists each file with its reason ("" in a new run folder)."""
    unreadable = []                                  # (path, why), newest first
    for path in reversed(checkpoint_paths(results_dir)):
        ckpt, problem = read_checkpoint(path)
        if ckpt is None:
            unreadable.append((path, problem))
            continue
        for bad, why in unreadable:
            notes.append(f"{bad} cannot be resumed from ({why}): moved to {move_aside(bad)}; "
                         f"resuming from {os.path.basename(path)}")
        return path, ckpt, ""
    return None, None, "\n".join(f"  {bad}: {why}" for bad, why in unreadable)

def checkpoint_file(path):
    """A checkpoint given as a file or a run folder (its newest); FileNotFoundError says what is there."""
    if os.path.isdir(path):
        if not (found := checkpoint_paths(path)):
            raise FileNotFoundError(f"{path} holds no checkpoints/*.pt: pass a checkpoint or a run folder")
        return found[-1]
    if not os.path.exists(path):
        folder = os.path.dirname(os.path.abspath(path))
        run = os.path.dirname(folder) if os.path.basename(folder) == "checkpoints" else None
        there = ", ".join(os.path.basename(p) for p in checkpoint_paths(run)) if run else ""
        raise FileNotFoundError(f"no such file: {path}" + (f"; {folder} holds {there}" if there else ""))
    return path

# ----- Released checkpoints: the hub, their config.yaml, fine-tuning -----
# The released code's config.yaml keys -> SoFlowConfig fields. Named choices first (the first name of a value
# is the one written back), then numbers, then the logit-normal times, listed [flow matching, s, t].
RELEASED_CHOICES = {
    "noising_type": ("schedule", {"Linear": "linear", "Trig": "triangular", "Triangular": "triangular"}),
    "coefficient_type": ("param", {"Euler": "euler", "Trig": "triangular", "Triangular": "triangular"}),
    "l_schedule": ("r_schedule", {"Exponent": "exp", "Cosine": "cosine", "Linear": "linear",
                                  "Const": "constant"}),
}
RELEASED_NUMBERS = {"velocity_loss_ratio": "lam", "p": "p", "eps": "eps", "cfg_scale": "w", "mix_ratio": "m",
                    "cfg_drop_rate": "drop", "cfg_decay_time": "decay_t", "l_init_ratio": "r_init",
                    "l_end_ratio": "r_end"}
RELEASED_TIMES = {"time_mean": ("fm_mu", "s_mu", "t_mu"), "time_std": ("fm_sd", "s_sd", "t_sd")}
# The keys of the network, data, optimizer and bookkeeping: known, not part of the method.
RELEASED_RUN_KEYS = ("working_dir", "model_type", "dataset_type", "data_size", "dataset_path", "total_steps",
                     "ema_decay_rate", "learning_rate", "betas", "weight_decay", "batch_size", "num_workers",
                     "prefetch_factor", "eval_steps", "eval_batch_size", "eval_NFE", "eval_demo_steps",
                     "eval_demo_shape", "ckpt_saving_steps", "logging_steps", "seed")
# What our checkpoints store beside the weights and configs (train's extras).
RECORDED_KEYS = ("vae", "precision")
# The presets the released checkpoints were trained with: assumed for a file without its config.yaml.
RELEASED_PRESETS = {"DiT": "imagenet", "UNet": "cifar10"}

def config_from_released(values, source="config.yaml"):
    """The SoFlowConfig of a released config.yaml (its values, a dict); an unknown or missing key is an error.

    The released code decays guidance with its smooth curve ("exp"); cfg_decay_time 1 means no decay."""
    method_keys = [*RELEASED_CHOICES, *RELEASED_NUMBERS, *RELEASED_TIMES]
    if unknown := [k for k in values if k not in method_keys and k not in RELEASED_RUN_KEYS]:
        raise ValueError(f"{source}: unknown key {unknown[0]!r}: a released config.yaml has the keys "
                         f"{', '.join(method_keys + list(RELEASED_RUN_KEYS))}")
    if missing := [k for k in method_keys if k not in values]:
        raise ValueError(f"{source}: no key {missing[0]!r}, which the method needs (is it SoFlow's?)")
    fields = {}
    for key, (name, choices) in RELEASED_CHOICES.items():
        if values[key] not in choices:
            raise ValueError(f"{source}: {key} {values[key]!r} is none of {', '.join(choices)}")
        fields[name] = choices[values[key]]
    for key, name in RELEASED_NUMBERS.items():
        fields[name] = float(values[key])
    for key, names in RELEASED_TIMES.items():
        if not (isinstance(values[key], list) and len(values[key]) == 3):
            raise ValueError(f"{source}: {key} {values[key]!r} should list 3 numbers: flow matching, s, t")
        fields.update(zip(names, map(float, values[key])))
    return soflow.SoFlowConfig(**fields, decay="exp")

def released_from_config(config):
    """The method's keys of a released config.yaml for a SoFlowConfig: config_from_released the other way."""
    if config.decay == "linear" and config.decay_t < 1 and config.w != 1:
        raise ValueError("the released code has no linear guidance decay: use decay 'exp' or 'none'")
    values = {key: next(k for k, v in choices.items() if v == getattr(config, name))
              for key, (name, choices) in RELEASED_CHOICES.items()}
    values.update({key: getattr(config, name) for key, name in RELEASED_NUMBERS.items()})
    if config.decay == "none":
        values["cfg_decay_time"] = 1.0
    values.update({key: [getattr(config, name) for name in names] for key, names in RELEASED_TIMES.items()})
    return values

def released_config_path(path):
    """X/config.yaml for a released checkpoint X/ckpts/STEP.pt (a file or hf://), or None elsewhere."""
    folder = posixpath.dirname(str(path)) if str(path).startswith("hf://") else os.path.dirname(str(path))
    if os.path.basename(folder) != "ckpts":
        return None
    return posixpath.join(posixpath.dirname(folder), "config.yaml")

def released_config(path):
    """(SoFlowConfig or None, where from): a released checkpoint's training configuration, its config.yaml."""
    yaml_path = released_config_path(path)
    if yaml_path is None:
        return None, f"{path} is not in a ckpts/ folder (no config.yaml beside it)"
    local = yaml_path
    if yaml_path.startswith("hf://"):
        from huggingface_hub.errors import EntryNotFoundError
        try:
            local = soflow.hub_file(yaml_path)
        except ValueError as e:
            if isinstance(e.__cause__, EntryNotFoundError):          # not on the hub (offline: not cached)
                return None, f"{yaml_path} was not found"
            raise
    elif not os.path.isfile(yaml_path):
        return None, f"there is no {yaml_path}"
    try:
        import yaml  # PyYAML comes with huggingface_hub
    except ImportError as e:
        raise ValueError(f"reading {yaml_path} needs PyYAML: pip install pyyaml") from e
    with open(local) as f:
        values = yaml.safe_load(f)
    if not isinstance(values, dict):
        raise ValueError(f"{yaml_path} is not a config.yaml of keys and values")
    return config_from_released(values, yaml_path), yaml_path

def open_network(path, use_ema=True, rank=0, world_size=1):
    """(net, config, note, recorded): a checkpoint's network, the SoFlowConfig it was trained with, and more.

    path: ours or released; a file, a run folder (its newest) or hf://OWNER/REPO/FILE (rank 0 downloads first,
    the others then read the cache). Ours store their config; a released one reads the config.yaml beside its
    ckpts/ folder, else its preset is assumed; note says which. recorded: what ours also store, such as the
    VAE of latents ({} for a released one)."""
    path = path if str(path).startswith("hf://") else checkpoint_file(path)
    if rank > 0:
        dist.barrier()
    try:
        local = soflow.hub_file(path) if str(path).startswith("hf://") else path     # fetched once
        net = soflow.load_network(local, use_ema=use_ema)
        config, note, recorded = net.soflow_config, "", {}
        if config is not None:              # ours: mmap reads the few small entries, not the weights again
            ckpt = torch.load(local, map_location="cpu", mmap=True, weights_only=False)
            recorded = {key: ckpt[key] for key in RECORDED_KEYS if key in ckpt}
        if config is None:
            config, where = released_config(path)
            note = f"{path}: the configuration of {where}"
        if config is None:
            preset = RELEASED_PRESETS.get(type(net).__name__, "imagenet")
            config = soflow.PRESETS[preset]
            note = (f"{path} stores no config and {where}: assuming the released PRESETS['{preset}'] "
                    f"({config.schedule} schedule, {config.param} parameterization)")
    finally:                       # on an error too: no process is left waiting at the barrier
        if rank == 0 and world_size > 1:
            dist.barrier()
    return net, config, note, recorded

DATA_SHAPE_KEYS = ("in_channels", "input_size", "img_resolution")

def initialise_from(settings, net, ema, rank, world_size):
    """--init-from: load a checkpoint's EMA (or raw) weights into net and ema; returns the log's note.

    Refused, with the reason, when the network class, its size or the data's shape differ."""
    try:
        source, _, note, _ = open_network(settings.init_from, not settings.init_from_raw, rank, world_size)
        if type(source) is not type(net):
            raise ValueError(f"it holds a {type(source).__name__}; this run trains a {type(net).__name__}")
        theirs, ours = source.init_kwargs, net.init_kwargs
        for key in [k for k in DATA_SHAPE_KEYS if k in theirs and k in ours and theirs[k] != ours[k]][:1]:
            raise ValueError(f"its {key} is {theirs[key]}, this run's {ours[key]}: the data's shape differs")
        soflow.check_state_dict(net, source.state_dict(), settings.init_from)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"--init-from {settings.init_from}: {e}") from e
    net.load_state_dict(source.state_dict())
    ema.load_state_dict(source.state_dict())
    kind = "raw" if settings.init_from_raw else "EMA"
    return (f"a new run from the {kind} weights of {settings.init_from}, with a fresh optimizer at step 0"
            + (f" ({note})" if note else ""))

def resume(results_dir, run_config, net, ema, optimizer, rank, world_size):
    """Load the newest readable checkpoint of a run folder into net, ema and optimizer.

    Returns its step (0 if there is none) and notes for the log. Rank 0 chooses; every process loads it."""
    notes = []
    path, ckpt, problems = newest_readable_checkpoint(results_dir, notes) if rank == 0 else (None, None, "")
    path, problems = gather_objects((path, problems), world_size)[0]
    if problems:
        raise SystemExit(f"no checkpoint in {results_dir} can be resumed from:\n{problems}\nNothing was "
                         "changed: move them away for a new run, or pass another --results-dir")
    if path is None:
        return 0, notes
    if ckpt is None:                              # the other processes load what rank 0 chose
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    recorded = dict(ckpt["run_config"])
    if "cfg" in recorded:                          # the key of run folders written before it was renamed
        recorded["config"] = recorded.pop("cfg")
    recorded.setdefault("ema_warmup", False)       # run folders from before the warm-up: a constant decay
    changed = [f"  {k}: {recorded.get(k)!r} in the run, {v!r} now"
               for k, v in run_config.items() if recorded.get(k) != v]
    if changed:
        raise SystemExit(f"{results_dir} holds a run with another configuration:\n" + "\n".join(changed)
                         + "\nResume it with the same settings, or pass another --results-dir for a new run")
    net.load_state_dict(ckpt["model"])
    ema.load_state_dict(ckpt["ema"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if len(ckpt["rng"]) == world_size:
        set_rng_state(ckpt["rng"][rank])            # each process draws what it would have drawn
    else:
        notes.append(f"the run had {len(ckpt['rng'])} processes, now {world_size}: new random streams")
        torch.manual_seed(ckpt["step"] * world_size + rank)
    return ckpt["step"], notes

def save_run(settings, step, net, ema, optimizer, config, run_config, rank, world_size, extras=None):
    """Checkpoint `step` with every process's random state (and extras), written atomically by rank 0.

    Rank 0 then deletes all but the newest settings.keep_ckpts. Every process must hold the same weights (DDP
    keeps them so)."""
    checksums = torch.cat(gather_objects(sum(p.double().sum() for p in net.parameters()).reshape(1).cpu(),
                                         world_size))
    if not torch.equal(checksums, checksums[:1].expand_as(checksums)):
        raise RuntimeError(f"the processes' weights differ ({checksums.tolist()}): do not trust this run")
    rng_states = gather_objects(rng_state(), world_size)
    failure = None
    if rank == 0 and not all(torch.isfinite(p).all() for p in net.parameters()):
        failure = f"step {step}: the weights are not finite; the checkpoints on disk are kept"
    elif rank == 0:
        path = os.path.join(settings.results_dir, "checkpoints", f"{step:07d}.pt")

        def write():
            save_checkpoint(path, arch=type(net).__name__, arch_kwargs=net.init_kwargs,
                            model=net.state_dict(), ema=ema.state_dict(), optimizer=optimizer.state_dict(),
                            step=step, config=asdict(config), run_config=run_config, rng=rng_states,
                            **(extras or {}))
            for old in checkpoint_paths(settings.results_dir)[:-settings.keep_ckpts]:
                os.remove(old)
        failure = try_write(path, write)
    # Every process learns of rank 0's failure here and stops: none is left waiting in a collective.
    if (failure := first_failure(failure, world_size)) is not None:
        raise SystemExit(failure)


# ----- The training loop -----
def train(settings, net, config, make_optimizer, num_examples, get_batch, run_config, decode=lambda x: x,
          grid_labels=None, extras=None):
    """Algorithm 1 in a loop, on one process or many; resumes the run folder if it holds checkpoints.

    settings: the TrainSettings. config: the SoFlowConfig. net: the bare network, built with the same seed on
    every process. make_optimizer(params) -> optimizer.
    get_batch(rows) -> (x0, y, cond) on the device, for dataset rows `rows` (augmented if the data is).
    run_config: the script's settings that define the run (a resumed run must match them).
    decode: x0 -> images in [-1, 1] for the sample grids. grid_labels: (N,) labels, None if unconditional.
    extras: what every checkpoint also stores (the VAE of latents, say).
    """
    # Setup: processes, batch sizes, the EMA copy (before DDP: no 'module.' prefixes), seeds, resume.
    rank, world_size, device = init_distributed(settings.dist_timeout)
    if settings.global_batch_size % world_size:
        raise SystemExit(f"--global-batch-size {settings.global_batch_size} does not divide into "
                         f"{world_size} processes: pick a multiple of the number of processes")
    local_batch = settings.global_batch_size // world_size
    micro_batch = settings.micro_batch or local_batch
    if local_batch % micro_batch:
        raise SystemExit(f"--micro-batch {micro_batch} does not divide the per-process batch {local_batch}")
    net = net.to(device)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    optimizer = make_optimizer(net.parameters())
    run_flags = ("global_batch_size", "global_seed", "steps", "ema_decay", "ema_every", "ema_warmup")
    run_config = {**run_config, "config": asdict(config), **{k: getattr(settings, k) for k in run_flags}}
    # The grid's noise has the shape of one example, read before the seeding below so that it changes no draw.
    example = get_batch(torch.zeros(1, dtype=torch.long))[0]
    grid_shape = (32 if grid_labels is None else len(grid_labels), *example.shape[1:])
    grid_generator = torch.Generator().manual_seed(settings.global_seed)
    grid_noise = torch.randn(grid_shape, generator=grid_generator).to(device)
    torch.manual_seed(settings.global_seed * world_size + rank)  # each process draws its own noise and times
    start, notes = resume(settings.results_dir, run_config, net, ema, optimizer, rank, world_size)
    if settings.init_from and start == 0:           # fine-tuning: a new run from another's weights
        notes.append(initialise_from(settings, net, ema, rank, world_size))
    elif settings.init_from:
        notes.append(f"{settings.results_dir} has checkpoints: resuming them (--init-from is for a new run)")
    # The gradient pass goes through DDP, which all-reduces the gradients.
    model = nn.parallel.DistributedDataParallel(net) if world_size > 1 else net
    model = torch.compile(model) if settings.compile else model
    precision, autocast = set_precision(settings.precision, device)
    extras = {**(extras or {}), "precision": precision}
    end = min(settings.steps, settings.stop_at or settings.steps)
    os.makedirs(os.path.join(settings.results_dir, "samples"), exist_ok=True)
    tracker = start_wandb(settings.wandb_project, settings.results_dir, run_config, rank, world_size)
    inception, reference = (start_fid(settings.fid_ref, settings.inception_weights, device)
                            if settings.fid_every else (None, None))
    log = RunLog(settings.results_dir, rank, start, end, tracker)
    for note in notes:
        log.say(note)
    millions = sum(p.numel() for p in net.parameters()) / 1e6
    log.say(f"{'resuming at' if start else 'starting'} step {start} of {settings.steps}: {world_size} "
            f"process(es), {type(net).__name__} with {millions:.2f}M parameters, {precision}")
    bad_steps = 0
    # The bar closes first on any exit, so that a stop's message is the last line.
    with StopRequest() as stop_request, contextlib.closing(log.bar):
        for step in range(start + 1, end + 1):  # step: the number of updates made after it
            # One step: this process's rows of global batch step - 1, micro-batches, then one update.
            started = time.time()
            rows = process_rows(step - 1, settings.global_batch_size, num_examples, settings.global_seed,
                                rank, world_size)
            optimizer.zero_grad(set_to_none=True)
            batches = [get_batch(part) for part in rows.split(micro_batch)]
            diagnostics = accumulate_gradients(model, batches, config, step - 1, settings.steps, autocast)
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
                failure = log.record(step, world_size, settings.global_batch_size, device)
            if rank == 0 and failure is None and (step % settings.sample_every == 0 or step == end):
                path = os.path.join(settings.results_dir, "samples", f"{step:07d}.png")
                failure = save_samples(path, ema, grid_noise, grid_labels, config, decode,
                                       settings.global_seed)
                if failure is None:
                    log.image("samples", path, step)
            if settings.fid_every and step % settings.fid_every == 0:          # every process samples
                num_classes = 0 if grid_labels is None else net.num_classes
                values = fid_of_ema(ema, settings, config, decode, inception, reference, grid_shape[1:],
                                    num_classes, micro_batch, autocast)
                failure = failure or log.record_fid(step, values)
            # A stop asked for by a signal, or a failed write, on any process: every process acts on it.
            flags = torch.tensor([stop_request.signal is not None, failure is not None], device=device)
            stop, failed = (all_reduce_mean(flags.float(), world_size) > 0).tolist()
            if failed:
                raise SystemExit(first_failure(failure, world_size))
            if step % settings.ckpt_every == 0 or step == end or stop:
                save_run(settings, step, net, ema, optimizer, config, run_config, rank, world_size, extras)
            if stop:
                log.say(f"{stop_request.signal}: saved step {step}; the same command resumes the run")
                break
    if tracker is not None:
        tracker.finish()
    if world_size > 1:
        dist.destroy_process_group()
        gc.collect()  # gloo objects left in reference cycles, freed at exit, can abort the process
    return net, ema

def accumulate_gradients(model, batches, config, step, total_steps, autocast):
    """Backward of Algorithm 1 over micro-batches [(x0, y, cond), ...]; returns row-weighted diagnostics.

    The gradient is that of the mean loss over all their rows; under DDP only the last one all-reduces it."""
    total_rows = sum(len(x0) for x0, _, _ in batches)
    sums = {}
    for i, (x0, y, cond) in enumerate(batches):
        last = i == len(batches) - 1
        with model.no_sync() if hasattr(model, "no_sync") and not last else contextlib.nullcontext():
            with autocast:
                loss, diagnostics = soflow_loss(model, x0, y, cond, config=config, step=step,
                                                total_steps=total_steps)
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

# ----- Sampling many images: per-image draws, FID during training -----
def per_image_draws(seed, indices, shape, num_classes, classes, renoise_steps):
    """(y, x1, eps) of the images `indices`: y (B,) labels or None, x1 (B, *shape), eps steps x (B, *shape).

    Each image draws from its own generator, in this order: its class (if random), x_1, the re-noising noises.
    numpy's, seeded by the pair (seed, i): a torch CPU generator keeps only the low 32 bits of its seed, so no
    injective (seed, i) -> seed map exists for it."""
    B = len(indices)
    y = torch.empty(B, dtype=torch.long) if num_classes else None
    x1, eps = torch.empty(B, *shape), [torch.empty(B, *shape) for _ in range(renoise_steps)]
    for b, i in enumerate(indices.tolist()):
        rng = np.random.default_rng([seed, i])
        if num_classes:
            y[b] = classes[i % len(classes)] if classes else int(rng.integers(num_classes))
        x1[b] = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))
        for e in eps:
            e[b] = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))
    return y, x1, eps

def start_fid(reference, weights, device, batch_size=100, flag="--fid-every"):
    """(Inception, reference (mu, sigma)) on every process (fid.py), for FID in training and sample.py --fid;
    a clear stop, naming the flag, if either cannot be had."""
    try:
        inception = fid.load_inception(weights or None, device)
        return inception, fid.reference_stats(reference, inception, batch_size)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"{flag}: {e}") from e

@torch.no_grad()
def fid_of_ema(ema, settings, config, decode, inception, reference, shape, num_classes, batch_size, autocast):
    """{fid_Knfe: FID of settings.fid_images EMA samples at K steps, fid_images, fid_seconds}.

    Image i draws from its own generator (per_image_draws, seed global_seed): the same images at every
    evaluation, on any number of processes, and the training's random streams untouched. Every process
    samples batches rank, rank + W, ... and adds their features; the sums are all-reduced."""
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device, started = next(ema.parameters()).device, time.time()
    batches = torch.arange(settings.fid_images).split(batch_size)[rank::world_size]
    values = {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):    # none drawn: a guard
        for nfe in settings.fid_nfe:
            stats = fid.FeatureStats(inception.feature_dim, device)
            for indices in batches:
                y, x1, eps = per_image_draws(settings.global_seed, indices, shape, num_classes, None, nfe - 1)
                y = None if y is None else y.to(device)
                with autocast:
                    x0 = sample(ema, x1.to(device), y, eps=[e.to(device) for e in eps], config=config,
                                steps=nfe, mode="renoise")
                    images = decode(x0)
                stats.add(fid.features(inception, to_uint8(images.float())))
            values[f"fid_{nfe}nfe"] = fid.frechet_distance(*stats.all_reduce().mu_sigma(), *reference)
    return {**values, "fid_images": settings.fid_images, "fid_seconds": time.time() - started}

# ----- The SD VAE of the latent models (diffusers, optional: imported only where used) -----
VAE_NAME = "stabilityai/sd-vae-ft-mse"
VAE_SCALE = 0.18215                   # latents are scaled by this before training, divided by it to decode

def load_vae(name_or_path=VAE_NAME, device="cpu", rank=0, world_size=1):
    """The SD VAE (diffusers AutoencoderKL) in eval mode, from a hub name or a local folder."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise SystemExit(f"the SD VAE needs diffusers ({e}): pip install diffusers") from e
    if rank > 0:                          # under torchrun rank 0 loads first: it fills the download cache
        dist.barrier()
    vae = AutoencoderKL.from_pretrained(name_or_path, low_cpu_mem_usage=False)
    if rank == 0 and world_size > 1:
        dist.barrier()
    return vae.to(device).eval().requires_grad_(False)

def checkpoint_vae(recorded, override, device, rank=0, world_size=1, say=print):
    """(vae, scale) that decode a latent checkpoint's samples: the VAE and scale it records (recorded, from
    open_network; the released DiTs used VAE_NAME), or the override (--vae), which say() reports."""
    stored = recorded.get("vae") or dict(name=VAE_NAME, scale=VAE_SCALE)
    if override and override != stored["name"]:
        say(f"decoding with --vae {override}, not the checkpoint's {stored['name']}")
    return load_vae(override or stored["name"], device, rank, world_size), stored["scale"]

@torch.no_grad()
def decode_latents(vae, z, scale=VAE_SCALE):
    """(B, 4, H/8, W/8) latents scaled by `scale` -> (B, 3, H, W) images in [-1, 1]."""
    return vae.decode(z / scale).sample.clamp(-1, 1)
