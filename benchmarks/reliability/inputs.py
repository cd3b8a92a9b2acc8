"""The harness's inputs, built once under WORK/inputs: models, broken and hostile copies, corpora, queries, YAML.

Model A is the tiny demo's trained GPT-2 (``prepare_demo(scale="tiny")``: 2 layers,
n_embd 32, vocabulary 512, context 128), model B a random 2-layer GPT-2 (n_embd 64)
with the same tokenizer. The hostile folders would create a file under
WORK/markers if any of their code ran: the harness checks that none ever appears.
Nothing here reaches the network.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _copy_model(src: Path, dst: Path, *, tokenizer: bool = True) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    if not tokenizer:
        for f in dst.glob("tokenizer*"):
            f.unlink()
    return dst


def edit_weight(model_dir: Path, name_part: str, delta: float = 1e-3) -> str:
    """Add ``delta`` to the first weight whose name contains ``name_part``, in place; returns its name."""
    from safetensors.torch import load_file, save_file

    path = model_dir / "model.safetensors"
    tensors = load_file(str(path))
    name = next(k for k in sorted(tensors) if name_part in k)
    tensors[name] = tensors[name] + delta
    save_file(tensors, str(path), metadata={"format": "pt"})
    return name


def _model_b(tokenizer_dir: Path, dst: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=64, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(1)
    GPT2LMHeadModel(config).save_pretrained(dst)
    tok.save_pretrained(dst)
    return dst


def _other_tokenizer(texts: list[str], vocab_size: int, dst: Path) -> Path:
    """A BPE of the same size and special tokens trained on other text (reversed documents): other merges, other ids."""
    from lminfluence.demo.model import train_tokenizer

    train_tokenizer([t[::-1] for t in texts], vocab_size).save_pretrained(dst)
    return dst


def _hostile(model_a: Path, root: Path, markers: Path) -> dict[str, Path]:
    """Folders whose loading would run code: auto_map in the model's or the tokenizer's config, a pickle checkpoint."""
    import torch

    out = {}
    touch = "import pathlib\npathlib.Path({!r}).touch()\n"
    # 1. the model's config asks for remote code (a model type transformers does not know)
    remote = _copy_model(model_a, root / "evil_remote")
    cfg = json.loads((remote / "config.json").read_text())
    cfg.update(model_type="evil-gpt", architectures=["EvilModel"], auto_map={"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilModel"})
    (remote / "config.json").write_text(json.dumps(cfg, indent=2))
    for module in ("configuration_evil", "modeling_evil"):
        (remote / f"{module}.py").write_text(touch.format(str(markers / f"remote_{module}")))
    out["evil_remote"] = remote
    # 2. the tokenizer's config asks for a tokenizer class from a .py file
    tok = _copy_model(model_a, root / "evil_tok")
    tcfg = json.loads((tok / "tokenizer_config.json").read_text())
    tcfg.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]})
    (tok / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2))
    (tok / "tokenization_evil.py").write_text(touch.format(str(markers / "remote_tokenizer")))
    out["evil_tok"] = tok
    # 3. weights only as a pickle checkpoint whose unpickling would run a shell command
    pickled = _copy_model(model_a, root / "evil_pickle")
    (pickled / "model.safetensors").unlink()

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {markers / 'pickle'}",))

    torch.save({"transformer.wte.weight": Payload()}, pickled / "pytorch_model.bin")
    out["evil_pickle"] = pickled
    return out


def _corpora(root: Path, docs: list[dict], big_mb: float) -> None:
    _jsonl(root / "corpus_small.jsonl", docs[:12])
    _jsonl(root / "c_ws_mixed.jsonl", [*docs[:5], {"id": "blank", "text": "  \n\t  "}])
    (root / "c_empty.jsonl").write_text("")
    (root / "c_blank_lines.jsonl").write_text("\n\n   \n\n")
    _jsonl(root / "c_ws_doc.jsonl", [{"id": "ws", "text": " \n\t "}])
    (root / "c_invalid.jsonl").write_text(json.dumps(docs[0]) + "\n" + '{"id": "x", "text": "a\tb' + "\n")
    _jsonl(root / "c_wrongfield.jsonl", [{"id": d["id"], "content": d["text"]} for d in docs[:3]])
    _jsonl(root / "c_textint.jsonl", [docs[0], {"id": "list", "text": ["a", "b"]}])
    (root / "c_array.jsonl").write_text(json.dumps(["not", "an", "object"]) + "\n")
    (root / "c_nonutf8.jsonl").write_bytes(json.dumps(docs[0]).encode() + b"\n" + b'{"id": "l1", "text": "caf\xe9"}\n')
    (root / "c_nonutf8.txt").write_bytes(b"plain text caf\xe9 in latin-1\n")
    folder = root / "c_dir_nonutf8"
    folder.mkdir()
    (folder / "a.txt").write_bytes(b"caf\xe9 latin-1\n")
    (folder / "b.txt").write_text(docs[1]["text"])
    (root / "c_emptydir").mkdir()
    _jsonl(root / "c_dupids.jsonl", [docs[0], {"id": docs[0]["id"], "text": docs[1]["text"]}])
    unicode = [
        {"id": "emoji-😀", "text": "Emoji 😀🎉🚀 between words, " * 20},
        {"id": "cjk-中文", "text": "中文文本，日本語のテキスト、한국어 텍스트。" * 20},
        {"id": "rtl-עברית", "text": "עברית ועربية מימין לשמאל " * 20},
        {"id": "nul", "text": "a NUL \u0000 byte and \u200b zero-width \ufeff marks " * 20},
    ]
    _jsonl(root / "c_unicode.jsonl", [*unicode, *docs[:5]])
    text = "\n\n".join(d["text"] for d in docs)
    size = int(big_mb * 1_000_000)
    _jsonl(root / "c_big.jsonl", [{"id": "big", "text": (text * (size // len(text) + 1))[:size]}])
    xss = ["<script>alert(1)</script>", '"><img src=x onerror=alert(1)>']
    _jsonl(
        root / "c_xss.jsonl",
        [{"id": f"{p} doc{i}", "text": f"The poet laureate {p} of the Kingdom wrote {p} again. " * 4} for i, p in enumerate(xss)] + docs[45:49],
    )


def _queries(root: Path, queries: list[dict], tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    q = [{k: r[k] for k in ("id", "prompt", "completion")} for r in queries]
    _jsonl(root / "q.jsonl", q[:4])
    _jsonl(root / "q_all.jsonl", q)
    _jsonl(
        root / "q_unicode.jsonl",
        [
            {"id": "cjk-中文", "prompt": "中文文本，", "completion": "日本語のテキスト"},
            {"id": "emoji-😀", "prompt": "Emoji 😀🎉", "completion": "🚀 between words"},
            {"id": "rtl-עברית", "prompt": "עברית ועربية", "completion": " מימין לשמאל"},
        ],
    )
    (root / "q_empty.jsonl").write_text("")
    _jsonl(root / "q_emptycomp.jsonl", [{"id": "e", "prompt": q[0]["prompt"], "completion": ""}])
    words = ("the poet laureate of the kingdom wrote a long letter to the abbot " * 40).split()
    _jsonl(root / "q_longprompt.jsonl", [{"id": q[0]["id"], "prompt": " ".join(words[:400]), "completion": q[0]["completion"]}])
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    n = 1
    while len(tok(" ".join(words[:n]))["input_ids"]) < 140:
        n += 1
    _jsonl(root / "q_140.jsonl", [{"id": q[0]["id"], "prompt": " ".join(words[:n]), "completion": q[0]["completion"]}])
    _jsonl(root / "q_dupids.jsonl", [q[0], {**q[1], "id": q[0]["id"]}])
    _jsonl(root / "q_wrongfield.jsonl", [{"id": "w", "question": q[0]["prompt"], "answer": q[0]["completion"]}])
    (root / "q_invalid.jsonl").write_text("{'id': 'single quotes'}\n")
    (root / "q_nonutf8.jsonl").write_bytes(b'{"id": "caf\xe9", "prompt": "a", "completion": " b"}\n')
    _jsonl(root / "q_numid.jsonl", [{**q[0], "id": 1}, {**q[1], "id": "1"}])
    _jsonl(root / "q_badtype.jsonl", [{**q[0], "completion": ["a", "list"]}])
    _jsonl(root / "q_wscomp.jsonl", [{**q[0], "completion": " "}])
    _jsonl(root / "q_emptyprompt.jsonl", [{**q[0], "prompt": ""}])
    xss = ["<script>alert(1)</script>", '"><img src=x onerror=alert(1)>']
    _jsonl(root / "q_xss.jsonl", [{"id": f"{p} q{i}", "prompt": f"The poet laureate {p} of the", "completion": f" Kingdom {p}"} for i, p in enumerate(xss)])


def _yaml(root: Path, markers: Path) -> None:
    q = root / "q.jsonl"
    files = {
        "y_unknown_key": "fit:\n  bogus_key: 1\n",
        "y_unknown_section": "fitt:\n  strategy: kfac\n",
        "y_list": "- fit\n- score\n",
        "y_section_list": "fit:\n  - strategy\n  - ekfac\n",
        "y_wrong_value_type": "fit:\n  batch_size: eight\n",
        "y_invalid": "fit: {strategy: ekfac\n",
        "y_float_max_length": "corpus:\n  max_length: 64.5\n",
        "y_modules_int": "fit:\n  modules: 5\n",
        "y_cache_str": "fit:\n  cache_gib: big\n",
        "y_seed_str": "fit:\n  seed: x\n",
        "y_empty": "",
        "y_model_path_int": "model:\n  path: 5\n",
        "y_python_tag": f"fit: !!python/object/apply:os.system ['touch {markers / 'yaml'}']\n",
        "y_wrong_value_type2": f"score:\n  queries: {q}\n  rank: abc\n",
        "y_damping_str": f"score:\n  queries: {q}\n  damping: lots\n",
        "y_damping_scale_str": f"score:\n  queries: {q}\n  damping_scale: lots\n",
        "y_save_matrix_str": f"score:\n  queries: {q}\n  save_matrix: 'no'\n",
    }
    for name, text in files.items():
        (root / f"{name}.yaml").write_text(text)


def build(work: Path, *, big_mb: float = 10.0) -> dict[str, Path]:
    """Every input under WORK/inputs (rebuilt from scratch); returns the named paths the cases use."""
    from lminfluence.demo import prepare_demo

    root = work / "inputs"
    markers = work / "markers"
    for p in (root, markers):
        if p.exists():
            shutil.rmtree(p)
        p.mkdir(parents=True)
    demo = prepare_demo(work / "demo", scale="tiny", seed=0, progress=False)  # reused when already built
    docs, queries = demo.read_corpus(), demo.read_queries()
    a = _copy_model(demo.model_dir, root / "modelA")
    paths = {"in": root, "markers": markers, "A": a, "corpus": _jsonl(root / "corpus.jsonl", docs)}
    paths["B"] = _model_b(a, root / "modelB")
    paths["A_notok"] = _copy_model(a, root / "modelA_notok", tokenizer=False)
    paths["A_corrupt"] = _copy_model(a, root / "modelA_corrupt")
    data = (a / "model.safetensors").read_bytes()
    (paths["A_corrupt"] / "model.safetensors").write_bytes(data[: len(data) // 2])
    paths["A_garbage"] = _copy_model(a, root / "modelA_garbage")
    (paths["A_garbage"] / "model.safetensors").write_bytes(random.Random(0).randbytes(len(data)))
    paths["A_badcfg"] = _copy_model(a, root / "modelA_badcfg")
    (paths["A_badcfg"] / "config.json").write_text('{"model_type": "gpt2", "n_layer": 2,,}')
    from transformers import AutoTokenizer

    paths["tokenizer_other"] = _other_tokenizer([d["text"] for d in docs], len(AutoTokenizer.from_pretrained(a)), root / "tokenizer_other")
    paths.update(_hostile(a, root, markers))
    _corpora(root, docs, big_mb)
    _queries(root, queries, a)
    _yaml(root, markers)
    (root / "notrun").mkdir()
    (root / "notrun" / "notes.txt").write_text("somebody's files\n")
    (root / "afile").write_text("a file, not a folder\n")
    return paths


def markers_created(paths: dict[str, Path]) -> list[str]:
    return sorted(p.name for p in paths["markers"].iterdir())


__all__ = ["build", "edit_weight", "markers_created"]
