"""Checkpoints to sample from or start from: ours, and the authors' released ones with their config.yaml.

open_checkpoint(path) gives the network, the SoFlowConfig it was trained with and what our checkpoints record
beside it, for a file, a run folder or hf://OWNER/REPO/FILE. A released checkpoint X/ckpts/STEP.pt finds its
configuration in X/config.yaml; both released files map to exactly PRESETS["imagenet"] and PRESETS["cifar10"].
"""
import os
import posixpath

import soflow
from training import processes, sit
from training.checkpoints import RECORDED_KEYS, checkpoint_file, load_checkpoint

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


def read_file(path):
    """(path, what torch.load gives) of a checkpoint: a file, a run folder (its newest) or hf://OWNER/REPO/FILE.

    Only weights and plain values are read. Under several processes, call it in processes.rank0_first: rank 0
    downloads first, the others then read the cache."""
    path = path if str(path).startswith("hf://") else checkpoint_file(path)
    local = soflow.hub_file(path) if str(path).startswith("hf://") else path     # fetched once
    try:
        return path, load_checkpoint(local)
    except FileNotFoundError as e:
        raise ValueError(f"no such file: {path}") from e
    except Exception as e:
        raise ValueError(f"{path} is not a PyTorch checkpoint of weights ({type(e).__name__}: "
                         f"{str(e).splitlines()[0]})") from e


def open_checkpoint(path, use_ema=True, procs=processes.Processes()):
    """(net, config, note, recorded): a checkpoint's network, the SoFlowConfig it was trained with, and more.

    path: ours or released; a file, a run folder (its newest) or hf://OWNER/REPO/FILE (rank 0 downloads
    first, the others then read the cache). Ours store their config; a released one reads the config.yaml
    beside its ckpts/ folder, else its preset is assumed; note says which. recorded: what ours also store,
    such as the VAE of latents ({} for a released one)."""
    with processes.rank0_first(procs):
        path, ckpt = read_file(path)
        return from_checkpoint(ckpt, path, use_ema)


def from_checkpoint(ckpt, path, use_ema=True):
    """open_checkpoint's (net, config, note, recorded) of a loaded checkpoint, ours or released.

    A released one's config.yaml may be on the hub: under several processes, call it in rank0_first."""
    net = soflow.network_from_checkpoint(ckpt, use_ema, path)
    config, note = net.soflow_config, ""
    recorded = {key: ckpt[key] for key in RECORDED_KEYS if key in ckpt} if config is not None else {}
    if config is None:
        config, where = released_config(path)
        note = f"{path}: the configuration of {where}"
    if config is None:
        preset = RELEASED_PRESETS.get(type(net).__name__, "imagenet")
        config = soflow.PRESETS[preset]
        note = (f"{path} stores no config and {where}: assuming the released PRESETS['{preset}'] "
                f"({config.schedule} schedule, {config.param} parameterization)")
    return net, config, note, recorded


DATA_SHAPE_KEYS = ("in_channels", "input_size", "img_resolution")


def data_shape(net):
    """One sample's shape for an MLP, DiT (SiT too) or U-Net, read off its constructor arguments."""
    kwargs = net.init_kwargs
    if "data_shape" in kwargs:                                       # MLP
        return tuple(kwargs["data_shape"])
    size = kwargs.get("input_size", kwargs.get("img_resolution"))    # DiT, UNet
    return (kwargs["in_channels"], size, size)


def fitting_weights(source, net, path):
    """source's state dict if it fits net (the same class, size and data shape); else a ValueError, why."""
    if type(source) is not type(net):
        raise ValueError(f"it holds a {type(source).__name__}; this run trains a {type(net).__name__}")
    theirs, ours = source.init_kwargs, net.init_kwargs
    for key in [k for k in DATA_SHAPE_KEYS if k in theirs and k in ours and theirs[k] != ours[k]][:1]:
        raise ValueError(f"its {key} is {theirs[key]}, this run's {ours[key]}: the data's shape differs")
    soflow.check_state_dict(net, source.state_dict(), path)
    return source.state_dict()


def start_from_checkpoint(settings, net, ema, config, procs):
    """--init-from: load a checkpoint's EMA (or raw) weights into net and ema; returns the log's note.

    Ours, a released one, or SiT's (a DiT then starts as SiT's velocity field: sit.student_from_sit).
    Refused, with the reason, when the network class, its size or the data's shape differ."""
    try:
        with processes.rank0_first(procs):          # rank 0 downloads first, the others read its cache
            path, ckpt = read_file(settings.init_from)
            ours = None if sit.is_sit(ckpt) else from_checkpoint(ckpt, path, not settings.init_from_raw)
        if ours is None:                            # SiT's
            if type(net) is not soflow.DiT:
                raise ValueError(f"it holds SiT's weights, for a DiT; this run trains a {type(net).__name__}")
            sd, _, note = sit.sit_weights(ckpt, path, not settings.init_from_raw)
            weights = sit.student_from_sit(sd, net, config, path)
            note += "; the student starts as SiT's velocity field (its emb(t - s) zeroed)"
        else:
            source, _, note, _ = ours
            weights = fitting_weights(source, net, settings.init_from)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"--init-from {settings.init_from}: {e}") from e
    net.load_state_dict(weights)
    ema.load_state_dict(weights)
    kind = "raw" if settings.init_from_raw else "EMA"
    return (f"a new run from the {kind} weights of {settings.init_from}, with a fresh optimizer at step 0"
            + (f" ({note})" if note else ""))
