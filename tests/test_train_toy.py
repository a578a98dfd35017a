"""train_toy.py: the Gaussian mixture's exact velocities and solution map, the policy toy's exact law, toy
training and the demo."""
import math
import os
import subprocess
import sys

import pytest
import torch

import soflow
import train_toy


@pytest.fixture(scope="module")
def toy():
    return train_toy.GaussianMixture.ring(k=4, radius=1.5, std=0.3, num_classes=2)


# ----- The exact velocities and solution map -----

def test_toy_velocity_is_the_conditional_expectation(toy):
    """E[(alpha' x_0 + beta' x_1 - v(x_t, t)) phi(x_t)] = 0 for test functions phi (Eq. 1).

    Also per class (Eq. 17).
    """
    g = torch.Generator().manual_seed(0)
    n = 400_000
    x0, y = toy.sample(n, g)
    x1, t = torch.randn(n, 2, generator=g), torch.rand(n, generator=g)
    x_t, u = soflow.interpolate("linear", x0.double(), x1.double(), t.double())
    sign = (2 * y - 1).double()                                              # a test function of the label
    r_u, r_c = u - toy.velocity(x_t, t), u - toy.velocity(x_t, t, y)
    for phi in (torch.ones_like(sign), x_t[:, 0], torch.sin(2 * x_t[:, 1]), t.double()):
        assert r_u.mul(phi[:, None]).mean(0).abs().max() < 0.01
        assert r_c.mul(phi[:, None]).mean(0).abs().max() < 0.01
        assert r_c.mul((sign * phi)[:, None]).mean(0).abs().max() < 0.01
    assert r_u.mul((sign * x_t[:, 0])[:, None]).mean(0).abs().max() > 0.05   # Eq. 1 is not Eq. 17


def test_toy_guided_velocity_is_eq18(toy):
    x, t, y = torch.randn(10, 2), torch.rand(10), torch.randint(0, 2, (10,))
    v, v_c = toy.velocity(x, t), toy.velocity(x, t, y)
    assert torch.allclose(toy.velocity(x, t, y, w=3.0), 3 * v_c - 2 * v)


def test_toy_solution_boundary_pde_and_semigroup(toy):
    x = torch.randn(16, 2, dtype=torch.float64)
    t, s, l = 0.9, 0.1, 0.4
    assert torch.equal(toy.solution(x, t, t).double(), x.float().double())
    # Eq. 6 for the exact map: d1 f(x, t, s) v(x, t) + d2 f(x, t, s) = 0,
    # by central differences (float64 inside).
    h = 1e-4
    f = lambda z, tt: toy.solution(z, tt, s, steps=400).double()   # noqa: E731
    v = toy.velocity(x, torch.full((16,), t)).double()
    resid = (f(x + h * v, t) - f(x - h * v, t)) / (2 * h) + (f(x, t + h) - f(x, t - h)) / (2 * h)
    assert resid.abs().max() < 1e-2 and (f(x, t + h) - f(x, t - h)).abs().max() / (2 * h) > 0.1
    # f(f(x, t, l), l, s) = f(x, t, s)
    assert torch.allclose(toy.solution(toy.solution(x, t, l), l, s), toy.solution(x, t, s), atol=1e-5)


def test_toy_solution_pushes_noise_onto_the_data():
    toy = train_toy.GaussianMixture.ring(k=4, radius=2.0, std=0.1)
    x0 = toy.solution(torch.randn(4000, 2), 1.0, 0.0)
    dist = torch.cdist(x0.double(), toy.means).min(1).values
    assert dist.pow(2).mean() < 2 * 0.1 ** 2 * 1.2                          # E||x0 - mu||^2 = 2 sigma^2
    counts = torch.bincount(torch.cdist(x0.double(), toy.means).argmin(1), minlength=4).float() / 4000
    assert (counts - 0.25).abs().max() < 0.04


# ----- The policy toy: its modes, their probabilities, its sampler -----

def f64(values):
    return torch.tensor(values, dtype=torch.float64)


def test_policy_toy_modes_by_value():
    toy = train_toy.PolicyToy()                                   # g = (1, 0), A = 0.6, tau = 0.15
    obs = torch.tensor([[-1.0, 0.0], [-1.0, 0.15 * math.log(3)], [-1.0, 0.2]])
    probabilities = toy.mode_probabilities(obs)                   # sigmoid(o_y / tau): 1/2, 3/4, ...
    assert torch.allclose(probabilities[:, 0], f64([0.5, 0.75, 1 / (1 + math.exp(-0.2 / 0.15))]))
    assert torch.allclose(probabilities.sum(1), f64([1.0, 1.0, 1.0]))
    # The paths at o = (-1, 0.2), (2, 8, 2): u_k (g - o) = u_k (2, -0.2), then +A sin(pi u_k) in y (left), -A.
    paths = toy.mode_paths(obs[2:])[0]
    a = 0.6 * math.sin(math.pi / 4)                               # at u = 1/4
    assert torch.allclose(paths[:, 1], f64([[0.5, -0.05 + a], [0.5, -0.05 - a]]))
    assert torch.allclose(paths[:, 3], f64([[1.0, 0.5], [1.0, -0.7]]))         # u = 1/2: the widest
    assert torch.allclose(paths[:, 7], f64([[2.0, -0.2], [2.0, -0.2]]))        # u = 1: the goal
    mode, distance = toy.nearest_mode(paths.float() + torch.tensor([0.0, 0.03]), obs[2:].expand(2, 2))
    assert mode.tolist() == [0, 1] and torch.allclose(distance, f64([0.03, 0.03]))


def test_policy_toy_sampler_matches_its_law():
    """Per observation: each mode's share is P(mode | o), its chunks average its path, with sigma noise."""
    toy, n = train_toy.PolicyToy(), 40_000
    g = torch.Generator().manual_seed(0)
    for o in ([-1.1, -0.3], [-0.9, 0.05], [-1.0, 0.25]):
        obs = f64([o]).expand(n, 2)
        chunks, obs_out = toy.sample(n, g, obs)
        assert chunks.shape == (n, 8, 2) and chunks.dtype == torch.float32
        assert torch.equal(obs_out, obs.float())
        mode, _ = toy.nearest_mode(chunks, obs)                   # paths 24 sigma apart: the true mode
        p_left = float(toy.mode_probabilities(obs[:1])[0, 0])
        share = float((mode == 0).double().mean())
        assert abs(share - p_left) < 4 * math.sqrt(p_left * (1 - p_left) / n), (o, share, p_left)
        for m, path in enumerate(toy.mode_paths(obs[:1])[0]):
            residual = chunks[mode == m].double() - path          # (n_m, 8, 2)
            assert residual.mean(0).abs().max() < 4.5 * 0.05 / math.sqrt(len(residual)), (o, m)
            assert abs(float(residual.std()) / 0.05 - 1) < 0.02, (o, m)
    obs = toy.observe(10_000, g)                                  # uniform on the box
    assert obs.dtype == torch.float64
    assert bool((obs.min(0).values >= f64([-1.2, -0.4])).all())
    assert bool((obs.max(0).values <= f64([-0.8, 0.4])).all())
    assert torch.allclose(obs.mean(0), f64([-1.0, 0.0]), atol=0.01)


def test_toy_training_conditions_on_the_policy_observations(monkeypatch):
    """train_mlp passes a PolicyToy's observations as cond (and no labels); the mixture's as before."""
    seen = []
    loss_fn = train_toy.soflow_loss

    def recorded(net, x0, y=None, cond=None, **kw):
        seen.append((x0.shape, y, None if cond is None else cond.shape))
        return loss_fn(net, x0, y, cond, **kw)
    monkeypatch.setattr(train_toy, "soflow_loss", recorded)
    net = soflow.MLP(data_shape=(8, 2), cond_dim=2, hidden=16, depth=1)
    train_toy.train_mlp(train_toy.PolicyToy(), soflow.PRESETS["toy"], steps=2, batch=8, net=net)
    train_toy.train_mlp(train_toy.GaussianMixture.ring(), soflow.PRESETS["toy"], steps=1, batch=8,
                        net=soflow.MLP(hidden=16, depth=1))
    assert seen == [((8, 8, 2), None, (8, 2))] * 2 + [((8, 2), None, None)]


# ----- Training, where samples land, the demo -----

def test_training_lowers_the_one_step_error():
    """A short seeded run brings f_theta(x_1, 1, 0) at least 4x closer to the exact map than at init."""
    toy = train_toy.GaussianMixture.ring()
    x1 = torch.randn(2048, 2, generator=torch.Generator().manual_seed(1))
    exact = toy.solution(x1, 1.0, 0.0)
    net = soflow.MLP(hidden=64, depth=2)
    before = train_toy.map_error(x1, exact, lambda x: soflow.sample(net, x, config=soflow.PRESETS["toy"]))
    net = train_toy.train_mlp(toy, soflow.PRESETS["toy"], steps=300, batch=256, lr=3e-3, net=net)
    after = train_toy.map_error(x1, exact, lambda x: soflow.sample(net, x, config=soflow.PRESETS["toy"]))
    assert after < before / 4, (before, after)


def test_toy_training_warms_its_ema_up(monkeypatch):
    """The decay of its EMA at step k is min(decay, (1 + k) / (10 + k)): short runs forget the initial net."""
    decays = []
    update = train_toy.ema_update

    def recorded(ema, net, ema_decay):
        decays.append(ema_decay)
        update(ema, net, ema_decay)
    monkeypatch.setattr(train_toy, "ema_update", recorded)
    train_toy.train_mlp(train_toy.GaussianMixture.ring(), soflow.PRESETS["toy"], steps=200, batch=8,
                        ema_decay=0.99)
    assert decays == [min(0.99, (1 + k) / (10 + k)) for k in range(200)]
    assert decays[0] == 0.1                                 # the initial network keeps a tenth after step 0


def test_map_figures_by_hand():
    means = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    exact = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 0.0], [10.0, 0.0]])
    landed = torch.tensor([[0.0, 1.0], [10.0, 0.0], [9.0, 0.0], [10.0, 3.0]])    # the third crosses to mode 1
    figures = train_toy.map_figures(landed, exact, means)
    assert figures == dict(same_mode=0.75, median=2.0, mse=(1 + 0 + 81 + 9) / 4)    # distances 1, 0, 9, 3


@pytest.mark.slow
def test_demo_command(tmp_path):
    """`python train_toy.py` trains both models, prints every sampler's error and saves a figure.

    SoFlow's one step lands far closer to the exact map than one Euler step of flow matching trained for as
    long.
    """
    out = tmp_path / "fig.png"
    # a tiny MLP: on a busy machine, 2 threads wait on each other
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "train_toy.py", "--steps", "200", "--out", str(out)],
                         capture_output=True, text=True, timeout=300,
                         cwd=__file__.rsplit("/tests/", 1)[0], env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [line.rsplit(maxsplit=3) for line in run.stdout.splitlines()
            if line.startswith("  ") and "%" in line]
    figures = {name.strip(): (float(same[:-1]) / 100, float(median), float(mse))
               for name, same, median, mse in rows}
    assert len(figures) == 7 and all(math.isfinite(x) for row in figures.values() for x in row)
    soflow1, euler1 = figures["SoFlow, NFE=1"], figures["flow matching, Euler NFE=1"]
    assert soflow1[2] < euler1[2] / 3 and soflow1[1] < euler1[1] / 2, figures
    # On the ring one Euler step shrinks x_1 towards the centre along its own angle: the mode is often right.
    assert soflow1[0] > 0.75, figures
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
