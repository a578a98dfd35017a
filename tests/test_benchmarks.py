"""The benchmarks run end to end at tiny sizes, and what they time is correct: the flow matching baseline
against soflow's own functions, MeanFlow's JVP against finite differences, the cost model against the rows the
network actually sees, the samplers against soflow.sample. No timing is asserted."""
import json
import math
import re

import pytest
import torch
import torch.nn as nn

import soflow
import train_imagenet
import training.data
from benchmarks import sampling
from benchmarks import train_loop as tl
from benchmarks import train_step as ts
from optional import needs

# Loading forward-AD decompositions makes torch call its deprecated torch.jit.script.
pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated"),
              pytest.mark.usefixtures("one_thread")]          # conftest.py


def tiny_dit(dtype=torch.float32, seed=0):
    """DiT-T/4 whose zero-initialised layers get random weights, so that every input reaches the output."""
    torch.manual_seed(seed)
    net = soflow.DiT_models["DiT-T/4"](input_size=16, num_classes=10).to(dtype)
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() >= 2 and p.abs().max() == 0:
                nn.init.normal_(p, std=0.05)
    return net


def batch(B=4, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, 4, 16, 16, generator=g, dtype=dtype), torch.randint(0, 10, (B,), generator=g)


# ----- The losses -----

def test_flow_matching_baseline_is_soflow_velocity_regression():
    net, (x0, y) = tiny_dit(), batch()
    torch.manual_seed(3)
    loss = ts.flow_matching_baseline(net, x0, y)
    torch.manual_seed(3)                                           # the same draws: t, then x1
    config = soflow.PRESETS["imagenet"]
    t = soflow.logit_normal(4, config.fm_mu, config.fm_sd)
    x_t, v = soflow.interpolate("linear", x0, torch.randn_like(x0), t)
    assert torch.allclose(loss, ((soflow.velocity(net, x_t, t, y, config=config) - v) ** 2).mean(), rtol=1e-6)


def test_meanflow_jvp_matches_central_finite_difference():
    net, (z, y) = tiny_dit(torch.float64), batch(3, torch.float64)
    t = torch.tensor([0.9, 0.6, 0.3], dtype=torch.float64)
    r = torch.tensor([0.2, 0.6, 0.1], dtype=torch.float64)
    v = torch.randn_like(z)
    with torch.no_grad():
        u, dudt = ts.jvp_u(net, z, r, t, y, v)
        # The time embedding computes in float32: error ~ 1e-7 / h from rounding, h^2 from truncation.
        h = 1e-4
        # The central difference along (dz, dr, dt) = (v, 0, 1).
        fd = (net(z + h * v, t + h, r, y) - net(z - h * v, t - h, r, y)) / (2 * h)
        assert torch.allclose(u, net(z, t, r, y), atol=1e-12)                      # u(z, r, t) = F(z, t, r)
    assert dudt.abs().max() > 1e-2                                                 # a real test: non-zero
    assert torch.allclose(dudt, fd, rtol=1e-3, atol=1e-3 * fd.abs().max().item())
    assert ts.JVP_SDPA["cpu"] in ("default", "math")


def test_meanflow_loss_at_r_equal_t_is_weighted_flow_matching():
    """With r = t everywhere the JVP term vanishes: u_tgt = v, the loss is adaptive-weighted flow matching."""
    net, (x0, y) = tiny_dit(), batch()
    torch.manual_seed(5)
    loss = ts.meanflow_loss(net, x0, y, neq=0.0)
    torch.manual_seed(5)
    tr = soflow.logit_normal(8, -0.4, 1.0).view(2, 4)
    t = tr.max(0).values
    torch.rand(4)                                                  # which rows have r != t (none here)
    x_t, v = soflow.interpolate("linear", x0, torch.randn_like(x0), t)
    err = ((net(x_t, t, t, y) - v) ** 2).flatten(1).sum(1)
    assert torch.allclose(loss, (err / (err + 1e-3)).mean(), rtol=1e-5)


def tiny_teacher():
    """A teacher as benchmarks.train_step builds one: the student's architecture, its own weights, frozen."""
    return tiny_dit(seed=1).eval().requires_grad_(False)


@pytest.mark.parametrize("name", list(ts.methods(4, tiny_teacher())))
def test_cost_model_counts_the_rows_the_network_sees(name):
    """predicted units = 3 x (rows forwarded with gradient) + 1 x (rows without), the teacher's included; a
    JVP row costs 5 (3 + backward)."""
    net, teacher, (x0, y) = tiny_dit(), tiny_teacher(), batch()
    loss_fn, units, runs_teacher = ts.methods(4, teacher)[name]
    rows = {"grad": 0, "no_grad": 0, "teacher grad": 0, "teacher no_grad": 0}

    def counter(prefix):
        def count_rows(module, args):
            key = prefix + ("grad" if torch.is_grad_enabled() else "no_grad")
            rows[key] = rows[key] + args[0].shape[0]
        return count_rows
    net.register_forward_pre_hook(counter(""))
    teacher.register_forward_pre_hook(counter("teacher "))
    loss = loss_fn(net, x0, y, 0)
    loss.backward()
    per_grad_row = 5 if name.startswith("MeanFlow") else 3
    assert units == per_grad_row * rows["grad"] + rows["no_grad"] + rows["teacher no_grad"]
    assert rows["grad"] == 4 and rows["teacher grad"] == 0 and torch.isfinite(loss)
    assert (rows["teacher no_grad"] > 0) == runs_teacher
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in net.parameters() if p.requires_grad)


def test_cpu_peak_memory_counts_allocations_and_frees():
    """Two 40 MiB tensors live at once, then freed, then 20 MiB: the peak the profiler sees is 80 MiB above
    the weights, plus the tiny network's activations and gradients."""
    net, (x0, y) = tiny_dit(), batch(1)
    opt = torch.optim.SGD(net.parameters(), lr=0.0)

    def loss_fn(net, x0, y, k):
        a, b = torch.ones(10 * 2 ** 20), torch.ones(10 * 2 ** 20)
        del a, b
        c = torch.ones(5 * 2 ** 20)                                                  # noqa: F841
        return net(x0, torch.ones(1), torch.zeros(1), y).square().mean()

    weights, teacher = sum(p.nbytes for p in net.parameters()), tiny_teacher()
    autocast = torch.autocast("cpu", enabled=False)
    extra_mib = (ts.peak_memory(net, opt, loss_fn, x0, y, autocast, teacher, False) - weights) / 2 ** 20
    assert 80 <= extra_mib < 83
    # A step that runs the teacher also holds its weights.
    with_teacher = ts.peak_memory(net, opt, loss_fn, x0, y, autocast, teacher, True)
    assert 80 <= (with_teacher - ts.weight_bytes(teacher) - weights) / 2 ** 20 < 83


# ----- The scripts, end to end -----

def test_train_step_benchmark_end_to_end(tmp_path):
    out = tmp_path / "train.json"
    rows = ts.main(["--model", "DiT-T/4", "--batch-size", "4", "--warmup", "1", "--repeats", "2",
                    "--json", str(out)])
    data = json.loads(out.read_text())
    assert [r["method"] for r in data["methods"]] == list(ts.methods(4, None)) == [r["method"] for r in rows]
    by = {r["method"]: r for r in data["methods"]}
    for r in data["methods"]:
        assert r["ms_median"] > 0 and len(r["ms_all"]) == 2 and r["ms_q1"] <= r["ms_median"] <= r["ms_q3"]
        assert r["peak_mib"] > 0
    assert by["flow matching"]["ratio"] == 1 and by["flow matching"]["predicted_ratio"] == 1
    assert by["SoFlow"]["predicted_ratio"] == pytest.approx(13 / 12)                       # n = 3 of B = 4
    assert by["SoFlow CFG (w 3, m 0.25)"]["predicted_ratio"] == pytest.approx(18 / 12)
    assert by["SoFlow + teacher"]["predicted_ratio"] == pytest.approx(17 / 12)             # + B teacher rows
    assert by["SoFlow CFG + teacher"]["predicted_ratio"] == pytest.approx(22 / 12)   # 2 B teacher, B - n own
    # Every step holds the weights, the AdamW state and the gradients: at least 4 x the weights' bytes; with a
    # teacher, its weights too.
    weights_mib = data["n_params"] * 4 / 2 ** 20
    assert all(r["peak_mib"] >= 4 * weights_mib for r in data["methods"])
    assert all(by[m]["peak_mib"] >= 5 * weights_mib for m in ("SoFlow + teacher", "SoFlow CFG + teacher"))


def test_sampling_benchmark_end_to_end(tmp_path):
    out = tmp_path / "sampling.json"
    sampling.main(["--model", "DiT-T/4", "--batch-size", "2", "--euler-steps", "3", "--warmup", "1",
                   "--repeats", "2", "--euler-repeats", "1", "--json", str(out)])
    data = json.loads(out.read_text())
    assert [r["nfe"] for r in data["samplers"]] == [1, 1, 3]
    assert all(r["images_per_s"] > 0 and r["runs"] >= 1 for r in data["samplers"])
    assert data["samplers"][0]["ratio_to_forward"] == 1


def test_samplers_compute_what_they_claim():
    net, (x1, y) = tiny_dit(), batch(2)
    fns = list(sampling.samplers(3).values())
    config = soflow.PRESETS["imagenet"]
    with torch.no_grad():
        F_out, x_one, x_euler = (fn(net, x1, y) for fn, _ in fns)
        assert torch.equal(x_one, soflow.sample(net, x1, y, config=config))
        assert torch.allclose(x_one, x1 - F_out, atol=1e-6)   # Euler parameterization: f(x, 1, 0) = x - F
        assert torch.allclose(x_euler, soflow.sample_euler(net, x1, y, config=config, steps=3))


# ----- The training loop against the bare step -----

def test_train_loop_benchmark_end_to_end(tmp_path):
    out = tmp_path / "loop.json"
    rounds, window = 2, 2
    results = tl.main(["--batch-size", "2", "--window", str(window), "--warmup", "1", "--rounds", str(rounds),
                       "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["ratio"] == results["ratio"]
    timed_alone = [row for name, row in data["parts"].items() if name != tl.AFTER]
    assert len(timed_alone) == 4
    for row in (data["bare"], data["script"], data["script_own_timer"], *timed_alone):
        assert len(row["ms_all"]) == rounds and all(math.isfinite(t) and t > 0 for t in row["ms_all"])
        assert row["ms_min"] <= row["ms_median"] <= row["ms_max"]
    assert data["parts"][tl.AFTER]["ms_all"] == pytest.approx([s - o for s, o in zip(
        data["script"]["ms_all"], data["script_own_timer"]["ms_all"])])
    bare, script = data["bare"]["ms_median"], data["script"]["ms_median"]
    assert data["ratio"] == pytest.approx(script / bare, rel=1e-12)
    assert data["overhead_pct"] == pytest.approx((script / bare - 1) * 100, rel=1e-9)
    assert data["script"]["images_per_s"] == pytest.approx(2e3 / script)
    assert data["round_ratios"] == pytest.approx([s / b for s, b in zip(data["script"]["ms_all"],
                                                                        data["bare"]["ms_all"])])
    parts_ms = sum(p["ms_median"] for p in data["parts"].values())
    assert data["rest_ms"] == pytest.approx(script - bare - parts_ms)
    assert data["config"]["ema_every"] == 16 and data["config"]["precision"] == "fp32"


def test_train_loop_clock_wraps_global_batch_indices_and_restores_it():
    original, calls, between = training.data.global_batch_indices, [], []
    with tl.step_clock(torch.device("cpu"), calls, lambda: between.append(1)):
        assert training.data.global_batch_indices is not original
        rows = [training.data.global_batch_indices(k, 4, 10, 0) for k in range(3)]
    assert training.data.global_batch_indices is original
    assert len(calls) == len(between) == 3 and all(b <= a for b, a in calls)
    assert all(torch.equal(r, original(k, 4, 10, 0)) for k, r in enumerate(rows))


def test_train_loop_own_timer_reads_only_the_window_and_removes_the_clock(tmp_path):
    """Records every step (4 images/s of batch 2: 0.5 s a step), then one at step 6 covering 5 and 6: the
    window 3..5 takes steps 3 and 4 only (the record at 6 reaches past it), less the clock's 0.1 s and 0.2 s
    inside them."""
    records = [dict(step=k, images_per_s=4.0) for k in (1, 2, 3, 4)] + [dict(step=6, images_per_s=2.0)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    inside = [0.0, 0.0, 0.1, 0.2, 0.0, 0.0]
    assert tl.loop_timer(tmp_path, 3, 5, 2, inside) == pytest.approx(((0.5 - 0.1) + (0.5 - 0.2)) / 2)
    assert tl.loop_timer(tmp_path, 5, 5, 2, inside) is None


# ----- ImageNet data -----

def test_imagenet_data_benchmark_reads_a_prepare_style_folder_and_times_prepare(tmp_path):
    from benchmarks import imagenet_data
    needs("diffusers")
    imagenet_data.write_latents(str(tmp_path / "latents"), 30, seed=0)
    manifest, arrays = train_imagenet.open_latents(str(tmp_path / "latents"))
    data = train_imagenet.latent_batches(manifest, arrays, torch.device("cpu"))
    get_batch, count = data.batch, data.num_examples
    x0, y, cond = get_batch(torch.arange(5))
    assert count == 30 and x0.shape == (5, 4, 32, 32) and cond is None and 0 <= y.min() and y.max() < 1000
    assert arrays["std"].min() >= 0                                 # a posterior std
    results = imagenet_data.main(["--model", "DiT-T/4", "--batch-size", "2", "--num-latents", "40",
                                  "--warmup", "0", "--rounds", "1", "--images", "4", "--prepare-batch", "2",
                                  "--workers", "0", "--threads", "1", "--json", str(tmp_path / "r.json")])
    assert json.loads((tmp_path / "r.json").read_text())["data_over_step"] == results["data_over_step"] > 0
    assert results["prepare_images_per_s"] > 0 and results["encoder_images_per_s"] > 0


# ----- benchmarks/gpu_check.sh -----

def test_gpu_check_dry_run_parses_every_command_and_catches_a_bad_flag(monkeypatch, capsys):
    from benchmarks import gpu_check
    assert gpu_check.main(["--dry-run"]) == 0
    printed = capsys.readouterr().out
    parts = gpu_check.commands(gpu_check.Path("w"), gpu_check.Path("j"))
    assert printed.count("ok   ") == sum(len(runs) for runs in parts.values()) == 11
    commands = gpu_check.commands

    def broken(work, json_dir):
        parts = commands(work, json_dir)
        label, argv, seconds = parts["cifar"][0]
        parts["cifar"][0] = (label, argv + ["--no-such-flag"], seconds)
        return parts
    monkeypatch.setattr(gpu_check, "commands", broken)
    assert gpu_check.main(["--dry-run", "--only", "cifar"]) == 1
    assert "FAIL cifar bf16" in capsys.readouterr().out


def test_gpu_check_summary_reads_each_parts_output(tmp_path):
    """The figures that the first GPU run will print, from files laid out as the parts write them."""
    from benchmarks import gpu_check
    json_dir = tmp_path / "json"
    json_dir.mkdir()
    methods = [dict(method=m, ms_median=ms, ratio=ms / 100, peak_mib=1000.0) for m, ms in
               [("flow matching", 100.0), ("SoFlow CFG (w 3, m 0.25)", 160.0)]]
    (json_dir / "train_step.json").write_text(json.dumps(dict(methods=methods, soflow_vs_meanflow={})))
    for p, ips in zip(gpu_check.PRECISIONS, (320.0, 200.0, 100.0)):
        (tmp_path / f"imagenet-{p}").mkdir()
        (tmp_path / f"imagenet-{p}" / "metrics.jsonl").write_text(
            json.dumps(dict(step=150, images_per_s=1.0)) + "\n"
            + json.dumps(dict(step=200, images_per_s=ips, max_memory_gb=3.5)) + "\n")
    (json_dir / "fid.json").write_text(json.dumps(dict(extractor_images_per_s={"32": 900.0},
                                                       end_to_end=dict(extractor_share=0.25))))
    status = {f"imagenet {p}": "ok" for p in gpu_check.PRECISIONS} | {"cifar bf16": "failed, see log"}
    results = gpu_check.summary(tmp_path, json_dir, status)
    assert results["train_step"]["SoFlow CFG (w 3, m 0.25)"]["images_per_s"] == 400.0  # 64 per 0.16 s
    assert results["imagenet"]["fp32"] == dict(images_per_s=100.0, peak_gib=3.5)           # the last record
    assert results["imagenet_loop_overhead"] == pytest.approx(400 / 320 - 1)
    printed = gpu_check.table(results)
    assert re.search(r"imagenet loop +overhead over the bare step +25.0%", printed)
    assert "failed: cifar bf16 (failed, see log)" in printed
    assert re.search(r"batch 250 of 32x32 +900.0 img/s", printed)
    assert re.search(r"share of sample.py --fid +25.0%", printed)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*is not the 2015-12-05 weights file")      # random Inception weights
def test_fid_benchmark_times_sample_py_fid_by_part(tmp_path):
    """benchmarks.fid --end-to-end: sample.py --fid's steps, each part on its own clock."""
    from benchmarks import fid as fid_benchmark
    results = fid_benchmark.main(["--batch-size", "2", "--sizes", "32", "--warmup", "0", "--repeats", "1",
                                  "--threads", "1", "--end-to-end", "--e2e-images", "3",
                                  "--json", str(tmp_path / "f.json")])
    e2e = results["end_to_end"]
    parts = {"noise", "generate", "decode", "convert", "fid", "write"}
    assert e2e["images"] == 3 and set(e2e["seconds"]) == parts
    assert e2e["seconds"]["fid"] > 0 and 0 < e2e["extractor_share"] < 1
    assert sum(e2e["seconds"].values()) <= e2e["loop_seconds"]
