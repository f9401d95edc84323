import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from featcache.cache import FeatureCache
from tests.conftest import PYTHON, REPO, image_manifest, subprocess_env, write_csv, write_images
from tests.test_images import png_header_only

F16_RTOL, F16_ATOL = 2e-3, 2e-3  # float16 keeps 11 significant bits


def direct_open_clip(weights: Path, files: list[Path], boxes=None) -> np.ndarray:
    """The tiny model run straight through open_clip: no featcache code involved."""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms("featcache-tiny-vit", pretrained=str(weights))
    model.eval()
    images = []
    for i, f in enumerate(files):
        im = Image.open(f).convert("RGB")
        if boxes and boxes[i]:
            im = im.crop(boxes[i])
        images.append(preprocess(im))
    with torch.no_grad():
        return model.encode_image(torch.stack(images)).numpy()


def test_features_equal_the_backbone_run_directly(tmp_path, cli, tiny_weights):
    names = write_images(tmp_path / "images", 11, size=(70, 50))
    rows = [[f"images/{n}", i % 3, "", "", "", ""] for i, n in enumerate(names)]
    rows[4][2:] = ["5", "6", "40", "44"]  # one crop box
    m = write_csv(tmp_path / "m.csv", ["path", "label", "x1", "y1", "x2", "y2"], rows)
    out = tmp_path / "c.zarr"
    cli("extract", "--model", "tiny-vit", "--weights", tiny_weights, "--manifest", m, "--out", out,
        "--chunk-rows", "4", "--batch-size", "3", "--workers", "0", "--quiet")
    files = [tmp_path / "images" / n for n in names]
    boxes = [None] * 11
    boxes[4] = (5, 6, 40, 44)
    expected = direct_open_clip(tiny_weights, files, boxes)
    cache = FeatureCache.open(out)
    got = cache.features()
    assert got.dtype == np.float16 and got.shape == expected.shape
    np.testing.assert_allclose(got.astype(np.float32), expected, rtol=F16_RTOL, atol=F16_ATOL)
    assert cache.valid().all()
    # random weights would give other features: the file really was used
    cli("extract", "--model", "tiny-vit", "--manifest", m, "--out", tmp_path / "r.zarr", "--workers", "0", "--quiet")
    assert not np.allclose(FeatureCache.open(tmp_path / "r.zarr").features(), got, atol=1e-2)


def test_float32_and_workers_give_the_same_rows(tmp_path, cli, tiny_weights):
    m = image_manifest(tmp_path, 9)
    cli("extract", "-m", "tiny-vit", "--weights", tiny_weights, "--manifest", m, "--out", tmp_path / "a.zarr",
        "--dtype", "float32", "--workers", "2", "--batch-size", "2", "--quiet")
    feats = FeatureCache.open(tmp_path / "a.zarr").features()
    assert feats.dtype == np.float32
    files = [tmp_path / "images" / f"img{i:04d}.png" for i in range(9)]
    np.testing.assert_allclose(feats, direct_open_clip(tiny_weights, files), rtol=1e-4, atol=1e-5)


def test_cache_follows_the_contract(tmp_path, cli):
    m = image_manifest(tmp_path, 10)
    out = tmp_path / "c.zarr"
    cli("extract", "-m", "tiny-vit", "--manifest", m, "--out", out, "--chunk-rows", "4", "--workers", "0", "--quiet")
    g = zarr.open_group(str(out), mode="r")
    assert g["features"].shape == (10, 256) and g["features"].chunks == (4, 256)
    assert [type(c).__name__ for c in g["features"].compressors] == ["Crc32cCodec"]  # a checksum, no compression
    assert g["valid"].dtype == bool and g["valid"].chunks == (4,)
    assert g["failures"].chunks == (4,)
    assert g["chunk_done"].shape == (3,) and g["chunk_done"].chunks == (1,) and g["chunk_done"][:].all()
    assert g["labels"][:].tolist() == [i % 4 for i in range(10)]
    assert g["labels"].dtype == np.int64
    assert list(g["classes"][:]) == ["0", "1", "2", "3"]
    assert list(g["paths"][:]) == [f"images/img{i:04d}.png" for i in range(10)]
    assert list(g["domains"][:]) == [f"d{i % 2}" for i in range(10)]
    assert list(g["splits"][:]) == [["train", "query", "index"][i % 3] for i in range(10)]
    meta = g.attrs["featcache"]
    assert meta["complete"] is True and meta["rows"] == 10 and meta["dim"] == 256 and meta["dtype"] == "float16"
    assert meta["backbone"]["arch"] == "featcache-tiny-vit" and meta["backbone"]["weights"] == "random-init(seed=0)"
    assert len(meta["key"]) == 32 and meta["manifest_sha256"]
    assert not (out / "zarr.json").read_text().count("consolidated_metadata\": {")  # no consolidated metadata
    assert not list(out.rglob("*.partial"))


def test_bad_images_become_failure_rows(tmp_path, cli):
    img = tmp_path / "images"
    write_images(img, 3)
    (img / "zero.jpg").write_bytes(b"")
    (img / "text.jpg").write_text("this is not a jpeg")
    good = img / "img0000.png"
    (img / "trunc.jpg").write_bytes(b"")
    Image.open(good).save(img / "full.jpg", quality=95)
    data = (img / "full.jpg").read_bytes()
    (img / "trunc.jpg").write_bytes(data[: len(data) // 3])
    Image.new("RGB", (1, 1)).save(img / "dot.png")
    png_header_only(img / "bomb.png", 30000, 30000)
    files = ["img0000.png", "zero.jpg", "text.jpg", "missing.jpg", "trunc.jpg", "img0001.png", "dot.png", "bomb.png", "img0002.png"]
    m = write_csv(tmp_path / "m.csv", ["path", "label"], [[f"images/{f}", i % 2] for i, f in enumerate(files)])
    res = cli("extract", "-m", "tiny-vit", "--manifest", m, "--out", tmp_path / "c.zarr", "--chunk-rows", "4",
              "--workers", "1", "--json")
    report = json.loads(res.stdout)
    assert report["rows"] == 9 and report["valid"] == 3 and report["failed"] == 6
    c = FeatureCache.open(tmp_path / "c.zarr")
    assert c.valid().tolist() == [True, False, False, False, False, True, False, False, True]
    reasons = list(c.strings("failures"))
    assert reasons[0] == "" and reasons[1] == "empty file (0 bytes)"
    assert reasons[2].startswith("not an image") and reasons[3] == "missing file"
    assert reasons[4].startswith("decode error") and reasons[6].startswith("image too small (1x1 px")
    assert reasons[7].startswith("decompression bomb")
    assert np.all(c.features()[~c.valid()] == 0)
    info = json.loads(cli("info", tmp_path / "c.zarr", "--json").stdout)
    assert info["failed"] == 6 and info["failure_reasons"]["missing file"] == 1
    assert {f["path"] for f in info["failed_rows"]} == {f"images/{f}" for f in files if not f.startswith("img")}


def test_rerun_is_a_noop_and_a_different_request_is_refused(tmp_path, cli, tiny_weights):
    m = image_manifest(tmp_path, 6)
    out = tmp_path / "c.zarr"
    base = ["extract", "-m", "tiny-vit", "--manifest", m, "--out", out, "--workers", "0", "--quiet"]
    cli(*base)
    before = FeatureCache.open(out).features()
    assert json.loads(cli(*base, "--json").stdout)["skipped"] is True
    r = cli(*base, "--dtype", "float32", code=2)
    assert "holds a different cache (dtype: 'float16' in the store, 'float32' requested)" in r.output
    r = cli(*base, "--weights", tiny_weights, code=2)
    assert "backbone.weights: 'random-init(seed=0)' in the store, 'sha256:" in r.output and "--overwrite" in r.output
    write_csv(tmp_path / "m.csv", ["path", "label"], [[f"images/img{i:04d}.png", 9] for i in range(6)])
    r = cli(*base, code=2)
    assert "manifest_sha256" in r.output
    np.testing.assert_array_equal(FeatureCache.open(out).features(), before)  # nothing was touched
    cli(*base, "--overwrite")
    assert FeatureCache.open(out).labels().tolist() == [0] * 6


def test_default_location_and_info(tmp_path, cli, monkeypatch):
    m = image_manifest(tmp_path, 5)
    monkeypatch.chdir(tmp_path)
    cli("extract", "-m", "tiny-vit", "--manifest", m, "--workers", "0", "--quiet")
    path = tmp_path / "cache" / "m" / "tiny-vit.zarr"
    info = json.loads(cli("info", path, "--json").stdout)
    assert info["rows"] == 5 and info["splits"]["query"] == {"rows": 2, "valid": 2}
    assert info["domains"]["d0"]["rows"] == 3 and info["bytes_on_disk"] > 5 * 256 * 2
    text = cli("info", path).stdout
    assert "complete" in text and "tiny-vit" in text


def test_import_builds_a_cache_from_an_array(tmp_path, cli):
    m = write_csv(tmp_path / "m.csv", ["path", "label", "split"], [[f"x{i}.jpg", i % 2, "train"] for i in range(7)])
    arr = np.random.default_rng(0).normal(size=(7, 5)).astype(np.float32)
    arr[3, 1] = np.nan
    np.save(tmp_path / "f.npy", arr)
    cli("import", "--features", tmp_path / "f.npy", "--manifest", m, "--out", tmp_path / "c.zarr", "--chunk-rows", "3")
    c = FeatureCache.open(tmp_path / "c.zarr")
    assert c.complete and c.valid().tolist() == [True, True, True, False, True, True, True]
    ok = c.valid()
    np.testing.assert_allclose(c.features()[ok].astype(np.float32), arr[ok], rtol=1e-3, atol=1e-3)
    assert "non-finite" in c.strings("failures")[3]
    np.save(tmp_path / "g.npy", arr[:6])
    r = cli("import", "--features", tmp_path / "g.npy", "--manifest", m, "--out", tmp_path / "d.zarr", code=2)
    assert "has 6 rows but" in r.output and "has 7" in r.output


def test_timm_backbone_matches_timm_directly(tmp_path, cli):
    import timm
    from timm.data import create_transform, resolve_model_data_config

    torch.manual_seed(7)
    model = timm.create_model("test_vit", pretrained=False, num_classes=0).eval()
    torch.save(model.state_dict(), tmp_path / "w.pth")
    m = image_manifest(tmp_path, 4)
    cli("extract", "-m", "timm:test_vit", "--weights", tmp_path / "w.pth", "--manifest", m, "--out", tmp_path / "c.zarr",
        "--dtype", "float32", "--workers", "0", "--quiet")
    tf = create_transform(**resolve_model_data_config(model), is_training=False)
    x = torch.stack([tf(Image.open(tmp_path / "images" / f"img{i:04d}.png").convert("RGB")) for i in range(4)])
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(FeatureCache.open(tmp_path / "c.zarr").features(), expected, rtol=1e-4, atol=1e-5)


def test_unavailable_weights_stop_with_one_line(tmp_path, cli, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once at import: patch it too
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    m = image_manifest(tmp_path, 2)
    r = cli("extract", "-m", "siglip-so400m", "--manifest", m, "--out", tmp_path / "c.zarr", code=2)
    lines = r.output.strip().splitlines()
    assert len(lines) == 1, r.output  # no library warnings before the error
    line = lines[0]
    assert line.startswith("error: cannot load pretrained weights for siglip-so400m")
    assert "ViT-SO400M-14-SigLIP-384@webli" in line and "--weights FILE" in line
    assert "(hub id timm/ViT-SO400M-14-SigLIP-384)" in line and "no copy is in the local cache" in line
    assert not (tmp_path / "c.zarr").exists()
    r = cli("extract", "-m", "no-such-model", "--manifest", m, code=2)
    assert "unknown model 'no-such-model'" in r.output and "siglip-so400m" in r.output


def test_a_failed_download_is_one_line_with_its_root_cause(capfd):
    """What the hub client raises when the network is down: its own error, caused by a DNS failure. The
    message names the model, the hub id and the root cause, not the client's generic sentence; the
    client's retry warnings, logged while the model loads, are not printed."""
    import logging
    import socket

    from huggingface_hub.errors import LocalEntryNotFoundError

    from featcache.extract.backbones import resolve_spec
    from featcache.extract.backbones.base import missing_weights, quiet_library_logs

    logging.basicConfig()  # as open_clip's users often have it: a handler on the root logger
    try:
        with quiet_library_logs():
            logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 8s [Retry 5/5].")
            logging.getLogger().error("Failed to download weights for tag 'webli'")
            try:
                raise socket.gaierror(-2, "Name or service not known")
            except OSError as dns:
                try:
                    raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub and we "
                                                  "cannot find the requested files in the local cache.") from dns
                except LocalEntryNotFoundError as hub:
                    try:
                        raise RuntimeError("Failed to download weights for tag 'webli': Failed to download file") from hub
                    except RuntimeError as e:
                        err = missing_weights(resolve_spec("siglip-so400m"), "timm/ViT-SO400M-14-SigLIP-384/", e)
    finally:
        logging.getLogger().handlers.clear()
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""
    assert str(err) == ("cannot load pretrained weights for siglip-so400m = open_clip:ViT-SO400M-14-SigLIP-384@webli "
                        "(hub id timm/ViT-SO400M-14-SigLIP-384): the hub cannot be reached ([Errno -2] Name or service "
                        "not known) and no copy is in the local cache. Download the checkpoint on a machine with network "
                        "and pass it with --weights FILE.")
    logging.getLogger("featcache.test").warning("logging works again")
    assert "logging works again" in capfd.readouterr().err or logging.root.manager.disable == 0


def test_registry_pins_preprocessing_from_the_pretrained_tag():
    from featcache.extract.backbones import resolve_spec
    from featcache.extract.backbones.open_clip_models import resolve_preprocess

    # the paper's SigLIP: 384 px, bicubic, mean/std 0.5, resize the shorter side + center crop
    pp = resolve_preprocess(resolve_spec("siglip-so400m"))
    assert pp == {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic", "resize_mode": "shortest"}
    assert resolve_spec("open_clip:ViT-B-32@openai").pretrained == "openai"
    assert resolve_spec("timm:vit_small_patch14_dinov2.lvd142m").library == "timm"


def test_models_lists_the_registry(cli):
    rows = json.loads(cli("models", "--json").stdout)
    by_name = {r["name"]: r for r in rows}
    assert by_name["siglip-so400m"]["dim"] == 1152 and by_name["siglip-so400m"]["image_size"] == 384
    assert by_name["dinov2-l14"]["dim"] == 1024 and by_name["clip-vit-l14"]["dim"] == 768
    assert 400 < by_name["siglip-so400m"]["params_m"] < 450
    # the families the paper compared, built on the meta device: the architecture's own output and input size
    assert (by_name["clipa-h14-336"]["dim"], by_name["clipa-h14-336"]["image_size"]) == (1024, 336)
    assert (by_name["convnext-xxl-clip"]["dim"], by_name["convnext-xxl-clip"]["image_size"]) == (1024, 256)
    assert (by_name["sam-vit-h"]["dim"], by_name["sam-vit-h"]["image_size"]) == (256, 1024)
    assert 600 < by_name["sam-vit-h"]["params_m"] < 700  # ViT-H image encoder (637M)


def test_new_families_take_the_preprocessing_their_tags_prescribe():
    import open_clip
    import timm

    from featcache.extract.backbones import resolve_spec
    from featcache.extract.backbones.open_clip_models import resolve_preprocess

    for name, arch, tag in [("clipa-h14-336", "ViT-H-14-CLIPA-336", "datacomp1b"),
                            ("convnext-xxl-clip", "convnext_xxlarge", "laion2b_s34b_b82k_augreg")]:
        spec = resolve_spec(name)
        assert (spec.library, spec.arch, spec.pretrained) == ("open_clip", arch, tag)
        cfg = open_clip.get_pretrained_cfg(arch, tag)
        assert resolve_preprocess(spec) == {k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode")}
    # CLIPA squashes with bilinear and ImageNet statistics; ConvNeXt crops with bicubic and OpenAI's
    assert resolve_preprocess(resolve_spec("clipa-h14-336"))["resize_mode"] == "squash"
    sam = resolve_spec("sam-vit-h")
    assert (sam.library, sam.arch) == ("timm", "samvit_huge_patch16.sa1b")
    model = timm.create_model(sam.arch, pretrained=False, num_classes=0, device="meta")
    assert model.global_pool == "avg" and model.pretrained_cfg["input_size"] == (3, 1024, 1024)


# --- real processes: kill, interrupt, torchrun -------------------------------------------------

def slow_manifest(tmp_path: Path, n: int = 160) -> Path:
    # Large JPEGs make decoding dominate, so the run lasts long enough to be stopped part way.
    return image_manifest(tmp_path, n, size=(900, 700), ext="jpg")


def extract_cmd(m: Path, out: Path, *extra: str) -> list[str]:
    return [PYTHON, "-m", "featcache", "extract", "-m", "tiny-vit", "--manifest", str(m), "--out", str(out),
            "--chunk-rows", "8", "--batch-size", "4", "--workers", "0", "--quiet", *extra]


def done_flags(out: Path) -> int:
    d = out / "chunk_done" / "c"
    return len(list(d.iterdir())) if d.is_dir() else 0


def stop_part_way(cmd: list[str], out: Path, sig: int, total_chunks: int) -> subprocess.CompletedProcess:
    # Ctrl-C as a terminal sends it: SIGINT handled by default in the child, even where this test runs with it
    # ignored (a shell starts background jobs so, and Python then never raises KeyboardInterrupt)
    proc = subprocess.Popen(cmd, env=subprocess_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while done_flags(out) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=120)
    done = done_flags(out)
    assert 0 < done < total_chunks, f"could not stop the run part way ({done} of {total_chunks} chunks done):\n{output}"
    return subprocess.CompletedProcess(cmd, proc.returncode, output)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    m = slow_manifest(tmp)
    out = tmp / "ref.zarr"
    subprocess.run(extract_cmd(m, out), env=subprocess_env(), cwd=REPO, check=True)
    return m, FeatureCache.open(out)


def assert_same_cache(a: FeatureCache, b: FeatureCache) -> None:
    assert b.complete and b.chunk_done().all() and b.valid().all()
    assert list(a.strings("paths")) == list(b.strings("paths"))
    np.testing.assert_allclose(a.features().astype(np.float32), b.features().astype(np.float32), rtol=F16_RTOL, atol=F16_ATOL)
    assert a.key == b.key


def test_sigkill_then_rerun_equals_an_uninterrupted_run(tmp_path, reference_run):
    m, ref = reference_run
    out = tmp_path / "c.zarr"
    stop_part_way(extract_cmd(m, out), out, signal.SIGKILL, 20)
    assert not FeatureCache.open(out).complete
    subprocess.run(extract_cmd(m, out), env=subprocess_env(), cwd=REPO, check=True)
    assert_same_cache(ref, FeatureCache.open(out))
    assert not list(out.rglob("*.partial"))


def test_ctrl_c_keeps_finished_chunks_and_says_how_to_continue(tmp_path, reference_run):
    m, ref = reference_run
    out = tmp_path / "c.zarr"
    res = stop_part_way(extract_cmd(m, out), out, signal.SIGINT, 20)
    assert res.returncode == 130
    assert "run the same command again to continue" in res.stdout
    kept = done_flags(out)
    c = FeatureCache.open(out)
    done_rows = np.repeat(c.chunk_done(), 8)[:160]
    assert c.valid()[done_rows].all() and kept == int(c.chunk_done().sum())
    subprocess.run(extract_cmd(m, out), env=subprocess_env(), cwd=REPO, check=True)
    assert_same_cache(ref, FeatureCache.open(out))


def test_torchrun_two_cpu_ranks_equal_one_process(tmp_path, reference_run):
    m, ref = reference_run
    out = tmp_path / "c.zarr"
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *extract_cmd(m, out)[1:]]
    env = subprocess_env()
    env["OMP_NUM_THREADS"] = "1"
    subprocess.run(cmd, env=env, cwd=REPO, check=True, timeout=600)
    assert_same_cache(ref, FeatureCache.open(out))
