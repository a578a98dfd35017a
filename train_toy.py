"""SoFlow on toys with an exact answer: a 2D Gaussian mixture (its solution map), a policy (its two modes).

    python train_toy.py      # under a minute on a CPU: SoFlow's one step against flow matching's Euler steps

It trains a small MLP with Algorithm 1 (soflow.py) and, for comparison, the same network with flow matching
alone (lam = 1), then prints where noise lands against the exact map f(x_1, 1, 0) and saves a figure of the
one-step samples and the learned paths. The notebook toy_2d.ipynb and the tests use both toys below.
"""
import argparse
import copy
import math
import os
import time
from dataclasses import replace
from functools import partial

import torch
from tqdm import trange

from soflow import MLP, PRESETS, SCHEDULES, per_sample, sample, sample_euler, soflow_loss, solution
from training.files import atomic_write
from training.loop import ema_decay_at, ema_update


# ----- A 2D toy with an exact answer: a mixture of Gaussians p(x_0) = sum_k pi_k N(mu_k, sigma^2 I) -----
# Given component k, (x_0, x_1, x_t) are jointly Gaussian, so E[x_0 | x_t, k] and E[x_1 | x_t, k] are
# linear in x_t, and the velocities of Eq. 1, 17 and 18 are posterior-weighted sums of linear maps.
# Integrating them accurately gives the true solution map f(x, t, s) that SoFlow learns.
class GaussianMixture:
    """Mixture of Gaussians with a class label per component; exact velocities and solution map (float64)."""
    def __init__(self, means, std=0.1, weights=None, classes=None, schedule="linear"):
        self.means = torch.as_tensor(means, dtype=torch.float64)               # mu_k, (K, D)
        self.std = float(std)
        self.schedule = schedule
        weights = torch.ones(len(self.means)) if weights is None else torch.as_tensor(weights)
        self.weights = (weights / weights.sum()).double()                     # pi_k, (K,)
        classes = torch.zeros(len(self.means), dtype=torch.long) if classes is None else classes
        self.classes = torch.as_tensor(classes)
        self.num_classes = int(self.classes.max()) + 1

    @classmethod
    def ring(cls, k=8, radius=2.0, std=0.15, num_classes=1):
        """k modes on a circle; with num_classes > 1 the classes alternate around it."""
        angles = 2 * math.pi * torch.arange(k) / k
        means = radius * torch.stack([angles.cos(), angles.sin()], 1)
        return cls(means, std, classes=torch.arange(k) % num_classes)

    def sample(self, n, generator=None):
        """(x_0, y): n samples (float32) and their class labels."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.means.shape[1], generator=generator, dtype=torch.float64)
        x0 = self.means[k] + self.std * noise
        return x0.float(), self.classes[k]

    def velocity(self, x, t, y=None, w=1.0):
        """Eq. 1 (y None, null), Eq. 17 (labels y), Eq. 18 (labels y, strength w: float or (B,)), x (B, D)."""
        schedule = SCHEDULES[self.schedule]
        x, t = x.double(), t.double()

        def coefficient(fn):                                                  # (B,) -> (B, 1, 1)
            return per_sample(fn(t), x)[..., None]
        a, b = coefficient(schedule.alpha), coefficient(schedule.beta)
        da, db = coefficient(schedule.d_alpha), coefficient(schedule.d_beta)
        var = a ** 2 * self.std ** 2 + b ** 2                                 # Var(x_t | k) per dimension
        offset = x[:, None] - a * self.means[None]                            # (B, K, D): x_t - E[x_t | k]
        x0_mean = self.means[None] + a * self.std ** 2 / var * offset         # E[x_0 | x_t, k]
        x1_mean = b / var * offset                                            # E[x_1 | x_t, k]
        v_k = da * x0_mean + db * x1_mean                                     # E[a'x_0 + b'x_1 | x_t, k]
        # log p(k | x_t) up to a constant: the log det of the covariance is the same for every k.
        logp = self.weights.log()[None] - (offset ** 2).sum(-1) / (2 * var[..., 0])          # (B, K)

        def average(mask):
            post = torch.softmax(logp.masked_fill(~mask, -math.inf), dim=1)   # p(k | x_t[, c])
            return (post[..., None] * v_k).sum(1)
        v = average(torch.ones_like(logp, dtype=torch.bool))
        if y is None:
            return v
        null = (y == self.num_classes)[:, None]                              # the null label: Eq. 1's v
        v_c = average((self.classes[None].to(y.device) == y[:, None]) | null)
        w = torch.as_tensor(w, dtype=torch.float64).reshape(-1, 1)                    # (B or 1, 1)
        return w * v_c + (1 - w) * v

    def solution(self, x, t, s, y=None, w=1.0, steps=200):
        """The exact solution map f(x, t, s) of Eq. 5: RK4 on the ODE of Eq. 2 in float64.

        t, s: floats or (B,). w: a float, or a function of t (B,) -> (B,) for the decayed guidance.
        """
        x = x.double()
        t, s = (torch.as_tensor(z, dtype=torch.float64).expand(x.shape[0]) for z in (t, s))
        strength = w if callable(w) else (lambda tau: w)

        def rate(z, u):                                                       # dz/du, tau = t + (s - t) u
            tau = t + (s - t) * u
            return (s - t)[:, None] * self.velocity(z, tau, y, strength(tau))
        h = 1.0 / steps
        for u in (i * h for i in range(steps)):
            k1 = rate(x, u)
            k2 = rate(x + h / 2 * k1, u + h / 2)
            k3 = rate(x + h / 2 * k2, u + h / 2)
            x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + rate(x + h * k3, u + h))
        return x.float()


# ----- A policy toy with an exact answer: pass an obstacle on the left or on the right -----
# An agent at the observed position o, left of a round obstacle at the origin, heads for the goal g beyond it.
# Its action chunk is its next 8 positions relative to o, (8, 2). It passes on the left (above, mode 0) with
# probability p(o) = sigmoid(o_y / tau), else on the right (below, mode 1); given the mode, for k = 1..8,
#   a_k = u_k (g - o) + side A sin(pi u_k) e_y + sigma eps_k,   u_k = k / 8, side = +1 or -1, eps_k ~ N(0, I).
# So p(chunk | o) is a mixture of two Gaussians whose weights and means (the two paths) are known for any o.
class PolicyToy:
    """Observation-conditioned action chunks from an exact bimodal law: the obstacle passed left or right."""
    horizon, action_dim, cond_dim = 8, 2, 2
    box = ((-1.2, -0.8), (-0.4, 0.4))                                       # where o lies: x range, y range

    def __init__(self, goal=(1.0, 0.0), radius=0.25, detour=0.6, tau=0.15, std=0.05):
        self.goal = torch.tensor(goal, dtype=torch.float64)                   # g
        self.radius, self.detour, self.tau, self.std = radius, detour, tau, std  # obstacle, A, tau, sigma

    def observe(self, n, generator=None):
        """n observations o, uniform on the box left of the obstacle, (n, 2) float64."""
        low, high = torch.tensor(self.box, dtype=torch.float64).T
        return low + (high - low) * torch.rand(n, 2, generator=generator, dtype=torch.float64)

    def mode_probabilities(self, obs):
        """(B, 2) float64: P(left | o) = sigmoid(o_y / tau) and P(right | o)."""
        left = torch.sigmoid(obs[:, 1].double() / self.tau)
        return torch.stack([left, 1 - left], 1)

    def mode_paths(self, obs):
        """(B, 2, 8, 2) float64: the mean chunk of each mode, left then right."""
        u = torch.arange(1, self.horizon + 1, dtype=torch.float64) / self.horizon         # u_k, (8,)
        straight = u[None, :, None] * (self.goal - obs.double())[:, None]                # (B, 8, 2)
        bump = self.detour * torch.sin(math.pi * u)[:, None] * torch.tensor([0.0, 1.0])  # A sin(pi u_k) e_y
        return torch.stack([straight + bump, straight - bump], 1)

    def sample(self, n, generator=None, obs=None):
        """(chunks, obs), float32: n chunks (n, 8, 2) drawn from p(chunk | o), at obs (n, 2) or random o."""
        obs = self.observe(n, generator) if obs is None else obs.double()
        mode = torch.bernoulli(self.mode_probabilities(obs)[:, 1], generator=generator).long()  # 1: right
        mean = self.mode_paths(obs)[torch.arange(n), mode]                               # (n, 8, 2)
        chunks = mean + self.std * torch.randn(mean.shape, generator=generator, dtype=torch.float64)
        return chunks.float(), obs.float()

    def nearest_mode(self, chunks, obs):
        """(mode, distance), (B,) each: the nearest mean path, and the RMS over k of ||a_k - its mean_k||."""
        offset = chunks.double()[:, None] - self.mode_paths(obs)                         # (B, 2, 8, 2)
        distance = offset.pow(2).sum(-1).mean(-1).sqrt()                                 # (B, 2)
        return distance.argmin(1), distance.min(1).values


# ----- Training an MLP on a toy, and how close it lands to the exact map -----
def train_mlp(toy, config, steps=1000, batch=512, lr=1e-3, ema_decay=0.99, seed=0, net=None, progress=False,
              teacher=None):
    """Algorithm 1 on toy data with Adam (labels if the config guides); returns the MLP's EMA in eval mode.

    A toy with a cond_dim (PolicyToy) conditions on its observations: pass an MLP built with that cond_dim.
    teacher: a velocity field v(x, t, y, cond) to distil (soflow.soflow_loss), such as exact_teacher(toy).
    ema_decay=None returns the weights themselves. On the toys the EMA lands markedly closer to the exact map,
    for flow matching too (benchmarks/toy_study.md)."""
    torch.manual_seed(seed)
    if net is None:
        net = MLP(hidden=128, depth=3, num_classes=toy.num_classes if config.w != 1 else 0)
    average = copy.deepcopy(net) if ema_decay else None
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for k in trange(steps, desc=f"lam={config.lam}", leave=False, disable=not progress):
        x0, c = toy.sample(batch)                                            # c: labels, or observations
        y = c if net.num_classes else None
        cond = c if getattr(toy, "cond_dim", 0) else None
        loss, _ = soflow_loss(net, x0, y, cond, config=config, step=k, total_steps=steps, teacher=teacher)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if average is not None:  # the EMA warms up: short runs forget the initial net
            ema_update(average, net, ema_decay_at(k, ema_decay))
    return (net if average is None else average).eval()

def exact_teacher(toy):
    """The mixture's exact velocity (Eq. 1; Eq. 17 with labels) as a teacher v(x, t, y, cond) to distil."""
    return lambda x, t, y=None, cond=None: toy.velocity(x, t, y).to(x.dtype)

def map_error(x1, x0_exact, fn):
    """E ||fn(x_1) - f(x_1, 1, 0)||^2: the distance of a sampler to the exact solution map."""
    return float(((fn(x1) - x0_exact) ** 2).sum(1).mean())

def map_figures(x0_hat, x0_exact, means):
    """How close samples land to the exact map's x0_exact = f(x_1, 1, 0): same mode, median, mean squared.

    Same mode: by the nearest mean. The first two are robust: a few samples near a border rule the mean."""
    def mode(x):
        return torch.cdist(x.double(), means.double()).argmin(1)
    distance = (x0_hat.double() - x0_exact.double()).norm(dim=1)
    return dict(same_mode=float((mode(x0_hat) == mode(x0_exact)).double().mean()),
                median=float(distance.quantile(0.5)), mse=float((distance ** 2).mean()))


# ----- The demo: SoFlow against flow matching on the 2D mixture -----
def main():
    parser = argparse.ArgumentParser(description="SoFlow vs flow matching on a 2D Gaussian mixture (CPU).")
    parser.add_argument("--steps", type=int, default=1000, help="training steps for each model")
    parser.add_argument("--out", default="soflow_toy.png", help="where to save the figure")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    toy, config = GaussianMixture.ring(), PRESETS["toy"]
    fm_config = replace(config, lam=1.0)                                        # lam = 1: flow matching only
    start = time.time()
    soflow_net = train_mlp(toy, config, args.steps, seed=args.seed, progress=True)
    fm_net = train_mlp(toy, fm_config, args.steps, seed=args.seed, progress=True)
    print(f"trained SoFlow and flow matching, {args.steps} steps each, in {time.time() - start:.0f} s")
    x1 = torch.randn(4096, 2, generator=torch.Generator().manual_seed(1))
    x0_exact = toy.solution(x1, 1.0, 0.0)
    print("where 4096 noise samples land against the exact map f(x_1, 1, 0): same mode, median, mean squared")
    print(f"  {'sampler':<32}{'same mode':>10}{'median':>8}{'MSE':>8}")
    # Two steps chained through t = 0.3, not 0.5: the modes are mostly decided above t = 0.3, and the slice
    # s = 0.5 is rarely trained (benchmarks/toy_study.md), so a stop there adds a second error where it costs.
    samplers = {"SoFlow, NFE=1": partial(sample, soflow_net, config=config),
                "SoFlow, NFE=2": partial(sample, soflow_net, config=config, times=[1, 0.3, 0], mode="chain")}
    for k in (1, 2, 4, 8, 50):
        samplers[f"flow matching, Euler NFE={k}"] = partial(sample_euler, fm_net, config=fm_config, steps=k)
    for name, sampler in samplers.items():
        figures = map_figures(sampler(x1), x0_exact, toy.means)
        print(f"  {name:<32}{figures['same_mode']:>10.1%}{figures['median']:>8.3f}{figures['mse']:>8.3f}")
    # Figure: one-step samples over the data; learned paths s -> f_theta(x_1, 1, s) over the exact ones.
    import matplotlib.pyplot as plt  # with no display, matplotlib falls back to its Agg backend
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 5.5), layout="tight")
    ax0.scatter(*toy.sample(2000)[0].T, s=2, c="0.6", label="data")
    ax0.scatter(*sample(soflow_net, x1[:2000], config=config).T, s=2, c="C1", label="SoFlow, one step")
    ax0.legend(loc="upper right", markerscale=5)
    x, grid = x1[:40], torch.linspace(1, 0, 41).tolist()
    ones = torch.ones(len(x))
    learned = torch.stack([solution(soflow_net, x, ones, s * ones, config=config).detach() for s in grid])
    exact = [x]
    for t, s in zip(grid[:-1], grid[1:]):  # one pass that records its states
        exact.append(toy.solution(exact[-1], t, s, steps=5))
    exact = torch.stack(exact)
    ax1.plot(*exact.permute(2, 0, 1), c="k", lw=1)
    ax1.plot(*learned.permute(2, 0, 1), c="C1", lw=1, ls="--")
    ax1.scatter(*exact[-1].T, c="k", s=8)  # where the exact paths end: data
    ax0.set(title="one-step samples")
    ax1.set(title="f(x_1, 1, s), s from 1 to 0: exact (black), learned (orange)")
    for ax in (ax0, ax1):
        ax.set(aspect="equal", xlim=(-3.5, 3.5), ylim=(-3.5, 3.5))
    image_format = os.path.splitext(args.out)[1][1:] or "png"
    atomic_write(args.out, lambda tmp: fig.savefig(tmp, dpi=100, format=image_format))
    print(f"figure saved to {args.out}")


if __name__ == "__main__":
    main()
