"""Corpus in: documents and queries from files, cut into training sequences with provenance."""

from .readers import Document, Query, iter_documents, read_documents, read_queries
from .sequences import SequenceStore, SequenceView

__all__ = ["Document", "Query", "iter_documents", "read_documents", "read_queries", "SequenceStore", "SequenceView"]
