"""The released checkpoints: hf:// paths, their config.yaml, sampling them in one command, fine-tuning.

The hub is a cache laid out here exactly as huggingface_hub lays out a download (models--OWNER--REPO with
refs/main, blobs/ and snapshots/REV/ of links), read offline (HF_HUB_OFFLINE): hf_hub_download resolves from
it for real. The two config.yaml files are the released ones, comments included.
"""
import hashlib
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import soflow
import training.processes
import training.released
import training.settings
import training.teachers
from optional import needs
from training.processes import Processes

ROOT = Path(__file__).resolve().parents[1]
yaml = needs("yaml")
hub_constants = needs("huggingface_hub.constants")

# The released files (the authors' imagenet.yaml and cifar.yaml), as they are.
IMAGENET_YAML = """\
working_dir: ./your_experiment_name
noising_type: Linear # 'Linear', 'Triangular' for flow matching noising trajectory
coefficient_type: Euler # 'Euler', 'Triangular' for solution function parameterization
model_type: DiT-B-4 # 'UNet', 'DiT-B-4', 'DiT-B-2', 'DiT-M-2', 'DiT-L-2', 'DiT-XL-2'
dataset_type: Imagenet # 'CIFAR10' (3 channels), 'Imagenet' (4 channels)
data_size: 32 # shape: channels x data_size x data_size, 256 // 8 = 32
dataset_path: ./imagenet_latent

velocity_loss_ratio: 0.75 # Flow matching data ratio
p: 1.0
eps: 0.01
time_mean: [-0.2, -1.0, 0.2] # logit-normal time sampling
time_std: [1.0, 0.8, 0.8]
cfg_scale: 3.0 # Training guidance strength
mix_ratio: 0.25 # Velocity mix ratio
cfg_drop_rate: 0.1 # Label dropout ratio
cfg_decay_time: 0.8 # Decay CFG strength for large noise region
l_schedule: Exponent # 'Const','Linear','Cosine','Exponent', for schedule r(k,K)
l_init_ratio: 0.1  # r_init
l_end_ratio: 0.002 # r_end

total_steps: 400000
ema_decay_rate: 0.9999
learning_rate: 0.0001
betas: [0.9, 0.99]
weight_decay: 0.0

batch_size: 256
num_workers: 8
prefetch_factor: 4

eval_steps: 25000
eval_batch_size: 125
eval_NFE: 1
eval_demo_steps: 1000
eval_demo_shape: [4, 8]

ckpt_saving_steps: 25000
logging_steps: 100
seed: 42
"""
CIFAR_YAML = """\
working_dir: ./your_experiment_name_cifar
noising_type: Linear # 'Linear', 'Triangular' for flow matching noising trajectory
coefficient_type: Euler # 'Euler', 'Triangular' for solution function parameterization
model_type: UNet # 'UNet', 'DiT-B-4', 'DiT-B-2', 'DiT-M-2', 'DiT-L-2', 'DiT-XL-2'
dataset_type: CIFAR10 # 'CIFAR10' (3 channels), 'Imagenet' (4 channels)
data_size: 32 # shape: channels x data_size x data_size
dataset_path: ./CIFAR10

velocity_loss_ratio: 0.0 # Flow matching data ratio
p: 0.75
eps: 0.001
time_mean: [-0.9, -4.0, -0.9] # logit-normal time sampling
time_std: [1.6, 1.6, 1.6]
cfg_scale: 1.0 # Disable guidance for unconditional generation
mix_ratio: 1.0 # Disable velocity mix ratio
cfg_drop_rate: 0.0
cfg_decay_time: 1.0
l_schedule: Exponent # 'Const','Linear','Cosine','Exponent', for schedule r(k,K)
l_init_ratio: 1.0 # r_init
l_end_ratio: 0.0003125 # r_end

total_steps: 800000
ema_decay_rate: 0.9999
learning_rate: 0.0001
betas: [0.9, 0.999]
weight_decay: 0.0

batch_size: 1024
num_workers: 12
prefetch_factor: 6

eval_steps: 25000
eval_batch_size: 125
eval_NFE: 1
eval_demo_steps: 1000
eval_demo_shape: [4, 8]

ckpt_saving_steps: 25000
logging_steps: 100
seed: 42
"""
METHOD_KEYS = [*training.released.RELEASED_CHOICES, *training.released.RELEASED_NUMBERS,
               *training.released.RELEASED_TIMES]
REPO, REV = "zlab-princeton/SoFlow", "1f2e3d4c5b6a79880123456789abcdef01234567"
UNET = f"hf://{REPO}/UNet-uncond/ckpts/800000.pt"


# ----- config.yaml <-> SoFlowConfig -----

@pytest.mark.parametrize("text, preset", [(IMAGENET_YAML, "imagenet"), (CIFAR_YAML, "cifar10")])
def test_the_released_config_files_are_the_released_presets_exactly(text, preset):
    values = yaml.safe_load(text)
    assert training.released.config_from_released(values) == soflow.PRESETS[preset]
    written = training.released.released_from_config(soflow.PRESETS[preset])
    assert written == {k: values[k] for k in METHOD_KEYS}


def test_each_key_reaches_its_own_field_both_ways():
    # Every field moved off its preset value survives the round trip: no key is read into the wrong field.
    config = replace(soflow.PRESETS["imagenet"], schedule="triangular", param="triangular", lam=0.5, p=0.6,
                     eps=0.02, fm_mu=-0.1, fm_sd=1.1, s_mu=-1.1, s_sd=0.9, t_mu=0.3, t_sd=0.7,
                     r_schedule="cosine", r_init=0.2, r_end=0.003, w=2.5, m=0.3, drop=0.2, decay_t=0.7)
    values = training.released.released_from_config(config)
    assert values["time_mean"] == [-0.1, -1.1, 0.3] and values["time_std"] == [1.1, 0.9, 0.7]
    assert values["noising_type"] == values["coefficient_type"] == "Trig"       # the released code's name
    assert training.released.config_from_released({**yaml.safe_load(IMAGENET_YAML), **values}) == config
    none = replace(config, decay="none")                                       # no decay: cfg_decay_time 1
    assert training.released.released_from_config(none)["cfg_decay_time"] == 1.0


def test_config_yaml_errors_name_the_key():
    values = yaml.safe_load(IMAGENET_YAML)
    with pytest.raises(ValueError, match="unknown key 'cfg_scal'"):
        training.released.config_from_released({**values, "cfg_scal": 3.0})
    with pytest.raises(ValueError, match="no key 'mix_ratio'"):
        training.released.config_from_released({k: v for k, v in values.items() if k != "mix_ratio"})
    with pytest.raises(ValueError, match="noising_type 'Cosine' is none of Linear, Trig, Triangular"):
        training.released.config_from_released({**values, "noising_type": "Cosine"})
    with pytest.raises(ValueError, match="time_std .* should list 3 numbers"):
        training.released.config_from_released({**values, "time_std": [1.0, 0.8]})
    with pytest.raises(ValueError, match="no linear guidance decay"):
        training.released.released_from_config(soflow.PRESETS["imagenet-paper"])


# ----- hf:// paths from a hub cache -----

def lay_out(cache, repo, files):
    """files {path in the repository: bytes} as huggingface_hub stores a download in its cache."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(REV)
    for name, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(exist_ok=True)
        blob.write_bytes(data)
        link = root / "snapshots" / REV / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return root / "snapshots" / REV


def released_bytes(net, path):
    """A checkpoint in the released layout: 'network.' keys under 'model' and 'ema_model'."""
    sd = {"network." + k: v for k, v in net.state_dict().items()}
    torch.save({"model": sd, "ema_model": sd, "finished_steps": 800_000}, path)
    return path.read_bytes()


def randomize(net):
    with torch.no_grad():                     # the zero-initialised output layers too: every weight counts
        for p in net.parameters():
            p.normal_(std=0.05)
    return net


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An offline hub cache under HF_HOME with the released U-Net folder (a tiny U-Net, a config.yaml whose p
    is 0.5, so that reading it shows) and a DiT folder without config.yaml. Returns (snapshot, unet, dit)."""
    torch.manual_seed(0)
    unet = randomize(soflow.UNet_models["UNet-T"]()).eval()
    dit = randomize(soflow.DiT_models["DiT-T/4"](input_size=8, num_classes=10)).eval()
    cache = tmp_path / "hf" / "hub"
    snapshot = lay_out(cache, REPO, {
        "UNet-uncond/ckpts/800000.pt": released_bytes(unet, tmp_path / "u.pt"),
        "UNet-uncond/config.yaml": CIFAR_YAML.replace("p: 0.75", "p: 0.5").encode(),
        "DiT-tiny/ckpts/5.pt": released_bytes(dit, tmp_path / "d.pt")})
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))           # for subprocesses
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))   # this process read them at import
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return snapshot, unet, dit


def test_hf_paths_resolve_from_the_cache_with_the_config_yaml_beside_them(hub):
    snapshot, unet, dit = hub
    assert soflow.hub_file(UNET) == str(snapshot / "UNet-uncond/ckpts/800000.pt")
    net, config, note, recorded = training.released.open_checkpoint(UNET)
    x, t = torch.randn(2, 3, 32, 32), torch.ones(2)
    assert torch.equal(net(x, t, 0 * t), unet(x, t, 0 * t))
    assert config == replace(soflow.PRESETS["cifar10"], p=0.5) and recorded == {}
    assert f"hf://{REPO}/UNet-uncond/config.yaml" in note
    # No config.yaml beside it: the preset of its kind, said.
    net, config, note, _ = training.released.open_checkpoint(f"hf://{REPO}/DiT-tiny/ckpts/5.pt")
    assert config == soflow.PRESETS["imagenet"] and "assuming the released PRESETS['imagenet']" in note
    assert "DiT-tiny/config.yaml was not found" in note
    # The same files by their local paths: the same networks and configs.
    local, local_config, _, _ = training.released.open_checkpoint(snapshot / "UNet-uncond/ckpts/800000.pt")
    assert local_config == replace(soflow.PRESETS["cifar10"], p=0.5)
    assert torch.equal(local(x, t, 0 * t), unet(x, t, 0 * t))
    assert soflow.load_network(UNET).init_kwargs == local.init_kwargs


def test_hub_errors_say_what_to_do(hub, monkeypatch):
    with pytest.raises(ValueError, match="a hub path reads hf://OWNER/REPO/FILE"):
        soflow.hub_file(f"hf://{REPO}")
    with pytest.raises(ValueError, match="cannot fetch .*nothere.pt .*download the file and pass its local"):
        soflow.load_network(f"hf://{REPO}/UNet-uncond/ckpts/nothere.pt")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)              # not installed
    with pytest.raises(ValueError, match="Install huggingface_hub"):
        soflow.hub_file(UNET)


@pytest.mark.parametrize("rank, fails", [(0, False), (1, False), (0, True)])
def test_rank_0_reads_first_and_the_others_wait_even_when_it_fails(rank, fails, monkeypatch):
    events = []

    def load(ckpt, use_ema, path):
        events.append("load")
        if fails:
            raise ValueError("no network")
        net = soflow.MLP(hidden=4, depth=1)
        net.soflow_config = None                           # as a released file: no config of its own
        return net
    monkeypatch.setattr(training.released, "load_checkpoint", lambda path: {})
    monkeypatch.setattr(soflow, "network_from_checkpoint", load)
    monkeypatch.setattr(soflow, "hub_file", lambda path: events.append("fetch") or "c.pt")    # the download
    monkeypatch.setattr(training.processes.dist, "barrier", lambda: events.append("barrier"))
    monkeypatch.setattr(training.released, "released_config", lambda path: (None, "no config.yaml"))
    if fails:
        with pytest.raises(ValueError, match="no network"):
            training.released.open_checkpoint("hf://a/b/c.pt", procs=Processes(rank, 2))
    else:
        training.released.open_checkpoint("hf://a/b/c.pt", procs=Processes(rank, 2))
    assert events == (["barrier", "fetch", "load"] if rank else ["fetch", "load", "barrier"])


def test_sample_py_samples_a_released_model_from_the_hub_in_one_command(hub, tmp_path):
    snapshot, _, _ = hub
    outputs = []
    for ckpt in (UNET, str(snapshot / "UNet-uncond/ckpts/800000.pt")):
        out = tmp_path / f"out{len(outputs)}"
        command = [sys.executable, str(ROOT / "sample.py"), "--ckpt", ckpt, "--num-images", "3", "--npz",
                   "--out", str(out)]
        run = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert run.returncode == 0, run.stderr[-2000:]
        assert "UNet-uncond/config.yaml" in run.stdout                    # its own configuration, said
        with np.load(f"{out}.npz") as f:
            outputs.append(f["arr_0"])
    assert np.array_equal(*outputs) and outputs[0].shape == (3, 32, 32, 3)


# ----- Fine-tuning from a released checkpoint -----

def settings(tmp_path, init_from, raw=False):
    return training.settings.TrainSettings(results_dir=str(tmp_path), global_batch_size=2, steps=1,
                                  init_from=init_from, init_from_raw=raw)


def test_init_from_copies_a_released_models_weights_and_refuses_another_shape(hub, tmp_path):
    _, _, dit = hub
    source = f"hf://{REPO}/DiT-tiny/ckpts/5.pt"
    torch.manual_seed(1)
    net = soflow.DiT_models["DiT-T/4"](input_size=8, num_classes=10)
    ema = soflow.DiT_models["DiT-T/4"](input_size=8, num_classes=10)
    config = soflow.PRESETS["imagenet"]
    note = training.released.start_from_checkpoint(settings(tmp_path, source), net, ema, config, Processes())
    assert "EMA weights of hf://" in note and "fresh optimizer at step 0" in note
    for copy in (net, ema):
        assert all(torch.equal(v, dit.state_dict()[k]) for k, v in copy.state_dict().items())
    dits = soflow.DiT_models
    refusals = [(dits["DiT-T/4"](input_size=16, num_classes=10), "input_size is 8, this run's 16"),
                (dits["DiT-T/2"](input_size=8, num_classes=10), "does not fit DiT"),
                (soflow.UNet_models["UNet-T"](), "it holds a DiT; this run trains a UNet")]
    for other, message in refusals:
        with pytest.raises(SystemExit, match=f"--init-from {source}: .*{message}"):
            training.released.start_from_checkpoint(settings(tmp_path, source), other, nn.Identity(), config,
                                                     Processes())


def test_a_released_checkpoint_on_the_hub_is_a_teacher_of_its_eq10_velocity(hub):
    _, _, dit = hub
    teacher = training.teachers.open_teacher(f"hf://{REPO}/DiT-tiny/ckpts/5.pt")
    assert "a DiT trained as SoFlow" in teacher.note and "DiT-tiny/config.yaml" in teacher.note
    x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([0, 4, 10])
    config = soflow.PRESETS["imagenet"]                                  # the file's config.yaml: Euler
    expected = soflow.velocity(dit, x, t, y, config=config)
    assert torch.allclose(teacher.velocity()(x, t, y), expected, atol=1e-6)
