"""The networks (MLP, DiT, U-Net) and loading checkpoints, ours and the released ones.

CPU and small sizes; the full sizes only on the meta device. tests/data/released_unet_tiny.pt holds a tiny
released U-Net (its constructor config, weights in the released layout), its inputs and its outputs.
"""
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import soflow

# Trainable parameters of the released networks, in millions (reference/official_dit_state_dict.md).
REFERENCE_COUNTS = {"DiT-B/4": 131.17, "DiT-B/2": 131.09, "DiT-M/2": 308.02, "DiT-L/2": 459.14,
                    "DiT-XL/2": 676.44}

# The released DiT-B/4 state dict (without the "network." prefix); "blocks.N." repeats for N = 0..11.
REFERENCE_B4_LAYOUT = {
    "pos_embed": (1, 64, 768), "x_embedder.proj.weight": (768, 4, 4, 4), "x_embedder.proj.bias": (768,),
    "t_embedder.mlp.0.weight": (768, 256), "t_embedder.mlp.0.bias": (768,),
    "t_embedder.mlp.2.weight": (768, 768), "t_embedder.mlp.2.bias": (768,),
    "s_embedder.mlp.0.weight": (768, 256), "s_embedder.mlp.0.bias": (768,),
    "s_embedder.mlp.2.weight": (768, 768), "s_embedder.mlp.2.bias": (768,),
    "y_embedder.embedding_table.weight": (1001, 768),
    "blocks.N.attn.qkv.weight": (2304, 768), "blocks.N.attn.qkv.bias": (2304,),
    "blocks.N.attn.proj.weight": (768, 768), "blocks.N.attn.proj.bias": (768,),
    "blocks.N.mlp.fc1.weight": (3072, 768), "blocks.N.mlp.fc1.bias": (3072,),
    "blocks.N.mlp.fc2.weight": (768, 3072), "blocks.N.mlp.fc2.bias": (768,),
    "blocks.N.adaLN_modulation.1.weight": (4608, 768), "blocks.N.adaLN_modulation.1.bias": (4608,),
    "final_layer.linear.weight": (64, 768), "final_layer.linear.bias": (64,),
    "final_layer.adaLN_modulation.1.weight": (1536, 768), "final_layer.adaLN_modulation.1.bias": (1536,),
}


def tiny_dit(**kw):
    return soflow.DiT_models["DiT-T/4"](**{"num_classes": 10, **kw})


def tiny_unet(**kw):
    return soflow.UNet_models["UNet-T"](**{"num_classes": 10, **kw})


NETS = {"DiT": (tiny_dit, (4, 32, 32)), "UNet": (tiny_unet, (3, 32, 32))}


def make(kind, seed=0, **kw):
    """A tiny network of the given kind, an input batch and times t > s."""
    torch.manual_seed(seed)
    build, shape = NETS[kind]
    x = torch.randn(3, *shape)
    t = torch.tensor([0.9, 0.5, 0.2])
    return build(**kw), x, t, t * torch.tensor([0.0, 0.5, 0.9])


@torch.no_grad()
def perturb(net, std=0.05):
    """Give the layers that start at (or near) zero random weights, so that every input reaches the output."""
    for p in net.parameters():
        if p.dim() >= 2 and p.abs().max() < 1e-3:
            p.normal_(0, std)
    return net


def trainable(net):
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


# ----- Shapes, initialisation, sizes -----

def test_mlp_conditioning_and_shapes():
    torch.manual_seed(0)
    net = perturb(soflow.MLP(hidden=32, depth=2, data_shape=(3, 4), num_classes=5, cond_dim=6), std=0.5)
    x, t, s, c = torch.randn(2, 3, 4), torch.rand(2), torch.zeros(2), torch.randn(2, 6)
    out = net(x, t, s, torch.tensor([1, 2]), c)
    assert out.shape == x.shape
    assert not torch.allclose(out, net(x, t, s, torch.tensor([3, 2]), c))
    assert not torch.allclose(out, net(x, t, s, torch.tensor([1, 2]), c + 1))
    assert torch.equal(net(x, t, s, None, c), net(x, t, s, torch.tensor([5, 5]), c))
    with pytest.raises(ValueError, match="cond_dim=6"):
        net(x, t, s)
    assert torch.equal(soflow.MLP()(torch.randn(3, 2), t[:1].expand(3), s[:1].expand(3)), torch.zeros(3, 2))


@pytest.mark.parametrize("kind", ["DiT", "UNet"])
def test_output_has_the_input_shape_and_each_row_depends_on_its_own_input_alone(kind):
    net, x, t, s = make(kind)
    perturb(net.eval())
    out = net(x, t, s)
    assert out.shape == x.shape
    # Row by row: the same values as the batch (no mixing across the batch), and each row moves with its x.
    rows = torch.cat([net(x[i:i + 1], t[i:i + 1], s[i:i + 1]) for i in range(len(x))])
    torch.testing.assert_close(rows, out, rtol=1e-4, atol=1e-5)
    moved = x.clone()
    moved[0] += 0.5
    changed = (net(moved, t, s) - out).flatten(1).abs().amax(1)
    assert changed[0] > 1e-3 and changed[1:].max() < 1e-5


@pytest.mark.parametrize("build,shape", [
    (lambda: soflow.DiT_models["DiT-T/2"](input_size=16, in_channels=3, num_classes=0), (2, 3, 16, 16)),
    (lambda: soflow.UNet_models["UNet-T"](img_resolution=16, in_channels=1), (2, 1, 16, 16)),
])
def test_other_input_sizes(build, shape):
    net = perturb(build())
    out = net(torch.randn(shape), torch.rand(2), torch.zeros(2))
    assert out.shape == shape and out.abs().sum() > 0


@pytest.mark.parametrize("kind", ["DiT", "UNet"])
def test_zero_output_layer_gives_identity_solution_at_init(kind):
    net, x, t, s = make(kind)
    F_out = net(x, t, s)
    assert torch.equal(F_out, torch.zeros_like(x))
    f = x + (s - t).view(-1, 1, 1, 1) * F_out                           # Euler: f = x + (s - t) F
    assert torch.equal(f, x)


@pytest.mark.parametrize("name", sorted(REFERENCE_COUNTS))
def test_dit_parameter_counts_match_released(name):
    with torch.device("meta"):
        net = soflow.DiT_models[name]()
    assert trainable(net) / 1e6 == pytest.approx(REFERENCE_COUNTS[name], rel=5e-3)
    assert not net.pos_embed.requires_grad                              # fixed, so not counted


def test_dit_b4_state_dict_layout_equals_released():
    with torch.device("meta"):
        net = soflow.DiT_models["DiT-B/4"]()
    expected = {}
    for key, shape in REFERENCE_B4_LAYOUT.items():
        for n in range(12) if ".N." in key else [None]:
            expected[key.replace(".N.", f".{n}.") if n is not None else key] = shape
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == expected


def test_pos_embed_is_frozen_2d_sincos_with_column_half_first():
    net = soflow.DiT_models["DiT-T/4"]()                        # 8 x 8 tokens, width 64
    D, G = 64, 8
    assert not net.pos_embed.requires_grad and "pos_embed" in net.state_dict()
    omega = 1.0 / 10000 ** (torch.arange(D // 4, dtype=torch.float64) / (D // 4))
    pe = net.pos_embed[0].double()
    for i, j in [(0, 0), (2, 5), (7, 1)]:                               # (row, column)
        token = pe[i * G + j]
        torch.testing.assert_close(token[:D // 4], torch.sin(j * omega), atol=1e-6, rtol=0)
        torch.testing.assert_close(token[D // 4:D // 2], torch.cos(j * omega), atol=1e-6, rtol=0)
        torch.testing.assert_close(token[D // 2:3 * D // 4], torch.sin(i * omega), atol=1e-6, rtol=0)


def test_unpatchify_puts_channels_last_within_a_patch():
    net = soflow.DiT_models["DiT-T/4"](in_channels=3)         # grid 8, patch 4, C 3
    G, p, C = 8, 4, 3
    tokens = torch.arange(G * G * p * p * C, dtype=torch.float32).view(1, G * G, p * p * C)
    img = net.unpatchify(tokens)
    for gi, gj, a, b, c in [(0, 0, 0, 0, 1), (1, 2, 3, 0, 2), (7, 6, 1, 3, 0)]:
        expected = tokens[0, gi * G + gj, (a * p + b) * C + c]
        assert img[0, c, gi * p + a, gj * p + b] == expected


# ----- Conditioning -----

@pytest.mark.parametrize("kind", ["DiT", "UNet"])
def test_labels_and_both_times_change_the_output(kind):
    net, x, t, s = make(kind)
    perturb(net)
    y = torch.tensor([1, 2, 3])
    with torch.no_grad():
        ref = net(x, t, s, y)

        def differs(out):
            return (out - ref).abs().max() > 1e-5 * ref.abs().max()     # an ignored input gives exactly 0
        assert differs(net(x, t, s, torch.tensor([4, 5, 6])))
        assert differs(net(x, t * 0.8, s, y))
        assert differs(net(x, t, s * 0.5 + 0.01, y))
        # y=None is the null label (index num_classes) for every sample.
        assert torch.equal(net(x, t, s), net(x, t, s, torch.full((3,), net.num_classes)))
        assert differs(net(x, t, s))


def test_dit_second_embedder_sees_the_gap_t_minus_s():
    net, x, t, s = make("DiT")
    seen = {}
    net.t_embedder.register_forward_pre_hook(lambda m, args: seen.update(t=args[0]))
    net.s_embedder.register_forward_pre_hook(lambda m, args: seen.update(s=args[0]))
    net(x, t, s)
    torch.testing.assert_close(seen["t"], t)
    torch.testing.assert_close(seen["s"], t - s)


def test_unet_embeds_t_and_the_gap_t_minus_s(monkeypatch):
    net, x, t, s = make("UNet")
    seen, original = [], soflow.positional_embedding

    def spy(tt, dim, *args, **kw):
        seen.append((tt.clone(), dim))
        return original(tt, dim, *args, **kw)
    monkeypatch.setattr(soflow, "positional_embedding", spy)
    net(x, t, s)
    assert [dim for _, dim in seen] == [2 * 16, 2 * 16]                  # channel_mult_noise 2, 16 channels
    torch.testing.assert_close(seen[0][0], t)
    torch.testing.assert_close(seen[1][0], t - s)


def test_unet_time_features_are_edm_positional_embedding_with_sines_first():
    t = torch.tensor([0.0, 0.3, 1.0])
    freqs = torch.tensor([1.0, 10000 ** (-1 / 3), 10000 ** (-2 / 3), 1e-4])    # endpoint=True: 1 ... 1/10000
    expected = torch.cat([torch.sin(t[:, None] * freqs), torch.cos(t[:, None] * freqs)], dim=1)
    torch.testing.assert_close(soflow.positional_embedding(t, 8), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind,kw", [("DiT", {}), ("UNet", {"augment_dim": 0})])
def test_cond_tensor_is_rejected(kind, kw):
    net, x, t, s = make(kind, **kw)
    with pytest.raises(ValueError, match="cond"):
        net(x, t, s, cond=torch.zeros(3, 5))


def test_unconditional_unet_accepts_only_the_null_label():
    net, x, t, s = make("UNet", num_classes=0)
    perturb(net)
    assert net.map_label is None
    with torch.no_grad():
        assert torch.equal(net(x, t, s), net(x, t, s, torch.zeros(3, dtype=torch.long)))
    with pytest.raises(ValueError):
        net(x, t, s, torch.ones(3, dtype=torch.long))


def test_unet_dropout_acts_in_training_only():
    net, x, t, s = make("UNet", dropout=0.5)
    perturb(net)
    with torch.no_grad():
        net.train()
        assert not torch.equal(net(x, t, s), net(x, t, s))
        net.eval()
        assert torch.equal(net(x, t, s), net(x, t, s))


# ----- Mixed precision, compilation, training -----

@pytest.mark.parametrize("kind", ["DiT", "UNet"])
def test_bf16_autocast_is_close_to_fp32(kind):
    net, x, t, s = make(kind)
    perturb(net)
    with torch.no_grad():
        ref = net(x, t, s)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x, t, s)
    assert out.dtype == torch.float32                                   # returned in the input's dtype
    assert (out - ref).norm() / ref.norm() < 0.05


@pytest.mark.slow
def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    dit = perturb(soflow.DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=1, num_heads=2,
                           num_classes=10)).eval()
    unet, xu, t, s = make("UNet")
    perturb(unet).eval()
    xd, y = torch.randn(3, 4, 8, 8), torch.tensor([0, 5, 10])
    with torch.no_grad():
        out = torch.compile(dit, fullgraph=True)(xd, t, s, y)          # inductor: generated kernels
        torch.testing.assert_close(out, dit(xd, t, s, y), atol=1e-4, rtol=1e-4)
        # The U-Net through the same graph capture (fullgraph: no breaks), no code generation to save time.
        out = torch.compile(unet, fullgraph=True, backend="aot_eager")(xu, t, s)
        torch.testing.assert_close(out, unet(xu, t, s), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["DiT", "UNet"])
def test_regression_of_F_to_a_fixed_target_lowers_the_loss(kind):
    net, x, t, s = make(kind)
    target = torch.randn_like(x).clamp(-1, 1)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = ((net(x, t, s, torch.tensor([1, 2, 3])) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


# ----- load_network -----

def released_file(path, net, ema_sd=None):
    """Write net's weights in the released layout.

    'network.'-prefixed state dicts under 'model' and 'ema_model'.
    """
    prefixed = lambda sd: {"network." + k: v for k, v in sd.items()}  # noqa: E731
    torch.save({"model": prefixed(net.state_dict()), "ema_model": prefixed(ema_sd or net.state_dict()),
                "optimizer": {}, "finished_steps": 10, "finished_epochs": 1}, path)
    return path


def our_file(path, net, ema_net, arch):
    torch.save({"arch": arch, "arch_kwargs": net.init_kwargs, "model": net.state_dict(),
                "ema": ema_net.state_dict(), "optimizer": {}, "step": 10, "config": {}, "rng": {}}, path)
    return path


@pytest.mark.slow
def test_released_dit_b4_loads_and_matches_the_source(tmp_path):
    torch.manual_seed(0)
    src = soflow.DiT_models["DiT-B/4"]()                        # 131M parameters, as released
    with torch.no_grad():
        for b in src.blocks:
            b.adaLN_modulation[1].weight.normal_(0, 0.02)
        src.final_layer.linear.weight.normal_(0, 0.02)
    raw = dict(src.state_dict())
    raw["final_layer.linear.bias"] = raw["final_layer.linear.bias"] + 1.0  # 'model' differs from 'ema_model'
    path = tmp_path / "released.pt"
    torch.save({"model": {"network." + k: v for k, v in raw.items()},
                "ema_model": {"network." + k: v for k, v in src.state_dict().items()},
                "optimizer": {}, "finished_steps": 400000, "finished_epochs": 80}, path)
    net = soflow.load_network(path)
    assert net.init_kwargs == {"input_size": 32, "in_channels": 4, "num_classes": 1000, "mlp_ratio": 4.0,
                               **soflow.DiT_models["DiT-B/4"].keywords}
    assert not net.training and not net.pos_embed.requires_grad
    x, t, s, y = torch.randn(1, 4, 32, 32), torch.tensor([0.7]), torch.tensor([0.1]), torch.tensor([207])
    with torch.no_grad():
        assert torch.equal(net(x, t, s, y), src(x, t, s, y))            # EMA weights by default
        del net
        raw_net = soflow.load_network(path, use_ema=False)
        torch.testing.assert_close(raw_net(x, t, s, y), src(x, t, s, y) + 1.0)


def test_released_layout_infers_every_size_argument(tmp_path):
    torch.manual_seed(0)
    src = perturb(soflow.DiT_models["DiT-T/2"](input_size=16, in_channels=3, num_classes=7))
    net = soflow.load_network(released_file(tmp_path / "r.pt", src))
    assert net.init_kwargs == src.init_kwargs
    x, t, s = torch.randn(2, 3, 16, 16), torch.rand(2), torch.zeros(2)
    with torch.no_grad():
        assert torch.equal(net(x, t, s, torch.tensor([0, 7])), src(x, t, s, torch.tensor([0, 7])))


@pytest.mark.parametrize("kind", ["DiT", "UNet"])
def test_our_checkpoint_round_trips_with_ema_by_default(kind, tmp_path):
    net, x, t, s = make(kind)
    ema = perturb(type(net)(**net.init_kwargs))                          # init_kwargs rebuild the network
    perturb(net)
    path = our_file(tmp_path / "ours.pt", net, ema, kind)
    y = torch.tensor([0, 4, 10])
    with torch.no_grad():
        loaded = soflow.load_network(path)
        assert type(loaded) is type(net) and not loaded.training
        assert torch.equal(loaded(x, t, s, y), ema.eval()(x, t, s, y))
        assert torch.equal(soflow.load_network(path, use_ema=False)(x, t, s, y), net.eval()(x, t, s, y))


def test_mismatched_checkpoint_names_missing_unexpected_and_misshapen_keys(tmp_path):
    src = tiny_dit()
    sd = {"network." + k: v for k, v in src.state_dict().items()}
    del sd["network.blocks.1.attn.proj.bias"]
    sd["network.blocks.0.attn.extra"] = torch.zeros(3)
    sd["network.final_layer.linear.weight"] = torch.zeros(5, 64)
    path = tmp_path / "bad.pt"
    torch.save({"ema_model": sd, "model": sd}, path)
    with pytest.raises(ValueError) as err:
        soflow.load_network(path)
    msg = str(err.value)
    assert "missing keys (1): blocks.1.attn.proj.bias" in msg
    assert "unexpected keys (1): blocks.0.attn.extra" in msg
    assert "shape mismatches (1): final_layer.linear.weight (checkpoint (5, 64), network (64, 64))" in msg
    assert "arguments the checkpoint was trained with" in msg


def test_our_checkpoint_with_wrong_arch_kwargs_is_reported(tmp_path):
    net, ema = tiny_unet(), tiny_unet()
    path = our_file(tmp_path / "o.pt", net, ema, "UNet")
    ckpt = torch.load(path, weights_only=False)
    ckpt["arch_kwargs"] = {**ckpt["arch_kwargs"], "num_blocks": 2}
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match=r"missing keys \(\d+\): enc\.32x32_block1"):
        soflow.load_network(path)


def test_files_that_are_not_checkpoints_are_reported(tmp_path):
    with pytest.raises(ValueError, match=r"^no such file: .*nowhere.pt$"):
        soflow.load_network(tmp_path / "nowhere.pt")
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="is not a PyTorch checkpoint"):
        soflow.load_network(text)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, other)
    with pytest.raises(ValueError, match=r"is not a SoFlow checkpoint.*found \['state_dict'\]"):
        soflow.load_network(other)


def test_missing_ema_weights_are_reported(tmp_path):
    net = tiny_dit()
    path = tmp_path / "noema.pt"
    torch.save({"arch": "DiT", "arch_kwargs": net.init_kwargs, "model": net.state_dict(), "ema": None}, path)
    with pytest.raises(ValueError, match="no 'ema' weights; pass use_ema=False"):
        soflow.load_network(path)
    assert soflow.load_network(path, use_ema=False).init_kwargs == net.init_kwargs


# ============================================================================================================
# Tests that need the method core (soflow.soflow_loss, soflow.PRESETS).
# ============================================================================================================

@pytest.mark.needs_core
def test_soflow_loss_training_lowers_the_one_step_error():
    import soflow
    torch.manual_seed(0)
    net = soflow.UNet_models["UNet-T"](img_resolution=16, dropout=0.1)
    x0 = torch.rand(8, 3, 16, 16) * 2 - 1                               # a tiny fixed "dataset"
    x0[:4] = x0[:4].mean((1, 2, 3), keepdim=True)                       # half of it flat images
    config = replace(soflow.PRESETS["cifar10"], lam=0.25)
    g = torch.Generator().manual_seed(1)
    x1, t = torch.randn(x0.shape, generator=g), torch.full((8,), 0.6)

    # || f(x_t, t, 0) - x0 || on fixed draws
    @torch.no_grad()
    def one_step_error():
        net.eval()
        x_t = (1 - 0.6) * x0 + 0.6 * x1
        f = x_t - 0.6 * net(x_t, t, torch.zeros(8))                     # Euler, linear schedule
        net.train()
        return ((f - x0) ** 2).mean().item()

    before = one_step_error()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for step in range(40):
        loss, diag = soflow.soflow_loss(net, x0, config=config, step=step, total_steps=1000)
        assert torch.isfinite(loss) and "loss" in diag
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert one_step_error() < 0.6 * before


@pytest.mark.needs_core
def test_unet_dropout_masks_are_shared_by_student_and_target_passes():
    import soflow
    torch.manual_seed(0)
    net = soflow.UNet_models["UNet-T"](img_resolution=16, dropout=0.3).train()
    passes, current = [], {}

    def hook(module, inputs, output):
        current.setdefault("masks", []).append(output != 0)
        current["grad"], current["batch"] = torch.is_grad_enabled(), inputs[0].shape[0]
    for m in net.modules():
        if isinstance(m, nn.Dropout):
            m.register_forward_hook(hook)
    n_drop = sum(isinstance(m, nn.Dropout) for m in net.modules())

    real_forward = net.forward

    def recording_forward(*args, **kw):                                 # one record per network call
        current.clear()
        out = real_forward(*args, **kw)
        assert len(current["masks"]) == n_drop
        passes.append(dict(current))
        return out
    net.forward = recording_forward

    x0 = torch.rand(8, 3, 16, 16) * 2 - 1
    # 4 flow matching rows, 4 consistency rows
    config = replace(soflow.PRESETS["cifar10"], lam=0.5)
    soflow.soflow_loss(net, x0, config=config, step=0, total_steps=100)

    same = lambda a, b: all(torch.equal(u, v) for u, v in zip(a["masks"], b["masks"]))  # noqa: E731
    targets = [p for p in passes if not p["grad"]]
    students = [p for p in passes if p["grad"] and p["batch"] == 4]
    assert len(targets) == 1 and targets[0]["batch"] == 4
    # Exactly one gradient pass (consistency student) reuses the target's masks; the FM pass draws its own.
    assert sum(same(p, targets[0]) for p in students) == 1 and len(students) == 2
    # A fresh pass on another batch of the same size draws other masks.
    net(torch.randn(4, 3, 16, 16), torch.rand(4), torch.zeros(4))
    assert not same(passes[-1], targets[0])


def test_dit_time_features_are_cosines_then_sines():
    """DiT's timestep embedding (the released checkpoints were trained with it): for frequencies
    f_i = 10000^(-i / half), i < half, the features of t are [cos(t f), sin(t f)]."""
    t = torch.tensor([0.0, 0.3, 1.0])
    half = 128
    freqs = 10000 ** (-torch.arange(half, dtype=torch.float64) / half)
    args = t.double()[:, None] * freqs[None]
    expected = torch.cat([torch.cos(args), torch.sin(args)], dim=1).float()
    torch.testing.assert_close(soflow.timestep_embedding(t, 2 * half), expected, atol=1e-5, rtol=0)


# ============================================================================================================
# The released U-Net: EDM's SongUNet with SoFlow's two time inputs, its function and layout
# ============================================================================================================
RELEASED_TINY = Path(__file__).parent / "data" / "released_unet_tiny.pt"
RELEASED_UNET_PARAMS = 55_932_419

# The released CIFAR-10 U-Net's state dict (official_unet_state_dict.md, 425 entries), written compactly.
RELEASED_TOP = {
    "map_augment.weight": (512, 6), "map_layer0.weight": (512, 512), "map_layer0.bias": (512,),
    "map_layer1.weight": (512, 512), "map_layer1.bias": (512,),
    "enc.32x32_conv.weight": (128, 3, 3, 3), "enc.32x32_conv.bias": (128,),
    "dec.32x32_aux_norm.weight": (256,), "dec.32x32_aux_norm.bias": (256,),
    "dec.32x32_aux_conv.weight": (3, 256, 3, 3), "dec.32x32_aux_conv.bias": (3,),
}
# Blocks ("blockI/J" stands for blockI and blockJ): in channels, and s = 1x1 skip conv, r = resamples (a
# resample_filter buffer in conv0 and skip), a = attention. Every block has 256 output channels.
RELEASED_BLOCKS = [
    ("enc.32x32_block0", 128, "s"), ("enc.32x32_block1/2/3", 256, ""),
    ("enc.16x16_down", 256, "sr"), ("enc.16x16_block0/1/2/3", 256, "a"),
    ("enc.8x8_down", 256, "sr"), ("enc.8x8_block0/1/2/3", 256, ""),
    ("dec.8x8_in0", 256, "a"), ("dec.8x8_in1", 256, ""), ("dec.8x8_block0/1/2/3/4", 512, "s"),
    ("dec.16x16_up", 256, "sr"), ("dec.16x16_block0/1/2/3", 512, "s"), ("dec.16x16_block4", 512, "sa"),
    ("dec.32x32_up", 256, "sr"), ("dec.32x32_block0/1/2/3", 512, "s"), ("dec.32x32_block4", 384, "s"),
]


def released_layout():
    layout = dict(RELEASED_TOP)
    for names, cin, flags in RELEASED_BLOCKS:
        head, _, tail = names.partition("block")
        for name in [head + "block" + i for i in tail.split("/")] if tail else [names]:
            entries = {"norm0.weight": (cin,), "norm0.bias": (cin,), "conv0.weight": (256, cin, 3, 3),
                       "conv0.bias": (256,), "affine.weight": (256, 512), "affine.bias": (256,),
                       "norm1.weight": (256,), "norm1.bias": (256,), "conv1.weight": (256, 256, 3, 3),
                       "conv1.bias": (256,)}
            if "s" in flags:
                entries.update({"skip.weight": (256, cin, 1, 1), "skip.bias": (256,)})
            if "r" in flags:
                entries.update({"conv0.resample_filter": (1, 1, 4, 4), "skip.resample_filter": (1, 1, 4, 4)})
            if "a" in flags:
                entries.update({"norm2.weight": (256,), "norm2.bias": (256,), "qkv.weight": (768, 256, 1, 1),
                                "qkv.bias": (768,), "proj.weight": (256, 256, 1, 1), "proj.bias": (256,)})
            layout.update({f"{name}.{k}": v for k, v in entries.items()})
    return layout


def fir_kernel():
    """outer([1, 3, 3, 1], [1, 3, 3, 1]) / 8^2, written out."""
    return torch.tensor([[1., 3, 3, 1], [3, 9, 9, 3], [3, 9, 9, 3], [1, 3, 3, 1]]) / 64


@pytest.fixture(scope="module")
def released():
    return torch.load(RELEASED_TINY)


def from_released_config(c):
    """Our UNet from the released constructor arguments (EDM's names)."""
    assert (c["out_channels"], c["label_dim"], c["channel_mult_emb"], c["embedding_type"], c["encoder_type"],
            c["decoder_type"]) == (c["in_channels"], 0, 4, "positional", "standard", "standard")
    keep = ("img_resolution", "in_channels", "model_channels", "num_blocks", "dropout", "channel_mult_noise",
            "augment_dim")
    return soflow.UNet(**{k: c[k] for k in keep}, channel_mult=tuple(c["channel_mult"]),
                       attn_resolutions=tuple(c["attn_resolutions"]),
                       resample_filter=tuple(c["resample_filter"]))


def assert_matches(out, ref):
    torch.testing.assert_close(out, ref, atol=1e-5 * ref.abs().max().item(), rtol=0)


# ----- The released function and layout -----

def test_released_tiny_unet_loads_strictly_and_reproduces_its_outputs(released):
    net = from_released_config(released["config"]).eval()
    own = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert own == {k: tuple(v.shape) for k, v in released["state_dict"].items()}
    net.load_state_dict(released["state_dict"], strict=True)
    inp = released["inputs"]
    with torch.no_grad():
        assert_matches(net(inp["x"], inp["t"], inp["s"]), released["output"])
        assert_matches(net(inp["x"], inp["t"], inp["s"], cond=inp["augment_labels"]),
                       released["output_with_augment_labels"])
    # The filter buffers as built equal the released ones.
    fresh = from_released_config(released["config"]).state_dict()
    filters = [k for k in fresh if k.endswith("resample_filter")]
    assert len(filters) == 4 and all(torch.equal(fresh[k], released["state_dict"][k]) for k in filters)


def test_full_size_unet_has_the_released_parameter_count_and_state_dict():
    with torch.device("meta"):
        net = soflow.UNet_models["UNet-CIFAR10"]()
    assert sum(p.numel() for p in net.parameters() if p.requires_grad) == RELEASED_UNET_PARAMS
    # The released U-Net trains with dropout 0.3, as visible modules (forward hooks see them).
    drops = [m for m in net.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == sum(isinstance(m, soflow.UNetBlock) for m in net.modules())
    assert {m.p for m in drops} == {0.3}
    layout = released_layout()
    assert len(layout) == 425
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == layout
    assert [k for k, _ in net.named_buffers()] == [k for k in layout if k.endswith("resample_filter")]


# ----- FIR resampling -----

def test_fir_downsampling_equals_the_sum_over_the_padded_image():
    torch.manual_seed(0)
    x, k = torch.randn(2, 3, 6, 6), fir_kernel()
    padded = F.pad(x, (1, 1, 1, 1))                        # zero padding 1, then 4x4 windows with stride 2
    expected = torch.zeros(2, 3, 3, 3)
    for i in range(3):
        for j in range(3):
            expected[:, :, i, j] = (padded[:, :, 2 * i:2 * i + 4, 2 * j:2 * j + 4] * k).sum((-1, -2))
    torch.testing.assert_close(soflow.resample(x, k[None, None], "down"), expected, atol=1e-6, rtol=0)
    block = soflow.UNetBlock(4, 4, 8, mode="down")
    assert torch.equal(block.conv0.resample_filter, k[None, None])


def test_fir_upsampling_is_four_times_the_adjoint_of_downsampling():
    torch.manual_seed(0)
    k = fir_kernel()[None, None]
    x, y = torch.randn(2, 3, 5, 5, dtype=torch.float64), torch.randn(2, 3, 10, 10, dtype=torch.float64)
    up, down = soflow.resample(x, k, "up"), soflow.resample(y, k, "down")
    assert up.shape == y.shape and down.shape == x.shape
    # <up(x), y> = 4 <x, down(y)>
    torch.testing.assert_close((up * y).sum(), 4 * (x * down).sum(), atol=1e-10, rtol=0)
    # Away from the border, a constant image stays constant.
    inner = soflow.resample(torch.ones(1, 1, 6, 6), k.float(), "up")[..., 1:-1, 1:-1]
    torch.testing.assert_close(inner, torch.ones_like(inner))


@pytest.mark.parametrize("mode", ["down", "up"])
def test_resampling_skip_filters_first_then_applies_its_1x1_conv(mode):
    torch.manual_seed(0)
    block = soflow.UNetBlock(4, 8, 16, mode=mode)
    x = torch.randn(2, 4, 8, 8)
    resampled = soflow.resample(x, fir_kernel()[None, None], mode)
    torch.testing.assert_close(block.skip(x), F.conv2d(resampled, block.skip.weight, block.skip.bias))


# ----- Augmentation labels (cond) -----

def test_augment_labels_change_the_output_and_zero_labels_equal_none(released):
    net = from_released_config(released["config"]).eval()
    net.load_state_dict(released["state_dict"])
    inp = released["inputs"]
    x, t, s, labels = inp["x"], inp["t"], inp["s"], inp["augment_labels"]
    with torch.no_grad():
        plain = net(x, t, s)
        assert (net(x, t, s, cond=labels) - plain).abs().max() > 1e-2 * plain.abs().max()
        assert torch.equal(net(x, t, s, cond=torch.zeros_like(labels)), plain)
    unaugmented = soflow.UNet_models["UNet-T"](augment_dim=0)
    assert unaugmented.map_augment is None and "map_augment.weight" not in unaugmented.state_dict()
    with pytest.raises(ValueError, match="augment_dim=0"):
        unaugmented(torch.zeros(1, 3, 32, 32), torch.ones(1), torch.zeros(1), cond=torch.zeros(1, 6))


# ----- load_network on released U-Net checkpoints -----

def save_released(path, sd, ema_sd=None):
    prefixed = lambda d: {"network." + k: v for k, v in d.items()}  # noqa: E731
    torch.save({"model": prefixed(sd), "ema_model": prefixed(ema_sd or sd), "finished_steps": 7}, path)
    return path


def test_load_network_reads_a_released_unet_and_its_size(released, tmp_path):
    sd = released["state_dict"]
    raw = {**sd, "dec.8x8_aux_conv.bias": sd["dec.8x8_aux_conv.bias"] + 1.0}   # 'model' != 'ema_model'
    net = soflow.load_network(save_released(tmp_path / "released.pt", raw, sd))
    assert type(net) is soflow.UNet and not net.training
    c = released["config"]
    assert net.init_kwargs == {**from_released_config(c).init_kwargs, "dropout": 0.3}   # dropout: not stored
    inp = released["inputs"]
    args = inp["x"], inp["t"], inp["s"]
    with torch.no_grad():
        out = net(*args, cond=inp["augment_labels"])
        assert_matches(out, released["output_with_augment_labels"])
        raw_net = soflow.load_network(tmp_path / "released.pt", use_ema=False)
        torch.testing.assert_close(raw_net(*args, cond=inp["augment_labels"]), out + 1.0)


def test_load_network_reads_a_class_conditional_unet_with_another_filter(tmp_path):
    torch.manual_seed(0)
    src = soflow.UNet_models["UNet-T"](num_classes=5, augment_dim=0, resample_filter=(1, 1),
                      in_channels=1)
    net = soflow.load_network(save_released(tmp_path / "r.pt", src.state_dict()))
    assert net.init_kwargs == {**src.init_kwargs, "dropout": 0.3, "resample_filter": (1.0, 1.0)}
    x, t, s = torch.randn(2, 1, 32, 32), torch.rand(2), torch.zeros(2)
    with torch.no_grad():
        assert torch.equal(net(x, t, s, torch.tensor([0, 5])), src.eval()(x, t, s, torch.tensor([0, 5])))


def test_load_network_reports_a_mismatched_released_unet(released, tmp_path):
    sd = dict(released["state_dict"])
    del sd["enc.4x4_block0.proj.bias"]
    sd["enc.4x4_down.skip.resample_filter"] = torch.ones(1, 1, 2, 2)
    with pytest.raises(ValueError) as err:
        soflow.load_network(save_released(tmp_path / "bad.pt", sd))
    msg = str(err.value)
    assert "does not fit UNet(" in msg and "missing keys (1): enc.4x4_block0.proj.bias" in msg
    assert ("shape mismatches (1): enc.4x4_down.skip.resample_filter "
            "(checkpoint (1, 1, 2, 2), network (1, 1, 4, 4))") in msg
    del sd["map_layer0.weight"]
    with pytest.raises(ValueError, match="neither a released U-Net's map_layer0.weight nor a released DiT's"):
        soflow.load_network(save_released(tmp_path / "bad.pt", sd))
    sd = {k: v for k, v in released["state_dict"].items() if not k.startswith("enc.")}
    with pytest.raises(ValueError, match="cannot read the UNet size"):
        soflow.load_network(save_released(tmp_path / "bad.pt", sd))
