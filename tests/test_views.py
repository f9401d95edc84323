"""Augmented views in the cache (extract --views/--augment) and training on them (train-head --views)."""

import json
import signal
import subprocess

import numpy as np
import pytest
import torch
import zarr
from PIL import Image
from zarr.codecs import Crc32cCodec

from featcache.cache import KEY_FIELDS, FeatureCache
from featcache.extract.augment import CROPS, crop_box, view_rng
from featcache.train.loop import TrainOptions, batch_features, load_train_data, train, view_draw
from tests.conftest import PYTHON, REPO, blobs, image_manifest, make_cache, subprocess_env
from tests.test_extract import F16_ATOL, F16_RTOL, assert_same_cache, direct_open_clip, extract_cmd, slow_manifest, stop_part_way


def tiny_model(weights):
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms("featcache-tiny-vit", pretrained=str(weights))
    return model.eval(), preprocess


def test_flip_view_is_the_backbone_on_the_mirrored_image(tmp_path, cli, tiny_weights):
    m = image_manifest(tmp_path, 7, size=(61, 43))
    out = tmp_path / "c.zarr"
    cli("extract", "-m", "tiny-vit", "--weights", tiny_weights, "--manifest", m, "--out", out, "--augment", "flip",
        "--chunk-rows", "3", "--batch-size", "4", "--workers", "0", "--quiet")
    mirrored = []
    for i in range(7):
        path = tmp_path / f"mirror{i}.png"
        Image.open(tmp_path / "images" / f"img{i:04d}.png").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(path)
        mirrored.append(path)
    cache = FeatureCache.open(out)
    views = cache.augmented()
    assert views.shape == (7, 1, cache.dim) and cache.views == 1
    np.testing.assert_allclose(views[:, 0].astype(np.float32), direct_open_clip(tiny_weights, mirrored), rtol=F16_RTOL, atol=F16_ATOL)
    clean = direct_open_clip(tiny_weights, [tmp_path / "images" / f"img{i:04d}.png" for i in range(7)])
    np.testing.assert_allclose(cache.features().astype(np.float32), clean, rtol=F16_RTOL, atol=F16_ATOL)  # unchanged
    assert not np.allclose(views[:, 0], cache.features(), atol=1e-2)


def test_openclip_views_are_the_drawn_crops_resized_then_the_model(tmp_path, cli, tiny_weights):
    m = image_manifest(tmp_path, 5, size=(80, 78))
    out = tmp_path / "c.zarr"
    cli("extract", "-m", "tiny-vit", "--weights", tiny_weights, "--manifest", m, "--out", out, "--views", "3",
        "--augment", "openclip", "--dtype", "float32", "--workers", "0", "--quiet")
    got = FeatureCache.open(out).augmented()
    model, preprocess = tiny_model(tiny_weights)
    expected = np.zeros_like(got)
    for row in range(5):
        image = Image.open(tmp_path / "images" / f"img{row:04d}.png").convert("RGB")
        for v in range(3):
            top, left, h, w = crop_box(view_rng(0, row, v), 80, 78, *CROPS["openclip"])
            # a square of 90-100 % of the area (up to rounding), inside the image
            assert h == w and 0.9 * 80 * 78 - 2 * w <= w * h <= 80 * 78 and top + h <= 78 and left + w <= 80
            crop = image.crop((left, top, left + w, top + h)).resize((32, 32), Image.Resampling.BICUBIC)
            with torch.no_grad():  # the model's own eval preprocessing is a no-op on a 32x32 image
                expected[row, v] = model.encode_image(preprocess(crop)[None]).numpy()[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert not np.allclose(got[:, 0], got[:, 1], atol=1e-3)  # views are drawn one by one


def test_crops_follow_torchvision_random_resized_crop():
    from torchvision.transforms import RandomResizedCrop

    # no square of 90 % of a 200x100 image fits: both fall back to the centred 100x100 square
    image = Image.new("RGB", (200, 100))
    for seed in range(5):
        torch.manual_seed(seed)
        expected = RandomResizedCrop.get_params(image, scale=[0.9, 1.0], ratio=[1.0, 1.0])
        assert crop_box(view_rng(seed, 0, 0), 200, 100, (0.9, 1.0), (1.0, 1.0)) == tuple(expected) == (0, 50, 100, 100)
    # siglip's crop: torchvision's defaults; the same distribution as torchvision's own draws (area and aspect)
    image = Image.new("RGB", (300, 200))
    torch.manual_seed(0)
    theirs = np.array([RandomResizedCrop.get_params(image, scale=[0.08, 1.0], ratio=[3 / 4, 4 / 3]) for _ in range(4000)])
    ours = np.array([crop_box(view_rng(1, r, 0), 300, 200, *CROPS["siglip"]) for r in range(4000)])
    for boxes in (theirs, ours):
        top, left, h, w = boxes.T
        assert (top >= 0).all() and (left >= 0).all() and (top + h <= 200).all() and (left + w <= 300).all()
    area = [b[:, 2] * b[:, 3] / 60000 for b in (theirs, ours)]
    aspect = [b[:, 3] / b[:, 2] for b in (theirs, ours)]
    np.testing.assert_allclose(np.quantile(area[1], [0.1, 0.5, 0.9]), np.quantile(area[0], [0.1, 0.5, 0.9]), atol=0.03)
    np.testing.assert_allclose(np.quantile(aspect[1], [0.1, 0.5, 0.9]), np.quantile(aspect[0], [0.1, 0.5, 0.9]), atol=0.03)
    assert area[1].min() >= 0.079 and aspect[1].min() > 0.74 and aspect[1].max() < 1.34


def test_views_do_not_depend_on_chunks_batches_or_workers(tmp_path, cli):
    m = image_manifest(tmp_path, 11, size=(70, 52))
    base = ["extract", "-m", "tiny-vit", "--manifest", m, "--views", "2", "--augment", "custom", "--quiet"]
    cli(*base, "--out", tmp_path / "a.zarr", "--chunk-rows", "4", "--batch-size", "9", "--workers", "0")
    cli(*base, "--out", tmp_path / "b.zarr", "--chunk-rows", "5", "--batch-size", "2", "--workers", "2")
    a, b = FeatureCache.open(tmp_path / "a.zarr"), FeatureCache.open(tmp_path / "b.zarr")
    assert a.key == b.key and a.augmented().shape == (11, 2, a.dim)
    np.testing.assert_allclose(a.augmented().astype(np.float32), b.augmented().astype(np.float32), rtol=F16_RTOL, atol=F16_ATOL)
    assert not np.allclose(a.augmented()[:, 0], a.augmented()[:, 1], atol=1e-2)
    # the same rows without views: the clean features are those of a plain extraction
    cli("extract", "-m", "tiny-vit", "--manifest", m, "--out", tmp_path / "plain.zarr", "--workers", "0", "--quiet")
    plain = FeatureCache.open(tmp_path / "plain.zarr")
    np.testing.assert_allclose(a.features().astype(np.float32), plain.features().astype(np.float32), rtol=F16_RTOL, atol=F16_ATOL)
    assert plain.key != a.key and plain.augmentation is None and "augmented" not in plain.group


def test_views_are_in_the_key_and_bad_requests_stop_with_one_line(tmp_path, cli):
    m = image_manifest(tmp_path, 4)
    out = tmp_path / "c.zarr"
    cli("extract", "-m", "tiny-vit", "--manifest", m, "--out", out, "--augment", "openclip", "--views", "2", "--quiet")
    meta = FeatureCache.open(out).meta
    assert meta["augmentation"] == {"augment": "openclip", "views": 2, "seed": 0, "crop_scale": [0.9, 1.0], "crop_ratio": [1.0, 1.0]}
    res = cli("extract", "-m", "tiny-vit", "--manifest", m, "--out", out, "--augment", "openclip", "--views", "3", "--quiet", code=2)
    assert "augmentation.views: 2 in the store, 3 requested" in res.output
    res = cli("extract", "-m", "tiny-vit", "--manifest", m, "--out", out, "--quiet", code=2)
    assert "augmented views: 2 (openclip) in the store, none requested" in res.output
    assert "--augment" in cli("extract", "-m", "tiny-vit", "--manifest", m, "--out", out, "--views", "2", code=2).output
    from featcache.cli.extract import Augment
    from featcache.extract.augment import AUGMENTS

    assert [a.value for a in Augment] == list(AUGMENTS)  # the CLI's choices (kept import-light) are the recipes
    assert "use --views 1" in cli("extract", "-m", "tiny-vit", "--manifest", m, "--out", out, "--views", "2", "--augment",
                                  "flip", code=2).output
    # a cache without views keeps the key it had before views existed: the hash of the key fields alone
    cli("extract", "-m", "tiny-vit", "--manifest", m, "--out", tmp_path / "p.zarr", "--quiet")
    import hashlib

    plain = FeatureCache.open(tmp_path / "p.zarr").meta
    old = hashlib.sha256(json.dumps({k: plain[k] for k in KEY_FIELDS}, sort_keys=True).encode()).hexdigest()[:32]
    assert plain["key"] == old and "augmentation" not in plain


def test_a_damaged_view_chunk_is_reported_and_redone(tmp_path, cli):
    m = image_manifest(tmp_path, 10)
    out = tmp_path / "c.zarr"
    cmd = ["extract", "-m", "tiny-vit", "--manifest", m, "--out", out, "--augment", "siglip", "--views", "2",
           "--chunk-rows", "4", "--workers", "0", "--quiet"]
    cli(*cmd)
    before = FeatureCache.open(out).augmented()
    chunk = out / "augmented" / "c" / "1" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[10] ^= 0xFF
    chunk.write_bytes(bytes(data))
    assert "DAMAGED" in cli("info", out, "--verify", code=1).output
    damaged = json.loads(cli("info", out, "--verify", "--json", code=1).stdout)["damaged_chunks"]
    assert len(damaged) == 1 and damaged[0].startswith(str(chunk))
    assert "damaged chunk" in cli("train-head", "-c", out, "--views", "--epochs", "1", "--out", tmp_path / "r", code=2).output
    cli(*cmd)
    np.testing.assert_array_equal(FeatureCache.open(out).augmented(), before)
    assert not FeatureCache.open(out).chunk_problems(read=True)


@pytest.fixture(scope="module")
def reference_views(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref-views")
    m = slow_manifest(tmp, 96)
    out = tmp / "ref.zarr"
    subprocess.run(extract_cmd(m, out, "--views", "2", "--augment", "custom"), env=subprocess_env(), cwd=REPO, check=True)
    return m, FeatureCache.open(out)


def test_sigkill_then_rerun_writes_the_views_of_an_uninterrupted_run(tmp_path, reference_views):
    m, ref = reference_views
    out = tmp_path / "c.zarr"
    cmd = extract_cmd(m, out, "--views", "2", "--augment", "custom")
    stop_part_way(cmd, out, signal.SIGKILL, 12)
    subprocess.run(cmd, env=subprocess_env(), cwd=REPO, check=True)
    got = FeatureCache.open(out)
    assert_same_cache(ref, got)
    np.testing.assert_allclose(ref.augmented().astype(np.float32), got.augmented().astype(np.float32), rtol=F16_RTOL, atol=F16_ATOL)


def test_torchrun_two_ranks_write_the_views_of_one_process(tmp_path, reference_views):
    m, ref = reference_views
    out = tmp_path / "c.zarr"
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           *extract_cmd(m, out, "--views", "2", "--augment", "custom")[1:]]
    env = subprocess_env()
    env["OMP_NUM_THREADS"] = "1"
    subprocess.run(cmd, env=env, cwd=REPO, check=True, timeout=600)
    got = FeatureCache.open(out)
    assert_same_cache(ref, got)
    np.testing.assert_allclose(ref.augmented().astype(np.float32), got.augmented().astype(np.float32), rtol=F16_RTOL, atol=F16_ATOL)


# --- training on views -----------------------------------------------------------------------------

def with_views(cache_path, views: np.ndarray) -> None:
    """Give a cache made by import an ``augmented`` array holding exactly ``views`` (N, V, D)."""
    group = zarr.open_group(store=str(cache_path), mode="r+", zarr_format=3)
    meta = dict(group.attrs["featcache"])
    arr = group.create_array("augmented", shape=views.shape, dtype=meta["dtype"], chunks=(meta["rows_per_chunk"], *views.shape[1:]),
                             compressors=[Crc32cCodec()], config={"write_empty_chunks": True})
    arr[:] = views.astype(meta["dtype"])
    meta["augmentation"] = {"augment": "custom", "views": views.shape[1], "seed": 0}
    group.attrs["featcache"] = meta


@pytest.fixture
def marked_cache(tmp_path):
    """Training rows whose view v is the clean row plus 1000 * v: a batch says which view each row drew."""
    x, y = blobs(4, 15, dim=8)
    path = make_cache(tmp_path, x, y)
    with_views(path, x[:, None, :] + 1000.0 * np.arange(1, 4)[None, :, None])
    return path, x


def test_each_row_draws_one_of_its_views_per_epoch(marked_cache):
    path, x = marked_cache
    data = load_train_data(path, views=True)
    assert data.views.shape == (60, 4, 8) and data.augmentation["views"] == 3
    np.testing.assert_array_equal(data.features.numpy(), x)
    idx = torch.tensor([5, 0, 59, 17, 5])
    seen = []
    for epoch in range(40):
        draw = view_draw(data, 42, epoch)
        got = batch_features(data, idx, draw).numpy()
        np.testing.assert_allclose(got - x[idx.numpy()], 1000.0 * draw[idx].numpy()[:, None] * np.ones((1, 8)), atol=1e-3)
        seen.append(draw.numpy())
    counts = np.bincount(np.concatenate(seen), minlength=4) / (40 * 60)
    np.testing.assert_allclose(counts, 0.25, atol=0.03)  # clean and each view equally often
    assert not np.array_equal(seen[0], seen[1])


def test_views_equal_to_the_clean_rows_train_the_same_head(tmp_path):
    x, y = blobs(4, 15, dim=8)
    path = make_cache(tmp_path, x, y)
    with_views(path, np.repeat(x[:, None, :], 2, axis=1))
    options = TrainOptions(epochs=3, batch_size=16)
    a = train(load_train_data(path), options, tmp_path / "a")
    b = train(load_train_data(path, views=True), TrainOptions(epochs=3, batch_size=16, views=True), tmp_path / "b")
    assert all(torch.equal(p, q) for p, q in zip(a.head.state_dict().values(), b.head.state_dict().values()))
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["options"]["views"] is True and config["data"]["augmentation"]["views"] == 2


def test_training_on_views_resumes_to_the_uninterrupted_head(tmp_path, marked_cache):
    path, _ = marked_cache
    data = load_train_data(path, views=True)
    options = TrainOptions(epochs=3, batch_size=16, views=True, lr=1e-3)
    full = train(data, options, tmp_path / "full")

    def stop_in_epoch_2(info):
        if info.epoch == 1 and info.step == 1:
            raise KeyboardInterrupt

    assert not train(data, options, tmp_path / "part", on_step=stop_in_epoch_2).complete
    resumed = train(data, options, tmp_path / "part", resume=True)
    assert all(torch.equal(p, q) for p, q in zip(full.head.state_dict().values(), resumed.head.state_dict().values()))
    plain = train(load_train_data(path), TrainOptions(epochs=3, batch_size=16, lr=1e-3), tmp_path / "plain")
    assert not torch.equal(plain.head.net[1].weight, full.head.net[1].weight)  # the views were used


def test_train_head_views_needs_a_cache_with_views(tmp_path, cli):
    x, y = blobs(4, 10, dim=8)
    path = make_cache(tmp_path, x, y)
    res = cli("train-head", "-c", path, "--views", "--out", tmp_path / "r", code=2)
    assert "--views needs a cache with augmented views" in res.output and "--augment" in res.output
    assert not (tmp_path / "r").exists()


def test_sweep_views_trains_every_head_on_the_views(tmp_path, cli, marked_cache):
    path, _ = marked_cache
    out = tmp_path / "sweep"
    cli("sweep", "-c", path, "--views", "--epochs", "1", "--lr", "0.001", "--lr", "0.002", "--out", out, "--quiet")
    configs = [json.loads(p.read_text()) for p in sorted(out.glob("*/config.json"))]
    assert len(configs) == 2 and all(c["options"]["views"] and c["data"]["augmentation"]["views"] == 3 for c in configs)
    # the same heads as train-head --views with those options
    ref = train(load_train_data(path, views=True), TrainOptions(epochs=1, lr=0.001, views=True), tmp_path / "ref")
    from featcache.train.runs import Run

    x = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
    np.testing.assert_allclose(Run.load(sorted(out.glob("000-*"))[0]).embed(x), ref.head(torch.from_numpy(x)).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_a_non_finite_view_fails_its_row_and_the_reason_names_the_view(tmp_path, cli):
    from featcache.extract.pipeline import ChunkWriter

    m = image_manifest(tmp_path, 4)
    out = tmp_path / "c.zarr"
    cli("extract", "-m", "tiny-vit", "--manifest", m, "--out", out, "--augment", "openclip", "--views", "2", "--quiet")
    from featcache.cache import StoreWriter

    cache = FeatureCache.open(out)
    writer = ChunkWriter(StoreWriter(out), cache.dim, "float16")
    feats = np.ones((4, 3, cache.dim), dtype=np.float32)
    feats[1, 2, 5] = 1e6  # overflows float16 in augmented view 2 of row 1 only
    writer.add(np.arange(4), feats, np.arange(4), [""] * 4)
    writer.close()
    cache = FeatureCache.open(out)
    assert cache.valid().tolist() == [True, False, True, True]
    assert cache.strings("failures")[1].startswith("non-finite embedding of augmented view 2 (overflows float16")
    np.testing.assert_array_equal(cache.augmented()[[0, 2, 3]], 1)
