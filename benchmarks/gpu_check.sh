#!/usr/bin/env bash
# The project's GPU check: train steps, both training scripts in each precision, sampling and FID's extractor,
# in at most ~8 minutes on one GPU; one JSON (gpu_check.json) and a table. --dry-run: check the commands only.
# Needs a CUDA build of torch, `pip install -r requirements.txt` and diffusers. See benchmarks/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m benchmarks.gpu_check "$@"
