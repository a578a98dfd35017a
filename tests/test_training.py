"""The training machinery both scripts share (training/: the loop, settings, processes, logs), on a 2D toy.

The scripts' own tests run it under torchrun with 2 processes."""
import argparse
import dataclasses
import errno
import json
import os
import signal
from dataclasses import asdict, replace
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist

import fid
import soflow
import train_toy
import training.data
import training.files
import training.logs
import training.loop
import training.processes
import training.sampling
import training.settings
from optional import needs
from training.processes import Processes

CONFIG = soflow.PRESETS["toy"]
DATA = train_toy.GaussianMixture.ring().sample(50, torch.Generator().manual_seed(0))[0]


def parse(*flags, steps=6):
    """The TrainSettings of the scripts' shared flags."""
    parser = argparse.ArgumentParser()
    training.settings.add_flags(parser, global_batch_size=8, steps=steps)
    return training.settings.settings_from_args(parser.parse_args([*flags]))


def get_batch(rows):
    """Toy rows plus a little noise: the data pipeline draws random numbers too, as augmentation does."""
    return DATA[rows] + 0.01 * torch.randn(len(rows), 2), None, None


def as_images(x):
    """2D points -> 2x2 grey images, for the sample grids."""
    return x.mean(1)[:, None, None, None].expand(-1, 3, 2, 2).clamp(-1, 1)


def toy_net():
    torch.manual_seed(0)
    return soflow.MLP(hidden=16, depth=1, dropout=0.2)


def toy_data(batch=get_batch):
    """The toy's rows as the loop reads them."""
    return training.loop.Data(len(DATA), (2,), batch)


def run(results_dir, *flags, steps=6, batches=get_batch, config=CONFIG, lr=1e-2, net=None):
    settings = parse("--results-dir", str(results_dir), "--sample-every", "1000", *flags, steps=steps)

    def optimizer(params):
        return torch.optim.Adam(params, lr=lr)
    return training.loop.train(settings, net or toy_net(), config, optimizer, toy_data(batches),
                               {"model": "toy"}, Processes(), decode=as_images)


def checkpoint(results_dir, step):
    return torch.load(results_dir / "checkpoints" / f"{step:07d}.pt", weights_only=False)


def assert_same_weights(a, b):
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][name], b[key][name]) for name in a[key]), key


def test_the_shared_flags_come_from_the_settings_in_groups():
    """Each TrainSettings field has its flag, default and help from the dataclass; --help shows the groups."""
    parser = argparse.ArgumentParser()
    training.settings.add_flags(parser, global_batch_size=8, steps=6)
    text = parser.format_help()
    for group in ("the run:", "optimisation and EMA:", "checkpoints and faults:", "evaluation:", "tracking:"):
        assert group in text
    defaults = parse("--results-dir", "r")
    for field in dataclasses.fields(training.settings.TrainSettings):
        flag = training.settings.flag_name(field.name, field.default is True)
        assert flag in text, flag
        if field.name not in ("results_dir", "global_batch_size", "steps"):
            assert getattr(defaults, field.name) == field.default, field.name       # one source of defaults
    assert (defaults.global_batch_size, defaults.steps) == (8, 6)                 # the script's own
    flipped = parse("--results-dir", "r", "--no-ema-warmup", "--compile", "--fid-nfe", "1", "2")
    assert (flipped.ema_warmup, flipped.compile, flipped.fid_nfe) == (False, True, (1, 2))
    with pytest.raises(TypeError, match="no TrainSettings field 'stepz'"):
        training.settings.add_flags(argparse.ArgumentParser(), stepz=3)


def test_global_batches_walk_through_shuffled_epochs():
    n, size = 10, 4
    # 2 epochs
    rows = torch.cat([training.data.global_batch_indices(k, size, n, seed=3) for k in range(5)])
    assert sorted(rows[:n].tolist()) == list(range(n)) and sorted(rows[n:2 * n].tolist()) == list(range(n))
    assert not torch.equal(rows[:n], rows[n:2 * n])                           # each epoch has its own order
    assert not torch.equal(rows[:n], torch.arange(n))
    # a function of the step
    assert torch.equal(training.data.global_batch_indices(3, size, n, seed=3), rows[12:16])
    assert not torch.equal(training.data.global_batch_indices(3, size, n, seed=4), rows[12:16])


def test_the_processes_split_each_global_batch_into_equal_disjoint_slices():
    for world_size in (1, 2, 4):
        parts = [training.data.rows_of_process(3, 8, 10, 5, Processes(rank, world_size))
                 for rank in range(world_size)]
        assert all(len(part) == 8 // world_size for part in parts)
        assert torch.equal(torch.cat(parts), training.data.global_batch_indices(3, 8, 10, seed=5))


def test_micro_batches_give_the_gradient_of_the_whole_batch(monkeypatch):
    """On the same draws, two micro-batches of 4 rows accumulate the gradient of one batch of 8."""
    torch.manual_seed(1)
    net = soflow.MLP(hidden=16, depth=1, num_classes=3).double()
    torch.nn.init.normal_(net.out[1].weight)
    config = replace(CONFIG, lam=0.5, w=2.0, m=0.5, drop=0.25)
    x0, y = torch.randn(8, 2, dtype=torch.float64), torch.randint(0, 3, (8,))
    halves = [soflow.draw(x0[:4], config, 0.1, labelled=True),
              soflow.draw(x0[4:], config, 0.1, labelled=True)]
    # The whole batch puts the flow matching rows (2 of each half) first.
    order = torch.tensor([0, 1, 4, 5, 2, 3, 6, 7])
    whole = soflow.Draws(x1=torch.cat([d.x1 for d in halves])[order],
                         t_fm=torch.cat([d.t_fm for d in halves]), t=torch.cat([d.t for d in halves]),
                         s=torch.cat([d.s for d in halves]), l=torch.cat([d.l for d in halves]),
                         keep=torch.cat([d.keep for d in halves])[order])
    draws = iter(halves)
    monkeypatch.setattr(soflow, "draw", lambda *args, **kw: next(draws))
    autocast = torch.autocast("cpu", enabled=False)
    batches = [(x0[:4], y[:4], None), (x0[4:], y[4:], None)]
    diagnostics = training.loop.accumulate_gradients(net, batches, config, 0, 10, autocast)
    accumulated = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    loss, whole_diagnostics = soflow.soflow_loss(net, x0[order], y[order], config=config, step=0,
                                                 total_steps=10, draws=whole)
    loss.backward()
    for a, b in zip(accumulated, net.parameters()):
        torch.testing.assert_close(a, b.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(diagnostics["loss"], whole_diagnostics["loss"].float())


def test_stopped_and_resumed_run_ends_where_a_straight_run_ends(tmp_path):
    run(tmp_path / "straight", "--micro-batch", "4")
    run(tmp_path / "resumed", "--micro-batch", "4", "--stop-at", "3")
    assert sorted(os.listdir(tmp_path / "resumed" / "checkpoints")) == ["0000003.pt"]
    run(tmp_path / "resumed", "--micro-batch", "4")
    assert_same_weights(checkpoint(tmp_path / "straight", 6), checkpoint(tmp_path / "resumed", 6))
    ckpt = checkpoint(tmp_path / "resumed", 6)
    assert ckpt["step"] == 6 and ckpt["arch"] == "MLP" and ckpt["config"] == asdict(CONFIG)
    log = (tmp_path / "resumed" / "log.txt").read_text()
    assert "resuming at step 3 of 6" in log
    # load_network rebuilds the EMA network and the config it was trained with.
    net = soflow.load_network(tmp_path / "resumed" / "checkpoints" / "0000006.pt")
    assert net.soflow_config == CONFIG and not net.training
    assert all(torch.equal(v, ckpt["ema"][k]) for k, v in net.state_dict().items())


def test_a_run_folder_with_another_configuration_is_refused(tmp_path):
    run(tmp_path, "--stop-at", "2")
    with pytest.raises(SystemExit, match=r"another configuration:\n  config: .*lam"):
        run(tmp_path, config=replace(CONFIG, lam=0.25))
    with pytest.raises(SystemExit, match="global_batch_size: 8 in the run, 4 now"):
        run(tmp_path, "--global-batch-size", "4")


def test_a_run_folder_written_before_the_config_key_was_renamed_resumes(tmp_path):
    """Checkpoints of earlier versions record the SoFlowConfig under run_config['cfg'].

    They resume as they are.
    """
    run(tmp_path / "straight")
    run(tmp_path / "old", "--stop-at", "3")
    path = tmp_path / "old" / "checkpoints" / "0000003.pt"
    ckpt = torch.load(path, weights_only=False)
    recorded = ckpt["run_config"].pop("config")
    ckpt["run_config"]["cfg"] = {**recorded, "lam": 0.25}          # the old key is still compared
    torch.save(ckpt, path)
    with pytest.raises(SystemExit, match=r"another configuration:\n  config: .*lam"):
        run(tmp_path / "old")
    ckpt["run_config"]["cfg"] = recorded
    torch.save(ckpt, path)
    run(tmp_path / "old")
    assert_same_weights(checkpoint(tmp_path / "straight", 6), checkpoint(tmp_path / "old", 6))


def test_a_checkpoint_is_written_atomically(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"

    def save_checkpoint(path, **state):
        training.files.atomic_write(path, lambda tmp: torch.save(state, tmp))
    save_checkpoint(path, step=1)
    assert torch.load(path)["step"] == 1

    def broken(obj, f):
        open(f, "wb").write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError):
        save_checkpoint(path, step=2)
    monkeypatch.undo()
    assert torch.load(path)["step"] == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_the_newest_checkpoints_are_kept_and_a_failed_save_stops_with_a_message(tmp_path, monkeypatch):
    """A full disk at a save: the run stops, saying what happened and what to do; the checkpoints stay."""
    run(tmp_path, "--ckpt-every", "1", "--keep-ckpts", "2", "--stop-at", "4")
    folder = tmp_path / "checkpoints"
    assert sorted(os.listdir(folder)) == ["0000003.pt", "0000004.pt"]
    before = {name: (folder / name).read_bytes() for name in os.listdir(folder)}

    def full_disk(obj, f):
        open(f, "wb").write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SystemExit) as stopped:
        run(tmp_path, "--ckpt-every", "1", "--keep-ckpts", "2")
    monkeypatch.undo()
    message = str(stopped.value)
    assert "\n" not in message
    assert f"could not write {folder / '0000005.pt'} (OSError: [Errno 28] No space left on device)" in message
    assert "the checkpoints on disk are kept, and the same command resumes the run once the cause" in message
    # Byte for byte the same files, and no temporary one left.
    assert {name: (folder / name).read_bytes() for name in os.listdir(folder)} == before


def test_a_failed_grid_stops_the_run_and_a_folder_in_the_way_of_a_checkpoint_too(tmp_path):
    """Any write of the loop that fails ends it with the file and the error: a grid, a checkpoint."""
    (tmp_path / "grid" / "samples" / "0000002.png").mkdir(parents=True)
    with pytest.raises(SystemExit, match=r"could not write .*samples/0000002.png \(IsADirectoryError"):
        run(tmp_path / "grid", "--sample-every", "2", "--ckpt-every", "1")
    assert sorted(os.listdir(tmp_path / "grid" / "checkpoints")) == ["0000001.pt"]    # step 2 never saved
    (tmp_path / "ckpt" / "checkpoints" / f"0000002.pt.tmp{os.getpid()}").mkdir(parents=True)
    # torch's own words for it vary by version ("Is a directory", "cannot be opened").
    with pytest.raises(SystemExit, match=r"could not write .*checkpoints/0000002.pt \(\w+Error: "):
        run(tmp_path / "ckpt", "--ckpt-every", "1")


def truncate(path):
    """Cut a file in half: a copy to the shared file system that was cut off."""
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def test_an_unreadable_newest_checkpoint_is_moved_aside_and_the_one_before_resumes(tmp_path, capsys):
    run(tmp_path / "straight")
    run(tmp_path / "cut", "--ckpt-every", "2", "--stop-at", "4")
    truncate(tmp_path / "cut" / "checkpoints" / "0000004.pt")
    run(tmp_path / "cut", "--ckpt-every", "2")
    assert_same_weights(checkpoint(tmp_path / "straight", 6), checkpoint(tmp_path / "cut", 6))
    names = sorted(os.listdir(tmp_path / "cut" / "checkpoints"))
    assert names == ["0000002.pt", "0000004.pt", "0000004.pt.corrupt", "0000006.pt"]
    said = [line for line in capsys.readouterr().out.splitlines() if "cannot be resumed from" in line]
    assert len(said) == 1 and "0000004.pt cannot be resumed from (RuntimeError: " in said[0]
    assert "moved to" in said[0] and "resuming from 0000002.pt" in said[0]
    assert said[0] in (tmp_path / "cut" / "log.txt").read_text()
    # A checkpoint without a key it needs (the optimizer) is unreadable too.
    ckpt = checkpoint(tmp_path / "cut", 6)
    del ckpt["optimizer"]
    torch.save(ckpt, tmp_path / "cut" / "checkpoints" / "0000006.pt")
    run(tmp_path / "cut", "--ckpt-every", "2", "--stop-at", "4")      # past step 4 already: it only resumes
    assert "0000006.pt cannot be resumed from (no optimizer)" in capsys.readouterr().out
    assert (tmp_path / "cut" / "checkpoints" / "0000006.pt.corrupt").exists()


def test_pruning_keeps_the_readable_checkpoints_and_nothing_readable_is_refused(tmp_path):
    run(tmp_path, "--ckpt-every", "1", "--keep-ckpts", "2", "--stop-at", "4")
    truncate(tmp_path / "checkpoints" / "0000004.pt")
    run(tmp_path, "--ckpt-every", "1", "--keep-ckpts", "2")
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["0000004.pt.corrupt", "0000005.pt", "0000006.pt"]
    for name in ("0000005.pt", "0000006.pt"):
        truncate(tmp_path / "checkpoints" / name)
    with pytest.raises(SystemExit, match=r"no checkpoint in .* can be resumed from:\n  .*0000006.pt: "):
        run(tmp_path, "--ckpt-every", "1", "--keep-ckpts", "2")
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["0000004.pt.corrupt", "0000005.pt", "0000006.pt"]


def test_dist_timeout_reaches_init_process_group_and_each_restart_gets_its_own_keys(monkeypatch):
    """--dist-timeout (minutes) becomes the process group's timeout: a lost peer ends the job that soon.

    Under torchrun --max-restarts the store outlives a restart: attempt n's keys get the prefix attemptn."""
    store, calls = dist.HashStore(), []
    store.set_timeout(timedelta(seconds=5))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    monkeypatch.setattr(training.processes.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(training.processes.dist, "rendezvous", lambda url, timeout: iter([(store, 0, 1)]))
    monkeypatch.setattr(training.processes.dist, "init_process_group", lambda *a, **kw: calls.append((a, kw)))
    monkeypatch.setattr(training.processes.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(training.processes.dist, "get_world_size", lambda: 1)
    monkeypatch.setattr(training.processes.dist, "destroy_process_group", lambda: calls.append("destroyed"))
    settings = parse("--results-dir", "unused", "--dist-timeout", "0.5")
    with training.processes.started(settings.dist_timeout) as procs:
        assert procs == Processes(0, 1, torch.device("cpu"))
    (args, kw), destroyed = calls
    assert destroyed == "destroyed"                               # the script's group ends with it
    with pytest.raises(RuntimeError, match="a failed step"):       # and on an error too
        with training.processes.started(settings.dist_timeout):
            raise RuntimeError("a failed step")
    assert calls[-1] == "destroyed" and len(calls) == 4
    assert args == ("gloo",) and kw["timeout"] == timedelta(seconds=30)
    assert (kw["rank"], kw["world_size"]) == (0, 1)
    kw["store"].set("address", "here")
    assert store.get("attempt2/address") == b"here"
    assert parse("--results-dir", "unused").dist_timeout == 5.0


def test_non_finite_steps_are_skipped_and_many_in_a_row_stop_the_run(tmp_path, capsys):
    calls = []

    def poisoned_at_step_3(rows):                        # one call per step
        calls.append(1)
        x0, y, cond = get_batch(rows)
        return (x0 * float("nan") if len(calls) == 3 else x0), y, cond
    net, _ = run(tmp_path / "one", batches=poisoned_at_step_3)
    out = capsys.readouterr().out
    assert "step 3: non-finite loss or gradient, update skipped (1 in a row)" in out
    assert out.count("skipped") == 1
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert checkpoint(tmp_path / "one", 6)["step"] == 6

    def always_nan(rows):
        x0, y, cond = get_batch(rows)
        return x0 * float("nan"), y, cond
    with pytest.raises(SystemExit, match="3 non-finite steps in a row"):
        run(tmp_path / "all", "--max-bad-steps", "3", batches=always_nan)
    assert not (tmp_path / "all" / "checkpoints").exists()                   # nothing non-finite was saved


def test_sigterm_saves_at_the_step_boundary_and_the_same_command_resumes(tmp_path):
    calls = []

    def preempted(rows):
        calls.append(1)
        if len(calls) == 3:                                                   # during step 2 (0-based)
            os.kill(os.getpid(), signal.SIGTERM)
        return get_batch(rows)
    previous = signal.getsignal(signal.SIGTERM)
    run(tmp_path, batches=preempted)
    assert signal.getsignal(signal.SIGTERM) == previous                      # handlers restored
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["0000003.pt"]
    run(tmp_path)
    assert checkpoint(tmp_path, 6)["step"] == 6


def test_sample_grid_is_written(tmp_path):
    settings = parse("--results-dir", str(tmp_path), "--sample-every", "2", steps=2)
    training.loop.train(settings, toy_net(), CONFIG, torch.optim.Adam, toy_data(), {}, Processes(),
                        decode=as_images)
    import matplotlib.pyplot as plt
    grid = plt.imread(tmp_path / "samples" / "0000002.png")
    assert grid.shape[:2] == (2 * 4, 2 * 16)             # 32 one-step and 32 two-step images, 16 per row
    # Its values: the step-2 EMA's one- and two-step samples of the grid's own noise (seed --global-seed 0).
    ema = toy_net().eval()
    ema.load_state_dict(checkpoint(tmp_path, 2)["ema"])
    noise = torch.randn(32, 2, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    with torch.no_grad():
        images = [as_images(soflow.sample(ema, noise, config=CONFIG, steps=k)) for k in (1, 2)]
    pixels = training.files.to_uint8(torch.cat(images)).permute(0, 2, 3, 1).numpy()       # (64, 2, 2, 3)
    rows = [np.concatenate(list(pixels[r * 16:(r + 1) * 16]), axis=1) for r in range(4)]  # 16 per row
    assert np.array_equal((grid[..., :3] * 255).round().astype(np.uint8), np.concatenate(rows, axis=0))


def test_ema_every_k_steps_uses_decay_to_the_k(tmp_path):
    """--ema-every 2 --ema-decay 0.5 --no-ema-warmup: at step 2 the EMA moves once with decay 0.5^2.

    The move starts from the initial weights: the released code's constant decay.
    """
    run(tmp_path, "--ema-every", "2", "--ema-decay", "0.5", "--no-ema-warmup", steps=2)
    ckpt = checkpoint(tmp_path, 2)
    initial = toy_net().state_dict()
    for name, ema in ckpt["ema"].items():
        expected = 0.25 * initial[name] + 0.75 * ckpt["model"][name]
        torch.testing.assert_close(ema, expected, rtol=1e-6, atol=1e-7)


def test_the_ema_warms_up_from_a_tenth_of_the_initial_network(tmp_path):
    """By default update k decays by min(ema_decay, (1 + k) / (10 + k)): 1/10 at the first, then 2/11."""
    run(tmp_path, "--ckpt-every", "1", "--ema-decay", "0.99", steps=2)
    initial, (first, second) = toy_net().state_dict(), (checkpoint(tmp_path, k) for k in (1, 2))
    for name in initial:
        ema1 = 0.1 * initial[name] + 0.9 * first["model"][name]
        torch.testing.assert_close(first["ema"][name], ema1, rtol=1e-6, atol=1e-7)
        ema2 = 2 / 11 * ema1 + 9 / 11 * second["model"][name]
        torch.testing.assert_close(second["ema"][name], ema2, rtol=1e-6, atol=1e-7)
    decays = [training.loop.ema_decay_at(k, 0.9999) for k in (0, 89_989, 89_990, 400_000)]
    assert decays == [0.1, 89_990 / 89_999, 0.9999, 0.9999]
    assert training.loop.ema_decay_at(0, 0.9999, warmup=False) == 0.9999


def test_the_log_records_means_since_the_last_record_and_the_bar_shows_the_weights(tmp_path):
    log = training.logs.RunLog(str(tmp_path), Processes(), start=0, end=4)
    for loss, weight in ((1.0, 2.0), (3.0, 6.0)):
        log.add({"loss": torch.tensor(loss), "scm_mse": torch.tensor(0.5),
                 "scm_weight": torch.tensor(weight)}, 0.5)
    log.record(2, images_per_step=8)
    log.add({"loss": torch.tensor(7.0), "scm_mse": torch.tensor(0.5), "scm_weight": torch.tensor(1.0)}, 0.25)
    log.record(3, images_per_step=8)
    log.bar.close()
    first, second = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert first == {"step": 2, "loss": 2.0, "scm_mse": 0.5, "scm_weight": 4.0, "images_per_s": 16.0}
    assert second == {"step": 3, "loss": 7.0, "scm_mse": 0.5, "scm_weight": 1.0, "images_per_s": 32.0}
    assert "step=3 loss=7" in (tmp_path / "log.txt").read_text()
    assert "scm_weight=1" in log.bar.postfix and "loss=7" in log.bar.postfix


def test_ema_update():
    a, b = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    old = a.weight.detach().clone()
    training.loop.ema_update(a, b, 0.9)
    assert torch.allclose(a.weight, 0.9 * old + 0.1 * b.weight)


# ----- Fine-tuning, precision, wandb -----

def test_init_from_starts_a_new_run_from_the_ema_or_raw_weights_with_a_fresh_optimizer(tmp_path, capsys):
    run(tmp_path / "a", "--ema-decay", "0.5")
    source = checkpoint(tmp_path / "a", 6)
    for flags, key in [((), "ema"), (("--init-from-raw",), "model")]:
        # lr 0: the one step moves nothing, so the checkpoint holds the weights the run started from.
        folder = tmp_path / f"b-{key}"
        run(folder, "--init-from", str(tmp_path / "a"), *flags, steps=1, lr=0.0)
        ckpt = checkpoint(folder, 1)
        for name, value in source[key].items():
            assert torch.equal(ckpt["model"][name], value) and torch.equal(ckpt["ema"][name], value)
        assert ckpt["optimizer"]["state"][0]["step"] == 1                   # fresh: A's Adam took 6 steps
        assert f"a new run from the {key.upper() if key == 'ema' else 'raw'} weights of" in (
            folder / "log.txt").read_text()
    assert any(not torch.equal(source["ema"][k], source["model"][k]) for k in source["ema"])   # two cases
    # A folder with checkpoints resumes them; --init-from is said to be for new runs.
    run(tmp_path / "b-ema", "--init-from", str(tmp_path / "a"), steps=1, lr=0.0)
    assert "resuming them (--init-from is for a new run)" in (tmp_path / "b-ema" / "log.txt").read_text()
    # Another size is refused before anything is written.
    torch.manual_seed(0)
    with pytest.raises(SystemExit, match="--init-from .*does not fit MLP"):
        run(tmp_path / "c", "--init-from", str(tmp_path / "a"), net=soflow.MLP(hidden=8, depth=1))
    assert not (tmp_path / "c" / "checkpoints").exists()
    with pytest.raises(SystemExit, match="no such file"):
        run(tmp_path / "d", "--init-from", str(tmp_path / "nowhere.pt"))


def test_precision_choices_on_the_cpu(tmp_path, keep_tf32):
    cpu = torch.device("cpu")
    fid.set_tf32(False)
    off = fid.tf32_settings()
    fid.set_tf32(True)
    precision, autocast = training.loop.set_precision("", cpu)                  # the CPU default
    assert precision == "fp32" and fid.tf32_settings() == off
    a = torch.randn(4, 4)
    with autocast:
        assert (a @ a).dtype == torch.float32
    with training.loop.set_precision("bf16", cpu)[1]:
        assert (a @ a).dtype == torch.bfloat16
    with pytest.raises(SystemExit, match="tf32 needs an NVIDIA GPU.*fp32 or bf16"):
        training.loop.set_precision("tf32", cpu)
    # A run records its precision in every checkpoint and its log; bf16 autocast changes the numbers.
    run(tmp_path / "fp32", steps=2)
    run(tmp_path / "bf16", "--precision", "bf16", steps=2)
    fp32, bf16 = checkpoint(tmp_path / "fp32", 2), checkpoint(tmp_path / "bf16", 2)
    assert fp32["precision"] == "fp32" and bf16["precision"] == "bf16"
    assert "parameters, bf16" in (tmp_path / "bf16" / "log.txt").read_text()
    assert any(not torch.equal(fp32["model"][k], bf16["model"][k]) for k in fp32["model"])


def wandb_records(run_folder):
    """The history records of a wandb run folder's .wandb file (LevelDB log blocks of protobuf Records)."""
    from wandb.proto import wandb_internal_pb2
    data = next(run_folder.glob("run-*.wandb")).read_bytes()
    records, chunks, position = [], [], 7                       # after the header: ":W&B", magic, version
    while position + 7 <= len(data):
        block_left = 32768 - position % 32768
        if block_left < 7:                                      # a block's tail too short for a header
            position += block_left
            continue
        length, kind = int.from_bytes(data[position + 4:position + 6], "little"), data[position + 6]
        chunks.append(data[position + 7:position + 7 + length])
        position += 7 + length
        if kind in (1, 4):                                      # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            if record.WhichOneof("record_type") == "history":
                records.append({item.key or ".".join(item.nested_key): json.loads(item.value_json)
                                for item in record.history.item})
    return records


def test_wandb_logs_the_metrics_and_grids_and_a_resumed_run_continues_it(tmp_path, monkeypatch):
    needs("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    flags = ("--wandb-project", "soflow-test", "--log-every", "2", "--sample-every", "4")
    run(tmp_path, *flags, "--stop-at", "4")
    run(tmp_path, *flags)
    run_id = (tmp_path / "wandb_id.txt").read_text().strip()
    folders = sorted((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(folders) == 2                                    # two sessions of the same wandb run
    logged = [r for folder in folders for r in wandb_records(folder)]
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [{k: r[k] for k in metrics[0]} for r in logged if "loss" in r] == metrics
    # The grids, in the rows of their steps, with their PNGs among the run's files.
    assert [(r["_step"], r["samples._type"]) for r in logged if "samples._type" in r] == [(4, "image-file"),
                                                                                        (6, "image-file")]
    assert len(list((tmp_path / "wandb").glob("offline-run-*/files/media/images/samples_*.png"))) == 2


# ----- FID during training -----

class TinyExtractor(torch.nn.Module):
    """Stands in for fid.py's Inception (the plumbing is under test): uint8 images -> 3 features."""
    feature_dim = 3

    def forward(self, images):
        x = images.float().flatten(1) / 255
        return torch.stack([x.mean(1), x.amin(1), x.amax(1) ** 2], 1)


def test_fid_during_training_is_recorded_resume_safe_and_changes_no_weight(tmp_path, monkeypatch):
    import fid
    monkeypatch.setattr(fid, "load_inception", lambda weights=None, device="cpu": TinyExtractor())
    stats = fid.FeatureStats(3).add(TinyExtractor()(training.files.to_uint8(as_images(DATA))))
    mu, sigma = stats.mu_sigma()
    np.savez(tmp_path / "ref.npz", mu=mu, sigma=sigma)
    flags = ("--fid-every", "3", "--fid-ref", str(tmp_path / "ref.npz"), "--fid-images", "20",
             "--fid-nfe", "1", "2")
    run(tmp_path / "plain")
    run(tmp_path / "fid", *flags)
    assert_same_weights(checkpoint(tmp_path / "plain", 6), checkpoint(tmp_path / "fid", 6))
    records = [json.loads(line) for line in (tmp_path / "fid" / "metrics.jsonl").read_text().splitlines()]
    fids = [r for r in records if "fid_1nfe" in r]
    assert [r["step"] for r in fids] == [3, 6] and all(r["fid_images"] == 20 for r in fids)
    assert "fid_1nfe=" in (tmp_path / "fid" / "log.txt").read_text()
    # The number: 20 images of step 6's EMA, image i from its own generator, in batches of 8 (the run's: the
    # same kernels), against the reference.
    ema = toy_net().eval()
    ema.load_state_dict(checkpoint(tmp_path / "fid", 6)["ema"])
    for nfe in (1, 2):
        direct = fid.FeatureStats(3)
        for indices in torch.arange(20).split(8):
            _, x1, eps = training.sampling.per_image_draws(0, indices, (2,), 0, None, nfe - 1)
            x0 = soflow.sample(ema, x1, eps=eps, config=CONFIG, steps=nfe, mode="renoise")
            direct.add(TinyExtractor()(training.files.to_uint8(as_images(x0))))
        expected = fid.frechet_distance(*direct.mu_sigma(), mu, sigma)
        assert fids[1][f"fid_{nfe}nfe"] == pytest.approx(expected, rel=1e-12)
    assert fids[1]["fid_1nfe"] != fids[1]["fid_2nfe"] and fids[0]["fid_1nfe"] != fids[1]["fid_1nfe"]
    # Stopped after the first FID and resumed: the same records.
    run(tmp_path / "resumed", *flags, "--stop-at", "3")
    run(tmp_path / "resumed", *flags)
    resumed = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["fid_2nfe"] for r in resumed if "fid_2nfe" in r] == [r["fid_2nfe"] for r in fids]
    with pytest.raises(SystemExit, match="--fid-every needs --fid-ref"):
        parse("--results-dir", str(tmp_path), "--fid-every", "3")

