"""Every compression at every size from the same captured pass, contracted with the queries as the pass goes.

The selections that nest across sizes are computed once per batch at the
largest size and cut down (a per-sequence top-k is a prefix of the sorted
top-k_max; a rank-r SVD a prefix of the rank-r_max one); R = Q_Sᵀ DW Q_A is
computed once per batch and layer. Every stored array goes through the
library's ``pack``/``unpack`` (float16 rounding included) and is scored by the
library's codec, except the SVDs: their ranks are scored from one running
reconstruction R̂_r (grown rank slice by rank slice, contracted at each size),
where the codec would rebuild R̂ for every size. On the first batch each
shortcut is checked against the codec's own ``encode`` and ``score``.
"""

from __future__ import annotations

import numpy as np
import torch

from lminfluence.config import ScoreConfig
from lminfluence.curvature.factors import tracked_modules
from lminfluence.curvature.math import sequence_gradients
from lminfluence.index.codecs import LayerBasis, QueryGradients, pack, truncated_svd, unpack
from lminfluence.index.config import IndexConfig
from lminfluence.index.plan import STORAGE_DTYPES, IndexPlan
from lminfluence.passes import run_pass, tracking
from lminfluence.scoring.pairwise import layer_dampings
from lminfluence.task.causal_lm import CausalLMTask

NESTED_RANKS = ("svd", "whitened_svd")  # methods whose sizes are prefixes of one factorisation


def ranks(x: np.ndarray) -> np.ndarray:
    r = np.empty(len(x))
    r[np.argsort(x, kind="stable")] = np.arange(len(x))
    return r


def fidelity(approx: np.ndarray, ref: np.ndarray, rescore: int = 50) -> dict[str, float]:
    """Per query (row): Pearson, Spearman, top-10 and top-100 overlap with ``ref``; mean and min over queries.

    Also the two-stage view: the top-10 overlap after each query's top ``rescore`` by ``approx`` are
    re-scored exactly (``rescored_top10``), and the share of sequences that re-scoring must read (``reread``).
    """
    per: dict[str, list[float]] = {"pearson": [], "spearman": [], "top10": [], "top100": [], "rescored_top10": []}
    shortlisted = set()
    for a, r in zip(approx, ref):
        per["pearson"].append(float(np.corrcoef(a, r)[0, 1]))
        per["spearman"].append(float(np.corrcoef(ranks(a), ranks(r))[0, 1]))
        for k in (10, 100):
            k_ = min(k, len(r))
            per[f"top{k}"].append(len(np.intersect1d(np.argsort(-a)[:k_], np.argsort(-r)[:k_])) / k_)
        short = np.argsort(-a)[:rescore]
        shortlisted.update(short.tolist())
        best = short[np.argsort(-r[short])][:10]
        per["rescored_top10"].append(len(np.intersect1d(best, np.argsort(-r)[:10])) / 10)
    out = {"reread": len(shortlisted) / ref.shape[1]}
    for key, values in per.items():
        out[key], out[f"{key}_min"] = float(np.mean(values)), float(np.min(values))
    return out


class Sweep:
    """Scores of every (method, reduction) for the queries, filled in by ``observe`` during one training pass."""

    def __init__(self, model, factors, queries, methods, reductions, dtype: str, execution, keep_m: bool = False) -> None:
        self.factors, self.methods, self.reductions = factors, methods, reductions
        self.dtype = STORAGE_DTYPES[dtype]
        self.plans = {(m, r): IndexPlan.of(factors, IndexConfig(method=m, reduction=r, dtype=dtype)) for m in methods for r in reductions}
        self.full_bytes = next(iter(self.plans.values())).full_bytes_per_sequence
        modules = tracked_modules(model, factors)
        dampings = layer_dampings(factors, ScoreConfig())
        batches = []
        with tracking(model, modules) as col:
            for bc in run_pass(model, CausalLMTask(), col, queries, execution.query_batch_size, "measurement", desc="queries"):
                batches.append({n: (c.a.detach(), c.ds.detach()) for n, c in bc.captures.items()})
        self.bases: dict[str, LayerBasis] = {}
        self.query_batches = batches  # the queries' captures: M is recomputed per training batch unless keep_m
        self.keep_m, self._m = keep_m, {}
        self.dampings = dampings
        self.random_queries: dict[tuple[float, str], torch.Tensor] = {}
        for name in modules:
            self.bases[name] = LayerBasis.of(factors.curvature, name, batches[0][name][0])
            grads = self.grads(name) if "random" in methods else []  # P of the queries computed once for every size
            for r in reductions if "random" in methods else ():
                plan = self.plans[("random", r)]
                self.random_queries[(r, name)] = torch.cat([plan.codecs[name].prepare(g, plan.aux[name]) for g in grads])
        # the queries' tokens rotated into the eigenbasis, once: M = (Σ_t x_t y_tᵀ) ⊘ (Λ + λ) is then cheap per batch
        self.query_tokens = {n: [self._rotate(n, a, ds) for a, ds in (b[n] for b in batches)] for n in modules}
        if "eigen_topk" in methods:  # one selection weight per layer, shared by every size
            first = self.plans[("eigen_topk", reductions[0])].aux
            for r in reductions:
                self.plans[("eigen_topk", r)].aux = first
        self.num_queries = sum(b[next(iter(b))][0].shape[0] for b in batches)
        self.reference: np.ndarray | None = None
        self.scores: dict[tuple[str, float], np.ndarray] = {}
        self.checked = False
        self.n = 0

    def grads(self, name: str) -> list[QueryGradients]:
        return [QueryGradients(b[name][0], b[name][1], self.bases[name], self.dampings[name]) for b in self.query_batches]

    def _rotate(self, name: str, a: torch.Tensor, ds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ā Q_A [B, T, I], ds Q_S [B, T, O]): R = Σ_t (ds_t Q_S)ᵀ(ā_t Q_A)."""
        basis = self.bases[name]
        return (a, ds) if basis.q_a is None else (a @ basis.q_a, ds @ basis.q_s)

    def m(self, name: str) -> torch.Tensor:
        """M = (Q_Sᵀ V Q_A) ⊘ (Λ + λ) of every query, [Q, O·I]: kept once computed when ``keep_m`` (memory for time)."""
        if name in self._m:
            return self._m[name]
        denom = self.bases[name].lam + self.dampings[name]
        m = torch.cat([(sequence_gradients(a, ds) / denom).reshape(a.shape[0], -1) for a, ds in self.query_tokens[name]])
        if self.keep_m:
            self._m[name] = m
        return m

    def _grow(self, n: int) -> None:
        if self.reference is None or self.reference.shape[1] < n:
            old = 0 if self.reference is None else self.reference.shape[1]
            pad = ((0, 0), (0, max(n, 2 * old) - old))
            self.reference = np.pad(np.zeros((self.num_queries, 0)) if self.reference is None else self.reference, pad)
            self.scores = {k: np.pad(self.scores.get(k, np.zeros((self.num_queries, old))), pad) for k in self.plans}

    def _store(self, arrays: dict[str, torch.Tensor], like: torch.Tensor) -> dict[str, torch.Tensor]:
        return unpack(pack(arrays, self.dtype), like.dtype)

    def observe(self, rows: np.ndarray, captures) -> None:
        self.n = max(self.n, int(rows[-1]) + 1)
        self._grow(self.n)
        for name, cap in captures.items():
            basis, m = self.bases[name], self.m(name)
            a_rot, ds_rot = self._rotate(name, cap.a, cap.ds)
            r_full = sequence_gradients(a_rot, ds_rot).reshape(cap.a.shape[0], -1)  # R [B, O·I]
            self.reference[:, rows] += (m @ r_full.T).double().numpy()
            for (method, red), arrays, prepared in self._encodings(name, cap, basis, r_full, m, a_rot, ds_rot):
                if method in NESTED_RANKS:  # every rank's score from one running reconstruction
                    for red_, score in self._nested_svd_scores(method, name, arrays, prepared):
                        self.scores[(method, red_)][:, rows] += score.double().numpy()
                else:
                    self.scores[(method, red)][:, rows] += self.plans[(method, red)].codecs[name].score(prepared, arrays).double().numpy()
        self.checked = True

    def _encodings(self, name, cap, basis, r_full, m, a_rot, ds_rot):
        """((method, reduction), stored arrays, prepared queries) of every compression for one layer and batch."""
        if "eigen" in self.methods:
            for red in self.reductions:
                coords = self.plans[("eigen", red)].aux[name]["coords"]
                yield self._checked("eigen", red, name, cap, basis, {"values": r_full[:, coords]}, m[:, coords])
        if "eigen_topk" in self.methods:
            codecs = {red: self.plans[("eigen_topk", red)].codecs[name] for red in self.reductions}
            aux = self.plans[("eigen_topk", self.reductions[0])].aux[name]
            top = codecs[self.reductions[0]].select(r_full, aux, max(c.k for c in codecs.values()))  # largest weight first
            m_t = m.T.contiguous()  # the codec's prepare
            for red, codec in codecs.items():
                yield self._checked("eigen_topk", red, name, cap, basis, codec.arrays(r_full, top[:, : codec.k]), m_t)
        if "svd" in self.methods:
            big = self._largest("svd", name)
            u, s, v = truncated_svd(a_rot, ds_rot, self._rank("svd", big, name))  # the SVD of R: DW's, rotated
            yield self._ranked("svd", big, name, cap, basis, {"u": u, "s": s, "v": v}, m)
        if "whitened_svd" in self.methods:
            aux = self.plans[("whitened_svd", self.reductions[0])].aux[name]
            alpha, beta = aux["alpha"].to(a_rot.dtype), aux["beta"].to(a_rot.dtype)
            big = self._largest("whitened_svd", name)
            u, s, v = truncated_svd(a_rot * beta, ds_rot * alpha, self._rank("whitened_svd", big, name))
            prepared = m / torch.outer(alpha, beta).reshape(-1)  # the codec's prepare, from M
            yield self._ranked("whitened_svd", big, name, cap, basis, {"u": u, "s": s, "v": v}, prepared)
        if "random" in self.methods:
            for red in self.reductions:
                plan = self.plans[("random", red)]
                arrays = plan.codecs[name].encode(cap.a, cap.ds, basis, plan.aux[name])
                yield ("random", red), self._store(arrays, r_full), self.random_queries[(red, name)]

    def _rank(self, method: str, red: float, name: str) -> int:
        return self.plans[(method, red)].codecs[name].r

    def _largest(self, method: str, name: str) -> float:
        """The reduction of ``method``'s largest rank for this layer."""
        return max(self.reductions, key=lambda red: self._rank(method, red, name))

    def _ranked(self, method, big, name, cap, basis, full, prepared):
        """The largest rank's stored factors (the others are their prefixes), each smaller rank checked on the first batch."""
        for red in self.reductions if not self.checked else ():
            r = self._rank(method, red, name)
            if red != big:
                self._checked(method, red, name, cap, basis, {"u": full["u"][..., :r], "s": full["s"][:, :r], "v": full["v"][..., :r]}, prepared)
        return self._checked(method, big, name, cap, basis, full, prepared)

    def _checked(self, method, red, name, cap, basis, arrays, prepared):
        """The shortcut's stored arrays, compared on the first batch with what the codec's own encode stores."""
        stored = self._store(arrays, cap.a)
        if not self.checked:
            plan = self.plans[(method, red)]
            codec = plan.codecs[name]
            own = codec.score(prepared, self._store(codec.encode(cap.a, cap.ds, basis, plan.aux[name]), cap.a))
            mine = codec.score(prepared, stored)
            err = float((own - mine).abs().max() / own.abs().max().clamp_min(1e-30))
            if err > 1e-2:
                raise AssertionError(f"{method} 1/{red:g} {name}: the sweep's shortcut differs from the codec's encode by {err:.1e}")
        return (method, red), stored, prepared

    def _nested_svd_scores(self, method, name, arrays, prepared):
        """(reduction, scores [Q, B]) of every rank of ``method``, from the largest rank's stored factors.

        Stored factors are elementwise roundings, so a rank-r codec's arrays are the first r columns of the
        largest's; R̂_r = Σ_{j<r} σ_j u_j v_jᵀ is grown one slice of ranks at a time and contracted at each
        rank (the codec's ``score`` would rebuild R̂ from scratch for every size).
        """
        u, s, v = arrays["u"].to(prepared.dtype), arrays["s"].to(prepared.dtype), arrays["v"].to(prepared.dtype)
        by_rank = sorted((self._rank(method, red, name), red) for red in self.reductions)
        r_hat = torch.zeros(u.shape[0], u.shape[1], v.shape[1], dtype=prepared.dtype, device=u.device)
        done = 0
        for r, red in by_rank:
            if r > done:
                r_hat += (u[..., done:r] * s[:, None, done:r]) @ v[..., done:r].transpose(1, 2)
                done = r
            score = prepared @ r_hat.reshape(r_hat.shape[0], -1).T
            if not self.checked:  # the running sum against the codec's own score of the rank-r prefix
                own = self.plans[(method, red)].codecs[name].score(prepared, {"u": u[..., :r], "s": s[:, :r], "v": v[..., :r]})
                err = float((own - score).abs().max() / own.abs().max().clamp_min(1e-30))
                if err > 1e-4:
                    raise AssertionError(f"{method} 1/{red:g} {name}: the nested score differs from the codec's by {err:.1e}")
            yield red, score

    def table(self) -> list[dict]:
        n = self.n
        ref = self.reference[:, :n]
        rows = []
        for (method, red), plan in self.plans.items():
            row = {"method": method, "reduction": red, "bytes": plan.bytes_per_sequence, "full_over_bytes": self.full_bytes / plan.bytes_per_sequence}
            rows.append({**row, **fidelity(self.scores[(method, red)][:, :n], ref)})
        return rows
