"""The paper's scoring procedure for large corpora (§3.2, docs/method.md §5–6), as one library call.

1. Candidates: each query's top K training sequences by TF-IDF over token ids;
   the scan scores every query against the union and keeps each query's own.
2. Scan: queries preconditioned once (rank R: query batching), the candidates
   streamed in chunks. Rank-R queries are small, so all share one pass; dense
   ones go in groups of ``Execution.query_batch_size``, each over its own candidates.
3. Re-score: each query's top and bottom M at full rank.
4. Details: per-layer (Eq 30) and per-token (Eq 31) scores of the sequences
   shown (each query's top and bottom ``top``), computed for a whole group of
   queries in one batched pass over the union of their shown sequences.

Every finished piece goes to a ``ChunkStore`` (in memory by default; the
command line keeps them on disk so that an interrupted run resumes), keyed by
the caller: a store must only ever hold pieces of one configuration.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from .. import distributed as dist
from ..config import Execution, ScoreConfig, Serializable, check_positive_int, option
from ..curvature import placement
from ..curvature.checkpoint import test_kill
from ..curvature.factors import Factors
from ..errors import ConfigError
from ..filtering.tfidf import TfidfIndex
from ..passes import half_autocast, model_device, run_pass, tracking
from ..progress import progress
from ..task.base import Task
from .contract import LayerQueries, layer_scores
from .pairwise import _size, _sizes, precondition_queries, score_preconditioned

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TwoStageConfig(Serializable):
    """The two-stage procedure's settings (the scan's rank is ``ScoreConfig.query_rank``).

    Attributes:
        candidates: score only each query's top K sequences by TF-IDF (None: all).
        rescore_top: re-score each query's top and bottom M of the scan at full rank.
        top: sequences shown per query, most positive and most negative, with details.
    """

    candidates: int | None = option(None, "score only each query's top K sequences by TF-IDF (default: all)")
    rescore_top: int | None = option(None, "re-score each query's top and bottom M of the scan at full rank (needs --rank)")
    top: int = option(10, "sequences shown per query, most positive and most negative")

    def __post_init__(self) -> None:
        check_positive_int("candidates", self.candidates, allow_none=True)
        check_positive_int("rescore_top", self.rescore_top, allow_none=True)
        check_positive_int("top", self.top)
        if self.rescore_top is not None and self.rescore_top < self.top:
            raise ConfigError(f"rescore_top ({self.rescore_top}) must be at least top ({self.top}): the shown sequences come from the re-scored ones")

    def check(self, config: ScoreConfig) -> None:
        """Refuse combinations with the score settings that mean nothing."""
        if self.rescore_top is not None and config.query_rank is None:
            raise ConfigError("rescore_top re-scores a low-rank scan at full rank: it needs a query rank (--rank)")


class ChunkStore(Protocol):
    """Where finished pieces of a run are kept (and found again on resume)."""

    def get(self, name: str) -> dict[str, np.ndarray] | None:
        """The arrays saved under ``name``, or None."""

    def put(self, name: str, arrays: dict[str, np.ndarray]) -> None:
        """Save ``arrays`` under ``name`` (atomically, for a store on disk)."""


class MemoryStore:
    """A ChunkStore in a dict: nothing survives the process."""

    def __init__(self) -> None:
        self.items: dict[str, dict[str, np.ndarray]] = {}

    def get(self, name: str) -> dict[str, np.ndarray] | None:
        return self.items.get(name)

    def put(self, name: str, arrays: dict[str, np.ndarray]) -> None:
        self.items[name] = dict(arrays)


@dataclass
class Shown:
    """The sequences shown for one query with their details.

    Attributes:
        indices: [n] training-sequence indices, best first, then the most negative.
        ranks: [n] 1..k for the top, -1..-k for the bottom.
        total: [n] scores (full rank after a re-score).
        per_layer: layer name → [n] (Eq 30).
        per_token: [n, T] (Eq 31), token t's term on input position t; padding 0.
    """

    indices: np.ndarray
    ranks: np.ndarray
    total: np.ndarray
    per_layer: dict[str, np.ndarray]
    per_token: np.ndarray


@dataclass
class TwoStageResult:
    """What the procedure found.

    Attributes:
        columns: [U] the training-sequence indices scored for some query (the union of candidates).
        first: [Q, U] scan scores; NaN where the sequence is not one of the query's candidates.
        final: [Q, U] ``first`` with each query's re-scored sequences replaced by their full-rank scores.
        tfidf: [Q, U] TF-IDF scores of the candidates (None without candidate filtering).
        shown: per query, the sequences shown with their details.
        meta: damping per layer, strategy, scale note (as ``Scores.meta``).
    """

    columns: np.ndarray
    first: np.ndarray
    final: np.ndarray
    tfidf: np.ndarray | None
    shown: list[Shown]
    meta: dict[str, Any] = field(default_factory=dict)


class _Subset:
    """Some examples of an indexable dataset, in a given order."""

    def __init__(self, data: Any, indices: np.ndarray) -> None:
        self.data, self.indices = data, np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.data[int(self.indices[i])]

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def subset(data: Any, indices: Sequence[int] | np.ndarray) -> Any:
    """``data`` restricted to ``indices`` (the data's own ``subset`` when it has one)."""
    return data.subset(indices) if hasattr(data, "subset") else _Subset(data, np.asarray(indices))


def token_ids(example: Mapping[str, Any]) -> list[int]:
    return [int(t) for t in torch.as_tensor(example["input_ids"]).tolist()]


def select_candidates(
    index: TfidfIndex | None, train: Any, queries: Sequence[Mapping[str, Any]], k: int | None
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """(union of candidate indices [U], TF-IDF scores [Q, U] or None, mask [Q, U] of each query's own candidates)."""
    Q, N = len(queries), len(train)
    if k is None or k >= N:
        return np.arange(N), None, np.ones((Q, N), dtype=bool)
    if index is None:
        index = TfidfIndex.build(token_ids(ex) for ex in train)
    if index.num_docs != N:
        raise ConfigError(f"the TF-IDF index covers {index.num_docs} sequences but the training set has {N}")
    values, idx = index.top_k([token_ids(ex) for ex in queries], k)
    union = np.unique(idx)
    pos = np.searchsorted(union, idx)
    rows = np.arange(Q)[:, None]
    mask = np.zeros((Q, len(union)), dtype=bool)
    tfidf = np.full((Q, len(union)), np.nan)
    mask[rows, pos] = True
    tfidf[rows, pos] = values
    return union, tfidf, mask


def ends(row: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Columns of the k largest finite scores (largest first) and of the k most negative ones (most negative first).

    Ties go to the lower column; a sequence is among the most negative only if its score is below 0.
    """
    valid = np.flatnonzero(np.isfinite(row))
    order = valid[np.lexsort((valid, -row[valid]))]
    top = order[:k]
    rest = order[k:][::-1]
    return top, rest[row[rest] < 0][:k]


def _groups(n: int, size: int) -> list[np.ndarray]:
    return [np.arange(i, min(i + size, n)) for i in range(0, n, size)]


_DTYPES = {str(t): t for t in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}
_FIELDS = ("dense", "u", "s", "v")


def _share(local: dict[str, LayerQueries] | None, positions: list[int], layers: list[str], device: torch.device) -> dict[str, LayerQueries]:
    """Every rank's preconditioned queries on every rank (on ``device``), in query order (each rank computed ``positions``)."""
    # collectives send a tensor's storage: a view (a rank-R factor from LayerQueries.concat) goes as a contiguous copy
    fields_of = None if local is None else {n: {f: t.contiguous() for f in _FIELDS if (t := getattr(local[n], f)) is not None} for n in layers}
    shapes = None if fields_of is None else {n: {f: (tuple(t.shape), str(t.dtype)) for f, t in fs.items()} for n, fs in fields_of.items()}
    metas = dist.all_gather_objects(shapes)
    order = np.concatenate([np.asarray(p, dtype=np.int64) for p in dist.all_gather_objects(positions)])
    pieces: dict[str, list[LayerQueries]] = {n: [] for n in layers}
    for r, meta in enumerate(metas):
        if meta is None:
            continue
        for n in layers:
            received = {}
            for f, (shape, dtype) in meta[n].items():
                mine = fields_of is not None and r == dist.rank()
                t = fields_of[n][f] if fields_of is not None and mine else torch.empty(shape, dtype=_DTYPES[dtype], device=device)
                dist.broadcast_([t], src=r)
                received[f] = t
            pieces[n].append(LayerQueries(**received))
    back = torch.as_tensor(np.argsort(order))  # concatenated in rank order; back to the queries' order
    return {n: LayerQueries.concat(ps).select(back) for n, ps in pieces.items()}


def _tag(groups: list[np.ndarray]) -> str:
    """The query grouping in a piece's name: a rerun with another query batch size must not read pieces of other groups."""
    return f"q{len(groups[0]) if groups else 0}"


class _Run:
    """One two-stage computation: the shared arguments of its steps.

    Under ``torch.distributed`` every step splits its work over the ranks (chunks of the scan,
    query groups of the re-score and the details), each rank saves the pieces it computed, and
    all ranks end with every piece, so they return the same result.
    """

    def __init__(self, model, factors, queries, train, config, stages, task, execution, store, chunk_size) -> None:
        self.model, self.factors, self.queries, self.train = model, factors, queries, train
        self.config, self.stages, self.task, self.execution = config, stages, task, execution
        self.store = store
        self.chunk_size = chunk_size
        self.residuals: dict[int, list[float]] = {}  # query → relative residual per refinement step
        self.saved = 0  # pieces this process saved (the crash-safety tests' kill point "chunk:n")

    def _config(self, rank: int | None) -> ScoreConfig:
        """The caller's settings (damping, algorithm, refinement) at query rank ``rank``, without details."""
        return dataclasses.replace(self.config, query_rank=rank, per_layer=False, per_token=False)

    def precondition(self, qs: np.ndarray, rank: int | None, *, shared: bool = False) -> dict[str, LayerQueries]:
        """The queries ``qs`` preconditioned (rank-``rank`` factors or dense).

        ``shared`` (call it on every rank): each rank preconditions its share of ``qs`` once and
        broadcasts it, so all ranks hold all of them.
        """
        cfg = self._config(rank)

        def local(idx: np.ndarray) -> dict[str, LayerQueries]:
            meta: dict[str, Any] = {}
            out = precondition_queries(
                self.model, self.factors, [self.queries[i] for i in idx], cfg, task=self.task, execution=self.execution,
                curvature_data=self.train, meta=meta,
            )  # fmt: skip
            for j, q in enumerate(idx):  # the refinement's residuals of each query, from its latest solve here
                if "refine" in meta:
                    self.residuals[int(q)] = meta["refine"]["residual_by_step"][j]
            return out

        if not (shared and dist.active()):
            return local(qs)
        positions = dist.shard(list(range(len(qs))))
        with dist.checked():
            mine = local(qs[positions]) if positions else None
        return _share(mine, positions, list(self.factors.layers), model_device(self.model))

    def score(self, pq: dict[str, LayerQueries], rank: int | None, rows: np.ndarray) -> np.ndarray:
        cfg = self._config(rank)
        out = score_preconditioned(self.model, self.factors, pq, subset(self.train, rows), cfg, task=self.task, execution=self.execution)
        return out.total.double().numpy()

    def _missing(self, names: list[str], what: str) -> list[str]:
        """Which pieces no earlier run saved (rank 0 decides, so that every rank agrees)."""
        missing = dist.broadcast_object([n for n in names if self.store.get(n) is None] if dist.is_main() else None)
        if len(missing) < len(names):
            logger.info("%s: %d of %d chunks already done", what, len(names) - len(missing), len(names))
        return missing

    def _compute(self, todo: list[tuple[str, Any]]) -> dict[str, dict[str, np.ndarray]]:
        """Compute this rank's share of ``todo`` (name, thunk), save it, and return every rank's pieces."""
        mine: dict[str, dict[str, np.ndarray]] = {}
        with dist.checked():
            for i, (name, make) in enumerate(todo):
                if dist.owner(i) == dist.rank():
                    mine[name] = make()
                    self.store.put(name, mine[name])
                    self.saved += 1
                    test_kill("chunk", self.saved)
        out: dict[str, dict[str, np.ndarray]] = {}
        for part in dist.all_gather_objects(mine):
            out.update(part)
        return out

    def _pieces(self, names: list[str], todo: list[tuple[str, Any]]) -> dict[str, dict[str, np.ndarray]]:
        """The saved pieces of ``names`` plus the ones computed now."""
        done = self._compute(todo)
        return {n: done[n] if n in done else self.store.get(n) for n in names}

    def scan(self, union: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """First-stage scores [Q, U]; NaN where ``mask`` is False."""
        Q = len(self.queries)
        rank = self.config.query_rank
        groups = [np.arange(Q)] if rank is not None else _groups(Q, self.execution.query_batch_size)
        out = np.full((Q, len(union)), np.nan)
        columns = [np.flatnonzero(mask[qs].any(axis=0)) for qs in groups]
        with progress(sum(len(c) for c in columns) if dist.is_main() else None, "scan (all chunks)", "seq", leave=True) as bar:
            for g, (qs, cols) in enumerate(zip(groups, columns)):
                chunks = {f"scan-{_tag(groups)}-{g:04d}-{c:010d}": cols[c : c + self.chunk_size] for c in range(0, len(cols), self.chunk_size)}
                missing = self._missing(list(chunks), f"scan, query group {g}")
                pq = self.precondition(qs, rank, shared=True) if missing else None

                def make(part: np.ndarray, pq: Any = pq) -> Any:
                    return lambda: {"scores": self.score(pq, rank, union[part])}

                pieces = self._pieces(list(chunks), [(name, make(chunks[name])) for name in missing])
                for name, part in chunks.items():
                    keep = mask[qs][:, part]
                    out[np.ix_(qs, part)] = np.where(keep, pieces[name]["scores"], np.nan)
                    bar.update(len(part))
        return out

    def rescore(self, union: np.ndarray, first: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(final [Q, U], choice [Q, U]): each query's top and bottom M at full rank; ``choice`` holds only those."""
        final, choice = first.copy(), np.full_like(first, np.nan)
        m = self.stages.rescore_top
        assert m is not None  # rescore() runs only with rescore_top
        groups = _groups(len(self.queries), self.execution.query_batch_size)
        names = [f"rescore-{_tag(groups)}-{g:04d}" for g in range(len(groups))]

        def make(qs: np.ndarray) -> Any:
            def run() -> dict[str, np.ndarray]:
                idx = np.unique(np.concatenate([np.concatenate(ends(first[q], m)) for q in qs]))
                return {"idx": idx, "scores": self.score(self.precondition(qs, None), None, union[idx])}

            return run

        pieces = self._pieces(names, [(n, make(groups[names.index(n)])) for n in self._missing(names, "re-score")])
        for name, qs in zip(names, groups):
            idx, block = pieces[name]["idx"], pieces[name]["scores"]
            for j, q in enumerate(qs):
                # this query's own ends only: the group's union must not change what is shown
                keep = np.isin(idx, np.concatenate(ends(first[q], m)))
                final[q, idx[keep]] = block[j, keep]
                choice[q, idx[keep]] = block[j, keep]
        return final, choice

    def details(self, union: np.ndarray, choice: np.ndarray, rank: int | None) -> list[Shown]:
        """Each query's shown sequences with per-layer and per-token scores, one batched pass per query group."""
        top = self.stages.top
        groups = _groups(len(self.queries), self.execution.query_batch_size)
        names = [f"details-{_tag(groups)}-{g:04d}" for g in range(len(groups))]
        picks = [[ends(choice[q], top) for q in qs] for qs in groups]

        def make(g: int) -> Any:
            def run() -> dict[str, np.ndarray]:
                rows = [union[np.concatenate(p)] for p in picks[g]]
                pq = self.precondition(groups[g], rank)
                return shown_details(self.model, self.factors, pq, rows, self.train, task=self.task, execution=self.execution)

            return run

        pieces = self._pieces(names, [(n, make(names.index(n))) for n in self._missing(names, "details")])
        shown: list[Shown] = []
        for g, name in enumerate(names):
            arrays = pieces[name]
            layers = [str(n) for n in arrays["layers"]]
            for j, (t, b) in enumerate(picks[g]):
                n = len(t) + len(b)  # the store is keyed by the caller: a saved chunk has exactly these rows
                rows = slice(int(arrays["offsets"][j]), int(arrays["offsets"][j]) + n)
                shown.append(
                    Shown(
                        indices=union[np.concatenate([t, b])],
                        ranks=np.concatenate([np.arange(1, len(t) + 1), -np.arange(1, len(b) + 1)]),
                        total=arrays["total"][rows],
                        per_layer={layer: arrays["per_layer"][i, rows] for i, layer in enumerate(layers)},
                        per_token=arrays["per_token"][rows],
                    )
                )
        return shown


def shown_details(
    model: nn.Module,
    factors: Factors,
    preconditioned: Mapping[str, LayerQueries],
    rows: Sequence[np.ndarray],
    train: Any,
    *,
    task: Task | None = None,
    execution: Execution = Execution(),
) -> dict[str, np.ndarray]:
    """Per-layer and per-token scores of each query against its own sequences only, in one batched pass.

    Args:
        preconditioned: the Q queries' preconditioned gradients (dense or rank-R).
        rows: per query, the training-sequence indices to score it against.
        train: the indexable training set.

    Returns:
        ``offsets`` [Q + 1] (query j's rows are offsets[j]:offsets[j+1], in the order of ``rows[j]``),
        ``total`` [n], ``per_layer`` [L, n], ``layers`` [L], ``per_token`` [n, T] (zero-padded).
    The pass runs the model once over the union of all rows; each query is contracted only with
    its own sequences (no query × union product).
    """
    from ..task.causal_lm import CausalLMTask
    from .pairwise import _setup

    task = task or CausalLMTask()
    modules, _, _, _ = _setup(model, factors, ScoreConfig(), task)
    layers = list(modules)
    if execution.batch_size is None:  # left automatic: from the memory plan
        execution, _ = _sizes(model, factors, ScoreConfig(), execution, task, train=train, stages=("score",), preconditioned=True)
    union = np.unique(np.concatenate(rows)) if rows else np.zeros(0, dtype=np.int64)
    where = {int(s): i for i, s in enumerate(union)}  # sequence → position in the pass
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    n = int(offsets[-1])
    per_layer = np.zeros((len(layers), n))
    token_parts: dict[int, np.ndarray] = {}  # output row → per-token scores
    members = [np.asarray([where[int(s)] for s in r], dtype=np.int64) for r in rows]  # positions in the pass
    start = 0
    with tracking(model, modules) as col:
        for bc in run_pass(model, task, col, subset(train, union), _size(execution.batch_size), "true", autocast=half_autocast(model), desc="details"):
            stop = start + bc.num_sequences
            for j, pos in enumerate(members):
                hit = np.flatnonzero((pos >= start) & (pos < stop))
                if not len(hit):
                    continue
                local = torch.as_tensor(pos[hit] - start)
                tokens = torch.zeros(0)
                for li, name in enumerate(layers):
                    cap = bc.captures[name]
                    lq = preconditioned[name].select([j])
                    algorithm = "project_low_rank" if lq.is_low_rank else "project"
                    tot, tok = layer_scores(lq, cap.a[local.to(cap.a.device)], cap.ds[local.to(cap.ds.device)], algorithm)
                    per_layer[li, offsets[j] + hit] = tot[0].double().cpu().numpy()
                    assert tok is not None  # "project" always returns per-token scores
                    part = tok[0].double().cpu()  # [h, T]
                    tokens = part if li == 0 else tokens + part
                for h, t in zip(hit, tokens):
                    token_parts[int(offsets[j] + h)] = t.numpy()
            start = stop
    length = max((len(t) for t in token_parts.values()), default=0)
    per_token = np.zeros((n, length))
    for r, t in token_parts.items():
        per_token[r, : len(t)] = t
    return {"offsets": offsets, "total": per_layer.sum(0), "per_layer": per_layer, "layers": np.asarray(layers), "per_token": per_token}


def two_stage_scores(
    model: nn.Module,
    factors: Factors,
    queries: Iterable[Mapping[str, Any]],
    train: Any,
    config: ScoreConfig = ScoreConfig(),
    stages: TwoStageConfig = TwoStageConfig(),
    *,
    task: Task | None = None,
    execution: Execution = Execution(),
    store: ChunkStore | None = None,
    index: TfidfIndex | None = None,
    chunk_size: int = 1024,
) -> TwoStageResult:
    """TF-IDF candidates → rank-R scan → full-rank re-score of each query's ends → details of the shown.

    Args:
        model, factors: as for ``compute_scores``.
        queries: query examples (``examples_from_pairs``).
        train: the indexable training set (a list, a ``SequenceStore``, a ``datasets.Dataset``).
        config: damping, the scan's rank (``query_rank``) and the contraction algorithm.
        stages: candidates, re-score size and how many sequences to show.
        execution: batch sizes; dense queries are scanned and re-scored ``query_batch_size`` at a time.
        store: where finished chunks go (and are found again); keyed by the caller.
        index: a prebuilt TF-IDF index over ``train``'s token ids (built here when needed and None).
        chunk_size: sequences per stored chunk of the scan (the unit of resuming).
    """
    from ..task.causal_lm import CausalLMTask

    stages.check(config)
    check_positive_int("chunk_size", chunk_size)
    if placement.by_layer(factors.curvature):  # its ranks score different chunks: captures cannot meet at the layers' owners
        raise placement.refuse("two_stage_scores")
    queries = list(queries)
    if not queries:
        raise ConfigError("no queries to score")
    if not (hasattr(train, "__getitem__") and hasattr(train, "__len__")):
        train = list(train)
    task = task or CausalLMTask()
    if execution.batch_size is None or execution.query_batch_size is None:  # sizes left automatic: from the memory plan
        execution, _ = _sizes(model, factors, config, execution, task, train=train, queries=queries, stages=("precondition", "score"))
        # each rank planned from its own free memory: rank 0's sizes for all, so that every rank forms the same
        # query groups, pieces and collectives
        execution = dist.broadcast_object(execution)
    run = _Run(model, factors, queries, train, config, stages, task, execution, store or MemoryStore(), chunk_size)
    union, tfidf, mask = select_candidates(index, train, queries, stages.candidates)
    first = run.scan(union, mask)
    if stages.rescore_top:
        final, choice = run.rescore(union, first)
        detail_rank = None
    else:
        final, choice, detail_rank = first, first, config.query_rank
    shown = run.details(union, choice, detail_rank)
    from .pairwise import SCALE_NOTE, layer_dampings

    meta: dict[str, Any] = {"strategy": factors.strategy, "damping": layer_dampings(factors, config), "query_rank": config.query_rank,
            "train_size": factors.num_sequences, "scale": SCALE_NOTE}  # fmt: skip
    if config.refine != "none":  # residuals of the queries this process solved (under torchrun, its share)
        steps = [run.residuals.get(q) for q in range(len(queries))]
        meta["refine"] = {"method": config.refine, "steps": config.refine_steps, "sample": config.refine_sample,
                          "residual_start": [r[0] if r else None for r in steps], "residual": [r[-1] if r else None for r in steps]}  # fmt: skip
    return TwoStageResult(columns=union, first=first, final=final, tfidf=tfidf, shown=shown, meta=meta)


__all__ = ["TwoStageConfig", "TwoStageResult", "Shown", "ChunkStore", "MemoryStore", "two_stage_scores", "shown_details", "select_candidates", "ends", "subset"]
