"""soflow.py, equation by equation in the paper's order.

Closed forms, autograd, finite differences and an exact solution map (Gaussian data, in closed form). The file
imports soflow alone of the project: the method's tests travel with the method file.
"""
import math
from dataclasses import replace
from functools import partial

import pytest
import torch
import torch.nn as nn

import soflow

torch.set_default_dtype(torch.float32)


def random_mlp(dtype=torch.float64, **kw):
    """An MLP whose output layer is not zero, so F_theta is a smooth non-trivial function."""
    torch.manual_seed(0)
    net = soflow.MLP(hidden=32, depth=2, **kw).to(dtype)
    nn.init.normal_(net.out[1].weight, std=0.5)
    nn.init.normal_(net.out[1].bias, std=0.5)
    return net


def make_config(param="euler", schedule="linear", **kw):
    """The released ImageNet configuration with another parameterization, schedule or values."""
    return replace(soflow.PRESETS["imagenet"], param=param, schedule=schedule, **kw)


class GaussianData:
    """2D data N(mu, sigma^2 I), labelled 0 or 1 at random, under the linear schedule (1 - t) x_0 + t x_1.

    x_t ~ N(m_t, sd_t^2 I) with m_t = (1 - t) mu and sd_t^2 = (1 - t)^2 sigma^2 + t^2. The marginal velocity
    E[x_1 - x_0 | x_t = x] = -mu + (t - (1 - t) sigma^2) / sd_t^2 (x - m_t) carries each point along its
    quantile, so the solution map is affine: f(x, t, s) = m_s + sd_s / sd_t (x - m_t)."""
    def __init__(self, mu=(1.0, -0.5), sigma=0.3):
        self.mu, self.sigma = torch.tensor(mu, dtype=torch.float64), sigma

    def mean_sd(self, t):
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1)
        return (1 - t) * self.mu, ((1 - t) ** 2 * self.sigma ** 2 + t ** 2).sqrt()

    def solution(self, x, t, s):
        (m_t, sd_t), (m_s, sd_s) = self.mean_sd(t), self.mean_sd(s)
        return m_s + sd_s / sd_t * (x.double() - m_t)

    def velocity(self, x, t):
        m_t, sd_t = self.mean_sd(t)
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1)
        return -self.mu + (t - (1 - t) * self.sigma ** 2) / sd_t ** 2 * (x.double() - m_t)

    def sample(self, n):
        x0 = self.mu + self.sigma * torch.randn(n, 2, dtype=torch.float64)
        return x0.float(), torch.randint(0, 2, (n,))


@pytest.fixture(scope="module")
def toy():
    return GaussianData()


def test_the_gaussian_solution_map_solves_the_ode_and_composes():
    """Its velocity is d/ds f(x, t, s) at s = t (central differences); f(f(x, t, u), u, s) = f(x, t, s)."""
    data, x, h = GaussianData(), torch.randn(16, 2, dtype=torch.float64), 1e-5
    for t in (0.9, 0.5, 0.1):
        dsolution = (data.solution(x, t, t + h) - data.solution(x, t, t - h)) / (2 * h)
        torch.testing.assert_close(data.velocity(x, t), dsolution, rtol=1e-6, atol=1e-6)
    twice = data.solution(data.solution(x, 1.0, 0.4), 0.4, 0.0)
    torch.testing.assert_close(twice, data.solution(x, 1.0, 0.0))
    # Monte Carlo: x_t of data and noise has the moments the map carries the noise to.
    x0, x1 = GaussianData().sample(200_000)[0].double(), torch.randn(200_000, 2, dtype=torch.float64)
    mapped = data.solution(x1, 1.0, 0.3)
    x_t = 0.7 * x0 + 0.3 * x1
    torch.testing.assert_close(mapped.mean(0), x_t.mean(0), atol=1e-2, rtol=0)
    torch.testing.assert_close(mapped.std(0), x_t.std(0), atol=1e-2, rtol=0)


# ----- Noising schedules (Sec. 3) and parameterizations (Sec. 4.2) -----

@pytest.mark.parametrize("name", ["linear", "triangular"])
def test_schedule_boundaries_and_derivatives(name):
    sch = soflow.SCHEDULES[name]
    t = torch.linspace(0, 1, 11, dtype=torch.float64, requires_grad=True)
    assert torch.allclose(sch.alpha(t[[0, -1]]), torch.tensor([1.0, 0.0], dtype=torch.float64), atol=1e-12)
    assert torch.allclose(sch.beta(t[[0, -1]]), torch.tensor([0.0, 1.0], dtype=torch.float64), atol=1e-12)
    for f, df in [(sch.alpha, sch.d_alpha), (sch.beta, sch.d_beta)]:
        (grad,) = torch.autograd.grad(f(t).sum(), t)
        assert torch.allclose(df(t), grad, atol=1e-12)


@pytest.mark.parametrize("name", ["linear", "triangular"])
def test_interpolation_and_its_velocity_eq4(name):
    """x_t = alpha_t x_0 + beta_t x_1, and v_t = d x_t / dt by autograd: the conditional velocity (Eq. 4)."""
    sch = soflow.SCHEDULES[name]
    x0, x1 = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    t = torch.rand(6, dtype=torch.float64, requires_grad=True)
    x_t, v_t = soflow.interpolate(name, x0, x1, t)
    torch.testing.assert_close(x_t, sch.alpha(t)[:, None] * x0 + sch.beta(t)[:, None] * x1)
    # Row i of x_t depends on t_i alone: the gradient of <x_t, e_j> summed over rows is d x_t[:, j] / dt.
    for j in range(3):
        (d_xt,) = torch.autograd.grad(x_t[:, j].sum(), t, retain_graph=True)
        torch.testing.assert_close(v_t[:, j], d_xt, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["euler", "triangular"])
def test_parameterization_boundary_and_derivatives(name):
    P = soflow.PARAMETERIZATIONS[name]
    t = torch.rand(7, dtype=torch.float64)
    s = t.clone().requires_grad_(True)
    assert torch.allclose(P.a(t, t), torch.ones_like(t)) and torch.allclose(P.b(t, t), torch.zeros_like(t))
    (da,) = torch.autograd.grad((P.a(t, s) + 0 * s).sum(), s)          # Euler: a does not depend on s
    (db,) = torch.autograd.grad(P.b(t, s).sum(), s)
    assert torch.allclose(P.da_ds(t), da, atol=1e-12) and torch.allclose(P.db_ds(t), db, atol=1e-12)


@pytest.mark.parametrize("param", ["euler", "triangular"])
def test_solution_is_identity_at_s_equals_t(param):
    net, x, t = random_mlp(), torch.randn(5, 2, dtype=torch.float64), torch.rand(5, dtype=torch.float64)
    assert net(x, t, t).abs().min() > 0                                     # F is not zero, yet
    assert torch.equal(soflow.solution(net, x, t, t, config=make_config(param)), x)  # f(x, t, t) = x exactly


@pytest.mark.parametrize("param", ["euler", "triangular"])
def test_velocity_eq10_is_derivative_of_f_in_s(param):
    net, x = random_mlp(), torch.randn(5, 2, dtype=torch.float64)
    t, h = torch.rand(5, dtype=torch.float64) * 0.8 + 0.1, 1e-5
    fd = (soflow.solution(net, x, t, t + h, config=make_config(param))
          - soflow.solution(net, x, t, t - h, config=make_config(param))) / (2 * h)
    assert torch.allclose(soflow.velocity(net, x, t, config=make_config(param)), fd, atol=1e-7)


# ----- Time sampling and r(k, K) (App. A) -----

@pytest.mark.parametrize("kind", ["exp", "cosine", "linear", "constant"])
def test_r_schedule_end_points_and_monotone(kind):
    config = make_config(r_schedule=kind, r_init=0.1, r_end=0.002)
    r = [soflow.r_schedule(k, 100, config) for k in range(0, 121)]
    assert r[0] == pytest.approx(0.002 if kind == "constant" else 0.1)
    assert r[100] == pytest.approx(0.002) and r[120] == pytest.approx(0.002)   # past K it stays at r_end
    assert all(b <= a + 1e-15 for a, b in zip(r, r[1:]))
    if kind != "constant":
        assert r[50] < r[0] and r[100] < r[50]
    with pytest.raises(ValueError, match="unknown r_schedule 'step'; choose one of 'exp', 'cosine'"):
        make_config(r_schedule="step")


@pytest.mark.parametrize("r", [1.0, 0.1, 1e-3, 1e-7])
def test_consistency_times_are_ordered(r):
    torch.manual_seed(0)
    config = soflow.PRESETS["cifar10"]                                       # mu_s = -4: many s near 0
    t, s, l = soflow.consistency_times(20000, r, config)
    assert (s >= 0).all() and (s <= l + 1e-7).all() and (l <= t - 1e-4 + 1e-7).all() and (t >= 1e-4).all()
    if r < 1:                                                                # s = l only where s was clamped
        assert ((s < l) | (s >= t - 1e-4 - 1e-7)).all() and (s < l).any()
    # the clamp l <= t - 1e-4 is active
    if r == 1e-7:
        assert torch.allclose(l, t - 1e-4)


def test_consistency_times_clamp_at_1e_4():
    """t below 1e-4 is raised to exactly 1e-4 (the released code's floor), and then s = l = t - 1e-4 = 0."""
    torch.manual_seed(0)
    t, s, l = soflow.consistency_times(100, 0.5, make_config(t_mu=-12.0, t_sd=0.1))  # sigmoid(-12) ~ 6e-6
    assert torch.all(t == torch.tensor(1e-4)) and torch.all(s <= 0) and torch.allclose(l, t - 1e-4)


# ----- The flow matching and solution consistency losses (Eq. 11-15), against hand computations -----

class Fixed(nn.Module):
    """A 'network' whose output is a fixed tensor times a parameter, for hand computations."""
    def __init__(self, out):
        super().__init__()
        self.out, self.scale = out, nn.Parameter(torch.tensor(1.0, dtype=out.dtype))
        self.num_classes = 0

    def forward(self, x, t, s, y=None, cond=None):
        return self.scale * self.out[: x.shape[0]]


def test_fm_loss_by_hand():
    x_t = torch.tensor([[1.0, 2.0], [0.5, -1.0]], dtype=torch.float64)
    F_out = torch.tensor([[0.0, 1.0], [2.0, 2.0]], dtype=torch.float64)
    v = torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    t, mix = torch.tensor([0.3, 0.6], dtype=torch.float64), torch.tensor([1.0, 0.25], dtype=torch.float64)
    # Triangular: v_theta = 0 * x + pi/2 * F. Row 1: v_mix = v; row 2: v_mix = 0.25 v + 0.75 v_theta.
    vt = math.pi / 2 * F_out
    vmix = torch.stack([v[0], 0.25 * v[1] + 0.75 * vt[1]])
    mse = ((vt - vmix) ** 2).mean(1)
    w = 1 / (math.pi / 2 * (mse + 0.1) ** 0.5)
    config = make_config("triangular", p=0.5, eps=0.1)
    net = Fixed(F_out)
    v_pred = soflow.velocity(net, x_t, t, config=config)
    v_mix = soflow.mix_velocity(v, v_pred.detach(), mix)                    # as Algorithm 1 builds it
    loss, got_mse, got_w = soflow.fm_loss(v_pred, v_mix, t, config)
    assert torch.allclose(got_mse, mse) and torch.allclose(got_w, w) and torch.allclose(loss, w * mse)
    # The weight is a constant and the mixed-in guided velocity has no gradient: d loss / d scale = w * d mse.
    loss.sum().backward()
    expected = (w * ((2 * (vt - vmix) * vt).mean(1))).sum()
    assert torch.allclose(net.scale.grad, expected)


def test_scm_loss_by_hand_and_gradient_matches_eq14_with_eq15():
    torch.manual_seed(0)
    for param in ["euler", "triangular"]:
        net = random_mlp()
        B = 6
        x_t, v = torch.randn(B, 2, dtype=torch.float64), torch.randn(B, 2, dtype=torch.float64)
        t = torch.rand(B, dtype=torch.float64) * 0.5 + 0.5
        s = t * torch.rand(B, dtype=torch.float64) * 0.5
        l = t - 0.05 * (t - s)
        p, eps = 0.75, 1e-3
        loss, mse, w = soflow.scm_loss(net, x_t, t, s, l, v, config=make_config(param, p=p, eps=eps))
        # By hand: the target is f at x_l = x_t + v (l - t), without gradient.
        x_l = x_t + (l - t)[:, None] * v
        f_l = soflow.solution(net, x_l, l, s, config=make_config(param)).detach()
        f_t = soflow.solution(net, x_t, t, s, config=make_config(param))
        dq = (f_t.detach() - f_l) / (t - l)[:, None]
        assert torch.allclose(mse, (dq ** 2).mean(1))
        assert torch.allclose(w, 1 / ((dq ** 2).mean(1) + eps) ** p)
        # Eq. 14 with Eq. 15's weight (weight held constant): its gradient is twice that of the returned loss.
        w15 = (1 / ((t - l) * soflow.PARAMETERIZATIONS[param].b(t, s).abs())
               / (((f_t.detach() - f_l) ** 2).mean(1) / (t - l) ** 2 + eps) ** p)
        eq14 = (w15 * ((f_t - f_l) ** 2).mean(1)).sum()
        g14 = torch.autograd.grad(eq14, list(net.parameters()))
        g = torch.autograd.grad(loss.sum(), list(net.parameters()))
        for a, b in zip(g14, g):
            assert torch.allclose(a, 2 * b, rtol=1e-6, atol=1e-9)


# ----- Classifier-free guidance (Eq. 17-19) -----

def test_guided_target_is_eq18_where_decay_is_one():
    config = soflow.PRESETS["imagenet"]
    v, vu = torch.randn(5, 3), torch.randn(5, 3)
    t = torch.tensor([0.0, 0.2, 0.5, 0.7, 0.8])                              # t <= decay_t: g = 1
    assert torch.allclose(soflow.guided_target(v, vu, t, config), config.w * v + (1 - config.w) * vu,
                          atol=1e-6)
    v_mix = soflow.mix_velocity(soflow.guided_target(v, vu, t, config), v, torch.ones(5))
    assert torch.allclose(v_mix, config.w * v + (1 - config.w) * vu, atol=1e-6)    # m = 1: Eq. 18 exactly
    assert torch.allclose(soflow.guided_target(v, vu, torch.ones(5), config), v)     # t = 1: no guidance


@pytest.mark.parametrize("kind", ["exp", "linear"])
def test_guidance_decay(kind):
    t = torch.linspace(0, 1, 1001)
    g = soflow.guidance_decay(t, make_config(decay=kind, decay_t=0.8))
    assert torch.allclose(g[t <= 0.8], torch.ones(1)) and g[-1] == 0
    assert (g[1:] <= g[:-1] + 1e-7).all() and g[900] < 1                      # falls over (0.8, 1]
    if kind == "linear":
        assert torch.allclose(g[900], torch.tensor(0.5), atol=1e-4)


@pytest.mark.parametrize("kind", ["exp", "linear"])
def test_decay_time_1_means_no_decay_as_the_released_cifar10_file(kind):
    # cfg_decay_time: 1.0 in the released cifar.yaml: g = 1 everywhere, t = 1 included (no 0 / 0).
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert torch.equal(soflow.guidance_decay(t, make_config(decay=kind, decay_t=1.0)), torch.ones_like(t))
    assert soflow.PRESETS["cifar10"].decay_t == 1.0


# ----- Hyperparameters -----

def test_config_is_validated_with_the_valid_choices():
    for field, value in [("schedule", "cosine"), ("param", "sigmoid"), ("decay", "step")]:
        with pytest.raises(ValueError, match=f"unknown {field} '{value}'; choose one of"):
            make_config(**{field: value})
    for field, value in [("lam", 1.5), ("lam", -0.1), ("m", 2.0), ("drop", -1.0), ("p", -0.5), ("eps", -1e-3),
                         ("decay_t", 1.5)]:
        with pytest.raises(ValueError, match=f"{field} = {value} is outside"):
            make_config(**{field: value})
    assert make_config(lam=0.0, p=0.0, eps=0.0).lam == 0.0                        # the edges are allowed


def test_released_constants_by_value():
    """Values fixed by the released code, each against its definition: the smooth decay's 0.025, l on the
    segment from t towards s (Eq. 16), and the flow matching share int(lambda B), rounded down."""
    t = torch.tensor([0.9, 0.95, 0.5], dtype=torch.float64)
    d = (1 - t) / (1 - 0.8)
    expected = torch.where(t > 0.8, 1 - torch.exp(-0.025 * d / (1 - d)), torch.ones_like(t))
    torch.testing.assert_close(soflow.guidance_decay(t, make_config()), expected, rtol=1e-12, atol=0)
    torch.manual_seed(0)
    t, s, l = soflow.consistency_times(1000, 0.25, make_config())
    free = l < t - 1e-4                                                      # where the clamp is not active
    assert free.float().mean() > 0.5
    torch.testing.assert_close(l[free], (t + 0.25 * (s - t))[free])          # l = t + (s - t) r
    for B, lam, n_fm in [(10, 0.75, 7), (7, 0.5, 3), (8, 0.25, 2), (3, 0.99, 2), (5, 1.0, 5), (5, 0.0, 0)]:
        d = soflow.draw(torch.zeros(B, 2), make_config(lam=lam), 0.1, labelled=False)
        assert len(d.t_fm) == n_fm and len(d.t) == B - n_fm, (B, lam)


# ----- Algorithm 1 -----

def recording(monkeypatch, name):
    """Wrap soflow.<name> to record the arguments of every call."""
    calls, fn = [], getattr(soflow, name)

    def wrapper(*args, **kw):
        calls.append((args, kw, fn(*args, **kw)))
        return calls[-1][2]
    monkeypatch.setattr(soflow, name, wrapper)
    return calls


def test_cfg_targets_in_algorithm1(monkeypatch, toy):
    """Kept labels get the guided target with mix m.

    Dropped labels get the null label and the plain velocity.
    """
    torch.manual_seed(0)
    net = random_mlp(torch.float32, num_classes=2)
    config = replace(soflow.PRESETS["imagenet"], lam=1.0, m=0.25)
    x0, y = toy.sample(64)
    d = soflow.draw(x0, config, 0.1, labelled=True)
    d.keep[:10] = False
    calls = recording(monkeypatch, "cfg_targets")
    soflow.soflow_loss(net, x0, y, config=config, step=0, total_steps=1, draws=d)
    args, _, (target, mix, _) = calls[0]
    x_t, t, v_t, y_used = args[1:5]
    x_t_ref, v = soflow.interpolate("linear", x0, d.x1, d.t_fm)
    assert torch.equal(x_t, x_t_ref) and torch.equal(v_t, v)
    v_unc = soflow.velocity(net, x_t_ref, d.t_fm, torch.full_like(y, 2), config=config).detach()
    w = soflow.guidance_strength(d.t_fm, config)[:, None]
    keep = d.keep
    assert torch.allclose(target[~keep], v[~keep])
    assert torch.all(mix[~keep] == 1) and torch.all(y_used[~keep] == 2)
    assert torch.allclose(target[keep], (w * v + (1 - w) * v_unc)[keep], atol=1e-5)
    assert torch.all(mix[keep] == 0.25) and torch.equal(y_used[keep], y[keep])


def test_algorithm1_rejects_labels_it_cannot_use(toy):
    x0, y = toy.sample(8)
    with pytest.raises(ValueError, match="unconditional network"):
        soflow.soflow_loss(random_mlp(torch.float32), x0, y, config=soflow.PRESETS["imagenet"], step=0,
                           total_steps=1)
    # the null label would stay untrained
    with pytest.raises(ValueError, match="needs label dropping"):
        soflow.soflow_loss(random_mlp(torch.float32, num_classes=2), x0, y,
                           config=replace(soflow.PRESETS["imagenet"], drop=0.0), step=0, total_steps=1)


def test_algorithm1_is_weighted_sum_of_the_two_losses(toy):
    torch.manual_seed(0)
    net = random_mlp(torch.float64, num_classes=2)
    config = replace(soflow.PRESETS["imagenet"], lam=0.25, m=0.5)
    x0, y = toy.sample(40)
    x0 = x0.double()
    d = soflow.draw(x0, config, 0.05, labelled=True)
    calls = []                                                               # (gradient on?, rows) per call
    net.register_forward_hook(lambda mod, inp, out: calls.append((torch.is_grad_enabled(), inp[0].shape[0])))
    loss, diag = soflow.soflow_loss(net, x0, y, config=config, step=0, total_steps=1, draws=d)
    # Three network calls: CFG (v_uncond for all 40 rows, v_guided for the 30 consistency rows), one student
    # pass for both losses, the consistency target pass.
    assert calls == [(False, 70), (True, 40), (False, 30)]
    n = 10
    x_t, v = soflow.interpolate("linear", x0, d.x1, torch.cat([d.t_fm, d.t]))
    y_in = torch.where(d.keep, y, 2)
    t_all = torch.cat([d.t_fm, d.t])
    v_unc = soflow.velocity(net, x_t, t_all, torch.full_like(y, 2), config=config).detach()
    v_gui = soflow.velocity(net, x_t, t_all, y_in, config=config).detach()
    target = torch.where(d.keep[:, None], soflow.guided_target(v, v_unc, t_all, config), v)
    mix = torch.where(d.keep, 0.5, 1.0).double()
    v_pred = soflow.velocity(net, x_t[:n], d.t_fm, y_in[:n], config=config)      # Eq. 10, with gradient
    v_fm = mix[:n, None] * target[:n] + (1 - mix[:n, None]) * v_pred.detach()
    l_fm = soflow.fm_loss(v_pred, v_fm, d.t_fm, config)[0].mean()
    v_scm = mix[n:, None] * target[n:] + (1 - mix[n:, None]) * v_gui[n:]
    l_scm = soflow.scm_loss(net, x_t[n:], d.t, d.s, d.l, v_scm, y_in[n:], config=config)[0].mean()
    assert torch.allclose(loss, 0.25 * l_fm + 0.75 * l_scm, rtol=1e-10)
    params = list(net.parameters())                                          # and so are the gradients
    for g, g_ref in zip(torch.autograd.grad(loss, params),
                        torch.autograd.grad(0.25 * l_fm + 0.75 * l_scm, params)):
        assert torch.allclose(g, g_ref, rtol=1e-9, atol=1e-12)
    assert set(diag) >= {"loss", "fm_mse", "fm_weight", "scm_mse", "scm_weight"}


def test_dropout_masks_shared_between_student_and_target(toy):
    torch.manual_seed(0)
    net = soflow.MLP(hidden=64, depth=2, dropout=0.5).train()
    records = []
    for m in net.modules():
        if isinstance(m, nn.Dropout):
            m.register_forward_hook(lambda mod, inp, out: records.append(
                (torch.is_grad_enabled(), out.shape[0], (out != 0) | (inp[0] == 0))))
    x0, _ = toy.sample(16)
    soflow.soflow_loss(net, x0, config=replace(soflow.PRESETS["toy"], lam=0.5), step=0, total_steps=10)
    # FM pass, target pass, SCM student
    fm, target, student = records[:2], records[2:4], records[4:]
    assert [r[0] for r in records] == [True, True, False, False, True, True]
    for a, b, c in zip(target, student, fm):
        assert torch.equal(a[2], b[2])                                       # same masks
        assert not torch.equal(a[2], c[2])                                   # fresh masks elsewhere


def test_conditioning_vector_trains(toy):
    """Algorithm 1 passes cond through every network call: the conditioning layer receives a gradient."""
    net = soflow.MLP(hidden=32, depth=1, cond_dim=3)
    nn.init.normal_(net.out[1].weight)
    x0 = toy.sample(16)[0]
    loss, _ = soflow.soflow_loss(net, x0, cond=torch.randn(16, 3), config=soflow.PRESETS["toy"], step=0,
                                 total_steps=1)
    loss.backward()
    assert net.cond_proj.weight.grad.abs().sum() > 0
    # And the value it trains on: another cond gives another loss on the same draws.
    draws = soflow.draw(x0, soflow.PRESETS["toy"], 0.5, labelled=False)
    losses = [soflow.soflow_loss(net, x0, cond=c, config=soflow.PRESETS["toy"], step=0, total_steps=1,
                                 draws=draws)[0] for c in (torch.zeros(16, 3), torch.ones(16, 3))]
    assert abs(losses[0].item() - losses[1].item()) > 1e-6


def test_labels_are_dropped_at_the_configured_rate():
    torch.manual_seed(0)
    for drop in (0.1, 0.5):
        keep = soflow.draw(torch.zeros(20000, 2), make_config(drop=drop), 0.1, labelled=True).keep
        assert abs(keep.float().mean().item() - (1 - drop)) < 0.01, drop
    assert soflow.draw(torch.zeros(8, 2), make_config(), 0.1, labelled=False).keep is None


# ----- Sampling, against the exact solution map -----

class Oracle(nn.Module):
    """F such that a x + b F is the toy's exact solution map (and its velocity at s = t)."""
    def __init__(self, toy, param="euler"):
        super().__init__()
        self.toy, self.param, self.num_classes = toy, param, 0

    def forward(self, x, t, s, y=None, cond=None):
        P = soflow.PARAMETERIZATIONS[self.param]
        if torch.equal(t, s):                                                # v = d_2 b F at s = t (Eq. 10)
            return self.toy.velocity(x, t).to(x.dtype) / P.db_ds(t)[:, None]
        return ((self.toy.solution(x, t, s).to(x.dtype) - P.a(t, s)[:, None] * x)
                / P.b(t, s)[:, None])


@pytest.mark.parametrize("param", ["euler", "triangular"])
def test_one_step_and_chained_sampling_reproduce_the_exact_map(toy, param):
    x1 = torch.randn(64, 2, dtype=torch.float64)
    exact = toy.solution(x1, 1.0, 0.0)
    net = Oracle(toy, param)
    config = make_config(param)
    assert torch.allclose(soflow.sample(net, x1, config=config), exact, atol=1e-4)
    chained = soflow.sample(net, x1, times=[1.0, 0.7, 0.2, 0.0], config=config, mode="chain")
    assert torch.allclose(chained, exact, atol=1e-4)
    assert torch.allclose(soflow.sample_euler(net, x1, steps=400, config=config), exact, atol=2e-2)


def test_renoise_sampler_follows_its_definition(toy):
    net, x1, times = Oracle(toy), torch.randn(32, 2, dtype=torch.float64), [1.0, 0.6, 0.3, 0.0]
    torch.manual_seed(5)
    got = soflow.sample(net, x1, times=times, mode="renoise", config=make_config())
    torch.manual_seed(5)
    x = x1
    for t_i, t_next in zip(times[:-1], times[1:]):
        x0_hat = toy.solution(x, t_i, 0.0)
        x = (1 - t_next) * x0_hat + t_next * torch.randn_like(x)
    assert torch.allclose(got, x, atol=1e-6)
    # differs from chaining
    assert not torch.allclose(got, soflow.sample(net, x1, times=times, mode="chain", config=make_config()),
                              atol=1e-3)


def test_renoise_sampler_takes_given_noise(toy):
    """eps[i] replaces the fresh noise of step i.

    The same noise gives the same samples, without the global RNG.
    """
    net, x1, times = Oracle(toy), torch.randn(8, 2, dtype=torch.float64), [1.0, 0.6, 0.3, 0.0]
    eps = torch.randn(2, 8, 2, dtype=torch.float64)
    torch.manual_seed(5)
    expected = soflow.sample(net, x1, times=times, mode="renoise", config=make_config())
    torch.manual_seed(5)
    drawn = [torch.randn_like(x1) for _ in range(2)]
    assert not torch.allclose(expected, soflow.sample(net, x1, times=times, mode="renoise",
                                                      config=make_config(), eps=eps))
    state = torch.get_rng_state()
    got = soflow.sample(net, x1, times=times, mode="renoise", config=make_config(), eps=torch.stack(drawn))
    assert torch.equal(torch.get_rng_state(), state)                         # no draw from the global RNG
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_sampling_rejects_bad_grids():
    net = random_mlp(torch.float32)
    with pytest.raises(ValueError, match="times must decrease strictly"):
        soflow.sample(net, torch.randn(2, 2), times=[0.0, 1.0], config=make_config())
    with pytest.raises(ValueError, match="unknown sampling mode"):
        soflow.sample(net, torch.randn(2, 2), mode="ddim", config=make_config())


# ----- Distillation from a teacher (Sec. 4.2) -----

def test_the_exact_solution_map_is_a_fixed_point_of_distillation_from_the_exact_velocity(toy):
    """Oracle net and exact teacher: L_FM's error is 0 and L_SCM's is O(t - l); from data both are O(1),
    since the conditional velocity alpha'_t x_0 + beta'_t x_1 is the marginal one plus noise."""
    torch.manual_seed(0)
    x0 = toy.sample(256)[0].double()
    teacher = lambda x, t, y=None, cond=None: toy.velocity(x, t)  # noqa: E731
    for lam, mse in ((1.0, "fm_mse"), (0.0, "scm_mse")):      # the Oracle's F at s = t and s < t differ
        config = make_config(lam=lam, r_init=1e-3, r_end=1e-3)
        d = soflow.draw(x0, config, 1e-3, labelled=False)
        d.s = torch.minimum(d.s, d.t / 2)                       # s < l < t: the Oracle divides by b(l, s)
        d.l = d.t + (d.s - d.t) * 1e-3
        _, distilled = soflow.soflow_loss(Oracle(toy), x0, config=config, step=0, total_steps=1, draws=d,
                                          teacher=teacher)
        _, from_data = soflow.soflow_loss(Oracle(toy), x0, config=config, step=0, total_steps=1, draws=d)
        assert distilled[mse] < (1e-20 if lam == 1 else 1e-6) and from_data[mse] > 0.01, (mse, distilled)


def test_a_teacher_of_the_conditional_velocity_changes_nothing(toy):
    """A teacher that returns alpha'_t x_0 + beta'_t x_1 itself: the same loss, gradients and random stream,
    so the teacher enters where v_t did and nowhere else."""
    net = random_mlp(torch.float64, num_classes=0)
    x0 = toy.sample(32)[0].double()
    config = make_config(lam=0.5)
    torch.manual_seed(3)
    d = soflow.draw(x0, config, 0.1, labelled=False)
    t = torch.cat([d.t_fm, d.t])
    v_t = soflow.interpolate("linear", x0, d.x1, t)[1]
    results = []
    for teacher in (None, lambda x, t, y, cond: v_t.clone()):
        torch.manual_seed(4)
        loss, _ = soflow.soflow_loss(net, x0, config=config, step=2, total_steps=10, draws=d, teacher=teacher)
        results.append((loss, torch.autograd.grad(loss, list(net.parameters())), torch.rand(3)))
    (loss_a, grads_a, rand_a), (loss_b, grads_b, rand_b) = results
    assert torch.equal(loss_a, loss_b) and torch.equal(rand_a, rand_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))


@pytest.mark.parametrize("lam", [1.0, 0.0])
def test_the_teacher_velocity_is_the_target_and_the_step_to_x_l(toy, lam):
    """F = 0 (a fresh MLP) gives closed forms: v_theta = 0, so fm_mse = mean(v_T^2); f = x_t, so
    dq = (x_t - x_l) / (t - l) = v_T and scm_mse = mean(v_T^2), for a teacher v_T(x, t) = 3 x + t."""
    net = soflow.MLP(hidden=16, depth=1).double()
    x0 = toy.sample(64)[0].double()
    config = make_config(lam=lam)
    d = soflow.draw(x0, config, 0.1, labelled=False)
    t = torch.cat([d.t_fm, d.t])
    x_t = soflow.interpolate("linear", x0, d.x1, t)[0]
    teacher = lambda x, t, y, cond: 3 * x + t[:, None]  # noqa: E731
    _, diagnostics = soflow.soflow_loss(net, x0, config=config, step=0, total_steps=1, draws=d,
                                        teacher=teacher)
    expected = ((3 * x_t + t[:, None]) ** 2).mean(1).mean()
    assert torch.allclose(diagnostics["fm_mse" if lam == 1 else "scm_mse"], expected, rtol=1e-10)


@pytest.mark.parametrize("m", [1.0, 0.5])
def test_with_cfg_the_teacher_gives_both_velocities_of_eq18(toy, m):
    """F = 0 and flow matching rows: the target is m (w v_T(c) + (1 - w) v_T(null)) where the label is kept
    (Eq. 18-19, v_guided = 0) and v_T(null) where it is dropped; teacher v_T(x, t, y) = (y + 1) x."""
    net = soflow.MLP(hidden=16, depth=1, num_classes=2)
    x0, y = toy.sample(64)
    config = make_config(lam=1.0, w=2.5, m=m, drop=0.3, decay="none")
    d = soflow.draw(x0, config, 0.1, labelled=True)
    x_t = soflow.interpolate("linear", x0, d.x1, d.t_fm)[0]
    calls = []

    def teacher(x, t, labels, cond):
        calls.append(labels.clone())
        return (labels[:, None] + 1.0) * x
    _, diagnostics = soflow.soflow_loss(net, x0, y, config=config, step=0, total_steps=1, draws=d,
                                        teacher=teacher)
    v_null = 3.0 * x_t                                                 # null label 2
    v_c = (y[:, None] + 1.0) * x_t
    target = torch.where(d.keep[:, None], m * (2.5 * v_c - 1.5 * v_null), v_null)
    assert torch.allclose(diagnostics["fm_mse"], (target ** 2).mean(1).mean(), rtol=1e-5)
    # Two passes over the batch: the labels (the null label where dropped), then the null label everywhere.
    assert len(calls) == 2 and torch.equal(calls[0], torch.where(d.keep, y, 2))
    assert bool((calls[1] == 2).all())


def test_the_teacher_costs_one_pass_per_row_two_with_cfg_and_takes_the_students_unconditional_pass(toy):
    """Rows through each network's no-grad passes, B = 40 and n_fm = 30: the teacher B, or 2 B with CFG; the
    student its consistency target pass (B - n_fm) and, with CFG and m < 1, v_guided's pass (B - n_fm)."""
    class Counting(soflow.MLP):
        def forward(self, x, *args):
            self.rows += 0 if torch.is_grad_enabled() else len(x)
            return super().forward(x, *args)
    x0, y = toy.sample(40)
    for w, m, teacher_rows, student_rows in [(1.0, 1.0, 40, 10), (2.0, 1.0, 80, 10), (2.0, 0.5, 80, 20)]:
        config = make_config(lam=0.75, w=w, m=m)
        student, teacher = (Counting(hidden=8, depth=1, num_classes=2) for _ in range(2))
        student.rows = teacher.rows = 0
        loss, _ = soflow.soflow_loss(student, x0, y, config=config, step=0, total_steps=1,
                                     teacher=partial(soflow.velocity, teacher, config=config))
        assert (teacher.rows, student.rows) == (teacher_rows, student_rows), (w, m)
        loss.backward()
        assert all(p.grad is None for p in teacher.parameters())
