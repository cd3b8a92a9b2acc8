"""Pieces of benchmarks/bench_index.py: the model setups and the one-pass sweep over compressions."""
