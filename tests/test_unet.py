"""The U-Net against the authors' released CIFAR-10 U-Net (EDM's SongUNet with SoFlow's two time inputs).

data/released_unet_tiny.pt holds a tiny released network (constructor config, weights in the released layout),
its inputs and its outputs, with and without augmentation labels.
"""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import soflow

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
