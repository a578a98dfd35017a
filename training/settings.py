"""The settings of a training run, and the command-line flags derived from them.

Each field of TrainSettings carries its flag's help and group: the flags (name, default, help) are made from
the dataclass, never written a second time. The method's hyperparameters are soflow.SoFlowConfig.
"""
from dataclasses import MISSING, dataclass, field, fields, replace

PRECISIONS = ("bf16", "tf32", "fp32")

# The groups of --help, in order.
RUN, OPTIMISATION, DISTILLATION, CHECKPOINTS, EVALUATION, TRACKING = (
    "the run", "optimisation and EMA", "distillation", "checkpoints and faults", "evaluation", "tracking")


def setting(default, help, group, metavar=None, choices=None):
    """A TrainSettings field with its flag's help and --help group."""
    metadata = dict(help=help, group=group, metavar=metavar, choices=choices)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class TrainSettings:
    """How a run trains: its folder, batch, length, EMA and bookkeeping (flags: add_flags)."""
    results_dir: str = setting(MISSING, "the run folder: log.txt, metrics.jsonl, samples/, checkpoints/; an "
                               "existing one is resumed", RUN)
    global_batch_size: int = setting(256, "rows per step over all processes", RUN)
    steps: int = setting(400_000, "training steps K (r(k, K) depends on it)", RUN)
    stop_at: int = setting(0, "save and stop after this step (0: run to --steps)", RUN)
    global_seed: int = setting(0, "process r of W draws from seed global_seed * W + r", RUN)
    micro_batch: int = setting(0, "rows per process and forward pass (0: the whole per-process batch)", RUN)
    precision: str = setting("", "bf16: autocast (the default on a GPU); tf32: fp32 with TF32 matmuls, the "
                             "released code's numerics; fp32: TF32 off (the default on a CPU)", RUN,
                             choices=PRECISIONS)
    compile: bool = setting(False, "torch.compile the network", RUN)
    ema_decay: float = setting(0.9999, "per-step EMA decay, once warmed up", OPTIMISATION)
    ema_every: int = setting(1, "update the EMA every N steps, its decay raised to the N-th power",
                             OPTIMISATION, metavar="N")
    ema_warmup: bool = setting(True, "the EMA's decay ramps up from 0.1 (loop.ema_decay_at); "
                               "--no-ema-warmup: the released code's constant decay from step 1",
                               OPTIMISATION)
    init_from: str = setting("", "fine-tune: a new run starts from this checkpoint's EMA weights (ours or "
                             "released; a file, a run folder or hf://OWNER/REPO/FILE) with a fresh optimizer "
                             "at step 0", OPTIMISATION, metavar="CKPT")
    init_from_raw: bool = setting(False, "--init-from: its raw training weights instead", OPTIMISATION)
    teacher: str = setting("", "distil (Sec. 4.2): this pretrained flow model's velocity replaces "
                           "alpha'_t x_0 + beta'_t x_1 in both losses and gives CFG's unconditional "
                           "velocity. Ours (flow matching or SoFlow; a file, a run folder or hf://), "
                           "a released SoFlow checkpoint, or SiT's; its EMA weights. --init-from the "
                           "same file starts the student from it",
                           DISTILLATION, metavar="CKPT")
    ckpt_every: int = setting(10_000, "steps per checkpoint", CHECKPOINTS, metavar="N")
    keep_ckpts: int = setting(3, "checkpoints kept on disk, the newest", CHECKPOINTS)
    max_bad_steps: int = setting(10, "stop after this many non-finite steps in a row", CHECKPOINTS)
    dist_timeout: float = setting(5.0, "minutes a process waits for the others in a collective before the "
                                  "job ends (a dead node, a hung process)", CHECKPOINTS, metavar="MINUTES")
    log_every: int = setting(100, "steps per record in metrics.jsonl and log.txt", TRACKING, metavar="N")
    sample_every: int = setting(10_000, "steps per EMA sample grid (1 and 2 NFE)", TRACKING, metavar="N")
    wandb_project: str = setting("", "also log to this wandb project (pip install wandb)", TRACKING,
                                 metavar="NAME")
    fid_every: int = setting(0, "FID of the EMA every N steps (0: none)", EVALUATION, metavar="N")
    fid_ref: str = setting("", "--fid-every: reference statistics (fid.py ref) or images (fid.py's SOURCE)",
                           EVALUATION, metavar="REF")
    fid_images: int = setting(10_000, "--fid-every: samples per FID, spread over the processes", EVALUATION,
                              metavar="K")
    fid_nfe: tuple = setting((1,), "--fid-every: at these numbers of steps, e.g. 1 2", EVALUATION,
                             metavar="NFE")
    inception_weights: str = setting("", "--fid-every: the Inception's weight file (default: downloaded "
                                     "once, see fid.py)", EVALUATION, metavar="PATH")


def flag_name(name, default):
    """--ema-warmup's flag is --no-ema-warmup: a switch that is on by default turns off."""
    return f"--{'no-' if default is True else ''}{name.replace('_', '-')}"


def add_flags(parser, names=None, **defaults):
    """Add the flags of TrainSettings' fields (all, or those named) to parser, in --help's groups.

    defaults: a script's own defaults for some fields (train_cifar.py: global_batch_size=1024, ...)."""
    if unknown := set(defaults) - {f.name for f in fields(TrainSettings)}:
        raise TypeError(f"no TrainSettings field {sorted(unknown)[0]!r}")
    groups = {}
    for f in fields(TrainSettings):
        if names is not None and f.name not in names:
            continue
        group = groups.get(f.metadata["group"]) or parser.add_argument_group(f.metadata["group"])
        groups[f.metadata["group"]] = group
        default = defaults.get(f.name, f.default)
        kwargs = dict(dest=f.name, help=f.metadata["help"])
        if f.type is bool:
            kwargs["action"] = "store_false" if default else "store_true"
        elif default is MISSING:
            kwargs.update(required=True, metavar=f.metadata["metavar"] or "DIR")
        else:
            several = isinstance(default, tuple)                    # --fid-nfe 1 2
            kwargs.update(type=int if several else f.type, nargs="+" if several else None,
                          default=list(default) if several else default, metavar=f.metadata["metavar"],
                          choices=f.metadata["choices"])
            kwargs["help"] += "" if default in ("", 0, None) else " (default: %(default)s)"
        group.add_argument(flag_name(f.name, default is True), **kwargs)


def settings_from_args(args):
    """The TrainSettings of parsed flags (those of add_flags); FID's flags checked together."""
    settings = TrainSettings(**{f.name: getattr(args, f.name) for f in fields(TrainSettings)})
    if settings.fid_every and not settings.fid_ref:
        raise SystemExit("--fid-every needs --fid-ref: statistics from `python fid.py ref SOURCE OUT.npz` or "
                         "ADM's reference batch")
    if settings.fid_every and (settings.fid_images < 2 or min(settings.fid_nfe) < 1):
        raise SystemExit("--fid-images must be at least 2 and --fid-nfe at least 1")
    return replace(settings, fid_nfe=tuple(settings.fid_nfe))

