"""SoFlow: Solution Flow Models for one-step generative modeling (Luo, Yuan, Liu; arXiv 2512.15657).

The method in one file, in the paper's order: noising schedules (Sec. 3), parameterizations (Sec. 4.2), time
sampling (App. A), the flow matching loss (Eq. 11-12), the solution consistency loss (Eq. 13-15), guidance
(Sec. 4.3, Eq. 17-19), the hyperparameters, Algorithm 1 and sampling; then the networks (MLP, DiT, U-Net) and
loading checkpoints, ours and the released ones, local or hf://. It imports only torch and einops: copy it.

    import soflow
    net, config = soflow.MLP(), soflow.PRESETS["toy"]
    loss, diagnostics = soflow.soflow_loss(net, x0, config=config, step=k, total_steps=K)   # Algorithm 1
    x0_hat = soflow.sample(net, torch.randn_like(x0), config=config)                     # one step
    loss, _ = soflow.soflow_loss(net, x0, config=config, step=k, total_steps=K, teacher=v)  # distil v
"""
import math
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

# ----- Conventions -----
#   t = 0 is data, t = 1 is noise: x_t = alpha_t x_0 + beta_t x_1 with x_1 ~ N(0, I).
#   f(x_t, t, s) carries a point of the velocity ODE from time t to time s: x_0 = f(x_1, 1, 0).
#   A network computes F_theta(x, t, s, y=None, cond=None) with the shape of x; t and s are (B,).
#   y holds class labels; the index num_classes is the null label ("no label") of CFG.

def per_sample(t, x):
    """View a (B,) tensor so that it broadcasts against x of shape (B, ...)."""
    return t.reshape(-1, *([1] * (x.dim() - 1)))

def mean_per_sample(z):
    """(B, ...) -> (B,): the mean over everything but the batch, so ||z||^2 / D for z squared."""
    return z.flatten(1).mean(1)

def part_of(z, part):
    """z[part], or None for an absent input (labels, cond)."""
    return None if z is None else z[part]

def unwrap(net):
    """The bare network inside DistributedDataParallel (.module) and torch.compile (._orig_mod)."""
    while isinstance(net, nn.parallel.DistributedDataParallel) or hasattr(net, "_orig_mod"):
        net = net._orig_mod if hasattr(net, "_orig_mod") else net.module
    return net

# ----- Noising schedules (Sec. 3): x_t = alpha_t x_0 + beta_t x_1 -----
# alpha_0 = beta_1 = 1 and alpha_1 = beta_0 = 0: x_0 is data and x_1 is noise.
class LinearSchedule:
    """x_t = (1 - t) x_0 + t x_1."""
    def alpha(self, t): return 1 - t
    def beta(self, t): return t
    def d_alpha(self, t): return -torch.ones_like(t)
    def d_beta(self, t): return torch.ones_like(t)

class TriangularSchedule:
    """x_t = cos(pi t / 2) x_0 + sin(pi t / 2) x_1."""
    def alpha(self, t): return torch.cos(math.pi / 2 * t)
    def beta(self, t): return torch.sin(math.pi / 2 * t)
    def d_alpha(self, t): return -math.pi / 2 * torch.sin(math.pi / 2 * t)
    def d_beta(self, t): return math.pi / 2 * torch.cos(math.pi / 2 * t)

SCHEDULES = {"linear": LinearSchedule(), "triangular": TriangularSchedule()}

def interpolate(schedule_name, x0, x1, t):
    """x_t, and v_t = alpha'_t x_0 + beta'_t x_1 (Eq. 4), which stands in for v(x_t, t) of Eq. 1."""
    schedule = SCHEDULES[schedule_name]
    x_t = per_sample(schedule.alpha(t), x0) * x0 + per_sample(schedule.beta(t), x0) * x1      # Sec. 3
    v_t = per_sample(schedule.d_alpha(t), x0) * x0 + per_sample(schedule.d_beta(t), x0) * x1
    return x_t, v_t

# ----- Parameterizations (Sec. 4.2): f_theta(x_t, t, s) = a(t, s) x_t + b(t, s) F_theta -----
# a(t, t) = 1 and b(t, t) = 0 make f_theta(x_t, t, t) = x_t (Eq. 5; Eq. 6, first condition) for any net;
# the second condition, learned by the consistency loss, then makes f_theta the true f (Eq. 7-8).
# da_ds(t), db_ds(t): the derivatives of a(t, s), b(t, s) in s at s = t, the paper's d_2 a(t, t) and
# d_2 b(t, t). By Eq. 9 the velocity is v = d_3 f(x, t, t), which gives Eq. 10.
class EulerParam:
    """f_theta = x_t + (s - t) F_theta."""
    def a(self, t, s): return torch.ones_like(t)
    def b(self, t, s): return s - t
    def da_ds(self, t): return torch.zeros_like(t)
    def db_ds(self, t): return torch.ones_like(t)

class TriangularParam:
    """f_theta = cos(pi/2 (s - t)) x_t + sin(pi/2 (s - t)) F_theta."""
    def a(self, t, s): return torch.cos(math.pi / 2 * (s - t))
    def b(self, t, s): return torch.sin(math.pi / 2 * (s - t))
    def da_ds(self, t): return torch.zeros_like(t)
    def db_ds(self, t): return torch.full_like(t, math.pi / 2)

PARAMETERIZATIONS = {"euler": EulerParam(), "triangular": TriangularParam()}

def f_from_F(param_name, F_out, x, t, s):
    """f_theta(x_t, t, s) = a(t, s) x_t + b(t, s) F_theta(x_t, t, s) (Sec. 4.2)."""
    param = PARAMETERIZATIONS[param_name]
    return per_sample(param.a(t, s), x) * x + per_sample(param.b(t, s), x) * F_out

def v_from_F(param_name, F_out, x, t):
    """v_theta(x_t, t) = d_2 a(t, t) x_t + d_2 b(t, t) F_theta(x_t, t, t) (Eq. 10)."""
    param = PARAMETERIZATIONS[param_name]
    return per_sample(param.da_ds(t), x) * x + per_sample(param.db_ds(t), x) * F_out

def solution(net, x, t, s, y=None, cond=None, *, config):
    """The learned solution function f_theta(x, t, s), in the parameterization of config."""
    return f_from_F(config.param, net(x, t, s, y, cond), x, t, s)

def velocity(net, x, t, y=None, cond=None, *, config):
    """The learned velocity field v_theta(x, t) (Eq. 10), in the parameterization of config."""
    return v_from_F(config.param, net(x, t, t, y, cond), x, t)

# ----- Time sampling (Sec. 4.2, App. A) -----
def logit_normal(n, mu, sd, device=None):
    """sigmoid(N(mu, sd^2)) samples, shape (n,)."""
    return torch.sigmoid(torch.randn(n, device=device) * sd + mu)

R_SCHEDULES = ("exp", "cosine", "linear", "constant")

def r_schedule(k, K, config):
    """r(k, K): how far l sits from t as a fraction of t - s, from r_init down to r_end (App. A)."""
    progress = min(max(k / max(K, 1), 0.0), 1.0)
    if config.r_schedule == "exp":
        return config.r_init * (config.r_end / config.r_init) ** progress
    if config.r_schedule == "cosine":
        return config.r_end + (config.r_init - config.r_end) * 0.5 * (1 + math.cos(math.pi * progress))
    if config.r_schedule == "linear":
        return config.r_init + (config.r_end - config.r_init) * progress
    return config.r_end                                               # "constant"

def consistency_times(n, r, config, device=None):
    """(t, s, l), each (n,), with 0 <= s <= l <= t - 1e-4 (Sec. 4.2, App. A)."""
    t = logit_normal(n, config.t_mu, config.t_sd, device).clamp(min=1e-4)
    s = torch.minimum(logit_normal(n, config.s_mu, config.s_sd, device), t - 1e-4)
    l = torch.minimum(t + (s - t) * r, t - 1e-4)                     # Eq. (16), then clamped
    return t, s, l

# ----- The flow matching loss (Eq. 11-12) -----
def fm_loss(v_pred, v_target, t, config):
    """Per-sample L_FM, v_theta's squared error (Eq. 11) weighted by Eq. 12: (loss, mse, weight), (B,) each.

    Eq. 11 is the flow matching loss of Eq. 3 in the conditional form of Eq. 4, at s = t.
    v_pred: v_theta(x_t, t) (Eq. 10), with gradient. v_target: alpha'_t x_0 + beta'_t x_1, or its mix."""
    mse = mean_per_sample((v_pred - v_target) ** 2)
    db_ds = PARAMETERIZATIONS[config.param].db_ds(t)
    weight = 1 / (db_ds.abs() * (mse.detach() + config.eps) ** config.p)  # Eq. (12), a constant
    return weight * mse, mse.detach(), weight

# ----- The solution consistency loss (Eq. 13-15) -----
def scm_loss(net, x_t, t, s, l, v, y=None, cond=None, *, config, F_t=None):
    """Per-sample L_SCM (Eq. 14) weighted by Eq. 15, in gradient form: (loss, mse, weight), (B,) each.

    v: the velocity that moves x_t to time l (v_t, or its mix, Eq. 19). F_t: F_theta(x_t, t, s) with gradient
    if already computed (only without dropout). mse: the MSE of Eq. 15 over (t - l)^2.
    The loss sign(b(t, s)) <F_theta(x_t, t, s), stopgrad(w dq)> / D, dq = (f_t - f_l) / (t - l), has half the
    gradient of Eq. 14 weighted by Eq. 15 and never divides by (t - l) |b(t, s)|, which can be tiny."""
    # Deviation: the released code trains with this gradient form: L_SCM enters at half Eq. 14's scale.
    x_l = x_t + per_sample(l - t, x_t) * v                           # the step of Eq. (14)
    # The target pass replays the random state the student pass starts from: the same dropout masks.
    devices = [x_t.device] if x_t.is_cuda else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        f_l = solution(net, x_l, l, s, y, cond, config=config)          # f_theta^-(x_l, l, s)
    if F_t is None:
        F_t = net(x_t, t, s, y, cond)
    f_t = f_from_F(config.param, F_t.detach(), x_t, t, s)  # f_theta(x_t, t, s), value only
    dq = (f_t - f_l) / per_sample(t - l, x_t)  # Eq. (13): ~ the residual of Eq. (6)
    mse = mean_per_sample(dq ** 2)
    weight = 1 / (mse + config.eps) ** config.p  # Eq. (15) times (t - l) |b(t, s)|
    sign_b = torch.sign(PARAMETERIZATIONS[config.param].b(t, s))
    loss = sign_b * mean_per_sample(F_t * (per_sample(weight, dq) * dq))
    return loss, mse, weight

# ----- Classifier-free guidance at training time (Sec. 4.3, Eq. 17-19) -----
DECAYS = ("exp", "linear", "none")

def guidance_decay(t, config):
    """g(t): 1 for t <= decay_t, falling to 0 at t = 1, so that guidance fades out at high noise (App. A).

    "exp": the released code's smooth curve, with which its checkpoints were trained (the default);
    "linear": a straight line over (decay_t, 1]. Both scale w - 1: the strength falls to 1, not 0."""
    # Deviation: App. A says the strength decays linearly "to 0"; as the released code, it ends at 1.
    if config.decay == "none" or config.decay_t == 1:               # decay_t 1: no decay (released CIFAR-10)
        return torch.ones_like(t)
    d = (1 - t) / (1 - config.decay_t)
    if config.decay == "linear":
        return d.clamp(0, 1)
    d = d.clamp(0, 1 - 1e-6)                                         # "exp"
    return 1 - torch.exp(-0.025 * d / (1 - d))

def guidance_strength(t, config):
    """The CFG strength in force at time t: 1 + g(t) (w - 1)."""
    return 1 + guidance_decay(t, config) * (config.w - 1)

def guided_target(v_t, v_uncond, t, config):
    """v_cfg = w v_t + (1 - w) v_uncond (Eq. 18), v_t standing in for v(x_t, t | c) (Eq. 17)."""
    return v_t + per_sample(guidance_strength(t, config) - 1, v_t) * (v_t - v_uncond)

def mix_velocity(v_cfg, v_guided, m):
    """v_mix = m v_cfg + (1 - m) v_guided (Eq. 19), m (B,): the model's own v_guided lowers variance."""
    return per_sample(m, v_cfg) * v_cfg + (1 - per_sample(m, v_cfg)) * v_guided

def drop_labels(y, keep, num_classes):
    """Replace the labels where keep is False by the null label num_classes (Sec. 4.3)."""
    return torch.where(keep, y, num_classes)

def cfg_targets(net, x_t, t, v_t, y, cond, keep, n_fm, config, teacher=None):
    """The guided target of each row (Eq. 18), its mix ratio and the model's guided velocity (Eq. 19).

    Returns v_cfg (B, ...), m (B,) and v_guided on the consistency rows. Dropped rows keep v_t with m = 1.
    One no-grad pass computes v_uncond (null label) for every row and, if m < 1, v_guided (label kept) for the
    consistency rows; on the flow matching rows v_guided is the student's own output. With a teacher, v_t and
    v_uncond are the teacher's: v_cfg is its guided velocity, and Eq. 19 blends it with the student's own
    v_guided, whose fixed point is the same v_cfg (m = 1 distils the teacher's guided field directly)."""
    if y is None or config.w == 1:  # no guidance: Eq. (19) gives v_t
        return v_t, torch.ones_like(t), v_t[n_fm:]
    null = torch.full_like(y, unwrap(net).num_classes)
    inputs = [] if teacher is not None else [(x_t, t, null, cond)]  # v_uncond, unless the teacher gives it
    if config.m < 1:                                                 # v_guided on the consistency rows
        inputs.append((x_t[n_fm:], t[n_fm:], y[n_fm:], part_of(cond, slice(n_fm, None))))
    with torch.no_grad():
        if inputs:
            x_in, t_in, y_in, cond_in = (None if z[0] is None else torch.cat(z) for z in zip(*inputs))
            v_pred = velocity(net, x_in, t_in, y_in, cond_in, config=config)  # (B [+ B - n_fm], ...)
        # Deviation: the teacher of Sec. 4.2 also gives the unconditional velocity of Eq. 18.
        v_uncond = teacher(x_t, t, null, cond) if teacher is not None else v_pred[:len(x_t)]   # Eq. (1)
    first = 0 if teacher is not None else len(x_t)                  # where v_pred's v_guided rows start
    v_guided = v_pred[first:] if config.m < 1 else v_t[n_fm:]       # with m = 1 its weight is 0
    v_cfg = torch.where(per_sample(keep, v_t), guided_target(v_t, v_uncond, t, config), v_t)  # Eq. (18)
    m = torch.where(keep, config.m, 1.0).to(t.dtype)
    return v_cfg, m, v_guided

# ----- Hyperparameters (App. A) -----
@dataclass(frozen=True)
class SoFlowConfig:
    """The method's hyperparameters. Defaults: the released ImageNet 256 configuration."""
    schedule: str = "linear"       # noising schedule (Sec. 3): "linear" or "triangular"
    param: str = "euler"           # parameterization of f_theta (Sec. 4.2): "euler" or "triangular"
    lam: float = 0.75              # flow matching data ratio lambda (Alg. 1)
    p: float = 1.0                 # adaptive weight exponent (Eq. 12, 15)
    eps: float = 0.01              # adaptive weight smoothing (Eq. 12, 15)
    fm_mu: float = -0.2            # t_FM ~ sigmoid(N(fm_mu, fm_sd^2))
    fm_sd: float = 1.0
    t_mu: float = 0.2              # t ~ sigmoid(N(t_mu, t_sd^2)) for the consistency loss
    t_sd: float = 0.8
    s_mu: float = -1.0             # s ~ sigmoid(N(s_mu, s_sd^2)); the paper says -0.2
    s_sd: float = 0.8
    r_schedule: str = "exp"        # r(k, K): "exp", "cosine", "linear" or "constant" (App. A)
    r_init: float = 0.1
    r_end: float = 0.002           # the paper says 1/320
    w: float = 3.0                 # CFG strength (Eq. 18); 1 turns guidance off
    m: float = 0.25                # velocity mix ratio (Eq. 19)
    drop: float = 0.1              # probability of replacing a label by the null label
    decay_t: float = 0.8           # guidance decays over t in (decay_t, 1]; 1: no decay
    decay: str = "exp"             # "exp" (released code), "linear" or "none": see guidance_decay

    def __post_init__(self):
        for name, valid in dict(schedule=SCHEDULES, param=PARAMETERIZATIONS, r_schedule=R_SCHEDULES,
                                decay=DECAYS).items():
            if getattr(self, name) not in valid:
                raise ValueError(f"SoFlowConfig: unknown {name} {getattr(self, name)!r}; "
                                 f"choose one of {', '.join(map(repr, valid))}")
        for name, (low, high) in dict(lam=(0, 1), m=(0, 1), drop=(0, 1), decay_t=(0, 1),
                                      p=(0, math.inf), eps=(0, math.inf)).items():
            if not low <= getattr(self, name) <= high:
                raise ValueError(f"SoFlowConfig: {name} = {getattr(self, name)} is outside [{low}, {high}]")

PRESETS = {
    "imagenet": SoFlowConfig(),
    # The paper's App. A, where it differs from the released ImageNet configuration.
    "imagenet-paper": SoFlowConfig(s_mu=-0.2, r_end=1 / 320, decay="linear"),
    # Released CIFAR-10 (unconditional, no CFG): consistency loss only, r starting at 1.
    "cifar10": SoFlowConfig(lam=0.0, p=0.75, eps=1e-3, fm_mu=-0.9, fm_sd=1.6, t_mu=-0.9,
                            t_sd=1.6, s_mu=-4.0, s_sd=1.6, r_init=1.0, r_end=0.0003125,
                            w=1.0, m=1.0, drop=0.0, decay_t=1.0),
    # The paper's CIFAR-10 values; it gives no eps, so the released one is kept.
    "cifar10-paper": SoFlowConfig(lam=0.25, p=0.5, eps=1e-3, fm_mu=-0.4, fm_sd=1.7, t_mu=-0.6,
                                  t_sd=1.5, s_mu=-4.0, s_sd=1.5, r_init=1 / 50, r_end=1 / 2500,
                                  w=1.0, m=1.0, drop=0.0, decay_t=1.0),
    # 2D toys (train_toy.py, the notebook, tests): short runs; s_mu -2 puts more pairs near the data.
    "toy": SoFlowConfig(lam=0.5, p=0.5, eps=1e-3, fm_mu=0.0, fm_sd=1.0, t_mu=0.0, t_sd=1.0,
                        s_mu=-2.0, s_sd=1.0, r_init=0.1, r_end=0.01, w=1.0, m=1.0, drop=0.0),
}

# ----- Algorithm 1 -----
@dataclass
class Draws:
    """What Algorithm 1 draws at random for one batch: noise, times and which labels are kept."""
    x1: torch.Tensor                       # (B, ...) noise
    t_fm: torch.Tensor                     # (n_fm,) flow matching times
    t: torch.Tensor                        # (B - n_fm,) consistency times, s <= l < t
    s: torch.Tensor
    l: torch.Tensor
    keep: Optional[torch.Tensor] = None  # (B,) bool, False where the null label replaces the label

def draw(x0, config, r, labelled):
    """Sample the noise, the times (Sec. 4.2) and the label drops (Sec. 4.3) for a batch x0."""
    B = x0.shape[0]
    n_fm = int(config.lam * B)                                       # Alg. 1's split, rounded down
    t, s, l = consistency_times(B - n_fm, r, config, x0.device)
    keep = torch.rand(B, device=x0.device) >= config.drop if labelled else None
    x1 = torch.randn_like(x0)
    t_fm = logit_normal(n_fm, config.fm_mu, config.fm_sd, x0.device)
    return Draws(x1, t_fm, t, s, l, keep)

def soflow_loss(net, x0, y=None, cond=None, *, config, step, total_steps, draws=None, teacher=None):
    """Algorithm 1: L = (n_fm / B) L_FM + (1 - n_fm / B) L_SCM, and detached diagnostics.

    x0: (B, ...) data; y: (B,) labels or None; cond: (B, ...) or None; net may be wrapped (DDP,
    torch.compile). Network calls: one no-grad pass for CFG, the consistency target pass, and one student
    pass over the batch (one per loss under active dropout: the target pass replays the student's masks).
    teacher: None (from scratch, as the paper), or a velocity field v(x, t, y, cond) to distil (Sec. 4.2),
    e.g. partial(velocity, flow_matching_net, config=its_config): one no-grad pass more, two with CFG."""
    bare = unwrap(net)
    if y is not None and bare.num_classes == 0:
        raise ValueError("labels y were given to an unconditional network: build it with num_classes")
    if y is not None and config.w != 1 and config.drop <= 0:
        raise ValueError(f"CFG with w={config.w} needs label dropping (drop > 0): the null label's "
                         "velocity, which guidance subtracts, would never be trained")
    # Sample t_FM, t_SCM, l_SCM, s_SCM (Sec. 4.2) and the label drops; the first n_fm rows: L_FM.
    r = r_schedule(step, total_steps, config)
    d = draws if draws is not None else draw(x0, config, r, labelled=y is not None)
    B = x0.shape[0]
    n_fm = d.t_fm.shape[0]
    fm, scm = slice(0, n_fm), slice(n_fm, B)
    t = torch.cat([d.t_fm, d.t])                                     # (B,)
    s = torch.cat([d.t_fm, d.s])                                     # (B,): s = t on the FM rows
    # Get x_t and v_t = alpha'_t x_0 + beta'_t x_1 by the standard flow matching framework (Eq. 4).
    x_t, v_t = interpolate(config.schedule, x0, d.x1, t)             # (B, ...) each
    if y is not None:
        y = drop_labels(y, d.keep, bare.num_classes)
    if teacher is not None:
        # Deviation: "this velocity term can also be provided by a teacher model in distillation situations"
        # (Sec. 4.2): the teacher's v(x_t, t | y) replaces v_t in L_FM (Eq. 11) and in the step of Eq. 14.
        with torch.no_grad():
            v_t = teacher(x_t, t, y, cond)     # v(x_t, t | y) of Eq. (17); the null label's rows: Eq. (1)
    # The guided targets (Eq. 18) of the rows whose label is kept.
    v_cfg, m, v_guided = cfg_targets(net, x_t, t, v_t, y, cond, d.keep, n_fm, config, teacher)
    # The student pass F_theta(x_t, t, s), with gradient.
    dropout = any(mod.p > 0 and mod.training for mod in bare.modules() if isinstance(mod, nn.Dropout))
    if dropout:    # the consistency rows get their own pass in scm_loss, after the target pass
        F_fm = net(x_t[fm], t[fm], s[fm], part_of(y, fm), part_of(cond, fm)) if n_fm > 0 else None
        F_scm = None
    else:          # one pass serves both losses
        F_all = net(x_t, t, s, y, cond)
        F_fm, F_scm = F_all[fm], F_all[scm]
    diagnostics = {}
    loss = 0
    if n_fm > 0:
        # L_FM (Eq. 11) towards v_mix (Eq. 19), whose v_guided is this pass's own prediction.
        v_pred = v_from_F(config.param, F_fm, x_t[fm], t[fm])       # Eq. (10)
        v_mix = mix_velocity(v_cfg[fm], v_pred.detach(), m[fm])      # Eq. (19)
        loss_fm, mse, weight = fm_loss(v_pred, v_mix, t[fm], config)  # Eq. (11-12)
        loss = loss + loss_fm.mean() * n_fm / B
        diagnostics.update(fm_loss=loss_fm.mean(), fm_mse=mse.mean(), fm_weight=weight.mean())
    if n_fm < B:
        # L_SCM (Eq. 14), with the step to x_l taken along v_mix (Eq. 19).
        v_mix = mix_velocity(v_cfg[scm], v_guided, m[scm])           # Eq. (19)
        loss_scm, mse, weight = scm_loss(net, x_t[scm], d.t, d.s, d.l, v_mix, part_of(y, scm),
                                         part_of(cond, scm), config=config, F_t=F_scm)
        loss = loss + loss_scm.mean() * (B - n_fm) / B
        diagnostics.update(scm_mse=mse.mean(), scm_weight=weight.mean())
    diagnostics["loss"] = loss
    return loss, {name: value.detach() for name, value in diagnostics.items()}

# ----- Sampling -----
@torch.no_grad()
def sample(net, x1, y=None, cond=None, *, config, steps=1, times=None, mode="renoise", eps=None):
    """Generate from noise x1, one network call per step; steps=1 is x_0 = f_theta(x_1, 1, 0).

    No guidance here: it was learned (Sec. 4.3). config: the SoFlowConfig the network was trained with.
    times: a decreasing grid t_0 > ... > t_N (default: `steps` equal steps from 1 to 0).
    "renoise" (the released sampler, the default): x <- alpha(t_{i+1}) f_theta(x, t_i, 0) + beta(t_{i+1})
    eps_i, fresh noise eps_i at each step: eps[i] if given (N - 1 tensors like x1), else drawn.
    "chain": x <- f_theta(x, t_i, t_{i+1}), no noise."""
    if times is None:
        times = torch.linspace(1, 0, steps + 1)
    times = torch.as_tensor(times, dtype=torch.float32)
    if times.dim() != 1 or len(times) < 2 or not bool((times[1:] < times[:-1]).all()):
        raise ValueError(f"times must decrease strictly, 2 points or more: {times.tolist()}")
    if mode not in ("chain", "renoise"):
        raise ValueError(f"unknown sampling mode {mode!r}; use 'chain' or 'renoise'")
    schedule = SCHEDULES[config.schedule]
    x = x1
    for i, (t_i, t_next) in enumerate(zip(times[:-1].tolist(), times[1:].tolist())):
        t = torch.full((x.shape[0],), t_i, device=x.device, dtype=x.dtype)
        if mode == "chain":
            x = solution(net, x, t, torch.full_like(t, t_next), y, cond, config=config)
            continue
        x = solution(net, x, t, torch.zeros_like(t), y, cond, config=config)          # x0_hat
        if t_next > 0:                           # beta(0) = 0: the step to t = 0 adds no noise
            noise = torch.randn_like(x) if eps is None else eps[i]
            s = torch.full_like(t, t_next)
            x = per_sample(schedule.alpha(s), x) * x + per_sample(schedule.beta(s), x) * noise
    return x

@torch.no_grad()
def sample_euler(net, x1, y=None, cond=None, *, config, steps=50):
    """Flow matching's sampler, the baseline: Euler steps of the ODE (Eq. 2) along v_theta (Eq. 10)."""
    x = x1
    times = torch.linspace(1, 0, steps + 1).tolist()
    for t_i, t_next in zip(times[:-1], times[1:]):
        t = torch.full((x.shape[0],), t_i, device=x.device, dtype=x.dtype)
        x = x + (t_next - t_i) * velocity(net, x, t, y, cond, config=config)
    return x

# ----- Networks: each computes F_theta(x, t, s, y=None, cond=None) -----
# Times enter as t and the gap t - s, each with its own embedder; init_kwargs lets a checkpoint rebuild it.
def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal features of t in [0, 1], (B,) -> (B, dim): cosines, then sines."""
    half = dim // 2
    steps = torch.arange(half, device=t.device, dtype=torch.float32)
    freqs = torch.exp(-math.log(max_period) * steps / half)
    args = t[:, None].float() * freqs[None]                                   # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

class TimestepEmbedder(nn.Module):
    """A scalar time -> a vector: sinusoidal features, then Linear-SiLU-Linear."""
    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t):
        features = timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(features.to(self.mlp[0].weight.dtype))

class LabelEmbedder(nn.Module):
    """Class labels -> vectors; row num_classes is the null label. Label dropping happens in the loss."""
    def __init__(self, num_classes, hidden_size):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y):
        return self.embedding_table(y)

def labels_or_null(y, batch, num_classes, device):
    """y, or the null label num_classes for every sample when y is None."""
    if y is None:
        return torch.full((batch,), num_classes, dtype=torch.long, device=device)
    if num_classes == 0 and bool((y != 0).any()):
        raise ValueError("this network is unconditional (num_classes=0): pass y=None")
    return y

def constructor_args(local_vars):
    """A network's constructor arguments, from locals() at the top of its __init__: enough to rebuild it."""
    return {k: v for k, v in local_vars.items() if k not in ("self", "__class__")}

def xavier(layer, gain=1.0):
    """Xavier-uniform weight times gain (DiT's init; EDM's for DDPM++), zero bias; gain=0: zeros, no draw."""
    if gain:
        nn.init.xavier_uniform_(layer.weight, gain)
    else:
        nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer

class ResidualBlock(nn.Module):
    """h + MLP(LayerNorm(h) modulated by the conditioning c): shift and scale from c (FiLM)."""
    def __init__(self, hidden, dropout=0.0):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, hidden))

    def forward(self, h, c):
        shift, scale = self.modulation(c).chunk(2, dim=-1)
        return h + self.mlp(self.norm(h) * (1 + scale) + shift)

class MLP(nn.Module):
    """F_theta for low-dimensional data (2D toys, action chunks): residual blocks on the flattened x.

    data_shape: one sample's shape, e.g. (2,) or (horizon, action_dim). num_classes > 0 adds class labels
    (with a null label, for CFG); cond_dim > 0 a conditioning vector, e.g. an observation."""
    def __init__(self, data_shape=(2,), hidden=256, depth=4, num_classes=0, cond_dim=0, dropout=0.0):
        super().__init__()
        self.init_kwargs = constructor_args(locals())
        self.num_classes = num_classes
        dim = math.prod(data_shape)
        self.t_embedder = TimestepEmbedder(hidden)
        self.s_embedder = TimestepEmbedder(hidden)  # embeds the gap t - s
        self.y_embedder = LabelEmbedder(num_classes, hidden) if num_classes > 0 else None
        self.cond_proj = nn.Linear(cond_dim, hidden) if cond_dim > 0 else None
        self.x_proj = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(ResidualBlock(hidden, dropout) for _ in range(depth))
        # A zero output layer: F = 0 at init, so f = a x.
        self.out = nn.Sequential(nn.LayerNorm(hidden), xavier(nn.Linear(hidden, dim), gain=0))

    def forward(self, x, t, s, y=None, cond=None):
        c = self.t_embedder(t) + self.s_embedder(t - s)                       # (B, hidden)
        if self.y_embedder is not None:
            c = c + self.y_embedder(labels_or_null(y, x.shape[0], self.num_classes, x.device))
        if (cond is None) != (self.cond_proj is None):
            raise ValueError(f"this MLP was built with cond_dim={self.init_kwargs['cond_dim']}: "
                             f"{'pass' if cond is None else 'do not pass'} cond")
        if cond is not None:
            c = c + self.cond_proj(cond.flatten(1))
        h = self.x_proj(x.flatten(1))                                         # (B, hidden)
        for block in self.blocks:
            h = block(h, c)
        return self.out(h).view_as(x)

# ----- DiT (Table 4): the original DiT (Peebles & Xie 2023) plus s_embedder, which embeds the gap t - s -----
# Module names follow the released checkpoints, so that their state dicts load by name (load_network).
def modulate(x, shift, scale):
    """adaLN: x * (1 + scale) + shift; (B, D) shift and scale broadcast over the tokens of x (B, T, D)."""
    return x * (1 + scale[:, None]) + shift[:, None]

def sincos_pos_embed_2d(dim, grid_size):
    """DiT's fixed 2D sin-cos position embedding, (grid_size^2, dim), tokens in row-major order.

    The first half of the channels encodes the column, the second the row, each as [sin, cos]."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))    # (dim/4,)
    pos = torch.arange(grid_size, dtype=torch.float64)[:, None] * omega[None]         # (G, dim/4)
    emb = torch.cat([pos.sin(), pos.cos()], dim=1)                                    # (G, dim/2)
    G = grid_size
    column = emb[None].expand(G, G, -1)                           # at [i, j]: column j
    row = emb[:, None].expand(G, G, -1)                           # at [i, j]: row i
    return torch.cat([column, row], dim=-1).reshape(G * G, dim).float()

class Attention(nn.Module):
    """Multi-head self-attention; qkv packs q, k, v (in that order) along its output."""
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        qkv = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.num_heads)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, H, T, D/H)
        return self.proj(rearrange(x, "b h t d -> b t (h d)"))

class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero: the conditioning c sets a shift, scale and gate per branch."""
    def __init__(self, dim, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(dim, hidden), act=nn.GELU(approximate="tanh"),
                                             fc2=nn.Linear(hidden, dim)))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):
        modulation = self.adaLN_modulation(c).chunk(6, dim=1)               # 6 x (B, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))

class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm, then a linear map of each token to its patch of p * p * C outputs."""
    def __init__(self, dim, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, T, p*p*C)

class DiT(nn.Module):
    """F_theta(x_t, t, s, y) on latents: a DiT conditioned on emb(t) + emb(t - s) + emb(y) (XL/2)."""
    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, num_classes=1000):
        super().__init__()
        self.init_kwargs = constructor_args(locals())
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.patch_size = patch_size
        self.grid_size = input_size // patch_size
        # Fixed, yet a frozen parameter rather than a buffer: the released checkpoints store it that way.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size ** 2, hidden_size), requires_grad=False)
        # Patches -> tokens: a convolution with kernel = stride = patch size (named as DiT's timm PatchEmbed).
        patch_embed = nn.Conv2d(in_channels, hidden_size, patch_size, patch_size)
        self.x_embedder = nn.Sequential(OrderedDict(proj=patch_embed))
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.s_embedder = TimestepEmbedder(hidden_size)  # embeds the gap t - s
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)
        self.initialize_weights()

    def initialize_weights(self):
        """DiT's init: Xavier for linear layers, N(0, 0.02) for embedders, adaLN-Zero, a zero output."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                xavier(module)
        self.pos_embed.data.copy_(sincos_pos_embed_2d(self.pos_embed.shape[-1], self.grid_size)[None])
        patch_weight = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(patch_weight.view(patch_weight.shape[0], -1))  # as a linear map of patches
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for embedder in (self.t_embedder, self.s_embedder):
            nn.init.normal_(embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(embedder.mlp[2].weight, std=0.02)
        # Zero modulation makes every block the identity; a zero output layer makes F = 0: f = a x.
        for block in self.blocks:
            xavier(block.adaLN_modulation[-1], gain=0)
        xavier(self.final_layer.adaLN_modulation[-1], gain=0)
        xavier(self.final_layer.linear, gain=0)

    def forward(self, x, t, s, y=None, cond=None):
        if cond is not None:
            raise ValueError("DiT takes no cond tensor; class labels go in y")
        y = labels_or_null(y, x.shape[0], self.num_classes, x.device)
        h = rearrange(self.x_embedder(x), "b d h w -> b (h w) d") + self.pos_embed    # (B, T, D)
        c = self.t_embedder(t) + self.s_embedder(t - s) + self.y_embedder(y)          # (B, D)
        for block in self.blocks:
            h = block(h, c)
        h = self.final_layer(h, c)  # (B, T, p*p*C)
        return self.unpatchify(h).to(x.dtype)  # autocast may give bf16; f_theta is computed in x's dtype

    def unpatchify(self, x):
        """(B, T, p*p*C) -> (B, C, H, W); within a patch the channel index runs fastest."""
        p = self.patch_size
        return rearrange(x, "b (h w) (p q c) -> b c (h p) (w q)", h=self.grid_size, p=p, q=p)

# Table 4, plus DiT's S/2 and two tiny sizes for tests on a CPU.
DiT_models = {
    "DiT-XL/2": partial(DiT, depth=28, hidden_size=1152, num_heads=16, patch_size=2),
    "DiT-L/2": partial(DiT, depth=24, hidden_size=1024, num_heads=16, patch_size=2),
    "DiT-M/2": partial(DiT, depth=16, hidden_size=1024, num_heads=16, patch_size=2),
    "DiT-B/2": partial(DiT, depth=12, hidden_size=768, num_heads=12, patch_size=2),
    "DiT-B/4": partial(DiT, depth=12, hidden_size=768, num_heads=12, patch_size=4),
    "DiT-S/2": partial(DiT, depth=12, hidden_size=384, num_heads=6, patch_size=2),
    "DiT-T/2": partial(DiT, depth=2, hidden_size=64, num_heads=2, patch_size=2),
    "DiT-T/4": partial(DiT, depth=2, hidden_size=64, num_heads=2, patch_size=4),
}

# ----- U-Net (DDPM++ of EDM, 32x32 pixels) -----
# EDM's SongUNet configured as DDPM++ (Karras et al. 2022; Song et al. 2021) with the released model's
# module names, buffers and [1, 3, 3, 1] resampling filter, so that its checkpoints load (load_network).
# SoFlow's change: the time features of t and of t - s are concatenated (the mapping MLP's input: 2x).
SKIP_SCALE = math.sqrt(0.5)  # DDPM++ scales every residual sum by sqrt(1/2) to keep the variance flat

def positional_embedding(t, dim, max_period=10000):
    """EDM's time features (endpoint=True) of t in [0, 1], halves swapped: (B,) -> (B, dim), sines first."""
    half = dim // 2    # freqs_i = (1 / max_period) ** (i / (half - 1)): the last is 1 / max_period
    freqs = (1 / max_period) ** (torch.arange(half, device=t.device, dtype=torch.float32) / (half - 1))
    args = t[:, None].float() * freqs[None]                                       # (B, half)
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)

def group_norm(channels):
    """GroupNorm with 32 groups, or fewer so that every group has at least 4 channels (as EDM)."""
    return nn.GroupNorm(min(32, channels // 4), channels, eps=1e-6)

def resample(x, kernel, mode):
    """EDM's FIR resampling by 2 of each channel with a (1, 1, k, k) kernel that sums to 1.

    "down" filters and keeps every other pixel; "up" (4 x the adjoint of "down") spreads each pixel over the
    kernel."""
    C, pad = x.shape[1], (kernel.shape[-1] - 1) // 2
    kernel = kernel.to(x.dtype).tile(C, 1, 1, 1)                                  # (C, 1, k, k)
    if mode == "down":
        return F.conv2d(x, kernel, stride=2, padding=pad, groups=C)               # (B, C, H/2, W/2)
    return F.conv_transpose2d(x, 4 * kernel, stride=2, padding=pad, groups=C)     # (B, C, 2H, 2W)

class ResampleConv(nn.Conv2d):
    """EDM's Conv2d: resample first when mode is "down" or "up" (the filter is a buffer), then convolve."""
    def __init__(self, in_channels, out_channels, kernel, mode=None, resample_filter=(1, 3, 3, 1)):
        super().__init__(in_channels, out_channels, kernel, padding=kernel // 2)
        self.mode = mode
        if mode:    # outer(f, f) / sum(f)^2: (1, 1, k, k)
            f = torch.tensor(resample_filter, dtype=torch.float32)
            self.register_buffer("resample_filter", torch.outer(f, f)[None, None] / f.sum() ** 2)

    def forward(self, x):
        return super().forward(resample(x, self.resample_filter, self.mode) if self.mode else x)

class UNetBlock(nn.Module):
    """DDPM++ residual block: (resample,) conv, add the embedding, conv; then optional one-head attention."""
    def __init__(self, in_channels, out_channels, emb_channels, mode=None, attention=False, dropout=0.0,
                 resample_filter=(1, 3, 3, 1)):
        super().__init__()
        self.attention = attention
        C = out_channels
        self.norm0 = group_norm(in_channels)
        self.conv0 = xavier(ResampleConv(in_channels, C, 3, mode, resample_filter))
        self.affine = xavier(nn.Linear(emb_channels, C))
        self.norm1 = group_norm(C)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = xavier(nn.Conv2d(C, C, 3, padding=1), gain=1e-5)  # the block starts ~ its skip
        self.skip = None
        if in_channels != C or mode:
            self.skip = xavier(ResampleConv(in_channels, C, 1, mode, resample_filter))
        if attention:
            self.norm2 = group_norm(C)
            self.qkv = xavier(nn.Conv2d(C, 3 * C, 1), gain=math.sqrt(0.2))
            self.proj = xavier(nn.Conv2d(C, C, 1), gain=1e-5)

    def forward(self, x, emb):
        h = self.conv0(F.silu(self.norm0(x)))
        h = F.silu(self.norm1(h + self.affine(emb)[:, :, None, None]))
        h = self.conv1(self.dropout(h))
        x = (h + (x if self.skip is None else self.skip(x))) * SKIP_SCALE
        if self.attention:
            B, C, H, W = x.shape
            # qkv's 3C channels read as (C, 3): q, k, v of channel c are channels 3c, 3c + 1, 3c + 2.
            q, k, v = self.qkv(self.norm2(x)).reshape(B, C, 3, H * W).permute(2, 0, 3, 1)  # (B, HW, C)
            a = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v: (B, HW, C)
            x = (self.proj(a.transpose(1, 2).reshape(B, C, H, W)) + x) * SKIP_SCALE
        return x

class UNet(nn.Module):
    """F_theta(x_t, t, s, y, cond) on pixels: EDM's DDPM++ U-Net on the times t and t - s (CIFAR-10).

    cond: EDM's augmentation labels (B, augment_dim); None is no augmentation, the same as zeros."""
    def __init__(self, img_resolution=32, in_channels=3, model_channels=128, channel_mult=(2, 2, 2),
                 num_blocks=4, attn_resolutions=(16,), dropout=0.3, channel_mult_noise=2, num_classes=0,
                 augment_dim=6, resample_filter=(1, 3, 3, 1)):
        super().__init__()
        self.init_kwargs = constructor_args(locals())
        # Each time gets channel_mult_noise * model_channels features (EDM's DDPM++: 1; the released: 2).
        self.num_classes = num_classes
        self.noise_channels = channel_mult_noise * model_channels
        noise = 2 * self.noise_channels                                       # [emb(t), emb(t - s)]
        emb = 4 * model_channels                                              # EDM: channel_mult_emb = 4
        # Optional labels (CFG; row num_classes is null), added to the time features: N(0, 1) rows.
        self.map_label = nn.Embedding(num_classes + 1, noise) if num_classes > 0 else None
        self.map_augment = nn.Linear(augment_dim, noise, bias=False) if augment_dim > 0 else None
        if self.map_augment is not None:
            nn.init.xavier_uniform_(self.map_augment.weight)
        self.map_layer0 = xavier(nn.Linear(noise, emb))
        self.map_layer1 = xavier(nn.Linear(emb, emb))
        block = lambda cin, cout, **kw: UNetBlock(cin, cout, emb, dropout=dropout,  # noqa: E731
                                                  resample_filter=resample_filter, **kw)
        # Encoder: a 3x3 conv, then per resolution a downsampling block (below the top) and num_blocks blocks.
        top, cout, skips = f"{img_resolution}x{img_resolution}", model_channels, [model_channels]
        self.enc = nn.ModuleDict({f"{top}_conv": xavier(nn.Conv2d(in_channels, cout, 3, padding=1))})
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level > 0:
                self.enc[f"{res}x{res}_down"] = block(cout, cout, mode="down")
                skips.append(cout)
            for i in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{i}"] = block(cin, cout, attention=res in attn_resolutions)
                skips.append(cout)
        # Decoder: two middle blocks (the first with attention) at the bottom, an upsampling block above,
        # then num_blocks + 1 blocks that each take an encoder output; attention in the last one.
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = block(cout, cout, attention=True)
                self.dec[f"{res}x{res}_in1"] = block(cout, cout)
            else:
                self.dec[f"{res}x{res}_up"] = block(cout, cout, mode="up")
            for i in range(num_blocks + 1):
                cin, cout, attn = cout + skips.pop(), model_channels * mult, res in attn_resolutions
                self.dec[f"{res}x{res}_block{i}"] = block(cin, cout, attention=attn and i == num_blocks)
        self.dec[f"{top}_aux_norm"] = group_norm(cout)
        # Deviation: EDM starts aux_conv at 1e-5 x Xavier; exact zero makes F = 0, so f_theta = a x at init.
        self.dec[f"{top}_aux_conv"] = xavier(nn.Conv2d(cout, in_channels, 3, padding=1), gain=0)

    def forward(self, x, t, s, y=None, cond=None):
        if cond is not None and self.map_augment is None:
            raise ValueError("this UNet was built with augment_dim=0: pass cond=None")
        y = labels_or_null(y, x.shape[0], self.num_classes, x.device)
        nc = self.noise_channels
        emb = torch.cat([positional_embedding(t, nc), positional_embedding(t - s, nc)], dim=1)  # (B, 2 nc)
        if self.map_label is not None:
            emb = emb + self.map_label(y)
        if self.map_augment is not None:  # None as zero labels keeps map_augment in the graph (for DDP)
            cond = emb.new_zeros(len(x), self.map_augment.in_features) if cond is None else cond
            emb = emb + self.map_augment(cond)
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))  # (B, 4 model_channels)
        skips, h = [], x
        for block in self.enc.values():
            h = block(h, emb) if isinstance(block, UNetBlock) else block(h)
            skips.append(h)
        *blocks, (_, aux_norm), (_, aux_conv) = self.dec.items()
        for name, block in blocks:
            if "_block" in name:  # takes an encoder output
                h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, emb)
        return aux_conv(F.silu(aux_norm(h))).to(x.dtype)

# The released CIFAR-10 size (55,932,419 parameters) and a tiny one for tests on a CPU.
UNet_models = {
    "UNet-CIFAR10": partial(UNet, model_channels=128, channel_mult=(2, 2, 2), num_blocks=4,
                            attn_resolutions=(16,), dropout=0.3),
    "UNet-T": partial(UNet, model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(16,),
                      dropout=0.0),
}
NETWORKS = {"MLP": MLP, "DiT": DiT, "UNet": UNet}

# ----- Loading weights: our checkpoints and the released ones -----
def dit_kwargs_from_state_dict(sd):
    """DiT constructor arguments read off a state dict's shapes (the released checkpoints store no config)."""
    hidden, in_channels, patch, _ = sd["x_embedder.proj.weight"].shape
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    sizes = [size.keywords for size in DiT_models.values()]
    heads = {(k["depth"], k["hidden_size"]): k["num_heads"] for k in sizes}.get((depth, hidden))
    if heads is None:
        raise ValueError(f"no size in DiT_models has depth {depth} and width {hidden}: add it there")
    return dict(input_size=math.isqrt(sd["pos_embed"].shape[1]) * patch, patch_size=patch,
                in_channels=in_channels, hidden_size=hidden, depth=depth, num_heads=heads,
                mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
                num_classes=sd["y_embedder.embedding_table.weight"].shape[0] - 1)

def unet_kwargs_from_state_dict(sd):
    """UNet constructor arguments read off a released state dict's names and shapes.

    Dropout is not stored: it keeps its default (the released 0.3), which acts in training only."""
    conv = next((k for k in sd if k.startswith("enc.") and k.endswith("_conv.weight")), "enc.RxR_conv.weight")
    model_channels, in_channels = sd[conv].shape[:2]
    levels = sorted({int(k[4:].split("x")[0]) for k in sd if k.startswith("enc.")}, reverse=True)  # 32, 16
    top = f"dec.{levels[0]}x{levels[0]}_block"
    num_blocks = len({k.split(".")[1] for k in sd if k.startswith(top)}) - 1
    last = [f"dec.{r}x{r}_block{num_blocks}" for r in levels]  # per level, the block that may attend
    kernel = [v[0, 0] for k, v in sd.items() if k.endswith("resample_filter")]  # outer(f, f) / sum(f)^2
    return dict(img_resolution=levels[0], in_channels=in_channels, model_channels=model_channels,
                channel_mult=tuple(sd[f"{b}.conv1.weight"].shape[0] // model_channels for b in last),
                num_blocks=num_blocks,
                attn_resolutions=tuple(r for r, b in zip(levels, last) if f"{b}.qkv.weight" in sd),
                channel_mult_noise=sd["map_layer0.weight"].shape[1] // (2 * model_channels),
                num_classes=len(sd["map_label.weight"]) - 1 if "map_label.weight" in sd else 0,
                augment_dim=sd["map_augment.weight"].shape[1] if "map_augment.weight" in sd else 0,
                resample_filter=tuple((kernel[0][0] / kernel[0][0, 0]).tolist()) if kernel else (1, 3, 3, 1))

def check_state_dict(net, sd, source):
    """Raise an error that lists the missing keys, unexpected keys and shape mismatches, if there are any."""
    own = net.state_dict()
    problems = {"missing keys": [k for k in own if k not in sd],
                "unexpected keys": [k for k in sd if k not in own],
                "shape mismatches": [f"{k} (checkpoint {tuple(sd[k].shape)}, network {tuple(v.shape)})"
                                     for k, v in own.items() if k in sd and sd[k].shape != v.shape]}
    if any(problems.values()):
        lines = [f"  {name} ({len(keys)}): " + ", ".join(keys[:6]) + (", ..." if len(keys) > 6 else "")
                 for name, keys in problems.items() if keys]
        raise ValueError(f"{source} does not fit {type(net).__name__}(**{net.init_kwargs}):\n"
                         + "\n".join(lines) + "\nBuild the network with the arguments the checkpoint "
                         "was trained with, or load another file")

def hub_file(path):
    """hf://OWNER/REPO/FILE -> its copy in huggingface_hub's cache, downloaded once (an optional package)."""
    owner, repo, file = (str(path)[len("hf://"):].split("/", 2) + ["", "", ""])[:3]
    if not (owner and repo and file):
        raise ValueError(f"{path}: a hub path reads hf://OWNER/REPO/FILE, such as the authors' "
                         "hf://zlab-princeton/SoFlow/XL-2-cond/ckpts/1200000.pt")
    try:
        from huggingface_hub import hf_hub_download  # comes with diffusers
        return hf_hub_download(f"{owner}/{repo}", file)
    except Exception as e:                                           # no package, no network, no such file
        raise ValueError(f"cannot fetch {path} ({type(e).__name__}: {e}). Install huggingface_hub, or "
                         "download the file and pass its local path") from e

def load_network(path, use_ema=True):
    """A network in eval mode from our checkpoint or a released SoFlow DiT or U-Net; use_ema: EMA weights.

    path: a file or hf://OWNER/REPO/FILE. net.soflow_config: its SoFlowConfig (ours), or None (released files:
    theirs is the config.yaml beside ckpts/, read by training.released.released_config)."""
    local = hub_file(path) if str(path).startswith("hf://") else path
    try:  # weights_only: tensors and plain values, so a checkpoint cannot run code
        ckpt = torch.load(local, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise ValueError(f"no such file: {path}") from e
    except Exception as e:
        raise ValueError(f"{path} is not a PyTorch checkpoint of weights ({type(e).__name__}: "
                         f"{str(e).splitlines()[0]})") from e
    return network_from_checkpoint(ckpt, use_ema, path)

def network_from_checkpoint(ckpt, use_ema=True, path="the checkpoint"):
    """load_network's network from a checkpoint's dict (torch.load's), ours or released."""
    ours = isinstance(ckpt, dict) and "arch" in ckpt
    weights = (ckpt.get("ema_model") or ckpt.get("model")) if isinstance(ckpt, dict) and not ours else None
    released = isinstance(weights, dict) and any(str(k).startswith("network.") for k in weights)
    if not (ours or released):
        found = sorted(map(str, ckpt))[:10] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path} is not a SoFlow checkpoint: expected 'arch', 'arch_kwargs', 'model', 'ema' "
                         f"(ours) or 'model', 'ema_model' with 'network.' keys (released); found {found}")
    key = ("ema" if ours else "ema_model") if use_ema else "model"
    if (sd := ckpt.get(key)) is None:
        raise ValueError(f"{path} has no '{key}' weights" + ("; pass use_ema=False" if use_ema else ""))
    if ours:
        if ckpt["arch"] not in NETWORKS:
            raise ValueError(f"{path}: unknown arch {ckpt['arch']!r}; known: {sorted(NETWORKS)}")
        cls, kwargs = NETWORKS[ckpt["arch"]], ckpt["arch_kwargs"]
    else:
        sd = {k[len("network."):]: v for k, v in sd.items() if k.startswith("network.")}
        unet = "map_layer0.weight" in sd  # told apart by their keys: EDM's mapping layers, a patch embedder
        if not unet and "x_embedder.proj.weight" not in sd:
            raise ValueError(f"{path}: '{key}' has neither a released U-Net's map_layer0.weight "
                             "nor a released DiT's x_embedder.proj.weight")
        cls = UNet if unet else DiT
        try:
            kwargs = unet_kwargs_from_state_dict(sd) if unet else dit_kwargs_from_state_dict(sd)
        except KeyError as e:
            raise ValueError(f"{path}: cannot read the {cls.__name__} size, no key {e} in '{key}'") from e
    with torch.device("meta"):     # no random init: every tensor comes from the checkpoint
        net = cls(**kwargs)
    check_state_dict(net, sd, path)
    net.load_state_dict(sd, assign=True)    # assign keeps pos_embed's requires_grad=False
    net.soflow_config = SoFlowConfig(**ckpt["config"]) if ours and "config" in ckpt else None
    return net.eval()
