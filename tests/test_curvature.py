"""Exact tier: curvature factors against dense matrices built by brute force."""

import pytest
import torch
from helpers import (
    ScalarRegressionTask,
    allclose_report,
    dense_factor_matrix,
    kron_eigen_matrix,
    lm_gauss_newton,
    lm_loss_fn,
    loop_gradients,
    random_sequences,
    regression_data,
    tiny_llama,
    wbar_grad,
)
from torch import nn

import lminfluence as li
from lminfluence.curvature import math as cm
from lminfluence.hooks import resolve_modules


def mlp(widths, activation=None, bias=True, seed=0):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if activation is not None and i < len(widths) - 2:
            layers.append(activation())
    return nn.Sequential(*layers).double()


def regression_gauss_newton_blocks(model, modules, data):
    """Per-layer blocks of G = mean_n J_nᵀ J_n (scalar output, squared error: output Hessian 1)."""

    def h(m, ex):
        return m(ex["x"].unsqueeze(0)).sum()

    grads = loop_gradients(model, modules, data, h)
    return {n: torch.stack([g[n].reshape(-1) for g in grads]).T @ torch.stack([g[n].reshape(-1) for g in grads]) / len(data) for n in modules}


@pytest.mark.parametrize("strategy", ["kfac", "ekfac"])
def test_kfac_and_ekfac_exact_on_deep_linear_network(strategy):
    """On a deep linear network with scalar output the output-gradient of every
    layer is the same for every example, so A ⊗ S is the exact Gauss–Newton block:
    K-FAC and EK-FAC must both equal the dense GN (bias coordinates included)."""
    model = mlp([4, 5, 3, 1])
    data = regression_data(40, 4)
    factors = li.fit_factors(model, data, li.FactorConfig(strategy=strategy, modules=["*"]), task=ScalarRegressionTask(), execution=li.Execution(batch_size=7))
    modules = resolve_modules(model, ["*"])
    blocks = regression_gauss_newton_blocks(model, modules, data)
    for n in modules:
        allclose_report(dense_factor_matrix(factors, n), blocks[n], rtol=1e-8, atol=1e-10, what=f"{strategy} {n}")


def test_ekfac_closer_than_kfac_on_nonlinear_network():
    """With a tanh network K-FAC is no longer exact; EK-FAC's Λ is the best diagonal
    in the same eigenbasis, so its Frobenius error to the GN block is at most K-FAC's."""
    model = mlp([4, 6, 5, 1], activation=nn.Tanh)
    data = regression_data(60, 4)
    task = ScalarRegressionTask()
    cfg = dict(modules=["*"])
    ek = li.fit_factors(model, data, li.FactorConfig(strategy="ekfac", **cfg), task=task)
    k = li.fit_factors(model, data, li.FactorConfig(strategy="kfac", **cfg), task=task)
    modules = resolve_modules(model, ["*"])
    blocks = regression_gauss_newton_blocks(model, modules, data)
    strictly_better = 0
    for n in modules:
        e_ek = (dense_factor_matrix(ek, n) - blocks[n]).norm()
        e_k = (dense_factor_matrix(k, n) - blocks[n]).norm()
        assert e_ek <= e_k * (1 + 1e-9) + 1e-12, (n, float(e_ek), float(e_k))  # round-off where both are exact
        strictly_better += bool(e_ek < 0.99 * e_k)
    assert strictly_better >= 1  # the comparison is not vacuous: some layer is not K-FAC-exact


def test_lambda_equals_definition_from_per_sequence_gradients():
    """Λ = mean_n ((Q_S ⊗ Q_A)ᵀ vec DW_n)², with DW_n from a loop of backward()
    (empirical Fisher, so deterministic), and Q_A, Q_S diagonalise the brute-force
    token covariances A = mean ā āᵀ and S = mean ds dsᵀ."""
    model = tiny_llama()
    train = random_sequences(7)
    factors = li.fit_factors(model, train, li.FactorConfig(strategy="ekfac", fisher="empirical"), execution=li.Execution(batch_size=3))
    modules = resolve_modules(model, None)
    grads = loop_gradients(model, modules, train, lm_loss_fn)
    cov_a, cov_s, tokens = _token_covariances(model, modules, train)
    for n in modules:
        st = factors.curvature.state[n]
        k = torch.kron(st["q_s"], st["q_a"])
        rotated = torch.stack([k.T @ g[n].reshape(-1) for g in grads])  # [N, O·I]
        allclose_report(st["lambda"].reshape(-1), rotated.square().mean(0), rtol=1e-5, atol=1e-9, what=f"Λ {n}")
        for q, e, cov in ((st["q_a"], st["e_a"], cov_a[n]), (st["q_s"], st["e_s"], cov_s[n])):
            # atol scaled to the spectrum: Llama's float32 internals leave ~1e-6 relative round-off
            allclose_report(q.T @ (cov / tokens) @ q, torch.diag(e), rtol=1e-5, atol=1e-6 * float(e.max()), what=f"eigenbasis {n}")


def _token_covariances(model, modules, train):
    """A and S summed over tokens, from module hooks and retain_grad (one sequence at a time)."""
    cov_a = {n: 0 for n in modules}
    cov_s = {n: 0 for n in modules}
    tokens = 0
    for ex in train:
        inputs, outputs = {}, {}

        def record(mod, args, out, n):
            inputs[n], outputs[n] = args[0], out

        handles = [m.register_forward_hook(lambda mod, args, out, n=n: record(mod, args, out, n)) for n, m in modules.items()]
        try:
            loss = lm_loss_fn(model, ex)
        finally:
            for h in handles:
                h.remove()
        for o in outputs.values():
            o.retain_grad()
        loss.backward()
        for n, m in modules.items():
            a = inputs[n][0].detach()
            if m.bias is not None:
                a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1)
            ds = outputs[n].grad[0]
            cov_a[n] = cov_a[n] + a.T @ a
            cov_s[n] = cov_s[n] + ds.T @ ds
        tokens += len(ex["input_ids"])
        model.zero_grad(set_to_none=True)
    return cov_a, cov_s, tokens


def test_kfac_lambda_is_mean_length_times_eigenvalue_outer_product():
    """K-FAC's Λ = T̄ · e_S e_Aᵀ with T̄ the mean number of real tokens per sequence."""
    model = tiny_llama()
    train = random_sequences(6)
    factors = li.fit_factors(model, train, li.FactorConfig(strategy="kfac"))
    mean_len = sum(len(e["input_ids"]) for e in train) / len(train)
    assert factors.num_tokens == sum(len(e["input_ids"]) for e in train)
    for st in factors.curvature.state.values():
        torch.testing.assert_close(st["lambda"], mean_len * torch.outer(st["e_s"], st["e_a"]))


def test_diagonal_is_mean_squared_per_sequence_gradient():
    """diagonal: Λ = mean_n DW_n ⊙ DW_n in the parameter basis (empirical Fisher)."""
    model = tiny_llama()
    train = random_sequences(6)
    factors = li.fit_factors(model, train, li.FactorConfig(strategy="diagonal", fisher="empirical"), execution=li.Execution(batch_size=4))
    modules = resolve_modules(model, None)
    grads = loop_gradients(model, modules, train, lm_loss_fn)
    for n in modules:
        want = torch.stack([g[n] for g in grads]).square().mean(0)
        allclose_report(factors.curvature.state[n]["lambda"], want, rtol=1e-5, atol=1e-10, what=n)


def test_preconditioning_equals_dense_solve():
    """P = Q_S[(Q_Sᵀ V Q_A) ⊘ (Λ+λ)]Q_Aᵀ equals solve((Q_S⊗Q_A) diag(Λ+λ) (Q_S⊗Q_A)ᵀ, vec V)."""
    g = torch.Generator().manual_seed(0)
    O, I, Q = 5, 4, 3
    q_s = torch.linalg.qr(torch.randn(O, O, generator=g, dtype=torch.float64))[0]
    q_a = torch.linalg.qr(torch.randn(I, I, generator=g, dtype=torch.float64))[0]
    lam = torch.rand(O, I, generator=g, dtype=torch.float64)
    v = torch.randn(Q, O, I, generator=g, dtype=torch.float64)
    damping = 0.05
    dense = kron_eigen_matrix(q_s, q_a, lam) + damping * torch.eye(O * I, dtype=torch.float64)
    want = torch.linalg.solve(dense, v.reshape(Q, -1).T).T.reshape(Q, O, I)
    torch.testing.assert_close(cm.precondition(v, lam, damping, q_a, q_s), want, rtol=1e-10, atol=1e-12)
    diag_want = v / (lam + damping)
    torch.testing.assert_close(cm.precondition(v, lam, damping), diag_want)


def test_eigenbasis_squares_token_and_sequence_rotation_agree():
    """The two ways of rotating (per token, per sequence) give the same Λ sums."""
    g = torch.Generator().manual_seed(1)
    for B, T, O, I in [(3, 2, 6, 5), (2, 40, 3, 4)]:  # one shape picks each path
        a = torch.randn(B, T, I, generator=g, dtype=torch.float64)
        ds = torch.randn(B, T, O, generator=g, dtype=torch.float64)
        q_a = torch.linalg.qr(torch.randn(I, I, generator=g, dtype=torch.float64))[0]
        q_s = torch.linalg.qr(torch.randn(O, O, generator=g, dtype=torch.float64))[0]
        dw = torch.einsum("bto,bti->boi", ds, a)
        want = (q_s.T @ dw @ q_a).square().sum(0)
        torch.testing.assert_close(cm.eigenbasis_squares(a, ds, q_a, q_s), want)


def test_sampled_ekfac_approaches_gauss_newton_and_beats_kfac():
    """Approximate tier. With labels sampled from the model, EK-FAC's Λ estimates
    diag((Q_S ⊗ Q_A)ᵀ G (Q_S ⊗ Q_A)) of the exact GN G (built with one backward per
    position and class). Fitting on the data repeated 200× (200 label draws per
    position) must bring Λ within 10% relative error of that diagonal (the sampling
    noise at this count is a few percent; a wrong scale or a mean-vs-sum slip is
    ≥ 20%), and the EK-FAC block must be closer to G's block than K-FAC's."""
    model = tiny_llama(vocab=8, hidden=8, mlp=12, layers=1)
    train = random_sequences(6, vocab=8, lengths=(5, 6))
    modules = resolve_modules(model, None)
    gn = lm_gauss_newton(model, modules, train)
    repeated = train * 200
    ek = li.fit_factors(model, repeated, li.FactorConfig(strategy="ekfac"), execution=li.Execution(batch_size=100))
    k = li.fit_factors(model, repeated, li.FactorConfig(strategy="kfac"), execution=li.Execution(batch_size=100))
    start = 0
    for n in modules:
        info = ek.layers[n]
        sl = slice(start, start + info.out_dim * info.in_dim)
        start = sl.stop
        block = gn[sl, sl]
        st = ek.curvature.state[n]
        basis = torch.kron(st["q_s"], st["q_a"])
        exact_lambda = torch.diagonal(basis.T @ block @ basis)
        rel_lambda = float((st["lambda"].reshape(-1) - exact_lambda).norm() / exact_lambda.norm())
        assert rel_lambda < 0.10, (n, rel_lambda)
        err_ek = (dense_factor_matrix(ek, n) - block).norm()
        err_k = (dense_factor_matrix(k, n) - block).norm()
        assert err_ek < err_k, (n, float(err_ek), float(err_k))


def test_wbar_grad_helper_matches_conv1d_layout():
    """Sanity of the reference helper itself: Conv1D's .grad is transposed into [O, I]."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(3, 4).double()
    x = torch.randn(2, 4, dtype=torch.float64)
    conv(x).sum().backward()
    g = wbar_grad(conv)
    assert g.shape == (3, 5)
    torch.testing.assert_close(g[:, :4], torch.ones(3, 2, dtype=torch.float64) @ x)


def test_covariance_sums_symmetrize_to_the_full_gram():
    """token_covariance summed over batches as the fit sums it (packed upper triangles, float64)
    and unpacked equals Σ x xᵀ, exactly symmetric; eigh_many (side-by-side one-thread
    decompositions) equals eigh64 one by one."""
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(2, 7, 530, generator=g, dtype=torch.float64)
    x2 = torch.randn(3, 5, 530, generator=g, dtype=torch.float64)
    packed = cm.packed_covariance(x1) + cm.packed_covariance(x2)  # D ≥ 512: computed in panels
    assert packed.numel() == 530 * 531 // 2
    torch.testing.assert_close(packed, cm.pack_upper(cm.token_covariance(x1) + cm.token_covariance(x2)))
    full = cm.unpack_symmetric(packed)
    want = sum(x.reshape(-1, 530).T @ x.reshape(-1, 530) for x in (x1, x2))
    torch.testing.assert_close(full, want)
    assert torch.equal(full, full.T)
    small = torch.randn(4, 3, 20, generator=g, dtype=torch.float64)
    torch.testing.assert_close(cm.unpack_symmetric(cm.packed_covariance(small)), small.reshape(-1, 20).T @ small.reshape(-1, 20))
    mats = [m @ m.T for m in torch.randn(3, 40, 40, generator=g, dtype=torch.float64)]
    for (e, q), m in zip(cm.eigh_many(mats), mats):
        e1, q1 = cm.eigh64(m)
        torch.testing.assert_close(e, e1)
        torch.testing.assert_close(q @ torch.diag(e) @ q.T, m)


def test_low_rank_factors_match_truncated_svd():
    """U diag(σ) Vᵀ from the Gram eigendecomposition equals the rank-R truncated SVD, wide and tall."""
    g = torch.Generator().manual_seed(0)
    for shape in [(3, 12, 7), (3, 7, 12)]:
        p = torch.randn(*shape, generator=g, dtype=torch.float64)
        u, s, v = cm.low_rank(p, 4)
        uu, ss, vh = torch.linalg.svd(p, full_matrices=False)
        want = uu[..., :4] @ torch.diag_embed(ss[..., :4]) @ vh[..., :4, :]
        torch.testing.assert_close((u * s.unsqueeze(1)) @ v.transpose(1, 2), want)
        torch.testing.assert_close(s, ss[..., :4])


def test_low_rank_of_a_rank_deficient_matrix_is_exact_and_finite():
    """A query of fewer tokens than R gives P of rank < R: the surplus factors are zero."""
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float64, torch.float32):
        p = (torch.randn(2, 9, 2, generator=g, dtype=dtype) @ torch.randn(2, 2, 7, generator=g, dtype=dtype))
        u, s, v = cm.low_rank(p, 5)
        assert torch.isfinite(u).all() and torch.isfinite(v).all()
        assert u.abs().max() < 10 and v.abs().max() < 10  # no 1/σ blow-up
        torch.testing.assert_close((u * s.unsqueeze(1)) @ v.transpose(1, 2), p, rtol=1e-4, atol=1e-4)


class TokenRegressionTask(ScalarRegressionTask):
    """Sequences of feature vectors {"x": [T, D], "y": [T]}, padded; L = Σ_t ½(h_t − y_t)²."""

    def collate(self, examples):
        length = max(len(e["x"]) for e in examples)
        pad = lambda t, n: torch.nn.functional.pad(t, (0, 0, 0, n) if t.dim() == 2 else (0, n))  # noqa: E731
        return {
            "x": torch.stack([pad(e["x"], length - len(e["x"])) for e in examples]),
            "y": torch.stack([pad(e["y"], length - len(e["y"])) for e in examples]),
            "mask": torch.stack([pad(torch.ones(len(e["x"])), length - len(e["x"])) for e in examples]),
        }

    def forward(self, model, batch):
        return model(batch["x"]).squeeze(-1)  # [B, T]

    def loss(self, outputs, batch):
        return (0.5 * (outputs - batch["y"]) ** 2 * batch["mask"]).sum(1)

    def sampled_loss(self, outputs, batch, generator):
        return (0.5 * (outputs - (outputs.detach() - 1.0)) ** 2 * batch["mask"]).sum(1)

    def token_mask(self, batch):
        return batch["mask"].bool()


def test_kfac_mean_length_scale_is_exact_for_independent_tokens():
    """A deep linear network applied to each token of variable-length, padded sequences:
    the per-sequence GN is Σ_t J_tᵀJ_t, so its mean over sequences is T̄·A⊗S exactly.
    Checks K-FAC's T̄ scale (and the padding mask in A and the token count) against the
    GN built from per-token Jacobians."""
    model = mlp([3, 4, 1])
    g = torch.Generator().manual_seed(0)
    data = []
    for n in range(9):
        T = int(torch.randint(1, 6, (), generator=g))
        data.append({"x": torch.randn(T, 3, generator=g, dtype=torch.float64), "y": torch.randn(T, generator=g, dtype=torch.float64)})
    factors = li.fit_factors(model, data, li.FactorConfig(strategy="kfac", modules=["*"]), task=TokenRegressionTask(), execution=li.Execution(batch_size=4))
    modules = resolve_modules(model, ["*"])
    tokens = [{"x": ex["x"][t]} for ex in data for t in range(len(ex["x"]))]
    jac = loop_gradients(model, modules, tokens, lambda m, tok: m(tok["x"].unsqueeze(0)).sum())
    for n in modules:
        rows = torch.stack([j[n].reshape(-1) for j in jac])
        gn = rows.T @ rows / len(data)  # mean over sequences of Σ_t J_tᵀ J_t
        allclose_report(dense_factor_matrix(factors, n), gn, rtol=1e-8, atol=1e-10, what=f"T̄ scale {n}")
