r"""FID's cost: the Inception extractor's images/s (fid.features), and its share of a pipeline like
sample.py --fid: generate a batch with a U-Net at 1 NFE (soflow.sample), convert it to uint8, extract, add to
the float64 statistics. --end-to-end then runs sample.py --fid's steps on a checkpoint of the same U-Net, each
part on its own clock (benchmarks.common.sample_py_by_part), and reads the extractor's share of its time.

    python -m benchmarks.fid --end-to-end        # CPU default: batch 16, UNet-T; about 2 minutes on 2 cores
    python -m benchmarks.fid --device cuda --batch-size 250 --generator UNet-CIFAR10 --end-to-end \
        --json fid.json

Random weights for both networks: the cost ignores them. The extractor runs on 32x32 and 256x256 inputs
(CIFAR-10 and ImageNet sizes; the network always sees 299x299, so the input size changes only the resize).
--warmup untimed rounds, then --repeats rounds, each running every measurement once (interleaved), between
torch.cuda.synchronize() calls on a GPU. Printed: images/s from the median round, the spread (the slowest and
the fastest round), and each part's share of the pipeline's time.
"""
import argparse
import os
import statistics
import tempfile
from dataclasses import asdict

import numpy as np
import torch

import fid
import soflow
import training.files
import training.loop
import training.settings
from benchmarks.common import open_device, sample_py_by_part, sync, timed, write_json

CONFIG = soflow.PRESETS["cifar10"]     # the U-Net's sampler reads its schedule and parameterization


def pipeline_parts(generator, inception, x1, autocast, stats):
    """name -> a function of no arguments, run in this order: one batch from noise to statistics."""
    batch = {}

    def generate():
        with autocast:
            batch["x0"] = soflow.sample(generator, x1, config=CONFIG)              # (B, 3, 32, 32), 1 NFE
    def convert():
        batch["pixels"] = training.files.to_uint8(batch["x0"].float())                  # uint8 (B, 3, 32, 32)
    def extract():
        batch["features"] = fid.features(inception, batch["pixels"])             # (B, 2048) float32
    def accumulate():
        stats.add(batch["features"])
    return dict(generate=generate, convert=convert, extract=extract, accumulate=accumulate)

LABELS = {"generate": "generate (soflow.sample, 1 NFE)", "convert": "to uint8 (training.files.to_uint8)",
          "extract": "features (fid.features)", "accumulate": "statistics (FeatureStats.add)"}


def end_to_end(args, generator, inception):
    """sample.py --fid on a checkpoint of the generator (random weights) against a reference of N(0, I)
    statistics: its seconds by part, and the extractor's share (the features and the final reduction)."""
    num_images = args.e2e_images or 2 * args.batch_size
    with tempfile.TemporaryDirectory(prefix="fid_bench_") as tmp:
        ckpt, weights, reference = (os.path.join(tmp, n) for n in ("net.pt", "inception.pt", "ref.npz"))
        state = {k: v.cpu() for k, v in generator.state_dict().items()}
        torch.save(dict(arch="UNet", arch_kwargs=generator.init_kwargs, model=state, ema=state,
                        config=asdict(CONFIG)), ckpt)
        torch.save(inception.state_dict(), weights)
        np.savez(reference, mu=np.zeros(2048), sigma=np.eye(2048))
        stats = sample_py_by_part(["--ckpt", ckpt, "--num-images", str(num_images), "--batch-size",
                                   str(args.batch_size), "--fid", reference, "--inception-weights", weights,
                                   "--precision", args.precision, "--out", os.path.join(tmp, "samples")])
    share = stats["seconds"]["fid"] / stats["loop_seconds"]
    print(f"\nsample.py --fid, {num_images} images in batches of {args.batch_size}: "
          f"{stats['end_to_end_images_per_s']:.2f} images/s end to end; the extractor takes {share:.1%} of "
          "its time (seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in stats["seconds"].items()) + ")")
    return dict(images=num_images, seconds=stats["seconds"], loop_seconds=stats["loop_seconds"],
                images_per_s=stats["end_to_end_images_per_s"], extractor_share=share)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--generator", default="UNet-T", choices=sorted(soflow.UNet_models),
                        help="the U-Net that generates 32x32 images")
    parser.add_argument("--precision", default="fp32", choices=training.settings.PRECISIONS,
                        help="bf16: autocast for the generator (the extractor stays in fp32)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 256], help="extractor input sizes")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--end-to-end", action="store_true", help="also time sample.py --fid")
    parser.add_argument("--e2e-images", type=int, default=0, help="--end-to-end: images (0: two batches)")
    args = parser.parse_args(argv)
    # Setup: both networks with random weights, a batch of pixels per input size, a batch of noise.
    device = open_device(args)
    inception = fid.InceptionV3().to(device).eval().requires_grad_(False)
    generator = soflow.UNet_models[args.generator]().to(device).eval().requires_grad_(False)
    pixels = {size: torch.randint(0, 256, (args.batch_size, 3, size, size), dtype=torch.uint8, device=device)
              for size in args.sizes}
    x1 = torch.randn(args.batch_size, 3, 32, 32, device=device)
    _, autocast = training.loop.set_precision(args.precision, device)
    stats = fid.FeatureStats(inception.feature_dim, device)
    parts = pipeline_parts(generator, inception, x1, autocast, stats)
    extractors = {f"fid.features, {size}x{size} uint8 input": (lambda x=x: fid.features(inception, x))
                  for size, x in pixels.items()}
    millions = sum(p.numel() for p in generator.parameters()) / 1e6
    print(f"Inception (FID) and {args.generator} ({millions:.2f}M parameters), batch {args.batch_size}, "
          f"{device.type}, generator {args.precision}, {torch.get_num_threads()} threads")
    # Rounds: every extractor size, then the pipeline's parts in order.
    times = {name: [] for name in [*extractors, *parts]}
    for k in range(args.warmup + args.repeats):
        seconds = {name: timed(fn, device) for name, fn in [*extractors.items(), *parts.items()]}
        if k >= args.warmup:
            for name, s in seconds.items():
                times[name].append(s)
            print(f"round {k + 1 - args.warmup}/{args.repeats}, ms: "
                  f"{', '.join(f'{s * 1e3:.0f}' for s in seconds.values())}", flush=True)
    sync(device)
    # Tables: the extractor alone; the pipeline by part (median seconds), with shares of its total.
    rows = {}
    for name, ts in times.items():
        median = statistics.median(ts)
        ips = [args.batch_size / s for s in ts]
        rows[name] = dict(ms_median=median * 1e3, images_per_s=args.batch_size / median,
                          min_images_per_s=min(ips), max_images_per_s=max(ips))
    print(f"\n{'extractor':<40}{'images/s':>10}{'min-max':>19}")
    for name in extractors:
        r = rows[name]
        spread = f"{r['min_images_per_s']:.2f}-{r['max_images_per_s']:.2f}"
        print(f"{name:<40}{r['images_per_s']:>10.2f}{spread:>19}")
    total = sum(rows[name]["ms_median"] for name in parts)
    print(f"\npipeline, one batch of {args.batch_size} 32x32 images:")
    print(f"{'part':<40}{'ms':>10}{'images/s':>10}{'share':>8}")
    for name in parts:
        r = rows[name]
        r["share"] = r["ms_median"] / total
        print(f"{LABELS[name]:<40}{r['ms_median']:>10.1f}{r['images_per_s']:>10.2f}{r['share']:>8.1%}")
    print(f"{'total':<40}{total:>10.1f}{args.batch_size / total * 1e3:>10.2f}")
    generate, extract = rows["generate"]["ms_median"], rows["extract"]["ms_median"]
    print(f"extraction / generation time: {extract / generate:.2f}; extraction's share of the pipeline: "
          f"{extract / total:.1%}")
    results = dict(config=vars(args), threads=torch.get_num_threads(), torch=torch.__version__, rows=rows,
                   extractor_images_per_s={size: rows[name]["images_per_s"] for size, name in
                                           zip(pixels, extractors)},
                   pipeline_ms=total, extraction_to_generation=extract / generate,
                   extraction_share=extract / total)
    if args.end_to_end:
        results["end_to_end"] = end_to_end(args, generator, inception)
    if args.json:
        write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
