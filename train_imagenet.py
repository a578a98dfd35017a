"""Train SoFlow on ImageNet 256 latents (SD VAE, 4x32x32), class-conditional with CFG: the paper's headline.

    torchrun --nproc_per_node=8 train_imagenet.py prepare --data-path data/imagenet/train --latents data/in256
    torchrun --nproc_per_node=8 train_imagenet.py --latents data/in256 --model DiT-B/4 --results-dir runs/B4

`prepare` encodes every image once, as the released pipeline does: ADM's center crop, [-1, 1], the SD VAE's
posterior mean and std, in memory-mapped .npy files with a JSON manifest. Training draws a fresh latent of
each image at every step, (mean + std * eps) * 0.18215. The loop, checkpoints and resume are training.loop's.
"""
import argparse
import hashlib
import json
import os
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import soflow
from training import loop, processes, settings
from training.files import try_write, write_json
from training.loop import set_precision
from training.sampling import VAE_NAME, VAE_SCALE, decode_latents, load_vae

# ----- prepare: an ImageNet-style folder -> posterior means and stds of the SD VAE -----
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".tif", ".tiff")

def center_crop_arr(image, size):
    """ADM's center crop (guided-diffusion): a PIL image -> (size, size, 3) uint8."""
    from PIL import Image  # Pillow comes with matplotlib
    while min(image.size) >= 2 * size:    # box-filter halvings, then one bicubic resize
        image = image.resize(tuple(n // 2 for n in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(n * scale) for n in image.size), resample=Image.BICUBIC)
    pixels = np.asarray(image.convert("RGB"))
    top, left = (pixels.shape[0] - size) // 2, (pixels.shape[1] - size) // 2
    return pixels[top:top + size, left:left + size]

def list_images(root):
    """(paths, labels, class names): one subfolder per class, classes in sorted order, files sorted."""
    if not os.path.isdir(root):
        raise SystemExit(f"--data-path {root} is not a folder: give ImageNet's train/ "
                         "(one subfolder per class)")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    found = [(os.path.join(folder, f), label) for label, name in enumerate(classes)
             for folder, _, files in sorted(os.walk(os.path.join(root, name)))
             for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not found:
        raise SystemExit(f"no images in class subfolders of {root}: expected {root}/CLASS/IMAGE.JPEG")
    return [path for path, _ in found], [label for _, label in found], classes

class ImageFiles(torch.utils.data.Dataset):
    """Image i as (i, (3, size, size) uint8, error message); an unreadable file gives zeros and its error."""
    def __init__(self, paths, size):
        self.paths, self.size = paths, size

    def __getitem__(self, i):
        from PIL import Image
        try:
            with Image.open(self.paths[i]) as image:
                return i, torch.from_numpy(center_crop_arr(image, self.size).copy()).permute(2, 0, 1), ""
        except Exception as e:            # reported at the end and left out of training, never silently
            return i, torch.zeros(3, self.size, self.size, dtype=torch.uint8), f"{type(e).__name__}: {e}"

def open_or_create(out, manifest, labels):
    """Rank 0: (an error message or '', the manifest on disk); a new folder gets empty arrays first."""
    path = os.path.join(out, "manifest.json")
    if os.path.exists(path):
        there = json.loads(Path(path).read_text())
        changed = [f"  {k}: {there['settings'].get(k)!r} there, {v!r} now"
                   for k, v in manifest["settings"].items() if there["settings"].get(k) != v]
        return (f"{out} holds latents prepared with other settings:\n" + "\n".join(changed)
                + "\nUse the same settings to resume, or another --latents folder" if changed else ""), there
    if files := [n for n in manifest["arrays"].values() if os.path.exists(os.path.join(out, n))]:
        return (f"{out} holds {', '.join(files)} but no manifest.json: pass a new --latents folder (or "
                "delete them, if an interrupted prepare left them)"), None    # never overwrite others' files
    os.makedirs(os.path.join(out, "shards"), exist_ok=True)
    for name in ("mean", "std"):
        np.lib.format.open_memmap(os.path.join(out, f"{name}.npy"), "w+", manifest["dtype"],
                                  (manifest["count"] * manifest["copies"], *manifest["shape"])).flush()
    np.save(os.path.join(out, "labels.npy"), np.asarray(labels, np.int64))
    write_json(path, manifest)                        # last: a manifest means the arrays exist
    return "", manifest

SHARDS_KEPT = "the finished shards are kept, and the same command encodes the others"

@torch.no_grad()
def prepare(args, procs):
    """Encode the images in shards of --shard-size; rank r of W takes shards r, r + W, ... not marked done."""
    rank, world_size, device = procs.rank, procs.world_size, procs.device
    paths, labels, classes = list_images(args.data_path)
    listing = hashlib.sha256("\n".join(os.path.relpath(p, args.data_path) for p in paths).encode())
    listing = listing.hexdigest()
    if len(set(processes.gather_objects(listing, procs))) > 1:
        raise SystemExit("the processes see different files under --data-path: it must be one shared folder")
    vae = load_vae(args.vae, device, procs)
    precision, autocast = set_precision(args.precision, device)
    size = args.image_size // 2 ** (len(vae.config.block_out_channels) - 1)    # the SD VAE: 256 -> 32
    N, copies = len(paths), 2 if args.flip else 1
    settings = dict(data_path=os.path.abspath(args.data_path), num_images=N, listing_sha256=listing,
                    **{k: getattr(args, k) for k in ("image_size", "vae", "flip", "dtype", "shard_size")})
    manifest = dict(complete=False, settings=settings, precision=precision, count=N, copies=copies,
                    unreadable=0, dtype=args.dtype, shape=[vae.config.latent_channels, size, size],
                    scale=VAE_SCALE, crop="ADM center crop",
                    classes=classes, arrays=dict(mean="mean.npy", std="std.npy", labels="labels.npy"))
    error, manifest = open_or_create(args.latents, manifest, labels) if rank == 0 else ("", None)
    error, manifest = processes.gather_objects((error, manifest), procs)[0]
    if error:
        raise SystemExit(error)
    if manifest["complete"]:
        return print(f"{args.latents} is complete ({N} images): nothing to do") if rank == 0 else None
    shards = [range(a, min(a + args.shard_size, N)) for a in range(0, N, args.shard_size)]
    markers = [os.path.join(args.latents, "shards", f"{k:06d}.json") for k in range(len(shards))]
    mine = [k for k in range(rank, len(shards), world_size) if not os.path.exists(markers[k])]
    batches = [list(shards[k][a:a + args.batch_size]) for k in mine
               for a in range(0, len(shards[k]), args.batch_size)]
    loader = torch.utils.data.DataLoader(ImageFiles(paths, args.image_size), batch_sampler=batches,
                                         num_workers=args.workers, pin_memory=device.type == "cuda")
    arrays = {n: np.load(os.path.join(args.latents, f"{n}.npy"), mmap_mode="r+") for n in ("mean", "std")}
    if rank == 0:
        print(f"encoding {N} images with {args.vae} on {world_size} process(es); {len(shards)} shards, "
              f"{sum(not os.path.exists(m) for m in markers)} to do")
    bar = tqdm(total=sum(len(shards[k]) for k in mine), unit="img", disable=rank > 0, desc="prepare")
    unreadable = {}                                       # of the shard being encoded (batches come in order)
    failure = None
    for indices, pixels, messages in loader:
        first, count = int(indices[0]), len(indices)          # a batch is a contiguous run of one shard
        x = pixels.to(device).float() / 127.5 - 1             # (B, 3, size, size) in [-1, 1]
        x = torch.cat([x, x.flip(3)]) if args.flip else x      # the flipped copies go to rows N + i
        with autocast:
            posterior = vae.encode(x).latent_dist
        for name, value in (("mean", posterior.mean), ("std", posterior.std)):    # (copies * B, 4, h, w)
            value = value.float().cpu().numpy().astype(args.dtype).reshape(copies, count, -1)
            arrays[name].reshape(copies, N, -1)[:, first:first + count] = value       # a view: writes through
        unreadable.update({int(i): m for i, m in zip(indices, messages) if m})
        if first + count == shards[first // args.shard_size].stop:    # the shard's last batch
            marker = markers[first // args.shard_size]

            def flush_then_mark():                   # flushed, then marked: a marker means on disk
                for array in arrays.values():
                    array.flush()
                write_json(marker, unreadable)
            if failure := try_write(marker, flush_then_mark, hint=SHARDS_KEPT):
                break
            unreadable = {}
        bar.update(count)
    bar.close()
    # Every process waits here for the others; one that failed stops them all.
    if failure := processes.first_failure(failure, procs):
        raise SystemExit(failure)
    if rank == 0:
        failure = try_write(os.path.join(args.latents, "manifest.json"),
                                     lambda: finish(args.latents, manifest, paths, markers), hint=SHARDS_KEPT)
        if failure is not None:
            raise SystemExit(failure)

def finish(out, manifest, paths, markers):
    """Rank 0, after every shard: unreadable images get label -1 (training skips them) and are listed."""
    unreadable = {int(i): message for marker in markers
                  for i, message in json.loads(Path(marker).read_text()).items()}
    labels = np.load(os.path.join(out, "labels.npy"), mmap_mode="r+")
    labels[sorted(unreadable)] = -1
    labels.flush()
    report = [f"{paths[i]}\t{message}" for i, message in sorted(unreadable.items())]
    Path(out, "unreadable.txt").write_text("\n".join(report))
    manifest.update(complete=True, count=len(paths) - len(unreadable), unreadable=len(unreadable))
    write_json(os.path.join(out, "manifest.json"), manifest)
    print(f"wrote {out}: {manifest['count']} images in {len(manifest['classes'])} classes" + (
        f"; {len(unreadable)} unreadable, left out (listed in unreadable.txt):\n" + "\n".join(report[:20])
        if unreadable else ""))


# ----- Training: latents drawn from the stored posteriors; the loop is training.loop.train -----
def open_latents(folder):
    """The manifest and the memory-mapped arrays of a prepared folder (a clear error if it is not one)."""
    path = os.path.join(folder, "manifest.json")
    if not os.path.exists(path):
        raise SystemExit(f"{folder} holds no latents: "
                         f"run `python train_imagenet.py prepare --latents {folder}` first")
    manifest = json.loads(Path(path).read_text())
    if not manifest["complete"]:
        raise SystemExit(f"{folder} is half prepared: run the same prepare command again to finish it")
    arrays = {n: np.load(os.path.join(folder, file), mmap_mode="r") for n, file in manifest["arrays"].items()}
    return manifest, arrays

def latent_batches(manifest, arrays, device):
    """loop.Data of the readable images: batch(rows) -> (x_0, y, None), x_0 drawn afresh."""
    readable = np.flatnonzero(arrays["labels"] >= 0)
    N, copies = len(arrays["labels"]), manifest["copies"]

    def get_batch(rows):
        index = readable[rows.numpy()]
        if copies == 2:
            index = index + N * torch.randint(2, (len(index),)).numpy()
        mean = torch.from_numpy(arrays["mean"][index]).to(device, torch.float32)   # (B, 4, h, w)
        std = torch.from_numpy(arrays["std"][index]).to(device, torch.float32)
        x0 = (mean + std * torch.randn_like(mean)) * VAE_SCALE
        return x0, torch.from_numpy(arrays["labels"][index % N]).to(device), None
    return loop.Data(len(readable), tuple(arrays["mean"].shape[1:]), get_batch)

def grid_decoder(vae_name, scale, results_dir, procs, for_fid):
    """Latents -> images (said in rank 0's log): the VAE's decoder, or the latents' first channel.

    Rank 0 draws the sample grids; for_fid (--fid-every): every process decodes, and the VAE must load."""
    if not procs.main and not for_fid:
        return None
    if vae_name == "none" and for_fid:
        raise SystemExit("--fid-every decodes the samples with the VAE: drop --vae none")
    decode, note = (lambda z: z), "sample grids: the latents' first channel (--vae none)"
    if vae_name != "none":
        try:
            # rank 0 alone, unless every process decodes: then rank 0 first.
            vae = load_vae(vae_name, procs.device, procs if for_fid else processes.Processes())
            decode = partial(decode_latents, vae, scale=scale)
            note = f"sample grids decoded by {vae_name}"
        except (OSError, SystemExit) as e:                # no diffusers, no network: the run goes on
            if for_fid:
                raise SystemExit(f"--fid-every needs the VAE {vae_name}, which did not load: {e}") from e
            note = f"sample grids: the latents' first channel ({vae_name} did not load: {e})"
    if procs.main:
        os.makedirs(results_dir, exist_ok=True)
        with open(os.path.join(results_dir, "log.txt"), "a") as log:
            print(note, file=log)
        print(note)
    return decode

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="SoFlow on ImageNet 256 latents (one process or torchrun). "
                                     "`prepare` first turns an image folder into latents.")
    add = parser.add_argument_group("ImageNet latents, the network and the method").add_argument
    add("--latents", required=True, help="the folder `prepare` wrote")
    add("--model", default="DiT-B/4", choices=sorted(soflow.DiT_models))
    add("--preset", default="imagenet", choices=["imagenet", "imagenet-paper"],
        help="imagenet: the released configuration; imagenet-paper: the paper's App. A values")
    add("--lr", type=float, default=1e-4)
    add("--cfg-w", type=float, default=None, help="CFG strength w (Eq. 18; default the preset's)")
    add("--flow-matching", action="store_true", help="train a teacher to distil (--teacher): flow matching "
        "alone (lam = 1, w = 1; labels are still dropped, so the null label learns)")
    add("--vae", default=None, help="decodes the sample grids (default: the one of prepare; "
        "'none': grids of the latents' first channel)")
    # The released recipe: global batch 256; 400k steps for B/4, 240 epochs (1.2M steps) for the other sizes.
    settings.add_flags(parser, global_batch_size=256, steps=None)
    args = parser.parse_args(argv)
    args.steps = args.steps or (400_000 if args.model == "DiT-B/4" else 1_200_000)
    return args

def prepare_args(argv):
    parser = argparse.ArgumentParser(prog="train_imagenet.py prepare",
                                     description="Images -> SD-VAE latents.")
    add = parser.add_argument_group("images to latents").add_argument
    add("--data-path", required=True, help="ImageNet's train/: one subfolder per class")
    add("--latents", required=True, help="output folder (resumed if interrupted)")
    add("--image-size", type=int, default=256, choices=[32, 64, 128, 256, 512])
    add("--vae", default=VAE_NAME, help="hub name or local folder of a diffusers AutoencoderKL")
    add("--flip", action="store_true", help="also encode horizontal flips (twice the time and disk)")
    add("--dtype", default="float32", choices=["float32", "float16"], help="float16: half the disk")
    add("--batch-size", type=int, default=64, help="images per VAE call and process")
    add("--workers", type=int, default=8, help="DataLoader processes decoding images")
    add("--shard-size", type=int, default=10_000, help="images per resumable unit of work")
    settings.add_flags(parser, names=("precision", "dist_timeout"))
    args = parser.parse_args(argv)
    for name, low in dict(batch_size=1, shard_size=1, workers=0).items():
        if getattr(args, name) < low:
            parser.error(f"--{name.replace('_', '-')} must be at least {low}")
    return args

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["prepare"]:
        args = prepare_args(argv[1:])
        with processes.started(args.dist_timeout) as procs:
            return prepare(args, procs)
    args = parse_args(argv)
    manifest, arrays = open_latents(args.latents)
    config = soflow.PRESETS[args.preset]
    config = replace(config, w=args.cfg_w) if args.cfg_w is not None else config
    config = replace(config, lam=1.0, w=1.0) if args.flow_matching else config
    with processes.started(args.dist_timeout) as procs:
        data = latent_batches(manifest, arrays, procs.device)
        torch.manual_seed(args.global_seed)                   # the same initial weights on every process
        net = soflow.DiT_models[args.model](input_size=manifest["shape"][1],
                                            num_classes=len(manifest["classes"]))
        decode = grid_decoder(args.vae or manifest["settings"]["vae"], manifest["scale"], args.results_dir,
                              procs, for_fid=bool(args.fid_every))
        # Every checkpoint names the VAE of its latents: sample.py decodes with it.
        extras = dict(vae=dict(name=manifest["settings"]["vae"], scale=manifest["scale"]))
        # The released optimizer; the paper's Adam is the same update at weight decay 0.
        make_optimizer = partial(torch.optim.AdamW, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
        run_config = dict(model=args.model, preset=args.preset, lr=args.lr, cfg_w=args.cfg_w,
                          latents=manifest["settings"]["listing_sha256"], copies=manifest["copies"])
        grid_labels = torch.arange(32, device=procs.device) % len(manifest["classes"])
        loop.train(settings.settings_from_args(args), net, config, make_optimizer, data, run_config, procs,
                   decode, grid_labels, extras)

if __name__ == "__main__":
    main()
