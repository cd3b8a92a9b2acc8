"""The LDS benchmark on a language model (benchmarks/lds_lm.py): corpus, model, methods, ground truth."""
