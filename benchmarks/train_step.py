r"""Cost of one training step on the same DiT and the same batch: flow matching, SoFlow (Algorithm 1) without
and with CFG, each also distilling a teacher of the student's size (Sec. 4.2), and MeanFlow (Geng et al. 2025,
arXiv 2505.13447) with its JVP, without and with CFG.

    python -m benchmarks.train_step                 # CPU default: DiT-S/4, batch 16, 1-2 min on 2 cores
    python -m benchmarks.train_step --model DiT-B/2 --batch-size 64 --device cuda --precision bf16 --compile \
        --json gpu.json

Time: each method runs --warmup steps, then --repeats rounds each run one step of every method, in an order
that rotates from round to round (interleaved: changes in machine load touch every method alike). A step is
zero_grad, the loss, backward and an AdamW step, between torch.cuda.synchronize() calls on a GPU. Printed: the
median and the interquartile range. On a CPU that other processes share, --threads 1 gives steadier numbers.
Peak memory: the most bytes that tensors hold at once during a step, everything included (weights, AdamW
state, gradients, activations, temporaries; the teacher's weights in the rows that run it), the allocator's
cache excluded.
CUDA: torch.cuda.max_memory_allocated, less the teacher's weights in the rows that leave it idle. CPU, which
has no such counter: the bytes of the weights and AdamW state, plus the peak of the running sum of the
allocations and frees that the CPU allocator reports to torch.profiler(profile_memory=True) during one step
(the gradients are freed before it, so every byte the step adds is allocated inside it).
The "predicted" column: COST_MODEL below, the count of forward and backward passes over the rows of the batch.
"""
import argparse
import contextlib
import copy
import os
import statistics
import sys
import textwrap
import time
from dataclasses import replace
from functools import partial

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import soflow
from benchmarks.common import add_setup_args, describe, setup, sync, write_json

COST_MODEL = (
    "a forward pass over one row of the batch costs 1 (with or without gradient), a backward pass 2: flow "
    "matching 3 a row. SoFlow: n = lam B rows of flow matching 3, B - n consistency rows 1 (no-grad target) "
    "+ 3; CFG adds a no-grad pass over B + (B - n) rows. A teacher of the student's size adds its no-grad "
    "pass over B rows, and with CFG a second one (null label), which leaves the student's CFG pass the B - n "
    "consistency rows (none when m = 1). MeanFlow: the JVP 3 (the primal, and a tangent of two matmuls per "
    "linear layer: PyTorch's forward-mode AD also multiplies by the weights' tangent, a zero tensor it "
    "materialises; an ideal JVP costs 2) + backward 2; CFG adds a no-grad pass over B rows. The AdamW step "
    "is left out.")


# ----- Flow matching, the baseline: v = F(x_t, t, t, y) (Euler parameterization, Eq. 10) -----

def flow_matching_baseline(net, x0, y, mu=-0.2, sd=1.0):
    """Plain flow matching: mean ||F(x_t, t, t, y) - (x_1 - x_0)||^2, t ~ logit-normal(mu, sd);
    one forward."""
    t = soflow.logit_normal(x0.shape[0], mu, sd, x0.device)
    x1 = torch.randn_like(x0)
    x_t = soflow.per_sample(1 - t, x0) * x0 + soflow.per_sample(t, x0) * x1
    return ((net(x_t, t, t, y) - (x1 - x0)) ** 2).mean()


# ----- MeanFlow (Geng et al. 2025), the JVP baseline -----
# The average velocity u(z_t, r, t) from r to t (r <= t; t = 1 is noise) is F(z_t, t, r): with
# f = x_t + (s - t) F, z_r = z_t - (t - r) u is f(z_t, t, r). MeanFlow's identity: u = v - (t - r) du/dt,
# with the total derivative du/dt = v . d_z u + d_t u, a JVP along the tangents (dz, dr, dt) = (v, 0, 1).

# device type -> the attention backend the JVP runs with: "default", or "math" (found on first use)
JVP_SDPA = {}


def jvp_u(net, z, r, t, y, v):
    """(u, du/dt) = torch.func.jvp of u(z, r, t) = F(z, t, r, y) along (v, 0, 1). The CPU's fused (flash)
    attention kernel has no forward-AD formula (NotImplementedError): then this JVP runs with the math
    backend of SDPA."""
    def fn(z_, r_, t_):
        return net(z_, t_, r_, y)

    primals, tangents = (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t))
    if z.device.type not in JVP_SDPA:
        try:
            out = torch.func.jvp(fn, primals, tangents)
            JVP_SDPA[z.device.type] = "default"
            return out
        except (NotImplementedError, RuntimeError) as e:     # torch.compile wraps it in a RuntimeError
            if "forward AD" not in str(e):
                raise
            JVP_SDPA[z.device.type] = "math"
    with sdpa_kernel(SDPBackend.MATH) if JVP_SDPA[z.device.type] == "math" else contextlib.nullcontext():
        return torch.func.jvp(fn, primals, tangents)


def meanflow_loss(net, x0, y, w=1.0, drop=0.1, neq=0.25, mu=-0.4, sd=1.0, p=1.0, c=1e-3):
    """MeanFlow's loss, adaptive weight 1 / (||err||^2 + c)^p, as its PyTorch code computes it: one JVP whose
    primal u carries the gradient. (t, r): two logit-normal(mu, sd) draws, t the larger; r = t on a fraction
    1 - neq of the rows. CFG (w != 1) in its w-only form (no kappa): v~ = w v + (1 - w) u(z_t, t, t | null),
    from one no-grad pass over the batch; rows whose label is dropped keep v."""
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


def methods(B, teacher, steps=400_000):
    """name -> (loss(net, x0, y, step), the step's cost in COST_MODEL's units, whether it runs the teacher).
    teacher: a network of the student's architecture, its velocity that of flow matching (lam 1)."""
    config = soflow.PRESETS["imagenet"]                  # the released configuration: lam 0.75, w 3, m 0.25
    n = int(config.lam * B)
    v_teacher = partial(soflow.velocity, teacher, config=replace(config, lam=1.0))

    def sof(c, distil=None):                             # distil: the teacher's velocity field, or None
        return lambda net, x0, y, k: soflow.soflow_loss(net, x0, y, config=c, step=k, total_steps=steps,
                                                        teacher=distil)[0]
    soflow_units = 3 * n + 4 * (B - n)
    return {
        "flow matching": (lambda net, x0, y, k: flow_matching_baseline(net, x0, y), 3 * B, False),
        "SoFlow": (sof(replace(config, w=1.0)), soflow_units, False),
        "SoFlow CFG (w 3, m 0.25)": (sof(config), soflow_units + B + (B - n), False),
        "SoFlow + teacher": (sof(replace(config, w=1.0), v_teacher), soflow_units + B, True),
        # The teacher gives v_t and v_uncond (2 B rows); the student's own pass: v_guided on the B - n rows.
        "SoFlow CFG + teacher": (sof(config, v_teacher), soflow_units + 2 * B + (B - n), True),
        "MeanFlow (JVP)": (lambda net, x0, y, k: meanflow_loss(net, x0, y), 5 * B, False),
        "MeanFlow CFG (w 3)": (lambda net, x0, y, k: meanflow_loss(net, x0, y, w=3.0), 6 * B, False),
    }


# ----- One step, its time and its peak memory -----

def train_step(net, opt, loss_fn, x0, y, k, autocast):
    """Seconds for one training step, synchronized on a GPU."""
    sync(x0.device)
    start = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    with autocast:
        loss = loss_fn(net, x0, y, k)
    loss.backward()
    opt.step()
    sync(x0.device)
    return time.perf_counter() - start


@contextlib.contextmanager
def quiet_stderr():
    """Silence file descriptor 2: the CPU profiler (kineto) logs two lines there at each start and stop."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved), os.close(null)


def weight_bytes(net):
    """The bytes of a network's parameters and buffers."""
    return sum(t.nbytes for t in [*net.parameters(), *net.buffers()])


def peak_memory(net, opt, loss_fn, x0, y, autocast, teacher, runs_teacher):
    """Peak bytes that tensors hold during one step, everything included (see the module docstring); the
    teacher's weights count only if the step runs it."""
    opt.zero_grad(set_to_none=True)
    if x0.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        train_step(net, opt, loss_fn, x0, y, 0, autocast)
        # The teacher stays on the GPU for every method: take it out where the step leaves it idle.
        return torch.cuda.max_memory_allocated() - (0 if runs_teacher else weight_bytes(teacher))
    static = weight_bytes(net) + (weight_bytes(teacher) if runs_teacher else 0)
    static += sum(v.nbytes for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    with quiet_stderr(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                profile_memory=True) as prof:
        train_step(net, opt, loss_fn, x0, y, 0, autocast)
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:                           # allocations (+bytes) and frees (-bytes), anywhere in the tree
        e = stack.pop()
        stack.extend(e.children)
        if str(e.tag).endswith("Allocation"):
            events.append((e.start_time_ns, e.typed[1].alloc_size))
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return static + peak


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_setup_args(parser)
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps per method (default 1, compiled 3)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed rounds; each runs one step of every method")
    args = parser.parse_args(argv)
    args.warmup = args.warmup if args.warmup is not None else 3 if args.compile else 1
    # Setup: one network, one optimizer (the released AdamW) and one batch, shared by every method.
    device, net, model, x0, y, autocast = setup(args)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, betas=(0.9, 0.99), weight_decay=0)
    # The teacher: the student's architecture and size, its own weights (a copy: their values cost nothing).
    teacher = copy.deepcopy(net).eval().requires_grad_(False)
    teacher_model = torch.compile(teacher) if args.compile else teacher
    table = methods(args.batch_size, teacher_model)
    n_params = sum(p.numel() for p in net.parameters() if p.requires_grad)
    print(f"{describe(args, device)}; {n_params / 1e6:.1f}M parameters")
    # Warm up (a compiled network compiles once per batch shape), then interleaved rounds in a rotating order.
    for name, (loss_fn, _, _) in table.items():
        for k in range(args.warmup):
            train_step(model, opt, loss_fn, x0, y, k, autocast)
    names, times = list(table), {name: [] for name in table}
    for k in range(args.repeats):
        for name in names[k % len(names):] + names[:k % len(names)]:
            times[name].append(train_step(model, opt, table[name][0], x0, y, k, autocast))
        print(f"round {k + 1}/{args.repeats}, ms: " + ", ".join(f"{t[-1] * 1e3:.0f}" for t in times.values()))
    # Peak memory: one more step per method, apart from the timing (the CPU profiler slows steps down).
    peaks = {name: peak_memory(model, opt, loss_fn, x0, y, autocast, teacher, runs_teacher)
             for name, (loss_fn, _, runs_teacher) in table.items()}
    # Table: median ms/step and IQR, ratio to flow matching (measured; predicted by COST_MODEL), peak memory.
    fm = "flow matching"
    fm_ms, fm_units, fm_mb = statistics.median(times[fm]), table[fm][1], peaks[fm]
    rows = []
    for name, (_, units, _) in table.items():
        ts = times[name]
        q1, med, q3 = statistics.quantiles(ts, n=4, method="inclusive") if len(ts) > 1 else (ts[0],) * 3
        rows.append(dict(method=name, ms_median=med * 1e3, ms_q1=q1 * 1e3, ms_q3=q3 * 1e3, ratio=med / fm_ms,
                         predicted_ratio=units / fm_units, cost_units=units, peak_mib=peaks[name] / 2 ** 20,
                         peak_ratio=peaks[name] / fm_mb, ms_all=[s * 1e3 for s in ts]))
    print(f"\n{'method':<26}{'ms/step':>9}{'IQR':>13}{'/ FM':>7}{'predicted':>11}{'peak MiB':>9}{'/ FM':>7}")
    for r in rows:
        iqr = f"{r['ms_q1']:.0f}-{r['ms_q3']:.0f}"
        print(f"{r['method']:<26}{r['ms_median']:>9.0f}{iqr:>13}{r['ratio']:>7.2f}{r['predicted_ratio']:>11.2f}"
              f"{r['peak_mib']:>9.0f}{r['peak_ratio']:>7.2f}")
    by = {r["method"]: r for r in rows}
    vs = {f"{a} / {b}": by[a]["ms_median"] / by[b]["ms_median"] for a, b in
          [("SoFlow", "MeanFlow (JVP)"), ("SoFlow CFG (w 3, m 0.25)", "MeanFlow CFG (w 3)")]}
    print("\n".join(f"{k}: {v:.2f} x the step time" for k, v in vs.items()))
    print(f"MeanFlow's JVP ran with the {JVP_SDPA.get(device.type)} attention backend.")
    print(textwrap.fill(f"Predicted (cost model): {COST_MODEL}", 116))
    if args.json:
        memory = ("torch.cuda.max_memory_allocated, less the teacher's weights where idle"
                  if device.type == "cuda" else
                  "weights (+ the teacher's where it runs) + AdamW state + peak of the CPU allocator's "
                  "running total (torch.profiler)")
        write_json(args.json, dict(config=vars(args), n_params=n_params, threads=torch.get_num_threads(),
                                   torch=torch.__version__, jvp_sdpa=JVP_SDPA.get(device.type),
                                   cost_model=COST_MODEL, peak_memory=memory, soflow_vs_meanflow=vs,
                                   methods=rows))
    return rows


if __name__ == "__main__":
    main()
