"""TF-IDF candidate selection (docs/method.md §6)."""

from .tfidf import TfidfIndex

__all__ = ["TfidfIndex"]
