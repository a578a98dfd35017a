"""fid.py: the Inception against torch-fidelity's on the same random weights, TF1's resize, the statistics
over batches and processes, the Fréchet distance against closed forms, the sources, the command line, the
errors.

Offline: the weights are random in the real layout. What the real weights add (the numbers) is the graph's,
not this code's; the layout, the input path, the network's structure and the arithmetic are checked here.
"""
import importlib
import importlib.util
import math
import os
import pickle
import shutil
import subprocess
import sys
import types
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fid
import training.data
from distributed import ROOT, torchrun
from optional import needs, skip_reason

pytestmark = pytest.mark.usefixtures("one_thread")          # conftest.py


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    """(net, path): the FID Inception with random weights and BatchNorm statistics, saved to path.

    BatchNorm's running_var spreads over 0.05..2, so that its eps (0.001) shifts the features well beyond the
    tolerance of the comparisons; its weight, about sqrt(running_var), and He-normal convolutions keep the
    activations O(1) through the 94 layers (features up to about 15)."""
    torch.manual_seed(0)
    net = fid.InceptionV3()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.normal_(0, math.sqrt(2 / m.weight[0].numel()))
            elif isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.05, 2)
                m.weight.uniform_(0.6, 1.4).mul_(m.running_var.sqrt())
                m.bias.normal_(0, 0.2)
        nn.init.normal_(net.fc.weight, std=0.02)
    path = tmp_path_factory.mktemp("weights") / "inception-random.pth"
    torch.save(net.state_dict(), path)
    return net.eval(), path


def images(n, h=32, w=32, seed=0):
    """uint8 (n, 3, h, w) random pixels."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=g)


class Tiny(nn.Module):
    """A stand-in extractor for the plumbing: uint8 (B, 3, H, W) -> each channel's mean over the image's
    four quarters (B, 12). It tells channels and positions apart, as a mix-up of layouts would need."""
    feature_dim = 12

    def forward(self, x):
        return F.adaptive_avg_pool2d(x.float(), 2).flatten(1)


def numpy_stats(feats):
    """mu and sigma as the ADM evaluator computes them: np.mean and np.cov of the float64 features."""
    feats = np.asarray(feats, dtype=np.float64)
    return feats.mean(0), np.cov(feats, rowvar=False)


# ----- The network against torch-fidelity's (same weights, same images) -----
@pytest.fixture(scope="module")
def fidelity_extractor():
    """torch-fidelity's FeatureExtractorInceptionV3 class, imported without the package's __init__.

    torch-fidelity is a test-only install (pip install --no-deps torch-fidelity==0.4.0): its __init__ imports
    torchvision (through its other extractors and metrics), which cannot load with the CPU build of torch
    (`torchvision::nms does not exist`). The Inception module itself imports only torch and three of the
    package's own modules (helpers, feature_extractor_base, interpolate_compat_tensorflow), so an empty
    package object pointing at the installed folder lets those load as they are."""
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None:
        pytest.skip(skip_reason("torch_fidelity"))
    package = types.ModuleType("torch_fidelity")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["torch_fidelity"] = package
    try:
        module = importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
        yield module.FeatureExtractorInceptionV3
    finally:                # only torch_fidelity: a torch module imported twice registers its ops twice
        for name in [n for n in sys.modules if n == "torch_fidelity" or n.startswith("torch_fidelity.")]:
            del sys.modules[name]


def test_layout_and_features_match_torch_fidelity(inception, fidelity_extractor):
    net, path = inception
    theirs = fidelity_extractor("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    # The same names and shapes: one weight file serves both (the load above is strict).
    assert {k: v.shape for k, v in theirs.state_dict().items()} == {k: v.shape for k, v in
                                                                   net.state_dict().items()}
    # Upsampled (CIFAR's 32x32, ImageNet's 256x256) and downsampled, non-square (the axes not swapped).
    for h, w in [(32, 32), (256, 256), (333, 401)]:
        x = images(2, h, w, seed=h)
        ours, ref = fid.features(net, x), theirs(x)[0]
        assert ours.dtype == torch.float32 and ours.shape == (2, 2048)
        assert 1 < ref.abs().max() < 100                       # neither washed out nor blown up
        relative = ((ours - ref).abs().max() / ref.abs().max()).item()
        assert relative < 1e-4, f"{h}x{w}: max relative difference {relative:.2e}"


# ----- The input path -----
def tf1_resize_loops(image, out_h, out_w):
    """TF1's ResizeBilinear (align_corners=False, no half-pixel centres) on one (H, W) channel, pixel by pixel
    in float32: source coordinate i * (in / out), neighbours floor and floor + 1 (clamped), x first."""
    in_h, in_w = image.shape
    sy, sx = np.float32(in_h) / np.float32(out_h), np.float32(in_w) / np.float32(out_w)
    out = np.zeros((out_h, out_w), np.float32)
    for i in range(out_h):
        y = np.float32(i) * sy
        y0 = int(np.floor(y))
        y1, dy = min(y0 + 1, in_h - 1), y - np.float32(y0)
        for j in range(out_w):
            x = np.float32(j) * sx
            x0 = int(np.floor(x))
            x1, dx = min(x0 + 1, in_w - 1), x - np.float32(x0)
            top = image[y0, x0] + (image[y0, x1] - image[y0, x0]) * dx
            bottom = image[y1, x0] + (image[y1, x1] - image[y1, x0]) * dx
            out[i, j] = top + (bottom - top) * dy
    return out


def test_resize_is_tf1_bilinear_not_torch():
    g = torch.Generator().manual_seed(0)
    for (h, w), (out_h, out_w) in [((3, 4), (5, 7)), ((5, 7), (3, 4))]:   # up and down
        x = torch.randint(0, 256, (2, 3, h, w), generator=g).float()
        got = fid.resize_bilinear_tf1(x, (out_h, out_w))
        want = np.stack([[tf1_resize_loops(c, out_h, out_w) for c in image] for image in x.numpy()])
        np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-4)
    x = torch.randint(0, 256, (1, 3, 299, 299), generator=g).float()
    assert torch.equal(fid.resize_bilinear_tf1(x), x)                    # 299 -> 299 is the identity
    # Why not F.interpolate: it samples at half-pixel centres, whole grey levels away from TF1's resize.
    x = torch.randint(0, 256, (1, 3, 32, 32), generator=g).float()
    torch_resized = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    assert (fid.resize_bilinear_tf1(x) - torch_resized).abs().max() > 10


def test_features_in_float32_without_autocast_or_tf32(keep_tf32):
    class Probe(Tiny):
        """Tiny's features through a Linear; records the precision settings it runs under."""
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(12, 12)

        def forward(self, x):
            self.seen = (*fid.tf32_settings(), torch.is_autocast_enabled("cpu"))
            return self.linear(super().forward(x))

    fid.set_tf32(False)
    off = fid.tf32_settings()
    fid.set_tf32(True)
    on = fid.tf32_settings()
    assert on != off
    probe = Probe()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fid.features(probe, images(3))
    assert probe.seen == (*off, False)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, probe.linear(Tiny()(images(3))), rtol=1e-6, atol=1e-5)  # not bf16's
    assert fid.tf32_settings() == on                                                           # restored


@pytest.mark.parametrize("bad, found", [(images(2).float(), "torch.float32 (2, 3, 32, 32)"),
                                        (images(2).permute(0, 2, 3, 1), "torch.uint8 (2, 32, 32, 3)")])
def test_features_want_uint8_nchw(bad, found):
    with pytest.raises(ValueError, match=r"uint8 tensor \(B, 3, H, W\)") as error:
        fid.features(Tiny(), bad)
    assert found in str(error.value)


# ----- Statistics -----
def test_stats_are_numpy_mean_and_cov():
    g = np.random.default_rng(0)
    feats = g.standard_normal((50, 6)) @ g.standard_normal((6, 6)) + 10       # correlated, far from 0
    stats = fid.FeatureStats(6)
    for part in np.split(feats, [7, 20]):                                     # batches of 7, 13, 30
        stats.add(torch.from_numpy(part).float())
    mu, sigma = stats.mu_sigma()
    want_mu, want_sigma = numpy_stats(torch.from_numpy(feats).float())
    assert stats.n == 50 and mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, want_mu, rtol=1e-12)
    np.testing.assert_allclose(sigma, want_sigma, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="at least 2"):
        fid.FeatureStats(6).add(torch.zeros(1, 6)).mu_sigma()


def test_stats_count_each_image_once():
    stats = fid.FeatureStats(3).add(torch.ones(2, 3)).all_reduce()
    with pytest.raises(RuntimeError, match="world_size"):
        stats.add(torch.ones(2, 3))
    with pytest.raises(RuntimeError, match="twice"):
        stats.all_reduce()
    with pytest.raises(ValueError, match=r"\(B, 3\)"):
        fid.FeatureStats(3).add(torch.ones(2, 4))


def test_stats_do_not_depend_on_the_batch_size():
    x = images(10)
    want = numpy_stats(Tiny()(x))
    for batch_size in (1, 3, 10, 64):
        stats = fid.image_stats(Tiny(), fid.TensorImages(x), batch_size=batch_size)
        assert stats.n == 10
        for got, expected in zip(stats.mu_sigma(), want):
            np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-9)


def test_process_blocks_cover_every_row_once():
    for n in (0, 1, 2, 5, 11):
        for world_size in (1, 2, 3, 8):
            blocks = [fid.block_of_process(n, rank, world_size) for rank in range(world_size)]
            assert [i for start, stop in blocks for i in range(start, stop)] == list(range(n))


def write_arr0(path, x):
    """x uint8 (N, 3, H, W) -> path.npz with arr_0 (N, H, W, 3), as sample.py --npz writes it."""
    np.savez(path, arr_0=x.permute(0, 2, 3, 1).numpy())
    return path


@pytest.mark.slow
def test_ref_one_and_two_processes_real_network(inception, tmp_path):
    """fid.py ref with the real network on 5 images: one process, then two under torchrun (gloo), each its
    block (3 and 2 images); both equal np.mean and np.cov of the features computed here in one batch."""
    net, weights = inception
    x = images(5)
    source = write_arr0(tmp_path / "images.npz", x)
    want_mu, want_sigma = numpy_stats(fid.features(net, x))
    flags = ["--inception-weights", str(weights), "--batch-size", "2"]
    with pytest.warns(UserWarning, match="not starting with 6726825d"):
        fid.main(["ref", str(source), str(tmp_path / "one.npz"), *flags])
    torchrun("fid.py", "ref", str(source), str(tmp_path / "two.npz"), *flags)
    for name in ("one.npz", "two.npz"):
        with np.load(tmp_path / name) as out:
            assert sorted(out.files) == ["mu", "sigma"]
            assert out["mu"].shape == (2048,) and out["sigma"].shape == (2048, 2048)
            assert out["mu"].dtype == out["sigma"].dtype == np.float64
            # float32 features differ by rounding with the batch composition; a lost or doubled image would
            # move mu and sigma by about 1/5 of their size.
            np.testing.assert_allclose(out["mu"], want_mu, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(out["sigma"], want_sigma, rtol=1e-4, atol=1e-6)
    assert sorted(os.listdir(tmp_path)) == ["images.npz", "one.npz", "two.npz"]     # no temporary files left


# ----- The Fréchet distance -----
def test_frechet_distance_closed_forms():
    g = np.random.default_rng(0)
    mu1, mu2 = g.standard_normal(5), g.standard_normal(5)
    a, b = g.uniform(0.1, 3, 5), g.uniform(0.1, 3, 5)
    # Commuting covariances (diagonal, or diagonal in one rotated basis): tr sqrt(S1 S2) = sum sqrt(a_i b_i),
    # so d^2 = |mu1 - mu2|^2 + sum (sqrt a_i - sqrt b_i)^2.
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-12)
    q, _ = np.linalg.qr(g.standard_normal((5, 5)))
    assert fid.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T) == pytest.approx(
        want, rel=1e-10)
    # Non-commuting 2x2: a 2x2 matrix M with positive eigenvalues has tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)).
    s1, s2 = np.array([[2.0, 0.5], [0.5, 1.0]]), np.array([[1.0, -0.3], [-0.3, 3.0]])
    assert not np.allclose(s1 @ s2, s2 @ s1)
    m = s1 @ s2
    tr_sqrt = math.sqrt(np.trace(m) + 2 * math.sqrt(np.linalg.det(m)))
    want = np.sum((mu1[:2] - mu2[:2]) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert fid.frechet_distance(mu1[:2], s1, mu2[:2], s2) == pytest.approx(want, rel=1e-12)


def test_frechet_distance_of_a_set_to_itself_is_zero():
    g = np.random.default_rng(1)
    # Full rank, then fewer samples than dimensions: eigenvalues of about -1e-16 are clamped (NaN otherwise),
    # and the square root lifts rounding in the 54 null directions to about 1e-8 each.
    for n, tolerance in [(200, 1e-12), (10, 1e-6)]:
        mu, sigma = numpy_stats(g.standard_normal((n, 64)) * g.uniform(0.1, 2, 64))
        d = fid.frechet_distance(mu, sigma, mu, sigma)
        assert abs(d) < tolerance * np.trace(sigma), d
    with pytest.raises(ValueError, match=r"mu \(D,\) and sigma \(D, D\)"):
        fid.frechet_distance(mu, sigma, mu[:3], sigma)


def test_frechet_distance_is_adms_sqrtm_formula():
    """ADM's evaluator: |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrtm(S1 S2), scipy's sqrtm (where installed)."""
    linalg = needs("scipy.linalg")
    g = np.random.default_rng(2)
    (mu1, s1), (mu2, s2) = (numpy_stats(g.standard_normal((300, 128)) @ g.standard_normal((128, 128)) + k)
                            for k in (0, 0.5))
    covmean = linalg.sqrtm(s1 @ s2).real
    want = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-8)


# ----- Sources and the command line (the Tiny extractor stands in for the Inception) -----
@pytest.fixture
def tiny(monkeypatch):
    """fid.py's command line with the Tiny extractor: load_inception is what main calls for a network."""
    monkeypatch.setattr(fid, "load_inception", lambda weights=None, device="cpu": Tiny())


def write_cifar_folder(root, x):
    """x uint8 (30, 3, 32, 32) -> root/cifar-10-batches-py: 5 training batches of 6, in the real format."""
    folder = root / training.data.FOLDER
    folder.mkdir(parents=True)
    for i, name in enumerate(training.data.TRAIN_BATCHES):
        rows = x[6 * i:6 * (i + 1)]
        # Channel-major rows as in the real files: (n, 3, 32, 32) -> (n, 3072).
        batch = {b"data": rows.reshape(-1, 3072).numpy(), b"labels": [0] * len(rows), b"filenames": []}
        (folder / name).write_bytes(pickle.dumps(batch))
    return folder


def write_png_folder(folder, x):
    """x uint8 (N, 3, H, W) -> PNG files, the second half in a subfolder."""
    from PIL import Image
    (folder / "sub").mkdir(parents=True)
    for i, image in enumerate(x.permute(0, 2, 3, 1).numpy()):
        Image.fromarray(image).save(folder / ("sub" if i >= len(x) // 2 else "") / f"{i:03d}.png")
    return folder


def test_npz_images_read_any_block(tmp_path):
    """arr_0 a block at a time, from any row (a process's block starts mid-file), stored or compressed."""
    x = np.random.default_rng(0).integers(0, 256, (7, 5, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "stored.npz", arr_0=x)
    np.savez_compressed(tmp_path / "compressed.npz", arr_0=x)
    for name in ("stored.npz", "compressed.npz"):
        stats, source = fid.open_source(tmp_path / name)
        assert stats is None and len(source) == 7
        blocks = list(source.blocks(2, 7, 2))
        assert [len(b) for b in blocks] == [2, 2, 1]
        assert torch.equal(torch.cat(blocks), torch.from_numpy(x[2:7]).permute(0, 3, 1, 2))


def test_ref_from_npz_folder_and_cifar(tiny, tmp_path):
    x = images(30)
    want_mu, want_sigma = numpy_stats(Tiny()(x))
    cifar = write_cifar_folder(tmp_path / "cifar", x)
    sources = {"npz": write_arr0(tmp_path / "images.npz", x), "folder": write_png_folder(tmp_path / "png", x),
               "cifar root": tmp_path / "cifar", "cifar batches": cifar}
    for kind, source in sources.items():
        out = tmp_path / f"{kind}.npz"
        fid.main(["ref", str(source), str(out), "--batch-size", "7"])
        with np.load(out) as stats:
            np.testing.assert_allclose(stats["mu"], want_mu, rtol=1e-12, err_msg=kind)
            np.testing.assert_allclose(stats["sigma"], want_sigma, rtol=1e-9, atol=1e-9, err_msg=kind)
        # The file written is a SOURCE again: its statistics as stored.
        with np.load(out) as stats:
            np.testing.assert_array_equal(fid.reference_stats(out)[1], stats["sigma"])


def test_fid_of_two_sources_prints_the_frechet_distance(tiny, tmp_path, capsys):
    g = np.random.default_rng(3)
    stats = {}
    for name in ("a", "b"):
        mu, sigma = numpy_stats(g.standard_normal((40, 12)) * 20 + 100)
        np.savez(tmp_path / f"{name}.npz", mu=mu, sigma=sigma, arr_0=np.zeros((1, 2, 2, 3), np.uint8))
        stats[name] = mu, sigma
    # Two statistics files (used as stored, arr_0 beside them ignored), in a process of its own: no network.
    command = [sys.executable, str(ROOT / "fid.py"), str(tmp_path / "a.npz"), str(tmp_path / "b.npz")]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    printed = float(run.stdout.splitlines()[-1].removeprefix("FID "))
    assert printed == pytest.approx(fid.frechet_distance(*stats["a"], *stats["b"]), abs=1e-6)
    # Images against statistics.
    x = images(20)
    value = fid.main([str(write_arr0(tmp_path / "images.npz", x)), str(tmp_path / "b.npz")])
    assert value == pytest.approx(fid.frechet_distance(*numpy_stats(Tiny()(x)), *stats["b"]), rel=1e-9)
    printed = float(capsys.readouterr().out.splitlines()[-1].removeprefix("FID "))
    assert printed == pytest.approx(value, abs=1e-6)


# ----- Errors: what is wrong and what to do -----
def test_bad_sources_say_what_was_found(tiny, tmp_path):
    nhwc, nchw = np.zeros((2, 8, 8, 3), np.uint8), np.zeros((2, 3, 8, 8), np.uint8)
    cases = {
        "neither.npz": (dict(images=nhwc), r"holds images; expected mu and sigma"),
        "float.npz": (dict(arr_0=nhwc.astype(np.float32)),
                      r"float32 images of shape \(2, 8, 8, 3\); expected uint8 \(N, H, W, 3\)"),
        "nchw.npz": (dict(arr_0=nchw), r"uint8 images of shape \(2, 3, 8, 8\).*NHWC.*channels first"),
        "one.npz": (dict(arr_0=nhwc[:1]), r"holds 1 image\(s\): FID needs at least 2"),
        "stats.npz": (dict(mu=np.zeros(4), sigma=np.zeros((4, 3))), r"expected mu \(D,\) and sigma \(D, D\)"),
    }
    for name, (arrays, message) in cases.items():
        np.savez(tmp_path / name, **arrays)
        with pytest.raises(SystemExit, match=f"fid.py: .*{message}"):
            fid.main(["ref", str(tmp_path / name), str(tmp_path / "out.npz")])
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("not images")
    for source, message in [("empty", "holds no images"), ("notes.txt", "is not an .npz"),
                            ("absent.npz", "no such file")]:
        with pytest.raises(SystemExit, match=message):
            fid.main(["ref", str(tmp_path / source), str(tmp_path / "out.npz")])
    assert not (tmp_path / "out.npz").exists()
    with pytest.raises(ValueError, match="pass net=fid.load_inception()"):
        fid.reference_stats(write_arr0(tmp_path / "x.npz", images(2)))


def test_folder_of_mixed_sizes(tiny, tmp_path):
    """Each image is resized on its own: a folder may mix sizes, within a batch too."""
    from PIL import Image
    x = [images(1, size, size + 1, seed=size) for size in (8, 8, 16, 8)]
    for i, image in enumerate(x):
        Image.fromarray(image[0].permute(1, 2, 0).numpy()).save(tmp_path / f"{i}.png")
    fid.main(["ref", str(tmp_path), str(tmp_path / "out.npz"), "--batch-size", "3"])
    want_mu, want_sigma = numpy_stats(torch.cat([Tiny()(image) for image in x]))
    with np.load(tmp_path / "out.npz") as stats:
        np.testing.assert_allclose(stats["mu"], want_mu, rtol=1e-12)
        np.testing.assert_allclose(stats["sigma"], want_sigma, rtol=1e-9, atol=1e-9)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """torch hub's cache in tmp_path; returns where load_inception looks for the weights."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    return tmp_path / "hub" / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth"


def test_weights_download_once_into_the_hub_cache(inception, hub, monkeypatch):
    net, weights = inception
    calls = []

    def download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, hash_prefix))
        shutil.copy(weights, dst)
    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    for _ in range(2):
        with pytest.warns(UserWarning, match="not starting with 6726825d"):     # random weights: not the real
            loaded = fid.load_inception()
    assert calls == [(fid.WEIGHTS_URL, "6726825d")] and hub.is_file()
    assert not loaded.training
    for name, tensor in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_no_network_and_no_file_names_both_ways(hub, monkeypatch, tmp_path):
    def download(url, dst, hash_prefix=None, progress=True):
        raise urllib.error.URLError("no route to host")
    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    source = write_arr0(tmp_path / "images.npz", images(2))
    with pytest.raises(SystemExit) as error:
        fid.main(["ref", str(source), str(tmp_path / "out.npz")])
    message = str(error.value)
    assert "no route to host" in message and fid.WEIGHTS_URL in message and "--inception-weights" in message
    assert str(hub) in message
    with pytest.raises(FileNotFoundError, match=f"no Inception weight file .*{fid.WEIGHTS_URL}"):
        fid.load_inception(tmp_path / "absent.pth")


def test_wrong_weight_files(inception, tmp_path):
    net, _ = inception
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00" * 1000)
    with pytest.raises(ValueError, match="(?s)garbage.pth is not a readable weight file.*--inception-weight"):
        fid.load_inception(garbage)
    # torchvision's ImageNet Inception has 1000 classes and an auxiliary head: another layout.
    other = {k: v for k, v in net.state_dict().items() if not k.startswith("Mixed_7c")}
    other["fc.weight"], other["AuxLogits.fc.weight"] = torch.zeros(1000, 2048), torch.zeros(1000, 768)
    torch.save(other, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"not hold the FID Inception.*missing, e.g. Mixed_7c\..*1 unexpected"
                                         r", e.g. AuxLogits.fc.weight; 1 of another shape, e.g. fc.weight"):
        fid.load_inception(tmp_path / "other.pth")


def test_file_sha256(tmp_path):
    (tmp_path / "f").write_bytes(b"abc" * 1_000_000)
    import hashlib
    assert fid.file_sha256(tmp_path / "f") == hashlib.sha256(b"abc" * 1_000_000).hexdigest()
