"""Derived artefacts (indexes, exports, imported caches, scores) say what they came from and refuse
anything else; labels are data; only featcache's own files are replaced, and only when asked; every
failure is one line. Each test does what a user did (issue #17), through the command line."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import blobs, make_cache, write_csv, write_images


def one_line(result) -> str:
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


def strict(text: str):
    """JSON as a strict reader takes it: NaN and Infinity tokens are refused."""
    def refuse(token):
        raise ValueError(f"not strict JSON: {token}")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture
def images(tmp_path, cli):
    """12 real images in 3 classes, extracted with the seeded tiny open_clip ViT: (root, cache, run)."""
    data = tmp_path / "data"
    names = write_images(data / "images", 12)
    write_csv(data / "m.csv", ["path", "label", "domain", "split"],
              [[f"images/{n}", f"c{i % 3}", "d", "train"] for i, n in enumerate(names)])
    cache = tmp_path / "c.zarr"
    cli("extract", "--model", "tiny-vit", "--manifest", data / "m.csv", "--root", data, "--out", cache,
        "--dtype", "float32", "--device", "cpu", "--workers", "0")
    run = tmp_path / "run"
    cli("train-head", "--cache", cache, "--epochs", "2", "--batch-size", "4", "--out", run, "--quiet")
    return data, cache, run


def neighbours(cli, index, image, *more):
    r = cli("search", "--index", index, image, "--k", "3", "--json", index.parent / "s.json", "--overwrite", "-q", *more)
    return strict((index.parent / "s.json").read_text())["queries"][0]["neighbours"]


def test_an_index_keeps_the_head_it_was_built_with_and_refuses_another(images, cli, tmp_path, monkeypatch):
    data, cache, run = images
    image = data / "images" / "img0005.png"
    index = tmp_path / "i"
    cli("index", "--cache", cache, "--run", run, "--out", index)
    model_before = tmp_path / "before.pt"
    cli("export", "--run", run.resolve(), "--out", model_before)  # an absolute --run, a relative --index below
    before = neighbours(cli, index, image)
    assert Path(before[0]["path"]) == image.resolve() and before[0]["score"] > 0.9999
    assert neighbours(cli, index, image, "--model", model_before)[0]["path"] == before[0]["path"]

    cli("train-head", "--cache", cache, "--epochs", "2", "--batch-size", "4", "--out", run, "--overwrite", "--seed", "7",
        "--quiet")
    after = neighbours(cli, index, image)  # embedded by the index's own copy of the head: the same answer
    assert [n["path"] for n in after] == [n["path"] for n in before]
    assert [n["score"] for n in after] == pytest.approx([n["score"] for n in before], abs=1e-6)
    model_after = tmp_path / "after.pt"
    cli("export", "--run", run, "--out", model_after)
    line = one_line(cli("search", "--index", index, image, "--model", model_after, code=2))
    assert str(model_after) in line and str(index) in line and "would be wrong" in line

    # moved, and used from another working directory
    moved = tmp_path / "elsewhere" / "moved-index"
    moved.parent.mkdir()
    shutil.move(index, moved)
    monkeypatch.chdir(tmp_path / "elsewhere")
    found = neighbours(cli, Path("moved-index"), image.resolve(), "--model", model_before)
    assert Path(found[0]["path"]) == image.resolve() and found[0]["score"] > 0.9999


def test_labels_are_data_and_json_is_strict(tmp_path, cli):
    x, y = blobs(4, 10, dim=16, seed=3)
    splits = ["query" if i % 5 == 0 else "index" for i in range(len(y))]
    odd = ["a|b", 'quote " and, comma', "ünï | cödé;\ttab", "[/]"]  # "[/]": rich markup, were it read as such
    plain = make_cache(tmp_path, x, [f"class{c}" for c in y], splits, name="plain")
    weird = make_cache(tmp_path, x, [odd[c] for c in y], splits, domains=[("x|y", "[red]d[/red]")[c % 2] for c in y],
                       name="weird")
    cli("eval", "--cache", plain, "--zero-shot", "raw", "--json", tmp_path / "p.json")
    plain_scores = strict((tmp_path / "p.json").read_text())
    shown = cli("eval", "--cache", weird, "--zero-shot", "raw", "--json", tmp_path / "w.json").stdout
    weird_scores = strict((tmp_path / "w.json").read_text())
    assert "[red]d[/red]" in shown and "x|y" in shown and set(weird_scores["domains"]) == {"x|y", "[red]d[/red]"}
    assert weird_scores["overall"]["queries"] == plain_scores["overall"]["queries"] == 8
    for metric in ("mMP@5", "mAP@5", "R@1"):
        assert weird_scores["overall"][metric] == pytest.approx(plain_scores["overall"][metric])
        assert 0 < weird_scores["overall"][metric] <= 1
    # a domain with no scored query: its scores are null, not NaN, in the file and on stdout
    lonely = make_cache(tmp_path, x[:6], ["a", "b", "c", "a", "b", "z"], ["index"] * 5 + ["query"],
                        domains=["d"] * 5 + ["e"], name="lonely")
    cli("eval", "--cache", lonely, "--zero-shot", "raw", "--k", "2", "--json", tmp_path / "n.json")
    assert strict((tmp_path / "n.json").read_text())["overall"]["mMP@2"] is None


def test_user_files_are_never_replaced_without_being_asked(images, cli, tmp_path):
    data, cache, run = images
    image = data / "images" / "img0001.png"
    index = tmp_path / "i"
    cli("index", "--cache", cache, "--run", run, "--out", index)
    mine = tmp_path / "mine"
    mine.mkdir()
    for name in ("x.pt", "notes.json", "picture.png", "b.preprocess.json", "neighbours.png"):
        (mine / name).write_text("the user's own file")
    cases = [
        ("export", "--run", run, "--out", mine / "x.pt"),
        ("search", "--index", index, image, "--json", mine / "notes.json"),
        ("search", "--index", index, image, "--plot", mine / "picture.png"),
        ("eval", "--cache", cache, "--zero-shot", "raw", "--json", mine / "notes.json"),
        ("eval", "--cache", cache, "--zero-shot", "raw", "--plot", mine),  # writes neighbours.png there
        ("export", "--run", run, "--out", mine / "b.onnx"),  # its sidecar would be b.preprocess.json
    ]
    for args in cases:
        for extra in ((), ("--overwrite",)):
            line = one_line(cli(*args, *extra, code=2))
            assert "featcache did not make" in line, line
    names = ["b.preprocess.json", "neighbours.png", "notes.json", "picture.png", "x.pt"]
    assert all((mine / n).read_text() == "the user's own file" for n in names)
    assert sorted(p.name for p in mine.iterdir()) == names

    # featcache's own files: replaced with --overwrite only
    cli("export", "--run", run, "--out", tmp_path / "m.pt")
    assert "--overwrite" in one_line(cli("export", "--run", run, "--out", tmp_path / "m.pt", code=2))
    cli("export", "--run", run, "--out", tmp_path / "m.pt", "--overwrite")
    cli("search", "--index", index, image, "--json", tmp_path / "s.json", "--plot", tmp_path / "s.png")
    assert "--overwrite" in one_line(cli("search", "--index", index, image, "--json", tmp_path / "s.json", code=2))
    cli("search", "--index", index, image, "--json", tmp_path / "s.json", "--plot", tmp_path / "s.png", "--overwrite")

    # two ONNX exports in one folder keep their own preprocessing records
    other = tmp_path / "other"
    cli("train-head", "--cache", cache, "--epochs", "1", "--embed-dim", "8", "--out", other, "--quiet")
    cli("export", "--run", run, "--out", tmp_path / "onnx" / "a.onnx")
    cli("export", "--run", other, "--out", tmp_path / "onnx" / "b.onnx")
    a, b = (json.loads((tmp_path / "onnx" / f"{n}.preprocess.json").read_text()) for n in "ab")
    assert a["embed_dim"] == 64 and b["embed_dim"] == 8 and a["run"] != b["run"]
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == ["a.onnx", "a.preprocess.json", "b.onnx",
                                                                     "b.preprocess.json"]


def test_overwrite_keeps_what_a_user_added_inside(tmp_path, cli):
    x, y = blobs(3, 8, dim=8)
    cache = make_cache(tmp_path, x, y)
    index, emb = tmp_path / "idx", tmp_path / "emb"
    cli("index", "--cache", cache, "--out", index)
    cli("export-embeddings", "--cache", cache, "--out", emb)
    added = [index / "knn.index", index / "notes" / "todo.txt", emb / "README.txt", emb / "img_emb" / "mine.txt",
             cache / "NOTES.md"]
    for f in added:
        f.parent.mkdir(exist_ok=True)
        f.write_text(f"kept {f.name}")
    cli("index", "--cache", cache, "--out", index, "--overwrite")
    cli("export-embeddings", "--cache", cache, "--out", emb, "--overwrite")
    cli("import", "--features", emb, "--manifest", tmp_path / "c.csv", "--out", cache, "--overwrite", "--dtype", "float32")
    assert all(f.read_text() == f"kept {f.name}" for f in added)
    cli("search", "--index", index, "--query-cache", cache, "-q")


def test_a_sweep_compares_backbones_on_one_set_of_images(tmp_path, cli):
    x, y = blobs(3, 10, dim=8)
    a = make_cache(tmp_path, x, y, name="a")
    b = make_cache(tmp_path, x[:12], y[:12], name="b")
    line = one_line(cli("sweep", "--cache", a, "--cache", b, "--epochs", "1", "--out", tmp_path / "s", code=2))
    assert str(a) in line and str(b) in line and "30 rows" in line and "12 rows" in line
    assert not (tmp_path / "s").exists()


def test_runs_shows_the_full_evaluation_or_says_what_was_measured(tmp_path, cli):
    x, y = blobs(6, 12, dim=16)
    splits = ["train" if c < 3 else ("query" if i % 3 == 0 else "index") for i, c in enumerate(y)]
    cache = make_cache(tmp_path, x, y, splits, domains=["p" if c % 2 else "q" for c in y])
    run = tmp_path / "runs" / "r"
    cli("train-head", "--cache", cache, "--epochs", "1", "--out", run, "--quiet")
    cli("eval", "--cache", cache, "--run", run, "--domain", "p")
    row = json.loads(cli("runs", tmp_path / "runs", "--json").stdout)[0]
    assert row["mMP@5"] is None and "domain p" in row["scored_on"] and "no full evaluation" in row["scored_on"]
    cli("eval", "--cache", cache, "--run", run, "--json", tmp_path / "full.json")
    full = json.loads((tmp_path / "full.json").read_text())["overall"]["mMP@5"]
    cli("eval", "--cache", cache, "--run", run, "--domain", "q")
    cli("eval", "--cache", cache, "--run", run, "--k", "10")
    row = json.loads(cli("runs", tmp_path / "runs", "--json").stdout)[0]
    assert row["mMP@5"] == pytest.approx(full) and row["scored_on"] == "c.zarr (guiec)"


def test_imported_vectors_compare_with_the_vectors_they_are(images, cli, tmp_path):
    data, cache, run = images
    # raw features out and back in: the run that was trained on them applies, with the same scores
    cli("export-embeddings", "--cache", cache, "--out", tmp_path / "raw")
    cli("import", "--features", tmp_path / "raw", "--manifest", data / "m.csv", "--root", data, "--out",
        tmp_path / "raw.zarr", "--dtype", "float32")
    cli("eval", "--cache", cache, "--run", run, "--json", tmp_path / "a.json")
    direct = json.loads((tmp_path / "a.json").read_text())
    cli("eval", "--cache", tmp_path / "raw.zarr", "--run", run, "--json", tmp_path / "b.json")
    again = json.loads((tmp_path / "b.json").read_text())
    assert again["overall"] == pytest.approx(direct["overall"])
    # the run's own embeddings, imported twice: comparable with each other and with the run's index
    cli("export-embeddings", "--cache", cache, "--run", run, "--out", tmp_path / "head")
    for name in ("q", "i"):
        cli("import", "--features", tmp_path / "head", "--manifest", data / "m.csv", "--root", data, "--out",
            tmp_path / f"{name}.zarr", "--dtype", "float32")
    cli("eval", "--query-cache", tmp_path / "q.zarr", "--index-cache", tmp_path / "i.zarr", "--zero-shot", "raw")
    cli("index", "--cache", cache, "--run", run, "--out", tmp_path / "idx")
    for queries in (cache, tmp_path / "q.zarr"):  # features through the index's head, or its own space as is
        cli("search", "--index", tmp_path / "idx", "--query-cache", queries, "--json", tmp_path / "s.json", "-q",
            "--overwrite")
        first = strict((tmp_path / "s.json").read_text())["queries"][0]
        assert first["neighbours"][0]["path"] == first["query"] and first["neighbours"][0]["score"] > 0.9999
    # plain arrays: comparable when declared one space, refused otherwise
    x, y = blobs(3, 6, dim=8)
    np.save(tmp_path / "na.npy", x)
    np.save(tmp_path / "nb.npy", x + 0)
    np.save(tmp_path / "nc.npy", x * 2)  # other bytes, same declared space
    write_csv(tmp_path / "x.csv", ["path", "label"], [[f"{i}.jpg", c] for i, c in enumerate(y)])
    for name, space in (("na", "mine"), ("nc", "mine"), ("nb", None)):
        cli("import", "--features", tmp_path / f"{name}.npy", "--manifest", tmp_path / "x.csv", "--out",
            tmp_path / f"{name}.zarr", *(("--space", space) if space else ()))
    cli("eval", "--query-cache", tmp_path / "na.zarr", "--index-cache", tmp_path / "nc.zarr", "--zero-shot", "raw")
    line = one_line(cli("eval", "--query-cache", tmp_path / "na.zarr", "--index-cache", tmp_path / "nb.zarr", code=2))
    assert "declared space 'mine'" in line and "imported vectors" in line
    # a run trained on imported vectors cannot be exported as an image model: one line says why
    cli("train-head", "--cache", tmp_path / "na.zarr", "--epochs", "1", "--batch-size", "4", "--out", tmp_path / "ra",
        "--quiet")
    assert "imported" in one_line(cli("export", "--run", tmp_path / "ra", "--out", tmp_path / "ra.pt", code=2))


def test_laion_import_refuses_what_its_dtype_cannot_hold_and_counts_dropped_rows(tmp_path, cli):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "laion"
    (folder / "img_emb").mkdir(parents=True)
    (folder / "metadata").mkdir()
    x = np.ones((4, 3), dtype=np.float64)
    x[1, 2] = 1e39  # finite in float64, beyond float32
    np.save(folder / "img_emb" / "img_emb_0.npy", x)
    pq.write_table(pa.table({"image_path": [f"{i}.jpg" for i in range(4)]}), folder / "metadata" / "metadata_0.parquet")
    write_csv(tmp_path / "m.csv", ["path", "label"], [[f"{i}.jpg", i % 2] for i in range(4)])
    for dtype in ("float32", "float16"):
        line = one_line(cli("import", "--features", folder, "--manifest", tmp_path / "m.csv", "--out", tmp_path / "c.zarr",
                            "--dtype", dtype, code=2))
        assert "row 1" in line and f"does not fit {dtype}" in line
        assert ("--dtype float32" in line) == (dtype == "float16")
    assert not (tmp_path / "c.zarr").exists()
    x[1, 2], x[3, 0] = np.nan, np.inf
    np.save(folder / "img_emb" / "img_emb_0.npy", x)
    r = cli("import", "--features", folder, "--manifest", tmp_path / "m.csv", "--out", tmp_path / "c.zarr")
    assert "2 rows hold NaN or infinite values" in r.output


def test_damaged_and_odd_inputs_are_one_line(tmp_path, cli, small_disk):
    import pyarrow as pa
    import pyarrow.parquet as pq

    x, y = blobs(3, 20, dim=8)
    cache = make_cache(tmp_path, x, y)
    for args, says in ((("--ivf", "4", "--nprobe", "-3"), "--nprobe -3"), (("--ivf", "4", "--nprobe", "0"), "--nprobe 0"),
                       (("--hnsw", "8", "--nprobe", "2"), "only an IVF index"), (("--hnsw", "99999999999"), "--hnsw 99999999999")):
        assert says in one_line(cli("index", "--cache", cache, "--out", tmp_path / "bad", *args, code=2))
    (tmp_path / "a-file").write_text("mine")
    assert "a sweep writes into a new folder" in one_line(cli("sweep", "--cache", cache, "--epochs", "1", "--out",
                                                              tmp_path / "a-file", code=2))
    for option in ("--json", "--plot"):  # refused before the search, naming the option
        line = one_line(cli("eval", "--cache", cache, "--zero-shot", "raw", option, tmp_path / "a-file" / "x", code=2))
        assert "cannot write there" in line or "did not make" in line
    assert "choose another --json" in one_line(cli("eval", "--cache", cache, "--json", tmp_path / "a-file" / "x.json",
                                                   code=2))
    index, other = tmp_path / "idx", tmp_path / "other"
    cli("index", "--cache", cache, "--out", index)
    cli("index", "--cache", make_cache(tmp_path, x[::-1].copy(), y[::-1], name="rev"), "--out", other)
    meta = (index / "index.json").read_text()
    faiss_bytes, rows = (index / "index.faiss").read_bytes(), (index / "rows.parquet").read_bytes()
    search = ("search", "--index", index, "--query-cache", cache, "-q")
    damage = [
        ("index.json", "[1, 2]", "a JSON list"),
        ("index.json", json.dumps({k: v for k, v in json.loads(meta).items() if k != "space"}), "damaged (space"),
        ("index.json", json.dumps({**json.loads(meta), "rows": "many"}), "damaged (rows"),
        ("index.faiss", b"garbage" * 100, "index.faiss: not the file"),
        ("index.faiss", (other / "index.faiss").read_bytes(), "index.faiss: not the file"),
    ]
    for name, content, says in damage:
        (index / name).write_bytes(content.encode() if isinstance(content, str) else content)
        assert says in one_line(cli(*search, code=2))
        (index / "index.json").write_text(meta)
        (index / "index.faiss").write_bytes(faiss_bytes)
    # a rows.parquet with a null path, written consistently with index.json (as a buggy tool would)
    table = pq.read_table(index / "rows.parquet")
    paths = table.column("path").to_pylist()
    paths[3] = None
    pq.write_table(table.set_column(1, "path", pa.array(paths, pa.string())), index / "rows.parquet")
    from featcache.cache import file_sha256

    fixed = json.loads(meta)
    fixed["files"]["rows.parquet"] = file_sha256(index / "rows.parquet")
    fixed["sizes"]["rows.parquet"] = (index / "rows.parquet").stat().st_size
    (index / "index.json").write_text(json.dumps(fixed))
    assert "1 rows have no path" in one_line(cli(*search, code=2))
    (index / "rows.parquet").write_bytes(rows)
    (index / "index.json").write_text(meta)
    cli(*search)

    # LAION folders of the wrong kinds
    emb = tmp_path / "emb"
    cli("export-embeddings", "--cache", cache, "--out", emb)
    manifest = tmp_path / "c.csv"
    good = pq.read_table(emb / "metadata" / "metadata_0.parquet")
    pq.write_table(good.set_column(0, "image_path", pa.array(range(good.num_rows), pa.int64())),
                   emb / "metadata" / "metadata_0.parquet")
    assert "image_path holds int64" in one_line(cli("import", "--features", emb, "--manifest", manifest, "--out",
                                                    tmp_path / "i.zarr", code=2))
    pq.write_table(good.drop(["image_path"]), emb / "metadata" / "metadata_0.parquet")
    assert "no image_path column" in one_line(cli("import", "--features", emb, "--manifest", manifest, "--out",
                                                  tmp_path / "i.zarr", code=2))
    pq.write_table(good, emb / "metadata" / "metadata_0.parquet")
    (emb / "img_emb" / "img_emb_0.npy").unlink()
    (emb / "img_emb" / "img_emb_0.npy").mkdir()
    assert "no img_emb_{i}.npy files" in one_line(cli("import", "--features", emb, "--manifest", manifest, "--out",
                                                      tmp_path / "i.zarr", code=2))

    # a full disk while writing an index or embeddings: one line, nothing left behind
    big = make_cache(tmp_path, np.random.default_rng(0).normal(size=(6000, 64)), np.arange(6000) % 50, name="big")
    for command in (("index", "--cache", big, "--out", small_disk / "idx"),
                    ("export-embeddings", "--cache", big, "--out", small_disk / "emb")):
        r = cli(*command, code=2)
        last = r.output.strip().splitlines()[-1]  # after the progress bar of the rows that were written
        assert last.startswith("error:") and "no space left on the device" in last and "Traceback" not in r.output
    assert [p.name for p in small_disk.iterdir() if not p.name.endswith(".lock")] == []


def test_a_killed_writer_leaves_nothing_the_next_run_keeps(tmp_path, cli):
    import tempfile

    x, y = blobs(3, 8, dim=8)
    cache = make_cache(tmp_path, x, y)
    old_mask = os.umask(0o022)
    try:
        # what a SIGKILL during `index` and `export-embeddings` leaves: their unique temporary folders
        leftovers = [Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=tmp_path)) for name in ("idx", "emb")]
        for d in leftovers:
            (d / "index.faiss").write_bytes(b"x" * 1000)
        neighbour = Path(tempfile.mkdtemp(prefix=".idx.b.", suffix=".tmp", dir=tmp_path))  # another output's
        cli("index", "--cache", cache, "--out", tmp_path / "idx")
        cli("export-embeddings", "--cache", cache, "--out", tmp_path / "emb")
        assert not any(d.exists() for d in leftovers) and neighbour.exists()
        for d in ("idx", "emb"):
            assert stat.S_IMODE((tmp_path / d).stat().st_mode) == 0o755
    finally:
        os.umask(old_mask)
    # a picture of many neighbours stays a picture of at most 10
    cli("search", "--index", tmp_path / "idx", "--query-cache", cache, "--k", "24", "--plot", tmp_path / "p.png", "-q")
    with Image.open(tmp_path / "p.png") as im:
        assert im.width <= 11 * 112 + 12


def test_a_runs_scores_belong_to_its_current_head_and_survive_a_damaged_record(tmp_path, cli):
    x, y = blobs(6, 12, dim=16)
    splits = ["train" if c < 3 else ("query" if i % 3 == 0 else "index") for i, c in enumerate(y)]
    cache = make_cache(tmp_path, x, y, splits)
    run = tmp_path / "runs" / "r"
    cli("train-head", "--cache", cache, "--epochs", "1", "--out", run, "--quiet")
    cli("eval", "--cache", cache, "--run", run, "--plot", run / "plots")
    record = (run / "eval.json").read_bytes()
    # an evaluation of the old head that lands after the run was retrained is not shown as the new head's
    cli("train-head", "--cache", cache, "--epochs", "1", "--out", run, "--overwrite", "--seed", "9", "--quiet")
    (run / "eval.json").write_bytes(record)
    row = json.loads(cli("runs", tmp_path / "runs", "--json").stdout)[0]
    assert row["mMP@5"] is None and row["scored_on"] is None and row["status"] == "complete"
    # a damaged record: runs says so, and the next eval replaces it (its scores are not lost)
    (run / "eval.json").write_text("[]")
    assert "eval.json is damaged" in json.loads(cli("runs", tmp_path / "runs", "--json").stdout)[0]["status"]
    # pictures drawn before featcache marked them, in the run's own plots folder, are its own
    for name in ("neighbours.png", "domains.png"):
        Image.new("RGB", (4, 4)).save(run / "plots" / name)
    cli("eval", "--cache", cache, "--run", run, "--plot", run / "plots", "--overwrite")
    row = json.loads(cli("runs", tmp_path / "runs", "--json").stdout)[0]
    assert row["mMP@5"] is not None and row["scored_on"] == "c.zarr (guiec)"
