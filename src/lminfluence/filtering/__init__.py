"""TF-IDF candidate selection (METHOD.md §6)."""

from .tfidf import TfidfIndex

__all__ = ["TfidfIndex"]
