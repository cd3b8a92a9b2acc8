"""Half-precision models on a GPU: the forward runs under autocast, captures and scores stay float32.

Skipped without CUDA (``pytest -m gpu`` on a machine with a GPU).
"""

import pytest
import torch

import lminfluence as li
from helpers import random_queries, random_sequences, spearman, tiny_llama
from lminfluence.passes import half_autocast

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_model_on_gpu_runs_under_autocast_with_float32_results(dtype):
    """A bf16/fp16 model on the GPU is fitted and scored under autocast: factors and scores are
    float32 and finite, and its scores rank the training set like the float32 model's on the CPU
    (Spearman > 0.9 per query: half-precision weights differ, so only the ranking is compared).
    """
    model32 = tiny_llama(dtype=torch.float32, hidden=64, mlp=128)
    train = random_sequences(16, lengths=(8, 16))
    queries = random_queries(3)
    want = li.compute_scores(model32, li.fit_factors(model32, train), queries, train).total
    half = tiny_llama(dtype=dtype, hidden=64, mlp=128).cuda()
    assert half_autocast(half) == dtype
    factors = li.fit_factors(half, train, execution=li.Execution(offload_factors=True))
    assert {t.dtype for t in factors.curvature.state_dict().values()} == {torch.float32}
    assert all(t.device.type == "cpu" for t in factors.curvature.state_dict().values())  # offloaded
    for cfg in (li.ScoreConfig(), li.ScoreConfig(query_rank=4, per_token=True)):
        scores = li.compute_scores(half, factors, queries, train, cfg)
        assert scores.total.dtype == torch.float32 and torch.isfinite(scores.total).all()
    full = li.compute_scores(half, factors, queries, train).total.cpu()
    assert all(spearman(full[q], want[q]) > 0.9 for q in range(len(queries)))
