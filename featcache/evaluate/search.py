"""Exact nearest-neighbour search with faiss, in bounded memory.

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
(the tie may continue past what faiss returned) that query is searched again with four times as
many candidates, until the boundary is resolved or the whole index is a candidate. "Equal" means equal
float32 scores as faiss computes them; bitwise-identical rows in one index shard always score the
same, but faiss may sum a dot product in a different order in different code paths (BLAS vs its
own SIMD kernels, chosen by block size), so identical rows that fall in different shards can differ
in the last bit, and are then ordered by that score.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["import_faiss", "l2_normalize", "search", "search_blocks"]

_CHUNK_ROWS = 1 << 16  # rows per chunk for finiteness checks and normalisation
_EXTRA_CANDIDATES_MIN = 4  # candidates searched beyond k (+1 for self) to settle boundary ties
# ... and beyond that a 64th of k: faiss's heaps grow with the candidates (at k = 1000, a quarter more cost
# a streamed evaluation about a fifth of its time), and a query whose tie runs past them is searched again
_EXTRA_CANDIDATES_SHARE = 64
# faiss's BLAS path works through 4096 x database_bs distance tiles, with an OpenMP fork/join (the
# sgemm, then the heap updates) per tile. Its default database_bs of 1024 means 200 tiles per 4096
# queries on a 200k index; on 2 busy cores that synchronisation made a 5k x 200k x 64 search 2-3x
# slower with 2 threads than with 8192 (measured here: 8.5-12.4 s vs 3.2-4.5 s under load). search
# raises it to this for the duration of the call when the budget has room for the bigger tile.
_DB_BS = 8192


# --------------------------------------------------------------------------------------------
# input helpers


def to_numpy(x: Any) -> np.ndarray:
    """numpy view of an array-like; torch tensors are detached and moved to the CPU."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


def as_embeddings(x: Any, name: str) -> np.ndarray:
    a = to_numpy(x)
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
    a = as_embeddings(x, "embeddings")
    _check_finite(a)
    out = np.empty(a.shape, dtype=np.float32)
    for i0 in range(0, a.shape[0], _CHUNK_ROWS):
        c = a[i0 : i0 + _CHUNK_ROWS]
        norms = np.sqrt(np.einsum("ij,ij->i", c, c, dtype=np.float64))  # float64 sums, no float64 copy of c
        norms[norms == 0] = 1.0
        np.divide(c, norms[:, None], out=out[i0 : i0 + _CHUNK_ROWS], casting="unsafe")
    return out


# --------------------------------------------------------------------------------------------
# search


def import_faiss():
    """faiss, imported on first use: the metrics, and commands that never search, load without it."""
    import faiss

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
    faiss = import_faiss()
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
    faiss = import_faiss()
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
    xq = as_embeddings(queries, "queries")
    xb = as_embeddings(index, "index")
    if xq.shape[1] != xb.shape[1]:
        raise ValueError(f"queries have dim {xq.shape[1]} but index rows have dim {xb.shape[1]}")
    nq, d = xq.shape
    n = xb.shape[0]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    k = int(k)
    if self_ids is not None:
        self_ids = to_numpy(self_ids)
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

    faiss = import_faiss()
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
        kk = min(n, needed + max(_EXTRA_CANDIDATES_MIN, needed // _EXTRA_CANDIDATES_SHARE))
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


def _merge_sorted(s1: np.ndarray, i1: np.ndarray, s2: np.ndarray, i2: np.ndarray, keep: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``keep`` of two lists per row, each sorted on (-score, id), where every id of the first is below
    every id of the second: a stable sort on -score alone then keeps (-score, id) order, and runs as a merge
    of the two sorted runs (numpy's stable sort is timsort)."""
    scores = np.concatenate([s1, s2], axis=1)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :keep]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(np.concatenate([i1, i2], axis=1), order, 1)


def search_blocks(queries: Any, blocks, k: int, *, self_ids: Any = None, max_memory: int = 2 << 30,
                  total: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`search` over an index that arrives block by block and is never whole in memory.

    ``blocks`` yields ``(offset, rows)``: consecutive slices of the index (offsets 0, n0, n0 + n1, ...),
    each an (n, D) array. Each block is searched exactly (:func:`search`, its ids shifted by the offset)
    and merged into a running top-k on (-score, id): a row dropped from a block's top-k ranks after the
    k-th of that block, hence after the k-th of the whole, so the result equals :func:`search` on the
    concatenated index (the same order, ties included; scores of one row are computed within its block).
    Memory: the (Q, k) running lists, one block, and one block's search (bounded by ``max_memory``).
    ``self_ids`` are positions in the whole index (-1: the query is not an index row). ``total``, when
    known, checks ``k`` before the first block is read.
    """
    xq = as_embeddings(queries, "queries")
    nq = xq.shape[0]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    k = int(k)
    ids_all = None if self_ids is None else to_numpy(self_ids).astype(np.int64)
    if total is not None and k > total - (1 if ids_all is not None and (ids_all >= 0).any() else 0):
        raise ValueError(f"k={k} exceeds the {total} index rows")
    last = np.iinfo(np.int64).max  # ids of "nothing yet": after every real row in (-score, id) order
    best_s = np.full((nq, k), -np.inf, dtype=np.float32)
    best_i = np.full((nq, k), last, dtype=np.int64)
    seen = 0
    for offset, block in blocks:
        if offset != seen:
            raise ValueError(f"index blocks must be consecutive: block at {offset}, expected {seen}")
        nb = len(block)
        seen += nb
        if nb == 0 or nq == 0:
            continue
        inside = np.zeros(nq, dtype=bool) if ids_all is None else (ids_all >= offset) & (ids_all < offset + nb)
        for group, own in ((~inside, False), (inside, True)):
            kb = min(k, nb - (1 if own else 0))
            if not group.any() or kb < 1:
                continue
            sc, ix = search(xq[group] if not group.all() else xq, block, kb,
                            self_ids=(ids_all[group] - offset) if own else None, max_memory=max_memory)
            ix += offset
            if kb == k and (best_i[group, 0] == last).all():  # nothing found before: the block's list is the list
                best_s[group], best_i[group] = sc, ix
                continue
            best_s[group], best_i[group] = _merge_sorted(best_s[group], best_i[group], sc, ix, k)
    if nq and (best_i[:, -1] == last).any():
        raise ValueError(f"k={k} exceeds the {seen} index rows available")
    return best_s, best_i
