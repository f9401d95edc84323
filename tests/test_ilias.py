"""The ILIAS protocol: its manifest from the release's id lists, mAP@k with ILIAS's tie rule (checked against
scikit-learn, which its evaluation uses), distractors, and query expansion / database-side augmentation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from featcache.evaluate.metrics import tied_ap
from tests.conftest import make_cache, write_images


def test_tied_ap_is_ilias_s_sklearn_average_precision():
    rng = np.random.default_rng(0)
    for _ in range(200):
        k = int(rng.integers(1, 12))
        sims = -np.sort(-rng.integers(0, 4, size=k).astype(np.float32))  # few values: many ties
        rel = rng.random(k) < 0.4
        n_pos = int(rel.sum() + rng.integers(0, 3))
        got = tied_ap(rel[None], sims[None], np.array([n_pos]))[0]
        if n_pos == 0:
            assert np.isnan(got)
            continue
        # ILIAS's evaluation: sklearn's AP of the top-k list, times (positives retrieved) / min(k, positives)
        want = 0.0 if not rel.any() else average_precision_score(rel, sims) * rel.sum() / min(k, n_pos)
        assert got == pytest.approx(want)


def ilias_release(tmp_path):
    """A small ILIAS-shaped release: 3 instances, image_ids/ lists and ilias_core/ images."""
    root = tmp_path / "ilias"
    core = root / "ilias_core"
    queries, positives = [], []
    for i, name in enumerate(("bold_bimp_000", "calm_cat_001", "dark_dog_002")):
        for folder, prefix, n in (("query", "Q", 1), ("pos", "P", 3)):
            names = write_images(core / name / folder, n, seed=10 * i + len(folder))
            for j, old in enumerate(names):
                new = f"{prefix}{i:03d}_{j:02d}.png"
                (core / name / folder / old).rename(core / name / folder / new)
                (queries if folder == "query" else positives).append(f"{name}/{folder}/{new}")
    (root / "image_ids").mkdir()
    (root / "image_ids" / "image_query_ids.txt").write_text("".join(f"{q},extra\n" for q in queries))
    (root / "image_ids" / "positive_ids.txt").write_text("".join(f"{p},0.1,20\n" for p in positives))
    return root, queries, positives


def test_manifest_from_the_release_layout(tmp_path, cli):
    root, queries, positives = ilias_release(tmp_path)
    cli("manifest", "build", "ilias", "--root", root, "--out", tmp_path / "ilias.csv")
    lines = (tmp_path / "ilias.csv").read_text().splitlines()[1:]
    rows = [line.split(",") for line in lines]
    assert [r[0] for r in rows] == [f"ilias_core/{i}" for i in queries + positives]
    assert [r[3] for r in rows] == ["query"] * 3 + ["index"] * 9
    assert rows[0][1] == "ilias/bold_bimp_000" and rows[-1][1] == "ilias/dark_dog_002"
    r = cli("manifest", "check", tmp_path / "ilias.csv", "--root", root, "--min-per-class", "1")
    assert r.exit_code == 0
    (root / "image_ids" / "positive_ids.txt").write_text("".join(f"{p},0.1,20\n" for p in positives[:6]))
    r = cli("manifest", "build", "ilias", "--root", root, "--out", tmp_path / "x.csv", code=2)
    assert "no positive image for 1 queried instance" in r.output and "dark_dog_002" in r.output


def test_ilias_evaluation_with_distractors_and_expansion(tmp_path, cli):
    from featcache.evaluate.metrics import evaluate
    from featcache.evaluate.protocols import EvalSet, run_eval

    rng = np.random.default_rng(3)
    centres = rng.normal(size=(6, 8))
    labels = np.repeat(np.arange(6), 5)
    x = (centres[labels] + 0.8 * rng.normal(size=(30, 8))).astype(np.float32)
    splits = np.where(np.arange(30) % 5 == 0, "query", "index")
    path = make_cache(tmp_path, x, labels, splits=splits)
    d = rng.normal(size=(50, 8)).astype(np.float32)
    dpath = make_cache(tmp_path, d, [0] * 50, name="d")
    q, i = splits == "query", splits == "index"
    qn = x[q] / np.linalg.norm(x[q], axis=1, keepdims=True)
    db = np.concatenate([x[i], d])
    dbn = db / np.linalg.norm(db, axis=1, keepdims=True)
    db_labels = np.concatenate([labels[i], -1 - np.arange(50)])  # distractors: labels no query has
    k = 20

    def independent(queries: np.ndarray) -> float:
        """ILIAS's mAP@k from a brute-force ranking, with sklearn as its evaluation computes it."""
        aps = []
        for row, lab in zip(queries, labels[q]):
            s = dbn @ row
            order = np.lexsort((np.arange(len(s)), -s))[:k]
            rel = db_labels[order] == lab
            n_pos = int((db_labels == lab).sum())
            aps.append(0.0 if not rel.any() else average_precision_score(rel, s[order]) * rel.sum() / min(k, n_pos))
        return float(np.mean(aps))

    for max_memory in (2 << 30, 1 << 13):  # in memory, and streamed in blocks
        es = EvalSet.load(path, distractors=[dpath], max_memory=max_memory)
        got = run_eval(eval_set=es, protocol="ilias", k=k, zero_shot="raw").result
        assert got["overall"][f"mAP@{k}"] == pytest.approx(independent(qn), abs=1e-6)
        # alpha query expansion: each query plus its 3 first neighbours weighted by similarity ** 2
        expanded = []
        for row in qn:
            s = dbn @ row
            top = np.lexsort((np.arange(len(s)), -s))[:3]
            v = row + ((np.maximum(s[top], 0) ** 2)[:, None] * dbn[top]).sum(axis=0)
            expanded.append(v / np.linalg.norm(v))
        got = run_eval(eval_set=es, protocol="ilias", k=k, zero_shot="raw", qe=3, alpha=2).result
        assert got["overall"][f"mAP@{k}"] == pytest.approx(independent(np.array(expanded)), abs=1e-5)
        assert abs(independent(np.array(expanded)) - independent(qn)) > 1e-3  # the expansion changes the ranking
        assert got["expansion"] == {"qe": 3, "dba": 0, "alpha": 2}
    # database-side augmentation: each index row plus its 2 nearest other rows, the index in memory
    es = EvalSet.load(path, distractors=[dpath])
    aug = []
    for j, row in enumerate(dbn):
        s = dbn @ row
        s[j] = -np.inf
        top = np.lexsort((np.arange(len(s)), -s))[:2]
        v = row + ((np.maximum(s[top], 0) ** 3)[:, None] * dbn[top]).sum(axis=0)
        aug.append(v / np.linalg.norm(v))
    want = evaluate(qn, labels[q], np.array(aug, dtype=np.float32), db_labels, k=k)
    got = run_eval(eval_set=es, k=k, zero_shot="raw", dba=2).result
    assert got["overall"][f"mMP@{k}"] == pytest.approx(want["overall"][f"mMP@{k}"], abs=1e-6)
    streamed = EvalSet.load(path, distractors=[dpath], max_memory=1 << 13)
    with pytest.raises(ValueError, match="--dba 2: database-side augmentation needs the index in memory"):
        run_eval(eval_set=streamed, k=k, zero_shot="raw", dba=2)
    # the command line: the ilias protocol's own k, distractors, per-query results
    r = cli("eval", "--cache", path, "--zero-shot", "raw", "--protocol", "ilias", "--k", "20", "--distractors", dpath,
            "--json", tmp_path / "s.json")
    assert json.loads((tmp_path / "s.json").read_text())["overall"]["mAP@20"] == pytest.approx(independent(qn), abs=1e-6)
    assert "mAP@20" in r.output
    r = cli("eval", "--cache", path, "--zero-shot", "raw", "--protocol", "ilias", code=2)
    assert "--k 1000 is larger than the index" in r.output
    # more neighbours expanded than scored: the first search finds them all
    wide = run_eval(eval_set=EvalSet.load(path, distractors=[dpath]), k=3, zero_shot="raw", qe=6, alpha=1).result
    assert wide["expansion"]["qe"] == 6


def test_distractors_in_plots_and_in_a_run_s_record(tmp_path, cli):
    from tests.conftest import blobs

    x, y = blobs(4, 12, dim=8, noise=2.0)
    splits = np.array(["query", "index", "train", "index"] * 12)
    path = make_cache(tmp_path, x, y, splits=splits)
    dpath = make_cache(tmp_path, x + 0.01, [0] * 48, name="d")  # near copies: among every query's neighbours
    cli("train-head", "--cache", path, "--out", tmp_path / "run", "--epochs", "1", "--batch-size", "8", "--embed-dim",
        "4", "--quiet")
    cli("eval", "--cache", path, "--run", tmp_path / "run", "--distractors", dpath, "--plot", tmp_path / "plots")
    assert (tmp_path / "plots" / "neighbours.png").is_file()
    listed = cli("runs", tmp_path, "--json").stdout
    row = json.loads(listed)[0]
    assert row["mMP@5"] is None and "distractors d.zarr" in row["scored_on"]  # not the run's plain score
