"""Tests for featcache.evaluate.search and featcache.evaluate.metrics.

Search results are compared with an independent brute force (full float64 matmul, then a stable
sort on (-score, id)); metric values are worked out by hand and written as literal fractions.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from featcache.evaluate.metrics import count_relevant, evaluate, query_metrics, relevance
from featcache.evaluate.search import _plan, l2_normalize, search

# ---------------------------------------------------------------------------------------------
# independent reference


def brute_force(xq, xb, k, self_ids=None):
    """Full score matrix in float64, self row removed, rows ordered by (-score, id)."""
    s = np.asarray(xq, np.float64) @ np.asarray(xb, np.float64).T
    if self_ids is not None:
        s[np.arange(len(xq)), self_ids] = -np.inf
    ids = np.broadcast_to(np.arange(xb.shape[0]), s.shape)
    order = np.lexsort((ids, -s), axis=1)[:, :k]
    return np.take_along_axis(s, order, 1), order


def unit(rng, n, d):
    x = rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def small_ints(rng, n, d, lo=-1, hi=1):
    """Small-integer vectors: every dot product is exact in float32 whatever the summation order,
    so ties are real ties for faiss and for the float64 reference alike."""
    return rng.integers(lo, hi + 1, (n, d)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# l2_normalize


def test_l2_normalize_rows_dtype_and_zero_rows():
    x = np.array([[3.0, 4.0], [0.0, 0.0], [1e-30, 0.0], [-2.0, 0.0]], dtype=np.float64)
    y = l2_normalize(np.asfortranarray(x))
    assert y.dtype == np.float32 and y.flags.c_contiguous
    np.testing.assert_allclose(y, [[0.6, 0.8], [0, 0], [1, 0], [-1, 0]], rtol=1e-6)
    assert not np.shares_memory(y, x)
    y16 = l2_normalize(x.astype(np.float16)[:1])
    np.testing.assert_allclose(y16, [[0.6, 0.8]], rtol=1e-3)


def test_l2_normalize_copies_float32_input():
    x = np.ones((3, 4), np.float32)
    y = l2_normalize(x)
    assert not np.shares_memory(x, y)
    np.testing.assert_allclose(y, 0.5)
    np.testing.assert_array_equal(x, 1.0)


def test_l2_normalize_rejects_non_finite():
    x = np.ones((10, 3), np.float32)
    x[4, 1] = np.nan
    x[7, 0] = np.inf
    with pytest.raises(ValueError, match=r"^2 embeddings are NaN or infinite \(first at row 4\)$"):
        l2_normalize(x)


# ---------------------------------------------------------------------------------------------
# search vs brute force


def test_search_matches_brute_force_random():
    rng = np.random.default_rng(0)
    xq, xb = unit(rng, 60, 16), unit(rng, 1000, 16)
    s, i = search(xq, xb, 10)
    rs, ri = brute_force(xq, xb, 10)
    assert s.dtype == np.float32 and i.dtype == np.int64 and s.shape == i.shape == (60, 10)
    np.testing.assert_array_equal(i, ri)
    np.testing.assert_allclose(s, rs, atol=1e-5)


def test_search_tiny_memory_many_blocks_and_shards():
    rng = np.random.default_rng(1)
    xq, xb = unit(rng, 60, 8), unit(rng, 300, 8)
    budget = 6400
    qblock, shard = _plan(60, 300, 8, 10, budget)  # only to check the case really is blocked
    assert qblock < 60 / 4 and shard < 300 / 4
    s, i = search(xq, xb, 5, max_memory=budget)
    rs, ri = brute_force(xq, xb, 5)
    np.testing.assert_array_equal(i, ri)
    np.testing.assert_allclose(s, rs, atol=1e-5)
    s2, i2 = search(xq, xb, 5)  # the unblocked search gives the same answer
    np.testing.assert_array_equal(i2, i)


def test_search_budget_too_small_is_an_error():
    rng = np.random.default_rng(1)
    with pytest.raises(ValueError, match="max_memory"):
        search(unit(rng, 4, 8), unit(rng, 50, 8), 3, max_memory=100)


@pytest.mark.parametrize("max_memory", [2 << 30, 5000])
@pytest.mark.parametrize("with_self", [False, True])
def test_search_ties_broken_by_id(max_memory, with_self):
    rng = np.random.default_rng(2)
    # d=4 with entries in {-1,0,1}: 81 distinct vectors for 400 rows -> many exact duplicates and
    # many equal scores, also across the k-th position
    xb = small_ints(rng, 400, 4)
    if with_self:
        xq, self_ids = xb[:50], np.arange(50)
    else:
        xq, self_ids = small_ints(rng, 50, 4), None
    s, i = search(xq, xb, 7, self_ids=self_ids, max_memory=max_memory)
    rs, ri = brute_force(xq, xb, 7, self_ids)
    np.testing.assert_array_equal(i, ri)
    np.testing.assert_array_equal(s, rs)
    assert ((s[:, :-1] > s[:, 1:]) | ((s[:, :-1] == s[:, 1:]) & (i[:, :-1] < i[:, 1:]))).all()


def test_search_long_tie_at_the_boundary_returns_lowest_ids():
    # 300 identical rows scattered among worse ones: the tie runs far past the candidates faiss
    # is first asked for; the answer must be the 6 lowest ids of the tie, after the 2 better rows
    rng = np.random.default_rng(3)
    n = 1000
    xb = np.zeros((n, 3), np.float32)
    xb[:, 1] = 1.0  # score 0 with the query
    tied = np.sort(rng.choice(n, 300, replace=False))
    xb[tied] = [1.0, 0.0, 0.0]  # score 1
    better = [int(tied[200]), 5 if 5 not in tied else 6]
    xb[better[0]] = [3.0, 0.0, 0.0]
    xb[better[1]] = [2.0, 0.0, 0.0]
    rest = [t for t in tied if t != better[0]]
    q = np.array([[1.0, 0.0, 0.0]], np.float32)
    for mem in (2 << 30, 4000):
        s, i = search(q, xb, 8, max_memory=mem)
        assert i[0].tolist() == better + rest[:6]
        assert s[0].tolist() == [3, 2, 1, 1, 1, 1, 1, 1]


def test_search_exact_duplicates_by_hand():
    xb = np.array(
        [[0, 1], [1, 0], [0, 1], [1, 0], [0.6, 0.8], [1, 0]], dtype=np.float32
    )  # rows 1, 3, 5 equal the query
    q = np.array([[1, 0]], np.float32)
    s, i = search(q, xb, 4)
    assert i[0].tolist() == [1, 3, 5, 4]
    np.testing.assert_allclose(s[0], [1, 1, 1, 0.6], rtol=1e-6)
    # the query is row 3 itself: only row 3 goes, its duplicates 1 and 5 stay
    s, i = search(q, xb, 4, self_ids=np.array([3]))
    assert i[0].tolist() == [1, 5, 4, 0]


def test_search_self_ids_keep_duplicates_of_the_query():
    rng = np.random.default_rng(4)
    x = unit(rng, 200, 16)
    x[150] = x[20]  # exact duplicate of row 20
    x[151] = x[20]
    s, i = search(x, x, 5, self_ids=np.arange(200))
    rs, ri = brute_force(x, x, 5, np.arange(200))
    np.testing.assert_array_equal(i, ri)
    np.testing.assert_allclose(s, rs, atol=1e-5)
    assert not (i == np.arange(200)[:, None]).any()  # nobody finds itself
    assert i[20, :2].tolist() == [150, 151]  # but the duplicates are found, lower id first
    assert i[150, :2].tolist() == [20, 151]
    assert i[151, :2].tolist() == [20, 150]


def test_search_self_not_among_candidates_drops_the_last():
    # self_ids that point at rows far from the query: removing self must not remove anything
    rng = np.random.default_rng(5)
    xq, xb = unit(rng, 30, 8), unit(rng, 200, 8)
    self_ids = np.argmin(xq @ xb.T, axis=1)  # the worst row for each query
    s, i = search(xq, xb, 5, self_ids=self_ids, max_memory=5000)
    rs, ri = brute_force(xq, xb, 5, self_ids)
    np.testing.assert_array_equal(i, ri)
    np.testing.assert_array_equal(i, brute_force(xq, xb, 5)[1])


class FakeTensor:
    """Stands in for a torch tensor (detach/cpu/numpy) without paying torch's import time here."""

    def __init__(self, a):
        self.a, self.dtype = a, "torch.float32"

    def detach(self):
        return self

    def cpu(self):
        return self

    def numpy(self):
        return self.a


def test_search_accepts_float16_fortran_and_tensors():
    rng = np.random.default_rng(6)
    xq, xb = unit(rng, 25, 8), unit(rng, 100, 8)
    ref = brute_force(xq, xb, 3)[1]
    np.testing.assert_array_equal(search(np.asfortranarray(xq), xb.astype(np.float64), 3)[1], ref)
    # float16 rounding may reorder near ties further down; the top neighbour is clear
    np.testing.assert_array_equal(search(xq, xb.astype(np.float16), 3)[1][:, 0], ref[:, 0])
    np.testing.assert_array_equal(search(FakeTensor(xq), FakeTensor(xb), 3)[1], ref)


def test_search_faiss_settings_restored():
    import faiss

    threads = faiss.omp_get_max_threads()
    db_bs = faiss.cvar.distance_compute_blas_database_bs
    rng = np.random.default_rng(7)
    search(unit(rng, 5, 4), unit(rng, 20, 4), 2, threads=1)
    assert faiss.omp_get_max_threads() == threads
    assert faiss.cvar.distance_compute_blas_database_bs == db_bs
    with pytest.raises(ValueError):
        search(unit(rng, 5, 4), unit(rng, 20, 4), 2, threads=1, max_memory=10)
    assert faiss.omp_get_max_threads() == threads


def test_search_bad_k():
    rng = np.random.default_rng(8)
    xq, xb = unit(rng, 3, 4), unit(rng, 5, 4)
    assert search(xq, xb, 5)[1].shape == (3, 5)
    with pytest.raises(ValueError, match="k=6") as e:
        search(xq, xb, 6)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="k=5.*itself"):
        search(xb, xb, 5, self_ids=np.arange(5))
    with pytest.raises(ValueError, match="k must be"):
        search(xq, xb, 0)


def test_search_nan_and_dims():
    rng = np.random.default_rng(9)
    xq, xb = unit(rng, 3, 4), unit(rng, 5, 4)
    xb[2, 0] = np.nan
    with pytest.raises(ValueError, match=r"1 embeddings are NaN or infinite \(first at row 2\)"):
        search(xq, xb, 2)
    with pytest.raises(ValueError, match="dim"):
        search(xq, unit(rng, 5, 3), 2)


# ---------------------------------------------------------------------------------------------
# metrics by hand


def test_query_metrics_by_hand():
    rel = np.array(
        [
            [0, 1, 0, 0, 0],  # n_q = 1
            [1, 0, 1, 1, 0],  # n_q = 3
            [0, 1, 1, 0, 1],  # n_q = 7
            [0, 0, 0, 0, 0],  # n_q = 0: excluded
        ],
        dtype=bool,
    )
    m = query_metrics(rel, np.array([1, 3, 7, 0]))
    # mMP@5: hits among the first min(n_q, 5) positions / min(n_q, 5)
    np.testing.assert_allclose(m.mp[:3], [0 / 1, 2 / 3, 3 / 5])
    # mAP@5: sum over the top 5 of P(j) at relevant j, / min(n_q, 5)
    np.testing.assert_allclose(
        m.ap[:3], [(1 / 2) / 1, (1 / 1 + 2 / 3 + 3 / 4) / 3, (1 / 2 + 2 / 3 + 3 / 5) / 5]
    )
    np.testing.assert_allclose(m.r1[:3], [0, 1, 0])
    assert m.valid.tolist() == [True, True, True, False]
    assert math.isnan(m.mp[3]) and math.isnan(m.ap[3]) and math.isnan(m.r1[3])


def test_relevance_and_count_relevant_by_hand():
    index_keys = np.array([3, 1, 3, 2, 3, 1])
    query_keys = np.array([3, 1, 9])
    ids = np.array([[0, 1], [5, 4], [2, 3]])
    assert relevance(ids, query_keys, index_keys).tolist() == [
        [True, False],
        [True, False],
        [False, False],
    ]
    assert count_relevant(query_keys, index_keys).tolist() == [3, 2, 0]
    # queries are index rows 4, 1, 3: the own row is subtracted only where it is relevant
    assert count_relevant(np.array([3, 1, 9]), index_keys, self_ids=np.array([4, 1, 3])).tolist() == [
        2,
        1,
        0,
    ]


def build(spec, extra=()):
    """Embeddings whose ranking is fixed by construction.

    spec: one (label, domain, ranked) per query; ranked lists the (label, domain) of that query's
    designed index rows in rank order, with cosine 0.9, 0.8, 0.7, ... All other rows score 0 with
    the query. extra: (label, domain) rows with a zero vector (never in anyone's top k here, but
    they count as relevant rows).
    """
    nq = len(spec)
    rows = [(q, r, lab) for q, (_, _, ranked) in enumerate(spec) for r, lab in enumerate(ranked)]
    dim = nq + len(rows)
    qe = np.eye(nq, dim, dtype=np.float64)
    ie = np.zeros((len(rows) + len(extra), dim))
    for j, (q, r, _) in enumerate(rows):
        c = 0.9 - 0.1 * r
        ie[j, q] = c
        ie[j, nq + j] = math.sqrt(1 - c * c)
    index = [lab for _, _, lab in rows] + list(extra)
    return (
        qe,
        [s[0] for s in spec],
        [s[1] for s in spec],
        ie,
        [lab for lab, _ in index],
        [dom for _, dom in index],
    )


def test_evaluate_guiec_by_hand_1_3_7_and_none_relevant():
    J = ("junk", "d")
    spec = [
        ("p", "d", [J, ("p", "d"), J, J, J]),  # n = 1
        ("q", "d", [("q", "d"), J, ("q", "d"), ("q", "d"), J]),  # n = 3
        ("r", "d", [J, ("r", "d"), ("r", "d"), J, ("r", "d")]),  # n = 3 + 4 extra = 7
        ("s", "d", [J, J, J, J, J]),  # n = 0: excluded
    ]
    qe, ql, qd, ie, il, idm = build(spec, extra=[("r", "d")] * 4)
    res = evaluate(qe, ql, ie, il)
    mp = [0 / 1, 2 / 3, 3 / 5]
    ap = [(1 / 2) / 1, (1 / 1 + 2 / 3 + 3 / 4) / 3, (1 / 2 + 2 / 3 + 3 / 5) / 5]
    expected = {
        "mMP@5": sum(mp) / 3,
        "mAP@5": sum(ap) / 3,
        "R@1": (0 + 1 + 0) / 3,
        "queries": 3,
        "excluded": 1,
    }
    assert res["protocol"] == "guiec" and res["k"] == 5
    assert set(res) == {"protocol", "k", "overall", "domains"}
    assert set(res["overall"]) == set(expected)
    for key, val in expected.items():
        assert res["overall"][key] == pytest.approx(val), key
    assert list(res["domains"]) == ["all"]
    assert res["domains"]["all"] == pytest.approx(res["overall"])
    # same numbers with integer labels and the k in the key names following k
    codes = {"p": 10, "q": 11, "r": 12, "s": 13, "junk": 14}
    res_int = evaluate(qe, [codes[x] for x in ql], ie, np.array([codes[x] for x in il]))
    assert res_int["overall"] == pytest.approx(res["overall"])
    res3 = evaluate(qe, ql, ie, il, k=3)
    assert set(res3["overall"]) == {"mMP@3", "mAP@3", "R@1", "queries", "excluded"}
    # k = 3: m = min(n, 3) -> 1, 3, 3; ranks 1..3 only
    assert res3["overall"]["mMP@3"] == pytest.approx((0 / 1 + 2 / 3 + 2 / 3) / 3)
    assert res3["overall"]["mAP@3"] == pytest.approx(((1 / 2) + (1 + 2 / 3) / 3 + (1 / 2 + 2 / 3) / 3) / 3)


def domain_case():
    spec = [
        ("a", "x", [("a", "y"), ("a", "x"), ("j", "x"), ("j", "x"), ("j", "x")]),
        ("b", "x", [("b", "x"), ("j", "x"), ("j", "x"), ("j", "x"), ("j", "x")]),
        ("a", "y", [("j", "y"), ("a", "x"), ("a", "y"), ("j", "y"), ("j", "y")]),
    ]
    return build(spec)


def check(result, expected):
    for key, val in expected.items():
        assert result[key] == pytest.approx(val), key


def test_evaluate_guiec_vs_uned_by_hand():
    qe, ql, qd, ie, il, idm = domain_case()
    # GUIEC: relevant = same label, whatever the domain; 4 "a" rows (2 in x, 2 in y)
    g = evaluate(qe, ql, ie, il, query_domains=qd, index_domains=idm, protocol="guiec")
    # q1 rel 1 1 0 0 0, n 4 | q2 rel 1 0 0 0 0, n 1 | q3 rel 0 1 1 0 0, n 4
    g_mp = [(1 + 1 + 0 + 0) / 4, 1 / 1, (0 + 1 + 1 + 0) / 4]
    g_ap = [(1 / 1 + 2 / 2) / 4, 1 / 1, (1 / 2 + 2 / 3) / 4]
    g_r1 = [1, 1, 0]
    check(g["overall"], {"mMP@5": sum(g_mp) / 3, "mAP@5": sum(g_ap) / 3, "R@1": 2 / 3, "queries": 3, "excluded": 0})
    check(g["domains"]["x"], {"mMP@5": (g_mp[0] + g_mp[1]) / 2, "mAP@5": (g_ap[0] + g_ap[1]) / 2, "R@1": 1, "queries": 2})
    check(g["domains"]["y"], {"mMP@5": g_mp[2], "mAP@5": g_ap[2], "R@1": g_r1[2], "queries": 1})
    assert g["overall"]["mMP@5"] == pytest.approx(2 / 3)
    assert g["overall"]["mAP@5"] == pytest.approx(43 / 72)

    # UnED: relevant = same label and same domain; 2 "a" rows per domain
    u = evaluate(qe, ql, ie, il, query_domains=qd, index_domains=idm, protocol="uned")
    # q1 rel 0 1 0 0 0, n 2 | q2 rel 1 0 0 0 0, n 1 | q3 rel 0 0 1 0 0, n 2
    u_mp = [(0 + 1) / 2, 1 / 1, (0 + 0) / 2]
    u_ap = [(1 / 2) / 2, 1 / 1, (1 / 3) / 2]
    u_r1 = [0, 1, 0]
    dx = {"mMP@5": (u_mp[0] + u_mp[1]) / 2, "mAP@5": (u_ap[0] + u_ap[1]) / 2, "R@1": (u_r1[0] + u_r1[1]) / 2}
    dy = {"mMP@5": u_mp[2], "mAP@5": u_ap[2], "R@1": u_r1[2]}
    check(u["domains"]["x"], dx | {"queries": 2, "excluded": 0})
    check(u["domains"]["y"], dy | {"queries": 1, "excluded": 0})
    # macro over domains, not micro over queries
    check(u["overall"], {"mMP@5": 3 / 8, "mAP@5": 19 / 48, "R@1": 1 / 4, "queries": 3, "excluded": 0})
    assert u["overall"]["mMP@5"] != pytest.approx(sum(u_mp) / 3)  # the micro mean would be 1/2
    assert u["overall"]["mMP@5"] != pytest.approx(g["overall"]["mMP@5"])


def test_evaluate_uned_excluded_queries_and_empty_domain():
    # a query whose label exists only in another domain: relevant under GUIEC, excluded under UnED
    qe, ql, qd, ie, il, idm = build(
        [
            ("a", "x", [("a", "y"), ("j", "x"), ("j", "x")]),
            ("b", "y", [("b", "y"), ("j", "y"), ("j", "y")]),
        ]
    )
    g = evaluate(qe, ql, ie, il, query_domains=qd, index_domains=idm, k=3)
    u = evaluate(qe, ql, ie, il, query_domains=qd, index_domains=idm, k=3, protocol="uned")
    check(g["overall"], {"mMP@3": 1, "mAP@3": 1, "R@1": 1, "queries": 2, "excluded": 0})
    check(u["overall"], {"mMP@3": 1, "mAP@3": 1, "R@1": 1, "queries": 1, "excluded": 1})
    assert u["domains"]["x"]["queries"] == 0 and u["domains"]["x"]["excluded"] == 1
    assert math.isnan(u["domains"]["x"]["mMP@3"])


def test_evaluate_self_ids_by_hand():
    # one set is both queries and index; angles in degrees, k = 2
    deg = np.array([0, 10, 25, 90, 100])
    x = np.stack([np.cos(np.radians(deg)), np.sin(np.radians(deg))], 1)
    labels = ["a", "a", "b", "b", "c"]
    res = evaluate(x, labels, x, labels, k=2, self_ids=np.arange(5))
    # neighbours (self excluded): 0->[1,2] 1->[0,2] 2->[1,0] 3->[4,2] 4: n = 0, excluded
    # rel: [1,0] n1 | [1,0] n1 | [0,0] n1 | [0,1] n1
    check(
        res["overall"],
        {"mMP@2": (1 + 1 + 0 + 0) / 4, "mAP@2": (1 + 1 + 0 + 1 / 2) / 4, "R@1": 2 / 4, "queries": 4, "excluded": 1},
    )
    # without self exclusion every query finds itself first
    assert evaluate(x, labels, x, labels, k=2)["overall"]["R@1"] == 1


def test_evaluate_tie_decided_by_lower_id():
    x = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    q = np.array([[1.0, 0.0]])
    # rows 0 and 1 tie: row 0 comes first
    assert evaluate(q, ["b"], x, ["a", "b", "a"], k=1)["overall"]["R@1"] == 0
    assert evaluate(q, ["b"], x, ["b", "a", "a"], k=1)["overall"]["R@1"] == 1
    res = evaluate(q, ["b"], x, ["a", "b", "b"], k=2)
    check(res["overall"], {"mMP@2": 1 / 2, "mAP@2": (1 / 2) / 2, "R@1": 0})


def test_evaluate_mixed_label_types_are_distinct():
    x = np.array([[1.0, 0.0], [0.0, 1.0]])
    # 1 and "1" are different labels
    res = evaluate(x[:1], [1], x, ["1", 1], k=1)
    check(res["overall"], {"mMP@1": 0, "R@1": 0, "queries": 1})


# ---------------------------------------------------------------------------------------------
# bad input


def test_evaluate_bad_input():
    rng = np.random.default_rng(10)
    x = unit(rng, 6, 4)
    lab = [0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="k=7"):
        evaluate(x, lab, x, lab, k=7)
    with pytest.raises(ValueError, match="k=6.*itself"):
        evaluate(x, lab, x, lab, k=6, self_ids=np.arange(6))
    with pytest.raises(ValueError, match="protocol"):
        evaluate(x, lab, x, lab, protocol="kaggle")
    with pytest.raises(ValueError, match="query set is empty"):
        evaluate(x[:0], [], x, lab)
    with pytest.raises(ValueError, match="index set is empty"):
        evaluate(x, lab, x[:0], [], k=1)
    with pytest.raises(ValueError, match="both"):
        evaluate(x, lab, x, lab, k=2, protocol="uned", query_domains=["d"] * 6)
    with pytest.raises(ValueError, match="index_labels"):
        evaluate(x, lab, x, lab[:5], k=2)
    bad = x.copy()
    bad[3, 2] = np.inf
    with pytest.raises(ValueError, match=r"1 embeddings are NaN or infinite \(first at row 3\)"):
        evaluate(bad, lab, x, lab, k=2)
