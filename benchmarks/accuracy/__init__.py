"""Pieces of the accuracy study (benchmarks/accuracy_study.py): tasks, estimators, references, tables."""
