"""`featcache index --factory`: compressed faiss indexes trained on a sample, filled block by block, refused
above --max-memory before any work, and searched from disk."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import blobs, make_cache


@pytest.fixture
def collection(tmp_path):
    x, y = blobs(40, 300, dim=16, noise=0.9)
    return make_cache(tmp_path, x, y), x


def test_a_factory_index_is_built_by_blocks_and_searched(collection, tmp_path, cli, monkeypatch):
    from featcache.cache import FeatureCache
    from featcache.deploy.index import Index, IndexSpec, build_index

    path, x = collection
    calls = []
    real = FeatureCache.features
    monkeypatch.setattr(FeatureCache, "features", lambda self, rows=None, **kw: calls.append(
        len(rows) if rows is not None and rows.dtype != bool else int(np.count_nonzero(rows)) if rows is not None
        else self.rows) or real(self, rows, **kw))
    meta = build_index(path, tmp_path / "ix", spec=IndexSpec("factory", factory="IVF32,PQ4"), block_rows=1000)
    monkeypatch.undo()
    # the sample for recall, the training sample, then blocks of at most 1000 rows: never the whole 12,000
    assert calls[0] == 1000 and calls[1] == 10_000 and max(calls[2:]) == 1000 and sum(calls[2:]) == len(x)
    assert meta["index"] == {"kind": "factory", "nlist": 32, "nprobe": 2, "factory": "IVF32,PQ4"}
    index = Index.open(tmp_path / "ix")
    # recall@10 as reported, computed again here by brute force on the same sample of queries
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    sample = np.sort(np.random.default_rng(0).choice(len(x), 1000, replace=False))
    truth = np.argsort(-(xn[sample] @ xn.T), axis=1, kind="stable")[:, :10]
    _, found = index.search(xn[sample].astype(np.float32), 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)])
    assert meta["recall_at_10"] == pytest.approx(recall, abs=0.01) and 0.2 < recall < 1.0
    r = cli("search", "--index", tmp_path / "ix", "--query-cache", path, "--k", "3", "--json", tmp_path / "s.json",
            "--quiet")
    assert r.exit_code == 0 and len(json.loads((tmp_path / "s.json").read_text())["queries"]) == len(x)


def test_factory_refusals_are_one_line(collection, tmp_path, cli):
    path, _ = collection
    out = tmp_path / "ix"

    def line(*args):
        r = cli("index", "--cache", path, "--out", out, *args, code=2)
        lines = [s for s in r.output.strip().splitlines() if s.startswith("error:")]
        assert len(lines) == 1, r.output
        assert not out.exists()
        return lines[0]

    assert "faiss cannot build it for 16-d vectors" in line("--factory", "PQ7")
    assert "needs about" in line("--factory", "IVF32,Flat", "--max-memory", "1MB") and "--max-memory" in line(
        "--factory", "IVF32,Flat", "--max-memory", "1MB")
    assert "no inverted lists" in line("--factory", "PQ4", "--nprobe", "2")
    assert "one of --ivf, --hnsw and --factory" in line("--factory", "PQ4", "--ivf", "8")
    r = cli("index", "--cache", path, "--out", out, "--factory", "HNSW8", "--json")
    assert json.loads(r.stdout)["index"]["factory"] == "HNSW8"
