"""Distillation (Sec. 4.2) outside the method file: teachers from checkpoints (ours, SiT's), their checks, a
student started from SiT, the scripts' --teacher, and a student that learns its teacher's flow on images.

SiT is checked against its own forward written out below from SiT's models.py (willisma/SiT, commit 947f95b),
on random weights in SiT's exact state-dict layout: no code of the project computes the reference.
"""
import argparse
import math
from dataclasses import asdict, replace
from functools import partial

import pytest
import torch
import torch.nn.functional as F

import soflow
from train_toy import train_mlp  # Algorithm 1 with Adam and an EMA, for any network
from training import released, teachers
from training.processes import Processes
from training.settings import TrainSettings


# ----- SiT's layout and forward, from its models.py -----
def sit_layout(depth=2, hidden=64, patch=2, channels=4, input_size=8, num_classes=10, learn_sigma=True):
    """{key: shape} of a SiT state dict: DiT's modules, no s_embedder, 2C outputs with learn_sigma."""
    tokens, out = (input_size // patch) ** 2, channels * (2 if learn_sigma else 1)
    layout = {"pos_embed": (1, tokens, hidden),
              "x_embedder.proj.weight": (hidden, channels, patch, patch), "x_embedder.proj.bias": (hidden,),
              "t_embedder.mlp.0.weight": (hidden, 256), "t_embedder.mlp.0.bias": (hidden,),
              "t_embedder.mlp.2.weight": (hidden, hidden), "t_embedder.mlp.2.bias": (hidden,),
              "y_embedder.embedding_table.weight": (num_classes + 1, hidden)}
    for i in range(depth):
        for name, shape in {"attn.qkv": (3 * hidden, hidden), "attn.proj": (hidden, hidden),
                            "mlp.fc1": (4 * hidden, hidden), "mlp.fc2": (hidden, 4 * hidden),
                            "adaLN_modulation.1": (6 * hidden, hidden)}.items():
            layout[f"blocks.{i}.{name}.weight"], layout[f"blocks.{i}.{name}.bias"] = shape, shape[:1]
    layout.update({"final_layer.linear.weight": (patch * patch * out, hidden),
                   "final_layer.linear.bias": (patch * patch * out,),
                   "final_layer.adaLN_modulation.1.weight": (2 * hidden, hidden),
                   "final_layer.adaLN_modulation.1.bias": (2 * hidden,)})
    return layout


def random_sit(seed=0, dtype=torch.float32, **kw):
    generator = torch.Generator().manual_seed(seed)
    layout = sit_layout(**kw)
    return {k: 0.3 * torch.randn(shape, generator=generator, dtype=dtype) for k, shape in layout.items()}


def sit_forward(sd, x, t, y, patch=2, heads=2, learn_sigma=True):
    """SiT.forward(x, t, y) as models.py computes it, step by step with the state dict's tensors."""
    def linear(h, name):
        return F.linear(h, sd[f"{name}.weight"], sd[f"{name}.bias"])

    def modulate(h, shift, scale):
        return h * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
    B, C = x.shape[:2]
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=patch)
    h = h.flatten(2).transpose(1, 2) + sd["pos_embed"]                       # PatchEmbed, then pos_embed
    N, D = h.shape[1:]
    half = 128                                                               # TimestepEmbedder, 256 freqs
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(x.dtype)
    c = linear(F.silu(linear(t_freq, "t_embedder.mlp.0")), "t_embedder.mlp.2")
    c = c + sd["y_embedder.embedding_table.weight"][y]
    for i in range(sum(k.endswith("attn.qkv.weight") for k in sd)):
        b = f"blocks.{i}"
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = \
            linear(F.silu(c), f"{b}.adaLN_modulation.1").chunk(6, dim=1)
        a = modulate(F.layer_norm(h, (D,), eps=1e-6), shift_msa, scale_msa)
        qkv = linear(a, f"{b}.attn.qkv").reshape(B, N, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                              # timm's Attention
        attention = ((q * (D // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        a = linear((attention @ v).transpose(1, 2).reshape(B, N, D), f"{b}.attn.proj")
        h = h + gate_msa.unsqueeze(1) * a
        m = modulate(F.layer_norm(h, (D,), eps=1e-6), shift_mlp, scale_mlp)
        m = linear(F.gelu(linear(m, f"{b}.mlp.fc1"), approximate="tanh"), f"{b}.mlp.fc2")
        h = h + gate_mlp.unsqueeze(1) * m
    shift, scale = linear(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    h = linear(modulate(F.layer_norm(h, (D,), eps=1e-6), shift, scale), "final_layer.linear")
    out, g = h.shape[-1] // patch ** 2, int(N ** 0.5)                        # unpatchify
    h = torch.einsum("nhwpqc->nchpwq", h.reshape(B, g, g, patch, patch, out))
    h = h.reshape(B, out, g * patch, g * patch)
    return h.chunk(2, dim=1)[0] if learn_sigma else h


def inputs(seed=1, batch=5, num_classes=10, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=generator, dtype=dtype)
    t = torch.rand(batch, generator=generator)
    y = torch.randint(num_classes + 1, (batch,), generator=generator)      # the null label too
    return x, t, y


def save_sit(path, sd, **args):
    """A raw state dict (download.py's files), or train.py's {"model", "ema", "opt", "args"} given args."""
    torch.save({"model": sd, "ema": sd, "opt": {}, "args": argparse.Namespace(**args)} if args else sd, path)
    return str(path)


# ----- SiT as a teacher -----
@pytest.mark.parametrize("learn_sigma", [True, False])
@pytest.mark.parametrize("train_py", [False, True])
def test_sit_teacher_is_sits_velocity_with_time_and_sign_flipped(tmp_path, learn_sigma, train_py):
    """In float64, so that both agree to its precision (the time features are float32 in both)."""
    sd = random_sit(learn_sigma=learn_sigma, dtype=torch.float64)
    args = dict(model="SiT-XL/2", path_type="Linear", prediction="velocity") if train_py else {}
    teacher = teachers.open_teacher(save_sit(tmp_path / "sit.pt", sd, **args))
    assert teacher.schedule == "linear" and teacher.net.num_classes == 10
    x, t, y = inputs(dtype=torch.float64)
    v = teacher.velocity()(x, t, y)
    reference = -sit_forward(sd, x, 1 - t, y, learn_sigma=learn_sigma)        # v(x, t) = -SiT(x, 1 - t)
    difference = (v - reference).abs().max().item()
    print(f"SiT conversion: largest difference {difference:.1e} (values up to {reference.abs().max():.0f})")
    assert v.dtype == torch.float64 and difference < 1e-12 * reference.abs().max().item()
    assert torch.equal(teacher.velocity()(x, t), teacher.velocity()(x, t, torch.full_like(y, 10)))


def test_sit_paths_map_to_schedules_and_others_are_refused(tmp_path):
    sd = random_sit()
    gvp = teachers.open_teacher(save_sit(tmp_path / "gvp.pt", sd, path_type="GVP", prediction="velocity"))
    assert gvp.schedule == "triangular"                      # sin(pi/2 t_SiT) x_0 + cos(pi/2 t_SiT) x_1
    for path_type, prediction in (("VP", "velocity"), ("Linear", "noise")):
        path = save_sit(tmp_path / "other.pt", sd, path_type=path_type, prediction=prediction)
        with pytest.raises(ValueError, match=f"{path_type} path predicting {prediction}"):
            teachers.open_teacher(path)


# ----- Our checkpoints as teachers, and the refusals -----
def save_ours(path, net, config):
    """A checkpoint as ours store it, with what a teacher needs: the network and its SoFlowConfig."""
    sd = net.state_dict()
    torch.save(dict(arch=type(net).__name__, arch_kwargs=net.init_kwargs, model=sd, ema=sd,
                    config=asdict(config)), path)
    return str(path)


def test_our_flow_matching_checkpoint_is_a_teacher_of_its_eq10_velocity(tmp_path):
    torch.manual_seed(0)
    net = soflow.MLP(hidden=16, depth=1, num_classes=3)
    torch.nn.init.normal_(net.out[1].weight)
    config = replace(soflow.PRESETS["toy"], lam=1.0, param="triangular")
    teacher = teachers.open_teacher(save_ours(tmp_path / "fm.pt", net, config))
    assert "trained as flow matching" in teacher.note and teacher.schedule == "linear"
    x, t, y = torch.randn(6, 2), torch.rand(6), torch.randint(4, (6,))
    expected = math.pi / 2 * net(x, t, t, y)                                 # Eq. 10: d_2 b = pi / 2
    assert torch.allclose(teacher.velocity()(x, t, y), expected, atol=1e-6)


def test_a_teacher_of_another_flow_is_refused_with_the_reason(tmp_path):
    student = soflow.DiT_models["DiT-T/2"](input_size=8, num_classes=10)
    linear = soflow.PRESETS["imagenet"]
    refusals = {
        "shape": (save_sit(tmp_path / "big.pt", random_sit(input_size=16)), "data of shape \\(4, 16, 16\\)"),
        "classes": (save_sit(tmp_path / "five.pt", random_sit(num_classes=5)),
                    "it has 5 classes, the student 10"),
        "schedule": (save_sit(tmp_path / "gvp.pt", random_sit(), path_type="GVP", prediction="velocity"),
                     "triangular noising schedule, this run uses the linear one"),
    }
    for name, (path, reason) in refusals.items():
        with pytest.raises(SystemExit, match=f"--teacher {path}: .*{reason}"):
            teachers.start_teacher(path, student, (4, 8, 8), linear, Processes())
    mlp = soflow.MLP(hidden=8, depth=1, cond_dim=2)
    path = save_ours(tmp_path / "mlp.pt", soflow.MLP(hidden=8, depth=1), soflow.PRESETS["toy"])
    with pytest.raises(SystemExit, match="cond tensor of width 0, the student 2"):
        teachers.start_teacher(path, mlp, (2,), soflow.PRESETS["toy"], Processes())
    # The same teachers, where they fit: accepted.
    big = soflow.DiT_models["DiT-T/2"](input_size=16, num_classes=10)
    velocity, note = teachers.start_teacher(refusals["shape"][0], big, (4, 16, 16), linear, Processes())
    assert note.startswith(f"distilling {refusals['shape'][0]}: SiT weights") and velocity is not None


def test_a_student_started_from_sit_computes_sits_velocity(tmp_path):
    """float64: time_flip rotates SiT's time features exactly; only the features' float32 rounding differs."""
    sd = random_sit(dtype=torch.float64)
    path = save_sit(tmp_path / "sit.pt", sd)
    x, t, y = inputs(dtype=torch.float64)
    reference = -sit_forward(sd, x, 1 - t, y)
    for param in ("euler", "triangular"):
        config = replace(soflow.PRESETS["imagenet"], param=param)
        student = soflow.DiT_models["DiT-T/2"](input_size=8, num_classes=10).double()
        ema = soflow.DiT_models["DiT-T/2"](input_size=8, num_classes=10).double()
        settings = TrainSettings(results_dir=str(tmp_path), init_from=path)
        note = released.start_from_checkpoint(settings, student, ema, config, Processes())
        assert "starts as SiT's velocity field" in note
        for net in (student, ema):
            v = soflow.velocity(net, x, t, y, config=config)
            assert (v - reference).abs().max() < 1e-5 * reference.abs().max(), param
        # emb(t - s) starts at zero: f = x + (s - t) F is one Euler step of SiT's ODE, from t = 1 to 0.
        x1, ones = x, torch.ones(len(x))
        one_step = soflow.solution(student, x1, ones, 0 * ones, y, config=config)
        if param == "euler":
            assert torch.allclose(one_step, x1 - (-sit_forward(sd, x1, 0 * ones, y)), atol=1e-5)
    with pytest.raises(SystemExit, match="SiT's weights, for a DiT; this run trains a UNet"):
        released.start_from_checkpoint(TrainSettings(results_dir=str(tmp_path), init_from=path),
                                       soflow.UNet_models["UNet-T"](), None, config, Processes())


# ----- On images: a student learns its teacher's flow -----
class Patterns:
    """4x8x8 'latents': one of 4 fixed smooth patterns, scaled at random, plus a little noise."""
    num_classes = 0

    def __init__(self):
        generator = torch.Generator().manual_seed(0)
        coarse = torch.randn(4, 4, 2, 2, generator=generator)
        self.patterns = F.interpolate(coarse, size=(8, 8), mode="bilinear", align_corners=False)

    def sample(self, n):
        k = torch.randint(len(self.patterns), (n,))
        scale = 1 + 0.3 * torch.randn(n, 1, 1, 1)
        return scale * self.patterns[k] + 0.05 * torch.randn(n, 4, 8, 8), None


@pytest.fixture
def one_thread():
    """Tiny networks run fastest on one thread, and leave the other core to the rest."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_a_distilled_student_lands_nearer_its_teachers_samples_than_one_trained_from_data(one_thread):
    """A tiny flow-matching DiT teaches a SoFlow student; the student's one step lands nearer the teacher's
    50 Euler steps from the same noise than a student trained as long from the data alone (about 15 s).
    Measured: 0.17 against 0.46 (seeds 2, 3 of the student: 0.17 / 0.51, 0.16 / 0.46)."""
    data, config = Patterns(), soflow.PRESETS["toy"]
    fm_config = replace(config, lam=1.0)

    def dit(seed):
        torch.manual_seed(seed)
        return soflow.DiT_models["DiT-T/4"](input_size=8, num_classes=0)
    teacher = train_mlp(data, fm_config, steps=300, batch=64, lr=2e-3, net=dit(0))
    x1 = torch.randn(256, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    target = soflow.sample_euler(teacher, x1, config=fm_config, steps=50)
    distance = {}
    teachers_velocity = partial(soflow.velocity, teacher, config=fm_config)
    for name, velocity in (("distilled", teachers_velocity), ("data", None)):
        student = train_mlp(data, config, steps=300, batch=64, lr=2e-3, net=dit(1), teacher=velocity)
        distance[name] = ((soflow.sample(student, x1, config=config) - target) ** 2).mean().item()
    print(f"mean squared distance to the teacher's 50 Euler steps: {distance}")
    assert distance["distilled"] < 0.6 * distance["data"], distance
