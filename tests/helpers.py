"""Tiny models and brute-force references that share no code with the library.

Flattening convention everywhere: a layer's W̄ [O, I] (bias as last column)
is flattened row-major, so vec(Q_S M Q_Aᵀ) = (Q_S ⊗ Q_A) vec(M).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from lminfluence.task.base import Task
from lminfluence.task.causal_lm import CausalLMTask

# ---------------------------------------------------------------- tiny models


def tiny_llama(seed: int = 0, dtype=torch.float64, vocab: int = 32, hidden: int = 16, mlp: int = 24, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(cfg).to(dtype).eval()


def tiny_gpt2(seed: int = 0, dtype=torch.float64, vocab: int = 32, hidden: int = 16, layers: int = 2):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab,
        n_embd=hidden,
        n_layer=layers,
        n_head=2,
        n_positions=128,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",
    )
    return GPT2LMHeadModel(cfg).to(dtype).eval()


def random_sequences(n: int, vocab: int = 32, lengths=(4, 9), seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(lengths[0], lengths[1] + 1, (), generator=g))
        out.append({"input_ids": torch.randint(0, vocab, (length,), generator=g)})
    return out


def random_queries(n: int, vocab: int = 32, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt = int(torch.randint(1, 4, (), generator=g))
        comp = int(torch.randint(1, 4, (), generator=g))
        ids = torch.randint(0, vocab, (prompt + comp,), generator=g)
        labels = ids.clone()
        labels[:prompt] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


# ------------------------------------------------- a scalar regression task


class ScalarRegressionTask(Task):
    """Examples {"x": [D], "y": scalar}; L = ½(h - y)², measurement f = h.

    The pseudo-loss uses the label y' = h - 1, whose gradient with respect to
    h is exactly 1 = the square root of the output Hessian: the "sampled"
    Fisher then equals the Gauss–Newton matrix with no sampling noise.
    """

    def collate(self, examples):
        return {
            "x": torch.stack([torch.as_tensor(e["x"]) for e in examples]),
            "y": torch.stack([torch.as_tensor(e["y"]) for e in examples]).reshape(-1),
        }

    def forward(self, model, batch):
        return model(batch["x"]).reshape(-1)

    def loss(self, outputs, batch):
        return 0.5 * (outputs - batch["y"]) ** 2

    def sampled_loss(self, outputs, batch, generator):
        return 0.5 * (outputs - (outputs.detach() - 1.0)) ** 2

    def measurement(self, outputs, batch):
        return outputs


def regression_data(n: int, d: int, seed: int = 3, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.randn(n, generator=g, dtype=dtype)
    return [{"x": x[i], "y": y[i]} for i in range(n)]


# -------------------------------------------------------- brute force maths


def wbar_grad(module: nn.Module) -> torch.Tensor:
    """The .grad of a layer as W̄ [O, I], bias last (Conv1D stores weight [I, O])."""
    is_conv1d = type(module).__name__ == "Conv1D"
    w = module.weight.grad.T if is_conv1d else module.weight.grad
    if module.bias is not None:
        w = torch.cat([w, module.bias.grad.unsqueeze(1)], dim=1)
    return w.clone()


def lm_summed_nll(model, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ over positions with a label of -log p(labels[t+1] | ids[:t+1]), one unpadded sequence."""
    logits = model(input_ids=ids.unsqueeze(0)).logits[0, :-1]
    target = labels[1:]
    keep = target != -100
    logp = torch.log_softmax(logits, dim=-1)
    return -logp[keep].gather(1, target[keep].unsqueeze(1)).sum()


def example_labels(ex) -> torch.Tensor:
    ids = torch.as_tensor(ex["input_ids"])
    return torch.as_tensor(ex["labels"]) if ex.get("labels") is not None else ids.clone()


def loop_gradients(model, modules: dict, examples, fn) -> list[dict[str, torch.Tensor]]:
    """One loss.backward() per example: W̄ gradients of fn(model, example) per layer."""
    out = []
    for ex in examples:
        model.zero_grad(set_to_none=True)
        fn(model, ex).backward()
        out.append({n: wbar_grad(m) for n, m in modules.items()})
    model.zero_grad(set_to_none=True)
    return out


def lm_loss_fn(model, ex):
    return lm_summed_nll(model, torch.as_tensor(ex["input_ids"]), example_labels(ex))


def flat(grads: dict[str, torch.Tensor], names) -> torch.Tensor:
    return torch.cat([grads[n].reshape(-1) for n in names])


def kron_eigen_matrix(q_s: torch.Tensor, q_a: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """(Q_S ⊗ Q_A) diag(vec Λ) (Q_S ⊗ Q_A)ᵀ, built explicitly."""
    k = torch.kron(q_s, q_a)
    return k @ torch.diag(lam.reshape(-1)) @ k.T


def dense_basis(q) -> torch.Tensor:
    """A stored eigenbasis as one matrix: block-diagonal when stored as a tuple of blocks."""
    return torch.block_diag(*q).double() if isinstance(q, tuple) else q.double()


def dense_factor_matrix(factors, name: str) -> torch.Tensor:
    """The dense curvature block of one layer as stored in ``factors``."""
    st = factors.curvature.state[name]
    lam = st["lambda"].double()
    if "q_a" not in st:
        return torch.diag(lam.reshape(-1))
    return kron_eigen_matrix(dense_basis(st["q_s"]), dense_basis(st["q_a"]), lam)


def lm_gauss_newton(model, modules: dict, examples) -> torch.Tensor:
    """Exact GN of the mean summed loss over the tracked layers' W̄ (all blocks).

    G = (1/N) Σ_n Σ_t J_tᵀ (diag p_t - p_t p_tᵀ) J_t, written as the expectation
    over labels c ~ p_t of g g with g = ∇ CE(logits_t, c): one backward per
    (sequence, position, class).
    """
    names = list(modules)
    total = None
    for ex in examples:
        ids = torch.as_tensor(ex["input_ids"])
        labels = example_labels(ex)
        logits = model(input_ids=ids.unsqueeze(0)).logits[0, :-1]
        probs = torch.softmax(logits.detach(), -1)
        for t in range(logits.shape[0]):
            if labels[t + 1] == -100:
                continue
            for c in range(logits.shape[1]):
                model.zero_grad(set_to_none=True)
                F.cross_entropy(logits[t : t + 1], torch.tensor([c])).backward(retain_graph=True)
                g = flat({n: wbar_grad(m) for n, m in modules.items()}, names)
                term = probs[t, c] * torch.outer(g, g)
                total = term if total is None else total + term
    model.zero_grad(set_to_none=True)
    return total / len(examples)


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    def rank(v):
        r = torch.empty_like(v, dtype=torch.float64)
        r[v.argsort()] = torch.arange(len(v), dtype=torch.float64)
        return r

    rx, ry = rank(x.flatten()), rank(y.flatten())
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()))


def allclose_report(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float, what: str = "") -> None:
    """assert_close that prints the worst entries on failure."""
    actual, expected = actual.double(), expected.double()
    err = (actual - expected).abs() - (atol + rtol * expected.abs())
    if (err > 0).any():
        flat_err = err.flatten()
        worst = flat_err.topk(min(5, flat_err.numel())).indices
        rows = [
            f"  [{int(i)}] actual={actual.flatten()[i]:.6g} expected={expected.flatten()[i]:.6g}" for i in worst
        ]
        raise AssertionError(f"{what}: {int((err > 0).sum())} entries out of tolerance; worst:\n" + "\n".join(rows))


class CrashingTask(CausalLMTask):
    """The causal-LM task, raising in its ``crash_at``-th forward (class attributes: not part of the task's identity)."""

    crash_at: int | None = None
    calls = 0

    def forward(self, model, batch):
        type(self).calls += 1
        if type(self).calls == type(self).crash_at:
            raise RuntimeError("simulated crash")
        return super().forward(model, batch)
