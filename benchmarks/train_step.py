"""Cost of one training step on the same DiT and the same batch: flow matching, SoFlow (Algorithm 1) without and
with CFG, and MeanFlow (Geng et al. 2025, arXiv 2505.13447) with its JVP, without and with CFG.

    python benchmarks/train_step.py                          # CPU default: DiT-S/4, batch 16, ~1.5 min on 2 cores
    python benchmarks/train_step.py --model DiT-B/2 --batch-size 64 --device cuda --dtype bf16 --compile --json gpu.json

Time: each method first runs --warmup steps; then --repeats rounds each run one step of every method in turn
(interleaved, so that changes in machine load touch every method alike). A step is zero_grad, the loss, backward
and an AdamW step, between torch.cuda.synchronize() calls on a GPU. Printed: the median and the interquartile range.
Peak memory: the most bytes that tensors hold at once during one step, everything included (weights, AdamW state,
gradients, activations, temporaries), without the allocator's cache. CUDA: torch.cuda.max_memory_allocated. CPU,
which has no such counter: the bytes of the weights and AdamW state, plus the peak of the running sum of the
allocations and frees that the CPU allocator reports to torch.profiler(profile_memory=True) during one step (the
gradients are freed before it starts, so every byte the step holds is allocated inside it).
Cost model (the "predicted" column), stated in rows of the batch: a forward pass over a row costs 1 with or without
gradient, a backward pass 2, so flow matching costs 3 per row. SoFlow: n = lam B rows of flow matching (3 each),
B - n rows of consistency loss (a no-grad target pass 1, the student 3); CFG adds one no-grad pass over B + (B - n)
rows. MeanFlow: the JVP counted as 2 forwards (primal and tangent), backward 2; CFG adds a no-grad pass over B rows.
"""
import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from dataclasses import replace

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import soflow  # noqa: E402

# DiT sizes: soflow's table, plus DiT's S/4 (Peebles & Xie 2023), the CPU default.
SIZES = {**soflow.DiT_models, "DiT-S/4": dict(depth=12, hidden_size=384, num_heads=6, patch_size=4)}


# ----- Flow matching, the baseline: v = F(x_t, t, t, y) (Euler parameterization, Eq. 10) -----

def fm_loss(net, x0, y, cfg=soflow.PRESETS["imagenet"]):
    """Plain flow matching: ||F(x_t, t, t, y) - (x_1 - x_0)||^2, t logit-normal; one forward and one backward."""
    t = soflow.logit_normal(x0.shape[0], cfg.fm_mu, cfg.fm_sd, x0.device)
    x1 = torch.randn_like(x0)
    x_t = soflow.per_sample(1 - t, x0) * x0 + soflow.per_sample(t, x0) * x1
    return ((net(x_t, t, t, y) - (x1 - x0)) ** 2).mean()


# ----- MeanFlow (Geng et al. 2025), the JVP baseline -----
# The average velocity u(z_t, r, t) from r to t (r <= t; t = 1 is noise) is F(z_t, t, r): with f = x_t + (s - t) F,
# z_r = z_t - (t - r) u is f(z_t, t, r). MeanFlow's identity: u = v - (t - r) du/dt, with the total derivative
# du/dt = v . d_z u + d_t u, a JVP along the tangents (dz, dr, dt) = (v, 0, 1).

JVP_SDPA = {}    # device type -> the attention backends the JVP runs with (found on first use)


def jvp_u(net, z, r, t, y, v):
    """(u, du/dt) = torch.func.jvp of u(z, r, t) = F(z, t, r, y) along (v, 0, 1). Forward-mode AD through
    scaled_dot_product_attention: the CPU flash kernel has no forward-AD formula (NotImplementedError); then the
    math backend is used, for this JVP only."""
    fn, args, tangents = (lambda z_, r_, t_: net(z_, t_, r_, y)), (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t))
    if z.device.type not in JVP_SDPA:
        try:
            out = torch.func.jvp(fn, args, tangents)
            JVP_SDPA[z.device.type] = "default"
            return out
        except NotImplementedError:
            JVP_SDPA[z.device.type] = "math"
    with sdpa_kernel(SDPBackend.MATH) if JVP_SDPA[z.device.type] == "math" else contextlib.nullcontext():
        return torch.func.jvp(fn, args, tangents)


def meanflow_loss(net, x0, y, w=1.0, drop=0.1, neq=0.25, mu=-0.4, sd=1.0, p=1.0, c=1e-3):
    """MeanFlow's loss (its Eq. 9, adaptive weight 1 / (||err||^2 + c)^p), computed as its PyTorch code does: one
    JVP whose primal u carries the gradient. (t, r): two logit-normal(mu, sd) draws sorted, r = t on 1 - neq of the
    rows. CFG (w != 1), the w-only form (no kappa): v~ = w v + (1 - w) u(z_t, t, t | null), one no-grad pass over
    the batch; rows whose label was dropped keep v."""
    B = x0.shape[0]
    tr = soflow.logit_normal(2 * B, mu, sd, x0.device).view(2, B)
    t, r = tr.max(0).values, tr.min(0).values
    r = torch.where(torch.rand(B, device=x0.device) < neq, r, t)
    x1 = torch.randn_like(x0)
    z = soflow.per_sample(1 - t, x0) * x0 + soflow.per_sample(t, x0) * x1
    v = x1 - x0
    if w != 1:
        keep = torch.rand(B, device=x0.device) >= drop
        with torch.no_grad():
            u_null = net(z, t, t, torch.full_like(y, net.num_classes))
        v = torch.where(soflow.per_sample(keep, v), w * v + (1 - w) * u_null, v)
        y = torch.where(keep, y, net.num_classes)
    u, dudt = jvp_u(net, z, r, t, y, v)
    u_tgt = v - soflow.per_sample(t - r, v) * dudt
    err = ((u - u_tgt.detach()) ** 2).flatten(1).sum(1)
    return (err / (err.detach() + c) ** p).mean()


# ----- The methods: name -> (loss of (net, x0, y, step), cost per step in forward-pass rows) -----

def methods(B, steps=400_000):
    cfg = soflow.PRESETS["imagenet"]
    no_cfg = replace(cfg, w=1.0)
    n = int(cfg.lam * B)
    sof = lambda c: lambda net, x0, y, k: soflow.soflow_loss(net, x0, y, cfg=c, step=k, total_steps=steps)[0]  # noqa
    return {
        "flow matching": (lambda net, x0, y, k: fm_loss(net, x0, y), 3 * B),
        "SoFlow": (sof(no_cfg), 3 * n + 4 * (B - n)),
        "SoFlow CFG (w 3, m 0.25)": (sof(cfg), 3 * n + 4 * (B - n) + B + (B - n)),
        "MeanFlow (JVP)": (lambda net, x0, y, k: meanflow_loss(net, x0, y), 4 * B),
        "MeanFlow CFG (w 3)": (lambda net, x0, y, k: meanflow_loss(net, x0, y, w=3.0), 5 * B),
    }


# ----- One step, its time and its peak memory -----

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_step(net, opt, loss_fn, x0, y, k, autocast):
    opt.zero_grad(set_to_none=True)
    with autocast:
        loss = loss_fn(net, x0, y, k)
    loss.backward()
    opt.step()
    return loss.detach()


def timed_step(*args):
    """Seconds for one train_step, synchronized on a GPU."""
    device = args[3].device
    sync(device)
    start = time.perf_counter()
    train_step(*args)
    sync(device)
    return time.perf_counter() - start


def peak_memory(net, opt, loss_fn, x0, y, autocast):
    """Peak bytes held during one step, everything included (see the module docstring)."""
    opt.zero_grad(set_to_none=True)
    if x0.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        train_step(net, opt, loss_fn, x0, y, 0, autocast)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    static = sum(t.nbytes for t in [*net.parameters(), *net.buffers()])
    static += sum(v.nbytes for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        train_step(net, opt, loss_fn, x0, y, 0, autocast)
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        stack.extend(e.children)
        if str(e.tag).endswith("Allocation"):
            events.append((e.start_time_ns, e.typed[1].alloc_size))
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return static + peak


def quartiles(xs):
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return q[0], q[1], q[2]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--model", default="DiT-S/4", choices=sorted(SIZES), help="DiT size (32x32x4 latents)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per method (more with --compile)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds; each runs one step of every method")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    # Setup: device, threads, one network, one optimizer and one batch shared by every method.
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    net = soflow.DiT(**SIZES[args.model], input_size=32, in_channels=4, num_classes=1000).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, betas=(0.9, 0.99), weight_decay=0)   # released config
    model = torch.compile(net) if args.compile else net
    x0 = torch.randn(args.batch_size, 4, 32, 32, device=device)
    y = torch.randint(0, 1000, (args.batch_size,), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    table = methods(args.batch_size)
    n_params = sum(p.numel() for p in net.parameters() if p.requires_grad)
    print(f"{args.model} ({n_params / 1e6:.1f}M parameters), batch {args.batch_size} of 4x32x32 latents, "
          f"{device.type} {args.dtype}{' compiled' if args.compile else ''}, {torch.get_num_threads()} threads")
    # Warm up every method, then time interleaved rounds: one step of each method per round.
    for name, (loss_fn, _) in table.items():
        for k in range(args.warmup):
            timed_step(model, opt, loss_fn, x0, y, k, autocast)
    times = {name: [] for name in table}
    for k in range(args.repeats):
        for name, (loss_fn, _) in table.items():
            times[name].append(timed_step(model, opt, loss_fn, x0, y, k, autocast))
        print(f"round {k + 1}/{args.repeats}: " + ", ".join(f"{t[-1] * 1e3:.0f}" for t in times.values()) + " ms")
    # Peak memory, one step per method, apart from the timing (the CPU profiler slows the step down).
    peaks = {name: peak_memory(model, opt, loss_fn, x0, y, autocast) for name, (loss_fn, _) in table.items()}
    # Table: ms/step (median, IQR), ratio to flow matching (measured, and predicted by the cost model), peak memory.
    fm = "flow matching"
    fm_ms, fm_units, fm_mb = statistics.median(times[fm]) * 1e3, table[fm][1], peaks[fm] / 2 ** 20
    rows = []
    for name, (_, units) in table.items():
        q1, med, q3 = (q * 1e3 for q in quartiles(times[name]))
        mb = peaks[name] / 2 ** 20
        rows.append(dict(method=name, ms_median=med, ms_q1=q1, ms_q3=q3, ms_all=[t * 1e3 for t in times[name]],
                         ratio=med / fm_ms, predicted_ratio=units / fm_units, cost_units=units, peak_mb=mb,
                         peak_ratio=mb / fm_mb))
    print(f"\n{'method':<26}{'ms/step':>9}{'IQR':>15}{'/ FM':>7}{'predicted':>11}{'peak MB':>9}{'/ FM':>7}")
    for r in rows:
        print(f"{r['method']:<26}{r['ms_median']:>9.0f}{r['ms_q1']:>8.0f} - {r['ms_q3']:<4.0f}{r['ratio']:>7.2f}"
              f"{r['predicted_ratio']:>11.2f}{r['peak_mb']:>9.0f}{r['peak_ratio']:>7.2f}")
    by = {r["method"]: r for r in rows}
    for sof, mf in [("SoFlow", "MeanFlow (JVP)"), ("SoFlow CFG (w 3, m 0.25)", "MeanFlow CFG (w 3)")]:
        print(f"{sof} / {mf}: {by[sof]['ms_median'] / by[mf]['ms_median']:.2f} x the step time")
    print(f"MeanFlow's JVP attention backend: {JVP_SDPA.get(device.type)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(config=vars(args), n_params=n_params, threads=torch.get_num_threads(),
                           torch=torch.__version__, jvp_sdpa=JVP_SDPA.get(device.type), methods=rows), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
