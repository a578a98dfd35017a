"""SiT (Ma et al. 2024, github.com/willisma/SiT), public flow-matching DiTs, as teachers and starting points.

SiT's network is DiT's on one time: its state-dict keys are exactly DiT's, without SoFlow's embedding of the
gap t - s. With learn_sigma its output has 2C channels, of which the first C are the velocity. Its time runs
the other way: t_SiT = 0 is noise and 1 is data. On its Linear path x = t_SiT x_0 + (1 - t_SiT) x_1, which is
this project's linear schedule at t = 1 - t_SiT (its GVP path is the triangular one), so
    v(x, t, y) = -SiT(x, 1 - t, y)[:, :C]        (dt_SiT = -dt flips the velocity's sign).
t_SiT enters the sinusoidal embedder as is (no x1000); the null class of CFG is num_classes (1000).
The public SiT-XL-2-256x256.pt is a raw state dict; SiT's train.py writes {"model", "ema", "opt", "args"}.
"""
import math

import torch
from einops import rearrange

import soflow

# SiT's path types (--path-type) whose velocity fields are this project's noising schedules at t = 1 - t_SiT.
SIT_PATHS = {"Linear": "linear", "GVP": "triangular"}


class SiT(soflow.DiT):
    """SiT's network: a DiT on SiT's time alone; learn_sigma gives 2C output channels, the first C kept."""
    def __init__(self, learn_sigma=True, **dit_kwargs):
        super().__init__(**dit_kwargs)
        self.init_kwargs = dict(dit_kwargs, learn_sigma=learn_sigma)
        del self.s_embedder                                          # one time: no gap t - s
        out_channels = self.in_channels * (2 if learn_sigma else 1)
        self.final_layer = soflow.FinalLayer(self.pos_embed.shape[-1], self.patch_size, out_channels)

    def forward(self, x, t_sit, y):
        """SiT(x, t_SiT, y): its velocity towards the data, (B, C, H, W)."""
        h = rearrange(self.x_embedder(x), "b d h w -> b (h w) d") + self.pos_embed    # (B, T, D)
        c = self.t_embedder(t_sit) + self.y_embedder(y)                                # (B, D)
        for block in self.blocks:
            h = block(h, c)
        out = self.unpatchify(self.final_layer(h, c))                 # (B, C or 2C, H, W)
        return out[:, :self.in_channels].to(x.dtype)                  # learn_sigma: drop the variance


def sit_velocity(sit, x, t, y=None, cond=None):
    """This project's v(x, t, y) = -SiT(x, 1 - t, y), for soflow.soflow_loss(teacher=...)."""
    if cond is not None:
        raise ValueError("SiT takes no cond tensor; class labels go in y")
    y = soflow.labels_or_null(y, x.shape[0], sit.num_classes, x.device)
    return -sit(x, 1 - t, y)


# ----- Reading SiT's files -----
def is_sit(ckpt):
    """Whether a loaded file is SiT's: a raw DiT state dict without s_embedder, or train.py's dict of them."""
    weights = ckpt.get("ema", ckpt) if isinstance(ckpt, dict) and "args" in ckpt else ckpt
    if not isinstance(weights, dict):
        return False
    dit = "x_embedder.proj.weight" in weights and "t_embedder.mlp.0.weight" in weights
    return dit and not any(str(k).startswith("s_embedder.") for k in weights)


def sit_weights(ckpt, path, use_ema=True):
    """(state dict, schedule, note) of a SiT file: train.py's EMA (or raw) weights, or the raw state dict."""
    if "args" not in ckpt:                                           # download.py's files: Linear, velocity
        return ckpt, "linear", f"{path}: SiT weights (a raw state dict: its Linear path assumed)"
    args = ckpt["args"] if isinstance(ckpt["args"], dict) else vars(ckpt["args"])
    path_type, prediction = args.get("path_type", "Linear"), args.get("prediction", "velocity")
    if path_type not in SIT_PATHS or prediction != "velocity":
        raise ValueError(f"{path}: SiT trained on the {path_type} path predicting {prediction}; a teacher "
                         f"must predict the velocity on the {' or '.join(SIT_PATHS)} path")
    key = "ema" if use_ema else "model"
    return ckpt[key], SIT_PATHS[path_type], f"{path}: SiT's '{key}' weights ({path_type} path)"


def sit_from_state_dict(sd, path="the SiT checkpoint"):
    """A SiT network in eval mode with the weights of sd, its size read off their shapes."""
    try:
        kwargs = soflow.dit_kwargs_from_state_dict(sd)
    except KeyError as e:
        raise ValueError(f"{path}: cannot read the SiT size, no key {e}") from e
    patch, channels = kwargs["patch_size"], kwargs["in_channels"]
    outputs = sd["final_layer.linear.weight"].shape[0] // patch ** 2                # C or 2C
    with torch.device("meta"):
        net = SiT(learn_sigma=outputs == 2 * channels, **kwargs)
    soflow.check_state_dict(net, sd, path)
    net.load_state_dict(sd, assign=True)
    return net.eval()


# ----- A SoFlow DiT that starts as SiT (--init-from) -----
def time_flip(dim, max_period=10000):
    """R (dim, dim) with timestep_embedding(1 - t) = timestep_embedding(t) @ R.T, for every t.

    Per frequency w: cos(w (1 - t)) = cos w cos wt + sin w sin wt,
                     sin(w (1 - t)) = sin w cos wt - cos w sin wt."""
    half = dim // 2
    w = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / half)
    cos, sin = torch.diag(torch.cos(w)), torch.diag(torch.sin(w))
    return torch.cat([torch.cat([cos, sin], 1), torch.cat([sin, -cos], 1)], 0)     # rows: [cos; sin] out


def student_from_sit(sit_sd, student, config, path="the SiT checkpoint"):
    """The state dict that makes a SoFlow DiT compute SiT's velocity: F(x, t, t, y) = v(x, t, y) / d_2 b.

    SiT's time embedder reads 1 - t through a fixed rotation of its first layer (time_flip); the output keeps
    SiT's first C channels, sign flipped and divided by d_2 b (Eq. 10: v = d_2 b F, since d_2 a = 0 in both
    parameterizations); s_embedder's last layer is zeroed, so emb(t - s) is 0 until training moves it.
    With the Euler parameterization, one step f(x_1, 1, 0) starts as one Euler step of SiT's ODE."""
    own = student.state_dict()
    sd = {k: v.clone() for k, v in sit_sd.items()}
    first = sd["t_embedder.mlp.0.weight"]                             # (D, 256)
    sd["t_embedder.mlp.0.weight"] = (first.double() @ time_flip(first.shape[1])).to(first.dtype)
    param = soflow.PARAMETERIZATIONS[config.param]
    one = torch.ones(1)
    if float(param.da_ds(one)) != 0:
        raise ValueError(f"the {config.param} parameterization has d_2 a(t, t) != 0: start from SiT needs 0")
    scale = -1 / float(param.db_ds(one))
    C, p = student.in_channels, student.patch_size
    for name in ("final_layer.linear.weight", "final_layer.linear.bias"):
        out = sd[name].reshape(p * p, -1, *sd[name].shape[1:])        # (p*p, C or 2C, ...): (p q c) order
        sd[name] = scale * out[:, :C].reshape(p * p * C, *sd[name].shape[1:])
    for name, value in own.items():
        if name.startswith("s_embedder."):
            zero = name.startswith("s_embedder.mlp.2.")
            sd[name] = torch.zeros_like(value) if zero else value.detach().clone()
    soflow.check_state_dict(student, sd, path)
    return sd
