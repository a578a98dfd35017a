"""train_imagenet.py end to end, on generated images and a tiny VAE.

A folder of a dozen generated images in three classes and a tiny randomly initialised AutoencoderKL saved to a
local folder (no download): ADM's crop, `prepare` (its resume, its refusals, its report of unreadable files,
flips, 2 processes), then training under torchrun with exact resume and decoded grids.
"""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sample
import train_imagenet
import training.sampling
from distributed import torchrun
from optional import needs

needs("diffusers")

TINY = ["--model", "DiT-T/4", "--global-batch-size", "8", "--steps", "4", "--log-every", "1",
        "--sample-every", "4"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(images, vae): 3 class folders of 4 random images of various sizes (JPEG and PNG) plus one broken file,
    and a tiny AutoencoderKL (3x32x32 -> 4x16x16) saved with save_pretrained."""
    from diffusers import AutoencoderKL
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for name in ("n01", "n02", "n03"):
        (root / "images" / name).mkdir(parents=True)
        for i in range(4):
            h, w = rng.integers(32, 90, 2)
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "images" / name / f"{i}.{'png' if i % 2 else 'jpeg'}")
    (root / "images" / "n02" / "broken.JPEG").write_bytes(b"not an image")
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, layers_per_block=1,
                        norm_num_groups=4)
    vae.save_pretrained(root / "vae")
    return root / "images", str(root / "vae")


def prepare_flags(images, vae, latents, *extra):
    return ["prepare", "--data-path", str(images), "--latents", str(latents), "--vae", vae,
            "--image-size", "32", "--shard-size", "4", "--batch-size", "3", "--workers", "0", *extra]


@pytest.fixture(scope="module")
def latents(folders, tmp_path_factory):
    """A folder prepared with flips in this process."""
    images, vae = folders
    out = tmp_path_factory.mktemp("latents") / "in32"
    train_imagenet.main(prepare_flags(images, vae, out, "--flip"))
    return out


def test_adm_crop_halves_with_a_box_filter_then_takes_the_centre():
    pixels = np.random.default_rng(1).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    # The short side 64 = 2 x 32: one halving by 2x2 box means (to 32 x 48), no resize,
    # then the central 32 columns.
    halved = pixels.reshape(32, 2, 48, 2, 3).astype(np.float64).mean((1, 3))
    crop = train_imagenet.center_crop_arr(Image.fromarray(pixels), 32)
    assert crop.shape == (32, 32, 3) and crop.dtype == np.uint8
    assert np.abs(crop.astype(np.float64) - halved[:, 8:40]).max() <= 1   # PIL rounds in fixed point
    # Already at the size on its short side: untouched but for the centre crop.
    tall = pixels[:, :32]
    assert np.array_equal(train_imagenet.center_crop_arr(Image.fromarray(tall), 32), tall[16:48])


def test_prepare_stores_the_vae_posterior_of_each_crop_and_of_its_flip(folders, latents):
    images, vae_path = folders
    manifest = json.loads((latents / "manifest.json").read_text())
    assert manifest["complete"] and manifest["count"] == 12 and manifest["unreadable"] == 1
    assert manifest["classes"] == ["n01", "n02", "n03"] and manifest["shape"] == [4, 16, 16]
    assert manifest["copies"] == 2 and manifest["dtype"] == "float32" and manifest["scale"] == 0.18215
    mean, std = np.load(latents / "mean.npy"), np.load(latents / "std.npy")
    labels = np.load(latents / "labels.npy")
    assert mean.shape == std.shape == (26, 4, 16, 16) and mean.dtype == np.float32
    # Sorted folders and files: n01's 4 images, n02's 4 and broken.JPEG (unreadable: -1), n03's 4.
    assert labels.tolist() == [0] * 4 + [1] * 4 + [-1] + [2] * 4
    assert "broken.JPEG" in (latents / "unreadable.txt").read_text()
    vae = training.sampling.load_vae(vae_path)
    for i, path in ((0, images / "n01" / "0.jpeg"), (6, images / "n02" / "2.jpeg")):
        crop = train_imagenet.center_crop_arr(Image.open(path), 32)
        x = torch.from_numpy(crop.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
        with torch.no_grad():
            for copy, image in enumerate((x, x.flip(3))):
                posterior = vae.encode(image).latent_dist
                torch.testing.assert_close(torch.from_numpy(mean[copy * 13 + i]), posterior.mean[0],
                                           atol=1e-5, rtol=0)
                torch.testing.assert_close(torch.from_numpy(std[copy * 13 + i]), posterior.std[0],
                                           atol=1e-5, rtol=0)


def test_prepare_resumes_only_unfinished_shards_and_refuses_other_settings(folders, latents, tmp_path,
                                                                           capsys):
    images, vae = folders
    out = tmp_path / "in32"
    shutil.copytree(latents, out)
    # An interruption: shard 1 (images 4-7) never got its marker; its rows hold garbage,
    # the manifest is incomplete.
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    (out / "shards" / "000001.json").unlink()
    mean = np.load(out / "mean.npy", mmap_mode="r+")
    mean[4:8] = np.nan
    mean[13 + 4:13 + 8] = np.nan
    mean.flush()
    del mean
    before = (out / "shards" / "000000.json").stat().st_mtime_ns
    with pytest.raises(SystemExit, match="half prepared"):
        train_imagenet.main(["--latents", str(out), "--results-dir", str(tmp_path / "run")])
    # A marker that cannot be written (a folder where its temporary file goes): a message, the shard not done.
    blocked = out / "shards" / f"000001.json.tmp{os.getpid()}"
    blocked.mkdir()
    with pytest.raises(SystemExit, match=r"could not write .*000001.json \(IsADirectoryError.*the finished "
                                         "shards are kept, and the same command encodes the others"):
        train_imagenet.main(prepare_flags(images, vae, out, "--flip"))
    assert not (out / "shards" / "000001.json").exists()
    blocked.rmdir()
    capsys.readouterr()
    train_imagenet.main(prepare_flags(images, vae, out, "--flip"))
    assert "4 shards, 1 to do" in capsys.readouterr().out
    # finished shards are not redone
    assert (out / "shards" / "000000.json").stat().st_mtime_ns == before
    np.testing.assert_allclose(np.load(out / "mean.npy"), np.load(latents / "mean.npy"), atol=1e-6, rtol=0)
    assert (json.loads((out / "manifest.json").read_text())
            == json.loads((latents / "manifest.json").read_text()))
    # Other settings into the same folder: refused, each difference named; nothing is touched.
    with pytest.raises(SystemExit,
                       match=r"other settings:\n  image_size: 32 there, 64 now\n  flip: True there"):
        train_imagenet.main([*prepare_flags(images, vae, out), "--image-size", "64"])
    assert json.loads((out / "manifest.json").read_text())["complete"]


def test_prepare_errors_say_what_to_do(folders, tmp_path):
    images, vae = folders
    with pytest.raises(SystemExit, match="is not a folder"):
        train_imagenet.main(prepare_flags(tmp_path / "nowhere", vae, tmp_path / "out"))
    (tmp_path / "empty" / "n01").mkdir(parents=True)
    with pytest.raises(SystemExit, match="no images in class subfolders"):
        train_imagenet.main(prepare_flags(tmp_path / "empty", vae, tmp_path / "out"))
    with pytest.raises(SystemExit, match="holds no latents: run `python train_imagenet.py prepare"):
        train_imagenet.main(["--latents", str(tmp_path / "out"), "--results-dir", str(tmp_path / "run")])
    # A folder with files of the same names but no manifest: nothing is overwritten.
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "mean.npy").write_bytes(b"precious")
    with pytest.raises(SystemExit, match="holds mean.npy but no manifest.json"):
        train_imagenet.main(prepare_flags(images, vae, tmp_path / "other"))
    assert (tmp_path / "other" / "mean.npy").read_bytes() == b"precious"


def test_latent_batches_draw_the_posterior_of_the_image_or_its_flip():
    # 5 images, the third unreadable, with flipped copies at rows 5 + i;
    # mean = 10 i + 1000 copy identifies a row.
    N = 5
    manifest = {"settings": {"num_images": N}, "copies": 2}
    index = np.arange(2 * N)
    mean = np.broadcast_to((index % N * 10 + index // N * 1000.0)[:, None, None, None], (2 * N, 4, 2, 2))
    arrays = dict(mean=mean.astype(np.float32), std=np.zeros((2 * N, 4, 2, 2), np.float32),
                  labels=np.array([7, 8, -1, 9, 6]))
    data = train_imagenet.latent_batches(manifest, arrays, torch.device("cpu"))
    get_batch, count = data.batch, data.num_examples
    assert count == 4                                                # the unreadable image is left out
    torch.manual_seed(0)
    rows = torch.arange(4).repeat(100)
    x0, y, cond = get_batch(rows)
    assert cond is None and y.tolist() == [7, 8, 9, 6] * 100         # the labels of images 0, 1, 3, 4
    # std 0: exactly the mean of the row drawn
    latent = (x0 / 0.18215).round()
    assert (latent == latent[:, :1, :1, :1]).all()
    image, copy = latent[:, 0, 0, 0] % 1000 / 10, latent[:, 0, 0, 0] // 1000
    assert image.tolist() == [0.0, 1.0, 3.0, 4.0] * 100
    assert 0.4 < copy.mean() < 0.6 and set(copy.tolist()) == {0.0, 1.0}   # the flipped copy half of the time
    # x_0 = (mean + std eps) * 0.18215 with eps ~ N(0, 1), a fresh eps at each call.
    arrays.update(mean=np.zeros_like(arrays["mean"]), std=np.full_like(arrays["std"], 2.0))
    get_batch = train_imagenet.latent_batches(manifest, arrays, torch.device("cpu")).batch
    eps = get_batch(rows)[0] / 0.18215 / 2
    assert abs(eps.mean()) < 0.05 and abs(eps.std() - 1) < 0.05
    assert not torch.equal(get_batch(rows)[0], get_batch(rows)[0])


@pytest.mark.slow
def test_two_processes_prepare_the_same_latents(folders, latents, tmp_path):
    images, vae = folders
    torchrun("train_imagenet.py", *prepare_flags(images, vae, tmp_path / "two", "--flip"))
    np.testing.assert_allclose(np.load(tmp_path / "two" / "mean.npy"), np.load(latents / "mean.npy"),
                               atol=1e-5, rtol=0)
    assert np.array_equal(np.load(tmp_path / "two" / "labels.npy"), np.load(latents / "labels.npy"))


def checkpoint(run, step):
    return torch.load(Path(run) / "checkpoints" / f"{step:07d}.pt", weights_only=False)


@pytest.mark.slow
def test_two_processes_train_resume_exactly_decode_grids_and_sample(folders, latents, tmp_path):
    _, vae = folders
    flags = [*TINY, "--latents", str(latents)]
    torchrun("train_imagenet.py", *flags, "--results-dir", str(tmp_path / "straight"))
    torchrun("train_imagenet.py", *flags, "--results-dir", str(tmp_path / "resumed"), "--stop-at", "2")
    torchrun("train_imagenet.py", *flags, "--results-dir", str(tmp_path / "resumed"))
    straight, resumed = checkpoint(tmp_path / "straight", 4), checkpoint(tmp_path / "resumed", 4)
    for key in ("model", "ema"):
        assert all(torch.equal(straight[key][k], resumed[key][k]) for k in straight[key]), key
    assert straight["arch"] == "DiT" and straight["arch_kwargs"]["input_size"] == 16
    assert straight["arch_kwargs"]["num_classes"] == 3 and straight["config"]["w"] == 3.0
    # Decoded grids: 32 images of 32 x 32 pixels (the latents are 16 x 16), 16 per row, 1 NFE above 2 NFE.
    grid = Image.open(tmp_path / "straight" / "samples" / "0000004.png")
    assert grid.size == (16 * 32, 4 * 32)
    assert "decoded by" in (tmp_path / "straight" / "log.txt").read_text()
    # sample.py reads the checkpoint: a class-conditional DiT on latents, decoded by the VAE it names (no
    # --vae: the default, sd-vae-ft-mse, cannot load offline) and the same images with that --vae.
    assert straight["vae"] == {"name": vae, "scale": 0.18215} and straight["precision"] == "fp32"
    for out, extra in (("samples", []), ("again", ["--vae", vae])):
        sample.main(["--ckpt", str(tmp_path / "straight" / "checkpoints" / "0000004.pt"), *extra,
                     "--num-images", "6", "--class", "2", "0", "--npz", "--out", str(tmp_path / out)])
    files, again = np.load(tmp_path / "samples.npz"), np.load(tmp_path / "again.npz")
    assert files["arr_0"].shape == (6, 32, 32, 3) and files["arr_1"].tolist() == [2, 0] * 3
    assert np.array_equal(files["arr_0"], again["arr_0"])


def test_one_process_without_a_vae_draws_latent_grids_and_refuses_another_configuration(latents, tmp_path):
    run = tmp_path / "run"
    flags = [*TINY, "--latents", str(latents), "--results-dir", str(run), "--vae", "none", "--steps", "2"]
    train_imagenet.main(flags)
    assert Image.open(run / "samples" / "0000002.png").size == (16 * 16, 4 * 16)
    assert "the latents' first channel" in (run / "log.txt").read_text()
    assert checkpoint(run, 2)["run_config"]["copies"] == 2
    manifest = json.loads((latents / "manifest.json").read_text())
    prepared_with = manifest["settings"]["vae"]
    assert manifest["precision"] == "fp32"                                    # prepare's, on the CPU
    assert checkpoint(run, 2)["vae"] == {"name": prepared_with, "scale": 0.18215}  # not the grids' --vae none
    with pytest.raises(SystemExit, match="another configuration"):
        train_imagenet.main([*flags, "--model", "DiT-T/2"])
    # FID needs images: the VAE decodes the samples on every process, so --vae none is refused.
    with pytest.raises(SystemExit, match="--fid-every decodes the samples with the VAE: drop --vae none"):
        train_imagenet.main([*flags, "--fid-every", "2", "--fid-ref", "ref.npz"])
