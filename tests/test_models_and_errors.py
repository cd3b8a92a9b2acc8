"""Architectures (Linear and GPT-2 Conv1D, default layer discovery) and clear errors on bad input."""

import pytest
import torch
from helpers import ScalarRegressionTask, random_queries, random_sequences, regression_data, tiny_gpt2, tiny_llama
from torch import nn

import lminfluence as li
from lminfluence.errors import StaleError, TrackingError
from lminfluence.hooks import resolve_modules


def _tiny(cls_name: str, **kw):
    import transformers

    cfg_cls = getattr(transformers, cls_name + "Config")
    model_cls = getattr(transformers, cls_name + "ForCausalLM")
    cfg = cfg_cls(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2, **kw)
    return model_cls(cfg)


@pytest.mark.parametrize(
    "build, suffixes",
    [
        (lambda: tiny_llama(), ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")),
        (lambda: tiny_gpt2(), ("mlp.c_fc", "mlp.c_proj")),
        (lambda: _tiny("GPTNeoX"), ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h")),
        (lambda: _tiny("Qwen2", num_key_value_heads=2), ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")),
        (lambda: _tiny("Gemma", num_key_value_heads=2, head_dim=8), ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")),
        (lambda: _tiny("Olmo"), ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")),
    ],
    ids=["llama", "gpt2", "gpt_neox", "qwen2", "gemma", "olmo"],
)
def test_default_modules_are_the_mlp_layers_of_every_block(build, suffixes):
    """The default tracked set is every block's MLP linear layers, nothing else (no lm_head, no attention)."""
    model = build()
    names = list(resolve_modules(model, None))
    assert len(names) == 2 * len(suffixes)
    for layer in range(2):
        for suffix in suffixes:
            assert sum(n.endswith(f"{layer}.{suffix}") for n in names) == 1, (layer, suffix, names)
    attention = resolve_modules(model, ["attention"])
    assert attention and not set(attention) & set(names)


def test_conv1d_gives_the_same_numbers_as_linear():
    """A GPT-2 Conv1D (weight [I, O]) and the nn.Linear with the transposed weight give identical factors and scores."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv_net = nn.Sequential(Conv1D(5, 3), nn.Tanh(), Conv1D(1, 5)).double()
    lin_net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    with torch.no_grad():
        for c, lin in ((conv_net[0], lin_net[0]), (conv_net[2], lin_net[2])):
            lin.weight.copy_(c.weight.T)
            lin.bias.copy_(c.bias)
    data, queries, task = regression_data(20, 3), regression_data(3, 3, seed=5), ScalarRegressionTask()
    results = []
    for net in (conv_net, lin_net):
        f = li.fit_factors(net, data, li.FactorConfig(modules=["0", "2"]), task=task)
        s = li.compute_scores(net, f, queries, data, li.ScoreConfig(per_token=True), task=task)
        results.append((f, s))
    (fc, sc), (fl, sl) = results
    with pytest.raises(StaleError):  # the factors belong to their own model: a fingerprint covers its whole state
        li.compute_scores(lin_net, fc, queries, data, task=task)
    for n in fc.layers:
        torch.testing.assert_close(fc.curvature.state[n]["lambda"], fl.curvature.state[n]["lambda"])
    torch.testing.assert_close(sc.total, sl.total)


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_end_to_end_float32(build, tmp_path):
    """Fit, save, reload, score with rank-2 queries and per-token scores, self-influence: all finite."""
    model = build(dtype=torch.float32)
    train = random_sequences(10)
    factors = li.fit_factors(model, train, output_dir=tmp_path)
    loaded = li.load_factors(tmp_path, model=model)
    cfg = li.ScoreConfig(query_rank=2, per_token=True, per_layer=True)
    scores = li.compute_scores(model, loaded, random_queries(3), train, cfg)
    assert scores.total.shape == (3, 10) and torch.isfinite(scores.total).all()
    assert set(scores.per_layer) == set(factors.layers)
    values, index = scores.top_k(4)
    assert values.shape == index.shape == (3, 4)
    assert torch.isfinite(li.compute_self_scores(model, loaded, train).total).all()


# ------------------------------------------------------------------ errors


def test_unknown_module_pattern_names_what_exists():
    with pytest.raises(ValueError, match=r"matched no linear layer.*mlp\.c_fc"):
        li.fit_factors(tiny_gpt2(), random_sequences(2), li.FactorConfig(modules=["*.nonexistent"]))


class _Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(3, 1)
        self.unused = nn.Linear(3, 1)

    def forward(self, x):
        return self.used(x)


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(3, 3)
        self.head = nn.Linear(3, 1)

    def forward(self, x):
        return self.head(self.inner(self.inner(x)))


class _InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(3, 3)
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(3, 1)

    def forward(self, x):
        return self.head(self.act(self.inner(x)))


@pytest.mark.parametrize(
    "model, match",
    [(_Unused(), "not used in the forward pass"), (_Twice(), "called twice"), (_InPlace(), "modified in place")],
    ids=["unused", "twice", "inplace"],
)
def test_tracking_errors(model, match):
    data = [{"x": torch.randn(3), "y": torch.tensor(0.0)} for _ in range(4)]
    with pytest.raises(TrackingError, match=match):
        li.fit_factors(model, data, li.FactorConfig(modules=["*"]), task=ScalarRegressionTask())


def test_factors_of_another_model_are_refused(tmp_path):
    model = tiny_gpt2()
    train = random_sequences(4)
    factors = li.fit_factors(model, train, output_dir=tmp_path)
    other = tiny_gpt2(seed=1)
    with pytest.raises(ValueError, match="fitted on a different model"):
        li.compute_scores(other, factors, random_queries(1), train)
    with pytest.raises(ValueError, match="fitted on a different model"):
        li.load_factors(tmp_path, model=other)
    with pytest.raises(ValueError, match="has no module"):
        li.compute_scores(tiny_llama(), factors, random_queries(1), train)


def test_missing_factors_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json is missing"):
        li.load_factors(tmp_path / "nothing")


@pytest.mark.parametrize(
    "data, match",
    [
        ([], "empty"),
        ([{"text": "hello"}], "must be a dict with 'input_ids'"),
        ([{"input_ids": [[1, 2], [3, 4]]}], "must be 1-D"),
        ([{"input_ids": [1]}], "at least 2"),
        ([{"input_ids": [1.5, 2.0]}], "integers"),
        ([{"input_ids": [1, 2, 3], "labels": [1, 2]}], "same length"),
        ([{"input_ids": [1, 2, 3], "labels": [-100, -100, -100]}], "no token that carries loss"),
        ("not a list", "sequence or iterable"),
    ],
)
def test_bad_training_data(data, match):
    with pytest.raises((ValueError, TypeError), match=match):
        li.fit_factors(tiny_gpt2(), data)


@pytest.mark.parametrize(
    "cls, kwargs, match",
    [
        (li.FactorConfig, dict(strategy="ekfca"), "strategy='ekfca' is not one of"),
        (li.FactorConfig, dict(fisher="true"), "fisher"),
        (li.FactorConfig, dict(modules=[""]), "non-empty"),
        (li.ScoreConfig, dict(damping=-1.0), "damping must be"),
        (li.ScoreConfig, dict(damping_scale=None), "either damping_scale"),
        (li.ScoreConfig, dict(damping_scale=float("nan")), "damping_scale must be"),
        (li.ScoreConfig, dict(query_rank=0), "query_rank"),
        (li.ScoreConfig, dict(per_token=True, algorithm="materialize"), "per_token"),
        (li.Execution, dict(batch_size=0), "batch_size"),
    ],
)
def test_config_validation(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_absolute_damping_overrides_relative():
    """damping (absolute) is used when given; damping_scale scales each layer's mean eigenvalue otherwise."""
    assert li.ScoreConfig(damping=0.5).damping_for(100.0) == 0.5
    assert li.ScoreConfig(damping_scale=0.2).damping_for(10.0) == pytest.approx(2.0)


def test_examples_from_pairs():
    """Prompt tokens get label -100; the completion carries the measurement; empty completions are refused."""

    class CharTokenizer:
        def __call__(self, text, add_special_tokens=True):
            ids = [ord(c) % 32 for c in text]
            return {"input_ids": ([1] if add_special_tokens else []) + ids}

    ex = li.examples_from_pairs(CharTokenizer(), [("ab", "cd")])[0]
    assert ex["input_ids"] == [1, ord("a") % 32, ord("b") % 32, ord("c") % 32, ord("d") % 32]
    assert ex["labels"] == [-100, -100, -100, ord("c") % 32, ord("d") % 32]
    with pytest.raises(ValueError, match="completion is empty"):
        li.examples_from_pairs(CharTokenizer(), [("ab", "")])


def test_sampled_labels_follow_the_model_distribution():
    """Inverse-CDF sampling: frequencies over 40,000 draws match softmax(logits) within
    0.01 (4 standard errors at p = 0.5), and zero-probability classes are never drawn."""
    from lminfluence.task.causal_lm import sample_categorical

    logits = torch.tensor([[0.0, 1.0, -1.0, float("-inf"), 2.0], [float("-inf"), 0.0, 0.0, 0.0, float("-inf")]])
    draws = sample_categorical(logits.repeat_interleave(20000, 0), torch.Generator().manual_seed(0)).view(2, -1)
    for row in range(2):
        freq = torch.bincount(draws[row], minlength=5).double() / draws.shape[1]
        torch.testing.assert_close(freq, torch.softmax(logits[row].double(), -1), rtol=0, atol=0.01)
    assert not (draws[0] == 3).any() and not (draws[1] == 0).any() and not (draws[1] == 4).any()


class _FlatLM(nn.Module):
    """A toy LM whose tracked layer is fed flattened tokens [B·T, H], like an MoE expert."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(32, 8)
        self.expert = nn.Linear(8, 8)
        self.head = nn.Linear(8, 32)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        B, T, H = h.shape
        return self.head(self.expert(h.reshape(B * T, H)).reshape(B, T, H))


def test_flattened_layer_input_is_refused_even_without_padding():
    """Equal-length sequences (no padding) must not skip the [B, T] shape check."""
    data = [{"input_ids": torch.randint(0, 32, (6,))} for _ in range(4)]
    with pytest.raises(TrackingError, match="flattened tokens"):
        li.fit_factors(_FlatLM(), data, li.FactorConfig(modules=["expert"]))


class _Fails(ScalarRegressionTask):
    def loss(self, outputs, batch):
        raise RuntimeError("boom")


def test_model_mode_and_hooks_restored_after_an_error():
    """An exception inside a pass leaves the model in its own mode with no hook attached."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    model.train()
    data = regression_data(6, 3)
    factors = li.fit_factors(model, data, li.FactorConfig(modules=["*"]), task=ScalarRegressionTask())
    with pytest.raises(RuntimeError, match="boom"):
        li.compute_scores(model, factors, data[:1], data, task=_Fails())
    assert model.training
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_missing_tensor_file_and_wrong_config_type(tmp_path):
    model = tiny_gpt2()
    li.fit_factors(model, random_sequences(3), output_dir=tmp_path)
    (tmp_path / "factors.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="factors.safetensors is missing"):
        li.load_factors(tmp_path)
    with pytest.raises(TypeError, match="must be a FactorConfig"):
        li.fit_factors(model, random_sequences(3), li.ScoreConfig())
