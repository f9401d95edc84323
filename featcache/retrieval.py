"""Exact retrieval and the GUIEC / UnED retrieval metrics.

Search is exact inner-product top-k with faiss ``IndexFlatIP`` (on L2-normalised embeddings this
is the same ranking as Euclidean distance, which is what the GUIEC leaderboard used). It runs in
blocks of queries and, when the index is large, in index shards whose results are merged exactly,
so that the temporary memory stays under ``max_memory`` at any index size.

Ranking guarantee of :func:`search`
-----------------------------------
For every query the result is exactly the first ``k`` rows of the whole index (the query's own row
``self_ids[i]`` removed, by identity) in the order ``(-score, id)``: higher score first, and among
equal scores the lower index id first -- including ties that straddle the k-th position. faiss
itself keeps an arbitrary member of a tie, so each query retrieves a few extra candidates, sorts
them on ``(-score, id)``, and when the k-th kept score still equals the worst candidate's score
(the tie may continue past what faiss returned) that query is searched again with twice as many
candidates, until the boundary is resolved or the whole index is a candidate. "Equal" means equal
float32 scores as faiss computes them; bitwise-identical rows in one index shard always score the
same, but faiss may sum a dot product in a different order in different code paths (BLAS vs its
own SIMD kernels, chosen by block size), so identical rows that fall in different shards can differ
in the last bit, and are then ordered by that score.

Metrics (REFERENCES.md, "Metrics"); n_q = relevant index rows for query q (itself excluded),
m_q = min(n_q, k), rel_q(j) = 1 if the j-th neighbour is relevant, P(j) = precision at j:

- ``mMP@k`` (GUIEC "mMP@5"): (1/m_q) sum_{j <= m_q} rel_q(j)
- ``mAP@k`` (UnED "mAP@5"):  (1/m_q) sum_{j <= k} P(j) rel_q(j)
- ``R@1``: rel_q(1)

Queries with n_q = 0 are excluded from every mean and counted as ``excluded``.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "l2_normalize",
    "search",
    "relevance",
    "count_relevant",
    "QueryMetrics",
    "query_metrics",
    "summarize",
    "evaluate",
    "PROTOCOLS",
]

PROTOCOLS = ("guiec", "uned")

_CHUNK_ROWS = 1 << 16  # rows per chunk for finiteness checks and normalisation
_EXTRA_CANDIDATES_MIN = 4  # candidates searched beyond k (+1 for self) to settle boundary ties
# faiss's BLAS path works through 4096 x database_bs distance tiles, with an OpenMP fork/join (the
# sgemm, then the heap updates) per tile. Its default database_bs of 1024 means 200 tiles per 4096
# queries on a 200k index; on 2 busy cores that synchronisation made a 5k x 200k x 64 search 2-3x
# slower with 2 threads than with 8192 (measured here: 8.5-12.4 s vs 3.2-4.5 s under load). search
# raises it to this for the duration of the call when the budget has room for the bigger tile.
_DB_BS = 8192


# --------------------------------------------------------------------------------------------
# input helpers


def _to_numpy(x: Any) -> np.ndarray:
    """numpy view of an array-like; torch tensors are detached and moved to the CPU."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


def _as_embeddings(x: Any, name: str) -> np.ndarray:
    a = _to_numpy(x)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-d array (rows, dim), got shape {a.shape}")
    if a.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be numeric, got dtype {a.dtype}")
    if a.shape[1] == 0:
        raise ValueError(f"{name} has zero columns")
    return a


def _check_finite(a: np.ndarray, name: str = "") -> None:
    """Raise ValueError naming how many rows are NaN/inf and the first one (chunked, low memory)."""
    if a.dtype.kind != "f":
        return
    bad_total = 0
    first = -1
    for i0 in range(0, a.shape[0], _CHUNK_ROWS):
        bad = ~np.isfinite(a[i0 : i0 + _CHUNK_ROWS]).all(axis=1)
        nbad = int(np.count_nonzero(bad))
        if nbad:
            if first < 0:
                first = i0 + int(np.argmax(bad))
            bad_total += nbad
    if bad_total:
        prefix = f"{name}: " if name else ""
        raise ValueError(
            f"{prefix}{bad_total} embeddings are NaN or infinite (first at row {first})"
        )


def _f32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


# --------------------------------------------------------------------------------------------
# normalisation


def l2_normalize(x: Any) -> np.ndarray:
    """Row-wise L2 normalisation into a new float32 C-contiguous array.

    Accepts numpy arrays (any float or int dtype, any memory order) and torch tensors. Norms are
    computed in float64. Rows whose norm is zero stay zero. Raises ``ValueError("N embeddings are
    NaN or infinite (first at row i)")`` if any value is NaN or infinite.
    """
    a = _as_embeddings(x, "embeddings")
    _check_finite(a)
    out = np.empty(a.shape, dtype=np.float32)
    for i0 in range(0, a.shape[0], _CHUNK_ROWS):
        c = a[i0 : i0 + _CHUNK_ROWS].astype(np.float64)
        norms = np.sqrt(np.einsum("ij,ij->i", c, c))
        norms[norms == 0] = 1.0
        out[i0 : i0 + _CHUNK_ROWS] = c / norms[:, None]
    return out


# --------------------------------------------------------------------------------------------
# search


def _faiss():
    import faiss  # imported lazily: the metrics need no faiss

    return faiss


def _plan(
    n_queries: int, n_index: int, dim: int, kk: int, max_memory: int, db_bs: int | None = None
) -> tuple[int, int]:
    """Rows per query block and per index shard so the search temporaries fit in max_memory.

    What faiss allocates (faiss/utils/distances.cpp, 1.15): a block goes to BLAS when
    rows * dim >= ``distance_compute_blas_threshold`` (128,000); the BLAS path computes the
    distances tile by tile into ONE buffer of ``distance_compute_blas_query_bs`` x
    ``distance_compute_blas_database_bs`` floats (16 MiB) -- it never builds the whole
    Q_block x shard matrix; smaller blocks use faiss's own kernels and no tile. Counted, in bytes:

    - per index shard row: the float32 copy handed to faiss plus IndexFlatIP's own copy, 8*dim;
    - the faiss tile, when the block is large enough to take the BLAS path;
    - per query in a block: its float32 copy (4*dim), a slice of distances
      (4*min(shard, database_bs), covering faiss's small-query paths), and the candidate lists:
      faiss's output and heap/reservoir, the running merged list and the merge temporaries,
      about 128 bytes per candidate.

    The index shard gets up to half the budget, the query block what is left. The inputs and the
    (Q, k) outputs are not counted. ``db_bs``: the database tile faiss will use (default: its
    current setting).
    """
    faiss = _faiss()
    if db_bs is None:
        db_bs = int(faiss.cvar.distance_compute_blas_database_bs)
    tile = 4 * int(faiss.cvar.distance_compute_blas_query_bs) * db_bs
    blas_rows = -(-int(faiss.cvar.distance_compute_blas_threshold) // dim)  # ceil
    shard_row = 8 * dim
    shard = min(n_index, (max_memory // 2) // shard_row)
    qblock = 0
    if shard >= 1:
        per_query = 4 * dim + 4 * min(shard, db_bs) + 128 * kk
        rest = max_memory - shard * shard_row
        with_tile = (rest - tile) // per_query
        if with_tile >= min(n_queries, blas_rows):
            qblock = min(n_queries, with_tile)
        else:  # too little room for faiss's BLAS tile: stay below the BLAS threshold
            qblock = min(n_queries, rest // per_query, blas_rows - 1)
    if shard < 1 or qblock < 1:
        need = 2 * (shard_row + 4 * dim + 4 + 128 * kk)
        raise ValueError(
            f"max_memory={max_memory} bytes is too small for dim {dim} and {kk} candidates per "
            f"query (need at least about {need})"
        )
    return int(qblock), int(shard)


def _sort_candidates(scores: np.ndarray, ids: np.ndarray, keep: int) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row on (-score, id) and keep the first `keep` columns."""
    order = np.lexsort((ids, -scores), axis=1)[:, :keep]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def _candidates(xq: np.ndarray, xb: np.ndarray, kk: int, shard: int, single_index) -> tuple[
    np.ndarray, np.ndarray
]:
    """Exact top-kk of a query block over all index rows, sorted on (-score, id).

    Shards are searched one after the other; each shard's results are merged into the running
    list with the same sort, which is exact: a row dropped from a shard's top-kk scores no higher
    than the kk-th of that shard, hence no higher than the kk-th of the union.
    """
    faiss = _faiss()
    n, d = xb.shape
    best_s = best_i = None
    for s0 in range(0, n, shard):
        s1 = min(n, s0 + shard)
        if single_index is not None:
            index = single_index
        else:
            index = faiss.IndexFlatIP(d)
            index.add(_f32(xb[s0:s1]))
        ks = min(kk, s1 - s0)
        sc, ix = index.search(xq, ks)
        if single_index is None:
            del index
        ix += s0
        if best_s is None:
            best_s, best_i = _sort_candidates(sc, ix, kk)
        else:
            best_s, best_i = _sort_candidates(
                np.concatenate([best_s, sc], axis=1), np.concatenate([best_i, ix], axis=1), kk
            )
    return best_s, best_i


def _drop_self(
    cs: np.ndarray, ci: np.ndarray, self_ids: np.ndarray | None, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """First k candidates per row after removing the row equal to self_ids (by identity)."""
    if self_ids is None:
        return cs[:, :k], ci[:, :k]
    is_self = ci == self_ids[:, None]
    # stable sort of the "is self" flag moves the (at most one) self entry behind the others;
    # if self is not among the candidates this keeps the first k, i.e. drops the last
    pos = np.argsort(is_self, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(cs, pos, 1), np.take_along_axis(ci, pos, 1)


def search(
    queries: Any,
    index: Any,
    k: int,
    *,
    self_ids: Any = None,
    max_memory: int = 2 << 30,
    threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k of every query over the index rows.

    Args:
        queries: (Q, D) array or tensor (any float dtype; converted to float32 block by block).
        index: (N, D) array or tensor.
        k: neighbours per query; must not exceed N (N - 1 with ``self_ids``).
        self_ids: optional (Q,) int64: query i is index row ``self_ids[i]``; that row is never
            returned for query i (removed by identity, so an exact duplicate of the query that
            lives at another row is still returned).
        max_memory: bound in bytes on the search's temporary memory (index shard copies, faiss's
            distance tiles, candidate lists); the inputs and the (Q, k) outputs are not counted.
        threads: if given, faiss's OpenMP thread count for this call (restored afterwards);
            None leaves faiss's setting alone.

    Returns:
        (scores, ids): (Q, k) float32 inner products and (Q, k) int64 index rows, per query in
        order (-score, id). See the module docstring for the exact tie guarantee.
    """
    xq = _as_embeddings(queries, "queries")
    xb = _as_embeddings(index, "index")
    if xq.shape[1] != xb.shape[1]:
        raise ValueError(f"queries have dim {xq.shape[1]} but index rows have dim {xb.shape[1]}")
    nq, d = xq.shape
    n = xb.shape[0]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    k = int(k)
    if self_ids is not None:
        self_ids = _to_numpy(self_ids)
        if self_ids.shape != (nq,) or self_ids.dtype.kind not in "iu":
            raise ValueError(
                f"self_ids must be an integer array of shape ({nq},), got {self_ids.dtype} "
                f"{self_ids.shape}"
            )
        self_ids = self_ids.astype(np.int64)
        if nq and (self_ids.min() < 0 or self_ids.max() >= n):
            raise ValueError(f"self_ids must lie in [0, {n})")
    available = n - (1 if self_ids is not None else 0)
    if k > available:
        extra = " after excluding the query itself" if self_ids is not None else ""
        raise ValueError(f"k={k} exceeds the {max(available, 0)} index rows available{extra}")
    if max_memory <= 0:
        raise ValueError(f"max_memory must be positive, got {max_memory}")
    _check_finite(xq, "queries")
    _check_finite(xb, "index")

    out_s = np.empty((nq, k), dtype=np.float32)
    out_i = np.empty((nq, k), dtype=np.int64)
    if nq == 0:
        return out_s, out_i

    faiss = _faiss()
    old_threads = None
    if threads is not None:
        old_threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(int(threads))
    old_db_bs = int(faiss.cvar.distance_compute_blas_database_bs)
    db_bs = old_db_bs
    if _DB_BS > old_db_bs and 4 * int(faiss.cvar.distance_compute_blas_query_bs) * _DB_BS <= max_memory // 8:
        db_bs = _DB_BS
        faiss.cvar.distance_compute_blas_database_bs = db_bs
    try:
        needed = k + (1 if self_ids is not None else 0)
        kk = min(n, needed + max(_EXTRA_CANDIDATES_MIN, needed // 4))
        pending = np.arange(nq)
        single = None  # the whole index as one faiss index, built once when it fits one shard
        first = True
        while pending.size:
            try:
                qblock, shard = _plan(pending.size, n, d, kk, max_memory, db_bs)
            except ValueError:
                if first:
                    raise
                # no room for more candidates: go back to the last kk that fitted and use shards
                # of at most kk rows, which faiss returns whole -> the merge is exact, ties included
                kk = last_kk
                qblock, shard = _plan(pending.size, n, d, kk, max_memory, db_bs)
                shard = min(shard, kk)
            first_round, first = first, False
            if shard >= n and single is None:
                single = faiss.IndexFlatIP(d)
                single.add(_f32(xb))
            elif shard < n:
                single = None  # sharded from here on: free the whole-index copy
            unresolved = []
            for b0 in range(0, pending.size, qblock):
                rows = pending[b0 : b0 + qblock]
                # first round: pending is 0..Q-1, so a slice (a view) suffices
                block = _f32(xq[b0 : b0 + qblock] if first_round else xq[rows])
                cs, ci = _candidates(block, xb, kk, shard, single if shard >= n else None)
                fs, fi = _drop_self(cs, ci, None if self_ids is None else self_ids[rows], k)
                # faiss truncated a shard (shard > kk) and the k-th kept score equals the worst
                # candidate's: the tie may go on past what faiss returned, and a row with a lower
                # id may be missing -> search that query again with more candidates
                open_tie = (kk < n) & (shard > kk) & (fs[:, k - 1] <= cs[:, -1])
                done = ~open_tie
                out_s[rows[done]] = fs[done]
                out_i[rows[done]] = fi[done]
                if open_tie.any():
                    unresolved.append(rows[open_tie])
            pending = np.concatenate(unresolved) if unresolved else pending[:0]
            last_kk, kk = kk, min(n, 4 * kk)
    finally:
        faiss.cvar.distance_compute_blas_database_bs = old_db_bs
        if old_threads is not None:
            faiss.omp_set_num_threads(old_threads)
    return out_s, out_i


# --------------------------------------------------------------------------------------------
# metrics


def relevance(ids: Any, query_keys: Any, index_keys: Any) -> np.ndarray:
    """(Q, k) bool: neighbour j of query q is relevant (its index key equals the query's key)."""
    ids = _to_numpy(ids)
    query_keys = _to_numpy(query_keys)
    index_keys = _to_numpy(index_keys)
    if ids.ndim != 2 or ids.shape[0] != query_keys.shape[0]:
        raise ValueError(f"ids shape {ids.shape} does not match {query_keys.shape[0]} queries")
    return index_keys[ids] == query_keys[:, None]


def count_relevant(query_keys: Any, index_keys: Any, self_ids: Any = None) -> np.ndarray:
    """(Q,) int64: number of index rows whose key equals each query's key, minus the query's own
    row (``self_ids[q]``) when that row is itself relevant. Vectorised (np.unique + searchsorted)."""
    qk = _to_numpy(query_keys)
    ik = _to_numpy(index_keys)
    uniq, counts = np.unique(ik, return_counts=True)
    if uniq.size == 0:
        n = np.zeros(qk.shape[0], dtype=np.int64)
    else:
        pos = np.minimum(np.searchsorted(uniq, qk), uniq.size - 1)
        n = np.where(uniq[pos] == qk, counts[pos], 0).astype(np.int64)
    if self_ids is not None:
        self_ids = _to_numpy(self_ids).astype(np.int64)
        n -= (ik[self_ids] == qk).astype(np.int64)
    return n


class QueryMetrics(NamedTuple):
    """Per-query scores (float64, NaN where excluded) and the mask of scored queries."""

    mp: np.ndarray  # mMP@k before averaging
    ap: np.ndarray  # mAP@k before averaging
    r1: np.ndarray  # R@1
    valid: np.ndarray  # n_q > 0


def query_metrics(rel: Any, n_relevant: Any) -> QueryMetrics:
    """Per-query mMP@k, mAP@k and R@1 from the (Q, k) relevance of the ranked neighbours and
    the (Q,) relevant counts n_q; k is rel.shape[1]. Queries with n_q = 0 get NaN, valid False."""
    rel = _to_numpy(rel).astype(bool)
    n_q = _to_numpy(n_relevant).astype(np.int64)
    if rel.ndim != 2 or rel.shape[0] != n_q.shape[0] or rel.shape[1] < 1:
        raise ValueError(f"rel shape {rel.shape} does not match {n_q.shape[0]} relevant counts")
    k = rel.shape[1]
    valid = n_q > 0
    m = np.minimum(n_q, k)
    denom = np.where(valid, m, 1).astype(np.float64)
    cum = np.cumsum(rel, axis=1, dtype=np.float64)  # cum[:, j] = relevant among first j+1
    hits_m = np.take_along_axis(cum, np.maximum(m - 1, 0)[:, None], 1)[:, 0]
    mp = hits_m / denom
    prec = cum / np.arange(1, k + 1, dtype=np.float64)
    ap = (prec * rel).sum(axis=1) / denom
    r1 = rel[:, 0].astype(np.float64)
    nan = np.float64("nan")
    return QueryMetrics(
        np.where(valid, mp, nan), np.where(valid, ap, nan), np.where(valid, r1, nan), valid
    )


# --------------------------------------------------------------------------------------------
# evaluation


def _labels_1d(x: Any, n: int, name: str) -> np.ndarray:
    """1-d array of hashable values; lists mixing types become object arrays (1 != '1')."""
    if isinstance(x, (list, tuple)):
        a = np.asarray(x)
        if a.ndim != 1 or (a.dtype.kind in "US" and not all(isinstance(v, (str, bytes)) for v in x)):
            a = np.empty(len(x), dtype=object)
            a[:] = list(x)
    else:
        a = _to_numpy(x)
    if a.ndim != 1 or a.shape[0] != n:
        raise ValueError(f"{name} must be 1-d with {n} entries, got shape {a.shape}")
    return a


def _factorize(*arrays: np.ndarray) -> tuple[list[np.ndarray], list[Hashable]]:
    """Joint integer codes for several 1-d arrays of hashable values, and the value of each code."""
    kinds = {a.dtype.kind for a in arrays}
    if kinds <= set("biuf") or kinds == {"U"} or kinds == {"S"}:
        allv = np.concatenate(arrays)
        names, codes = np.unique(allv, return_inverse=True)
        codes = codes.reshape(-1).astype(np.int64)
        names_list = names.tolist()
    else:  # mixed or object values: map through a dict, first appearance first
        table: dict[Hashable, int] = {}
        codes = np.fromiter(
            (table.setdefault(v, len(table)) for a in arrays for v in a.tolist()),
            dtype=np.int64,
            count=sum(a.shape[0] for a in arrays),
        )
        names_list = list(table)
    out, i0 = [], 0
    for a in arrays:
        out.append(codes[i0 : i0 + a.shape[0]])
        i0 += a.shape[0]
    return out, names_list


def _mean(x: np.ndarray) -> float:
    return float(np.mean(x)) if x.size else float("nan")


def summarize(m: QueryMetrics, sel: np.ndarray, k: int) -> dict:
    """Mean scores of the selected queries (those with a relevant index row), with their counts."""
    v = sel & m.valid
    return {
        f"mMP@{k}": _mean(m.mp[v]),
        f"mAP@{k}": _mean(m.ap[v]),
        "R@1": _mean(m.r1[v]),
        "queries": int(np.count_nonzero(v)),
        "excluded": int(np.count_nonzero(sel & ~m.valid)),
    }


def evaluate(
    query_emb: Any,
    query_labels: Sequence[Hashable] | np.ndarray,
    index_emb: Any,
    index_labels: Sequence[Hashable] | np.ndarray,
    *,
    query_domains: Sequence[Hashable] | np.ndarray | None = None,
    index_domains: Sequence[Hashable] | np.ndarray | None = None,
    protocol: str = "guiec",
    k: int = 5,
    self_ids: Any = None,
    max_memory: int = 2 << 30,
) -> dict:
    """Retrieval scores of query embeddings against an index (both L2-normalised here).

    Protocols:
        ``"guiec"``: relevant = same label; overall = mean over all scored queries (micro);
            per domain = mean over the queries of that domain (the query's domain). Only
            ``query_domains`` is needed for the per-domain split.
        ``"uned"``: relevant = same label and same domain; overall = mean of the per-domain means
            (macro, over domains with at least one scored query). Needs both domain arrays or
            neither.
    Domains None -> one domain named ``"all"``. Labels and domains may be any hashable values.
    ``self_ids`` (query i is index row self_ids[i]) excludes each query's own row from its
    neighbours and from its relevant count.

    Returns ``{"protocol", "k", "overall": {f"mMP@{k}", f"mAP@{k}", "R@1", "queries",
    "excluded"}, "domains": {name: same keys}}``; "queries" counts scored queries, "excluded"
    those with no relevant index row. A domain with no scored query has NaN scores.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    k = int(k)
    same_input = query_emb is index_emb
    xq = _as_embeddings(query_emb, "query embeddings")
    xb = xq if same_input else _as_embeddings(index_emb, "index embeddings")
    nq, nb = xq.shape[0], xb.shape[0]
    if nq == 0:
        raise ValueError("the query set is empty")
    if nb == 0:
        raise ValueError("the index set is empty")

    ql = _labels_1d(query_labels, nq, "query_labels")
    il = _labels_1d(index_labels, nb, "index_labels")
    (qlab, ilab), _ = _factorize(ql, il)

    if protocol == "uned" and (query_domains is None) != (index_domains is None):
        raise ValueError("the uned protocol needs both query_domains and index_domains, or neither")
    if query_domains is None:
        qdom = np.zeros(nq, dtype=np.int64)
        idom = np.zeros(nb, dtype=np.int64)
        dom_names: list[Hashable] = ["all"]
    else:
        qd = _labels_1d(query_domains, nq, "query_domains")
        if index_domains is not None:
            idd = _labels_1d(index_domains, nb, "index_domains")
            (qdom, idom), dom_names = _factorize(qd, idd)
        else:
            (qdom,), dom_names = _factorize(qd)
            idom = None

    if protocol == "guiec":
        qkey, ikey = qlab, ilab
    else:
        nd = len(dom_names)
        qkey, ikey = qlab * nd + qdom, ilab * nd + idom

    xqn = l2_normalize(xq)
    xbn = xqn if same_input else l2_normalize(xb)
    _, ids = search(xqn, xbn, k, self_ids=self_ids, max_memory=max_memory)
    del xqn, xbn

    n_rel = count_relevant(qkey, ikey, self_ids=self_ids)
    m = query_metrics(relevance(ids, qkey, ikey), n_rel)
    names = (f"mMP@{k}", f"mAP@{k}", "R@1")

    domains: dict[str, dict] = {}
    present = np.unique(qdom)
    for code in present:
        domains[str(dom_names[int(code)])] = summarize(m, qdom == code, k)

    if protocol == "guiec":
        overall = summarize(m, np.ones(nq, dtype=bool), k)
    else:
        scored = [d for d in domains.values() if d["queries"] > 0]
        overall = {
            name: (float(np.mean([d[name] for d in scored])) if scored else float("nan"))
            for name in names
        }
        overall["queries"] = int(np.count_nonzero(m.valid))
        overall["excluded"] = int(np.count_nonzero(~m.valid))
    return {"protocol": protocol, "k": k, "overall": overall, "domains": domains}
