"""Bad input gets a one-line error (exit 2) and touches nothing; corpus formats all read the same."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_fixture import corpus_texts, train_tokenizer, write_jsonl
from test_cli import fit_args, snapshot

from lminfluence.cli.main import main
from lminfluence.corpus import read_documents, read_queries
from lminfluence.storage import layout


@pytest.fixture(scope="module")
def fitted(inputs, tmp_path_factory):
    run = tmp_path_factory.mktemp("fitted") / "run"
    assert main(fit_args(inputs, run)) == 0
    return run


def refuses(args, capsys, *needles, untouched: Path) -> str:
    """Run the CLI, expect exit 2 with a message holding every needle, and ``untouched`` unchanged."""
    before = snapshot(untouched)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "error:" in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert snapshot(untouched) == before
    return err


def with_corpus(inputs, run, corpus, *extra):
    args = fit_args(inputs, run)
    args[args.index("--corpus") + 1] = str(corpus)
    return args + list(extra)


def test_missing_corpus(inputs, tmp_path, capsys):
    run = tmp_path / "run"
    refuses(with_corpus(inputs, run, tmp_path / "missing.jsonl"), capsys, "missing.jsonl does not exist", untouched=run)
    assert not run.exists()


def test_missing_model(inputs, tmp_path, capsys):
    args = fit_args(inputs, tmp_path / "run")
    args[args.index("--model") + 1] = str(tmp_path / "no-model")
    refuses(args, capsys, "no-model does not exist", untouched=tmp_path / "run")


def test_unreadable_corpus(inputs, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n')
    refuses(with_corpus(inputs, tmp_path / "run", bad), capsys, "bad.jsonl:2", "not valid JSON", untouched=tmp_path / "run")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9".encode("latin-1"))
    refuses(with_corpus(inputs, tmp_path / "run", latin), capsys, "not UTF-8", untouched=tmp_path / "run")
    notparquet = tmp_path / "x.parquet"
    notparquet.write_text("hello")
    refuses(with_corpus(inputs, tmp_path / "run", notparquet), capsys, "not a readable Parquet file", untouched=tmp_path / "run")
    nofield = write_jsonl(tmp_path / "nofield.jsonl", [{"body": "text here"}])
    refuses(with_corpus(inputs, tmp_path / "run", nofield), capsys, "missing the 'text' field", untouched=tmp_path / "run")


def test_empty_corpus(inputs, tmp_path, capsys):
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"id": "a", "text": "   "}, {"id": "b", "text": ""}])
    refuses(with_corpus(inputs, tmp_path / "run", empty), capsys, "no non-empty documents", untouched=tmp_path / "run")
    short = write_jsonl(tmp_path / "short.jsonl", [{"id": "a", "text": "a"}, {"id": "b", "text": "b"}])
    refuses(with_corpus(inputs, tmp_path / "run", short), capsys, "no sequence of at least 2 tokens", untouched=tmp_path / "run")
    (tmp_path / "emptydir").mkdir()
    refuses(with_corpus(inputs, tmp_path / "run", tmp_path / "emptydir"), capsys, "has no files", untouched=tmp_path / "run")


def test_tokenizer_of_another_model(inputs, tmp_path, capsys):
    other = train_tokenizer(corpus_texts() + ["extra words to grow the vocabulary " * 20], vocab_size=400)
    other.save_pretrained(tmp_path / "other-tok")
    refuses(fit_args(inputs, tmp_path / "run") + ["--tokenizer", str(tmp_path / "other-tok")], capsys, "do not belong together", untouched=tmp_path / "run")


def test_sequences_longer_than_the_context(inputs, tmp_path, capsys):
    args = fit_args(inputs, tmp_path / "run")
    args[args.index("--max-length") + 1] = "65"
    refuses(args, capsys, "longer than the model's context of 64", untouched=tmp_path / "run")


def test_unknown_module_pattern(inputs, tmp_path, capsys):
    refuses(fit_args(inputs, tmp_path / "run") + ["--modules", "transformer.h.*.nonexistent"], capsys, "nonexistent", untouched=tmp_path / "run")


def test_bad_config_values(inputs, tmp_path, capsys):
    refuses(fit_args(inputs, tmp_path / "run") + ["--strategy", "newton"], capsys, "strategy", untouched=tmp_path / "run")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {path: x}\ncorpus: {path: y}\nfit: {stratgy: ekfac}\n")
    refuses(["fit", "--config", str(cfg), "-o", str(tmp_path / "run")], capsys, "unknown key(s) stratgy", untouched=tmp_path / "run")
    cfg.write_text("model: just-a-string\n")
    refuses(["fit", "--config", str(cfg), "-o", str(tmp_path / "run")], capsys, "section 'model' must be a mapping", untouched=tmp_path / "run")
    refuses(fit_args(inputs, tmp_path / "run") + ["--device", "cuda:0"], capsys, "no CUDA device", untouched=tmp_path / "run")
    with pytest.raises(SystemExit) as exit_info:
        main(["report", "-o", str(tmp_path), "--top", "0"])
    assert exit_info.value.code == 2


def test_bad_queries(inputs, fitted, tmp_path, capsys):
    """Empty completion, a query past the context, or a missing queries file leave the run as it was."""
    empty = write_jsonl(tmp_path / "q1.jsonl", [{"id": "e", "prompt": "the cat", "completion": ""}])
    refuses(["score", "-o", str(fitted), "--queries", str(empty)], capsys, "q1.jsonl:1", "completion is empty", untouched=fitted)
    long = write_jsonl(tmp_path / "q2.jsonl", [{"id": "long", "prompt": "the cat sat " * 40, "completion": " on a mat"}])
    refuses(["score", "-o", str(fitted), "--queries", str(long)], capsys, "query 'long'", "context of 64", untouched=fitted)
    refuses(["score", "-o", str(fitted), "--queries", str(tmp_path / "none.jsonl")], capsys, "none.jsonl does not exist", untouched=fitted)
    refuses(["score", "-o", str(tmp_path / "not-a-run"), "--queries", str(inputs["queries"])], capsys, "not a run directory", untouched=tmp_path)


def test_directory_holding_another_run(inputs, fitted, tmp_path, capsys):
    """A different model/corpus/fit in an existing run is refused; --overwrite replaces it."""
    run = tmp_path / "run"
    shutil.copytree(fitted, run)
    args = fit_args(inputs, run) + ["--strategy", "kfac"]
    refuses(args, capsys, "already holds a different run", "fit.strategy: 'ekfac' → 'kfac'", "--overwrite", untouched=run)
    assert main(args + ["--overwrite"]) == 0
    assert json.loads((run / layout.FACTORS_DIR / layout.MANIFEST_FILE).read_text())["strategy"] == "kfac"
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    refuses(fit_args(inputs, stranger), capsys, "not an lminfluence run directory", untouched=stranger)
    folder = tmp_path / "corpus"  # a skipped .csv logs a warning before the refusal: still no log file
    folder.mkdir()
    (folder / "a.txt").write_text("the cat sat on the mat")
    (folder / "b.csv").write_text("x,y")
    refuses(with_corpus(inputs, stranger, folder), capsys, "not an lminfluence run directory", untouched=stranger)


def test_corpus_formats_read_alike(tmp_path):
    """JSON Lines, a folder of text files, Parquet and a saved `datasets` dataset give the same documents."""
    import datasets

    texts = corpus_texts(6)
    ids = [f"d{i}" for i in range(6)]
    write_jsonl(tmp_path / "c.jsonl", [{"id": i, "text": t} for i, t in zip(ids, texts)])
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, t in zip(ids, texts):
        (folder / f"{i}.txt").write_text(t)
    pq.write_table(pa.table({"id": ids, "text": texts}), tmp_path / "c.parquet")
    datasets.Dataset.from_dict({"id": ids, "text": texts}).save_to_disk(str(tmp_path / "ds"))
    expect = list(zip(ids, texts))
    assert [(d.id, d.text) for d in read_documents(tmp_path / "c.jsonl")] == expect
    assert [(d.id.removesuffix(".txt"), d.text) for d in read_documents(folder)] == expect
    assert [(d.id, d.text) for d in read_documents(tmp_path / "c.parquet")] == expect
    assert [(d.id, d.text) for d in read_documents(tmp_path / "ds")] == expect


def test_duplicate_ids_refused(tmp_path):
    write_jsonl(tmp_path / "c.jsonl", [{"id": "a", "text": "x y"}, {"id": "a", "text": "z"}])
    with pytest.raises(ValueError, match="'a' appears twice"):
        read_documents(tmp_path / "c.jsonl")
    write_jsonl(tmp_path / "q.jsonl", [{"id": "q", "prompt": "p", "completion": " c"}, {"id": "q", "prompt": "p", "completion": " d"}])
    with pytest.raises(ValueError, match="'q' appears twice"):
        read_queries(tmp_path / "q.jsonl")
