"""A run's logs: a tqdm bar, log.txt, metrics.jsonl and, if asked, wandb; rank 0 writes them.

Every record holds the means since the previous one, all-reduced over the processes.
"""
import json
import os
import uuid
from pathlib import Path

import torch
from tqdm import tqdm

from training import processes
from training.files import atomic_write, try_write


def start_wandb(project, results_dir, run_config, procs):
    """With --wandb-project, rank 0's wandb run for this run folder, else None; a resumed run continues it.

    Its id is kept in RUN/wandb_id.txt. A failure to start stops every process with its message."""
    if not project:
        return None
    try:
        import wandb  # optional: only with --wandb-project
    except ImportError as e:
        raise SystemExit(f"--wandb-project needs wandb ({e}): pip install wandb, or drop the flag") from e
    tracker, failure = None, None
    if procs.main:
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
    if (failure := processes.first_failure(failure, procs)) is not None:
        raise SystemExit(failure)
    return tracker


class RunLog:
    """A tqdm bar, log.txt, metrics.jsonl and wandb if asked (rank 0 writes): means since the last record."""
    def __init__(self, results_dir, procs, start, end, tracker=None):
        self.procs = procs
        self.active, self.sums, self.steps, self.seconds = procs.main, {}, 0, 0.0
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

    def record(self, step, images_per_step):
        """Every process calls it (the means are all-reduced); rank 0 writes: None, or why it could not."""
        names = sorted(self.sums)
        means = processes.all_reduce_mean(torch.stack([self.sums[n] for n in names]) / self.steps, self.procs)
        record = {"step": step, **dict(zip(names, means.tolist())),
                  "images_per_s": self.steps * images_per_step / self.seconds}
        if self.procs.device.type == "cuda":
            record["max_memory_gb"] = torch.cuda.max_memory_allocated(self.procs.device) / 2 ** 30
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
