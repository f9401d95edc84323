"""The GUIEC / UnED retrieval metrics, and :func:`evaluate`: embeddings and labels to scores.

Metrics as the GUIEC (Kaggle's evaluation page) and UnED (Ypsilantis et al., 2023) define them;
n_q = relevant index rows for query q (itself excluded),
m_q = min(n_q, k), rel_q(j) = 1 if the j-th neighbour is relevant, P(j) = precision at j:

- ``mMP@k`` (GUIEC "mMP@5"): (1/m_q) sum_{j <= m_q} rel_q(j)
- ``mAP@k`` (UnED "mAP@5"):  (1/m_q) sum_{j <= k} P(j) rel_q(j)
- ``R@1``: rel_q(1)

Queries with n_q = 0 are excluded from every mean and counted as ``excluded``.

ILIAS (Kordopatis-Zilos et al., CVPR 2025) scores ``mAP@k`` (k = 1000) by the same formula, except for
ties: its evaluation runs scikit-learn's ``average_precision_score`` on the top-k list, which gives every
relevant row of a run of equal scores the precision at the end of that run, and rescales the result to
the min(n_q, k) denominator. Under ``protocol="ilias"`` (relevant = same label, mean over queries)
``mAP@k`` is that: (1/m_q) sum_{j <= k} rel_q(j) * P(e_q(j)), e_q(j) the last rank holding j's score.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple

import numpy as np

from featcache.evaluate.search import as_embeddings, l2_normalize, search, to_numpy

__all__ = ["PROTOCOLS", "QueryMetrics", "count_relevant", "evaluate", "query_metrics", "relevance", "score_ranked",
           "summarize", "tied_ap"]

PROTOCOLS = ("guiec", "uned", "ilias")


def relevance(ids: Any, query_keys: Any, index_keys: Any) -> np.ndarray:
    """(Q, k) bool: neighbour j of query q is relevant (its index key equals the query's key)."""
    ids = to_numpy(ids)
    query_keys = to_numpy(query_keys)
    index_keys = to_numpy(index_keys)
    if ids.ndim != 2 or ids.shape[0] != query_keys.shape[0]:
        raise ValueError(f"ids shape {ids.shape} does not match {query_keys.shape[0]} queries")
    return index_keys[ids] == query_keys[:, None]


def count_relevant(query_keys: Any, index_keys: Any, self_ids: Any = None) -> np.ndarray:
    """(Q,) int64: number of index rows whose key equals each query's key, minus the query's own
    row (``self_ids[q]``) when that row is itself relevant. Vectorised (np.unique + searchsorted)."""
    qk = to_numpy(query_keys)
    ik = to_numpy(index_keys)
    uniq, counts = np.unique(ik, return_counts=True)
    if uniq.size == 0:
        n = np.zeros(qk.shape[0], dtype=np.int64)
    else:
        pos = np.minimum(np.searchsorted(uniq, qk), uniq.size - 1)
        n = np.where(uniq[pos] == qk, counts[pos], 0).astype(np.int64)
    if self_ids is not None:
        self_ids = to_numpy(self_ids).astype(np.int64)
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
    rel = to_numpy(rel).astype(bool)
    n_q = to_numpy(n_relevant).astype(np.int64)
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


def tied_ap(rel: Any, sims: Any, n_relevant: Any) -> np.ndarray:
    """ILIAS's AP@k per query (see the module docstring): ``rel`` and ``sims`` (Q, k), best first; NaN where
    n_q = 0."""
    rel = to_numpy(rel).astype(bool)
    sims = to_numpy(sims)
    n_q = to_numpy(n_relevant).astype(np.int64)
    q, k = rel.shape
    end = np.broadcast_to(np.arange(k), (q, k)).copy()  # end[:, j]: the last rank tied with rank j
    for j in range(k - 2, -1, -1):
        tied = sims[:, j] == sims[:, j + 1]
        end[tied, j] = end[tied, j + 1]
    cum = np.cumsum(rel, axis=1, dtype=np.float64)
    at_end = np.take_along_axis(cum, end, 1) / (end + 1)
    valid = n_q > 0
    ap = (rel * at_end).sum(axis=1) / np.where(valid, np.minimum(n_q, k), 1)
    return np.where(valid, ap, np.nan)


def _labels_1d(x: Any, n: int, name: str) -> np.ndarray:
    """1-d array of hashable values; lists mixing types become object arrays (1 != '1')."""
    if isinstance(x, (list, tuple)):
        a = np.asarray(x)
        if a.ndim != 1 or (a.dtype.kind in "US" and not all(isinstance(v, (str, bytes)) for v in x)):
            a = np.empty(len(x), dtype=object)
            a[:] = list(x)
    else:
        a = to_numpy(x)
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
    k = _check_k(protocol, k)
    same_input = query_emb is index_emb
    xq = as_embeddings(query_emb, "query embeddings")
    xb = xq if same_input else as_embeddings(index_emb, "index embeddings")
    if xq.shape[0] == 0:
        raise ValueError("the query set is empty")
    if xb.shape[0] == 0:
        raise ValueError("the index set is empty")
    keys = _keys(query_labels, index_labels, query_domains, index_domains, protocol, xq.shape[0], xb.shape[0])
    xqn = l2_normalize(xq)
    xbn = xqn if same_input else l2_normalize(xb)
    sims, ids = search(xqn, xbn, k, self_ids=self_ids, max_memory=max_memory)
    del xqn, xbn
    return _scores(ids, keys, protocol, k, self_ids, sims)[0]


def score_ranked(
    ids: Any,
    query_labels: Sequence[Hashable] | np.ndarray,
    index_labels: Sequence[Hashable] | np.ndarray,
    *,
    query_domains: Sequence[Hashable] | np.ndarray | None = None,
    index_domains: Sequence[Hashable] | np.ndarray | None = None,
    protocol: str = "guiec",
    self_ids: Any = None,
    sims: Any = None,
) -> tuple[dict, QueryMetrics, np.ndarray]:
    """:func:`evaluate`'s scores of neighbours already found: ``ids`` (Q, k) positions into the index, best
    first. Positions at or past ``len(index_labels)`` are distractors: rows that are never relevant (a
    streamed search appends them after the labelled index). Also returns the per-query metrics and the
    (Q, k) relevance, for per-query reports."""
    ids = to_numpy(ids).astype(np.int64)
    k = _check_k(protocol, ids.shape[1] if ids.ndim == 2 else 0)
    nq, nb = len(query_labels), len(index_labels)
    keys = _keys(query_labels, index_labels, query_domains, index_domains, protocol, nq, nb)
    return _scores(ids, keys, protocol, k, self_ids, sims)


def _check_k(protocol: str, k: Any) -> int:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return int(k)


class _Keys(NamedTuple):
    query: np.ndarray  # (Q,) int64 relevance key of each query
    index: np.ndarray  # (N,) int64 relevance key of each labelled index row
    query_domain: np.ndarray  # (Q,) domain code
    domain_names: list


def _keys(query_labels, index_labels, query_domains, index_domains, protocol: str, nq: int, nb: int) -> _Keys:
    """Integer relevance keys: equal keys are relevant (label, and under uned label and domain)."""
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
    if protocol != "uned":
        return _Keys(qlab, ilab, qdom, dom_names)
    nd = len(dom_names)
    return _Keys(qlab * nd + qdom, ilab * nd + idom, qdom, dom_names)


def _scores(ids: np.ndarray, keys: _Keys, protocol: str, k: int, self_ids, sims=None) -> tuple[dict, QueryMetrics, np.ndarray]:
    nq = len(keys.query)
    labelled = ids < len(keys.index)
    index_keys = np.append(keys.index, -1)  # -1: a distractor's key, equal to no query's
    rel = relevance(np.where(labelled, ids, len(keys.index)), keys.query, index_keys)
    self_ids = None if self_ids is None else to_numpy(self_ids).astype(np.int64)
    if self_ids is not None and (self_ids < 0).any():  # some queries are not index rows: count theirs whole
        n_rel = count_relevant(keys.query, keys.index)
        own = self_ids >= 0
        n_rel[own] -= (keys.index[self_ids[own]] == keys.query[own]).astype(np.int64)
    else:
        n_rel = count_relevant(keys.query, keys.index, self_ids=self_ids)
    m = query_metrics(rel, n_rel)
    if protocol == "ilias":
        if sims is None:
            raise ValueError("the ilias protocol needs the neighbours' scores (its mAP gives ties one precision)")
        m = m._replace(ap=tied_ap(rel, sims, n_rel))
    names = (f"mMP@{k}", f"mAP@{k}", "R@1")
    domains: dict[str, dict] = {}
    for code in np.unique(keys.query_domain):
        domains[str(keys.domain_names[int(code)])] = summarize(m, keys.query_domain == code, k)
    if protocol != "uned":
        overall = summarize(m, np.ones(nq, dtype=bool), k)
    else:
        scored = [d for d in domains.values() if d["queries"] > 0]
        overall = {name: (float(np.mean([d[name] for d in scored])) if scored else float("nan")) for name in names}
        overall["queries"] = int(np.count_nonzero(m.valid))
        overall["excluded"] = int(np.count_nonzero(~m.valid))
    return {"protocol": protocol, "k": k, "overall": overall, "domains": domains}, m, rel
