"""WebDataset shards in img2dataset's layout: listed by `manifest build webdataset`, streamed by `extract`,
and giving exactly the features of the same images extracted from loose files."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from featcache.cache import FeatureCache
from tests.conftest import write_csv, write_images


def one_line(result) -> str:
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def shards(tmp_path):
    """Two shards of 7 and 5 samples written as img2dataset does (KEY.jpg, KEY.json, KEY.txt; a parquet per
    shard with key, status and caption), the same images as loose files, and what each sample is."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    loose = tmp_path / "loose"
    names = write_images(loose, 12, size=(40, 30), ext="jpg")
    root = tmp_path / "wds"
    root.mkdir()
    samples = []
    for s, part in enumerate((range(0, 7), range(7, 12))):
        keys, statuses, captions = [], [], []
        with tarfile.open(root / f"{s:05d}.tar", "w") as tar:
            for i in part:
                key = f"{s:05d}{i:04d}"
                label = f"class{i % 3}"
                add(tar, f"{key}.jpg", (loose / names[i]).read_bytes())
                add(tar, f"{key}.json", json.dumps({"key": key, "label": label, "caption": f"photo {i}"}).encode())
                add(tar, f"{key}.txt", f"photo {i}".encode())
                add(tar, f"{key}.cls", label.encode())
                keys.append(key), statuses.append("success"), captions.append(label)
                samples.append((f"{s:05d}.tar#{key}", names[i], label))
            keys.append(f"{s:05d}9999"), statuses.append("failed_to_download"), captions.append("never fetched")
        pq.write_table(pa.table({"key": keys, "status": statuses, "label": captions}), root / f"{s:05d}.parquet")
    return root, loose, samples


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on a 2-core machine, on purpose
def test_shards_extract_exactly_as_the_same_loose_files(shards, tmp_path, cli):
    root, loose, samples = shards
    cli("manifest", "build", "webdataset", "--root", root, "--shards", "{00000..00001}.tar", "--label", "label",
        "--domain", "web", "--out", tmp_path / "wds.csv")
    lines = (tmp_path / "wds.csv").read_text().splitlines()
    assert lines[0] == "path,label,domain,split"
    assert [line.split(",")[:2] for line in lines[1:]] == [[p, f"web/{lab}"] for p, _, lab in samples]
    write_csv(tmp_path / "loose.csv", ["path", "label", "domain", "split"],
              [[name, f"web/{lab}", "web", "train"] for _, name, lab in samples])
    # batches of one image: the model's numbers do not depend on which images share a batch
    for manifest, where, out in ((tmp_path / "wds.csv", root, "w.zarr"), (tmp_path / "loose.csv", loose, "l.zarr")):
        cli("extract", "--model", "tiny-vit", "--manifest", manifest, "--root", where, "--out", tmp_path / out,
            "--dtype", "float32", "--device", "cpu", "--workers", "2", "--chunk-rows", "4", "--batch-size", "1", "--quiet")
    w, lf = FeatureCache.open(tmp_path / "w.zarr"), FeatureCache.open(tmp_path / "l.zarr")
    assert w.valid().all() and lf.valid().all()
    np.testing.assert_array_equal(w.features(), lf.features())
    # more decoding workers than shards: each worker takes a share of every shard's samples, none twice
    cli("extract", "--model", "tiny-vit", "--manifest", tmp_path / "wds.csv", "--root", root, "--out", tmp_path / "w3.zarr",
        "--dtype", "float32", "--device", "cpu", "--workers", "3", "--chunk-rows", "4", "--batch-size", "1", "--quiet")
    np.testing.assert_array_equal(FeatureCache.open(tmp_path / "w3.zarr").features(), lf.features())

    # a chunk redone (as after a kill) reads only what it needs from the shards and gives the same numbers
    from featcache.cache import StoreWriter

    before = w.features()
    StoreWriter(tmp_path / "w.zarr").undo([1])
    StoreWriter(tmp_path / "w.zarr").update_attrs(complete=False)
    cli("extract", "--model", "tiny-vit", "--manifest", tmp_path / "wds.csv", "--root", root, "--out", tmp_path / "w.zarr",
        "--dtype", "float32", "--device", "cpu", "--workers", "0", "--chunk-rows", "4", "--batch-size", "1", "--quiet")
    np.testing.assert_array_equal(FeatureCache.open(tmp_path / "w.zarr").features(), before)


def test_crop_boxes_and_augmented_views_work_on_samples(shards, tmp_path, cli):
    root, loose, samples = shards
    boxes = [[2, 3, 30, 25], ["", "", "", ""], [0, 0, 20, 20]]
    for name, where, paths in (("w", root, [p for p, _, _ in samples]), ("l", loose, [n for _, n, _ in samples])):
        write_csv(tmp_path / f"{name}.csv", ["path", "label", "domain", "split", "x1", "y1", "x2", "y2"],
                  [[path, lab, "d", "train", *boxes[i % 3]] for i, (path, (_, _, lab)) in enumerate(zip(paths, samples))])
        cli("extract", "--model", "tiny-vit", "--manifest", tmp_path / f"{name}.csv", "--root", where, "--out",
            tmp_path / f"{name}.zarr", "--dtype", "float32", "--device", "cpu", "--workers", "0", "--batch-size", "1",
            "--views", "2", "--augment", "custom", "--quiet")
    w, lf = FeatureCache.open(tmp_path / "w.zarr"), FeatureCache.open(tmp_path / "l.zarr")
    assert w.valid().all()
    np.testing.assert_array_equal(w.features(), lf.features())
    np.testing.assert_array_equal(w.augmented(), lf.augmented())


def test_labels_from_the_samples_and_what_is_left_out(shards, tmp_path, cli):
    root, _, samples = shards
    for f in root.glob("*.parquet"):
        f.unlink()  # now every label comes from the tar itself
    with tarfile.open(root / "00002.tar", "w") as tar:
        add(tar, "x1.jpg", b"not a jpeg at all")  # an image member that does not decode: a failure row later
        add(tar, "x1.cls", b"broken")
        add(tar, "x2.json", json.dumps({"label": "only json"}).encode())  # no image
        add(tar, "x3.jpg", (root.parent / "loose" / "img0000.jpg").read_bytes())  # no label
    for label, expect in (("cls", "class"), ("label", "class"), ("txt", "photo ")):
        r = cli("manifest", "build", "webdataset", "--root", root, "--label", label, "--out", tmp_path / f"{label}.csv")
        rows = (tmp_path / f"{label}.csv").read_text().splitlines()[1:]
        assert len(rows) == 12 + (1 if label == "cls" else 0)
        assert all(row.split(",")[1].startswith(f"wds/{expect}") or "00002.tar#x1" in row for row in rows)
        assert "left out 1 samples without an image: 00002.tar#x2" in r.output
    r = cli("manifest", "check", tmp_path / "cls.csv", "--root", root, "--json", code=1)
    report = json.loads(r.stdout)
    assert [u["path"] for u in report["undecodable"]] == ["00002.tar#x1"] and not report["missing"]
    r = cli("extract", "--model", "tiny-vit", "--manifest", tmp_path / "cls.csv", "--root", root, "--out",
            tmp_path / "c.zarr", "--device", "cpu", "--workers", "0")
    c = FeatureCache.open(tmp_path / "c.zarr")
    failed = dict(zip(c.strings("paths")[~c.valid()], c.strings("failures")[~c.valid()]))
    assert list(failed) == ["00002.tar#x1"] and "not an image" in failed["00002.tar#x1"]


def test_each_sample_its_own_class_for_distractors(shards, tmp_path, cli):
    root, _, samples = shards
    cli("manifest", "build", "webdataset", "--root", root, "--label", "__key__", "--out", tmp_path / "a.csv")
    for f in root.glob("*.parquet"):
        f.unlink()  # from the tars now: the same rows
    cli("manifest", "build", "webdataset", "--root", root, "--label", "__key__", "--out", tmp_path / "b.csv")
    for name in ("a.csv", "b.csv"):
        rows = [line.split(",")[:2] for line in (tmp_path / name).read_text().splitlines()[1:]]
        assert rows == [[p, f"wds/{p.split('#')[1]}"] for p, _, _ in samples]


def test_odd_shards_are_one_line(shards, tmp_path, cli):
    root, _, _ = shards
    out = tmp_path / "m.csv"
    assert "--label" in one_line(cli("manifest", "build", "webdataset", "--root", root, "--out", out, code=2))
    line = one_line(cli("manifest", "build", "webdataset", "--root", root, "--shards", "{00000..00005}.tar", "--label",
                        "label", "--out", out, code=2))
    assert "00002.tar: shard not found" in line and "3 more" in line
    (root / "00000.tar").write_bytes(b"garbage" * 100)
    for f in root.glob("*.parquet"):
        f.unlink()
    assert "00000.tar: not a readable tar shard" in one_line(cli("manifest", "build", "webdataset", "--root", root,
                                                                 "--label", "cls", "--out", out, code=2))
    assert not out.exists()


# --- real processes: SIGKILL and torchrun over shards, against one uninterrupted run ----------------

@pytest.fixture(scope="module")
def shard_run(tmp_path_factory):
    """test_extract's slow images (160 large JPEGs) in 8 shards of 20, and one uninterrupted extraction."""
    import subprocess

    from featcache.manifest import read_manifest
    from featcache.manifest.builders import build
    from tests.conftest import REPO, subprocess_env
    from tests.test_extract import extract_cmd, slow_manifest

    tmp = tmp_path_factory.mktemp("shards")
    loose = read_manifest(slow_manifest(tmp))
    root = tmp / "wds"
    root.mkdir()
    for s in range(8):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tar:
            for i in range(20 * s, 20 * s + 20):
                add(tar, f"k{i:04d}.jpg", loose.resolve(i).read_bytes())
                add(tar, f"k{i:04d}.cls", loose.labels[i].encode())
    m = build("webdataset", root, label="cls").write(tmp / "wds.csv")
    out = tmp / "ref.zarr"
    subprocess.run(extract_cmd(m, out, "--root", str(root)), env=subprocess_env(), cwd=REPO, check=True)
    return m, root, FeatureCache.open(out)


def test_sigkill_mid_shards_then_rerun_equals_an_uninterrupted_run(tmp_path, shard_run):
    import signal
    import subprocess

    from tests.conftest import REPO, subprocess_env
    from tests.test_extract import assert_same_cache, extract_cmd, stop_part_way

    m, root, ref = shard_run
    out = tmp_path / "c.zarr"
    stop_part_way(extract_cmd(m, out, "--root", str(root)), out, signal.SIGKILL, 20)
    assert not FeatureCache.open(out).complete
    subprocess.run(extract_cmd(m, out, "--root", str(root)), env=subprocess_env(), cwd=REPO, check=True)
    assert_same_cache(ref, FeatureCache.open(out))


def test_torchrun_ranks_share_the_shards_by_whole_chunks(tmp_path, shard_run):
    import subprocess

    from tests.conftest import PYTHON, REPO, subprocess_env
    from tests.test_extract import assert_same_cache, extract_cmd

    m, root, ref = shard_run
    out = tmp_path / "c.zarr"
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           *extract_cmd(m, out, "--root", str(root))[1:]]
    env = subprocess_env()
    env["OMP_NUM_THREADS"] = "1"
    subprocess.run(cmd, env=env, cwd=REPO, check=True, timeout=600)
    assert_same_cache(ref, FeatureCache.open(out))


def test_a_shard_cut_inside_an_image_fails_the_rest_and_the_run_completes(shards, tmp_path, cli):
    root, _, samples = shards
    cli("manifest", "build", "webdataset", "--root", root, "--label", "label", "--out", tmp_path / "m.csv")
    data = (root / "00000.tar").read_bytes()
    cut = data.index(b"\xff\xd8", 3 * 512) + 100  # inside a JPEG some way into the shard
    (root / "00000.tar").write_bytes(data[:cut])
    r = cli("extract", "--model", "tiny-vit", "--manifest", tmp_path / "m.csv", "--root", root, "--out", tmp_path / "c.zarr",
            "--device", "cpu", "--workers", "0", "--chunk-rows", "4", "--json")
    c = FeatureCache.open(tmp_path / "c.zarr")
    assert c.complete and json.loads(r.stdout)["rows"] == 12
    failures = c.strings("failures")
    bad = [p for p, ok in zip(c.strings("paths"), c.valid()) if not ok]
    assert bad and all(p.startswith("00000.tar#") for p in bad) and c.valid()[7:].all()
    assert all("unreadable shard" in f for f, ok in zip(failures, c.valid()) if not ok)


def test_keys_labels_and_statuses_as_other_tools_write_them(tmp_path, cli):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "w"
    root.mkdir()
    image = write_images(tmp_path / "img", 1, ext="png")[0]
    with tarfile.open(root / "00000.tar", "w") as tar:
        for key, label in (("a#1", 1), ("b", 1.0), ("c", True), ("d", None)):
            add(tar, f"{key}.png", (tmp_path / "img" / image).read_bytes())
            add(tar, f"{key}.json", json.dumps({"label": label}).encode())
    r = cli("manifest", "build", "webdataset", "--root", root, "--label", "label", "--out", tmp_path / "m.csv")
    rows = [line.split(",")[:2] for line in (tmp_path / "m.csv").read_text().splitlines()[1:]]
    assert rows == [["00000.tar#a#1", "w/1"], ["00000.tar#b", "w/1"], ["00000.tar#c", "w/true"]]
    assert "without a 'label' label: 00000.tar#d" in r.output
    cli("extract", "--model", "tiny-vit", "--manifest", tmp_path / "m.csv", "--root", root, "--out", tmp_path / "c.zarr",
        "--device", "cpu", "--workers", "0")
    assert FeatureCache.open(tmp_path / "c.zarr").valid().all()
    pq.write_table(pa.table({"key": ["a#1", "b", "x"], "status": ["success", "success", "failed_to_download"],
                             "label": ["p", "q", "r"]}), root / "00000.parquet")
    r = cli("manifest", "build", "webdataset", "--root", root, "--label", "label", "--out", tmp_path / "p.csv")
    assert "img2dataset did not fetch them): 00000.tar#x" in r.output
    pq.write_table(pa.table({"key": [1, 2], "label": ["p", "q"]}), root / "00000.parquet")
    line = one_line(cli("manifest", "build", "webdataset", "--root", root, "--label", "label", "--out", tmp_path / "i.csv",
                        code=2))
    assert "00000.parquet: key holds int64, expected text" in line
