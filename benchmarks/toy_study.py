"""What makes SoFlow's one-step map good on small 2D problems at a fixed training budget (2,000 steps).

    OMP_NUM_THREADS=1 python -m benchmarks.toy_study            # screening + final runs, writes toy_study.md
    OMP_NUM_THREADS=1 python -m benchmarks.toy_study --quick    # a smoke run of a few seconds
    OMP_NUM_THREADS=1 python -m benchmarks.toy_study --settings base ema0.999 --seeds 0 1 2

Each setting is the study's starting point, PRESETS["toy"] as it was before the study (s_mu = -1; the study
moved it to -2), and the demo's network and optimiser, with a few changes. SoFlow is compared with flow
matching (the same config with lam = 1, the same network, as many steps) sampled with 1, 2, 4, 8 Euler steps.
Every sample is judged against the exact solution map f(x_1, 1, 0) of the mixture on a fixed noise: the share
of samples in the mode the exact map picks, the median distance to the exact endpoint, and the mean squared
distance.
Runs are cached as JSON lines keyed by training, so a rerun resumes instead of retraining.
"""
import argparse
import copy
import json
import os
import statistics
import time
from dataclasses import asdict, replace

import torch

import soflow
import train_toy
import training.loop

# Tiny networks: one thread is as fast, and the study must not crowd a shared machine.
torch.set_num_threads(1)


# ----- The mixtures -----
def unequal():
    """(a) 5 modes with unequal weights and spacing: two close pairs and a lone heavy mode."""
    means = [(-2.0, 0.5), (-1.3, -1.4), (0.4, 2.0), (1.1, 1.3), (2.2, -0.9)]
    return train_toy.GaussianMixture(means, std=0.15, weights=[0.35, 0.1, 0.25, 0.1, 0.2])


def centre():
    """(b) a ring of 6 and a heavy mode near the centre, where the noise is densest."""
    ring = train_toy.GaussianMixture.ring(k=6, radius=2.0).means
    means = torch.cat([ring, torch.tensor([[0.2, -0.1]], dtype=torch.float64)])
    return train_toy.GaussianMixture(means, std=0.15, weights=[1] * 6 + [2])


def guided():
    """(c) 6 modes on a ring in 3 classes (opposite modes share a class), unequal weights,
    trained with CFG."""
    ring = train_toy.GaussianMixture.ring(k=6, radius=2.0, std=0.15, num_classes=3)
    return train_toy.GaussianMixture(ring.means, std=0.15, weights=[3, 1, 2, 1, 2, 3], classes=ring.classes)


# CFG on (c): w = 2 with the default decay, dropping 10% of labels to train the null label's velocity.
GUIDED = dict(w=2.0, drop=0.1, m=1.0)
MIXTURES = {"a-unequal": (unequal, {}), "b-centre": (centre, {}), "c-guided": (guided, GUIDED)}


# ----- The settings: changes to START (config), the network (hidden, depth), lr, and the EMA evaluated -----
# Fixed, so that the settings and the cache keep their meaning.
START = replace(soflow.PRESETS["toy"], s_mu=-1.0)
# ema: an EMA of the weights is evaluated instead of the raw weights (bias-corrected, see debias).
BASE = dict(config={}, hidden=128, depth=3, lr=1e-3, ema=None)
SETTINGS = {
    "base": {},
    "ema0.99": dict(ema=0.99),
    "ema0.999": dict(ema=0.999),
    "lr3e-3": dict(lr=3e-3),
    "t-high": dict(config=dict(t_mu=0.8)),                    # more consistency pairs start near the noise
    "s-low": dict(config=dict(s_mu=-2.0)),                    # more pairs end near the data
    "s-low+ema0.99": dict(config=dict(s_mu=-2.0), ema=0.99),
    "s-low+ema0.999": dict(config=dict(s_mu=-2.0), ema=0.999),
    "s-lower": dict(config=dict(s_mu=-3.0)),
    "s-lower+ema0.99": dict(config=dict(s_mu=-3.0), ema=0.99),
    "lam0.75": dict(config=dict(lam=0.75)),
    "lam0.25": dict(config=dict(lam=0.25)),
    "p1": dict(config=dict(p=1.0)),
    "eps1e-2": dict(config=dict(eps=1e-2)),
    "r-end0.001": dict(config=dict(r_end=0.001)),
    "triangular": dict(config=dict(param="triangular")),
    "wide": dict(hidden=256),
    "deep": dict(depth=5),
}
# Screened on one seed (EMA settings reuse the training of the setting without EMA).
SCREEN = ["base", "ema0.99", "ema0.999", "lr3e-3", "t-high", "s-low", "s-low+ema0.99", "s-low+ema0.999",
          "lam0.75", "lam0.25", "s-lower", "s-lower+ema0.99", "p1", "eps1e-2", "r-end0.001", "triangular",
          "wide", "deep"]
FINAL = ["base", "ema0.99", "ema0.999", "s-low", "s-low+ema0.99", "s-low+ema0.999", "s-lower",
         "s-lower+ema0.99"]                                    # three seeds each
MECHANISM = ["base", "s-low+ema0.99"]                          # the 2-step table
EMAS = (0.99, 0.999)                                           # every run tracks both; a setting picks one
MIDS = (0.8, 0.5, 0.3)                                         # intermediate times of the 2-step samplers


def setting(name):
    s = {**BASE, **SETTINGS[name]}
    return {**s, "config": {**BASE["config"], **s["config"]}}


def setting_config(s, mixture, fm):
    config = replace(START, **s["config"], **MIXTURES[mixture][1])
    return replace(config, lam=1.0) if fm else config


def train_key(s, mixture, seed, steps, fm):
    """What a trained network depends on (not the EMA evaluated): runs that share it share the cache."""
    fields = asdict(setting_config(s, mixture, fm))
    if fm:   # flow matching reads none of the consistency loss's times: settings that change only those
        times = ("t_mu", "t_sd", "s_mu", "s_sd", "r_schedule", "r_init", "r_end")
        fields = {k: v for k, v in fields.items() if k not in times}
    # "cfg": the name the cached runs were keyed with (a new name would retrain them all).
    key = dict(method="fm" if fm else "soflow", mixture=mixture, seed=seed, steps=steps, cfg=fields,
               hidden=s["hidden"], depth=s["depth"], lr=s["lr"])
    return json.dumps(key, sort_keys=True)


# ----- Training: train_toy.train_mlp's loop (same draws, same raw weights) plus EMAs of the weights -----
def train(toy, config, steps, seed, hidden, depth, lr, batch=512):
    torch.manual_seed(seed)
    net = soflow.MLP(hidden=hidden, depth=depth, num_classes=toy.num_classes if config.w != 1 else 0)
    start = copy.deepcopy(net)
    emas = {d: copy.deepcopy(net) for d in EMAS}
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for k in range(steps):
        x0, y = toy.sample(batch)
        y = y if net.num_classes else None
        loss, _ = soflow.soflow_loss(net, x0, y, config=config, step=k, total_steps=steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for d, ema in emas.items():
            training.loop.ema_update(ema, net, d)
    return {"raw": net.eval(), **{str(d): debias(ema, start, d ** steps).eval() for d, ema in emas.items()}}


@torch.no_grad()
def debias(ema, start, w0):
    """Remove the initial weights from an EMA: after K steps they still weigh d^K (0.999^2000 = 0.14), and the
    zero-initialised output layer would pull the map towards the identity. (ema - d^K theta_0) / (1 - d^K) is
    the EMA over the trained weights alone, as Adam corrects its moments."""
    for e, p in zip(ema.parameters(), start.parameters()):
        e.sub_(w0 * p).div_(1 - w0)
    return ema


# ----- The judge -----
def nearest_mode(x, means):
    return torch.cdist(x.double(), means).argmin(1)


def judge(x, target, toy):
    """train_toy.map_figures (the share of samples in the exact map's mode, the median distance and the mean
    squared distance to it), and the total variation between the mode shares of x and of the exact map (a
    distribution-level figure, fair to samplers that re-noise and so are not meant to follow the deterministic
    map sample by sample)."""
    figures = train_toy.map_figures(x, target, toy.means)
    k, k_exact = nearest_mode(x, toy.means), nearest_mode(target, toy.means)

    def hist(k):
        return torch.bincount(k, minlength=len(toy.means)).double() / len(k)
    return dict(share=figures["same_mode"], median=figures["median"], mse=figures["mse"],
                tv=float(0.5 * (hist(k) - hist(k_exact)).abs().sum()))


class Problem:
    """A mixture, its fixed evaluation noise and labels, and the exact map computed once (also to the MIDS
    times)."""
    def __init__(self, mixture, n, ode_steps):
        make, extra = MIXTURES[mixture]
        self.toy = make()
        g = torch.Generator().manual_seed(1)
        self.x1 = torch.randn(n, 2, generator=g)
        self.guided = "w" in extra
        config = replace(START, **extra)
        # The strength the network is trained to at each t (decayed near the noise), so that target and
        # training agree.
        self.w = lambda tau: soflow.guidance_strength(tau.float(), config).double()
        self.y = self.toy.sample(n, generator=g)[1] if self.guided else None
        self.exact = self.solve(self.x1, 1.0, 0.0, ode_steps)
        self.mid = {s: self.solve(self.x1, 1.0, s, ode_steps) for s in MIDS}
        self.renoise_eps = [torch.randn(n, 2, generator=g)]
        self.ode_steps = ode_steps

    def solve(self, x, t, s, ode_steps):
        return self.toy.solution(x, t, s, self.y, w=self.w if self.guided else 1.0, steps=ode_steps)


@torch.no_grad()
def evaluate(nets, config, problem, fm):
    """{weights: {sampler: figures}} for the raw weights and each EMA."""
    x1, y, p = problem.x1, problem.y, problem
    out = {}
    for name, net in nets.items():
        r = {}
        if fm:
            for k in (1, 2, 4, 8):
                x0 = soflow.sample_euler(net, x1, y, config=config, steps=k)
                r[f"euler{k}"] = judge(x0, p.exact, p.toy)
        else:
            r["1"] = judge(soflow.sample(net, x1, y, config=config), p.exact, p.toy)
            for s in MIDS:
                times = [1.0, s, 0.0]
                r[f"chain@{s}"] = judge(soflow.sample(net, x1, y, config=config, times=times, mode="chain"),
                                        p.exact, p.toy)
                r[f"renoise@{s}"] = judge(soflow.sample(net, x1, y, config=config, times=times,
                                                        mode="renoise", eps=p.renoise_eps), p.exact, p.toy)
                # The two legs of the chain apart: the first against the exact f(x_1, 1, s), the second
                # started from the exact point at s, so that each leg's own error shows.
                ones = torch.ones(len(x1))
                leg1 = soflow.solution(net, x1, ones, s * ones, y, config=config).detach()
                r[f"leg1@{s}"] = judge(leg1, p.mid[s], p.toy)
                leg2 = soflow.solution(net, p.mid[s].float(), s * ones, 0 * ones, y, config=config).detach()
                r[f"leg2@{s}"] = judge(leg2, p.exact, p.toy)
                # The first leg's error carried to the data by the exact map (costs ODE solves).
                if name != "0.99":
                    exact2 = p.solve(leg1, s, 0.0, max(round(p.ode_steps * s), 1))
                    r[f"exact2@{s}"] = judge(exact2, p.exact, p.toy)
        out[name] = r
    return out


# ----- Cache -----
def load_cache(path):
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return {rec["key"]: rec for rec in map(json.loads, f) if rec}


def run(key, s, mixture, seed, steps, fm, problems, cache, path, ode_steps, n):
    if key in cache:
        return cache[key]
    if mixture not in problems:
        problems[mixture] = Problem(mixture, n, ode_steps)
    config = setting_config(s, mixture, fm)
    start = time.time()
    nets = train(problems[mixture].toy, config, steps, seed, s["hidden"], s["depth"], s["lr"])
    seconds = time.time() - start
    os.makedirs(path + ".nets", exist_ok=True)   # the weights, for a later look without retraining
    torch.save({k: v.state_dict() for k, v in nets.items()}, os.path.join(path + ".nets", f"{len(cache)}.pt"))
    results = evaluate(nets, config, problems[mixture], fm)
    rec = dict(key=key, seconds=seconds, nets=f"{len(cache)}.pt", results=results)
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")
    cache[key] = rec
    print(f"  {'FM' if fm else 'SoFlow':6} {mixture:10} seed {seed}  {seconds:5.0f} s", flush=True)
    return rec


# ----- The report -----
def spread(values):
    """'mean ± sd' over seeds (sd omitted for one seed)."""
    m = statistics.fmean(values)
    return f"{m:.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{m:.3f}"


def figures(recs, weights, sampler):
    return {f: [r["results"][weights][sampler][f] for r in recs] for f in ("share", "median", "mse", "tv")}


def collect(cache, names, mixture, seeds, steps):
    """{setting: (soflow records, fm records)} over the seeds that are cached."""
    out = {}
    for name in names:
        s = setting(name)
        pairs = [(cache.get(train_key(s, mixture, seed, steps, False)),
                  cache.get(train_key(s, mixture, seed, steps, True))) for seed in seeds]
        pairs = [p for p in pairs if p[0] and p[1]]
        if pairs:
            weights = "raw" if s["ema"] is None else str(s["ema"])
            out[name] = ([p[0] for p in pairs], [p[1] for p in pairs], weights)
    return out


def verdict(so, fm, weights):
    """(share difference, median ratio) of SoFlow 1 step against FM 4 Euler steps, then of 2 chained steps
    (through s = 0.5 and 0.3) against 1, from the means over seeds."""
    def mean(recs, sampler, f):
        return statistics.fmean(figures(recs, weights, sampler)[f])

    def pair(a, b):
        return mean(*a, "share") - mean(*b, "share"), mean(*a, "median") / mean(*b, "median")

    one = (so, "1")
    return pair(one, (fm, "euler4")), pair((so, "chain@0.5"), one), pair((so, "chain@0.3"), one)


def report(cache, names, seeds, steps, wall):
    lines = [f"# SoFlow toy study: {steps} training steps\n",
             "Written by `python -m benchmarks.toy_study`. Mode share: the share of 4096 fixed noise "
             "samples whose nearest mode mean is that of the exact endpoint f(x_1, 1, 0); median: the "
             "median distance to that endpoint; MSE: the mean squared distance. Mean ± sd over the seeds "
             "(n). FM: flow matching (lam = 1) with the same network, lr and EMA, Euler steps. SoFlow 2: "
             "two chained steps through t = 0.5 (soflow.sample's default grid), SoFlow 2 @0.3: through "
             "t = 0.3.\n"]
    verdicts = []
    for mixture in MIXTURES:
        rows = collect(cache, names, mixture, seeds, steps)
        title = " ".join(MIXTURES[mixture][0].__doc__.split(")", 1)[1].split())    # the docstring, one line
        lines += [f"\n## {mixture}: {title}\n",
                  "| setting | n | sampler | mode share | median dist | MSE |", "|---|---|---|---|---|---|"]
        for name, (so, fm, weights) in rows.items():
            samplers = [("SoFlow 1", so, "1"), ("SoFlow 2", so, "chain@0.5"),
                        ("SoFlow 2 @0.3", so, "chain@0.3")]
            samplers += [(f"FM Euler {k}", fm, f"euler{k}") for k in (1, 2, 4, 8)]
            for label, recs, sampler in samplers:
                f = figures(recs, weights, sampler)
                lines.append(f"| {name} | {len(recs)} | {label} | {spread(f['share'])} | "
                             f"{spread(f['median'])} | {spread(f['mse'])} |")
            verdicts.append((name, mixture, len(so), *verdict(so, fm, weights)))
    lines += ["\n## Target: SoFlow 1 step >= FM 4 Euler steps in mode share and median distance; "
              "2 steps no worse than 1 in both\n",
              "Differences of the seed means: share(a) - share(b) and median(a) / median(b).\n",
              "| setting | mixture | n | 1 vs FM4: share | median | met | 2@0.5 vs 1: share | median | met | "
              "2@0.3 vs 1: share | median | met |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def yes(ok):
        return "**yes**" if ok else "no"

    lines += [f"| {n} | {m} | {k} | "
              + " | ".join(f"{d:+.3f} | {r:.2f} | {yes(d >= 0 and r <= 1)}" for d, r in v) + " |"
              for n, m, k, *v in verdicts]
    lines += ["\n## Two steps: chained or re-noised, and the intermediate time s\n",
              "chain@s: x_0 = f(f(x_1, 1, s), s, 0); renoise@s: the released sampler, fresh noise at s "
              "(fixed seed). leg1@s: f_theta(x_1, 1, s) against the exact f(x_1, 1, s); leg2@s: f_theta "
              "started from the exact point at s, against the exact endpoint. TV: total variation between "
              "the mode shares and those of the exact map (the distribution-level figure that a re-noising "
              "sampler can be held to).\n",
              "| mixture | setting | n | sampler | mode share | median dist | MSE | mode TV |",
              "|---|---|---|---|---|---|---|---|"]
    for mixture in MIXTURES:
        for name, (so, fm, weights) in collect(cache, names, mixture, seeds, steps).items():
            if name not in MECHANISM:
                continue
            kinds = ("chain", "renoise", "leg1", "leg2", "exact2")
            samplers = ["1"] + [f"{kind}@{s}" for s in MIDS for kind in kinds]
            for sampler in (s for s in samplers if s in so[0]["results"][weights]):
                f = figures(so, weights, sampler)
                lines.append(f"| {mixture} | {name} | {len(so)} | {sampler} | {spread(f['share'])} | "
                             f"{spread(f['median'])} | {spread(f['mse'])} | {spread(f['tv'])} |")
            f = figures(fm, weights, "euler4")
            lines.append(f"| {mixture} | {name} | {len(fm)} | FM euler4 | {spread(f['share'])} | "
                         f"{spread(f['median'])} | {spread(f['mse'])} | {spread(f['tv'])} |")
    train_s = sum(r["seconds"] for r in cache.values() if json.loads(r["key"])["steps"] == steps)
    lines.append(f"\nTraining time of all cached runs: {train_s / 60:.0f} min on one thread; this command: "
                 f"{wall / 60:.1f} min.\n")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 20 steps, 256 samples, base, seed 0")
    parser.add_argument("--steps", type=int, default=2000, help="training steps of every network")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 for the screening, "
                        "0 1 2 for the final settings")
    parser.add_argument("--settings", nargs="+", default=None, choices=sorted(SETTINGS))
    parser.add_argument("--mixtures", nargs="+", default=list(MIXTURES), choices=list(MIXTURES))
    parser.add_argument("--cache", default="/tmp/toy_study.jsonl")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "toy_study.md"))
    args = parser.parse_args()
    n, ode_steps = 4096, 200
    if args.quick:
        args.steps, n, ode_steps = 20, 256, 20
        args.settings, args.seeds = args.settings or ["base"], args.seeds or [0]
        args.cache, args.out = "/tmp/toy_study_quick.jsonl", "/tmp/toy_study_quick.md"
    # The screening (one seed, every setting), then the final settings on three seeds.
    if args.settings is None:
        plan = [(name, 0) for name in SCREEN] + [(name, seed) for seed in (1, 2) for name in FINAL]
    else:
        plan = [(name, seed) for seed in (args.seeds or [0]) for name in args.settings]
    start, cache, problems = time.time(), load_cache(args.cache), {}
    for name, seed in plan:
        s = setting(name)
        print(f"{name}, seed {seed}", flush=True)
        for mixture in args.mixtures:
            for fm in (False, True):
                run(train_key(s, mixture, seed, args.steps, fm), s, mixture, seed, args.steps, fm, problems,
                    cache, args.cache, ode_steps, n)
        seeds = sorted({seed for _, seed in plan} | {0, 1, 2})
        with open(args.out, "w") as f:
            f.write(report(cache, list(SETTINGS), seeds, args.steps, time.time() - start))
    print(f"wrote {args.out} in {(time.time() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
