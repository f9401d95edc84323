"""Evaluation with the index streamed from disk block by block: the same neighbours as one search over the
whole index (ties included), distractors that are searched but never relevant, and per-query results."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from featcache.evaluate.search import search_blocks
from tests.conftest import blobs, make_cache


def brute_force(q: np.ndarray, b: np.ndarray, k: int, self_ids: np.ndarray) -> np.ndarray:
    """Top-k by (-score, id), the query's own row left out: scores of small integers are exact in float32."""
    out = []
    for i, row in enumerate(q.astype(np.int64) @ b.astype(np.int64).T):
        order = [j for j in sorted(range(len(b)), key=lambda j: (-row[j], j)) if j != self_ids[i]]
        out.append(order[:k])
    return np.array(out)


@pytest.mark.parametrize("sizes", [(37,), (5, 11, 1, 20), (1,) * 37, (30, 7)])
def test_blocks_give_the_neighbours_of_one_search_ties_included(sizes):
    rng = np.random.default_rng(len(sizes))
    b = rng.integers(-2, 3, size=(37, 6)).astype(np.float32)
    b[20:30] = b[3]  # ten exact copies of one row: ties that straddle blocks and the k-th place
    q = np.concatenate([b[[3, 0, 21]], rng.integers(-2, 3, size=(5, 6)).astype(np.float32)])
    self_ids = np.array([3, 0, 21, -1, -1, -1, -1, -1])  # the first three queries are index rows
    for k in (1, 4, 12, 36):
        blocks, at = [], 0
        for n in sizes:
            blocks.append((at, b[at:at + n]))
            at += n
        _, ids = search_blocks(q, iter(blocks), k, self_ids=self_ids, total=len(b))
        np.testing.assert_array_equal(ids, brute_force(q, b, k, self_ids))


def test_more_neighbours_than_rows_is_refused():
    b = np.eye(4, dtype=np.float32)
    with pytest.raises(ValueError, match="exceeds"):
        search_blocks(b[:1], iter([(0, b)]), 4, self_ids=np.array([0]), total=4)


def split_cache(tmp_path, n_classes=12, per_class=10, dim=16, seed=0, name="c"):
    x, y = blobs(n_classes, per_class, dim=dim, noise=1.2, seed=seed)
    splits = np.where(np.arange(len(y)) % 5 == 0, "query", "index")
    domains = np.where(y % 2 == 0, "even", "odd")
    return make_cache(tmp_path, x, y, splits=splits, domains=domains, name=name), x, y, splits, domains


@pytest.mark.parametrize("protocol", ["guiec", "uned"])
def test_streamed_evaluation_equals_the_in_memory_one(tmp_path, protocol):
    from featcache.evaluate.protocols import EvalSet, run_eval

    path, *_ = split_cache(tmp_path)
    whole = EvalSet.load(path)
    streamed = EvalSet.load(path, max_memory=1 << 14)  # 96 index rows of 64 bytes in blocks of 16
    assert not whole.streamed and streamed.streamed and streamed.block_rows < len(streamed.index.rows)
    for k in (1, 5, 40):
        a = run_eval(eval_set=whole, protocol=protocol, k=k, zero_shot="raw", show=4)
        b = run_eval(eval_set=streamed, protocol=protocol, k=k, zero_shot="raw", show=4)
        assert a.result["overall"] == b.result["overall"] and a.result["domains"] == b.result["domains"]
        np.testing.assert_array_equal(a.neighbours, b.neighbours)


def test_distractors_are_searched_and_never_relevant(tmp_path):
    from featcache.evaluate.metrics import evaluate
    from featcache.evaluate.protocols import EvalSet, run_eval

    path, x, y, splits, domains = split_cache(tmp_path)
    # distractors: near copies of index rows (they push relevant rows down) and noise
    rng = np.random.default_rng(5)
    d = np.concatenate([x[splits == "index"][:40] + 0.01 * rng.normal(size=(40, 16)), rng.normal(size=(30, 16))])
    d[5] = np.nan  # an invalid row: not searched
    dpath = make_cache(tmp_path, d.astype(np.float32), [0] * len(d), name="d")  # labels of distractors are ignored
    d = np.delete(d, 5, axis=0)
    for max_memory in (2 << 30, 1 << 14):
        es = EvalSet.load(path, distractors=[dpath], max_memory=max_memory)
        got = run_eval(eval_set=es, k=10, zero_shot="raw").result
        # independent: one in-memory index where every distractor has a label no query has
        q, i = splits == "query", splits == "index"
        index = np.concatenate([x[i], d.astype(np.float32)])
        labels = [str(v) for v in y[i]] + [f"distractor {j}" for j in range(len(d))]
        want = evaluate(x[q], [str(v) for v in y[q]], index, labels, query_domains=domains[q], k=10)
        assert got["overall"] == pytest.approx(want["overall"])
        assert got["cache"]["distractors"] == [str(dpath.resolve())]
    no_distractors = run_eval(eval_set=EvalSet.load(path), k=10, zero_shot="raw").result
    assert got["overall"]["mAP@10"] < no_distractors["overall"]["mAP@10"]


def test_per_query_results(tmp_path, cli):
    path, x, y, splits, _ = split_cache(tmp_path)
    out = tmp_path / "q.parquet"
    r = cli("eval", "--cache", path, "--zero-shot", "raw", "--k", "10", "--per-query", out, "--json", tmp_path / "s.json")
    t = pq.read_table(out).to_pydict()
    scores = json.loads((tmp_path / "s.json").read_text())["overall"]
    assert len(t["path"]) == scores["queries"] + scores["excluded"] == int((splits == "query").sum())
    assert np.mean([a for a, s in zip(t["ap@10"], t["scored"]) if s]) == pytest.approx(scores["mAP@10"])
    # independent: the rank of the first relevant neighbour and precision@5, by brute force (cosine)
    q, i = np.flatnonzero(splits == "query"), np.flatnonzero(splits == "index")
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    for j, row in enumerate(q):
        order = i[np.argsort(-(xn[i] @ xn[row]), kind="stable")][:10]
        hits = y[order] == y[row]
        assert t["first_relevant"][j] == (int(np.argmax(hits)) + 1 if hits.any() else 0)
        assert t["precision@5"][j] == pytest.approx(hits[:5].mean())
    assert t["path"][0] == "img00000.png" and "per-query scores" in r.output
    cli("eval", "--cache", path, "--zero-shot", "raw", "--per-query", out, code=2)  # featcache's file: --overwrite
    cli("eval", "--cache", path, "--zero-shot", "raw", "--per-query", out, "--overwrite")
    (tmp_path / "mine.parquet").write_bytes(b"PAR1 not ours")
    cli("eval", "--cache", path, "--zero-shot", "raw", "--per-query", tmp_path / "mine.parquet", "--overwrite", code=2)


def rows_cases(n: int):
    rng = np.random.default_rng(0)
    yield np.arange(n)
    yield np.arange(9, 23)  # a span that starts and ends inside chunks
    yield np.array([n - 1])  # the partial last chunk
    yield np.sort(rng.choice(n, 11, replace=False))
    yield np.zeros(0, dtype=np.int64)
    yield rng.random(n) < 0.3  # a mask


def test_rows_of_a_span_read_only_that_span(tmp_path, monkeypatch):
    from featcache.cache import FeatureCache, import_features
    from featcache.manifest import read_manifest, write_manifest

    x = np.random.default_rng(1).normal(size=(45, 5)).astype(np.float32)
    m = read_manifest(write_manifest(tmp_path / "m.csv", [f"i{i}" for i in range(45)], ["a"] * 45))
    import_features(x, m, tmp_path / "c.zarr", source="x", source_sha256="0" * 64, dtype="float32", chunk_rows=7)
    c = FeatureCache.open(tmp_path / "c.zarr")
    for rows in rows_cases(45):
        np.testing.assert_array_equal(c.features(rows), x[rows])
    read = []
    arr = type(c.group["features"])
    real = arr.__getitem__
    monkeypatch.setattr(arr, "__getitem__", lambda self, key: read.append(key) or real(self, key))
    c.features(np.arange(30, 33))
    assert read and all(k.start >= 28 for k in read)  # from the chunk holding row 30 on, not from row 0


def brute_mp(q, q_labels, b, b_labels, k, self_ids):
    """GUIEC's mMP@k by hand: (relevant in the top k) / min(relevant in the index, k), over scored queries, with
    the cosine top k of a brute-force ranking (the query's own row left out)."""
    qn, bn = q / np.linalg.norm(q, axis=1, keepdims=True), b / np.linalg.norm(b, axis=1, keepdims=True)
    values, neighbours = [], []
    for i, row in enumerate(qn @ bn.T):
        order = [j for j in np.argsort(-row, kind="stable") if j != self_ids[i]][:k]
        neighbours.append(order)
        n_rel = sum(1 for j, lab in enumerate(b_labels) if lab == q_labels[i] and j != self_ids[i])
        if n_rel:
            values.append(sum(b_labels[j] == q_labels[i] for j in order) / min(n_rel, k))
    return float(np.mean(values)), np.array(neighbours)


def three_caches(tmp_path, classes: int, per_class: int, seed: int):
    """Blobs split row by row into two index caches (a, b) and a query cache (q): the vectors, labels, the three
    row masks and the three caches."""
    x, y = blobs(classes, per_class, dim=16, noise=1.0, seed=seed)
    first, second = np.arange(len(y)) % 3 == 0, np.arange(len(y)) % 3 == 1
    queries = ~(first | second)
    caches = [make_cache(tmp_path, x[m], y[m], name=n) for m, n in ((first, "a"), (second, "b"), (queries, "q"))]
    return x, y, first, second, queries, caches


@pytest.mark.parametrize("max_memory", [2 << 30, 1 << 13])
def test_several_index_caches_are_one_labelled_index(tmp_path, cli, max_memory):
    from featcache.evaluate.protocols import EvalSet, run_eval

    x, y, first, second, queries, (a, b, q) = three_caches(tmp_path, 8, 12, seed=3)
    index, labels = np.concatenate([x[first], x[second]]), list(y[first]) + list(y[second])
    # queries from another cache: nothing excluded
    es = EvalSet.load(query_cache=q, index_cache=[a, b], max_memory=max_memory)
    assert es.streamed == (max_memory < 1 << 20) and len(es.index) == first.sum() + second.sum()
    got = run_eval(eval_set=es, k=5, zero_shot="raw", show=int(queries.sum()))
    want, neighbours = brute_mp(x[queries], list(y[queries]), index, labels, 5, [-1] * int(queries.sum()))
    assert got.result["overall"]["mMP@5"] == pytest.approx(want)
    np.testing.assert_array_equal(got.neighbours, neighbours)
    # the second index cache's rows as queries: each is an index row (offset past the first cache) and skips itself
    es = EvalSet.load(query_cache=b, index_cache=[a, b], max_memory=max_memory)
    n_b = int(second.sum())
    got = run_eval(eval_set=es, k=5, zero_shot="raw", show=n_b)
    want, neighbours = brute_mp(x[second], list(y[second]), index, labels, 5, list(first.sum() + np.arange(n_b)))
    assert got.result["overall"]["mMP@5"] == pytest.approx(want)
    np.testing.assert_array_equal(got.neighbours, neighbours)
    # on the command line: repeatable, recorded, and refused when one cache is given twice
    cli("eval", "--query-cache", q, "--index-cache", a, "--index-cache", b, "--zero-shot", "raw", "--json",
        tmp_path / "s.json", "--max-memory", str(max_memory), "--overwrite", "--plot", tmp_path / "plots")
    assert (tmp_path / "plots" / "neighbours.png").stat().st_size > 0  # tiles from both caches
    recorded = json.loads((tmp_path / "s.json").read_text())
    assert recorded["cache"]["index"] == [str(a.resolve()), str(b.resolve())]
    r = cli("eval", "--query-cache", q, "--index-cache", a, "--index-cache", a, code=2)
    assert "given twice" in r.output
    r = cli("eval", "--cache", q, "--index-cache", a, code=2)
    assert "not both" in r.output


def test_search_streams_caches_as_an_index_would_answer(tmp_path, cli):
    x, y, first, second, queries, (a, b, q) = three_caches(tmp_path, 6, 10, seed=4)
    # raw vectors against two caches, streamed 8 rows a block: the brute-force cosine ranking
    cli("search", "--query-cache", q, "--index-cache", a, "--index-cache", b, "--k", "7", "--max-memory", "8KB",
        "--json", tmp_path / "s.json", "-q")
    got = json.loads((tmp_path / "s.json").read_text())
    index, labels = np.concatenate([x[first], x[second]]), np.concatenate([y[first], y[second]])
    _, neighbours = brute_mp(x[queries], list(y[queries]), index, list(labels), 7, [-1] * int(queries.sum()))
    qn, bn = (v / np.linalg.norm(v, axis=1, keepdims=True) for v in (x[queries], index))
    for i, result in enumerate(got["queries"]):
        assert [n["label"] for n in result["neighbours"]] == [str(v) for v in labels[neighbours[i]]]
        assert [n["score"] for n in result["neighbours"]] == pytest.approx((bn[neighbours[i]] @ qn[i]).tolist(), abs=1e-6)
        want_paths = [str(tmp_path / f"img{j if j < first.sum() else j - first.sum():05d}.png") for j in neighbours[i]]
        assert [n["path"] for n in result["neighbours"]] == want_paths
    assert got["index"] == [str(a.resolve()), str(b.resolve())]
    # the zero-shot pooling on both sides: 16 dims averaged in pairs to 8 (eval's baseline, by hand here)
    wide = make_cache(tmp_path, np.repeat(x, 8, axis=1)[:, :128] + 0.01 * np.arange(128), y, name="wide")  # 128-d
    cli("search", "--query-cache", wide, "--index-cache", wide, "--zero-shot", "pooled", "--k", "3", "--json",
        tmp_path / "p.json", "-q", "--max-memory", "8KB")
    by_hand = (np.repeat(x, 8, axis=1)[:, :128] + 0.01 * np.arange(128)).reshape(len(x), 64, 2).mean(axis=2)
    _, want = brute_mp(by_hand, list(y), by_hand, list(y), 3, [-1] * len(y))
    pooled_rows = [[int(Path(n["path"]).stem[3:]) for n in r["neighbours"]]
                   for r in json.loads((tmp_path / "p.json").read_text())["queries"]]
    assert pooled_rows == want.tolist()
    # with a run's head: what faiss's exact index of the same cache answers
    cli("train-head", "--cache", a, "--epochs", "1", "--batch-size", "8", "--out", tmp_path / "run", "--embed-dim", "8")
    cli("index", "--cache", a, "--run", tmp_path / "run", "--out", tmp_path / "idx")
    cli("search", "--index", tmp_path / "idx", "--query-cache", q, "--k", "5", "--json", tmp_path / "flat.json", "-q")
    cli("search", "--index-cache", a, "--run", tmp_path / "run", "--query-cache", q, "--k", "5", "--max-memory", "4KB",
        "--json", tmp_path / "streamed.json", "-q")
    flat, streamed = (json.loads((tmp_path / f).read_text())["queries"] for f in ("flat.json", "streamed.json"))
    for f, s in zip(flat, streamed):
        assert f["query"] == s["query"] and [n["path"] for n in f["neighbours"]] == [n["path"] for n in s["neighbours"]]
        assert [n["score"] for n in f["neighbours"]] == pytest.approx([n["score"] for n in s["neighbours"]], abs=1e-5)
    for bad, words in ((("--index-cache", a), "--query-cache"), (("--query-cache", q), "one of them"),
                       (("--query-cache", q, "--index", tmp_path / "idx", "--run", tmp_path / "run"), "--run and"),
                       (("--query-cache", q, "--index-cache", a, "--run", tmp_path / "run", "--zero-shot", "raw"), "not both")):
        assert words in " ".join(cli("search", *bad, code=2).output.replace("│", " ").split())


def test_index_caches_are_each_checked_read_in_their_own_dtype_and_not_held_per_row(tmp_path, cli, monkeypatch):
    import shutil

    from featcache.cache import FeatureCache, import_features
    from featcache.evaluate.protocols import EvalSet, run_eval
    from featcache.manifest import read_manifest

    x, y = blobs(6, 8, dim=16, noise=1.0, seed=7)
    a = make_cache(tmp_path, x[:24] * 1e5, y[:24], name="a")  # float32 values that float16 cannot hold
    # a second index cache in float16, with values float16 holds only approximately
    import_features((x[24:] * 3.3).astype(np.float32), read_manifest(make_cache(tmp_path, x[24:], y[24:], name="h32")
                    .with_suffix(".csv")), tmp_path / "h.zarr", source="h.npy", source_sha256="0" * 64, dtype="float16")
    h = tmp_path / "h.zarr"
    # query expansion reads neighbours' features back: streamed, as in memory (float16 rows widened alike)
    whole = run_eval(eval_set=EvalSet.load(query_cache=a, index_cache=[h, a]), k=5, zero_shot="raw", qe=2, show=24)
    streamed_set = EvalSet.load(query_cache=a, index_cache=[h, a], max_memory=1 << 12)
    assert streamed_set.streamed
    streamed = run_eval(eval_set=streamed_set, k=5, zero_shot="raw", qe=2, show=24)
    assert streamed.result["overall"] == whole.result["overall"]
    np.testing.assert_array_equal(streamed.neighbours, whole.neighbours)
    # a damaged copy of the query cache (same key) is refused as an index cache, as any other cache is
    shutil.copytree(a, tmp_path / "copy.zarr")
    chunk = next(p for p in (tmp_path / "copy.zarr" / "features" / "c").rglob("*") if p.is_file())
    chunk.unlink()
    for command in (("eval", "--zero-shot", "raw"), ("search", "-q")):
        r = cli(*command, "--query-cache", a, "--index-cache", tmp_path / "copy.zarr", code=2)
        assert "damaged" in r.output or "missing" in r.output
    # search reads the paths, labels and domains of the neighbours only, never a whole column of an index cache
    whole_reads = []
    strings, labels = FeatureCache.strings, FeatureCache.labels
    monkeypatch.setattr(FeatureCache, "strings", lambda self, name, rows=None: (
        whole_reads.append((self.path.name, name)) if rows is None else None) or strings(self, name, rows))
    monkeypatch.setattr(FeatureCache, "labels", lambda self, rows=None: (
        whole_reads.append((self.path.name, "labels")) if rows is None else None) or labels(self, rows))
    q = make_cache(tmp_path, x[:3], y[:3], name="q")
    cli("search", "--query-cache", q, "--index-cache", a, "--index-cache", h, "--k", "4", "--json", tmp_path / "s.json", "-q")
    assert not [r for r in whole_reads if r[0] != "q.zarr"], whole_reads
    got = json.loads((tmp_path / "s.json").read_text())["queries"]
    index = np.concatenate([x[:24], np.float16(x[24:] * 3.3).astype(np.float32)])
    _, want = brute_mp(x[:3], list(y[:3]), index, list(y), 4, [-1] * 3)
    assert [[n["label"] for n in r["neighbours"]] for r in got] == [[str(v) for v in y[w]] for w in want]


def test_eval_set_takes_one_index_cache_as_any_path_like(tmp_path):
    from featcache.evaluate.protocols import EvalSet

    class Where:  # a PathLike that is neither str nor Path (as a Remote is not)
        def __init__(self, path):
            self.path = path

        def __fspath__(self):
            return str(self.path)

    x, y = blobs(3, 6, dim=8)
    a, b = make_cache(tmp_path, x, y, name="a"), make_cache(tmp_path, x, y, name="b")
    es = EvalSet.load(query_cache=a, index_cache=Where(b))
    assert len(es.index) == len(y) and es.self_ids is None
