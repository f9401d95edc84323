"""Every stage on s3:// URLs, against a real S3 server (moto's, started by the tests on 127.0.0.1): the same
numbers as on a local disk, resume after SIGKILL, one writer per output, damaged chunk objects found and
redone, and no credential written anywhere."""

from __future__ import annotations

import json
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load

from featcache.cache import CacheError, FeatureCache
from featcache.storage import Remote, filesystem
from tests.conftest import REPO, image_manifest, subprocess_env

EXTRACT = ("--model", "tiny-vit", "--device", "cpu", "--dtype", "float32", "--chunk-rows", "4", "--batch-size", "1",
           "--quiet")


def one_line(result) -> str:
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


def upload(local: Path, url: str) -> None:
    fs = filesystem("s3")
    files = [p for p in sorted(local.rglob("*")) if p.is_file()]
    fs.put([str(p) for p in files], [f"{Remote(url).key}/{p.relative_to(local).as_posix()}" for p in files])


def objects(url: str) -> dict[str, int]:
    return Remote(url).files()


@pytest.fixture
def collection(tmp_path):
    """20 images with a manifest (train/query/index rows), and the same images as two WebDataset shards."""
    m = image_manifest(tmp_path / "data", 20, classes=4)
    rows = [line.split(",") for line in m.read_text().splitlines()[1:]]
    wds = tmp_path / "wds"
    wds.mkdir()
    for s, part in enumerate((rows[:11], rows[11:])):
        with tarfile.open(wds / f"{s:05d}.tar", "w") as tar:
            for j, (path, label, *_rest) in enumerate(part):
                for name, data in ((f"k{s}{j:03d}.png", (m.parent / path).read_bytes()), (f"k{s}{j:03d}.cls", label.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, __import__("io").BytesIO(data))
    return m, wds


def test_every_stage_on_s3_gives_the_numbers_of_a_local_disk(s3, collection, tmp_path, cli):
    m, wds = collection
    upload(m.parent, f"{s3}/data")
    upload(wds, f"{s3}/wds")
    manifest = f"{s3}/data/m.csv"

    # extract: loose image objects, and shards streamed from the store, into caches on the store
    cli("extract", "--manifest", manifest, "--out", f"{s3}/cache/files.zarr", "--workers", "2", *EXTRACT)
    cli("extract", "--manifest", m, "--out", tmp_path / "local.zarr", "--workers", "0", *EXTRACT)
    remote, local = FeatureCache.open(f"{s3}/cache/files.zarr"), FeatureCache.open(tmp_path / "local.zarr")
    assert remote.complete and remote.valid().all()
    np.testing.assert_array_equal(remote.features(), local.features())
    assert remote.key == local.key and remote.meta["root"] == f"{s3}/data"
    assert "zarr.json" in objects(f"{s3}/cache/files.zarr")

    cli("manifest", "build", "webdataset", "--root", f"{s3}/wds", "--label", "cls", "--out", f"{s3}/manifests/wds.csv")
    cli("extract", "--manifest", f"{s3}/manifests/wds.csv", "--root", f"{s3}/wds", "--out", f"{s3}/cache/wds.zarr",
        "--workers", "0", *EXTRACT)
    np.testing.assert_array_equal(FeatureCache.open(f"{s3}/cache/wds.zarr").features(), local.features())

    # train-head: the same head from the cache on the store as from the local one
    train = ("--epochs", "3", "--batch-size", "8", "--embed-dim", "8", "--quiet")
    cli("train-head", "--cache", f"{s3}/cache/files.zarr", "--out", f"{s3}/runs/a", *train)
    cli("train-head", "--cache", tmp_path / "local.zarr", "--out", tmp_path / "runs/a", *train)
    head = load(Remote(f"{s3}/runs/a/head.safetensors").read_bytes())
    expect = load((tmp_path / "runs/a/head.safetensors").read_bytes())
    assert head.keys() == expect.keys() and all(np.array_equal(head[k], expect[k]) for k in head)
    config = json.loads(Remote(f"{s3}/runs/a/config.json").read_text())
    assert config["complete"] and config["cache"]["path"] == f"{s3}/cache/files.zarr"
    assert "state.pt" not in objects(f"{s3}/runs/a")  # removed at the end, on the store too

    # eval: the same scores, recorded in the run on the store
    for i, (c, r) in enumerate(((f"{s3}/cache/files.zarr", f"{s3}/runs/a"), (tmp_path / "local.zarr", tmp_path / "runs/a"))):
        cli("eval", "--cache", c, "--run", r, "--json", tmp_path / f"{i}.json")
    first, second = (json.loads((tmp_path / f"{i}.json").read_text()) for i in range(2))
    assert first["overall"] == second["overall"]
    recorded = json.loads(Remote(f"{s3}/runs/a/eval.json").read_text())["evaluations"]
    assert recorded[-1]["result"]["overall"] == first["overall"]
    assert "a" in cli("runs", f"{s3}/runs").output
    cli("sweep", "--cache", f"{s3}/cache/files.zarr", "--loss", "arcface", "--loss", "cosface", "--epochs", "1",
        "--batch-size", "8", "--embed-dim", "8", "--out", f"{s3}/sweep", "--quiet")
    swept = json.loads(Remote(f"{s3}/sweep/sweep.json").read_text())
    assert swept["complete"] and [r["loss"] for r in swept["results"]][-2:] == ["arcface", "cosface"]
    assert {"sweep.md", "000-arcface-seed42/head.safetensors"} <= set(objects(f"{s3}/sweep"))

    # index on the store, searched by an image object and by a cache on the store
    cli("index", "--cache", f"{s3}/cache/files.zarr", "--run", f"{s3}/runs/a", "--out", f"{s3}/index")
    assert {"index.json", "index.faiss", "rows.parquet", "head.safetensors"} <= set(objects(f"{s3}/index"))
    r = cli("search", "--index", f"{s3}/index", f"{s3}/data/images/img0003.png", "--k", "3", "--json",
            tmp_path / "s.json", "--quiet")
    found = json.loads((tmp_path / "s.json").read_text())["queries"][0]["neighbours"]
    assert found[0]["path"] == f"{s3}/data/images/img0003.png" and found[0]["score"] == pytest.approx(1, abs=1e-5)
    assert r.exit_code == 0

    # export-embeddings to the store, imported back from it: the same vectors, the same space
    cli("export-embeddings", "--cache", f"{s3}/cache/files.zarr", "--run", f"{s3}/runs/a", "--out", f"{s3}/emb")
    cli("import", "--features", f"{s3}/emb", "--manifest", manifest, "--out", f"{s3}/cache/imported.zarr",
        "--dtype", "float32")
    imported = FeatureCache.open(f"{s3}/cache/imported.zarr")
    emb = np.load(__import__("io").BytesIO(Remote(f"{s3}/emb/img_emb/img_emb_0.npy").read_bytes()))
    np.testing.assert_array_equal(imported.features(), emb)
    from featcache.cache import feature_space
    from featcache.train.runs import Run

    assert feature_space(imported.meta) == Run.load(f"{s3}/runs/a").embedding_space()


def test_sigkill_mid_extract_into_s3_then_resume_gives_an_uninterrupted_run(s3, tmp_path):
    from tests.test_extract import extract_cmd, slow_manifest

    m = slow_manifest(tmp_path, 48)
    ref, out = tmp_path / "ref.zarr", f"{s3}/c.zarr"
    cmd = lambda where: extract_cmd(m, where, "--chunk-rows", "4")  # noqa: E731  (12 chunks)
    subprocess.run(cmd(ref), env=subprocess_env(), cwd=REPO, check=True)
    proc = subprocess.Popen(cmd(out), env=subprocess_env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    flags = lambda: sum(1 for k in (objects(out) if Remote(out).exists() else {}) if k.startswith("chunk_done/c/"))  # noqa: E731
    while flags() < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert 0 < flags() < 12 and not FeatureCache.open(out).complete
    assert Remote(f"{s3}/.c.zarr.lock").exists()  # left by the killed writer, on this host: recognised and taken
    r = subprocess.run(cmd(out), env=subprocess_env(), cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    a, b = FeatureCache.open(ref), FeatureCache.open(out)
    assert b.complete and b.valid().all() and a.key == b.key
    np.testing.assert_array_equal(a.features(), b.features())
    assert not Remote(f"{s3}/.c.zarr.lock").exists()


def test_one_writer_per_output_on_s3(s3, tmp_path, cli):
    import socket

    from featcache.files import OutputError, exclusive

    m = image_manifest(tmp_path, 6)
    out = f"{s3}/c.zarr"
    with exclusive(Remote(out), "a feature cache"):  # a live writer (this process) holds it
        line = one_line(cli("extract", "--manifest", m, "--out", out, *EXTRACT, code=2))
        assert f"on host {socket.gethostname()}" in line and "--break-lock" in line
        assert not Remote(out).exists()  # refused before anything was written
        with pytest.raises(OutputError, match="is writing a feature cache"):
            with exclusive(Remote(out), "a feature cache"):
                pass
    assert not Remote(f"{s3}/.c.zarr.lock").exists()  # released

    # a writer killed on another host: its lock cannot be judged from here; --break-lock takes it
    Remote(f"{s3}/.c.zarr.lock").write_text(json.dumps({"host": "gpu-node-7", "pid": 4242, "started": "1",
                                                         "since": "2026-12-01T00:00:00+00:00"}))
    line = one_line(cli("extract", "--manifest", m, "--out", out, *EXTRACT, code=2))
    assert "process 4242 on host gpu-node-7" in line and "--break-lock" in line
    cli("extract", "--manifest", m, "--out", out, "--break-lock", *EXTRACT)
    assert FeatureCache.open(out).complete and not Remote(f"{s3}/.c.zarr.lock").exists()

    # a writer killed on this host (its process is gone): recognised without --break-lock
    from featcache.storage import _holder

    dead = {**_holder(), "pid": 2 ** 22 + 11, "started": "1"}  # this machine, this boot, no such process
    Remote(f"{s3}/.runs.lock").write_text(json.dumps(dead))
    cli("train-head", "--cache", out, "--out", f"{s3}/runs", "--epochs", "1", "--batch-size", "4", "--quiet")
    assert json.loads(Remote(f"{s3}/runs/config.json").read_text())["complete"]


def test_missing_or_truncated_chunk_objects_are_found_and_redone(s3, tmp_path, cli):
    m = image_manifest(tmp_path, 20)
    out = f"{s3}/c.zarr"
    cli("extract", "--manifest", m, "--out", out, "--workers", "0", *EXTRACT)
    before = FeatureCache.open(out).features()
    fs = filesystem("s3")
    gone, cut = Remote(f"{out}/features/c/1/0"), Remote(f"{out}/valid/c/3")
    gone.unlink()
    cut.write_bytes(cut.read_bytes()[:-3])
    r = cli("info", out, "--json", code=1)
    damaged = json.loads(r.stdout)["damaged_chunks"]
    assert any(str(gone) in d and "missing" in d for d in damaged) and any(str(cut) in d and "bytes" in d for d in damaged)
    line = one_line(cli("train-head", "--cache", out, "--out", tmp_path / "run", "--quiet", code=2))
    assert "damaged chunk" in line and str(gone) in line
    # the same length, other bytes: only --verify's full read finds it
    flipped = Remote(f"{out}/features/c/2/0")
    data = bytearray(flipped.read_bytes())
    data[10] ^= 0xFF
    flipped.write_bytes(bytes(data))
    assert not any(str(flipped) in d for d in json.loads(cli("info", out, "--json", code=1).stdout)["damaged_chunks"])
    verified = json.loads(cli("info", out, "--verify", "--json", code=1).stdout)["damaged_chunks"]
    assert any(str(flipped) in d for d in verified)
    with pytest.raises(CacheError, match="damaged chunk") as e:  # a full read checks every chunk's crc32c too
        FeatureCache.open(out).features()
    assert str(flipped) in str(e.value)
    cli("extract", "--manifest", m, "--out", out, "--workers", "0", *EXTRACT)
    again = FeatureCache.open(out)
    assert again.complete and not again.chunk_problems(read=True)
    np.testing.assert_array_equal(again.features(), before)
    assert fs.exists(gone.key)


def test_only_what_featcache_made_is_replaced_on_s3(s3, tmp_path, cli):
    m = image_manifest(tmp_path, 6)
    Remote(f"{s3}/theirs/notes.txt").write_text("someone else's")
    line = one_line(cli("extract", "--manifest", m, "--out", f"{s3}/theirs", *EXTRACT, code=2))
    assert "featcache did not make" in line
    assert Remote(f"{s3}/theirs/notes.txt").read_text() == "someone else's" and len(objects(f"{s3}/theirs")) == 1

    cache = f"{s3}/c.zarr"
    cli("extract", "--manifest", m, "--out", cache, *EXTRACT)
    cli("index", "--cache", cache, "--out", f"{s3}/index")
    Remote(f"{s3}/index/README.txt").write_text("my notes")
    line = one_line(cli("index", "--cache", cache, "--out", f"{s3}/index", code=2))
    assert "--overwrite" in line
    first = Remote(f"{s3}/index/index.json").read_text()
    cli("index", "--cache", cache, "--out", f"{s3}/index", "--overwrite")
    assert Remote(f"{s3}/index/README.txt").read_text() == "my notes"  # a user's object survives --overwrite
    assert json.loads(Remote(f"{s3}/index/index.json").read_text())["rows"] == json.loads(first)["rows"]
    line = one_line(cli("extract", "--manifest", m, "--out", "s3://no-such-bucket-here/c.zarr", *EXTRACT, code=2))
    assert "no-such-bucket-here" in line


def test_credentials_are_never_written(s3, s3_server, tmp_path, cli, monkeypatch):
    secret = "s3cr3t-Do-Not-Write-Me"
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name)  # only --storage-options now says how to reach the server
    options = json.dumps({"key": "featcache-test", "secret": secret, "endpoint_url": s3_server})
    m = image_manifest(tmp_path, 24)
    outputs = []
    for args in (("extract", "--manifest", m, "--out", f"{s3}/c.zarr", "--json", *EXTRACT),
                 ("train-head", "--cache", f"{s3}/c.zarr", "--out", f"{s3}/run", "--epochs", "1", "--batch-size", "4",
                  "--json"),
                 ("eval", "--cache", f"{s3}/c.zarr", "--run", f"{s3}/run", "--json", tmp_path / "scores.json"),
                 ("index", "--cache", f"{s3}/c.zarr", "--run", f"{s3}/run", "--out", f"{s3}/index", "--json"),
                 ("info", f"{s3}/c.zarr", "--json"),
                 ("info", f"{s3}/nothing.zarr")):
        outputs.append(cli("--storage-options", options, *args, code=2 if args[1].endswith("nothing.zarr") else 0).output)
    fs = filesystem("s3")
    written = b"".join(fs.cat_file(k) for k in fs.find(Remote(s3).key))
    written += b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".png")
    assert secret.encode() not in written and all(secret not in o for o in outputs)
    assert "not valid JSON" in one_line(cli("--storage-options", "{" + secret, "info", f"{s3}/c.zarr", code=2))
    assert secret not in cli("--storage-options", "{" + secret, "info", f"{s3}/c.zarr", code=2).output


def test_torchrun_ranks_write_one_store_on_s3(s3, tmp_path):
    from tests.conftest import PYTHON
    from tests.test_extract import extract_cmd

    m = image_manifest(tmp_path, 24)
    ref, out = tmp_path / "ref.zarr", f"{s3}/c.zarr"
    subprocess.run(extract_cmd(m, ref, "--chunk-rows", "4"), env=subprocess_env(), cwd=REPO, check=True)
    env = subprocess_env()
    env["OMP_NUM_THREADS"] = "1"
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           *extract_cmd(m, out, "--chunk-rows", "4")[1:]]
    subprocess.run(cmd, env=env, cwd=REPO, check=True, timeout=600)
    a, b = FeatureCache.open(ref), FeatureCache.open(out)
    assert b.complete and b.chunk_done().all() and a.key == b.key
    np.testing.assert_array_equal(a.features(), b.features())


def test_an_interrupted_run_on_s3_resumes_to_the_uninterrupted_head(s3, tmp_path):
    from featcache.train.loop import TrainOptions, load_train_data, train
    from tests.conftest import blobs, make_cache

    x, y = blobs(4, 12, dim=16)
    data = load_train_data(make_cache(tmp_path, x, y))
    options = TrainOptions(epochs=4, batch_size=8, embed_dim=8)
    train(data, options, tmp_path / "whole")

    def stop_in_epoch_3(info):
        if info.epoch == 2:
            raise KeyboardInterrupt

    r = train(data, options, f"{s3}/run", on_step=stop_in_epoch_3)
    assert not r.complete and len(r.metrics) == 2
    assert {"state.pt", "head.safetensors"} <= set(objects(f"{s3}/run"))
    assert json.loads(Remote(f"{s3}/run/config.json").read_text())["epochs_done"] == 2
    r = train(data, options, f"{s3}/run", resume=True)
    assert r.complete and "state.pt" not in objects(f"{s3}/run")
    resumed = load(Remote(f"{s3}/run/head.safetensors").read_bytes())
    whole = load((tmp_path / "whole/head.safetensors").read_bytes())
    assert all(np.array_equal(resumed[k], whole[k]) for k in whole)


def test_a_npy_on_s3_imports_like_a_local_one(s3, tmp_path, cli):
    from tests.conftest import write_csv

    x = np.random.default_rng(0).normal(size=(10, 6)).astype(np.float32)
    np.save(tmp_path / "f.npy", x)
    write_csv(tmp_path / "m.csv", ["path", "label"], [[f"i{i}.png", i % 2] for i in range(10)])
    upload(tmp_path, f"{s3}/in")
    cli("import", "--features", f"{s3}/in/f.npy", "--manifest", f"{s3}/in/m.csv", "--out", f"{s3}/c.zarr",
        "--dtype", "float32")
    c = FeatureCache.open(f"{s3}/c.zarr")
    np.testing.assert_array_equal(c.features(), x)
    assert c.meta["backbone"]["arch"] == f"{s3}/in/f.npy"
    line = one_line(cli("import", "--features", f"{s3}/in/nothing.npy", "--manifest", f"{s3}/in/m.csv", "--out",
                        f"{s3}/d.zarr", code=2))
    assert f"{s3}/in/nothing.npy: file not found" in line


def test_manifests_on_s3_are_checked_and_curated(s3, tmp_path, cli):
    m = image_manifest(tmp_path / "data", 12, classes=3)
    upload(m.parent, f"{s3}/data")
    report = json.loads(cli("manifest", "check", f"{s3}/data/m.csv", "--json").stdout)
    assert not report["missing"] and not report["undecodable"]
    Remote(f"{s3}/data/images/img0004.png").unlink()
    Remote(f"{s3}/data/images/img0005.png").write_bytes(b"not a png")
    report = json.loads(cli("manifest", "check", f"{s3}/data/m.csv", "--json", code=1).stdout)
    assert [r["path"] for r in report["missing"]] == ["images/img0004.png"]
    assert [r["path"] for r in report["undecodable"]] == ["images/img0005.png"]
    cli("manifest", "curate", f"{s3}/data/m.csv", "--min-per-class", "1", "--max-per-class", "1", "--out",
        f"{s3}/curated.csv")
    assert len(Remote(f"{s3}/curated.csv").read_text().splitlines()) == 1 + 6  # 6 classes (domain, label) of 2
    assert "--overwrite" in one_line(cli("manifest", "curate", f"{s3}/data/m.csv", "--min-per-class", "1", "--out",
                                         f"{s3}/curated.csv", code=2))
    line = one_line(cli("manifest", "curate", f"{s3}/data/m.csv", "--out", f"{s3}/data/m.csv", "--overwrite", code=2))
    assert "a file this command reads" in line
    assert "did not make" in one_line(cli("manifest", "curate", f"{s3}/data/m.csv", "--out",
                                          f"{s3}/data/images/img0000.png", "--overwrite", code=2))


def test_a_store_that_does_not_answer_is_one_line(s3, cli):
    from tests.conftest import free_port

    options = json.dumps({"endpoint_url": f"http://127.0.0.1:{free_port()}", "config_kwargs": {"retries": {"max_attempts": 1}}})
    line = one_line(cli("--storage-options", options, "info", f"{s3}/c.zarr", code=2))
    assert f"{s3}/c.zarr/zarr.json: the object store did not answer" in line


def test_a_folder_whose_publishing_was_killed_is_redone(s3, tmp_path, cli, monkeypatch):
    from featcache import storage

    m = image_manifest(tmp_path, 6)
    cache, index = f"{s3}/c.zarr", f"{s3}/index"
    cli("extract", "--manifest", m, "--out", cache, *EXTRACT)
    cli("index", "--cache", cache, "--out", index)
    Remote(f"{index}/notes.txt").write_text("mine")
    real = storage.upload

    def killed(local, remote, names):  # the process dies with half the objects up, before the record
        real(local, remote, names[:1])
        raise KeyboardInterrupt

    monkeypatch.setattr(storage, "upload", killed)
    cli("index", "--cache", cache, "--out", index, "--overwrite", code=130)  # Ctrl-C: exit status 130
    monkeypatch.setattr(storage, "upload", real)
    assert "index.json" not in objects(index) and storage.PUBLISHING in objects(index)
    cli("index", "--cache", cache, "--out", index)  # no --overwrite needed: nothing finished was there
    assert {"index.json", "notes.txt"} <= set(objects(index)) and storage.PUBLISHING not in objects(index)
    assert not Remote(f"{s3}/.index.lock").exists()


def test_lock_edge_cases(s3, tmp_path, monkeypatch):
    from featcache import storage
    from featcache.extract import pipeline
    from featcache.files import OutputError, exclusive

    out = Remote(f"{s3}/x")
    real = storage._try_create

    def lost_answer(lock, body):  # the PUT created the lock, its answer was lost, the retry was refused
        real(lock, body)
        return False

    monkeypatch.setattr(storage, "_try_create", lost_answer)
    with exclusive(out, "a thing"):
        assert Remote(f"{s3}/.x.lock").exists()
    monkeypatch.setattr(storage, "_try_create", real)
    assert not Remote(f"{s3}/.x.lock").exists()

    # a dead-looking pid of another pid namespace (a container sharing the host name) is not judged dead
    other = {**storage._holder(), "pid": 2 ** 22 + 11, "started": "1", "pid_namespace": 1}
    Remote(f"{s3}/.x.lock").write_text(json.dumps(other))
    with pytest.raises(OutputError, match="is writing a thing"):
        with exclusive(out, "a thing"):
            pass
    Remote(f"{s3}/.x.lock").unlink()

    # the coordinator releases the lock object whatever stops it before extraction starts
    def broken(*args, **kwargs):
        raise RuntimeError("the store went away")

    monkeypatch.setattr(pipeline, "prepare_store", broken)
    from featcache.extract.backbones import create_backbone
    from featcache.manifest import read_manifest

    with pytest.raises(RuntimeError):
        pipeline.run_extract(read_manifest(image_manifest(tmp_path, 3)), create_backbone("tiny-vit"), f"{s3}/c.zarr")
    assert not Remote(f"{s3}/.c.zarr.lock").exists()


def test_image_paths_that_are_urls(s3, tmp_path, cli, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from featcache.images import ImageFailure, load_image
    from featcache.storage import StorageError

    with pytest.raises(ImageFailure, match="missing file"):  # a web address is not a store: a missing file, as before
        load_image("https://127.0.0.1:1/x.jpg")
    m = image_manifest(tmp_path / "data", 6)
    upload(m.parent, f"{s3}/data")
    monkeypatch.setattr(Remote, "read_bytes", lambda self: (_ for _ in ()).throw(PermissionError("AccessDenied")))
    with pytest.raises(StorageError, match="access denied"):  # the store refused: the run stops, no row fails
        load_image(f"{s3}/data/images/img0000.png")
    monkeypatch.undo()

    # a LAION folder naming its images by URL matches the rows of a manifest read from the bucket
    emb = tmp_path / "emb"
    (emb / "img_emb").mkdir(parents=True)
    (emb / "metadata").mkdir()
    x = np.arange(36, dtype=np.float32).reshape(6, 6)
    np.save(emb / "img_emb" / "img_emb_0.npy", x[::-1])
    paths = [f"{s3}/data/images/img{i:04d}.png" for i in range(6)][::-1]
    pq.write_table(pa.table({"image_path": paths}), emb / "metadata" / "metadata_0.parquet")
    r = cli("import", "--features", emb, "--manifest", f"{s3}/data/m.csv", "--out", tmp_path / "c.zarr",
            "--dtype", "float32", "--json")
    assert json.loads(r.stdout)["matched"] == 6
    np.testing.assert_array_equal(FeatureCache.open(tmp_path / "c.zarr").features(), x)


def test_row_reads_from_s3_equal_the_array(s3, tmp_path):
    from featcache.cache import import_features
    from featcache.manifest import read_manifest, write_manifest
    from tests.test_streaming import rows_cases

    x = np.random.default_rng(1).normal(size=(45, 5)).astype(np.float16)
    m = read_manifest(write_manifest(tmp_path / "m.csv", [f"i{i}" for i in range(45)], ["a"] * 45))
    import_features(x, m, f"{s3}/c.zarr", source="x", source_sha256="0" * 64, chunk_rows=7)
    c = FeatureCache.open(f"{s3}/c.zarr")
    for rows in rows_cases(45):
        np.testing.assert_array_equal(c.features(rows), x[rows])
        np.testing.assert_array_equal(c.valid()[rows], np.ones(45, dtype=bool)[rows])
