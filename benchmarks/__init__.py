"""Benchmarks: training-step cost (train_step.py) and sampling throughput (sampling.py)."""
