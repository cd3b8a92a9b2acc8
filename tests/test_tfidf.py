"""Exact tier: TF-IDF candidate scores (docs/method.md §6) against a loop over the formula."""

import math

import numpy as np
import pytest

from lminfluence.filtering import TfidfIndex


def brute_score(query, doc, docs, k1=1.5):
    """Σ over distinct query tokens of (k1+1)·x/(k1+x)·IDF(t), x = 1 if t ∈ doc, straight from Eqs 28–29."""
    c = len(docs)
    total = 0.0
    for t in set(query):
        n_t = sum(t in set(d) for d in docs)
        idf = math.log((c - n_t + 0.5) / (n_t + 0.5) + 1)
        x = 1.0 if t in set(doc) else 0.0
        total += (k1 + 1) * x / (k1 + x) * idf
    return total


def test_scores_match_the_formula_and_repeats_count_once():
    rng = np.random.default_rng(0)
    docs = [list(rng.integers(0, 30, rng.integers(1, 12))) for _ in range(25)]
    queries = [list(rng.integers(0, 35, 6)) for _ in range(4)] + [[3, 3, 3, 7]]  # ids ≥ 30: unseen tokens
    index = TfidfIndex.build(docs)
    got = index.scores(queries)
    want = np.array([[brute_score(q, d, docs) for d in docs] for q in queries])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_top_k_orders_by_score_then_index_and_round_trips(tmp_path):
    docs = [[1, 2], [2, 3], [1, 2], [9], [1]]
    index = TfidfIndex.build(docs, vocab_size=10)
    vals, idx = index.top_k([[1, 2]], 3)
    # tokens 1 and 2 have the same IDF: documents 0 and 2 hold both, 1 and 4 one each;
    # ties go to the lower index
    assert idx.tolist() == [[0, 2, 1]]
    assert vals[0, 0] == vals[0, 1] == pytest.approx(2 * vals[0, 2])
    index.save(tmp_path / "tfidf.npz")
    again = TfidfIndex.load(tmp_path / "tfidf.npz")
    np.testing.assert_array_equal(again.scores([[1, 2], [9]]), index.scores([[1, 2], [9]]))
    all_vals, all_idx = index.top_k([[9]], 100)  # k larger than the corpus: every document, ranked
    assert all_idx.shape == (1, 5) and all_idx[0, 0] == 3


def test_bad_input():
    with pytest.raises(ValueError, match="empty corpus"):
        TfidfIndex.build([])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        TfidfIndex.build([[1, 50]], vocab_size=10)
    with pytest.raises(ValueError, match="negative"):
        TfidfIndex.build([[1, -2]])
    with pytest.raises(ValueError, match="k must be"):
        TfidfIndex.build([[1]]).top_k([[1]], 0)
