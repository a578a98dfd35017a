"""Learning on images: the training scripts' loops teach a tiny network a small set of patterns in minutes.

Each test writes a data set with clear structure (four fixed patterns with noise), runs a script's `main` for
a few hundred steps on the CPU and samples the final checkpoint's EMA with one network call. The samples must
land near the training set, nearer than the noise they start from (which is what step 0 gives: the networks
start as f = x; pixels: under 0.8 of its distance, latents: under 0.5), and cover the patterns: a network
that learned the data's mean, or that the loss pushed away from the data, fails. Distances are RMS per value:
the mean over samples of the distance to the nearest training example.
"""
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import soflow
import train_cifar
import train_imagenet
import training.data
import training.sampling
from optional import needs

pytestmark = pytest.mark.slow


def patterns():
    """4 fixed RGB images of 32x32 in [-1, 1]: three half planes (top, left, diagonal) and a centre square,
    each tinted its own colour."""
    y, x = np.mgrid[0:32, 0:32]
    masks = [y < 16, x < 16, (abs(y - 15.5) < 8) & (abs(x - 15.5) < 8), y > x]
    tints = np.array([[1, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1]], dtype=np.float64)
    return np.stack([np.where(m, 0.6, -0.6)[None] + 0.25 * c[:, None, None] for m, c in zip(masks, tints)])


def noisy_patterns(n, noise=0.1, seed=0):
    """n uint8 images (n, 3, 32, 32): pattern i % 4 plus Gaussian noise, and their labels."""
    labels = np.arange(n) % 4
    x = patterns()[labels] + noise * np.random.default_rng(seed).standard_normal((n, 3, 32, 32))
    return (np.clip(x, -1, 1) * 127.5 + 127.5).round().astype(np.uint8), labels


def nearest_rms(a, b):
    """For each row of a, the RMS distance to its nearest row of b: (len(a),)."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    return (torch.cdist(a, b) / a.shape[1] ** 0.5).min(1).values


def check_learned(samples, data, classes, noise, *, far, near):
    """The samples' nearest-neighbour distance against the noise's; each class must be the nearest of some."""
    d_samples, d_noise = nearest_rms(samples, data).mean(), nearest_rms(noise, data).mean()
    nearest = torch.cdist(samples.flatten(1).double(), classes.flatten(1).double()).argmin(1)
    share = torch.bincount(nearest, minlength=len(classes)).double() / len(samples)
    print(f"nearest-neighbour RMS: samples {d_samples:.3f}, noise {d_noise:.3f}; classes {share.tolist()}")
    assert d_noise > far, "the noise should lie far from the data"
    assert d_samples < near * d_noise, f"samples {d_samples:.3f} vs noise {d_noise:.3f}: not learned"
    assert share.min() >= 0.25 / len(classes), f"a pattern is (nearly) never generated: {share.tolist()}"
    return d_samples, d_noise


def test_train_cifar_learns_patterns_in_pixels(tmp_path):
    images, labels = noisy_patterns(64)
    folder = tmp_path / "data" / training.data.FOLDER
    folder.mkdir(parents=True)
    for i, rows in enumerate(np.array_split(np.arange(len(images)), 5)):     # the 5 training batches
        (folder / training.data.TRAIN_BATCHES[i]).write_bytes(pickle.dumps(
            {b"data": images[rows].reshape(len(rows), -1), b"labels": labels[rows].tolist()}))
    steps = 200       # of a 1000-step schedule: r(k, K) stays large (README, "a laptop try")
    run = tmp_path / "run"
    train_cifar.main(["--data-path", str(tmp_path / "data"), "--no-download", "--model", "UNet-T",
                      "--global-batch-size", "16", "--steps", "1000", "--stop-at", str(steps), "--lr", "3e-3",
                      "--augment-p", "0",
                      "--log-every", "50", "--sample-every", str(steps), "--ckpt-every", str(steps),
                      "--results-dir", str(run)])
    net = soflow.load_network(run / "checkpoints" / f"{steps:07d}.pt")         # the EMA weights
    x1 = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    data = train_cifar.to_model_range(torch.from_numpy(images))
    # Step 0: a fresh network is the identity f(x, 1, 0) = x, its samples the noise itself.
    untrained = soflow.sample(soflow.UNet_models["UNet-T"](), x1, config=net.soflow_config)
    torch.testing.assert_close(untrained, x1)
    samples = soflow.sample(net, x1, config=net.soflow_config).clamp(-1, 1)
    check_learned(samples, data, torch.tensor(patterns()), x1.clamp(-1, 1), far=0.9, near=0.8)


@pytest.fixture(scope="module")
def latent_folder(tmp_path_factory):
    """`prepare`'s latents of 64 pattern images (4 classes) under a tiny AutoencoderKL (32x32 -> 4x16x16).

    The random VAE's posterior is made tight (log-variance -10) and its mean scaled so that the latents, times
    0.18215, have about unit spread: the latents then hold the patterns, not the encoder's noise."""
    AutoencoderKL = needs("diffusers").AutoencoderKL
    root = tmp_path_factory.mktemp("learning")
    images, labels = noisy_patterns(64, seed=1)
    for i, (image, label) in enumerate(zip(images, labels)):
        (root / "images" / f"c{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.transpose(1, 2, 0)).save(root / "images" / f"c{label}" / f"{i:03d}.png")
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, layers_per_block=1,
                        norm_num_groups=4)
    with torch.no_grad():
        vae.quant_conv.weight[:4] *= 20
        vae.quant_conv.bias[:4] *= 20
        vae.quant_conv.weight[4:] = 0
        vae.quant_conv.bias[4:] = -10
    vae.save_pretrained(root / "vae")
    train_imagenet.main(["prepare", "--data-path", str(root / "images"), "--latents", str(root / "latents"),
                         "--vae", str(root / "vae"), "--image-size", "32", "--workers", "0"])
    return root / "latents"


def test_train_imagenet_learns_patterns_in_latents(latent_folder, tmp_path):
    steps = 800
    run = tmp_path / "run"
    train_imagenet.main(["--latents", str(latent_folder), "--model", "DiT-T/4", "--global-batch-size", "16",
                         "--steps", str(steps), "--lr", "1e-3", "--vae", "none", "--log-every", "100",
                         "--sample-every", str(steps), "--ckpt-every", str(steps), "--results-dir", str(run)])
    net = soflow.load_network(run / "checkpoints" / f"{steps:07d}.pt")
    data = torch.from_numpy(np.load(latent_folder / "mean.npy")) * training.sampling.VAE_SCALE
    # (64, 4, 16, 16)
    labels = torch.from_numpy(np.load(latent_folder / "labels.npy"))
    classes = torch.stack([data[labels == k].mean(0) for k in range(4)])
    x1 = torch.randn(64, *data.shape[1:], generator=torch.Generator().manual_seed(1))
    y = torch.arange(64) % 4
    samples = soflow.sample(net, x1, y, config=net.soflow_config)
    # Class-conditional: most samples land nearest the mean of the class they were asked for.
    right = (torch.cdist(samples.flatten(1), classes.flatten(1)).argmin(1) == y).double().mean()
    print(f"share nearest the class asked for: {right:.3f}")
    check_learned(samples, data, classes, x1, far=0.9, near=0.5)
    assert right > 0.8
