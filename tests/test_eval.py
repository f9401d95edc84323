import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file, save_file

from featcache.evaluate.protocols import pooled
from tests.conftest import blobs, make_cache


def brute_force(q, ql, x, xl, k=5, self_rows=False):
    """Independent scores: full matmul, stable sort on (-score, id), metrics from the formulas in REFERENCES."""
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = qn @ xn.T
    mp, ap, r1 = [], [], []
    for i in range(len(q)):
        order = [j for j in np.lexsort((np.arange(len(x)), -sims[i])) if not (self_rows and j == i)]
        n_rel = sum(1 for j in range(len(x)) if xl[j] == ql[i] and not (self_rows and j == i))
        if n_rel == 0:
            continue
        rel = [xl[j] == ql[i] for j in order[:k]]
        m = min(n_rel, k)
        mp.append(sum(rel[:m]) / m)
        ap.append(sum(np.mean(rel[: j + 1]) * rel[j] for j in range(k)) / m)
        r1.append(float(rel[0]))
    return {"mMP@5": np.mean(mp), "mAP@5": np.mean(ap), "R@1": np.mean(r1), "queries": len(mp)}


def read_json(path):
    return json.loads(path.read_text())


def test_pooled_is_the_mean_of_consecutive_groups():
    x = np.random.default_rng(0).normal(size=(3, 1152)).astype(np.float32)
    p = pooled(x)
    assert p.shape == (3, 64)
    np.testing.assert_allclose(p[:, 5], x[:, 90:108].mean(axis=1), rtol=1e-5)
    np.testing.assert_allclose(p[:, 63], x[:, 1134:1152].mean(axis=1), rtol=1e-5)
    assert pooled(x[:, :40]).shape == (3, 40)


def test_query_index_split_matches_brute_force(tmp_path, cli):
    x, y = blobs(8, 12, dim=96, noise=1.5)
    rng = np.random.default_rng(1)
    splits = rng.choice(["query", "index", "index", "train"], size=len(y))
    cache = make_cache(tmp_path, x, y, splits, domains=["a" if c < 4 else "b" for c in y])
    for mode, transform in (("raw", lambda f: f), ("pooled", pooled)):
        cli("eval", "--cache", cache, "--zero-shot", mode, "--json", tmp_path / f"{mode}.json")
        got = read_json(tmp_path / f"{mode}.json")
        q, i = splits == "query", splits == "index"
        want = brute_force(transform(x[q]), y[q], transform(x[i]), y[i])
        assert got["protocol"] == "guiec" and got["overall"]["queries"] == want["queries"]
        for m in ("mMP@5", "mAP@5", "R@1"):
            assert got["overall"][m] == pytest.approx(want[m], abs=1e-9), (mode, m)
        qa = q & (y < 4)
        assert got["domains"]["a"]["mMP@5"] == pytest.approx(brute_force(transform(x[qa]), y[qa], transform(x[i]), y[i])["mMP@5"])


def test_without_splits_each_row_queries_the_others_and_duplicates_still_count(tmp_path, cli):
    # rows 0 and 1 are identical with the same label: each must find the other first, not itself
    x = np.array([[1, 0], [1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [-1, 0], [-0.9, -0.2]], dtype=np.float32)
    y = [0, 0, 1, 2, 2, 1, 1]
    cache = make_cache(tmp_path, x, y)
    cli("eval", "--cache", cache, "--zero-shot", "raw", "--k", "2", "--json", tmp_path / "r.json")
    got = read_json(tmp_path / "r.json")["overall"]
    # hand count: row0 -> [1 (rel), 2], row1 -> [0 (rel), 2]: R@1 = 1 for both; rows 2,5,6 (label 1):
    # row2 -> neighbours 0,1 (not rel) -> 0; row5 -> 6 (rel); row6 -> 5 (rel); rows 3,4 find each other.
    assert got["R@1"] == pytest.approx(6 / 7)
    assert got["queries"] == 7 and got["excluded"] == 0
    want = brute_force(x, y, x, y, k=2, self_rows=True)
    assert got["R@1"] == pytest.approx(want["R@1"])


def test_uned_needs_the_same_domain_and_averages_domains(tmp_path, cli):
    # the same label in two domains: relevant under guiec, not under uned
    x = np.array([[1, 0], [1, 0.05], [1, 0.1], [0, 1], [0.05, 1], [0.1, 1], [0.2, 1]], dtype=np.float32)
    y = [7, 7, 7, 3, 3, 3, 3]
    d = ["a", "b", "b", "a", "a", "a", "a"]
    s = ["query", "index", "index", "query", "index", "index", "index"]
    cache = make_cache(tmp_path, x, y, s, d)
    cli("eval", "--cache", cache, "--zero-shot", "raw", "--json", tmp_path / "g.json")
    cli("eval", "--cache", cache, "--zero-shot", "raw", "--protocol", "uned", "--json", tmp_path / "u.json")
    g, u = read_json(tmp_path / "g.json"), read_json(tmp_path / "u.json")
    assert g["overall"]["queries"] == 2 and g["overall"]["R@1"] == 1.0
    # under uned query 0 (label 7, domain a) has no relevant index row: excluded
    assert u["overall"]["queries"] == 1 and u["overall"]["excluded"] == 1
    assert u["domains"]["a"]["queries"] == 1 and u["protocol"] == "uned"


def test_run_head_is_applied_and_results_are_stored(tmp_path, cli):
    x, y = blobs(6, 15, dim=24)
    splits = ["train" if c < 4 else ("query" if i % 3 == 0 else "index") for i, c in enumerate(y)]
    cache = make_cache(tmp_path, x, y, splits)
    run = tmp_path / "run"
    cli("train-head", "--cache", cache, "--epochs", "2", "--out", run, "--quiet")
    cli("eval", "--cache", cache, "--run", run, "--json", tmp_path / "r.json", "--plot", tmp_path / "plots")
    got = read_json(tmp_path / "r.json")
    w = load_file(str(run / "head.safetensors"))
    emb = x @ w["net.1.weight"].T + w["net.1.bias"]
    q, i = np.array(splits) == "query", np.array(splits) == "index"
    want = brute_force(emb[q], y[q], emb[i], y[i])
    assert got["overall"]["mMP@5"] == pytest.approx(want["mMP@5"], abs=1e-6)
    assert read_json(run / "eval.json")["evaluations"][-1]["result"]["overall"] == got["overall"]
    rows = json.loads(cli("runs", tmp_path, "--json").stdout)
    assert len(rows) == 1 and rows[0]["mMP@5"] == pytest.approx(want["mMP@5"], abs=1e-6) and rows[0]["epochs"] == "2/2"
    for name in ("neighbours.png", "domains.png"):
        with Image.open(tmp_path / "plots" / name) as im:
            assert im.width > 100 and im.height > 100


def test_bad_inputs_say_what_is_wrong(tmp_path, cli):
    x, y = blobs(4, 6, dim=16)
    s = ["train" if c < 2 else ("query" if i % 2 else "index") for i, c in enumerate(y)]
    cache = make_cache(tmp_path, x, y, s)
    run = tmp_path / "run"
    cli("train-head", "--cache", cache, "--epochs", "1", "--out", run, "--quiet")
    other = make_cache(tmp_path, np.zeros((4, 8)) + 1, [0, 0, 1, 1], name="other")
    r = cli("eval", "--cache", other, "--run", run, code=2)
    assert "the head takes 16-d features" in r.output and "8-d" in r.output
    # same dim, different backbone: say which
    other16 = make_cache(tmp_path, x, y, s, name="other16")
    import zarr

    g = zarr.open_group(str(other16), mode="r+")
    meta = dict(g.attrs["featcache"])
    meta["feature_space"] = {"backbone": {"library": "open_clip", "arch": "ViT-L-14", "weights": "hub:openai"},
                             "preprocessing": {}, "precision": "fp32"}
    g.attrs["featcache"] = meta
    r = cli("eval", "--cache", other16, "--run", run, code=2)
    assert "was trained on features of imported vectors" in r.output and "open_clip:ViT-L-14" in r.output
    r = cli("eval", "--cache", cache, "--zero-shot", "raw", "--k", "50", code=2)
    assert "--k 50 is larger than the index" in r.output
    only_q = make_cache(tmp_path, x, y, ["query"] * len(y), name="onlyq")
    r = cli("eval", "--cache", only_q, "--zero-shot", "raw", code=2)
    assert "has query rows but no index rows" in r.output
    w = load_file(str(run / "head.safetensors"))
    w["net.1.weight"][0, 0] = np.nan
    save_file(w, str(run / "head.safetensors"))
    r = cli("eval", "--cache", cache, "--run", run, code=2)
    assert "embeddings are NaN or infinite" in r.output


def test_demo_runs_offline_end_to_end(tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    summary = json.loads(cli("demo", "--json").stdout)
    assert (tmp_path / "manifests" / "demo" / "digits.csv").is_file()
    assert len(list((tmp_path / "manifests" / "demo" / "images").glob("*.png"))) == 1797
    seen, unseen = summary["scores"]["digits 0-5"], summary["scores"]["digits 6-9"]
    assert seen["zero_shot"]["queries"] == seen["trained_head"]["queries"] == 54
    assert unseen["zero_shot"]["queries"] == unseen["trained_head"]["queries"] == 144
    # training works: on held-out images of the classes it was trained on, the head beats the baseline
    assert seen["trained_head"]["mMP@5"] > seen["zero_shot"]["mMP@5"]
    assert summary["trained_head"]["queries"] == 54 + 144 and 0 < summary["trained_head"]["mMP@5"] <= 1
    assert all((tmp_path / p).is_file() for p in summary["plots"])
    assert (tmp_path / "runs" / "demo" / "head.safetensors").is_file()
    assert (tmp_path / summary["model"]).is_file() and (tmp_path / summary["index"] / "index.json").is_file()
    # searched through the exported model: each query image is in the collection and finds itself first
    for q in summary["search"]:
        assert Path(q["neighbours"][0]["path"]) == Path(q["query"]).resolve() and q["neighbours"][0]["score"] > 0.999
    # run again with a file of the user's in its run folder: the demo replaces its own files, nothing else
    (tmp_path / "runs" / "demo" / "my-notes.txt").write_text("mine")
    again = json.loads(cli("demo", "--json").stdout)
    assert again["scores"] == summary["scores"]
    assert (tmp_path / "runs" / "demo" / "my-notes.txt").read_text() == "mine"


def test_domain_option_scores_one_domain_as_its_own_collection(tmp_path, cli):
    # --domain keeps that domain's queries AND index rows: the same scores as a cache holding only them
    x, y = blobs(6, 10, dim=12, noise=1.5, seed=4)
    domains = np.where(y < 3, "a", "b")
    splits = np.where(np.arange(len(y)) % 4 == 0, "query", "index")
    both = make_cache(tmp_path, x, y, splits, domains, name="both")
    only = make_cache(tmp_path, x[domains == "a"], y[domains == "a"], splits[domains == "a"], domains[domains == "a"], name="only")
    cli("eval", "--cache", both, "--zero-shot", "raw", "--domain", "a", "--json", tmp_path / "a.json")
    cli("eval", "--cache", only, "--zero-shot", "raw", "--json", tmp_path / "o.json")
    got, want = read_json(tmp_path / "a.json"), read_json(tmp_path / "o.json")
    assert got["overall"] == want["overall"] and list(got["domains"]) == ["a"]
    mixed = make_cache(tmp_path, x, y, splits, domains, name="mixed")
    cli("eval", "--cache", mixed, "--zero-shot", "raw", "--json", tmp_path / "m.json")
    assert read_json(tmp_path / "m.json")["domains"]["a"]["queries"] == got["overall"]["queries"]
    r = cli("eval", "--cache", both, "--zero-shot", "raw", "--domain", "c", code=2)
    assert "--domain c: no such domain" in r.output


def test_a_domain_without_index_rows_is_its_own_index(tmp_path, cli):
    # UnED's convention: domain "cars" has only query rows, so its queries search each other (and the
    # other domains' index rows), each skipping itself; domain "sop" has a proper query/index split.
    rng = np.random.default_rng(3)
    x, y = blobs(6, 8, dim=12, noise=0.8, seed=3)
    domains = np.where(y < 3, "cars", "sop")
    splits = np.where(domains == "cars", "query", np.where(rng.random(len(y)) < 0.3, "query", "index"))
    splits[(domains == "sop") & (np.arange(len(y)) % 8 == 0)] = "query"
    cache = make_cache(tmp_path, x, y, splits, domains)
    for protocol in ("guiec", "uned"):
        cli("eval", "--cache", cache, "--zero-shot", "raw", "--protocol", protocol, "--json", tmp_path / f"{protocol}.json")
    got = read_json(tmp_path / "uned.json")
    # independent: the index is every sop index row plus every cars row; cars queries skip themselves
    index_rows = np.flatnonzero((splits == "index") | (domains == "cars"))
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    per_domain = {}
    for dom in ("cars", "sop"):
        mp = []
        for qi in np.flatnonzero((splits == "query") & (domains == dom)):
            cand = [j for j in index_rows if j != qi]
            order = sorted(cand, key=lambda j: (-float(xn[qi] @ xn[j]), j))
            rel = [y[j] == y[qi] and domains[j] == dom for j in order[:5]]
            n_rel = sum(1 for j in cand if y[j] == y[qi] and domains[j] == dom)
            mp.append(sum(rel[: min(n_rel, 5)]) / min(n_rel, 5))
        per_domain[dom] = np.mean(mp)
        assert got["domains"][dom]["mMP@5"] == pytest.approx(per_domain[dom], abs=1e-9)
    assert got["overall"]["mMP@5"] == pytest.approx(np.mean(list(per_domain.values())), abs=1e-9)
    g = read_json(tmp_path / "guiec.json")
    n = {d: g["domains"][d]["queries"] for d in ("cars", "sop")}
    assert g["overall"]["queries"] == n["cars"] + n["sop"] == int((splits == "query").sum())


def test_multi_label_queries_match_any_of_their_labels(tmp_path, cli):
    # query "1|2" (GLDv2 in UnED) is relevant to index rows of class 1 or 2; query "0" is ordinary
    x = np.array([[1, 0], [0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0, 1], [0.95, 0.05], [0.1, 0.9]], dtype=np.float32)
    y = ["1|2", "1", "2", "0", "0", "0", "9"]
    s = ["query", "index", "index", "index", "index", "query", "index"]
    cache = make_cache(tmp_path, x, y, s)
    cli("eval", "--cache", cache, "--zero-shot", "raw", "--k", "3", "--label-sep", "|", "--json", tmp_path / "r.json")
    got = read_json(tmp_path / "r.json")
    # query 0 ([1,0]): neighbours by cosine: row1 (1), row2 (2), row3 (0): rel 1,1,0; n_q = 2
    #   mP@3 = (1+1)/2 = 1; AP@3 = (1 + 1)/2 = 1; R@1 = 1
    # query 5 ([0.95,0.05], label 0): neighbours row1 (1), row2 (2), row3 (0): rel 0,0,1; n_q = 2 (rows 3,4)
    #   mP@3 = (0+0)/2 = 0; AP@3 = (1/3)/2 = 1/6; R@1 = 0
    assert got["overall"]["queries"] == 2
    assert got["overall"]["mMP@3"] == pytest.approx(0.5)
    assert got["overall"]["mAP@3"] == pytest.approx((1 + 1 / 6) / 2)
    assert got["overall"]["R@1"] == pytest.approx(0.5)
    # undeclared, "1|2" is a label like any other: no index row has it, so its query is not scored
    cli("eval", "--cache", cache, "--zero-shot", "raw", "--k", "3", "--json", tmp_path / "r.json", "--overwrite")
    plain = read_json(tmp_path / "r.json")["overall"]
    assert plain["queries"] == 1 and plain["excluded"] == 1 and plain["R@1"] == 0.0


def test_all_queries_multi_label(tmp_path, cli):
    x = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [0.2, 0.8]], dtype=np.float32)
    cache = make_cache(tmp_path, x, ["1|2", "1", "3|4", "4", "5"], ["query", "index", "query", "index", "index"])
    cli("eval", "--cache", cache, "--zero-shot", "raw", "--k", "2", "--label-sep", "|", "--json", tmp_path / "r.json")
    got = read_json(tmp_path / "r.json")["overall"]
    assert got["queries"] == 2 and got["R@1"] == 1.0 and got["excluded"] == 0


def test_features_are_selected_block_by_block(tmp_path):
    from featcache.cache import FeatureCache

    x = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    c = FeatureCache.open(make_cache(tmp_path, x, [0] * 50))
    mask = np.random.default_rng(1).random(50) < 0.4
    np.testing.assert_array_equal(c.features(mask, block_bytes=1), x[mask])
    np.testing.assert_array_equal(c.features(np.flatnonzero(mask), block_bytes=1), x[mask])
    np.testing.assert_array_equal(c.features(np.array([7, 3, 3])), x[[7, 3, 3]])
    assert c.features(np.zeros(50, dtype=bool)).shape == (0, 4)
