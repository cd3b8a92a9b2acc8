"""Pieces of the paper study (benchmarks/paper_study.py): models, corpora, queries, the pipeline, tables and figures."""
