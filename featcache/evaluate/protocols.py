"""Stage three: score embeddings made from a cache (a trained head, or a zero-shot baseline).

Queries and index come from the cache's ``splits`` (``query``/``index``), or from two caches. With
neither, every valid row is a query against all other valid rows, itself excluded by row identity.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from featcache.cache import FeatureCache, describe_space, feature_space
from featcache.evaluate.baselines import POOLED_DIM, ZERO_SHOT, pooled
from featcache.evaluate.metrics import query_metrics, score_ranked, summarize, tied_ap
from featcache.evaluate.search import l2_normalize, search_blocks
from featcache import __version__
from featcache.storage import absolute
from featcache.train.runs import Run, RunError

class EvalError(ValueError):
    """Inputs that cannot be evaluated; the message says which and why."""


@dataclass
class Side:
    """One side of the search: rows of one cache (the queries), or of several searched one after the other (the
    labelled index: ``--index-cache A --index-cache B``). Positions count through the parts in order."""

    parts: list[tuple[FeatureCache, np.ndarray]]  # (cache, its int row numbers)
    labels: np.ndarray  # class names (str), comparable across caches
    domains: np.ndarray

    @classmethod
    def of(cls, cache: FeatureCache, mask: np.ndarray) -> "Side":
        rows = np.flatnonzero(mask)
        classes = cache.classes()
        return cls([(cache, rows)], classes[cache.labels()[rows]], cache.strings("domains")[rows])

    @classmethod
    def joined(cls, sides: list["Side"]) -> "Side":
        if len(sides) == 1:
            return sides[0]
        return cls([part for s in sides for part in s.parts], np.concatenate([s.labels for s in sides]),
                   np.concatenate([s.domains for s in sides]))

    @property
    def cache(self) -> FeatureCache:
        """The first part's cache (every part holds vectors of its kind)."""
        return self.parts[0][0]

    @property
    def rows(self) -> np.ndarray:
        """The row numbers of a side of one cache."""
        if len(self.parts) != 1:
            raise AttributeError(f"a side of {len(self.parts)} caches has no single list of rows")
        return self.parts[0][1]

    def __len__(self) -> int:
        return len(self.labels)

    def taken(self, picked: np.ndarray) -> "Side":
        """The side's rows at ``picked`` (a side of one cache)."""
        return Side([(self.cache, self.rows[picked])], self.labels[picked], self.domains[picked])

    def located(self, positions: np.ndarray) -> Iterator[tuple[FeatureCache, np.ndarray, np.ndarray]]:
        """(cache, row numbers, mask into ``positions``) for each part that ``positions`` reach."""
        positions = np.asarray(positions, dtype=np.int64)
        start = 0
        for cache, rows in self.parts:
            where = (positions >= start) & (positions < start + len(rows))
            if where.any():
                yield cache, rows[positions[where] - start], where
            start += len(rows)


def select(cache: FeatureCache | None, query_cache: FeatureCache | None, index_caches: list[FeatureCache],
           domains: list[str] | None = None):
    """(queries, index, self_ids): the two sides and, where a query is itself an index row, that row.
    With ``domains``, only those domains' rows take part, on both sides.

    ``self_ids`` is None when no query is in the index, else an int array with -1 for queries that
    are not. Within one cache, a domain that has query rows but no index rows is its own index: its
    queries search each other (each skipping itself) as well as the other domains' index rows. That
    is how UnED scores cars, SOP, iNat, Food2k and RP2K, whose test images are query and index at once.
    With ``query_cache``, the index is every valid row of ``index_caches``, one after the other.
    """
    if (query_cache is None) != (not index_caches):
        raise EvalError("give both --query-cache and --index-cache, or neither")
    def usable(c: FeatureCache) -> np.ndarray:
        valid = c.valid()
        return valid if not domains else valid & np.isin(c.strings("domains"), domains)

    if query_cache is not None:
        check_comparable(query_cache, index_caches)
        queries = Side.of(query_cache, usable(query_cache))
        parts = [Side.of(ic, usable(ic)) for ic in index_caches]
        index = Side.joined(parts)
        offset = 0
        for part in parts:
            if part.cache.key == query_cache.key:
                # the same cache on both sides: each query is an index row, and must not find itself
                return queries, index, offset + np.searchsorted(part.rows, queries.rows).astype(np.int64)
            offset += len(part)
        return queries, index, None
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


def check_comparable(query_cache: FeatureCache, index_caches: list[FeatureCache]) -> None:
    """Refuse, in one line, index caches given twice or holding vectors of another kind than the queries'."""
    qs = feature_space(query_cache.meta)
    seen: set[str] = set()
    for ic in index_caches:
        if ic.key in seen:
            raise EvalError(f"--index-cache {ic.path}: given twice")
        seen.add(ic.key)
        if feature_space(ic.meta) != qs:
            raise EvalError(f"--query-cache {query_cache.path} ({describe_space(qs)}) and --index-cache "
                            f"{ic.path} ({describe_space(feature_space(ic.meta))}) hold different kinds of vectors "
                            "(backbone, weights, preprocessing, head or declared space): they cannot be compared")


def block_rows_for(max_memory: int, caches: list[FeatureCache]) -> int:
    """Rows of a block read from ``caches`` while the index side is streamed within ``max_memory``."""
    row_bytes = max(c.dim * max(np.dtype(c.meta["dtype"]).itemsize, 4) for c in caches)
    return max(1, (max_memory // (4 * IN_MEMORY_SHARE)) // row_bytes)


def valid_spans(cache: FeatureCache, block_rows: int) -> Iterator[np.ndarray]:
    """A cache's valid row numbers, one span of ``block_rows`` rows at a time: no list of its 100M row numbers
    is held."""
    for lo in range(0, cache.rows, block_rows):
        span = np.arange(lo, min(cache.rows, lo + block_rows))
        yield span[cache.valid(span)]


def valid_blocks(parts: list[tuple[FeatureCache, int]], block_rows: int,
                 embedded: Callable[[FeatureCache, np.ndarray], np.ndarray], offset: int = 0
                 ) -> Iterator[tuple[int, np.ndarray]]:
    """(offset, ``embedded`` rows) of the valid rows of each of ``parts`` in turn, ``block_rows`` rows a span:
    how caches of any size are searched without a list of their rows."""
    for cache, _ in parts:
        for rows in valid_spans(cache, block_rows):
            if len(rows):
                yield offset, embedded(cache, rows)
                offset += len(rows)


def rows_at(parts: list[tuple[FeatureCache, int]], positions: np.ndarray, block_rows: int
            ) -> Iterator[tuple[FeatureCache, np.ndarray, np.ndarray]]:
    """(cache, row numbers, mask into ``positions``) for each of ``parts`` (a cache and its count of valid rows,
    searched one after the other) that ``positions`` reach: valid-row ordinals mapped to rows span by span."""
    positions = np.asarray(positions, dtype=np.int64)
    start = 0
    for cache, count in parts:
        here = (positions >= start) & (positions < start + count)
        if here.any():
            ordinals = positions[here] - start
            rows = np.empty(len(ordinals), dtype=np.int64)
            seen = 0
            for valid_rows in valid_spans(cache, block_rows):
                inside = (ordinals >= seen) & (ordinals < seen + len(valid_rows))
                rows[inside] = valid_rows[ordinals[inside] - seen]
                seen += len(valid_rows)
                if seen > ordinals.max():
                    break
            yield cache, rows, here
        start += count


# (L2-normalised queries, self ids) -> (Q, k) scores and positions of the top k, best first
Finder = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def scores(xq, queries: Side, index: Side, self_ids, protocol: str, k: int, find: Finder,
           label_sep: str | None = None) -> tuple[dict[str, Any], np.ndarray, dict[str, np.ndarray]]:
    """Scores of the queries ``xq`` against the index, whose top-k positions ``find`` returns (one pass over
    the index for every query: it may be streamed from disk). ``self_ids`` (-1 for queries that are not
    index rows) keeps each query from finding itself. With ``label_sep``, a query labelled ``a|b`` is
    relevant to index rows labelled a or b (UnED's GLDv2 queries); labels are data: without it no character
    means anything. Positions past the labelled index are distractors, never relevant.

    Returns the result, the (Q, k) neighbours and per-query arrays (ap, precision at min(5, k), rank of the
    first relevant neighbour or 0, whether the query was scored)."""
    multi = np.zeros(len(queries.labels), dtype=bool) if not label_sep else np.fromiter(
        (label_sep in str(x) for x in queries.labels), dtype=bool, count=len(queries.labels))
    ids = np.full(len(queries.rows), -1, dtype=np.int64) if self_ids is None else self_ids
    sims, neighbours = find(l2_normalize(xq), ids)
    rel = np.zeros(neighbours.shape, dtype=bool)
    ap = np.full(len(ids), np.nan)
    valid = np.zeros(len(ids), dtype=bool)
    parts = []
    single = ~multi
    if single.any():
        result, m, r = score_ranked(neighbours[single], queries.labels[single], index.labels,
                                    query_domains=queries.domains[single], index_domains=index.domains,
                                    protocol=protocol, self_ids=ids[single], sims=sims[single])
        parts.append(result)
        rel[single], ap[single], valid[single] = r, m.ap, m.valid
    if multi.any():
        result, m, r = multi_label_scores(neighbours[multi], queries.labels[multi], queries.domains[multi], index,
                                          ids[multi], protocol, k, label_sep, sims[multi])
        parts.append(result)
        rel[multi], ap[multi], valid[multi] = r, m.ap, m.valid
    top = min(5, k)
    first = np.where(rel.any(axis=1), rel.argmax(axis=1) + 1, 0)
    per_query = {"ap": ap, f"precision@{top}": rel[:, :top].mean(axis=1), "first_relevant": first, "scored": valid}
    return (merge_scores(parts, protocol, k) if multi.any() or len(parts) > 1 else parts[0]), neighbours, per_query


def query_labels(label: Any, label_sep: str | None) -> set[str]:
    """The labels a query is relevant to: its own, or its parts with ``label_sep``."""
    return set(str(label).split(label_sep)) if label_sep else {str(label)}


def relevant_to(label: Any, domain: Any, index: "Side", positions, protocol: str, label_sep: str | None) -> np.ndarray:
    """The relevance rule, row by row: index rows at ``positions`` relevant to a query of ``label`` and ``domain``
    (same label, one of its labels with ``label_sep``; under uned, also the same domain). ``metrics`` applies
    the same rule vectorised, to label (and domain) codes. Positions past the index are distractors."""
    wanted = query_labels(label, label_sep)
    n = len(index.labels)
    return np.array([j < n and index.labels[j] in wanted and (protocol != "uned" or index.domains[j] == domain)
                     for j in positions], dtype=bool)


def multi_label_scores(neighbours, labels, domains, index: Side, self_ids, protocol: str, k: int,
                       label_sep: str, sims=None):
    """Per-domain scores of queries with several labels ("a|b") from their ``neighbours``: a neighbour is
    relevant when its label is one of them (and, under uned, its domain is the query's). Index rows carry
    one label each. Returns the result, the per-query metrics and the relevance."""
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
    if protocol == "ilias":
        m = m._replace(ap=tied_ap(rel, sims, n_rel))
    out = {str(dom): summarize(m, domains == dom, k) for dom in dict.fromkeys(domains)}
    return {"protocol": protocol, "k": k, "overall": {}, "domains": out}, m, rel


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
        return features  # normalised (into float32) where it is searched
    raise EvalError(f"unknown zero-shot mode {zero_shot!r}; expected one of {', '.join(ZERO_SHOT)}")


IN_MEMORY_SHARE = 4  # the index's features are kept in memory when they take at most max_memory / this


@dataclass
class EvalSet:
    """Queries and index, with the queries' features read once. The index's features are read once too when
    they fit in memory (any number of heads can then be scored against it: ``sweep`` does, for every head
    it trains); otherwise each evaluation streams them block by block, and peak memory is the queries, their
    top-k and one block, whatever the index size. ``distractors`` are rows searched after the index that
    are never relevant (ILIAS's 100M YFCC images)."""

    queries: Side
    index: Side
    self_ids: np.ndarray | None
    caches: list[FeatureCache]
    source: Any  # what the result records as its "cache"
    query_features: np.ndarray
    index_features: np.ndarray | None  # None: the index is the query set itself, or it is streamed
    domains: list[str] | None = None  # the domains taking part; None: all
    distractors: list[tuple[FeatureCache, int]] = field(default_factory=list)  # (cache, its valid rows)
    streamed: bool = False
    block_rows: int = 1 << 18

    @classmethod
    def load(cls, cache_path=None, query_cache=None, index_cache=None, domains: list[str] | None = None,
             distractors: list | None = None, max_memory: int = 2 << 30) -> "EvalSet":
        """Queries and index of a cache, or the valid rows of a query cache against those of one or more index
        caches (``index_cache``: one, or a list), optionally of ``domains`` only, and the valid rows of the
        ``distractors`` caches."""
        index_caches = [] if index_cache is None else list(index_cache) if isinstance(index_cache, (list, tuple)) \
            else [index_cache]
        main = FeatureCache.open(cache_path) if cache_path is not None else None
        qc = FeatureCache.open(query_cache) if query_cache is not None else None
        ics = [FeatureCache.open(c) for c in index_caches]
        if main is None and qc is None:
            raise EvalError("give --cache, or --query-cache and --index-cache")
        if main is not None and (qc is not None or ics):
            raise EvalError("give --cache, or --query-cache and --index-cache, not both")
        extra = [FeatureCache.open(d) for d in distractors or []]
        for c in [c for c in (main, qc) if c is not None] + ics + extra:
            c.require_complete()
        caches = [c for c in (main, qc) if c is not None]
        caches += [c for c in ics if all(c.key != seen.key for seen in caches)]  # each checked against a run once
        if domains:
            known = set().union(*(set(c.strings("domains").tolist()) for c in caches))
            unknown = [d for d in domains if d not in known]
            if unknown:
                raise EvalError(f"--domain {unknown[0]}: no such domain (domains: {', '.join(sorted(known))})")
        queries, index, self_ids = select(main, qc, ics, domains)
        if len(queries.rows) == 0:
            raise EvalError("the query set is empty (no valid query rows)")
        if len(index) == 0:
            raise EvalError("the index set is empty (no valid index rows)")
        space = feature_space(index.cache.meta)
        for d in extra:
            if feature_space(d.meta) != space:
                raise EvalError(f"--distractors {d.path} ({describe_space(feature_space(d.meta))}) and the index "
                                f"{index.cache.path} ({describe_space(space)}) hold different kinds of vectors")
        parts = [(d, int(d.valid().sum())) for d in extra]
        same = index is queries and not parts
        named = [absolute(c, resolve=True) for c in index_caches]
        source = (absolute(cache_path, resolve=True) if cache_path is not None
                  else {"query": absolute(query_cache, resolve=True), "index": named[0] if len(named) == 1 else named})
        if parts:
            source = {"index": source, "distractors": [absolute(d.path, resolve=True) for d in extra]}
        row_bytes = max(c.dim * np.dtype(c.meta["dtype"]).itemsize for c, _ in index.parts)
        total = len(index) + sum(n for _, n in parts)
        streamed = total * row_bytes > max_memory // IN_MEMORY_SHARE
        block_rows = block_rows_for(max_memory, [c for c, _ in index.parts])
        index_features = None if same or streamed else np.concatenate(
            [c.features(rows) for c, rows in index.parts] + [d.features(d.valid()) for d, _ in parts])
        return cls(queries, index, self_ids, caches + extra, source, queries.cache.features(queries.rows),
                   index_features, sorted(domains) if domains else None, parts, streamed, block_rows)

    @property
    def index_rows(self) -> int:
        """Rows searched: the index, then the distractors."""
        return len(self.index) + sum(n for _, n in self.distractors)

    def features_at(self, positions: np.ndarray) -> np.ndarray:
        """Raw features of index positions (the index's rows, then the distractors' valid rows), in the order
        given: what query expansion adds to a query."""
        positions = np.asarray(positions, dtype=np.int64)
        if not self.streamed:
            source = self.query_features if self.index_features is None else self.index_features
            return source[positions]
        # as the in-memory path concatenates them: in the widest of the caches' dtypes
        dtype = np.result_type(*[c.meta["dtype"] for c, _ in self.index.parts + self.distractors])
        out = np.empty((len(positions), self.index.cache.dim), dtype=dtype)

        def fill(cache: FeatureCache, rows: np.ndarray, here: np.ndarray) -> None:
            unique, back = np.unique(rows, return_inverse=True)  # read in row order, once each
            out[here] = cache.features(unique)[back]

        for cache, rows, here in self.index.located(positions):
            fill(cache, rows, here)
        beyond = positions - len(self.index)  # the distractors' valid-row ordinals, as index_blocks reads them
        for cache, rows, here in rows_at(self.distractors, np.where(beyond >= 0, beyond, -1), self.block_rows):
            fill(cache, rows, here)
        return out

    def index_blocks(self, embed_block: Callable[[np.ndarray], np.ndarray], xq: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """(offset, embedded rows) of the index then the distractors: one block when the features are in
        memory, else blocks of ``block_rows`` read from the caches as they are searched."""
        if not self.streamed:
            yield 0, xq if self.index_features is None else embed_block(self.index_features)
            return
        def embedded(cache: FeatureCache, rows: np.ndarray) -> np.ndarray:
            try:
                return embed_block(cache.features(rows))
            except EvalError as e:  # its row numbers count from the block: say where the block starts
                raise EvalError(f"{cache.path}, the block from row {rows[0]}: {e}") from None

        offset = 0
        for cache, part in self.index.parts:
            for lo in range(0, len(part), self.block_rows):
                rows = part[lo:lo + self.block_rows]
                yield offset, embedded(cache, rows)
                offset += len(rows)
        yield from valid_blocks(self.distractors, self.block_rows, embedded, offset)


@dataclass
class EvalOutput:
    result: dict[str, Any]
    queries: Side  # with ``show``: only the shown queries
    index: Side
    neighbours: np.ndarray  # (S, k) index positions (then the distractors'), for the S shown queries
    relevant: np.ndarray  # (S, k) bool
    per_query: dict[str, np.ndarray] = field(default_factory=dict)  # every query: ap, precision@5, first_relevant


def run_eval(
    cache_path: str | Path | None = None,
    *,
    run: Run | str | Path | None = None,
    zero_shot: str | None = None,
    protocol: str = "guiec",
    query_cache: str | Path | None = None,
    index_cache: str | Path | list | None = None,
    k: int = 5,
    max_memory: int = 2 << 30,
    show: int = 0,
    eval_set: EvalSet | None = None,
    label_sep: str | None = None,
    qe: int = 0,
    dba: int = 0,
    alpha: float = 3.0,
) -> EvalOutput:
    """Score a run's head (or a zero-shot baseline) on a cache's queries and index; ``eval_set`` reuses
    features already loaded. With ``show`` > 0, also keep the top-k neighbours of ``show`` queries (for plots).
    ``label_sep`` declares multi-label queries (see ``scores``). A run's result is recorded in its directory
    as the latest of its kind (which caches, protocol, k, domains, expansion).

    Off by default, so that GUIEC and UnED scores are the plain ones: ``qe`` > 0 is alpha query expansion
    (Radenovic et al., 2018): each query is searched again as the L2-normalised sum of itself and its ``qe``
    first neighbours, neighbour j weighted by max(0, s_j) ** ``alpha`` (ILIAS's own expansion is
    ``alpha`` = 1). ``dba`` > 0 is database-side augmentation: every index row becomes the same weighted sum
    of itself and its ``dba`` nearest other index rows, before any query is searched (it needs the index in
    memory)."""
    if run is not None and zero_shot is not None:
        raise EvalError("give --run or --zero-shot, not both")
    if run is None and zero_shot is None:
        zero_shot = "pooled"
    run = Run.load(run) if run is not None and not isinstance(run, Run) else run
    es = eval_set or EvalSet.load(cache_path, query_cache, index_cache, max_memory=max_memory)
    if run is not None:
        for c in es.caches:
            check_run_fits(run, c)
    queries, index, self_ids = es.queries, es.index, es.self_ids
    available = es.index_rows - (1 if self_ids is not None else 0)
    if k > available:
        raise EvalError(f"--k {k} is larger than the index ({available} rows{' besides the query itself' if self_ids is not None else ''})")
    xq = embed(es.query_features, run, zero_shot)
    check_finite(xq, "")

    def embed_block(raw: np.ndarray) -> np.ndarray:
        try:
            return l2_normalize(embed(raw, run, zero_shot))
        except ValueError as e:  # l2_normalize's count of rows that are not finite
            raise EvalError(f"index {e}; the head or the cache is broken") from None

    if min(qe, dba) < 0 or alpha < 0:
        raise EvalError(f"--qe {qe}, --dba {dba}, --alpha {alpha}: give numbers of neighbours and an alpha >= 0")
    if qe > available:
        raise EvalError(f"--qe {qe} is larger than the index ({available} rows)")
    if dba and (es.index_rows < 2 or dba >= es.index_rows):
        raise EvalError(f"--dba {dba}: each index row needs that many other rows (the index has {es.index_rows})")
    augmented = None
    if dba:
        if es.streamed:
            raise EvalError(f"--dba {dba}: database-side augmentation needs the index in memory ({es.index_rows:,} rows "
                            "are streamed from disk); raise --max-memory or leave --dba out")
        xb = next(es.index_blocks(embed_block, l2_normalize(xq)))[1]
        sims, near = search_blocks(xb, iter([(0, xb)]), min(dba, len(xb) - 1), self_ids=np.arange(len(xb)),
                                   max_memory=max_memory // 2)
        augmented = l2_normalize(expanded(xb, xb[near], sims, alpha))

    def find(qn: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        def blocks():
            return iter([(0, augmented)]) if augmented is not None else es.index_blocks(embed_block, qn)

        found = search_blocks(qn, blocks(), max(k, qe), self_ids=ids, max_memory=max_memory // 2, total=es.index_rows)
        if not qe:
            return found
        sims, near = found[0][:, :qe], found[1][:, :qe]
        rows = augmented[near] if augmented is not None else \
            l2_normalize(embed(es.features_at(near.ravel()), run, zero_shot)).reshape(*near.shape, -1)
        return search_blocks(l2_normalize(expanded(qn, rows, sims, alpha)), blocks(), k, self_ids=ids,
                             max_memory=max_memory // 2, total=es.index_rows)

    result, neighbours, per_query = scores(xq, queries, index, self_ids, protocol, k, find, label_sep)
    if qe or dba:
        result["expansion"] = {"qe": qe, "dba": dba, "alpha": alpha}
    result["embeddings"] = f"run {run.path}" if run is not None else f"zero-shot {zero_shot}"
    result["cache"] = es.source
    result["domains_scored"] = es.domains or "all"
    result["label_sep"] = label_sep
    result["featcache_version"] = __version__
    shown_neighbours = np.zeros((0, k), dtype=np.int64)
    relevant = np.zeros((0, k), dtype=bool)
    if show:
        picked = np.linspace(0, len(queries.rows) - 1, min(show, len(queries.rows))).round().astype(np.int64)
        shown_neighbours = neighbours[picked]
        queries = queries.taken(picked)
        relevant = np.array([relevant_to(lab, dom, index, row, protocol, label_sep)
                             for row, lab, dom in zip(shown_neighbours, queries.labels, queries.domains)],
                            dtype=bool).reshape(shown_neighbours.shape)
    if run is not None:
        run.record_eval({"cache": es.source, "protocol": protocol, "k": k, "domains": es.domains,
                         "label_sep": label_sep, **({"expansion": result["expansion"]} if qe or dba else {})}, result)
    return EvalOutput(result, queries, index, shown_neighbours, relevant, per_query)


PER_QUERY_MARK = b"featcache-per-query"  # the key featcache puts in the schema metadata of a --per-query file


def write_per_query(out, output: "EvalOutput", es: "EvalSet", *, overwrite: bool = False) -> None:
    """``eval --per-query FILE.parquet``: one row per query, in query order: its path, label, domain, whether it
    was scored (it has a relevant index row), its AP@k (the mAP@k term), precision at min(5, k) and the rank
    of its first relevant neighbour (0: none in the top k)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from featcache.files import write_output

    q, pq_ = es.queries, output.per_query
    top = next(name for name in pq_ if name.startswith("precision@"))
    table = pa.table({
        "path": pa.array(q.cache.strings("paths", q.rows).tolist(), pa.string()),
        "label": pa.array([str(x) for x in q.labels], pa.string()),
        "domain": pa.array([str(x) for x in q.domains], pa.string()),
        "scored": pa.array(pq_["scored"], pa.bool_()),
        f"ap@{output.result['k']}": pa.array(np.where(pq_["scored"], pq_["ap"], np.nan), pa.float64()),
        top: pa.array(pq_[top], pa.float64()),
        "first_relevant": pa.array(pq_["first_relevant"], pa.int64()),
    }).replace_schema_metadata({PER_QUERY_MARK: __version__.encode()})

    write_output(out, lambda tmp: pq.write_table(table, str(tmp)), ours=per_query_is_ours, what="per-query scores",
                 overwrite=overwrite, option="--per-query")


def per_query_is_ours(path) -> bool:
    """A parquet file ``eval --per-query`` wrote (its schema metadata says so)."""
    import pyarrow.parquet as pq

    try:
        return PER_QUERY_MARK in (pq.read_schema(str(path)).metadata or {})
    except Exception:  # not parquet, or unreadable: not one featcache wrote
        return False


def expanded(x: np.ndarray, neighbours: np.ndarray, sims: np.ndarray, alpha: float) -> np.ndarray:
    """Each row of ``x`` plus its neighbours (N, n, D) weighted by max(0, similarity) ** alpha: alpha query
    expansion, and database-side augmentation when ``x`` is the index."""
    weights = np.maximum(sims, 0).astype(np.float64) ** alpha
    return x + np.einsum("nj,njd->nd", weights, neighbours.astype(np.float64)).astype(np.float32)


def check_finite(x: np.ndarray, side: str) -> None:
    bad = int((~np.isfinite(x)).any(axis=1).sum())
    if bad:
        raise EvalError(f"{bad} {side}embeddings are NaN or infinite; the head or the cache is broken")


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
