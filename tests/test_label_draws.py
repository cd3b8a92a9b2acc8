"""Label draws (``FactorConfig(label_draws=K)``): K sampled label sets per sequence in the curvature passes.

Brute force here: for every sequence i and draw k, the labels are drawn as the
library specifies them (``CausalLMTask.sampled_loss`` with the generator of
``sequence_seed(seed, i, k)``, one sequence at a time), and one
``loss.backward()`` with ``retain_grad`` on each tracked layer's output gives
that sequence's per-token ds; ā is the layer's recorded input. Nothing of the
library's collector, passes or fitting loop is used. From these:

    A = Σ_i Σ_t ā āᵀ / tokens                  (once: A has no labels)
    S = Σ_k Σ_i Σ_t ds ds ᵀ / (K · tokens)      (the mean of the K single-draw S)
    Λ = Σ_k Σ_i (Q_Sᵀ DW_ik Q_A)² / (K · N)     (in the fitted eigenbasis, Eq 20)

so the K-draw fit is checked against the average of K single-draw fits.
"""

from __future__ import annotations

import pytest
import torch

import lminfluence as li
from helpers import CrashingTask, allclose_report, random_sequences, tiny_gpt2, tiny_llama
from lminfluence.curvature.checkpoint import CHECKPOINT_DIR
from lminfluence.errors import ConfigError
from lminfluence.hooks.modules import resolve_modules
from lminfluence.passes import run_pass, sequence_generators, tracking
from lminfluence.task.causal_lm import CausalLMTask

# Float64 sums of the same products in another order (a batch of several sequences against one at
# a time) agree to ~1e-15 relative; 1e-10 leaves room for the eigendecomposition, nothing more.
RTOL, ATOL = 1e-10, 1e-12


def brute_statistics(model, train, seed: int, draws: list[int]) -> dict[str, dict]:
    """Per layer: A's and each draw's S sums, the token count, and every (draw, sequence)'s DW [O, I]."""
    modules = resolve_modules(model, None)
    task = CausalLMTask()
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, args, out):
            x = args[0]
            bias = getattr(module, "bias", None) is not None
            inputs[name] = torch.cat([x, x.new_ones(x.shape[:-1] + (1,))], -1) if bias else x
            out.retain_grad()
            outputs[name] = out

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    stats = {n: {"a": 0.0, "s": {k: 0.0 for k in draws}, "dw": {k: [] for k in draws}} for n in modules}
    tokens = 0
    try:
        for i, ex in enumerate(train):
            batch = task.collate([ex])
            tokens += int(batch["attention_mask"].sum())
            for k in draws:
                model.zero_grad(set_to_none=True)
                logits = task.forward(model, batch)
                task.sampled_loss(logits, batch, sequence_generators(seed, i, 1, logits.device, k)).sum().backward()
                for n in modules:
                    a, ds = inputs[n][0].detach(), outputs[n].grad[0]  # [T, I], [T, O]
                    if k == draws[0]:
                        stats[n]["a"] = stats[n]["a"] + a.T @ a
                    stats[n]["s"][k] = stats[n]["s"][k] + ds.T @ ds
                    stats[n]["dw"][k].append(ds.T @ a)
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    for st in stats.values():
        st["tokens"] = tokens
    return stats


def dense(e: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Q diag(e) Qᵀ in float64."""
    return (q.double() * e.double()) @ q.double().T


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_k_draws_are_the_average_of_k_single_draws(make):
    """K-FAC/EK-FAC with K = 3 draws equal the brute-force average of the K single draws.

    A from one draw, S the mean of the K single-draw S, EK-FAC's Λ the mean over draws and
    sequences in the fitted basis; and the one-draw fit is draw 0 of the same streams (today's
    labels). Llama: gate and up share ā (A counted once, by its owner); GPT-2: Conv1D with
    biases (ā has the bias coordinate).
    """
    model, train, K = make(), random_sequences(7), 3
    stats = brute_statistics(model, train, seed=5, draws=list(range(K)))
    execution = li.Execution(batch_size=3)
    kfac = li.fit_factors(model, train, li.FactorConfig(strategy="kfac", seed=5, label_draws=K), execution=execution)
    ekfac = li.fit_factors(model, train, li.FactorConfig(strategy="ekfac", seed=5, label_draws=K), execution=execution)
    one = li.fit_factors(model, train, li.FactorConfig(strategy="kfac", seed=5), execution=execution)
    for n, st in stats.items():
        tokens = st["tokens"]
        a = st["a"] / tokens
        s_draws = [st["s"][k] / tokens for k in range(K)]
        s = sum(s_draws) / K
        for fit in (kfac, ekfac):
            fs = fit.curvature.state[n]
            allclose_report(dense(fs["e_a"], fs["q_a"]), a, RTOL, ATOL, f"{n}: A")
            allclose_report(dense(fs["e_s"], fs["q_s"]), s, RTOL, ATOL, f"{n}: S averaged over {K} draws")
        fs = one.curvature.state[n]
        allclose_report(dense(fs["e_s"], fs["q_s"]), s_draws[0], RTOL, ATOL, f"{n}: S of one draw = draw 0")
        assert (s_draws[1] - s_draws[0]).abs().max() > 1e-3 * s_draws[0].abs().max(), "draws 0 and 1 drew the same labels"
        fs = ekfac.curvature.state[n]
        q_s, q_a = fs["q_s"].double(), fs["q_a"].double()
        lam = sum((q_s.T @ dw @ q_a) ** 2 for k in range(K) for dw in st["dw"][k]) / (K * len(train))
        allclose_report(fs["lambda"], lam, RTOL, ATOL, f"{n}: Λ averaged over {K} draws and the sequences")


def test_diagonal_with_draws_is_the_mean_squared_gradient_over_draws():
    """The diagonal Fisher with K = 2: Λ = mean over sequences and draws of DW ⊙ DW (parameter basis)."""
    model, train = tiny_gpt2(), random_sequences(5)
    stats = brute_statistics(model, train, seed=0, draws=[0, 1])
    fit = li.fit_factors(model, train, li.FactorConfig(strategy="diagonal", label_draws=2), execution=li.Execution(batch_size=2))
    for n, st in stats.items():
        lam = sum(dw**2 for k in (0, 1) for dw in st["dw"][k]) / (2 * len(train))
        allclose_report(fit.curvature.state[n]["lambda"], lam, RTOL, ATOL, f"{n}: diagonal Λ over 2 draws")


def one_draw_loop(model, train, config, batch_size):
    """The fitting loop as it was before label draws: one sampled backward per batch, no caches."""
    from lminfluence.curvature.strategies import make_curvature
    from lminfluence.hooks.modules import layer_info

    modules = resolve_modules(model, config.modules)
    curvature = make_curvature(config.strategy, {n: layer_info(m) for n, m in modules.items()}, config)
    task = CausalLMTask()
    with tracking(model, modules) as collector:
        for pass_name in curvature.passes:
            tokens = sequences = 0
            for bc in run_pass(model, task, collector, train, batch_size, "sampled", seed=config.seed):
                curvature.accumulate(pass_name, bc.captures)
                tokens, sequences = tokens + bc.num_tokens, sequences + bc.num_sequences
            curvature.finalize(pass_name, tokens, sequences)
    return curvature.state_dict()


@pytest.mark.parametrize("strategy", ["kfac", "ekfac", "diagonal"])
def test_one_draw_is_bitwise_the_one_draw_fit(strategy):
    """label_draws=1 (the default) adds exactly what the one-draw loop adds.

    The factors are equal bit for bit (float32, so that any change in the order or the divisors
    would show).
    """
    model, train = tiny_llama(dtype=torch.float32), random_sequences(7)
    config = li.FactorConfig(strategy=strategy)
    fit = li.fit_factors(model, train, config, execution=li.Execution(batch_size=3, cache_gib=0))
    want = one_draw_loop(model, train, config, 3)
    got = fit.curvature.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_draws_do_not_depend_on_the_batch_size():
    """With K = 4 each sequence's draws come from its own generators: the batch size changes nothing.

    Batch sizes 1, 4 and 7 (padding, and the capture cache replaying the draws or not) give the
    same EK-FAC factors.
    """
    model, train = tiny_llama(), random_sequences(7)
    config = li.FactorConfig(strategy="ekfac", label_draws=4)
    fits = [li.fit_factors(model, train, config, execution=li.Execution(batch_size=b, cache_gib=c)) for b, c in ((1, 0), (4, None), (7, 0))]
    for fit in fits[1:]:
        assert fit.num_tokens == fits[0].num_tokens
        for n in fit.layers:
            for key in ("e_a", "e_s", "lambda"):
                allclose_report(fit.curvature.state[n][key], fits[0].curvature.state[n][key], RTOL, ATOL, f"{n}: {key}")
    assert fits[1].meta["second_pass_replayed"] and not fits[0].meta["second_pass_replayed"]


@pytest.mark.parametrize("crash_at", [3, 6])
def test_resumed_fit_with_draws_is_bitwise_equal(tmp_path, crash_at):
    """A fit with K = 2 that fails midway resumes to factors equal bit for bit to an uninterrupted fit's.

    It fails in its first (3rd forward) or second pass (6th); a rerun with another K does not
    resume (K is in the checkpoint's key), and the saved factors record K.
    """
    model, train = tiny_llama(dtype=torch.float32, hidden=32, mlp=64), random_sequences(8, lengths=(5, 12))
    execution = li.Execution(batch_size=2, checkpoint_seconds=0, cache_gib=0)
    config = li.FactorConfig(label_draws=2)
    want = li.fit_factors(model, train, config, task=CrashingTask(), execution=execution)
    out = tmp_path / "f"
    CrashingTask.calls, CrashingTask.crash_at = 0, crash_at
    with pytest.raises(RuntimeError, match="simulated crash"):
        li.fit_factors(model, train, config, task=CrashingTask(), execution=execution, output_dir=out)
    CrashingTask.crash_at = None
    assert (out / CHECKPOINT_DIR).is_dir()
    got = li.fit_factors(model, train, config, task=CrashingTask(), execution=execution, output_dir=out)
    assert got.meta["resumed"]
    want_state, got_state = want.curvature.state_dict(), got.curvature.state_dict()
    assert want_state.keys() == got_state.keys()
    for key in want_state:
        assert torch.equal(got_state[key], want_state[key]), key
    assert li.load_factors(out).config.label_draws == 2

    CrashingTask.calls, CrashingTask.crash_at = 0, crash_at
    with pytest.raises(RuntimeError, match="simulated crash"):
        li.fit_factors(model, train, li.FactorConfig(label_draws=3), task=CrashingTask(), execution=execution, output_dir=out)
    CrashingTask.crash_at = None
    again = li.fit_factors(model, train, config, task=CrashingTask(), execution=execution, output_dir=out)
    assert not again.meta["resumed"], "a checkpoint of K = 3 was resumed by a fit with K = 2"


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_label_draws_must_be_a_positive_integer(bad):
    """Zero, negatives, floats, booleans and strings are refused with a ConfigError."""
    with pytest.raises(ConfigError, match="label_draws must be a positive integer"):
        li.FactorConfig(label_draws=bad)


@pytest.mark.parametrize("kwargs", [dict(fisher="empirical"), dict(strategy="lissa"), dict(strategy="identity")])
def test_label_draws_are_refused_where_no_labels_are_drawn(kwargs):
    """K > 1 is refused, naming the fix, where no labels are drawn (K = 1 stays valid).

    The empirical Fisher uses the true labels; LiSSA and identity fit no sampled statistics.
    """
    with pytest.raises(ConfigError, match="leave label_draws=1"):
        li.FactorConfig(label_draws=2, **kwargs)
    assert li.FactorConfig(label_draws=1, **kwargs).label_draws == 1
