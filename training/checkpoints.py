"""Our checkpoint format: what a file holds, writing it, reading it safely, and resuming a run from it.

A checkpoint is RUN/checkpoints/STEP.pt, a dict of CHECKPOINT_KEYS (and RECORDED_KEYS where a run has them):
the network's class and constructor arguments, the raw and EMA weights, the optimizer, the step, the
SoFlowConfig and the run's settings as plain dicts, and every process's random states as tensors and plain
values. Nothing in it needs pickle's arbitrary objects: every read uses torch.load(weights_only=True), so a
file cannot run code. soflow.load_network reads the weights alone.
"""
import argparse
import importlib
import os
import random
from dataclasses import asdict

import numpy as np
import torch

from training import processes
from training.files import atomic_write, try_write

CHECKPOINT_KEYS = ("arch", "arch_kwargs", "model", "ema", "optimizer", "step", "config", "run_config", "rng")
# What a run may also record (train's extras): the VAE of latents, the precision it trained in.
RECORDED_KEYS = ("vae", "precision")
# Our checkpoints written before the random states became tensors hold numpy's state, a uint32 array: these
# globals rebuild such arrays only (an array of objects would need more, which stays refused).
LEGACY_NUMPY_GLOBALS = ("numpy.ndarray", "numpy.dtype", "numpy.dtypes.UInt32DType",
                        "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct")


# ----- Reading: weights and plain values only -----
def legacy_numpy_globals():
    """The objects LEGACY_NUMPY_GLOBALS name, in the numpy installed (its 1.x and 2.x module paths differ)."""
    found = []
    for name in LEGACY_NUMPY_GLOBALS:
        module, _, attribute = name.rpartition(".")
        try:
            found.append((getattr(importlib.import_module(module), attribute), name))
        except (ImportError, AttributeError):              # the path of the other numpy major version
            continue
    return found


def load_checkpoint(path):
    """torch.load(path, weights_only=True) on the CPU: tensors and plain values, never code.

    Our checkpoints of before the tensor random states load too (numpy's arrays, allowlisted), and SiT's
    (its train.py stores an argparse.Namespace, a plain record of values). Anything else a pickle could hold
    is refused with torch's UnpicklingError, which names what it refused."""
    with torch.serialization.safe_globals([*legacy_numpy_globals(), argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def checkpoint_paths(results_dir):
    """Our checkpoints in a run folder, oldest first."""
    folder = os.path.join(results_dir, "checkpoints")
    names = sorted(n for n in os.listdir(folder) if n.endswith(".pt")) if os.path.isdir(folder) else []
    return [os.path.join(folder, n) for n in names]


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


def read_checkpoint(path):
    """(the checkpoint, "") or (None, why it cannot be resumed from): a load error or a missing key."""
    try:
        ckpt = load_checkpoint(path)
    except Exception as e:              # truncated, empty, not a zip archive, unsafe: all the same here
        return None, f"{type(e).__name__}: {str(e).splitlines()[0]}"
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


# ----- Random states, as tensors and plain values -----
def rng_state():
    """Every random state a run draws from, for an exact resume: Python's, numpy's, torch's (CPU, CUDA)."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return dict(python=random.getstate(), numpy=(kind, torch.from_numpy(key.astype(np.int64)), pos, has_gauss,
                                                 gauss), torch=torch.get_rng_state(), cuda=cuda)


def set_rng_state(state):
    """Restore what rng_state() returned (or the numpy array that checkpoints held before)."""
    random.setstate(state["python"])
    kind, key, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(key, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----- Writing and resuming a run -----
def save_run(settings, step, net, ema, optimizer, config, run_config, procs, extras=None):
    """Checkpoint `step` with every process's random state (and extras), written atomically by rank 0.

    Rank 0 then deletes all but the newest settings.keep_ckpts. Every process must hold the same weights (DDP
    keeps them so)."""
    checksum = sum(p.double().sum() for p in net.parameters()).reshape(1).cpu()
    checksums = torch.cat(processes.gather_objects(checksum, procs))
    if not torch.equal(checksums, checksums[:1].expand_as(checksums)):
        raise RuntimeError(f"the processes' weights differ ({checksums.tolist()}): do not trust this run")
    rng_states = processes.gather_objects(rng_state(), procs)
    failure = None
    if procs.main and not all(torch.isfinite(p).all() for p in net.parameters()):
        failure = f"step {step}: the weights are not finite; the checkpoints on disk are kept"
    elif procs.main:
        path = os.path.join(settings.results_dir, "checkpoints", f"{step:07d}.pt")

        def write():
            state = dict(arch=type(net).__name__, arch_kwargs=net.init_kwargs, model=net.state_dict(),
                         ema=ema.state_dict(), optimizer=optimizer.state_dict(), step=step,
                         config=asdict(config), run_config=run_config, rng=rng_states, **(extras or {}))
            atomic_write(path, lambda tmp: torch.save(state, tmp))
            for old in checkpoint_paths(settings.results_dir)[:-settings.keep_ckpts]:
                os.remove(old)
        failure = try_write(path, write)
    # Every process learns of rank 0's failure here and stops: none is left waiting in a collective.
    if (failure := processes.first_failure(failure, procs)) is not None:
        raise SystemExit(failure)


def resume(results_dir, run_config, net, ema, optimizer, procs):
    """Load the newest readable checkpoint of a run folder into net, ema and optimizer.

    Returns its step (0 if there is none) and notes for the log. Rank 0 chooses; every process loads it."""
    notes = []
    path, ckpt, problems = newest_readable_checkpoint(results_dir, notes) if procs.main else (None, None, "")
    path, problems = processes.gather_objects((path, problems), procs)[0]
    if problems:
        raise SystemExit(f"no checkpoint in {results_dir} can be resumed from:\n{problems}\nNothing was "
                         "changed: move them away for a new run, or pass another --results-dir")
    if path is None:
        return 0, notes
    if ckpt is None:                              # the other processes load what rank 0 chose
        ckpt = load_checkpoint(path)
    recorded = dict(ckpt["run_config"])
    if "cfg" in recorded:                          # the key of run folders written before it was renamed
        recorded["config"] = recorded.pop("cfg")
    recorded.setdefault("ema_warmup", False)       # run folders from before the warm-up: a constant decay
    recorded.setdefault("teacher", "")             # run folders from before distillation: none
    changed = [f"  {k}: {recorded.get(k)!r} in the run, {v!r} now"
               for k, v in run_config.items() if recorded.get(k) != v]
    if changed:
        raise SystemExit(f"{results_dir} holds a run with another configuration:\n" + "\n".join(changed)
                         + "\nResume it with the same settings, or pass another --results-dir for a new run")
    net.load_state_dict(ckpt["model"])
    ema.load_state_dict(ckpt["ema"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if len(ckpt["rng"]) == procs.world_size:
        set_rng_state(ckpt["rng"][procs.rank])      # each process draws what it would have drawn
    else:
        notes.append(f"the run had {len(ckpt['rng'])} processes, now {procs.world_size}: new random streams")
        torch.manual_seed(ckpt["step"] * procs.world_size + procs.rank)
    return ckpt["step"], notes
