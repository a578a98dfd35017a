"""Mutation check: does the suite notice when soflow.py is wrong?

Each mutant is a deliberate single-line error in a copy of soflow.py (an equation, a constant from the paper or
the released code, a sampler or schedule branch, the batch split, the EMA, the networks' time and label inputs,
the training loop). The fast tests of its section run against it; a mutant that passes them all survives, and
names a gap in the suite. Run on demand, not in CI:

    python tests/mutants.py              # every mutant: about 10 min on 2 cores
    python tests/mutants.py --only eq16  # the mutants whose name contains eq16
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Each section runs the tests that should catch its mutants (-x: the first failure decides).
SECTIONS = {
    "method": ["tests/test_soflow.py"],
    "networks": ["tests/test_networks.py", "tests/test_unet.py"],
    "training": ["tests/test_training.py"],
    "processes": ["tests/test_train_cifar.py"],          # the 2-process runs (marked slow) included
}

# (name, section, the line as it is, the line as the mutant has it): each "as it is" occurs once in soflow.py.
MUTANTS = [
    ("schedule-linear-alpha", "method", "def alpha(self, t): return 1 - t", "def alpha(self, t): return 1 + t"),
    ("schedule-triangular-dbeta", "method", "return math.pi / 2 * torch.cos(math.pi / 2 * t)",
     "return math.pi / 2 * torch.sin(math.pi / 2 * t)"),
    ("eq4-velocity", "method", "v_t = per_sample(schedule.d_alpha(t), x0) * x0",
     "v_t = per_sample(schedule.alpha(t), x0) * x0"),
    ("param-euler-b", "method", "def b(self, t, s): return s - t", "def b(self, t, s): return t - s"),
    ("param-triangular-db", "method", "torch.full_like(t, math.pi / 2)", "torch.full_like(t, math.pi)"),
    ("param-f-from-F", "method", "per_sample(param.b(t, s), x) * F_out", "per_sample(param.a(t, s), x) * F_out"),
    ("eq10-velocity", "method", "per_sample(param.db_ds(t), x) * F_out", "per_sample(param.b(t, t), x) * F_out"),
    ("logit-normal-mean", "method", "torch.randn(n, device=device) * sd + mu", "torch.randn(n, device=device) * sd"),
    ("r-exp", "method", "return cfg.r_init * (cfg.r_end / cfg.r_init) ** progress",
     "return cfg.r_end * (cfg.r_end / cfg.r_init) ** progress"),
    ("r-cosine", "method", "0.5 * (1 + math.cos(math.pi * progress))", "0.5 * (1 - math.cos(math.pi * progress))"),
    ("r-linear", "method", "return cfg.r_init + (cfg.r_end - cfg.r_init) * progress",
     "return cfg.r_end + (cfg.r_end - cfg.r_init) * progress"),
    ("r-constant", "method", "    return cfg.r_end                              ", "    return cfg.r_init       "),
    ("t-clamp", "method", ".clamp(min=1e-4)", ".clamp(min=1e-3)"),
    ("s-clamp", "method", "logit_normal(n, cfg.s_mu, cfg.s_sd, device), t - 1e-4)",
     "logit_normal(n, cfg.s_mu, cfg.s_sd, device), t - 1e-2)"),
    ("eq16-side", "method", "l = torch.minimum(t + (s - t) * r, t - 1e-4)", "l = torch.minimum(t - (s - t) * r, t - 1e-4)"),
    ("eq12-exponent", "method", "(mse.detach() + cfg.eps) ** cfg.p)", "(mse.detach() + cfg.eps) ** (cfg.p / 2))"),
    ("eq12-constant-weight", "method", "(mse.detach() + cfg.eps) ** cfg.p)", "(mse + cfg.eps) ** cfg.p)"),
    ("eq14-step", "method", "x_l = x_t + per_sample(l - t, x_t) * v", "x_l = x_t + per_sample(t - l, x_t) * v"),
    ("eq13-quotient", "method", "dq = (f_t - f_l) / per_sample(t - l, x_t)", "dq = (f_t - f_l) / per_sample(t - s, x_t)"),
    ("eq15-exponent", "method", "weight = 1 / (mse + cfg.eps) ** cfg.p", "weight = 1 / (mse + cfg.eps) ** (2 * cfg.p)"),
    ("eq14-sign-b", "method", "sign_b = torch.sign(PARAMETERIZATIONS[cfg.param].b(t, s))", "sign_b = torch.ones_like(t)"),
    ("dropout-masks", "method", "with torch.random.fork_rng(devices=devices), torch.no_grad():",
     "with torch.no_grad():"),
    ("decay-exp-constant", "method", "1 - torch.exp(-0.025 * d / (1 - d))", "1 - torch.exp(-0.05 * d / (1 - d))"),
    ("decay-linear", "method", "return d.clamp(0, 1)", "return d.clamp(0, 0.5)"),
    ("decay-start", "method", "d = (1 - t) / (1 - cfg.decay_t)", "d = (1 - t) / (1 - 0.9)"),
    ("eq18-strength", "method", "return 1 + guidance_decay(t, cfg) * (cfg.w - 1)",
     "return cfg.w * guidance_decay(t, cfg)"),
    ("eq18-direction", "method", "* (v_t - v_uncond)", "* (v_uncond - v_t)"),
    ("eq19-mix", "method", "(1 - per_sample(m, v_cfg)) * v_guided", "(1 - per_sample(m, v_cfg)) * v_cfg"),
    ("null-label", "method", "return torch.where(keep, y, num_classes)", "return torch.where(keep, y, 0)"),
    ("dropped-rows-unmixed", "method", "m = torch.where(keep, cfg.m, 1.0)", "m = torch.where(keep, cfg.m, cfg.m)"),
    ("v-uncond-label", "method", "torch.full_like(y, unwrap(net).num_classes)", "y.clone()"),
    ("label-drop-rate", "method", ">= cfg.drop if labelled", "< cfg.drop if labelled"),
    ("alg1-split", "method", "n_fm = int(cfg.lam * B)", "n_fm = math.ceil(cfg.lam * B)"),
    ("alg1-fm-share", "method", "loss = loss + loss_fm.mean() * n_fm / B", "loss = loss + loss_fm.mean()"),
    ("alg1-fm-s-equals-t", "method", "s = torch.cat([d.t_fm, d.s])", "s = torch.cat([0 * d.t_fm, d.s])"),
    ("alg1-fm-own-guided", "method", "mix_velocity(v_cfg[fm], v_pred.detach(), m[fm])",
     "mix_velocity(v_cfg[fm], v_t[fm], m[fm])"),
    ("sample-chain", "method", "x = solution(net, x, t, torch.full_like(t, t_next), y, cond, cfg=cfg)",
     "x = solution(net, x, t, torch.zeros_like(t), y, cond, cfg=cfg)"),
    ("sample-renoise", "method", "per_sample(schedule.beta(s), x) * noise", "per_sample(schedule.alpha(s), x) * noise"),
    ("sample-grid", "method", "        times = torch.linspace(1, 0, steps + 1)\n",
     "        times = torch.linspace(1, 0.02, steps + 1)\n"),
    ("sample-euler", "method", "x = x + (t_next - t_i) * velocity", "x = x + (t_i - t_next) * velocity"),
    ("dit-gap", "networks", "c = self.t_embedder(t) + self.s_embedder(t - s) + self.y_embedder(y)",
     "c = self.t_embedder(t) + self.s_embedder(s) + self.y_embedder(y)"),
    ("dit-label", "networks", "c = self.t_embedder(t) + self.s_embedder(t - s) + self.y_embedder(y)",
     "c = self.t_embedder(t) + self.s_embedder(t - s)"),
    ("dit-sinusoid-order", "networks", "torch.cat([torch.cos(args), torch.sin(args)], dim=-1)",
     "torch.cat([torch.sin(args), torch.cos(args)], dim=-1)"),
    ("dit-adaln", "networks", "x * (1 + scale[:, None]) + shift[:, None]", "x * scale[:, None] + shift[:, None]"),
    ("unet-gap", "networks", "positional_embedding(t - s, nc)", "positional_embedding(s, nc)"),
    ("unet-label", "networks", "emb = emb + self.map_label(y)", "emb = emb + 0 * self.map_label(y)"),
    ("unet-augment", "networks", "emb = emb + self.map_augment(cond)", "emb = emb + 0 * self.map_augment(cond)"),
    ("unet-skip-scale", "networks", "SKIP_SCALE = math.sqrt(0.5)", "SKIP_SCALE = 0.5"),
    ("unet-fir-up-gain", "networks", "F.conv_transpose2d(x, 4 * kernel", "F.conv_transpose2d(x, 2 * kernel"),
    ("ema-direction", "method", "e.lerp_(p.detach().to(e.dtype), 1 - decay)", "e.lerp_(p.detach().to(e.dtype), decay)"),
    ("ema-every", "training", "ema_update(ema, net, args.ema_decay ** args.ema_every)",
     "ema_update(ema, net, args.ema_decay)"),
    ("micro-batch-weight", "training", "(loss * len(x0) / total_rows).backward()", "loss.backward()"),
    ("epoch-shuffle", "training", "manual_seed(seed * 100_003 + epoch)", "manual_seed(seed * 100_003)"),
    ("resume-rng", "training", "set_rng_state(ckpt[\"rng\"][rank])", "pass"),
    ("rank-rng", "processes", "set_rng_state(ckpt[\"rng\"][rank])", "set_rng_state(ckpt[\"rng\"][0])"),
    ("rank-seed", "processes", "torch.manual_seed(args.global_seed * world_size + rank)",
     "torch.manual_seed(args.global_seed)"),
]


def run(name, section, old, new, workdir, source):
    """'caught' or 'SURVIVED', and the seconds it took."""
    if source.count(old) != 1:
        raise SystemExit(f"mutant {name}: {old!r} occurs {source.count(old)} times in soflow.py; make it unique")
    (workdir / "soflow.py").write_text(source.replace(old, new))
    marker = [] if section == "processes" else ["-m", "not slow"]
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *marker, *SECTIONS[section]]
    start = time.time()
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    return ("caught" if result.returncode != 0 else "SURVIVED"), time.time() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run the mutants whose name contains this")
    args = parser.parse_args()
    source = (ROOT / "soflow.py").read_text()
    chosen = [m for m in MUTANTS if args.only in m[0]]
    survivors = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for item in ["tests", "pytest.ini", "train_cifar.py", "benchmarks"]:
            copy = shutil.copytree if (ROOT / item).is_dir() else shutil.copy
            copy(ROOT / item, workdir / item)
        print(f"{len(chosen)} mutants of soflow.py, each against the fast tests of its section")
        for name, section, old, new in chosen:
            verdict, seconds = run(name, section, old, new, workdir, source)
            print(f"  {name:<24} {section:<10} {verdict:<9} {seconds:5.1f} s", flush=True)
            if verdict == "SURVIVED":
                survivors.append(name)
    print(f"{len(chosen) - len(survivors)} of {len(chosen)} caught; survived: {', '.join(survivors) or 'none'}")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
