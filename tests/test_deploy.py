"""featcache export / index / search / export-embeddings, checked against computations made here: the
cached features (the backbone run at extraction, checked against open_clip and timm in test_extract)
with the head applied by hand from head.safetensors, and brute-force search over those embeddings."""

from __future__ import annotations

import json
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file

from featcache.cache import FeatureCache
from tests.conftest import PYTHON, subprocess_env, write_csv

# Smaller and larger than the models' inputs (tiny-vit 32 px, timm test_vit 160 px), square and not.
SIZES = [(20, 14), (32, 32), (45, 90), (97, 61), (180, 160), (300, 120), (257, 411)]


def sized_images(folder: Path, sizes=SIZES, seed: int = 0) -> list[str]:
    """Images with smooth structure and some noise (photos are not white noise: resizers agree on them)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, (w, h) in enumerate(sizes):
        y, x = np.mgrid[0:h, 0:w] / max(w, h)
        phase = rng.uniform(0, 6, 3)
        pixels = np.stack([np.sin(6 * x + phase[c]) * np.cos(5 * y - phase[c]) for c in range(3)], axis=2)
        pixels = 127.5 + 110 * pixels + rng.normal(0, 8, pixels.shape)
        name = f"img{i:03d}.png"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / name)
        names.append(name)
    return names


def manifest_of(tmp: Path, names: list[str], classes: int = 3) -> Path:
    rows = [[f"images/{n}", i % classes, "d", "train"] for i, n in enumerate(names)]
    return write_csv(tmp / "m.csv", ["path", "label", "domain", "split"], rows)


def by_hand(run: Path, features: np.ndarray) -> np.ndarray:
    """The head (Dropout off, one Linear) applied to features, L2-normalised, in float64."""
    w = load_file(str(run / "head.safetensors"))
    e = np.asarray(features, np.float64) @ w["net.1.weight"].T.astype(np.float64) + w["net.1.bias"]
    return e / np.linalg.norm(e, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_weights):
    """Images of many sizes, a float32 cache of them per backbone, and a run trained on each."""
    from typer.testing import CliRunner

    from featcache.cli import app

    tmp = tmp_path_factory.mktemp("deploy")
    names = sized_images(tmp / "images")
    m = manifest_of(tmp, names)
    runner = CliRunner()

    def cli(*args):
        r = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        return r

    import timm

    torch.manual_seed(7)
    timm_weights = tmp / "test_vit.pth"
    torch.save(timm.create_model("test_vit", pretrained=False, num_classes=0).state_dict(), timm_weights)
    out = {"root": tmp, "names": names, "manifest": m}
    for key, model, weights in [("open_clip", "tiny-vit", tiny_weights), ("timm", "timm:test_vit", timm_weights)]:
        cache = tmp / f"{key}.zarr"
        cli("extract", "-m", model, "--weights", weights, "--manifest", m, "--out", cache, "--dtype", "float32",
            "--workers", "0", "--quiet")
        run = tmp / f"run-{key}"
        cli("train-head", "--cache", cache, "--epochs", "2", "--batch-size", "4", "--embed-dim", "16", "--out", run, "--quiet")
        out[key] = {"cache": cache, "run": run, "weights": weights}
    return out


@pytest.mark.parametrize("family", ["open_clip", "timm"])
def test_torchscript_export_equals_the_pipeline_and_needs_torch_alone(pipeline, family, cli, tmp_path):
    p = pipeline[family]
    model = tmp_path / "model.pt"
    r = cli("export", "--run", p["run"], "--weights", p["weights"], "--out", model, "--json")
    report = json.loads(r.stdout)
    assert report["dim"] == 16 and report["bytes"] == model.stat().st_size and report["self_check"]["cosine"] >= 0.995
    files = [str(pipeline["root"] / "images" / n) for n in pipeline["names"]]
    script = (
        "import json, sys, numpy as np, torch\n"
        "from PIL import Image\n"
        "m = torch.jit.load(sys.argv[1])\n"
        "out = []\n"
        "for f in sys.argv[2:]:\n"
        "    x = torch.from_numpy(np.asarray(Image.open(f).convert('RGB'))).permute(2, 0, 1)[None]\n"
        "    a, b = m(x.float()), m(x)  # float 0..255 and uint8 alike\n"
        "    assert torch.equal(a, b)\n"
        "    out.append(a[0].tolist())\n"
        "both = torch.from_numpy(np.asarray(Image.open(sys.argv[2]).convert('RGB'))).permute(2, 0, 1)[None].repeat(3, 1, 1, 1)\n"
        "assert m(both.float()).shape == (3, 16)  # any batch size\n"
        "assert not {'featcache', 'open_clip', 'timm'} & set(sys.modules), sorted(sys.modules)\n"
        "print(json.dumps(out))\n"
    )
    res = subprocess.run([PYTHON, "-c", script, str(model), *files], capture_output=True, text=True,
                         env=subprocess_env(), timeout=300)
    assert res.returncode == 0, res.stderr
    got = np.array(json.loads(res.stdout.strip().splitlines()[-1]))
    expected = by_hand(p["run"], FeatureCache.open(p["cache"]).features())
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    cosines = (got * expected).sum(axis=1)
    print(f"{family}: min cosine over {len(files)} image sizes {cosines.min():.6f}")
    assert cosines.min() >= 0.995, cosines


def test_onnx_equals_torch_and_the_zip_holds_saved_model(pipeline, cli, tmp_path):
    import onnxruntime

    from featcache.extract.backbones import create_backbone
    from featcache.manifest import read_manifest

    p = pipeline["open_clip"]
    onnx_file = tmp_path / "m.onnx"
    cli("export", "--run", p["run"], "--weights", p["weights"], "--out", onnx_file)
    pre = json.loads((tmp_path / "m.preprocess.json").read_text())
    assert pre["preprocessing"]["size"] == [32, 32] and pre["preprocessing"]["mode"] == "shortest"
    backbone = create_backbone("tiny-vit", p["weights"])  # its transform is extraction's preprocessing
    m = read_manifest(pipeline["manifest"])
    x = torch.stack([backbone.transform(Image.open(m.resolve(i)).convert("RGB")) for i in range(len(m))]).numpy()
    got = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"]).run(None, {"pixels": x})[0]
    np.testing.assert_allclose(got, by_hand(p["run"], FeatureCache.open(p["cache"]).features()), atol=1e-4)

    sub = tmp_path / "submission.zip"
    cli("export", "--run", p["run"], "--weights", p["weights"], "--out", sub)
    with zipfile.ZipFile(sub) as z:
        assert z.namelist() == ["saved_model.pt"]


def test_export_refuses_with_one_line_and_leaves_nothing(pipeline, cli, tmp_path, tiny_weights):
    from featcache.train.loop import TrainOptions, load_train_data, train

    p = pipeline["open_clip"]
    other = tmp_path / "other.pt"
    state = torch.load(tiny_weights, weights_only=True)
    state = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    torch.save(state, other)
    out = tmp_path / "out" / "model.pt"

    def refused(*args, says: list[str]):
        r = cli("export", *args, code=2)
        lines = r.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), r.output
        assert all(s in lines[0] for s in says), lines[0]
        assert not out.parent.exists() or not any(out.parent.iterdir())

    from featcache.cache import file_sha256

    refused("--run", p["run"], "--weights", other, "--out", out, says=[file_sha256(other), file_sha256(tiny_weights)])
    refused("--run", p["run"], "--out", out, says=["--weights FILE"])
    # a head wider than the challenge allows
    wide = tmp_path / "wide"
    train(load_train_data(p["cache"]), TrainOptions(epochs=1, batch_size=4, embed_dim=65), wide)
    refused("--run", wide, "--weights", tiny_weights, "--out", tmp_path / "out" / "s.zip", says=["at most 64"])
    # an incomplete run: interrupted after its first epoch
    half = tmp_path / "half"

    def stop(info):
        if info.epoch == 1:
            raise KeyboardInterrupt

    train(load_train_data(p["cache"]), TrainOptions(epochs=3, batch_size=4, embed_dim=8), half, on_step=stop)
    refused("--run", half, "--weights", tiny_weights, "--out", out, says=["incomplete"])
    # a run whose cache is gone
    gone = tmp_path / "gone.zarr"
    import shutil

    shutil.copytree(p["cache"], gone)
    orphan = tmp_path / "orphan"
    train(load_train_data(gone), TrainOptions(epochs=1, batch_size=4, embed_dim=8), orphan)
    shutil.rmtree(gone)
    refused("--run", orphan, "--weights", tiny_weights, "--out", out, says=["gone"])
    refused("--run", p["run"], "--weights", tiny_weights, "--out", tmp_path / "out" / "m.tflite", says=[".pt", ".onnx"])


def test_search_equals_brute_force_and_finds_itself(pipeline, cli, tmp_path):
    p = pipeline["open_clip"]
    idx = tmp_path / "index"
    meta = json.loads(cli("index", "--cache", p["cache"], "--run", p["run"], "--out", idx, "--json").stdout)
    assert meta["rows"] == len(pipeline["names"]) and meta["index"] == {"kind": "flat"} and meta["recall_at_10"] is None
    emb = by_hand(p["run"], FeatureCache.open(p["cache"]).features())
    images = pipeline["root"] / "images"
    queries = [images / pipeline["names"][i] for i in (0, 3, 6)]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    r = cli("search", "--index", idx, "--weights", p["weights"], "--k", "4", "--json", tmp_path / "s.json",
            "--plot", tmp_path / "s.png", queries[0], broken, *queries[1:])
    assert "broken.png" in r.output and "skipped" in r.output
    found = json.loads((tmp_path / "s.json").read_text())["queries"]
    assert [q["query"] for q in found] == [str(q) for q in queries]
    for q, (qi) in zip(found, (0, 3, 6)):
        scores = emb @ emb[qi]
        order = np.argsort(-scores, kind="stable")[:4]
        assert [Path(n["path"]).name for n in q["neighbours"]] == [pipeline["names"][j] for j in order]
        assert q["neighbours"][0]["path"].endswith(pipeline["names"][qi])  # itself, first
        np.testing.assert_allclose([n["score"] for n in q["neighbours"]], scores[order], atol=1e-4)
        assert [n["label"] for n in q["neighbours"]] == [str(j % 3) for j in order]
    assert Image.open(tmp_path / "s.png").size[0] > 0
    # the same searches through the exported TorchScript module
    model = tmp_path / "m.pt"
    cli("export", "--run", p["run"], "--weights", p["weights"], "--out", model)
    cli("search", "--index", idx, "--model", model, "--k", "4", "--json", tmp_path / "t.json", "-q", *queries)
    through_model = json.loads((tmp_path / "t.json").read_text())["queries"]
    assert [n["path"] for q in through_model for n in q["neighbours"]][::4] == [str(q) for q in queries]
    # every row of a cache as a query: brute force over the same embeddings
    cli("search", "--index", idx, "--query-cache", p["cache"], "--k", "3", "--json", tmp_path / "c.json", "-q")
    rows = json.loads((tmp_path / "c.json").read_text())["queries"]
    assert len(rows) == len(emb)
    for qi, q in enumerate(rows):
        order = np.argsort(-(emb @ emb[qi]), kind="stable")[:3]
        assert [Path(n["path"]).name for n in q["neighbours"]] == [pipeline["names"][j] for j in order]


def test_approximate_indexes_report_their_recall(tmp_path, cli):
    from tests.conftest import blobs, make_cache

    x, y = blobs(20, 60, dim=16, noise=2.0)
    cache = make_cache(tmp_path, x, y)
    full = json.loads(cli("index", "--cache", cache, "--out", tmp_path / "ivf", "--ivf", "8", "--nprobe", "8", "--json").stdout)
    assert full["index"] == {"kind": "ivf", "nlist": 8, "nprobe": 8} and full["recall_at_10"] == 1.0  # every list searched
    part = json.loads(cli("index", "--cache", cache, "--out", tmp_path / "ivf1", "--ivf", "64", "--nprobe", "1", "--json").stdout)
    assert 0.0 < part["recall_at_10"] < 1.0
    hnsw = json.loads(cli("index", "--cache", cache, "--out", tmp_path / "hnsw", "--hnsw", "8", "--json").stdout)
    assert 0.5 < hnsw["recall_at_10"] <= 1.0
    r = cli("index", "--cache", cache, "--out", tmp_path / "hnsw", "--hnsw", "8", code=2)
    assert "--overwrite" in r.output
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("mine")
    r = cli("index", "--cache", cache, "--out", tmp_path / "mine", "--overwrite", code=2)
    assert "featcache did not make" in r.output and (tmp_path / "mine" / "thesis.tex").read_text() == "mine"


def test_embeddings_round_trip_through_the_laion_layout(pipeline, cli, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from featcache.manifest import read_manifest

    p = pipeline["open_clip"]
    original = FeatureCache.open(p["cache"]).features()
    raw = tmp_path / "raw"
    cli("export-embeddings", "--cache", p["cache"], "--out", raw, "--shard-rows", "3")
    assert sorted(f.name for f in (raw / "img_emb").iterdir()) == ["img_emb_0.npy", "img_emb_1.npy", "img_emb_2.npy"]
    meta0 = pq.read_table(raw / "metadata" / "metadata_0.parquet").to_pydict()
    assert meta0 == {"image_path": ["images/img000.png", "images/img001.png", "images/img002.png"],
                     "label": ["0", "1", "2"], "domain": ["d"] * 3, "split": ["train"] * 3}
    back = tmp_path / "back.zarr"
    cli("import", "--features", raw, "--manifest", pipeline["manifest"], "--out", back, "--dtype", "float32")
    np.testing.assert_array_equal(FeatureCache.open(back).features(), original)

    head = tmp_path / "head"
    cli("export-embeddings", "--cache", p["cache"], "--run", p["run"], "--out", head)
    np.testing.assert_allclose(np.load(head / "img_emb" / "img_emb_0.npy"), by_hand(p["run"], original), atol=1e-5)

    # shuffled, two shards, absolute paths for some rows, one manifest row left out, one path not in the manifest
    m = read_manifest(pipeline["manifest"])
    n = len(m)
    order = np.random.default_rng(5).permutation(n)
    kept, dropped = order[:-1], int(order[-1])
    paths = [str(m.resolve(i).resolve()) if i % 2 else m.paths[i] for i in kept]
    shuffled = tmp_path / "shuffled"
    (shuffled / "img_emb").mkdir(parents=True)
    (shuffled / "metadata").mkdir()
    halves = [(0, 3), (3, len(kept))]
    for s, (a, b) in enumerate(halves):
        extra = ["images/not-in-manifest.png"] if s == 1 else []
        rows = np.concatenate([original[kept[a:b]], np.ones((len(extra), original.shape[1]), np.float32)])
        np.save(shuffled / "img_emb" / f"img_emb_{s}.npy", rows)
        pq.write_table(pa.table({"image_path": paths[a:b] + extra}), shuffled / "metadata" / f"metadata_{s}.parquet")
    r = cli("import", "--features", shuffled, "--manifest", pipeline["manifest"], "--out", tmp_path / "s.zarr",
            "--dtype", "float32", "--json")
    report = json.loads(r.stdout)
    assert (report["matched"], report["missing"], report["extra"]) == (n - 1, 1, 1)
    c = FeatureCache.open(tmp_path / "s.zarr")
    valid = c.valid()
    assert valid.sum() == n - 1 and not valid[dropped]
    assert c.strings("failures")[dropped] == f"no embedding in {shuffled}"
    np.testing.assert_array_equal(c.features()[valid], original[valid])
