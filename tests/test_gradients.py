"""Exact tier: captured per-example and per-token layer gradients against a loop of backward()."""

import pytest
import torch
from helpers import lm_loss_fn, lm_summed_nll, loop_gradients, random_queries, random_sequences, tiny_gpt2, tiny_llama

from lminfluence.curvature.math import sequence_gradients
from lminfluence.hooks import Collector, resolve_modules
from lminfluence.passes import run_pass
from lminfluence.task import CausalLMTask

MODELS = {"llama": tiny_llama, "gpt2_conv1d": tiny_gpt2}
# transformers' Llama computes RMSNorm and rotary embeddings in float32 even in a
# float64 model, so batched and single-example runs agree only to float32 round-off.
TOL = {"llama": dict(rtol=1e-5, atol=1e-8), "gpt2_conv1d": dict(rtol=1e-9, atol=1e-10)}


def captured_gradients(model, modules, examples, loss_kind, batch_size):
    task = CausalLMTask()
    out = []
    with Collector(modules) as col:
        for bc in run_pass(model, task, col, examples, batch_size, loss_kind):
            for b in range(bc.num_sequences):
                out.append({n: sequence_gradients(c.a[b : b + 1], c.ds[b : b + 1])[0] for n, c in bc.captures.items()})
    return out


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("patterns", [None, ("attention",)])
def test_per_example_gradients_match_backward_loop(arch, patterns):
    """DW_b = Σ_t ds_t ā_tᵀ equals W̄.grad of that example's summed loss alone,
    for sequences of different lengths padded into one batch, and for queries
    whose prompt labels are -100 (prompt positions still carry gradient)."""
    model = MODELS[arch]()
    modules = resolve_modules(model, patterns)
    examples = random_sequences(5) + random_queries(3)
    got = captured_gradients(model, modules, examples, "true", batch_size=4)
    want = loop_gradients(model, modules, examples, lm_loss_fn)
    for g, w in zip(got, want):
        for n in modules:
            torch.testing.assert_close(g[n], w[n], **TOL[arch])


def test_measurement_gradient_is_minus_log_prob_gradient():
    """The query pass differentiates g = -log p(completion | prompt)."""
    model = tiny_gpt2()
    modules = resolve_modules(model, None)
    queries = random_queries(4)
    got = captured_gradients(model, modules, queries, "measurement", batch_size=4)

    def neg_logp(m, ex):
        return lm_summed_nll(m, torch.as_tensor(ex["input_ids"]), torch.as_tensor(ex["labels"]))

    want = loop_gradients(model, modules, queries, neg_logp)
    for g, w in zip(got, want):
        for n in modules:
            torch.testing.assert_close(g[n], w[n], rtol=1e-9, atol=1e-10)


def test_per_token_gradients_match_perturbation_at_one_position():
    """ds_t ā_tᵀ is the gradient through position t alone: adding δ·ā_t to the layer's
    output at position t only and differentiating with respect to δ gives it."""
    model = tiny_gpt2()
    modules = resolve_modules(model, None)
    name = next(iter(modules))
    module = modules[name]
    ex = random_sequences(1, lengths=(6, 6))[0]
    ids = ex["input_ids"]
    with Collector({name: module}) as col:
        bc = next(run_pass(model, CausalLMTask(), col, [ex], 1, "true"))
    cap = bc.captures[name]
    for t in range(ids.numel()):
        delta = torch.zeros(cap.ds.shape[-1], cap.a.shape[-1], dtype=torch.float64, requires_grad=True)

        def hook(mod, args, output, t=t, delta=delta):
            x = args[0][0, t]
            a_bar = torch.cat([x, x.new_ones(1)])
            bump = torch.zeros_like(output)
            bump[0, t] = delta @ a_bar
            return output + bump

        handle = module.register_forward_hook(hook)
        try:
            (grad,) = torch.autograd.grad(lm_summed_nll(model, ids, ids), delta)
        finally:
            handle.remove()
        torch.testing.assert_close(torch.outer(cap.ds[0, t], cap.a[0, t]), grad, rtol=1e-9, atol=1e-10)


def test_model_left_untouched():
    """No hooks, no parameter .grad, same state_dict keys and values, training mode restored."""
    import lminfluence as li

    model = tiny_llama()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train = random_sequences(6)
    factors = li.fit_factors(model, train, execution=li.Execution(batch_size=3))
    li.compute_scores(model, factors, random_queries(2), train)
    assert model.training
    after = model.state_dict()
    assert list(after) == list(before)
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert all(p.grad is None for p in model.parameters())
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
