"""Files from others are data, nothing outside featcache's own files is ever deleted or overwritten, and
bad input gets one line: each case does what a user (or a hostile file) did, and checks what changed."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from featcache.cache import FeatureCache
from tests.conftest import blobs, make_cache, write_csv


class Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def one_line(result) -> str:
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


@pytest.fixture
def cache(tmp_path):
    x, y = blobs(4, 12, dim=16)
    splits = ["query" if i % 4 == 0 else "index" for i in range(len(y))]
    splits = ["train" if c < 3 else s for c, s in zip(y, splits)]
    return make_cache(tmp_path, x, y, splits)


def test_a_planted_pickle_never_runs(tmp_path, cache, cli):
    marker = tmp_path / "PWNED"
    run = tmp_path / "run"

    def stop(info):
        if info.epoch == 1:
            raise KeyboardInterrupt

    from featcache.train.loop import TrainOptions, load_train_data, train

    train(load_train_data(cache), TrainOptions(epochs=3, batch_size=8), run, on_step=stop)
    assert (run / "state.pt").is_file()
    torch.save({"epoch": 1, "head": Payload(marker)}, run / "state.pt")
    r = cli("train-head", "--cache", cache, "--epochs", "3", "--batch-size", "8", "--out", run, "--resume", code=2)
    assert "not a featcache training state" in one_line(r)
    (run / "head.safetensors").write_bytes(pickle.dumps(Payload(marker)))
    r = cli("eval", "--cache", cache, "--run", run, code=2)
    assert "damaged run" in one_line(r)
    rows = json.loads(cli("runs", tmp_path, "--json").stdout)
    assert [row["status"].split(":")[0] for row in rows] == ["damaged"]
    np.save(tmp_path / "f.npy", np.array([Payload(marker)] * 48, dtype=object), allow_pickle=True)
    r = cli("import", "--features", tmp_path / "f.npy", "--manifest", tmp_path / "c.csv", "--out", tmp_path / "i.zarr", code=2)
    assert "not a .npy array" in one_line(r)
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_bytes(pickle.dumps(Payload(marker)))
    cli("runs", tmp_path / "cfg")
    # a good run whose eval.json, and an index whose index.json, are pickles instead
    good = tmp_path / "good"
    cli("train-head", "--cache", cache, "--epochs", "1", "--batch-size", "8", "--out", good)
    (good / "eval.json").write_bytes(pickle.dumps(Payload(marker)))
    assert "damaged" in json.loads(cli("runs", good, "--json").stdout)[0]["status"]
    cli("index", "--cache", cache, "--run", good, "--out", tmp_path / "idx")
    (tmp_path / "idx" / "index.json").write_bytes(pickle.dumps(Payload(marker)))
    one_line(cli("search", "--index", tmp_path / "idx", "--query-cache", cache, code=2))
    (cache / "zarr.json").write_bytes(pickle.dumps(Payload(marker)))
    one_line(cli("info", cache, code=2))
    assert not marker.exists()


def test_only_featcache_outputs_are_replaced(tmp_path, cache, cli):
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "thesis.tex").write_text("years of work")
    (mine / "sub" / "data.csv").write_text("1,2")
    before = sorted(str(p.relative_to(mine)) for p in mine.rglob("*"))

    def untouched():
        assert sorted(str(p.relative_to(mine)) for p in mine.rglob("*")) == before
        assert (mine / "thesis.tex").read_text() == "years of work"

    for args in (["train-head", "--cache", cache, "--epochs", "1", "--out", mine, "--overwrite"],
                 ["import", "--features", tmp_path / "x.npy", "--manifest", tmp_path / "c.csv", "--out", mine, "--overwrite"],
                 ["index", "--cache", cache, "--out", mine, "--overwrite"],
                 ["export-embeddings", "--cache", cache, "--out", mine, "--overwrite"]):
        np.save(tmp_path / "x.npy", FeatureCache.open(cache).features())
        line = one_line(cli(*args, code=2))
        assert "choose another --out" in line and "--overwrite to replace" not in line
        untouched()
    r = cli("train-head", "--cache", cache, "--epochs", "1", "--out", mine, "--resume", code=2)
    assert "no run to resume" in one_line(r)
    untouched()
    a_file = tmp_path / "a-file"
    a_file.write_text("keep")
    one_line(cli("import", "--features", tmp_path / "x.npy", "--manifest", tmp_path / "c.csv", "--out", a_file, "--overwrite", code=2))
    assert a_file.read_text() == "keep"

    # a run of featcache's own: --overwrite replaces its files and nothing else
    run = tmp_path / "run"
    cli("train-head", "--cache", cache, "--epochs", "2", "--batch-size", "8", "--out", run)
    (run / "notes.txt").write_text("mine")
    cli("train-head", "--cache", cache, "--epochs", "1", "--batch-size", "8", "--out", run, "--overwrite")
    assert (run / "notes.txt").read_text() == "mine" and json.loads((run / "config.json").read_text())["epochs_done"] == 1


def test_resume_never_deletes(tmp_path, cache, cli):
    from featcache.train.loop import TrainOptions, load_train_data, train

    run = tmp_path / "run"

    def stop(info):
        if info.epoch == 2:
            raise KeyboardInterrupt

    train(load_train_data(cache), TrainOptions(epochs=4, batch_size=8), run, on_step=stop)
    (run / "state.pt").unlink()
    files = {p.name: p.read_bytes() for p in run.iterdir()}
    r = cli("train-head", "--cache", cache, "--epochs", "4", "--batch-size", "8", "--out", run, "--resume", code=2)
    assert "cannot be resumed" in one_line(r) and "2 epoch(s) done" in r.output
    assert {p.name: p.read_bytes() for p in run.iterdir()} == files


def test_temporary_files_never_follow_a_planted_symlink(tmp_path, cache, cli):
    run = tmp_path / "run"
    cli("train-head", "--cache", cache, "--epochs", "1", "--batch-size", "8", "--out", run)
    victim = tmp_path / "victim.txt"
    victim.write_text("do not touch")
    for name in ("eval.json.tmp", "config.json.tmp", "metrics.jsonl.tmp", "head.safetensors.tmp"):
        (run / name).symlink_to(victim)
    cli("eval", "--cache", cache, "--run", run)
    cli("train-head", "--cache", cache, "--epochs", "1", "--batch-size", "8", "--out", run, "--overwrite")
    assert victim.read_text() == "do not touch"


def test_options_must_be_finite_and_a_diverging_loss_stops_the_run(tmp_path, cache, cli):
    for option in ("--lr", "--weight-decay", "--dropout"):
        r = cli("train-head", "--cache", cache, "--out", tmp_path / "r", option, "inf", code=2)
        assert "finite" in one_line(r) or "out of range" in r.output
    assert not (tmp_path / "r").exists()
    run = tmp_path / "nan"
    r = cli("train-head", "--cache", cache, "--epochs", "3", "--batch-size", "8", "--loss", "softmax", "--lr", "1e38",
            "--min-lr", "1e37", "--out", run, code=2)
    line = r.output.strip().splitlines()[-1]  # training had started: its progress bar stands above the error
    assert "epoch " in line and ", step " in line and "training loss is" in line
    assert json.loads((run / "config.json").read_text())["complete"] is False


def test_import_refuses_what_the_dtype_cannot_hold(tmp_path, cli):
    m = write_csv(tmp_path / "m.csv", ["path", "label"], [[f"x{i}.jpg", i % 2] for i in range(4)])
    big = np.ones((4, 3), np.float32)
    big[2, 1] = 70000.0
    np.save(tmp_path / "big.npy", big)
    r = cli("import", "--features", tmp_path / "big.npy", "--manifest", m, "--out", tmp_path / "c.zarr", code=2)
    line = one_line(r)
    assert "row 2" in line and "float16" in line and "--dtype float32" in line
    assert not (tmp_path / "c.zarr").exists() and not list(tmp_path.glob(".c.zarr.*tmp"))  # no store, no temp folder
    cli("import", "--features", tmp_path / "big.npy", "--manifest", m, "--out", tmp_path / "c.zarr", "--dtype", "float32")
    assert FeatureCache.open(tmp_path / "c.zarr").features()[2, 1] == 70000.0
    np.save(tmp_path / "z.npy", np.ones((4, 3), np.complex64))
    r = cli("import", "--features", tmp_path / "z.npy", "--manifest", m, "--out", tmp_path / "z.zarr", code=2)
    assert "not real numbers" in one_line(r)


def test_eval_refuses_other_feature_spaces_and_a_cache_against_itself_skips_each_query(tmp_path, cli):
    from featcache.cache import import_features
    from featcache.manifest import read_manifest, write_manifest

    x, y = blobs(5, 8, dim=12, noise=1.2)
    a = make_cache(tmp_path, x, y, name="a")
    m = write_manifest(tmp_path / "b.csv", [f"b{i}.png" for i in range(len(x))], [str(v) for v in y])
    import_features(x, read_manifest(m), tmp_path / "b.zarr", source="other.npy", source_sha256="1" * 64, dtype="float32")
    r = cli("eval", "--query-cache", a, "--index-cache", tmp_path / "b.zarr", "--zero-shot", "raw", code=2)
    assert "cannot be compared" in one_line(r)
    cli("eval", "--query-cache", a, "--index-cache", a, "--zero-shot", "raw", "--json", tmp_path / "self.json")
    got = json.loads((tmp_path / "self.json").read_text())["overall"]
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = xn @ xn.T
    np.fill_diagonal(s, -np.inf)  # itself excluded
    assert got["R@1"] == pytest.approx(float(np.mean(y[s.argmax(axis=1)] == y)))
    assert got["R@1"] < 1.0


def test_damaged_inputs_give_one_line_naming_the_file(tmp_path, cache, cli):
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"path,label\na.jpg,1\nb\xff.jpg,2\n")
    assert f"{bad}:3: not UTF-8" in one_line(cli("manifest", "check", bad, code=2))
    long = tmp_path / "long.csv"
    long.write_text('path,label\na.jpg,1\n"b' + "x" * 200_000 + '.jpg,2\n')
    assert f"{long}:3:" in one_line(cli("manifest", "check", long, code=2))
    meta_file = cache / "zarr.json"
    meta = json.loads(meta_file.read_text())
    for damage in ({"rows_per_chunk": 0}, {"rows_per_chunk": None}, {"backbone": None}):
        broken = json.loads(json.dumps(meta))
        broken["attributes"]["featcache"].update(damage)
        meta_file.write_text(json.dumps(broken))
        line = one_line(cli("info", cache, code=2))
        assert "zarr.json: damaged featcache attributes" in line
    meta_file.write_text(json.dumps(meta))
    cli("info", cache)


def test_disk_full_is_one_line_and_keeps_what_was_finished(tmp_path, cli, small_disk):
    mount = small_disk
    x, y = blobs(2000, 3, dim=8, noise=0.1)  # 2,000 classes x 3 sub-centers x 64 dims: 1.5 MB of class weights
    cache = make_cache(tmp_path, x, y)
    r = cli("train-head", "--cache", cache, "--epochs", "2", "--batch-size", "512", "--out", mount / "run", code=2)
    line = r.output.strip().splitlines()[-1]  # after the progress bar of the epoch that ran
    assert line.startswith("error:") and "no space left on the device" in line and "Traceback" not in r.output
    assert not [p for p in (mount / "run").iterdir() if ".tmp" in p.name]


def test_another_root_is_refused_and_retry_failed_reads_the_failed_rows_again(tmp_path, cli):
    from tests.conftest import image_manifest

    m = image_manifest(tmp_path / "data", 6)
    wrong = tmp_path / "empty"
    wrong.mkdir()
    out = tmp_path / "c.zarr"
    base = ["extract", "-m", "tiny-vit", "--manifest", m, "--out", out, "--workers", "0", "--quiet", "--dtype", "float32"]
    cli(*base, "--root", wrong)
    assert not FeatureCache.open(out).valid().any()
    # chunks where every row failed are written too (all zeros), not taken for lost ones
    assert json.loads(cli("info", out, "--json").stdout)["damaged_chunks"] == []
    line = one_line(cli(*base, "--root", tmp_path / "data", code=2))
    assert "--retry-failed" in line and str(wrong) in line
    cli(*base, "--root", tmp_path / "data", "--retry-failed")
    fixed = FeatureCache.open(out)
    assert fixed.complete and fixed.valid().all() and fixed.meta["root"] == str(tmp_path / "data")
    clean = tmp_path / "clean.zarr"
    cli("extract", "-m", "tiny-vit", "--manifest", m, "--out", clean, "--workers", "0", "--quiet", "--dtype", "float32")
    np.testing.assert_array_equal(fixed.features(), FeatureCache.open(clean).features())

    # a broken image, fixed by the user: --retry-failed reads it again
    image = tmp_path / "data" / "images" / "img0003.png"
    good = image.read_bytes()
    image.write_bytes(good[:40])
    again = tmp_path / "again.zarr"
    cli("extract", "-m", "tiny-vit", "--manifest", m, "--out", again, "--workers", "0", "--quiet", "--dtype", "float32")
    assert FeatureCache.open(again).valid().tolist() == [True, True, True, False, True, True]
    image.write_bytes(good)
    cli("extract", "-m", "tiny-vit", "--manifest", m, "--out", again, "--workers", "0", "--quiet", "--dtype", "float32")
    assert not FeatureCache.open(again).valid()[3]  # a plain rerun trusts the finished store
    cli("extract", "-m", "tiny-vit", "--manifest", m, "--out", again, "--workers", "0", "--quiet", "--dtype", "float32",
        "--retry-failed")
    np.testing.assert_array_equal(FeatureCache.open(again).features(), FeatureCache.open(clean).features())


def test_a_second_writer_is_refused_while_the_first_finishes_intact(tmp_path):
    import fcntl
    import time

    from featcache.extract.backbones import create_backbone
    from featcache.extract.pipeline import run_extract
    from featcache.files import OutputError
    from featcache.manifest import read_manifest
    from tests.conftest import PYTHON, image_manifest, subprocess_env

    m = image_manifest(tmp_path / "data", 600, size=(320, 240))
    out = tmp_path / "c.zarr"
    # the second writer is made ready first, in this process: it must try while the first still runs
    manifest, backbone = read_manifest(m), create_backbone("tiny-vit")
    cmd = [PYTHON, "-m", "featcache", "extract", "-m", "tiny-vit", "--manifest", str(m), "--out", str(out),
           "--workers", "0", "--batch-size", "1", "--chunk-rows", "8", "--quiet"]
    first = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = tmp_path / ".c.zarr.lock"
    deadline = time.time() + 120
    held = False
    while time.time() < deadline and first.poll() is None and not held:  # wait until the first holds the lock
        if lock.exists():
            with open(lock) as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    fcntl.flock(f, fcntl.LOCK_UN)
                except BlockingIOError:
                    held = True
        time.sleep(0.02)
    assert held, "the first extract never took its lock"
    with pytest.raises(OutputError, match="another featcache process is writing a feature cache"):
        run_extract(manifest, backbone, out, workers=0, chunk_rows=8, batch_size=1)
    assert first.wait(timeout=300) == 0, first.stderr.read()
    c = FeatureCache.open(out)
    assert c.complete and c.valid().all() and c.rows == 600
    # and once it is done, the same command is a no-op, not a refusal
    again = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr


def test_damaged_chunks_are_found_refused_and_redone(tmp_path, cli):
    from tests.conftest import image_manifest

    m = image_manifest(tmp_path / "data", 12, classes=4)
    out = tmp_path / "c.zarr"
    extract = ["extract", "-m", "tiny-vit", "--manifest", m, "--out", out, "--workers", "0", "--quiet",
               "--chunk-rows", "4", "--dtype", "float32"]
    cli(*extract)
    original = FeatureCache.open(out).features()
    run = tmp_path / "run"
    cli("train-head", "--cache", out, "--epochs", "1", "--batch-size", "4", "--out", run)
    chunk = out / "features" / "c" / "1" / "0"

    # a missing chunk: seen by info at once, refused by train-head and eval, redone by the same extract
    chunk.unlink()
    assert "DAMAGED" in cli("info", out, code=1).output
    damaged = json.loads(cli("info", out, "--json", code=1).stdout)["damaged_chunks"]
    assert damaged == [f"{chunk} (missing)"]
    for args in (["train-head", "--cache", out, "--out", tmp_path / "r2"], ["eval", "--cache", out, "--run", run]):
        line = one_line(cli(*args, code=2))
        assert str(chunk) in line and "missing" in line and "featcache extract" in line
    cli(*extract)
    np.testing.assert_array_equal(FeatureCache.open(out).features(), original)
    cli("info", out, "--verify")

    # a truncated one, likewise
    chunk.write_bytes(chunk.read_bytes()[:50])
    assert "50 bytes" in one_line(cli("eval", "--cache", out, "--run", run, code=2))
    cli(*extract)
    np.testing.assert_array_equal(FeatureCache.open(out).features(), original)

    # changed bytes of the right size: only a full read finds them (their crc32c), and the extract redoes them
    data = bytearray(chunk.read_bytes())
    data[10] ^= 0xFF
    chunk.write_bytes(bytes(data))
    cli("info", out)
    line = one_line(cli("eval", "--cache", out, "--run", run, code=2))  # reading it finds the checksum
    assert str(chunk) in line and "checksum" in line and "featcache extract" in line
    r = cli("info", out, "--verify", "--json", code=1)
    assert any(str(chunk) in d and "checksum" in d for d in json.loads(r.stdout)["damaged_chunks"])
    cli(*extract)
    np.testing.assert_array_equal(FeatureCache.open(out).features(), original)
    cli("info", out, "--verify")


def test_extract_on_a_full_disk_is_one_line(tmp_path, cli, small_disk):
    mount = small_disk
    # 4,000 rows (missing files: failure rows, fast) x 256 float32 = 4 MB of features for a 1 MB disk
    m = write_csv(tmp_path / "m.csv", ["path", "label"], [[f"nope/{i}.png", i % 3] for i in range(4000)])
    r = cli("extract", "-m", "tiny-vit", "--manifest", m, "--out", mount / "c.zarr", "--dtype", "float32",
            "--workers", "0", "--quiet", code=2)
    assert "no space left on the device" in one_line(r) and "Traceback" not in r.output
