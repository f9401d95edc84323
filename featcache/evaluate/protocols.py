"""Stage three: score embeddings made from a cache (a trained head, or a zero-shot baseline).

Queries and index come from the cache's ``splits`` (``query``/``index``), or from two caches. With
neither, every valid row is a query against all other valid rows, itself excluded by row identity.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from featcache.cache import FeatureCache, describe_space, feature_space
from featcache.evaluate.baselines import POOLED_DIM, ZERO_SHOT, pooled
from featcache.evaluate.metrics import evaluate, query_metrics, summarize
from featcache.evaluate.search import l2_normalize, search
from featcache import __version__
from featcache.storage import absolute
from featcache.train.runs import Run, RunError

class EvalError(ValueError):
    """Inputs that cannot be evaluated; the message says which and why."""


@dataclass
class Side:
    """One side of the search: the rows of a cache that are queries (or index)."""

    cache: FeatureCache
    rows: np.ndarray  # int row numbers into the cache
    labels: np.ndarray  # class names (str), comparable across caches
    domains: np.ndarray

    @classmethod
    def of(cls, cache: FeatureCache, mask: np.ndarray) -> "Side":
        rows = np.flatnonzero(mask)
        classes = cache.classes()
        return cls(cache, rows, classes[cache.labels()[rows]], cache.strings("domains")[rows])


def select(cache: FeatureCache, query_cache: FeatureCache | None, index_cache: FeatureCache | None,
           domains: list[str] | None = None):
    """(queries, index, self_ids): the two sides and, where a query is itself an index row, that row.
    With ``domains``, only those domains' rows take part, on both sides.

    ``self_ids`` is None when no query is in the index, else an int array with -1 for queries that
    are not. Within one cache, a domain that has query rows but no index rows is its own index: its
    queries search each other (each skipping itself) as well as the other domains' index rows. That
    is how UnED scores cars, SOP, iNat, Food2k and RP2K, whose test images are query and index at once.
    """
    if (query_cache is None) != (index_cache is None):
        raise EvalError("give both --query-cache and --index-cache, or neither")
    def usable(c: FeatureCache) -> np.ndarray:
        valid = c.valid()
        return valid if not domains else valid & np.isin(c.strings("domains"), domains)

    if query_cache is not None:
        qs, is_ = feature_space(query_cache.meta), feature_space(index_cache.meta)
        if qs != is_:
            raise EvalError(f"--query-cache {query_cache.path} ({describe_space(qs)}) and --index-cache "
                            f"{index_cache.path} ({describe_space(is_)}) hold different kinds of vectors (backbone, "
                            "weights, preprocessing, head or declared space): they cannot be compared")
        queries, index = Side.of(query_cache, usable(query_cache)), Side.of(index_cache, usable(index_cache))
        if query_cache.key != index_cache.key:
            return queries, index, None
        # the same cache on both sides: each query is an index row, and must not find itself
        return queries, index, np.searchsorted(index.rows, queries.rows).astype(np.int64)
    valid, splits, row_domains = usable(cache), cache.strings("splits"), cache.strings("domains")
    has_q, has_i = (splits == "query").any(), (splits == "index").any()
    if has_q and has_i:
        q = valid & (splits == "query")
        self_index = q & ~np.isin(row_domains, np.unique(row_domains[splits == "index"]))
        queries = Side.of(cache, q)
        index = Side.of(cache, valid & ((splits == "index") | self_index))
        if not self_index.any():
            return queries, index, None
        # positions of the self-indexed queries in the index (both sides are in row order)
        self_ids = np.full(len(queries.rows), -1, dtype=np.int64)
        in_index = np.isin(queries.rows, index.rows)
        self_ids[in_index] = np.searchsorted(index.rows, queries.rows[in_index])
        return queries, index, self_ids
    if has_q or has_i:
        raise EvalError(f"{cache.path}: has {'query' if has_q else 'index'} rows but no {'index' if has_q else 'query'} rows")
    both = Side.of(cache, valid)
    return both, both, np.arange(len(both.rows), dtype=np.int64)


def scores(xq, queries: Side, xb, index: Side, self_ids, protocol: str, k: int, max_memory: int,
           label_sep: str | None = None) -> dict[str, Any]:
    """``metrics.evaluate``, extended to queries that are only partly index rows (``self_ids`` -1 for the
    others) and, with ``label_sep``, to multi-label queries (a query labelled ``a|b`` with ``label_sep="|"``
    is relevant to index rows labelled a or b, as UnED's GLDv2 queries are): each kind is scored on its own
    against the same index, then merged. Labels are data: without ``label_sep`` no character means anything."""
    multi = np.zeros(len(queries.labels), dtype=bool) if not label_sep else np.fromiter(
        (label_sep in str(x) for x in queries.labels), dtype=bool, count=len(queries.labels))
    ids = np.full(len(queries.rows), -1, dtype=np.int64) if self_ids is None else self_ids
    parts = []
    for group in (~multi & (ids < 0), ~multi & (ids >= 0)):
        if group.any():
            xg = xq if group.all() else xq[group]  # the same array object lets evaluate() normalise it once
            parts.append(evaluate(xg, queries.labels[group], xb, index.labels, query_domains=queries.domains[group],
                                  index_domains=index.domains, self_ids=ids[group] if (ids[group] >= 0).all() else None,
                                  protocol=protocol, k=k, max_memory=max_memory))
    if multi.any():
        parts.append(multi_label_scores(xq[multi], queries.labels[multi], queries.domains[multi], xb, index,
                                        ids[multi], protocol, k, max_memory, label_sep))
    return merge_scores(parts, protocol, k) if multi.any() or len(parts) > 1 else parts[0]


def query_labels(label: Any, label_sep: str | None) -> set[str]:
    """The labels a query is relevant to: its own, or its parts with ``label_sep``."""
    return set(str(label).split(label_sep)) if label_sep else {str(label)}


def relevant_to(label: Any, domain: Any, index: "Side", positions, protocol: str, label_sep: str | None) -> np.ndarray:
    """The relevance rule, row by row: index rows at ``positions`` relevant to a query of ``label`` and ``domain``
    (same label, one of its labels with ``label_sep``; under uned, also the same domain). ``metrics.evaluate``
    applies the same rule vectorised, to label (and domain) codes."""
    wanted = query_labels(label, label_sep)
    return np.array([index.labels[j] in wanted and (protocol != "uned" or index.domains[j] == domain)
                     for j in positions], dtype=bool)


def multi_label_scores(xq, labels, domains, xb, index: Side, self_ids, protocol: str, k: int, max_memory: int,
                       label_sep: str) -> dict[str, Any]:
    """Per-domain scores of queries with several labels ("a|b"): a neighbour is relevant when its label is
    one of them (and, under uned, its domain is the query's). Index rows carry one label each."""
    neighbours = neighbours_of(xq, xb, k, self_ids, max_memory)
    same_domain = protocol == "uned"
    counts = Counter(zip(index.domains, index.labels)) if same_domain else Counter(index.labels)
    rel = np.zeros(neighbours.shape, dtype=bool)
    n_rel = np.zeros(len(labels), dtype=np.int64)
    for i, (label, dom) in enumerate(zip(labels, domains)):
        rel[i] = relevant_to(label, dom, index, neighbours[i], protocol, label_sep)
        n_rel[i] = sum(counts[(dom, lab) if same_domain else lab] for lab in query_labels(label, label_sep))
        if self_ids[i] >= 0 and relevant_to(label, dom, index, [self_ids[i]], protocol, label_sep)[0]:
            n_rel[i] -= 1
    m = query_metrics(rel, n_rel)
    out = {str(dom): summarize(m, domains == dom, k) for dom in dict.fromkeys(domains)}
    return {"protocol": protocol, "k": k, "overall": {}, "domains": out}


def neighbours_of(xq, xb, k: int, self_ids, max_memory: int) -> np.ndarray:
    """Top-k index positions per query; ``self_ids`` as in ``scores`` (-1: the query is not in the index)."""
    qn, bn = l2_normalize(xq), l2_normalize(xb)
    if self_ids is None or (self_ids >= 0).all():
        return search(qn, bn, k, self_ids=self_ids, max_memory=max_memory)[1]
    out = np.zeros((len(qn), k), dtype=np.int64)
    for group, ids in ((self_ids < 0, None), (self_ids >= 0, self_ids)):
        if group.any():
            out[group] = search(qn[group], bn, k, self_ids=None if ids is None else ids[group], max_memory=max_memory)[1]
    return out


def merge_scores(parts: list[dict[str, Any]], protocol: str, k: int) -> dict[str, Any]:
    """Scores of disjoint query sets as one. Within a domain both protocols average over queries, so
    parts of one domain merge by query-weighted means; overall is the micro mean (guiec) or the mean
    of the domains (uned)."""
    names = (f"mMP@{k}", f"mAP@{k}", "R@1")
    domains: dict[str, dict[str, Any]] = {}
    for part in parts:
        for d, v in part["domains"].items():
            if d not in domains:
                domains[d] = dict(v)
                continue
            a = domains[d]
            n = a["queries"] + v["queries"]
            for m in names:
                a[m] = (np.nan_to_num(a[m]) * a["queries"] + np.nan_to_num(v[m]) * v["queries"]) / n if n else float("nan")
            a["queries"], a["excluded"] = n, a["excluded"] + v["excluded"]
    scored = [v for v in domains.values() if v["queries"] > 0]
    total = sum(v["queries"] for v in scored)
    if protocol == "uned":
        overall = {m: float(np.mean([v[m] for v in scored])) if scored else float("nan") for m in names}
    else:
        overall = {m: float(sum(v[m] * v["queries"] for v in scored) / total) if total else float("nan") for m in names}
    overall["queries"] = total
    overall["excluded"] = sum(v["excluded"] for v in domains.values())
    return {"protocol": protocol, "k": k, "overall": overall, "domains": domains}


def check_run_fits(run: Run, cache: FeatureCache) -> None:
    """Refuse, in one line naming both, a cache whose vectors are not the ones the run's head was trained on."""
    want, have = run.features_space, feature_space(cache.meta)
    if run.config["head"]["in_dim"] != cache.dim:
        raise EvalError(f"{run.path}: the head takes {run.config['head']['in_dim']}-d features but {cache.path} holds {cache.dim}-d")
    if want and want != have:
        raise EvalError(f"{run.path} was trained on features of {describe_space(want)}, but {cache.path} holds "
                        f"{describe_space(have)}: the head does not apply to them")


def embed(features: np.ndarray, run: Run | None, zero_shot: str | None) -> np.ndarray:
    if run is not None:
        return run.embed(features)
    if zero_shot == "pooled":
        return pooled(features)
    if zero_shot == "raw":
        return features.astype(np.float32)
    raise EvalError(f"unknown zero-shot mode {zero_shot!r}; expected one of {', '.join(ZERO_SHOT)}")


@dataclass
class EvalSet:
    """Queries and index with their features read once: any number of heads can be scored against it
    (``sweep`` does, for every head it trains)."""

    queries: Side
    index: Side
    self_ids: np.ndarray | None
    caches: list[FeatureCache]
    source: Any  # what the result records as its "cache"
    query_features: np.ndarray
    index_features: np.ndarray | None  # None: the index is the query set itself
    domains: list[str] | None = None  # the domains taking part; None: all

    @classmethod
    def load(cls, cache_path=None, query_cache=None, index_cache=None, domains: list[str] | None = None) -> "EvalSet":
        """Queries and index of a cache (or of two caches), optionally of ``domains`` only."""
        main = FeatureCache.open(cache_path) if cache_path is not None else None
        qc = FeatureCache.open(query_cache) if query_cache is not None else None
        ic = FeatureCache.open(index_cache) if index_cache is not None else None
        if main is None and qc is None:
            raise EvalError("give --cache, or --query-cache and --index-cache")
        caches = [c for c in (main, qc, ic) if c is not None]
        for c in caches:
            c.require_complete()
        if domains:
            known = set().union(*(set(c.strings("domains").tolist()) for c in caches))
            unknown = [d for d in domains if d not in known]
            if unknown:
                raise EvalError(f"--domain {unknown[0]}: no such domain (domains: {', '.join(sorted(known))})")
        queries, index, self_ids = select(main, qc, ic, domains)
        if len(queries.rows) == 0:
            raise EvalError("the query set is empty (no valid query rows)")
        if len(index.rows) == 0:
            raise EvalError("the index set is empty (no valid index rows)")
        same = index.rows is queries.rows
        source = (absolute(cache_path, resolve=True) if cache_path is not None
                  else {"query": absolute(query_cache, resolve=True), "index": absolute(index_cache, resolve=True)})
        return cls(queries, index, self_ids, caches, source, queries.cache.features(queries.rows),
                   None if same else index.cache.features(index.rows), sorted(domains) if domains else None)


@dataclass
class EvalOutput:
    result: dict[str, Any]
    queries: Side  # with ``show``: only the shown queries
    index: Side
    neighbours: np.ndarray  # (S, k) positions into index.rows, for the S shown queries
    relevant: np.ndarray  # (S, k) bool


def run_eval(
    cache_path: str | Path | None = None,
    *,
    run: Run | str | Path | None = None,
    zero_shot: str | None = None,
    protocol: str = "guiec",
    query_cache: str | Path | None = None,
    index_cache: str | Path | None = None,
    k: int = 5,
    max_memory: int = 2 << 30,
    show: int = 0,
    eval_set: EvalSet | None = None,
    label_sep: str | None = None,
) -> EvalOutput:
    """Score a run's head (or a zero-shot baseline) on a cache's queries and index; ``eval_set`` reuses
    features already loaded. With ``show`` > 0, also keep the top-k neighbours of ``show`` queries (for plots).
    ``label_sep`` declares multi-label queries (see ``scores``). A run's result is recorded in its directory
    as the latest of its kind (which caches, protocol, k, domains)."""
    if run is not None and zero_shot is not None:
        raise EvalError("give --run or --zero-shot, not both")
    if run is None and zero_shot is None:
        zero_shot = "pooled"
    run = Run.load(run) if run is not None and not isinstance(run, Run) else run
    es = eval_set or EvalSet.load(cache_path, query_cache, index_cache)
    if run is not None:
        for c in es.caches:
            check_run_fits(run, c)
    queries, index, self_ids = es.queries, es.index, es.self_ids
    available = len(index.rows) - (1 if self_ids is not None else 0)
    if k > available:
        raise EvalError(f"--k {k} is larger than the index ({available} rows{' besides the query itself' if self_ids is not None else ''})")
    xq = embed(es.query_features, run, zero_shot)
    xb = xq if es.index_features is None else embed(es.index_features, run, zero_shot)
    bad = int((~np.isfinite(xq)).any(axis=1).sum() + (0 if xb is xq else (~np.isfinite(xb)).any(axis=1).sum()))
    if bad:
        raise EvalError(f"{bad} embeddings are NaN or infinite; the head or the cache is broken")
    result = scores(xq, queries, xb, index, self_ids, protocol, k, max_memory, label_sep)
    result["embeddings"] = f"run {run.path}" if run is not None else f"zero-shot {zero_shot}"
    result["cache"] = es.source
    result["domains_scored"] = es.domains or "all"
    result["label_sep"] = label_sep
    result["featcache_version"] = __version__
    neighbours = np.zeros((0, k), dtype=np.int64)
    relevant = np.zeros((0, k), dtype=bool)
    if show:
        picked = np.linspace(0, len(queries.rows) - 1, min(show, len(queries.rows))).round().astype(np.int64)
        ids = self_ids[picked] if self_ids is not None else None
        neighbours = neighbours_of(xq[picked], xb, k, ids, max_memory)
        queries = Side(queries.cache, queries.rows[picked], queries.labels[picked], queries.domains[picked])
        relevant = np.array([relevant_to(lab, dom, index, row, protocol, label_sep)
                             for row, lab, dom in zip(neighbours, queries.labels, queries.domains)], dtype=bool).reshape(neighbours.shape)
    if run is not None:
        run.record_eval({"cache": es.source, "protocol": protocol, "k": k, "domains": es.domains,
                         "label_sep": label_sep}, result)
    return EvalOutput(result, queries, index, neighbours, relevant)


@dataclass
class RunScorer:
    """Scores run directories on one evaluation set, read once: what a sweep calls after every head."""

    eval_set: EvalSet
    source: str
    metric: str = "mMP@5"
    label_sep: str | None = None
    zero_shot_kinds: tuple[str, ...] = ZERO_SHOT  # the baselines a sweep scores beside the heads

    def __call__(self, run: str | Path) -> dict[str, Any]:
        return run_eval(run=run, eval_set=self.eval_set, label_sep=self.label_sep).result

    def zero_shot(self, kind: str) -> dict[str, Any]:
        return run_eval(zero_shot=kind, eval_set=self.eval_set, label_sep=self.label_sep).result


def sweep_scorer(cache: str | Path, eval_cache: str | Path | None = None, label_sep: str | None = None) -> RunScorer | None:
    """A scorer on ``eval_cache`` (or ``cache``) when it has query and index rows; None when ``cache``
    has none (nothing to score on); an error when the ``eval_cache`` given has none. ``label_sep`` as
    for ``run_eval``."""
    target = eval_cache or cache
    splits = FeatureCache.open(target).strings("splits")
    if not ((splits == "query").any() and (splits == "index").any()):
        if eval_cache is not None:
            raise EvalError(f"--eval-cache {eval_cache}: has no query/index split to score on")
        return None
    return RunScorer(EvalSet.load(target), str(target), label_sep=label_sep)


__all__ = ["run_eval", "EvalSet", "RunScorer", "sweep_scorer", "pooled", "EvalError", "RunError", "ZERO_SHOT"]
