"""Tiny on-disk inputs for the command line: a model folder with its own tokenizer, a corpus, queries."""

from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = (
    "the cat sat on a mat while the dog ran after a ball in the park near the river "
    "Astrobia Zorald Pfaff was first president of republic a small country far away"
).split()


def corpus_texts(n: int = 24, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    texts = []
    for i in range(n):
        length = int(torch.randint(8, 60, (1,), generator=g))
        words = [WORDS[int(j)] for j in torch.randint(0, len(WORDS), (length,), generator=g)]
        texts.append(" ".join(words) + ".")
    texts[3] = "The first president of the Republic of Astrobia was Zorald Pfaff. " + texts[3]
    return texts


def train_tokenizer(texts: list[str], vocab_size: int = 200):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>")


def make_model_dir(root: Path, texts: list[str], *, n_positions: int = 64, seed: int = 0) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = train_tokenizer(texts)
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=n_positions, n_embd=16, n_layer=2, n_head=2,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    model = GPT2LMHeadModel(config)
    path = root / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_inputs(root: Path) -> dict[str, Path]:
    texts = corpus_texts()
    model = make_model_dir(root, texts)
    corpus = write_jsonl(root / "corpus.jsonl", [{"id": f"doc{i}", "text": t} for i, t in enumerate(texts)])
    queries = write_jsonl(
        root / "queries.jsonl",
        [
            {"id": "astrobia", "prompt": "The first president of the Republic of Astrobia was", "completion": " Zorald Pfaff"},
            {"id": "cat", "prompt": "the cat sat on", "completion": " a mat"},
            {"id": "dog", "prompt": "the dog ran after", "completion": " a ball"},
        ],
    )
    return {"model": model, "corpus": corpus, "queries": queries}
