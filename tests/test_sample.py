"""sample.py end to end on the CPU.

A checkpoint trained here by train_cifar.py, and synthetic checkpoints in the released DiT (latents, decoded
by a tiny random VAE) and U-Net (pixels) layouts. Files, per-image seeds against a direct computation, the
same images with 1 and 2 processes and two batch sizes, no overwriting, clear errors.
"""
import json
import os
import pickle
import sys
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

import sample
import soflow
import train_cifar
import training.data
import training.files
import training.sampling
from benchmarks import sampling
from distributed import torchrun
from optional import needs

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")          # conftest.py


def randomize(net):
    """Random weights in the zero-initialised layers, so that every input reaches the output."""
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() >= 2 and p.abs().max() == 0:
                nn.init.normal_(p, std=0.05)
    return net


def released_file(path, net):
    """The released layout: 'network.'-prefixed state dicts under 'model' and 'ema_model'."""
    sd = {"network." + k: v for k, v in net.state_dict().items()}
    torch.save({"model": sd, "ema_model": sd, "finished_steps": 1}, path)
    return str(path)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A class-conditional DiT-T/4 on 4x16x16 latents and an unconditional UNet-T, in the released layout."""
    folder = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    dit = randomize(soflow.DiT_models["DiT-T/4"](input_size=16, num_classes=10))
    nn.init.normal_(dit.y_embedder.embedding_table.weight)          # classes that visibly change the images
    dit = released_file(folder / "dit.pt", dit)
    unet = released_file(folder / "unet.pt", randomize(soflow.UNet_models["UNet-T"]()))
    return SimpleNamespace(dit=dit, unet=unet)


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    """A tiny random VAE's folder (diffusers' AutoencoderKL): the DiT's 16x16 latents -> 32x32 pixels."""
    diffusers = needs("diffusers")
    folder = tmp_path_factory.mktemp("vae")
    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                    up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                                    layers_per_block=1, norm_num_groups=4)
    model.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Our checkpoint after 2 steps of train_cifar.py on a CIFAR-format folder of 40 random images.

    UNet-T, a large learning rate and a fast EMA, so that the EMA and the raw weights differ.
    """
    data = tmp_path_factory.mktemp("cifar") / training.data.FOLDER
    data.mkdir()
    rng = np.random.default_rng(0)
    for name in training.data.TRAIN_BATCHES:
        batch = {b"data": rng.integers(0, 256, (8, 3072), dtype=np.uint8),
                 b"labels": list(rng.integers(0, 10, 8))}
        (data / name).write_bytes(pickle.dumps(batch))
    run = tmp_path_factory.mktemp("run")
    train_cifar.main(["--model", "UNet-T", "--global-batch-size", "8", "--steps", "2", "--lr", "1e-2",
                      "--ema-decay", "0.5", "--data-path", str(data.parent), "--results-dir", str(run)])
    return str(run / "checkpoints" / "0000002.pt")


def run_sample(out, *flags):
    """sample.py in this process; returns (arr_0, arr_1 or None)."""
    sample.main([*flags, "--npz", "--out", str(out)])
    with np.load(f"{out}.npz") as f:
        assert set(f.files) <= {"arr_0", "arr_1"}
        return f["arr_0"], f["arr_1"] if "arr_1" in f.files else None


def expected(net, config, n, nfe, seed=0, num_classes=0, decode=lambda x: x, times=None):
    """Image i computed alone, from its own generator: numpy's, seeded by (seed, i).

    Alone, so sample.py runs with --batch-size 1: the same kernels, the same bits. The generator draws its
    class, x_1, then the re-noising noises.
    """
    kw = net.init_kwargs
    shape = (1, kw["in_channels"], *[kw.get("input_size") or kw["img_resolution"]] * 2)
    images, labels = [], []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        y = torch.tensor([rng.integers(num_classes)]) if num_classes else None
        x1, *eps = [torch.from_numpy(rng.standard_normal(shape, dtype=np.float32)) for _ in range(nfe)]
        x0 = decode(soflow.sample(net, x1, y, config=config, steps=nfe, times=times, mode="renoise", eps=eps))
        images.append(training.files.to_uint8(x0).permute(0, 2, 3, 1).numpy())
        labels.append(y)
    return np.concatenate(images), torch.cat(labels).numpy() if num_classes else None


def test_our_checkpoint_gives_its_ema_images_a_grid_and_an_npz(trained, tmp_path, capsys):
    pixels, labels = run_sample(tmp_path / "ours", "--ckpt", trained, "--num-images", "5",
                                "--batch-size", "1")
    assert pixels.shape == (5, 32, 32, 3) and pixels.dtype == np.uint8 and labels is None
    net = soflow.load_network(trained)
    assert np.array_equal(pixels, expected(net, net.soflow_config, 5, 1)[0])
    import matplotlib.pyplot as plt
    assert plt.imread(tmp_path / "ours.png").shape[:2] == (2 * 32, 3 * 32)            # 5 images, 3 columns
    out = capsys.readouterr().out
    assert "stores no config" not in out and "5 images in" in out
    raw, _ = run_sample(tmp_path / "raw", "--ckpt", trained, "--num-images", "5", "--batch-size", "1",
                        "--no-ema")
    assert not np.array_equal(raw, pixels)
    assert np.array_equal(raw, expected(soflow.load_network(trained, use_ema=False),
                                        net.soflow_config, 5, 1)[0])


def test_the_euler_sampler_gives_a_flow_matching_teachers_own_samples(trained, tmp_path, capsys):
    pixels, _ = run_sample(tmp_path / "euler", "--ckpt", trained, "--num-images", "3", "--batch-size", "1",
                           "--sampler", "euler", "--nfe", "4")
    net = soflow.load_network(trained)
    for i in range(3):                                                   # image i: x_1 from (seed, i) alone
        rng = np.random.default_rng([0, i])
        x1 = torch.from_numpy(rng.standard_normal((1, 3, 32, 32), dtype=np.float32))
        x0 = soflow.sample_euler(net, x1, config=net.soflow_config, steps=4)
        assert np.array_equal(pixels[i], training.files.to_uint8(x0).permute(0, 2, 3, 1).numpy()[0])
    with pytest.raises(SystemExit):
        sample.parse_args(["--ckpt", trained, "--sampler", "euler", "--times", "1", "0.5", "0"])
    assert "--sampler euler takes --nfe equal steps" in capsys.readouterr().err


def test_released_dit_decodes_latents_and_labels_the_npz(ckpts, vae_folder, tmp_path, capsys):
    pixels, labels = run_sample(tmp_path / "dit", "--ckpt", ckpts.dit, "--vae", vae_folder,
                                "--num-images", "6", "--batch-size", "1", "--nfe", "2", "--grid", "4")
    assert pixels.shape == (6, 32, 32, 3) and pixels.dtype == np.uint8                 # the VAE's output size
    assert labels.shape == (6,) and labels.dtype == np.int64 and 0 <= labels.min() and labels.max() < 10
    net, vae = soflow.load_network(ckpts.dit), training.sampling.load_vae(vae_folder)
    want, want_labels = expected(net, soflow.PRESETS["imagenet"], 6, 2, num_classes=10,
                                 decode=lambda z: training.sampling.decode_latents(vae, z))
    assert np.array_equal(pixels, want) and np.array_equal(labels, want_labels)
    assert pixels.std() > 10                                         # real images, not a constant
    import matplotlib.pyplot as plt
    assert plt.imread(tmp_path / "dit.png").shape[:2] == (64, 64)                     # --grid 4: 2 x 2
    assert capsys.readouterr().out.count("assuming the released PRESETS['imagenet']") == 1


def test_a_latent_checkpoint_decodes_with_the_vae_and_scale_it_records(ckpts, vae_folder, tmp_path, capsys):
    # Ours: the VAE's folder and a scale of 0.5 recorded in the checkpoint; no --vae given.
    net = soflow.load_network(ckpts.dit)
    weights = net.state_dict()
    torch.save(dict(arch="DiT", arch_kwargs=net.init_kwargs, model=weights, ema=weights,
                    config=asdict(soflow.PRESETS["imagenet"]), vae=dict(name=vae_folder, scale=0.5)),
               tmp_path / "ours.pt")
    pixels, _ = run_sample(tmp_path / "ours", "--ckpt", str(tmp_path / "ours.pt"), "--num-images", "3",
                           "--batch-size", "1")
    vae = training.sampling.load_vae(vae_folder)
    want, _ = expected(net, soflow.PRESETS["imagenet"], 3, 1, num_classes=10,
                       decode=lambda z: vae.decode(z / 0.5).sample.clamp(-1, 1))
    assert np.array_equal(pixels, want)
    # --vae names another: it decodes, and says so.
    run_sample(tmp_path / "other", "--ckpt", str(tmp_path / "ours.pt"), "--num-images", "1", "--vae",
               str(Path(vae_folder).resolve()) + "/")
    assert "decoding with --vae" in capsys.readouterr().out


def test_released_unet_gives_unlabelled_pixels(ckpts, tmp_path, capsys):
    pixels, labels = run_sample(tmp_path / "unet", "--ckpt", ckpts.unet, "--num-images", "3",
                                "--sampler", "chain", "--nfe", "2")
    assert pixels.shape == (3, 32, 32, 3) and labels is None
    assert "assuming the released PRESETS['cifar10']" in capsys.readouterr().out


def test_chosen_classes_repeat_in_turn(ckpts, vae_folder, tmp_path):
    _, labels = run_sample(tmp_path / "classes", "--ckpt", ckpts.dit, "--vae", vae_folder,
                           "--num-images", "5", "--class", "7", "2")
    assert labels.tolist() == [7, 2, 7, 2, 7]


def assert_same_up_to_rounding(a, b):
    """Batched float kernels round differently for different batch sizes (DiT-T/4: ~4e-7 between batches of 2
    and 8); now and then a pixel on a quantization boundary moves by one level."""
    assert np.abs(a.astype(int) - b).max() <= 1 and (a != b).mean() < 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("nfe", [1, 2])
def test_same_seed_same_images_with_1_or_2_processes_and_any_batch_size(ckpts, vae_folder, tmp_path, nfe):
    flags = ["--ckpt", ckpts.dit, "--vae", vae_folder, "--num-images", "7", "--nfe", str(nfe), "--seed", "3"]
    one = run_sample(tmp_path / "one", *flags, "--batch-size", "2")
    # Two processes run the same batches ([0, 1], [2, 3], [4, 5], [6]), two each: the same bits.
    out = torchrun("sample.py", *flags, "--batch-size", "2", "--npz", "--out", str(tmp_path / "two")).stdout
    assert "2 process(es)" in out and out.count("wrote") == 1                          # rank 0 alone reports
    with np.load(tmp_path / "two.npz") as f:
        assert np.array_equal(one[0], f["arr_0"]) and np.array_equal(one[1], f["arr_1"])
    # Another batch size: the same classes and noise, the same images up to float rounding.
    big = run_sample(tmp_path / "big", *flags, "--batch-size", "7")
    assert np.array_equal(one[1], big[1])
    assert_same_up_to_rounding(one[0], big[0])
    other = run_sample(tmp_path / "other", *flags[:-1], "4", "--batch-size", "7")       # another seed
    assert (other[0] != one[0]).mean() > 0.5 and not np.array_equal(other[1], one[1])


def test_per_image_draws_do_not_depend_on_the_batch_or_the_number_of_steps():
    whole = training.sampling.per_image_draws(5, torch.arange(6), (2, 3), 10, None, 2)
    part = training.sampling.per_image_draws(5, torch.tensor([3, 4]), (2, 3), 10, None, 2)
    for a, b in zip([whole[0], whole[1], *whole[2]], [part[0], part[1], *part[2]]):
        assert torch.equal(a[3:5], b)
    one_step = training.sampling.per_image_draws(5, torch.arange(6), (2, 3), 10, None, 0)
    # x_1 drawn before the eps
    assert torch.equal(one_step[1], whole[1]) and torch.equal(one_step[0], whole[0])
    assert not torch.equal(whole[2][0], whole[2][1]) and not torch.equal(whole[1], whole[2][0])
    y, _, _ = training.sampling.per_image_draws(5, torch.arange(3, 6), (2, 3), 10, [1, 8], 0)
    # chosen classes cycle with the image index
    assert y.tolist() == [8, 1, 8]


def test_an_existing_output_is_not_overwritten(ckpts, tmp_path):
    flags = ["--ckpt", ckpts.unet, "--num-images", "2", "--out", str(tmp_path / "s"), "--npz"]
    sample.main(flags)
    before = [(tmp_path / n).read_bytes() for n in ("s.png", "s.npz")]
    with pytest.raises(SystemExit, match=r"s\.png and .*s\.npz already there: pass --overwrite"):
        sample.main([*flags, "--seed", "1"])
    assert [(tmp_path / n).read_bytes() for n in ("s.png", "s.npz")] == before
    sample.main([*flags, "--seed", "1", "--overwrite"])
    assert (tmp_path / "s.npz").read_bytes() != before[1]
    # no temporary files left
    assert sorted(os.listdir(tmp_path)) == ["s.npz", "s.png"]


def test_a_failed_write_stops_with_the_file_and_leaves_nothing_half_written(ckpts, tmp_path):
    (tmp_path / "s.png").mkdir()                        # in the way of the grid
    message = (r"sample.py: could not write .*s\.png \(IsADirectoryError.*"
               r"no output file is half-written, and the same command \(with --overwrite\)")
    with pytest.raises(SystemExit, match=message):
        sample.main(["--ckpt", ckpts.unet, "--num-images", "2", "--out", str(tmp_path / "s"), "--npz",
                     "--overwrite"])
    assert sorted(os.listdir(tmp_path)) == ["s.png"]


def test_clear_errors(ckpts, tmp_path, monkeypatch):
    out = ["--out", str(tmp_path / "x")]
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    with pytest.raises(SystemExit, match="notes.txt is not a PyTorch checkpoint"):
        sample.main(["--ckpt", str(text), *out])
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(SystemExit, match="is not a SoFlow checkpoint"):
        sample.main(["--ckpt", str(tmp_path / "other.pt"), *out])
    sd = torch.load(ckpts.dit)["ema_model"]
    del sd["network.blocks.1.attn.proj.bias"]
    torch.save({"ema_model": sd}, tmp_path / "misfit.pt")
    with pytest.raises(SystemExit,
                       match=r"(?s)does not fit DiT.*missing keys \(1\): blocks.1.attn.proj.bias"):
        sample.main(["--ckpt", str(tmp_path / "misfit.pt"), *out])
    torch.save({"ema_model": {"network.w": torch.zeros(1)}}, tmp_path / "unknown.pt")
    with pytest.raises(SystemExit, match="neither a released U-Net's .* nor a released DiT's"):
        sample.main(["--ckpt", str(tmp_path / "unknown.pt"), *out])
    mlp = soflow.MLP()
    torch.save({"arch": "MLP", "arch_kwargs": mlp.init_kwargs, "model": mlp.state_dict(),
                "ema": mlp.state_dict()}, tmp_path / "mlp.pt")
    with pytest.raises(SystemExit, match="holds a MLP; images come from a DiT or a UNet"):
        sample.main(["--ckpt", str(tmp_path / "mlp.pt"), *out])
    with pytest.raises(SystemExit, match="--class 10 is out of range: the model has classes 0 to 9"):
        sample.main(["--ckpt", ckpts.dit, "--vae", str(tmp_path / "vae"), "--class", "3", "10", *out])
    with pytest.raises(SystemExit, match="unconditional"):
        sample.main(["--ckpt", ckpts.unet, "--class", "3", *out])
    monkeypatch.setitem(sys.modules, "diffusers", None)                                # as if not installed
    with pytest.raises(SystemExit, match="the SD VAE needs diffusers"):
        sample.main(["--ckpt", ckpts.dit, "--vae", str(tmp_path / "vae"), *out])
    assert not any(name.startswith("x.") for name in os.listdir(tmp_path))


@pytest.mark.parametrize("flag", [["--nfe", "0"], ["--num-images", "0"], ["--seed", "-1"], ["--grid", "0"]])
def test_bad_numbers_are_refused_by_the_parser(flag, capsys):
    with pytest.raises(SystemExit):
        sample.parse_args(["--ckpt", "c.pt", *flag])
    assert "must be" in capsys.readouterr().err


def test_a_custom_grid_and_a_run_folder_and_a_missing_file(trained, tmp_path, capsys):
    """--times 1 0.3 0: two calls through t = 0.3; --ckpt RUN: its newest checkpoint; a wrong path: said."""
    run = Path(trained).parents[1]
    pixels, _ = run_sample(tmp_path / "grid", "--ckpt", str(run), "--times", "1", "0.3", "0",
                           "--num-images", "3", "--batch-size", "1")
    net = soflow.load_network(trained)
    assert np.array_equal(pixels, expected(net, net.soflow_config, 3, 2, times=[1.0, 0.3, 0.0])[0])
    assert not np.array_equal(pixels, expected(net, net.soflow_config, 3, 2)[0])      # not the equal grid
    assert "2 NFE" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"no such file: .*0000009.pt; .*checkpoints holds 0000002.pt$"):
        sample.main(["--ckpt", str(run / "checkpoints" / "0000009.pt")])
    with pytest.raises(SystemExit, match=r"no such file: .*nowhere.pt$"):
        sample.main(["--ckpt", str(tmp_path / "nowhere.pt")])
    with pytest.raises(SystemExit, match="holds no checkpoints"):
        sample.main(["--ckpt", str(tmp_path)])
    for grid in (["1", "0.5", "0.5"], ["0.5"], ["0", "1"]):
        with pytest.raises(SystemExit):
            sample.parse_args(["--ckpt", trained, "--times", *grid])
        assert "--times must decrease strictly, 2 points or more" in capsys.readouterr().err


def test_sampling_benchmark_runs_sample_py_end_to_end(vae_folder, tmp_path):
    out = tmp_path / "sampling.json"
    sampling.main(["--model", "DiT-T/4", "--batch-size", "2", "--euler-steps", "1", "--warmup", "0",
                   "--repeats", "1", "--euler-repeats", "1", "--end-to-end", "--e2e-images", "3",
                   "--vae", vae_folder, "--json", str(out)])
    e2e = json.loads(out.read_text())["end_to_end"]
    parts = {"noise", "generate", "decode", "convert", "fid", "write"}
    assert e2e["images"] == 3 and set(e2e["seconds"]) == parts
    assert sum(e2e["seconds"].values()) <= e2e["loop_seconds"] and e2e["generation_to_forward"] > 0


class TinyExtractor(nn.Module):
    """Stands in for fid.py's Inception (the plumbing is under test): uint8 images -> 4 features."""
    feature_dim = 4

    def forward(self, images):
        x = images.float() / 255
        return torch.cat([x.mean((2, 3)), x.flatten(1).std(1, keepdim=True)], 1)


def test_fid_goes_batch_by_batch_into_the_extractor_and_out_json(trained, tmp_path, monkeypatch):
    import fid
    monkeypatch.setattr(fid, "load_inception", lambda weights=None, device="cpu": TinyExtractor())
    reference = tmp_path / "ref.npz"                                  # an image set as the reference
    np.savez(reference, arr_0=np.random.default_rng(1).integers(0, 256, (9, 32, 32, 3), dtype=np.uint8))
    pixels, _ = run_sample(tmp_path / "s", "--ckpt", trained, "--num-images", "7", "--batch-size", "3",
                           "--fid", str(reference), "--grid", "4")
    report = json.loads((tmp_path / "s.json").read_text())
    # The same number from the written images: their features against the reference's (whole sets at once:
    # float32 reductions round differently from batches of 3, by 1e-7).
    def stats(nhwc):
        return fid.FeatureStats(4).add(TinyExtractor()(torch.from_numpy(nhwc).permute(0, 3, 1, 2))).mu_sigma()
    expected = fid.frechet_distance(*stats(pixels), *stats(np.load(reference)["arr_0"]))
    assert report["fid"] == pytest.approx(expected, rel=1e-6)
    assert report["num_images"] == 7 and report["nfe"] == 1 and report["checkpoint"] == trained
    assert report["reference_sha256"] == fid.file_sha256(reference) and report["images_per_s"] > 0
    # Without --npz only the grid's images are gathered; the FID is the same.
    sample.main(["--ckpt", trained, "--num-images", "7", "--batch-size", "3", "--fid", str(reference),
                 "--grid", "4", "--out", str(tmp_path / "t")])
    assert json.loads((tmp_path / "t.json").read_text())["fid"] == report["fid"]
    assert not (tmp_path / "t.npz").exists()
    with pytest.raises(SystemExit, match="--fid: .*(arr_0|mu)"):
        bad = tmp_path / "bad.npz"
        np.savez(bad, other=np.zeros(3))
        sample.main(["--ckpt", trained, "--num-images", "2", "--fid", str(bad), "--out", str(tmp_path / "u")])
