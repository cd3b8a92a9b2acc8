"""Loading a causal LM and its tokenizer from local files, and checking they belong together."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InputError
from .config import ModelSection

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _load_errors() -> tuple[type[BaseException], ...]:
    """What loading a model or tokenizer raises for damaged, unsupported or refused files."""
    import json
    import pickle

    from safetensors import SafetensorError

    return (OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError, json.JSONDecodeError, pickle.UnpicklingError, SafetensorError)


LOAD_ERRORS = _load_errors()


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return (text[:400] + " …") if len(text) > 400 else text or type(error).__name__


def resolve_device(device: str) -> torch.device:
    """The torch device ``device`` names ("auto": CUDA when there is one); InputError for one this machine lacks."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise InputError(f"model.device={device!r} is not a torch device ({e})") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"model.device={device!r}, but this machine has no CUDA device (use --device cpu)")
    return dev


def _check_model_path(section: ModelSection) -> None:
    path = Path(section.path)
    if not path.exists():
        raise InputError(f"model {path} does not exist (give a Hugging Face model folder or a .gguf file)")
    if section.gguf_file is not None:
        gguf_path = path / section.gguf_file
        if not gguf_path.is_file():
            raise InputError(f"GGUF file {gguf_path} does not exist")
        try:
            import gguf  # noqa: F401
        except ImportError as e:
            raise InputError("loading a .gguf model needs the `gguf` package: pip install 'lminfluence[gguf]'") from e
    elif not (path / "config.json").is_file():
        raise InputError(f"{path} has no config.json: is it a Hugging Face model folder? (for a GGUF file, give its path)")
    if section.tokenizer is not None and not Path(section.tokenizer).exists():
        raise InputError(f"tokenizer {section.tokenizer} does not exist")


def load_tokenizer(section: ModelSection) -> Any:
    """The model's tokenizer (or ``section.tokenizer``'s), checked to tokenize text to something."""
    from transformers import AutoTokenizer

    _check_model_path(section)
    source = section.tokenizer or section.path
    kwargs = {"gguf_file": section.gguf_file} if section.gguf_file and section.tokenizer is None else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except LOAD_ERRORS as e:
        raise InputError(f"cannot load a tokenizer from {source}: {_one_line(e)}") from e
    if not tokenizer("hello world", add_special_tokens=False)["input_ids"]:
        raise InputError(
            f"{source} has no usable tokenizer (no tokenizer.json, vocab or merges files: it tokenizes text to nothing); "
            "give the model's tokenizer folder with --tokenizer"
        )
    return tokenizer


def load_model(section: ModelSection) -> nn.Module:
    """The model in eval mode on its device; weights are never changed by lminfluence."""
    from transformers import AutoModelForCausalLM

    _check_model_path(section)
    kwargs: dict[str, Any] = {}
    if section.gguf_file:
        kwargs["gguf_file"] = section.gguf_file
    if section.dtype != "auto":
        kwargs["dtype"] = _DTYPES[section.dtype]
    try:
        model = AutoModelForCausalLM.from_pretrained(section.path, **kwargs)
    except LOAD_ERRORS as e:
        raise InputError(f"cannot load a causal LM from {section.path}: {_one_line(e)}") from e
    if section.dtype == "auto" and model.dtype in (torch.float16, torch.bfloat16) and resolve_device(section.device).type == "cpu":
        logger.info("model stored in %s; computing in float32 on the CPU", model.dtype)
        model = model.float()
    model.to(resolve_device(section.device))  # type: ignore[arg-type]  # (transformers' stub takes a model)
    return model.eval()


def context_length(model: nn.Module) -> int | None:
    """The longest sequence the model takes, from its config (None when it does not say)."""
    cfg = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_pairing(model: nn.Module, tokenizer: Any, max_length: int) -> None:
    """Refuse a tokenizer whose ids the model cannot embed, and sequences past the model's context."""
    get_embeddings = getattr(model, "get_input_embeddings", None)
    emb = get_embeddings() if callable(get_embeddings) else None
    vocab = getattr(emb, "num_embeddings", None) or getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise InputError(
            f"the tokenizer has {len(tokenizer)} tokens but the model embeds only {vocab}: "
            "they do not belong together (give the model's own tokenizer with --tokenizer)"
        )
    cfg_eos = getattr(getattr(model, "config", None), "eos_token_id", None)
    tok_eos = getattr(tokenizer, "eos_token_id", None)
    if cfg_eos is not None and tok_eos is not None:
        allowed = set(cfg_eos) if isinstance(cfg_eos, (list, tuple)) else {cfg_eos}
        if tok_eos not in allowed:
            raise InputError(
                f"the tokenizer's end-of-text id is {tok_eos} but the model's is {cfg_eos}: "
                "they do not belong together (give the model's own tokenizer with --tokenizer)"
            )
    ctx = context_length(model)
    if ctx is not None and max_length > ctx:
        raise InputError(f"sequences of {max_length} tokens are longer than the model's context of {ctx}; set --max-length ≤ {ctx}")


__all__ = ["load_model", "load_tokenizer", "check_pairing", "context_length", "resolve_device"]
