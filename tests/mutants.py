"""Mutation check: does the suite notice when the code is wrong?

Each mutant is a deliberate single-line error in a copy of one file: an equation of soflow.py, a constant
from the paper or the released code, a sampler or schedule branch, the batch split, the EMA, the networks'
time and label inputs; the exact toy of train_toy.py; the loop, seeding and resume of training.py; the
scripts' data and seeding lines. The tests of its section run against it; a mutant that passes them all
survives, and names a gap in the suite. Run on demand, not in CI:

    python tests/mutants.py              # every mutant: about 15 min on 2 cores
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
# Each section runs the tests that should catch its mutants (-x: the first failure decides); "slow" sections
# include the end-to-end runs marked slow.
SECTIONS = {
    "method": (["tests/test_soflow.py"], False),
    "networks": (["tests/test_networks.py"], False),
    "toy": (["tests/test_train_toy.py"], False),
    "training": (["tests/test_training.py"], False),
    "processes": (["tests/test_train_cifar.py"], True),          # the 2-process runs
    "cifar": (["tests/test_train_cifar.py"], False),
    "imagenet": (["tests/test_train_imagenet.py"], True),
    "sample": (["tests/test_sample.py"], True),
    "hub": (["tests/test_hub.py"], False),
    "fid": (["tests/test_fid.py"], True),
}
COPIED = ["soflow.py", "training.py", "train_toy.py", "train_cifar.py", "train_imagenet.py", "sample.py",
          "fid.py", "tests", "benchmarks", "pytest.ini"]

# (name, file, section, the line as it is, the line as the mutant has it); "as it is" occurs once in the file.
MUTANTS = [
    ('schedule-linear-alpha', 'soflow.py', 'method',
     'def alpha(self, t): return 1 - t',
     'def alpha(self, t): return 1 + t'),
    ('schedule-triangular-dbeta', 'soflow.py', 'method',
     'return math.pi / 2 * torch.cos(math.pi / 2 * t)',
     'return math.pi / 2 * torch.sin(math.pi / 2 * t)'),
    ('eq4-velocity', 'soflow.py', 'method',
     'v_t = per_sample(schedule.d_alpha(t), x0) * x0',
     'v_t = per_sample(schedule.alpha(t), x0) * x0'),
    ('param-euler-b', 'soflow.py', 'method',
     'def b(self, t, s): return s - t',
     'def b(self, t, s): return t - s'),
    ('param-triangular-db', 'soflow.py', 'method',
     'torch.full_like(t, math.pi / 2)',
     'torch.full_like(t, math.pi)'),
    ('param-f-from-F', 'soflow.py', 'method',
     'per_sample(param.b(t, s), x) * F_out',
     'per_sample(param.a(t, s), x) * F_out'),
    ('eq10-velocity', 'soflow.py', 'method',
     'per_sample(param.db_ds(t), x) * F_out',
     'per_sample(param.b(t, t), x) * F_out'),
    ('logit-normal-mean', 'soflow.py', 'method',
     'torch.randn(n, device=device) * sd + mu',
     'torch.randn(n, device=device) * sd'),
    ('r-exp', 'soflow.py', 'method',
     'return config.r_init * (config.r_end / config.r_init) ** progress',
     'return config.r_end * (config.r_end / config.r_init) ** progress'),
    ('r-cosine', 'soflow.py', 'method',
     '0.5 * (1 + math.cos(math.pi * progress))',
     '0.5 * (1 - math.cos(math.pi * progress))'),
    ('r-linear', 'soflow.py', 'method',
     'return config.r_init + (config.r_end - config.r_init) * progress',
     'return config.r_end + (config.r_end - config.r_init) * progress'),
    ('r-constant', 'soflow.py', 'method',
     '    return config.r_end                             ',
     '    return config.r_init       '),
    ('t-clamp', 'soflow.py', 'method',
     '.clamp(min=1e-4)',
     '.clamp(min=1e-3)'),
    ('s-clamp', 'soflow.py', 'method',
     'logit_normal(n, config.s_mu, config.s_sd, device), t - 1e-4)',
     'logit_normal(n, config.s_mu, config.s_sd, device), t - 1e-2)'),
    ('eq16-side', 'soflow.py', 'method',
     'l = torch.minimum(t + (s - t) * r, t - 1e-4)',
     'l = torch.minimum(t - (s - t) * r, t - 1e-4)'),
    ('eq12-exponent', 'soflow.py', 'method',
     '(mse.detach() + config.eps) ** config.p)',
     '(mse.detach() + config.eps) ** (config.p / 2))'),
    ('eq12-constant-weight', 'soflow.py', 'method',
     '(mse.detach() + config.eps) ** config.p)',
     '(mse + config.eps) ** config.p)'),
    ('eq14-step', 'soflow.py', 'method',
     'x_l = x_t + per_sample(l - t, x_t) * v',
     'x_l = x_t + per_sample(t - l, x_t) * v'),
    ('eq13-quotient', 'soflow.py', 'method',
     'dq = (f_t - f_l) / per_sample(t - l, x_t)',
     'dq = (f_t - f_l) / per_sample(t - s, x_t)'),
    ('eq15-exponent', 'soflow.py', 'method',
     'weight = 1 / (mse + config.eps) ** config.p',
     'weight = 1 / (mse + config.eps) ** (2 * config.p)'),
    ('eq14-sign-b', 'soflow.py', 'method',
     'sign_b = torch.sign(PARAMETERIZATIONS[config.param].b(t, s))',
     'sign_b = torch.ones_like(t)'),
    ('dropout-masks', 'soflow.py', 'method',
     'with torch.random.fork_rng(devices=devices), torch.no_grad():',
     'with torch.no_grad():'),
    ('decay-exp-constant', 'soflow.py', 'method',
     '1 - torch.exp(-0.025 * d / (1 - d))',
     '1 - torch.exp(-0.05 * d / (1 - d))'),
    ('decay-linear', 'soflow.py', 'method',
     'return d.clamp(0, 1)',
     'return d.clamp(0, 0.5)'),
    ('decay-start', 'soflow.py', 'method',
     'd = (1 - t) / (1 - config.decay_t)',
     'd = (1 - t) / (1 - 0.9)'),
    ('eq18-strength', 'soflow.py', 'method',
     'return 1 + guidance_decay(t, config) * (config.w - 1)',
     'return config.w * guidance_decay(t, config)'),
    ('eq18-direction', 'soflow.py', 'method',
     '* (v_t - v_uncond)',
     '* (v_uncond - v_t)'),
    ('eq19-mix', 'soflow.py', 'method',
     '(1 - per_sample(m, v_cfg)) * v_guided',
     '(1 - per_sample(m, v_cfg)) * v_cfg'),
    ('null-label', 'soflow.py', 'method',
     'return torch.where(keep, y, num_classes)',
     'return torch.where(keep, y, 0)'),
    ('dropped-rows-unmixed', 'soflow.py', 'method',
     'm = torch.where(keep, config.m, 1.0)',
     'm = torch.where(keep, config.m, config.m)'),
    ('v-uncond-label', 'soflow.py', 'method',
     'torch.full_like(y, unwrap(net).num_classes)',
     'y.clone()'),
    ('label-drop-rate', 'soflow.py', 'method',
     '>= config.drop if labelled',
     '< config.drop if labelled'),
    ('alg1-split', 'soflow.py', 'method',
     'n_fm = int(config.lam * B)',
     'n_fm = math.ceil(config.lam * B)'),
    ('alg1-fm-share', 'soflow.py', 'method',
     'loss = loss + loss_fm.mean() * n_fm / B',
     'loss = loss + loss_fm.mean()'),
    ('alg1-fm-s-equals-t', 'soflow.py', 'method',
     's = torch.cat([d.t_fm, d.s])',
     's = torch.cat([0 * d.t_fm, d.s])'),
    ('alg1-fm-own-guided', 'soflow.py', 'method',
     'mix_velocity(v_cfg[fm], v_pred.detach(), m[fm])',
     'mix_velocity(v_cfg[fm], v_t[fm], m[fm])'),
    ('sample-chain', 'soflow.py', 'method',
     'x = solution(net, x, t, torch.full_like(t, t_next), y, cond, config=config)',
     'x = solution(net, x, t, torch.zeros_like(t), y, cond, config=config)'),
    ('sample-renoise', 'soflow.py', 'method',
     'per_sample(schedule.beta(s), x) * noise',
     'per_sample(schedule.alpha(s), x) * noise'),
    ('sample-grid', 'soflow.py', 'method',
     '        times = torch.linspace(1, 0, steps + 1)\n',
     '        times = torch.linspace(1, 0.02, steps + 1)\n'),
    ('sample-euler', 'soflow.py', 'method',
     'x = x + (t_next - t_i) * velocity',
     'x = x + (t_i - t_next) * velocity'),
    ('dit-gap', 'soflow.py', 'networks',
     'c = self.t_embedder(t) + self.s_embedder(t - s) + self.y_embedder(y)',
     'c = self.t_embedder(t) + self.s_embedder(s) + self.y_embedder(y)'),
    ('dit-label', 'soflow.py', 'networks',
     'c = self.t_embedder(t) + self.s_embedder(t - s) + self.y_embedder(y)',
     'c = self.t_embedder(t) + self.s_embedder(t - s)'),
    ('dit-sinusoid-order', 'soflow.py', 'networks',
     'torch.cat([torch.cos(args), torch.sin(args)], dim=-1)',
     'torch.cat([torch.sin(args), torch.cos(args)], dim=-1)'),
    ('dit-adaln', 'soflow.py', 'networks',
     'x * (1 + scale[:, None]) + shift[:, None]',
     'x * scale[:, None] + shift[:, None]'),
    ('unet-gap', 'soflow.py', 'networks',
     'positional_embedding(t - s, nc)',
     'positional_embedding(s, nc)'),
    ('unet-label', 'soflow.py', 'networks',
     'emb = emb + self.map_label(y)',
     'emb = emb + 0 * self.map_label(y)'),
    ('unet-augment', 'soflow.py', 'networks',
     'emb = emb + self.map_augment(cond)',
     'emb = emb + 0 * self.map_augment(cond)'),
    ('unet-skip-scale', 'soflow.py', 'networks',
     'SKIP_SCALE = math.sqrt(0.5)',
     'SKIP_SCALE = 0.5'),
    ('unet-fir-up-gain', 'soflow.py', 'networks',
     'F.conv_transpose2d(x, 4 * kernel',
     'F.conv_transpose2d(x, 2 * kernel'),
    ('ema-direction', 'training.py', 'training',
     'e.lerp_(p.detach().to(e.dtype), 1 - ema_decay)',
     'e.lerp_(p.detach().to(e.dtype), ema_decay)'),
    ('ema-every', 'training.py', 'training',
     'ema_update(ema, net, step_ema_decay ** settings.ema_every)',
     'ema_update(ema, net, step_ema_decay)'),
    ('ema-warmup-ramp', 'training.py', 'training',
     'return min(ema_decay, (1 + step) / (10 + step)) if warmup',
     'return min(ema_decay, (1 + step) / (100 + step)) if warmup'),
    ('micro-batch-weight', 'training.py', 'training',
     '(loss * len(x0) / total_rows).backward()',
     'loss.backward()'),
    ('epoch-shuffle', 'training.py', 'training',
     'manual_seed(seed * 100_003 + epoch)',
     'manual_seed(seed * 100_003)'),
    ('resume-rng', 'training.py', 'training',
     'set_rng_state(ckpt["rng"][rank])',
     'pass'),
    ('rank-rng', 'training.py', 'processes',
     'set_rng_state(ckpt["rng"][rank])',
     'set_rng_state(ckpt["rng"][0])'),
    ('rank-seed', 'training.py', 'processes',
     'torch.manual_seed(settings.global_seed * world_size + rank)',
     'torch.manual_seed(settings.global_seed)'),
    ('toy-posterior-mean', 'train_toy.py', 'toy',
     'x0_mean = self.means[None] + a * self.std ** 2 / var * offset',
     'x0_mean = self.means[None] + a / var * offset'),
    ('toy-eq18-guidance', 'train_toy.py', 'toy',
     'return w * v_c + (1 - w) * v',
     'return w * v_c + (1 - w) * v_c'),
    ('toy-rk4-weights', 'train_toy.py', 'toy',
     'x = x + h / 6 * (k1 + 2 * k2 + 2 * k3',
     'x = x + h / 6 * (k1 + 2 * k2 + k3'),
    ('toy-ema-warmup', 'train_toy.py', 'toy',
     'ema_update(average, net, ema_decay_at(k, ema_decay))',
     'ema_update(average, net, ema_decay)'),
    ('toy-same-mode', 'train_toy.py', 'toy',
     'same_mode=float((mode(x0_hat) == mode(x0_exact))',
     'same_mode=float((mode(x0_hat) == mode(x0_hat))'),
    ('decay-time-1-no-decay', 'soflow.py', 'method',
     'if config.decay == "none" or config.decay_t == 1:',
     'if config.decay == "none":'),
    ('released-time-order', 'training.py', 'hub',
     'RELEASED_TIMES = {"time_mean": ("fm_mu", "s_mu", "t_mu")',
     'RELEASED_TIMES = {"time_mean": ("fm_mu", "t_mu", "s_mu")'),
    ('released-decay-none', 'training.py', 'hub',
     'values["cfg_decay_time"] = 1.0',
     'values["cfg_decay_time"] = 0.8'),
    ('released-config-ignored', 'training.py', 'hub',
     'config, where = released_config(path)',
     'config, where = None, "skipped"'),
    ('hub-rank-order', 'training.py', 'hub',
     '    if rank > 0:\n        dist.barrier()\n    try:\n        local = soflow.hub_file',
     '    try:\n        local = soflow.hub_file'),
    ('init-from-raw-ignored', 'training.py', 'training',
     'open_network(settings.init_from, not settings.init_from_raw, rank, world_size)',
     'open_network(settings.init_from, True, rank, world_size)'),
    ('init-from-ema-kept', 'training.py', 'training',
     '    ema.load_state_dict(source.state_dict())\n',
     '    pass\n'),
    ('precision-tf32-left-on', 'training.py', 'training',
     'fid.set_tf32(precision == "tf32")',
     'fid.set_tf32(True)'),
    ('fid-training-seed', 'training.py', 'training',
     'per_image_draws(settings.global_seed, indices, shape, num_classes, None, nfe - 1)',
     'per_image_draws(settings.global_seed + 1, indices, shape, num_classes, None, nfe - 1)'),
    ('fid-training-nfe', 'training.py', 'training',
     '                                steps=nfe, mode="renoise")',
     '                                steps=1, mode="renoise")'),
    ('sample-fid-part-of-batch', 'sample.py', 'sample',
     'stats.add(fid.features(inception, uint8))',
     'stats.add(fid.features(inception, uint8[:2]))'),
    ('sample-vae-recorded', 'training.py', 'imagenet',
     'return load_vae(override or stored["name"], device, rank, world_size), stored["scale"]',
     'return load_vae(override or VAE_NAME, device, rank, world_size), stored["scale"]'),
    ('vae-scale-recorded', 'training.py', 'sample',
     'return vae.decode(z / scale).sample.clamp(-1, 1)',
     'return vae.decode(z / VAE_SCALE * 1.01).sample.clamp(-1, 1)'),
    ('fid-bn-eps', 'fid.py', 'fid',
     'self.bn = nn.BatchNorm2d(cout, eps=0.001)',
     'self.bn = nn.BatchNorm2d(cout, eps=0.0009)'),
    ('fid-pool-pad', 'fid.py', 'fid',
     'return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)',
     'return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=True)'),
    ('fid-input-scale', 'fid.py', 'fid',
     'x = (x - 128) / 128',
     'x = (x - 127.5) / 127.5'),
    ('fid-resize-tf1', 'fid.py', 'fid',
     'scale = torch.tensor(n_in, dtype=torch.float32) / n_out',
     'scale = torch.tensor(n_in - 1, dtype=torch.float32) / (n_out - 1)'),
    ('fid-unbiased-cov', 'fid.py', 'fid',
     'return mu, (outer - self.n * np.outer(mu, mu)) / (self.n - 1)',
     'return mu, (outer - self.n * np.outer(mu, mu)) / self.n'),
    ('resume-step', 'training.py', 'training',
     '    return ckpt["step"], notes\n',
     '    return 0, notes\n'),
    ('keep-newest', 'training.py', 'training',
     'checkpoint_paths(settings.results_dir)[:-settings.keep_ckpts]',
     'checkpoint_paths(settings.results_dir)[settings.keep_ckpts:]'),
    ('bad-step-update', 'training.py', 'training',
     '            if bad_steps == 0:\n',
     '            if True:\n'),
    ('grid-rng-fork', 'training.py', 'training',
     '    with torch.random.fork_rng(devices=[noise.device] if noise.is_cuda else []):',
     'with contextlib.nullcontext():'),
    ('log-means', 'training.py', 'training',
     'torch.stack([self.sums[n] for n in names]) / self.steps',
     'torch.stack([self.sums[n] for n in names])'),
    ('rank-rows', 'training.py', 'training',
     'return rows[rank * local_batch:(rank + 1) * local_batch]',
     'return rows[:local_batch]'),
    ('cifar-range', 'train_cifar.py', 'cifar',
     'return x.float() / 127.5 - 1',
     'return x.float() / 255'),
    ('cifar-channel-major', 'train_cifar.py', 'cifar',
     'np.concatenate([x for x, _ in batches]).reshape(-1, 3, 32, 32)',
     'np.concatenate([x for x, _ in batches]).reshape(-1, 32, 32, 3).transpose(0, 3, 1, 2)'),
    ('cifar-flip-label', 'train_cifar.py', 'cifar',
     'out = torch.where(flip.view(B, 1, 1, 1) == 1, images.flip(3), images)',
     'out = torch.where(flip.view(B, 1, 1, 1) == 1, images.flip(2), images)'),
    ('cifar-md5', 'train_cifar.py', 'cifar',
     'if (found := hashlib.md5(Path(archive).read_bytes()).hexdigest()) != md5:',
     'if False:'),
    ('imagenet-latent-draw', 'train_imagenet.py', 'imagenet',
     'x0 = (mean + std * torch.randn_like(mean)) * training.VAE_SCALE',
     'x0 = mean * training.VAE_SCALE'),
    ('imagenet-flip-rows', 'train_imagenet.py', 'imagenet',
     'index = index + N * torch.randint(2, (len(index),)).numpy()',
     'index = index'),
    ('imagenet-unreadable', 'train_imagenet.py', 'imagenet',
     'readable = np.flatnonzero(arrays["labels"] >= 0)',
     'readable = np.arange(len(arrays["labels"]))'),
    ('imagenet-shard-marker', 'train_imagenet.py', 'imagenet',
     'mine = [k for k in range(rank, len(shards), world_size) if not os.path.exists(markers[k])]',
     'mine = list(range(rank, len(shards), world_size))'),
    ('sample-per-image-seed', 'training.py', 'sample',
     'rng = np.random.default_rng([seed, i])',
     'rng = np.random.default_rng([seed, b])'),
    ('sample-rank-batches', 'sample.py', 'sample',
     'tensor_split(num_batches)[rank::world_size]',
     'tensor_split(num_batches)[0::world_size]'),
]


def run(name, file, section, old, new, workdir):
    """'caught' or 'SURVIVED', and the seconds it took."""
    source = (workdir / file).read_text()      # the copy made at the start: later edits do not leak in
    if source.count(old) != 1:
        raise SystemExit(f"mutant {name}: {old!r} occurs {source.count(old)} times in {file}; make it unique")
    (workdir / file).write_text(source.replace(old, new))
    tests, slow = SECTIONS[section]
    marker = [] if slow else ["-m", "not slow"]
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *marker, *tests]
    start = time.time()
    try:
        result = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=900,
                                env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    finally:
        (workdir / file).write_text(source)
    return ("caught" if result.returncode != 0 else "SURVIVED"), time.time() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run the mutants whose name contains this")
    args = parser.parse_args()
    chosen = [m for m in MUTANTS if args.only in m[0]]
    survivors = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for item in COPIED:
            copy = shutil.copytree if (ROOT / item).is_dir() else shutil.copy
            copy(ROOT / item, workdir / item)
        files = sorted({m[1] for m in chosen})
        print(f"{len(chosen)} mutants of {', '.join(files)}, each against the tests of its section")
        for name, file, section, old, new in chosen:
            verdict, seconds = run(name, file, section, old, new, workdir)
            print(f"  {name:<24} {file:<18} {verdict:<9} {seconds:5.1f} s", flush=True)
            if verdict == "SURVIVED":
                survivors.append(name)
    caught = len(chosen) - len(survivors)
    print(f"{caught} of {len(chosen)} caught; survived: {', '.join(survivors) or 'none'}")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
