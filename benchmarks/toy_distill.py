"""SoFlow from a teacher (Sec. 4.2) on a 2D mixture whose solution map is known exactly.

    python -m benchmarks.toy_distill                 # about 5 min on 2 cores: the table, docs/toy_distill.png
    python -m benchmarks.toy_distill --steps 300     # a quick look

The mixture is toy_study's 5 modes of unequal weights and spacing (kept aside for checks). Four MLPs train
for the same number of steps from the same seed: flow matching (lam = 1), which then serves as the trained
teacher, and SoFlow three ways: from data (the paper), distilling the exact velocity of the mixture (Eq. 1),
and distilling the trained flow-matching teacher. Each sampler maps the same 4,096 noise samples, judged
against the exact solution map f(x_1, 1, 0) (same mode, median and mean squared distance) and against the
trained teacher's own 100 Euler steps from the same noise, which is what its student can at best reproduce.
"""
import argparse
import os
import time
from dataclasses import replace
from functools import partial

import torch

import soflow
import train_toy
from benchmarks.toy_study import unequal
from training.files import atomic_write

torch.set_num_threads(1)                         # tiny networks: one thread is as fast


def train_all(toy, steps, seed):
    """{name: (net, config)}: flow matching, then SoFlow from data, from the exact teacher and from FM."""
    config = soflow.PRESETS["toy"]
    fm_config = replace(config, lam=1.0)
    train = partial(train_toy.train_mlp, toy, steps=steps, seed=seed, progress=True)
    nets = {"flow matching": (train(fm_config), fm_config)}
    fm_teacher = partial(soflow.velocity, nets["flow matching"][0], config=fm_config)
    nets["from data"] = (train(config), config)
    nets["exact teacher"] = (train(config, teacher=train_toy.exact_teacher(toy)), config)
    nets["flow-matching teacher"] = (train(config, teacher=fm_teacher), config)
    return nets


def samplers(nets):
    """{row name: x_1 -> x_0}: each student at 1 and 2 steps, flow matching's Euler steps."""
    rows = {}
    for name in ("from data", "exact teacher", "flow-matching teacher"):
        net, config = nets[name]
        rows[f"SoFlow, {name}, 1 step"] = partial(soflow.sample, net, config=config)
        rows[f"SoFlow, {name}, 2 steps"] = partial(soflow.sample, net, config=config, times=[1, 0.3, 0],
                                                   mode="chain")
    net, config = nets["flow matching"]
    for k in (4, 8, 100):
        rows[f"flow matching, {k} Euler steps"] = partial(soflow.sample_euler, net, config=config, steps=k)
    return rows


def table(toy, nets, n=4096):
    """{row name: figures} against the exact map and against the trained teacher's 100 Euler steps."""
    x1 = torch.randn(n, 2, generator=torch.Generator().manual_seed(1))
    x0_exact = toy.solution(x1, 1.0, 0.0)
    teacher_net, teacher_config = nets["flow matching"]
    x0_teacher = soflow.sample_euler(teacher_net, x1, config=teacher_config, steps=100)
    results, samples = {}, {}
    for name, sampler in samplers(nets).items():
        samples[name] = sampler(x1)
        exact = train_toy.map_figures(samples[name], x0_exact, toy.means)
        teacher = train_toy.map_figures(samples[name], x0_teacher, toy.means)
        results[name] = dict(exact, teacher_median=teacher["median"], teacher_mse=teacher["mse"])
    return results, samples, x0_exact


def print_table(results):
    print("where 4,096 noise samples land: against the exact map f(x_1, 1, 0), and against the trained "
          "teacher's 100 Euler steps")
    print(f"| {'sampler':<44} | same mode | median | mean sq. | teacher: median | teacher: mean sq. |")
    print(f"|{'-' * 46}|----------:|-------:|---------:|----------------:|------------------:|")
    for name, r in results.items():
        print(f"| {name:<44} | {r['same_mode']:>9.1%} | {r['median']:>6.4f} | {r['mse']:>8.3f} "
              f"| {r['teacher_median']:>15.4f} | {r['teacher_mse']:>17.3f} |")


def figure(path, toy, samples, x0_exact):
    """One-step samples of each student beside the exact map and the trained teacher's own samples, coloured
    by the exact map's mode."""
    import matplotlib.pyplot as plt
    mode = torch.cdist(x0_exact.double(), toy.means).argmin(1)
    panels = {"exact map f(x_1, 1, 0)": x0_exact}
    panels.update({name.replace(", 1 step", ", 1 step").replace("SoFlow, ", ""): samples[name]
                   for name in samples if name.endswith("1 step")})
    panels["the trained teacher, 100 Euler steps"] = samples["flow matching, 100 Euler steps"]
    fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3.3), layout="tight")
    for ax, (title, x) in zip(axes, panels.items()):
        ax.scatter(*x[:2000].T, c=mode[:2000], cmap="tab10", vmin=0, vmax=9, s=1.5)
        ax.set_title(title, fontsize=9)
        ax.set(aspect="equal", xlim=(-3.2, 3.2), ylim=(-3.2, 3.2), xticks=[], yticks=[])
    fig.suptitle("SoFlow students in one step, coloured by the mode the exact map picks", fontsize=10)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="training steps of each of the four MLPs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--figure", default=os.path.join("docs", "toy_distill.png"), help="'' for none")
    args = parser.parse_args(argv)
    toy, start = unequal(), time.time()
    nets = train_all(toy, args.steps, args.seed)
    results, samples, x0_exact = table(toy, nets)
    print(f"{args.steps} steps per model, EMA 0.99, trained in {time.time() - start:.0f} s")
    print_table(results)
    if args.figure:
        figure(args.figure, toy, samples, x0_exact)
        print(f"figure saved to {args.figure}")
    return results


if __name__ == "__main__":
    main()
