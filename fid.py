"""FID as the ADM evaluator computes it (guided-diffusion evaluations/evaluator.py), in PyTorch.

    python fid.py ref data/cifar10 stats/cifar10_train.npz            # mu, sigma of CIFAR-10's 50,000 images
    python fid.py samples/xl2-1nfe.npz VIRTUAL_imagenet256_labeled.npz  # prints the FID of the two
    torchrun --nproc_per_node=8 fid.py ref ...                          # each process its block of the images

ADM's evaluator feeds uint8 NHWC images to TensorFlow's Inception graph of 2015-12-05
(classify_image_graph_def.pb), which resizes them to 299x299 with TF1's ResizeBilinear, maps them to
(x - 128) / 128 and returns the 2048 pool_3 features; FID compares the features' mean and np.cov covariance of
two image sets. Here that graph is an nn.Module with the state-dict layout of
pt_inception-2015-12-05-6726825d.pth, the weights pytorch-fid converted from it (torch-fidelity's
weights-inception-2015-12-05-6726825d.pth loads into the same names), run in float32 without autocast or TF32:
features shift with them (torch-fidelity #43).

A SOURCE is an .npz holding mu and sigma (statistics, used as stored: ADM's reference batches hold them), an
.npz holding arr_0 (uint8 NHWC images: sample.py --npz, ADM's format), a folder of images, or CIFAR-10 as
train_cifar.py --data-path takes it (its 50,000 training images; training.data reads it).

    import fid
    net = fid.load_inception(device=device)                   # every process calls it; downloads once
    stats = fid.FeatureStats(net.feature_dim, device)
    for images in batches:                                    # uint8 (B, 3, H, W), this process's images
        stats.add(fid.features(net, images))
    mu, sigma = stats.all_reduce().mu_sigma()
    score = fid.frechet_distance(mu, sigma, *fid.reference_stats("VIRTUAL_imagenet256_labeled.npz"))
"""
import argparse
import contextlib
import gc
import hashlib
import itertools
import os
import sys
import warnings
import zipfile

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from training.data import is_cifar10, load_cifar10

INPUT_SIZE = 299                      # the graph's ResizeBilinear target


# ----- The graph's input path: TF1's bilinear resize -----
def resize_bilinear_tf1(x, size=(INPUT_SIZE, INPUT_SIZE)):
    """(B, C, H, W) float32 -> (B, C, *size), as TF1's ResizeBilinear (align_corners=False) computes it.

    F.interpolate differs by several grey levels: it samples at half-pixel centres, TF1 does not."""
    def taps(n_in, n_out):
        # Output pixel i reads the source coordinate c = i * (n_in / n_out), no half-pixel offset, the scale
        # a float32 division as in TF's CalculateResizeScale; it blends pixels floor(c) and
        # min(ceil(c), n_in - 1) by c - floor(c).
        scale = torch.tensor(n_in, dtype=torch.float32) / n_out
        c = torch.arange(n_out, dtype=torch.float32) * scale
        lower = c.floor()
        upper = c.ceil().clamp(max=n_in - 1)
        return lower.long().to(x.device), upper.long().to(x.device), (c - lower).to(x.device)

    y0, y1, dy = taps(x.shape[2], size[0])
    x0, x1, dx = taps(x.shape[3], size[1])
    top, bottom = x[:, :, y0], x[:, :, y1]                                           # (B, C, out_h, W)
    # TF's order of operations: along x on the top and bottom rows, then along y.
    top = top[..., x0] + (top[..., x1] - top[..., x0]) * dx                          # (B, C, out_h, out_w)
    bottom = bottom[..., x0] + (bottom[..., x1] - bottom[..., x0]) * dx
    return top + (bottom - top) * dy[:, None]


# ----- Inception-v3 as the FID graph has it -----
# Module names, shapes and buffers are those of pt_inception-2015-12-05-6726825d.pth (torchvision's Inception3
# names). The graph's own traits: BatchNorm eps 0.001; its "SAME" average pools divide by the pixels inside
# the image (count_include_pad=False); the last block max-pools where the paper average-pools.
class ConvBN(nn.Module):
    """Every convolution of the graph: conv (no bias) -> BatchNorm (eps 0.001) -> ReLU."""
    def __init__(self, cin, cout, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))

def avg_pool_same(x):
    """TF's 3x3 "SAME" average pool, stride 1: the mean over the window's pixels inside the image."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)

class Block35(nn.Module):
    """Mixed_5b-d (35x35): 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | avg pool -> 1x1, concatenated."""
    def __init__(self, cin, pool_channels):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 64, 1)
        self.branch5x5_1 = ConvBN(cin, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(cin, pool_channels, 1)

    def forward(self, x):                                              # -> (B, 64 + 64 + 96 + pool, 35, 35)
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(avg_pool_same(x)),
        ], dim=1)

class Reduce35to17(nn.Module):
    """Mixed_6a (35x35 -> 17x17): 3x3 stride 2 | 1x1 -> 3x3 -> 3x3 stride 2 | 3x3 max pool stride 2."""
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x):                                              # -> (B, 384 + 96 + cin, 17, 17)
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], dim=1)

class Block17(nn.Module):
    """Mixed_6b-e (17x17): 1x1 | 1x1 -> 1x7 -> 7x1 | 1x1 -> 7x1 -> 1x7 -> 7x1 -> 1x7 | avg pool -> 1x1."""
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 192, 1)
        self.branch7x7_1 = ConvBN(cin, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x):                                              # -> (B, 4 x 192, 17, 17)
        double = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            self.branch7x7dbl_5(self.branch7x7dbl_4(double)),
            self.branch_pool(avg_pool_same(x)),
        ], dim=1)

class Reduce17to8(nn.Module):
    """Mixed_7a (17x17 -> 8x8): 1x1 -> 3x3 s2 | 1x1 -> 1x7 -> 7x1 -> 3x3 s2 | 3x3 max pool s2 (stride 2)."""
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = ConvBN(cin, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x):                                              # -> (B, 320 + 192 + cin, 8, 8)
        return torch.cat([
            self.branch3x3_2(self.branch3x3_1(x)),
            self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x)))),
            F.max_pool2d(x, 3, stride=2),
        ], dim=1)

class Block8(nn.Module):
    """Mixed_7b, 7c (8x8): 1x1 | 1x1 -> (1x3 | 3x1) | 1x1 -> 3x3 -> (1x3 | 3x1) | pool -> 1x1.

    pool: "avg" in Mixed_7b; "max" (3x3, stride 1, SAME) in Mixed_7c, as the FID graph has it."""
    def __init__(self, cin, pool):
        super().__init__()
        self.pool = pool
        self.branch1x1 = ConvBN(cin, 320, 1)
        self.branch3x3_1 = ConvBN(cin, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x):                                              # -> (B, 320 + 768 + 768 + 192, 8, 8)
        single = self.branch3x3_1(x)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = avg_pool_same(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(single), self.branch3x3_2b(single),
            self.branch3x3dbl_3a(double), self.branch3x3dbl_3b(double),
            self.branch_pool(pooled),
        ], dim=1)

class InceptionV3(nn.Module):
    """The FID Inception: uint8 images (B, 3, H, W), any size -> pool_3 features (B, 2048) float32."""
    feature_dim = 2048

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = Block35(192, pool_channels=32)
        self.Mixed_5c = Block35(256, pool_channels=64)
        self.Mixed_5d = Block35(288, pool_channels=64)
        self.Mixed_6a = Reduce35to17(288)
        self.Mixed_6b = Block17(768, c7=128)
        self.Mixed_6c = Block17(768, c7=160)
        self.Mixed_6d = Block17(768, c7=160)
        self.Mixed_6e = Block17(768, c7=192)
        self.Mixed_7a = Reduce17to8(768)
        self.Mixed_7b = Block8(1280, pool="avg")
        self.Mixed_7c = Block8(2048, pool="max")
        # The graph's 1008 logits: unused by FID, kept so that the weight file loads as it is.
        self.fc = nn.Linear(2048, 1008)

    def forward(self, images):
        x = resize_bilinear_tf1(images.float())                         # (B, 3, 299, 299), values 0..255
        x = (x - 128) / 128                         # the graph's Sub 128, Mul 0.0078125 = 2^-7: the same bits
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))      # (B, 64, 147, 147)
        x = F.max_pool2d(x, 3, stride=2)                                       # (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))                          # (B, 192, 71, 71)
        x = F.max_pool2d(x, 3, stride=2)                                       # (B, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))                     # (B, 288, 35, 35)
        x = self.Mixed_6a(x)                                                   # (B, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))      # (B, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))                     # (B, 2048, 8, 8)
        return x.mean((2, 3))                       # pool_3, the 8x8 average pool: (B, 2048)


# ----- Features, in float32 -----
# torch 2.9 replaced the allow_tf32 switches with fp32_precision ("tf32" or "ieee"); once the new one is set,
# reading the old one is an error. So each torch gets its own API.
FP32_PRECISION_API = hasattr(torch.backends.cuda.matmul, "fp32_precision")


def tf32_settings():
    """(matmuls, convolutions): the TF32 settings of CUDA matmuls and cuDNN convolutions, for set_tf32."""
    if FP32_PRECISION_API:
        return torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def set_tf32(settings):
    """Sets both, process-wide: a pair from tf32_settings, or True / False for TF32 on / off in both."""
    matmul, conv = (settings, settings) if isinstance(settings, bool) else settings
    if FP32_PRECISION_API:
        matmul, conv = ({True: "tf32", False: "ieee"}.get(v, v) for v in (matmul, conv))
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = matmul, conv
    else:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, conv


@contextlib.contextmanager
def exact_float32(device):
    """Inside it: no autocast on device, no TF32 in CUDA matmuls and cuDNN convolutions; restored on exit."""
    saved = tf32_settings()
    set_tf32(False)
    try:
        with torch.autocast(device.type, enabled=False):
            yield
    finally:
        set_tf32(saved)

def device_of(net):
    """The device of net's first parameter or buffer (the CPU if it has none)."""
    tensor = next(itertools.chain(net.parameters(), net.buffers()), None)
    return torch.device("cpu") if tensor is None else tensor.device

@torch.no_grad()
def features(net, images):
    """uint8 images (B, 3, H, W) -> net's features (B, D) float32, on net's device (the Inception: D = 2048).

    net: load_inception()'s, or any module of uint8 (B, 3, H, W) -> (B, D) with a feature_dim attribute."""
    if not (torch.is_tensor(images) and images.dtype == torch.uint8 and images.dim() == 4
            and images.shape[1] == 3):
        found = f"{images.dtype} {tuple(images.shape)}" if hasattr(images, "shape") else type(images).__name__
        raise ValueError(f"features() takes a uint8 tensor (B, 3, H, W) of pixels 0..255, got {found}: "
                         "convert images in [-1, 1] with training.files.to_uint8, NHWC with "
                         ".permute(0, 3, 1, 2)")
    device = device_of(net)
    with exact_float32(device):
        return net(images.to(device)).float()


# ----- Statistics: running float64 sums, over batches and processes -----
def world():
    """(rank, world_size) of torch.distributed, (0, 1) when it is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1

class FeatureStats:
    """The count n, sum_i f_i (D,) and sum_i f_i f_i^T (D, D) of features, in float64.

    Sums: the statistics do not depend on the batches or processes the images come in (up to rounding).
    Every process calls all_reduce() once, at the end."""
    def __init__(self, dim, device="cpu"):
        self.n, self.reduced = 0, False
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def add(self, feats):
        """Add a batch of features (B, D)."""
        if self.reduced:
            raise RuntimeError("FeatureStats.add after all_reduce(): the next all_reduce would count the "
                               "images before it world_size times; start a new FeatureStats")
        if feats.dim() != 2 or feats.shape[1] != len(self.sum):
            raise ValueError(f"features of shape {tuple(feats.shape)}; expected (B, {len(self.sum)})")
        f = feats.to(self.sum.device, torch.float64)
        self.n += len(f)
        self.sum += f.sum(0)
        self.outer += f.T @ f
        return self

    def all_reduce(self):
        """Sum over torch.distributed's processes (if initialised): each process then holds the totals."""
        if self.reduced:
            raise RuntimeError("FeatureStats.all_reduce() twice would count every image world_size times")
        self.reduced = True
        if world()[1] > 1:
            n = torch.tensor([self.n], dtype=torch.int64, device=self.sum.device)
            for total in (n, self.sum, self.outer):
                dist.all_reduce(total)
            self.n = int(n.item())
        return self

    def mu_sigma(self):
        """mu (D,) and sigma (D, D), numpy float64; sigma is np.cov's unbiased covariance."""
        if self.n < 2:
            raise ValueError(f"statistics of {self.n} image(s): FID needs at least 2 (a covariance)")
        # mu = S_1 / n;  sigma = (S_2 - n mu mu^T) / (n - 1)
        total, outer = self.sum.cpu().numpy(), self.outer.cpu().numpy()
        mu = total / self.n
        return mu, (outer - self.n * np.outer(mu, mu)) / (self.n - 1)


# ----- The Fréchet distance between two Gaussians -----
def sqrt_psd(a):
    """The symmetric square root of a symmetric positive semi-definite matrix; tiny negative eigenvalues
    (rounding, or fewer images than dimensions) count as 0."""
    w, q = np.linalg.eigh((a + a.T) / 2)
    return (q * np.sqrt(np.clip(w, 0, None))) @ q.T

def frechet_distance(mu1, sigma1, mu2, sigma2):
    """FID: the squared Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64, as a float."""
    mu1, mu2, sigma1, sigma2 = (np.asarray(a, dtype=np.float64) for a in (mu1, mu2, sigma1, sigma2))
    D = len(mu1)
    if mu1.shape != (D,) or mu2.shape != (D,) or sigma1.shape != (D, D) or sigma2.shape != (D, D):
        raise ValueError(f"mu1 {mu1.shape}, sigma1 {sigma1.shape}, mu2 {mu2.shape}, sigma2 {sigma2.shape}: "
                         "expected mu (D,) and sigma (D, D), the same D for both")
    # d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^{1/2} S2 S1^{1/2})^{1/2})
    # The last trace is ADM's tr sqrt(S1 S2): S1 S2 = S1^{1/2} (S1^{1/2} S2) has the eigenvalues of
    # (S1^{1/2} S2) S1^{1/2}, which is symmetric positive semi-definite, so two eigh replace scipy's sqrtm.
    root1 = sqrt_psd(sigma1)
    inner = root1 @ sigma2 @ root1
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_sqrt)


# ----- The weights: pytorch-fid's conversion of the TF graph -----
WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               "pt_inception-2015-12-05-6726825d.pth")
HASH_PREFIX = "6726825d"              # the first hex digits of the file's SHA-256 (torch hub's naming)

def file_sha256(path):
    """The SHA-256 of a file, hex: to record which reference statistics or weights a number came from."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()

def by_hand(path):
    """The two ways to the weights without this program's download, for error messages."""
    return (f"Download {WEIGHTS_URL} by hand (its SHA-256 starts with {HASH_PREFIX}) to {path}, or to any "
            "file and pass --inception-weights FILE (fid.load_inception(weights=FILE))")

def download_weights(path):
    """Fetch the weights to path unless there (torch hub checks the hash prefix): None, or why it failed."""
    if os.path.exists(path):
        return None
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # A temporary file in the same folder, renamed when complete: processes that race see whole files.
        torch.hub.download_url_to_file(WEIGHTS_URL, path, hash_prefix=HASH_PREFIX, progress=True)
    except (OSError, RuntimeError) as e:        # no network, a proxy, a full disk; RuntimeError: a wrong hash
        return f"could not download the FID Inception weights ({type(e).__name__}: {e}). {by_hand(path)}"
    return None

def load_inception(weights=None, device="cpu"):
    """The FID Inception in eval mode on device, from a weight file, or (weights=None) torch hub's cache.

    Under torch.distributed every process calls it: rank 0 downloads the file once into
    torch.hub.get_dir()/checkpoints while the others wait, then each loads it."""
    if weights is None:
        weights = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(WEIGHTS_URL))
        rank, world_size = world()
        failure = download_weights(weights) if rank == 0 else None
        if world_size > 1:                      # a collective: the others wait here for rank 0's download
            message = [failure]
            dist.broadcast_object_list(message, src=0)
            failure = message[0]
        if failure is None:                     # another node, whose disk rank 0 did not write to
            failure = download_weights(weights)
        if failure is not None:
            raise FileNotFoundError(failure)
    elif not os.path.isfile(weights):
        raise FileNotFoundError(f"no Inception weight file {weights}. {by_hand(weights)}")
    net = InceptionV3()
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        if not (isinstance(state, dict) and all(torch.is_tensor(v) for v in state.values())):
            raise ValueError(f"it holds a {type(state).__name__}, not a state dict of tensors")
    except Exception as e:                      # truncated, not a torch file, a pickled object: all the same
        raise ValueError(f"{weights} is not a readable weight file ({type(e).__name__}: {e}); delete it. "
                         f"{by_hand(weights)}") from e
    # The layout, up to num_batches_tracked (unused in eval, absent from files saved before torch 0.4.1).
    expected = {k: v.shape for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    found = {k: v.shape for k, v in state.items() if not k.endswith("num_batches_tracked")}
    missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    reshaped = [f"{k} {tuple(found[k])} (expected {tuple(v)})" for k, v in expected.items()
                if k in found and found[k] != v]
    if missing or unexpected or reshaped:
        kinds = (("missing", missing), ("unexpected", unexpected), ("of another shape", reshaped))
        problems = [f"{len(names)} {what}, e.g. {names[0]}" for what, names in kinds if names]
        raise ValueError(f"{weights} does not hold the FID Inception (pt_inception-2015-12-05 layout): "
                         f"{'; '.join(problems)}. {by_hand(weights)}")
    net.load_state_dict(state, strict=False)
    if not file_sha256(weights).startswith(HASH_PREFIX):
        warnings.warn(f"{weights} has the FID Inception's layout but is not the 2015-12-05 weights file "
                      f"(SHA-256 not starting with {HASH_PREFIX}): FIDs from it are not the published kind",
                      stacklevel=2)
    return net.to(device).eval().requires_grad_(False)


# ----- Sources: a statistics file, or images read block by block -----
# Image sets have len() and blocks(start, stop, batch_size): uint8 (B, 3, H, W) tensors of rows start..stop.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

def check_nhwc(shape, dtype, where):
    """uint8 (N, H, W, 3), as ADM's evaluator reads arr_0, or a ValueError that says what was found."""
    if np.dtype(dtype) == np.uint8 and len(shape) == 4 and shape[-1] == 3:
        return
    hint = ("; channels first? x.transpose(0, 2, 3, 1)" if len(shape) == 4 and shape[1] == 3 else
            "; from [-1, 1]: (x * 127.5 + 128).clip(0, 255).astype(np.uint8)" if np.dtype(dtype).kind == "f"
            else "")
    raise ValueError(f"{where} holds {np.dtype(dtype)} images of shape {tuple(shape)}; expected uint8 "
                     f"(N, H, W, 3), NHWC pixels 0..255 as sample.py --npz writes them{hint}")

class TensorImages:
    """Images in memory: a uint8 tensor (N, 3, H, W)."""
    def __init__(self, images, name="images"):
        self.images, self.name = images, name

    def __len__(self):
        return len(self.images)

    def blocks(self, start, stop, batch_size):
        for i in range(start, stop, batch_size):
            yield self.images[i:min(i + batch_size, stop)]

class NpzImages:
    """arr_0 of an .npz, a block at a time: 50,000 images of 256x256 are 9.8 GB, too much for each process."""
    def __init__(self, path):
        self.path, self.name = path, f"{path} (arr_0)"
        with zipfile.ZipFile(path) as z, z.open("arr_0.npy") as f:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                raise ValueError(f"{self.name} is an .npy of format {version}: save it with np.savez")
            self.shape, fortran_order, dtype = read_header(f)
            self.offset = f.tell()
        check_nhwc(self.shape, dtype, self.name)
        if fortran_order:
            raise ValueError(f"{self.name} is stored in Fortran order: save np.ascontiguousarray(arr_0)")

    def __len__(self):
        return self.shape[0]

    def blocks(self, start, stop, batch_size):
        row = int(np.prod(self.shape[1:]))                  # bytes per image
        with zipfile.ZipFile(self.path) as z, z.open("arr_0.npy") as f:
            f.seek(self.offset + start * row)               # reads up to it in a compressed .npz
            for i in range(start, stop, batch_size):
                count = min(batch_size, stop - i)
                block = np.frombuffer(f.read(count * row), np.uint8).reshape(count, *self.shape[1:])
                yield torch.from_numpy(block.copy()).permute(0, 3, 1, 2)   # NHWC -> (B, 3, H, W)

class FolderImages:
    """The image files of a folder and its subfolders, in sorted order, as RGB (grey and RGBA converted)."""
    def __init__(self, folder):
        self.name = folder
        self.files = sorted(os.path.join(root, name) for root, _, names in os.walk(folder) for name in names
                            if name.lower().endswith(IMAGE_EXTENSIONS))

    def __len__(self):
        return len(self.files)

    def blocks(self, start, stop, batch_size):
        from PIL import Image  # Pillow comes with matplotlib
        for i in range(start, stop, batch_size):
            paths = self.files[i:min(i + batch_size, stop)]
            arrays = []
            for path in paths:
                with Image.open(path) as image:
                    arrays.append(np.asarray(image.convert("RGB")))                  # (H, W, 3) uint8
            # A folder may mix sizes (the network resizes each image): each run of one size is a batch.
            for _, run in itertools.groupby(arrays, key=lambda a: a.shape):
                yield torch.from_numpy(np.stack(list(run))).permute(0, 3, 1, 2)

def open_source(path):
    """(stats, images) of a SOURCE, one of them None: stats (mu, sigma) as stored, or an image set."""
    path = os.path.expanduser(str(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file or folder: {path}")
    if os.path.isfile(path) and zipfile.is_zipfile(path):          # an .npz
        with np.load(path) as npz:
            names = list(npz.files)
            if "mu" in names and "sigma" in names:
                mu, sigma = npz["mu"].astype(np.float64), npz["sigma"].astype(np.float64)
                if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
                    raise ValueError(f"{path} holds mu {mu.shape} and sigma {sigma.shape}; expected mu (D,) "
                                     "and sigma (D, D)")
                return (mu, sigma), None
        if "arr_0" not in names:
            raise ValueError(f"{path} holds {', '.join(names) or 'no arrays'}; expected mu and sigma "
                             "(statistics) or arr_0 (uint8 NHWC images, as sample.py --npz writes them)")
        return None, NpzImages(path)
    if is_cifar10(path):
        root = os.path.dirname(path) if os.path.isfile(path) else path
        return None, TensorImages(load_cifar10(root, download=False)[0], f"CIFAR-10 in {path}")
    if os.path.isfile(path):
        raise ValueError(f"{path} is not an .npz (mu and sigma, or arr_0), an image folder or CIFAR-10")
    if not (images := FolderImages(path)).files:
        raise ValueError(f"{path} holds no images ({', '.join(IMAGE_EXTENSIONS)}) and is not CIFAR-10")
    return None, images

def block_of_process(n, rank, world_size):
    """(start, stop): the block of images 0..n-1 that process rank of world_size takes."""
    return n * rank // world_size, n * (rank + 1) // world_size

def image_stats(net, images, batch_size=100, progress=True):
    """FeatureStats of net's features over an image set, all-reduced: each process computes its block of rows.

    Under torch.distributed every process calls it, with the same image set."""
    rank, world_size = world()
    if len(images) < 2:
        raise ValueError(f"{images.name} holds {len(images)} image(s): FID needs at least 2 (a covariance)")
    start, stop = block_of_process(len(images), rank, world_size)
    stats = FeatureStats(net.feature_dim, device_of(net))
    with tqdm(total=stop - start, desc="FID features", unit="img", disable=None if progress and rank == 0
              else True, dynamic_ncols=True) as bar:
        for block in images.blocks(start, stop, batch_size):
            stats.add(features(net, block))
            bar.update(len(block))
    return stats.all_reduce()

def reference_stats(source, net=None, batch_size=100, progress=True):
    """(mu, sigma) of a SOURCE: as stored in a statistics .npz, else those of net's features of its images."""
    stats, images = open_source(source)
    if stats is not None:
        return stats
    if net is None:
        raise ValueError(f"{source} holds images: pass net=fid.load_inception() to compute their statistics")
    return image_stats(net, images, batch_size, progress).mu_sigma()


def save_stats(path, mu, sigma):
    """mu and sigma to an .npz (ADM's reference layout), atomically: a temporary file, then a rename."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:           # a file object: np.savez would append ".npz" to a temporary name
            np.savez(f, mu=mu, sigma=sigma)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ----- Command line -----
def init_processes(device=None):
    """(rank, world_size, device): under torchrun (WORLD_SIZE > 1) the processes join a group, NCCL on GPUs
    (cuda:LOCAL_RANK), gloo on CPUs; a plain run is 0 of 1."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")     # torchrun's env:// variables
    return *world(), device

def parse_args(argv):
    ref = argv[:1] == ["ref"]
    paragraphs = __doc__.split("\n\n")                    # the title, the commands, what a SOURCE is
    parser = argparse.ArgumentParser(prog="fid.py ref" if ref else "fid.py",
                                     description="\n\n".join(paragraphs[i] for i in (0, 1, 3)),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    if ref:
        parser.add_argument("source", metavar="SOURCE",
                            help="images (an .npz with arr_0, a folder, CIFAR-10) or statistics")
        parser.add_argument("out", metavar="OUT",
                            help="writes mu (2048,) and sigma (2048, 2048), float64, to this .npz")
    else:
        parser.add_argument("sources", nargs=2, metavar="SOURCE",
                            help="images (an .npz with arr_0, a folder, CIFAR-10) or statistics (mu, sigma)")
    parser.add_argument("--inception-weights", default=None, metavar="PATH",
                        help=f"a copy of {WEIGHTS_URL} (default: downloaded once to torch hub's cache)")
    parser.add_argument("--batch-size", type=int, default=100, help="images per process and forward pass")
    parser.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if there is a GPU, else cpu")
    args = parser.parse_args(argv[1:] if ref else argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if ref and not args.out.endswith(".npz"):
        parser.error(f"OUT must end with .npz (it is read back as a SOURCE): {args.out}")
    return ref, args

def main(argv=None):
    ref, args = parse_args(sys.argv[1:] if argv is None else list(argv))
    rank, world_size, device = init_processes(args.device)
    say = print if rank == 0 else (lambda *a, **k: None)
    net = None

    def stats_of(path):
        nonlocal net
        stats, images = open_source(path)
        if stats is not None:
            say(f"{path}: statistics as stored")
            return stats
        if net is None:
            net = load_inception(args.inception_weights, device)
        stats = image_stats(net, images, args.batch_size)
        say(f"{path}: {stats.n} images")
        return stats.mu_sigma()

    try:
        if ref:
            mu, sigma = stats_of(args.source)
            if rank == 0:
                save_stats(args.out, mu, sigma)
                say(f"wrote {args.out}: mu {mu.shape}, sigma {sigma.shape}")
        else:
            value = frechet_distance(*stats_of(args.sources[0]), *stats_of(args.sources[1]))
            say(f"FID {value:.6f}")
            return value
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"fid.py: {e}") from e
    finally:                                # also on an error: a clean exit for every process
        if world_size > 1:
            dist.destroy_process_group()
            gc.collect()  # gloo objects left in reference cycles, freed at exit, can abort the process


if __name__ == "__main__":
    main()
