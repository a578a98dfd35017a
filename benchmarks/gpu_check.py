"""Everything worth measuring on a machine with one GPU, in one run of at most ~8 minutes: a JSON, a table.

    bash benchmarks/gpu_check.sh                   # = python -m benchmarks.gpu_check --out gpu_check.json
    bash benchmarks/gpu_check.sh --dry-run         # on any machine: every command parses, nothing runs

Parts, each a subprocess with its own time limit (a failing part is reported, the others still run):
  train_step   benchmarks.train_step on DiT-B/2, batch 64, bf16: ms/step and peak memory of flow matching,
               SoFlow (with and without CFG, each also distilling a teacher of its size) and MeanFlow,
               their ratios (and, last, `compiled`: the same with --compile);
  cifar        200 steps of train_cifar.py (UNet-CIFAR10, batch 128, a synthetic CIFAR-10 folder) in each
               precision: images/s and peak memory from its metrics.jsonl;
  imagenet     200 steps of train_imagenet.py (DiT-B/2, batch 64, synthetic latents) in each precision; its
               bf16 images/s against train_step's bare SoFlow CFG step (same network, batch and precision)
               gives the loop's overhead;
  cifar_loop   benchmarks.train_loop (UNet-CIFAR10, batch 128): the script's step against the bare step;
  sampling     benchmarks.sampling on a random DiT-XL/2, batch 125, 1 NFE: images/s of the network alone
               and of sample.py end to end with the SD-VAE decoder (its architecture, random weights);
  fid          benchmarks.fid at batch 250: the Inception extractor's images/s.
Needs only the project's requirements and diffusers (for the SD VAE), CUDA torch being installed.
"""
import argparse
import contextlib
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = ("bf16", "tf32", "fp32")
STEPS = 200


def commands(work, json_dir):
    """{part: [(label, argv, seconds allowed)]}: every command of the check (python -m ... or a script)."""
    cifar, latents = str(work / "cifar"), str(work / "latents")

    def out(name):
        return str(json_dir / f"{name}.json")
    step = ["-m", "benchmarks.train_step", "--model", "DiT-B/2", "--batch-size", "64", "--device", "cuda",
            "--precision", "bf16", "--repeats", "5"]
    common = ["--steps", str(STEPS), "--log-every", "50", "--ckpt-every", str(10 ** 6), "--sample-every",
              str(10 ** 6), "--keep-ckpts", "1"]
    return {
        "train_step": [("eager", step + ["--json", out("train_step")], 180)],
        "cifar": [(p, ["train_cifar.py", "--data-path", cifar, "--no-download", "--model", "UNet-CIFAR10",
                       "--global-batch-size", "128", *common, "--precision", p,
                       "--results-dir", str(work / f"cifar-{p}")], 120) for p in PRECISIONS],
        "imagenet": [(p, ["train_imagenet.py", "--latents", latents, "--model", "DiT-B/2", "--vae", "none",
                          "--global-batch-size", "64", *common, "--precision", p,
                          "--results-dir", str(work / f"imagenet-{p}")], 120) for p in PRECISIONS],
        "cifar_loop": [("bf16", ["-m", "benchmarks.train_loop", "--model", "UNet-CIFAR10", "--batch-size",
                                 "128", "--precision", "bf16", "--threads", "0", "--rounds", "3",
                                 "--json", out("cifar_loop")], 150)],
        "sampling": [("bf16", ["-m", "benchmarks.sampling", "--model", "DiT-XL/2", "--batch-size", "125",
                               "--device", "cuda", "--precision", "bf16", "--repeats", "5", "--euler-steps",
                               "4", "--end-to-end", "--e2e-images", "500", "--json", out("sampling")], 180)],
        "fid": [("fp32", ["-m", "benchmarks.fid", "--device", "cuda", "--batch-size", "250", "--generator",
                          "UNet-CIFAR10", "--end-to-end", "--e2e-images", "1000", "--json", out("fid")],
                 150)],
        # Last: compiling seven losses and the teacher takes the longest, and the budget may run out first.
        "compiled": [("bf16", step + ["--compile", "--json", out("train_step_compiled")], 300)],
    }


def make_data(work):
    """A synthetic CIFAR-10 folder (1,280 random images), 5,120 random latents laid out as prepare does."""
    from benchmarks.imagenet_data import write_latents
    from benchmarks.train_loop import write_cifar_folder
    write_cifar_folder(str(work / "cifar"), 256, seed=0)
    write_latents(str(work / "latents"), 2560, seed=0)


class Parsed(Exception):
    """Raised by the dry run once a command's flags have parsed."""


def dry_run(parts):
    """Parse every command's flags with its own parser (its main(argv), stopped there): run nothing."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        original(self, args, namespace)
        raise Parsed
    failures = []
    for part, runs in parts.items():
        for label, argv, _ in runs:
            module, flags = (argv[1], argv[2:]) if argv[0] == "-m" else (Path(argv[0]).stem, argv[1:])
            argparse.ArgumentParser.parse_args = parse_then_stop
            try:
                with contextlib.redirect_stderr(sys.stdout):
                    importlib.import_module(module).main(flags)
                failures.append(f"{part} {label}: ran without parsing its flags")
            except Parsed:
                print(f"ok   {part:<11}{label:<9}python {' '.join(argv)}")
            except SystemExit as e:                                        # argparse: a bad flag
                failures.append(f"{part} {label}: {e}")
            finally:
                argparse.ArgumentParser.parse_args = original
    for failure in failures:
        print(f"FAIL {failure}")
    return not failures


def run_part(argv, seconds, log):
    """(ok, wall seconds): one command, its output appended to log."""
    started = time.time()
    command = [sys.executable, *argv]
    with open(log, "a") as f:
        print(f"\n$ {' '.join(command)}", file=f, flush=True)
        try:
            code = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                                  timeout=seconds).returncode
        except subprocess.TimeoutExpired:
            print(f"timed out after {seconds} s", file=f)
            code = "timeout"
    return code == 0, time.time() - started


def last_record(results_dir):
    """The last line of a run's metrics.jsonl."""
    lines = Path(results_dir, "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1])


def read_json(path):
    return json.loads(Path(path).read_text()) if os.path.exists(path) else None


def summary(work, json_dir, status):
    """The figures of every part that ran, as one dict."""
    results = {"status": status}
    for name in ("train_step", "train_step_compiled"):
        if data := read_json(json_dir / f"{name}.json"):
            results[name] = {r["method"]: dict(ms=r["ms_median"], images_per_s=64e3 / r["ms_median"],
                                               ratio_to_fm=r["ratio"], peak_mib=r["peak_mib"])
                             for r in data["methods"]}                  # batch 64: 64,000 / ms images/s
            results[name]["soflow_vs_meanflow"] = data["soflow_vs_meanflow"]
    for script in ("cifar", "imagenet"):
        for p in PRECISIONS:
            folder = work / f"{script}-{p}"
            if status.get(f"{script} {p}") == "ok" and (folder / "metrics.jsonl").exists():
                record = last_record(folder)
                results.setdefault(script, {})[p] = dict(images_per_s=record["images_per_s"],
                                                         peak_gib=record.get("max_memory_gb"))
    bare = results.get("train_step", {}).get("SoFlow CFG (w 3, m 0.25)")
    if bare and "bf16" in results.get("imagenet", {}):
        script = results["imagenet"]["bf16"]["images_per_s"]
        results["imagenet_loop_overhead"] = bare["images_per_s"] / script - 1
    if data := read_json(json_dir / "cifar_loop.json"):
        results["cifar_loop"] = dict(overhead_pct=data["overhead_pct"], bare_ms=data["bare"]["ms_median"],
                                     script_ms=data["script"]["ms_median"])
    if data := read_json(json_dir / "sampling.json"):
        one_call = data["samplers"][0]
        results["sampling"] = dict(network_images_per_s=one_call["images_per_s"])
        if e2e := data.get("end_to_end"):
            results["sampling"].update(end_to_end_images_per_s=e2e["end_to_end_images_per_s"],
                                       generate_images_per_s=e2e["generate_images_per_s"])
    if data := read_json(json_dir / "fid.json"):
        results["fid"] = dict(extractor_images_per_s=data["extractor_images_per_s"],
                              share_of_sample_py=data.get("end_to_end", {}).get("extractor_share"))
    return results


def table(results):
    """The printed summary."""
    lines = []
    for name in ("train_step", "train_step_compiled"):
        for method, r in results.get(name, {}).items():
            if method != "soflow_vs_meanflow":
                lines.append(f"{name:<20}{method:<28}{r['images_per_s']:>9.1f} img/s  "
                             f"x{r['ratio_to_fm']:.2f} FM {r['peak_mib']:>8.0f} MiB")
    for script in ("cifar", "imagenet"):
        for p, r in results.get(script, {}).items():
            memory = f"{r['peak_gib']:.1f} GiB" if r["peak_gib"] is not None else "-"
            lines.append(f"{script + ' ' + str(STEPS) + ' steps':<20}{p:<28}{r['images_per_s']:>9.1f} img/s  "
                         f"{memory:>18}")
    if "imagenet_loop_overhead" in results:
        overhead = results["imagenet_loop_overhead"]
        lines.append(f"{'imagenet loop':<20}{'overhead over the bare step':<28}{overhead:>9.1%}")
    if r := results.get("cifar_loop"):
        lines.append(f"{'cifar loop':<20}{'overhead over the bare step':<28}{r['overhead_pct']:>8.1f}%")
    if r := results.get("sampling"):
        lines.append(f"{'sample XL/2 1 NFE':<20}{'network alone':<28}{r['network_images_per_s']:>9.1f} img/s")
        if "end_to_end_images_per_s" in r:
            lines.append(f"{'':<20}{'sample.py with SD-VAE':<28}{r['end_to_end_images_per_s']:>9.1f} img/s")
    if r := results.get("fid"):
        for size, ips in r["extractor_images_per_s"].items():
            lines.append(f"{'fid extractor':<20}{f'batch 250 of {size}x{size}':<28}{ips:>9.1f} img/s")
        if r["share_of_sample_py"] is not None:
            lines.append(f"{'':<20}{'share of sample.py --fid':<28}{r['share_of_sample_py']:>9.1%}")
    failed = [k for k, v in results["status"].items() if v != "ok"]
    lines.append("failed: " + (", ".join(f"{k} ({results['status'][k]})" for k in failed) or "none"))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description="The project's GPU measurements in one run.")
    parser.add_argument("--out", default="gpu_check.json", help="the JSON of every figure")
    parser.add_argument("--dry-run", action="store_true", help="check that every command parses; run nothing")
    parser.add_argument("--only", nargs="+", default=None, help="run only these parts")
    parser.add_argument("--budget", type=float, default=480, help="seconds for all parts; later ones skip")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        json_dir = work / "json"
        json_dir.mkdir()
        parts = commands(work, json_dir)
        if args.only and (unknown := set(args.only) - set(parts)):
            parser.error(f"--only: unknown parts {sorted(unknown)}; the parts are {', '.join(parts)}")
        parts = {k: v for k, v in parts.items() if not args.only or k in args.only}
        if args.dry_run:
            return 0 if dry_run(parts) else 1
        import torch
        if not torch.cuda.is_available():
            raise SystemExit("gpu_check: torch sees no GPU. Run it on a machine with one (--dry-run checks "
                             "the commands anywhere)")
        make_data(work)
        log, status, started = Path(args.out).with_suffix(".log"), {}, time.time()
        log.write_text(f"{torch.cuda.get_device_name()} torch {torch.__version__}\n")
        for part, runs in parts.items():
            for label, command, seconds in runs:
                left = args.budget - (time.time() - started)
                if left < 20:
                    status[f"{part} {label}"] = "skipped: the time budget was spent"
                    continue
                ok, wall = run_part(command, min(seconds, left), log)
                status[f"{part} {label}"] = "ok" if ok else f"failed, see {log}"
                print(f"{part:<11}{label:<9}{'ok' if ok else 'FAILED'} in {wall:.0f} s", flush=True)
        results = summary(work, json_dir, status)
        results.update(device=torch.cuda.get_device_name(), torch=torch.__version__,
                       wall_seconds=time.time() - started)
        Path(args.out).write_text(json.dumps(results, indent=1))
        print(f"\n{results['device']}, torch {results['torch']}, {results['wall_seconds']:.0f} s")
        print(f"{table(results)}\nwrote {args.out} (the commands' output: {log})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
