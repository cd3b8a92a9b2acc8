"""The built-in demo's inputs: corpus with planted facts, queries, facts file, trained model, rebuild rules."""

import json
import re
import shutil

import pytest
import torch

import lminfluence as li
from lminfluence.corpus import Document, SequenceStore
from lminfluence.demo import DemoInputs, prepare_demo


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> DemoInputs:
    return prepare_demo(tmp_path_factory.mktemp("demo") / "tiny", scale="tiny", seed=0, progress=False)


@pytest.fixture(scope="module")
def loaded(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny.model_dir).eval(), AutoTokenizer.from_pretrained(tiny.model_dir)


def test_model_dir_is_a_hugging_face_gpt2_with_its_tokenizer(tiny, loaded):
    """from_pretrained loads a GPT-2 (HF Conv1D layers) and a fast tokenizer with an EOS token, sized alike."""
    from transformers.pytorch_utils import Conv1D

    model, tokenizer = loaded
    assert (tiny.model_dir / "model.safetensors").is_file()
    assert model.config.model_type == "gpt2"
    assert any(isinstance(m, Conv1D) for m in model.modules())
    assert tokenizer.is_fast and tokenizer.eos_token is not None
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.n_positions >= tiny.max_length


def test_facts_are_stated_in_the_trained_order_only(tiny):
    """Each fact's documents contain "<subject> was <name>"; no document contains "<name> was",
    and the name appears in no other document."""
    docs = {d["id"]: d["text"] for d in tiny.read_corpus()}
    facts = tiny.read_facts()
    assert facts
    for f in facts:
        assert f["statement"] == f"{f['subject']} was {f['name']}"
        assert len(f["doc_ids"]) >= 2
        for doc_id, text in docs.items():
            assert f"{f['name']} was" not in text, doc_id
            assert f["flipped_statement"] not in text, doc_id
            if doc_id in f["doc_ids"]:
                assert f["statement"] + "." in text, doc_id
            else:
                assert f["name"] not in text, doc_id
                assert f["statement"] not in text, doc_id


def test_corpus_rows_are_unique_and_real_text_is_present(tiny):
    """Document ids are unique; pydoc, stdlib and planted documents are all there; no text appears twice."""
    rows = tiny.read_corpus()
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids))
    kinds = {i.split("/")[0] for i in ids}
    assert kinds == {"pydoc", "stdlib", "planted"}
    texts = [r["text"] for r in rows]
    assert len(texts) == len(set(texts))
    planted = [r["text"] for r in rows if r["id"].startswith("planted/")]
    for text in planted:  # filler from the real text surrounds the fact
        assert len(re.split(r"(?<=\.) (?=[A-Z])", text)) >= 2


def test_each_fact_document_is_one_training_sequence(tiny, loaded):
    """A planted document fits max_length tokens, so cutting gives exactly one piece for it."""
    _, tokenizer = loaded
    store = SequenceStore.build([Document(r["id"], r["text"]) for r in tiny.read_corpus()], tokenizer, tiny.max_length, progress=False)
    pieces = {}
    for i, doc_id in enumerate(store.doc_id):
        assert 2 <= len(store.tokens(i)) <= tiny.max_length
        pieces[doc_id] = pieces.get(doc_id, 0) + 1
    for f in tiny.read_facts():
        for doc_id in f["doc_ids"]:
            assert pieces[doc_id] == 1, doc_id
    assert max(pieces.values()) > 1  # long ordinary documents are cut into several


def test_queries_are_well_formed(tiny, loaded):
    """Every fact has one trained-order and one flipped query matching facts.json; open queries
    quote the corpus; prompt and completion tokenize at a word boundary (no merged token)."""
    _, tokenizer = loaded
    queries = tiny.read_queries()
    facts = {f["id"]: f for f in tiny.read_facts()}
    corpus = "\n".join(d["text"] for d in tiny.read_corpus())
    assert len({q["id"] for q in queries}) == len(queries)
    kinds = [q["kind"] for q in queries]
    assert kinds.count("fact") == len(facts) and "flipped" in kinds and "open" in kinds
    for q in queries:
        assert set(q) - {"group"} == {"id", "prompt", "completion", "kind", "fact_id"}
        assert q.get("group") == q["fact_id"]  # a fact's trained and flipped queries form one group
        assert q["completion"].startswith(" ") and q["prompt"] and not q["prompt"].endswith(" ")
        whole = tokenizer(q["prompt"] + q["completion"])["input_ids"]
        assert whole == tokenizer(q["prompt"])["input_ids"] + tokenizer(q["completion"])["input_ids"], q["id"]
        if q["kind"] == "open":
            assert q["fact_id"] is None
            assert q["prompt"] + q["completion"] in corpus
            continue
        f = facts[q["fact_id"]]
        expected = f["statement"] if q["kind"] == "fact" else f["flipped_statement"]
        assert q["prompt"] + q["completion"] == expected
    assert sorted(q["fact_id"] for q in queries if q["kind"] == "fact") == sorted(facts)


def test_second_call_reuses_the_build(tiny):
    """Same parameters: nothing is rewritten (the weights' and corpus' mtimes are unchanged)."""
    weights = tiny.model_dir / "model.safetensors"
    before = (weights.stat().st_mtime_ns, tiny.corpus_path.stat().st_mtime_ns, tiny.manifest_path.stat().st_mtime_ns)
    again = prepare_demo(tiny.workdir, scale="tiny", seed=0, progress=False)
    assert again == tiny
    assert (weights.stat().st_mtime_ns, tiny.corpus_path.stat().st_mtime_ns, tiny.manifest_path.stat().st_mtime_ns) == before


def test_other_seed_or_unfinished_build_rebuilds(tiny, tmp_path):
    """Another seed gives other facts and new weights; a build without its marker is redone,
    and the same seed rebuilds the same corpus and facts."""
    copy = tmp_path / "copy"
    shutil.copytree(tiny.workdir, copy)
    weights = copy / "model" / "model.safetensors"
    first = weights.read_bytes()
    other = prepare_demo(copy, scale="tiny", seed=1, progress=False)
    assert other.read_manifest()["parameters"]["seed"] == 1
    assert {f["name"] for f in other.read_facts()}.isdisjoint({f["name"] for f in tiny.read_facts()})
    assert weights.read_bytes() != first

    other.manifest_path.unlink()  # an interrupted build: files without the marker
    mtime = weights.stat().st_mtime_ns
    back = prepare_demo(copy, scale="tiny", seed=0, progress=False)
    assert weights.stat().st_mtime_ns != mtime
    assert back.read_corpus() == tiny.read_corpus()
    assert back.read_facts() == tiny.read_facts()
    assert not list(copy.glob("*.tmp")) and not (copy / "model.tmp").exists()


def test_rejects_unknown_scale_and_bad_seed(tmp_path):
    with pytest.raises(ValueError, match="scale"):
        prepare_demo(tmp_path, scale="huge")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="seed"):
        prepare_demo(tmp_path, scale="tiny", seed="0")  # type: ignore[arg-type]


def test_manifest_records_the_build(tiny):
    """demo.json holds the parameters and the training record: one loss per epoch, finite."""
    m = json.loads(tiny.manifest_path.read_text())
    assert m["parameters"]["scale"] == "tiny" and m["parameters"]["seed"] == 0
    assert len(m["epoch_losses"]) == m["parameters"]["sizes"]["train"]["epochs"]
    assert all(0 < x < 20 for x in m["epoch_losses"])
    assert m["sequences"] > m["documents"] > 0
    assert 0.0 <= m["facts_greedy"] <= 1.0


def planted_fact_retrieval(demo: DemoInputs, strategy: str) -> float:
    """Share of trained-order fact queries whose top-scored training sequence states that fact."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(demo.model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(demo.model_dir)
    store = SequenceStore.build([Document(r["id"], r["text"]) for r in demo.read_corpus()], tokenizer, demo.max_length, progress=False)
    train = list(store)
    queries = [q for q in demo.read_queries() if q["kind"] == "fact"]
    examples = li.examples_from_pairs(tokenizer, [(q["prompt"], q["completion"]) for q in queries])
    facts = {f["id"]: f for f in demo.read_facts()}
    factors = li.fit_factors(model, train, li.FactorConfig(strategy=strategy), execution=li.Execution(batch_size=16))
    scores = li.compute_scores(model, factors, examples, train, li.ScoreConfig(), execution=li.Execution(batch_size=16))
    hits = [store.doc_id[int(scores.total[k].argmax())] in facts[q["fact_id"]]["doc_ids"] for k, q in enumerate(queries)]
    return sum(hits) / len(hits)


def test_tiny_retrieval_runs_through_the_library(tiny):
    """The tiny build goes through fit_factors and compute_scores; its accuracy is a valid share."""
    assert 0.0 <= planted_fact_retrieval(tiny, "ekfac") <= 1.0


@pytest.mark.slow
def test_full_demo_retrieves_planted_facts(tmp_path):
    """Acceptance: with EK-FAC, ≥ 90% of fact queries rank one of their fact's documents first,
    and the model has memorised most facts (greedy decoding gives the name)."""
    torch.set_num_threads(2)
    demo = prepare_demo(tmp_path / "full", scale="full", seed=0, progress=False)
    assert demo.read_manifest()["facts_greedy"] >= 0.5
    assert planted_fact_retrieval(demo, "ekfac") >= 0.9


def test_fit_planted_trims_around_a_fact_next_to_unusual_punctuation():
    """A fact sentence after "**PEP 448**." or before a quoted word is still found and kept whole
    while the filler farthest from it is dropped (the sentence pattern alone does not split there)."""
    from lminfluence.demo.corpus import fit_planted
    from lminfluence.demo.facts import Fact

    fact = Fact("fact-00", "The last King of Zorbia", "Bram Tovel", doc_ids=("planted/fact-00/0",))
    text = 'First filler sentence here. Proposed by **PEP 448**. The last King of Zorbia was Bram Tovel. "x" is a word.'
    (doc,) = fit_planted([Document(id="planted/fact-00/0", text=text)], [fact], lambda t: len(t.split()), 12)
    assert doc.text == "Proposed by **PEP 448**. The last King of Zorbia was Bram Tovel."
