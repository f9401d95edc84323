"""Curation rules, the M4D-35k recipe on tiny source trees, and ``manifest check``."""

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from featcache.manifest import ManifestError, Rows
from featcache.manifest.curate import Rule, curate, domain_counts
from featcache.manifest.recipe import load_recipe
from tests.conftest import PYTHON, REPO, subprocess_env, write_csv, write_images
from tests.test_builders import (
    CAR_COLOURS,
    manifest_rows,
    write_deepfashion,
    write_gldv2,
    write_products10k,
    write_stanford_cars,
)

RECIPE = REPO / "manifests" / "m4d-35k.toml"


def make_rows(counts: dict[str, int], domain: str = "d") -> Rows:
    """Rows for classes of the given sizes, interleaved (a0 b0 c0 a1 b1 ...) so order matters."""
    items = []
    for k in range(max(counts.values())):
        for label, n in counts.items():
            if k < n:
                items.append((f"{label}/{k}.jpg", label))
    return Rows([p for p, _ in items], [lab for _, lab in items], [domain] * len(items), ["train"] * len(items))


# ---------------------------------------------------------------------------------------------------
# Rules


def test_min_per_class_drops_small_classes_and_keeps_order():
    rows = make_rows({"a": 3, "b": 1, "c": 2})
    kept = curate(rows, Rule(min_per_class=2))
    assert kept.paths == ["a/0.jpg", "c/0.jpg", "a/1.jpg", "c/1.jpg", "a/2.jpg"]
    assert kept.labels == ["a", "c", "a", "c", "a"]


def test_cap_and_max_classes():
    rows = make_rows({f"c{i:02d}": 3 + i for i in range(20)})  # sizes 3..22
    kept = curate(rows, Rule(min_per_class=5, max_per_class=6, max_classes=7), seed=42)
    sizes = {lab: kept.labels.count(lab) for lab in set(kept.labels)}
    assert len(sizes) == 7
    assert all(lab not in {"c00", "c01"} for lab in sizes)  # below the minimum: never drawn
    assert all(n == 5 if lab == "c02" else n == 6 for lab, n in sizes.items())
    positions = [rows.paths.index(p) for p in kept.paths]
    assert positions == sorted(positions)  # input order kept
    assert set(kept.paths) <= set(rows.paths)


def test_same_seed_same_result_other_seed_other_result():
    rows = make_rows({f"c{i:03d}": 2 + i % 9 for i in range(300)})
    rule = Rule(min_per_class=3, max_per_class=4, max_classes=50)
    a, b = curate(rows, rule, seed=7), curate(rows, rule, seed=7)
    assert a.paths == b.paths
    assert curate(rows, rule, seed=8).paths != a.paths


def test_result_does_not_depend_on_hash_order(tmp_path):
    """Python's string hashing changes every run unless PYTHONHASHSEED is fixed: the result must not."""
    code = (
        "from featcache.manifest import Rows\n"
        "from featcache.manifest.curate import Rule, curate\n"
        "labels = [f'c{i % 300:03d}' for i in range(1500)]\n"
        "rows = Rows([f'{i}.jpg' for i in range(1500)], labels, ['d'] * 1500, ['train'] * 1500)\n"
        "print(','.join(curate(rows, Rule(3, 4, 50), seed=7).paths))\n"
    )
    outputs = set()
    for hash_seed in ("1", "2"):
        env = {**subprocess_env(), "PYTHONHASHSEED": hash_seed}
        outputs.add(subprocess.run([PYTHON, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout)
    assert len(outputs) == 1
    labels = [f"c{i % 300:03d}" for i in range(1500)]
    rows = Rows([f"{i}.jpg" for i in range(1500)], labels, ["d"] * 1500, ["train"] * 1500)
    assert outputs.pop().strip() == ",".join(curate(rows, Rule(3, 4, 50), seed=7).paths)


def test_classes_are_domain_and_label():
    rows = Rows(["a.jpg", "b.jpg", "c.jpg", "d.jpg"], ["x", "x", "x", "y"], ["d1", "d1", "d2", "d2"], ["train"] * 4)
    assert curate(rows, Rule(min_per_class=2)).paths == ["a.jpg", "b.jpg"]  # d2/x has one image
    assert {d: (c.classes, c.images) for d, c in domain_counts(rows).items()} == {"d1": (1, 2), "d2": (2, 2)}


def test_everything_filtered_is_an_error():
    with pytest.raises(ManifestError, match=r"no class has at least 5 images \(largest has 3\): all 3 classes"):
        curate(make_rows({"a": 3, "b": 1, "c": 2}), Rule(min_per_class=5))


@pytest.mark.parametrize("kwargs, message", [
    ({"min_per_class": 0}, r"--min-per-class must be at least 1"),
    ({"min_per_class": 3, "max_per_class": 2}, r"--max-per-class 2 is below --min-per-class 3"),
    ({"max_classes": 0}, r"--max-classes must be at least 1"),
])
def test_bad_rules(kwargs, message):
    with pytest.raises(ManifestError, match=message):
        Rule(**kwargs)


def test_boxes_follow_their_rows():
    boxes = np.array([[0, 0, 5, 5], [np.nan] * 4, [1, 1, 9, 9]], dtype=float)
    rows = Rows(["a", "b", "c"], ["x", "y", "x"], ["d"] * 3, ["train"] * 3, boxes)
    kept = curate(rows, Rule(min_per_class=2))
    assert kept.paths == ["a", "c"] and kept.boxes.tolist() == [[0, 0, 5, 5], [1, 1, 9, 9]]


# ---------------------------------------------------------------------------------------------------
# The curate command


def test_curate_command(tmp_path, cli):
    write_csv(tmp_path / "a.csv", ["path", "label", "domain"],
              [["a/0.jpg", "p/1", "products"], ["a/1.jpg", "p/1", "products"], ["a/2.jpg", "p/2", "products"]])
    write_csv(tmp_path / "b.csv", ["path", "label", "domain", "split"],
              [["b/0.jpg", "l/9", "landmarks", "train"], ["b/1.jpg", "l/9", "landmarks", "train"], ["b/2.jpg", "l/9", "landmarks", "train"]])
    result = cli("manifest", "curate", tmp_path / "a.csv", tmp_path / "b.csv", "--min-per-class", "2",
                 "--max-per-class", "2", "--out", tmp_path / "m.csv")
    rows = manifest_rows(tmp_path / "m.csv")
    assert rows[:3] == [["path", "label", "domain", "split"], ["a/0.jpg", "p/1", "products", "train"], ["a/1.jpg", "p/1", "products", "train"]]
    assert len(rows) == 5 and all(r[1:] == ["l/9", "landmarks", "train"] for r in rows[3:])
    table = result.stdout
    assert "classes before" in table and "images after" in table
    assert any(line.split()[:1] == ["│"] or "products" in line for line in table.splitlines())
    products = next(line for line in table.splitlines() if "products" in line)
    assert [c.strip() for c in products.strip("│ ").split("│")] == ["products", "2", "3", "1", "2"]


def test_curate_command_errors(tmp_path, cli):
    write_csv(tmp_path / "a.csv", ["path", "label"], [["x.jpg", "1"]])
    write_csv(tmp_path / "b.csv", ["path", "label"], [["x.jpg", "2"]])
    result = cli("manifest", "curate", tmp_path / "a.csv", tmp_path / "b.csv", "--out", tmp_path / "m.csv", code=2)
    assert result.stderr.strip() == "error: path 'x.jpg' occurs in more than one input"
    result = cli("manifest", "curate", tmp_path / "a.csv", "--min-per-class", "3", "--out", tmp_path / "m.csv", code=2)
    assert result.stderr.startswith("error: no class has at least 3 images")
    assert not (tmp_path / "m.csv").exists()


# ---------------------------------------------------------------------------------------------------
# The M4D-35k recipe


def write_m4d_data(data: Path) -> Path:
    write_products10k(data / "products10k")
    write_gldv2(data / "gldv2")
    write_deepfashion(data / "deepfashion")
    write_stanford_cars(data / "stanford-cars", CAR_COLOURS)
    return data


def test_m4d_recipe_on_tiny_sources(tmp_path, cli):
    data = write_m4d_data(tmp_path / "DATA")
    result = cli("manifest", "recipe", RECIPE, "--root", data, "--out", tmp_path / "m4d.csv")
    e = ["", "", "", ""]
    assert manifest_rows(tmp_path / "m4d.csv") == [
        ["path", "label", "domain", "split", "x1", "y1", "x2", "y2"],
        # Products-10k: only class 1 has 3 images
        ["products10k/train/0.jpg", "products/1", "products", "train", *e],
        ["products10k/train/1.jpg", "products/1", "products", "train", *e],
        ["products10k/train/2.jpg", "products/1", "products", "train", *e],
        # GLDv2: both landmarks have 3 images (under the cap of 10)
        ["gldv2/train/6/e/1/6e158a47eb2ca3f6.jpg", "landmarks/142820", "landmarks", "train", *e],
        ["gldv2/train/2/0/2/202cd79556f30760.jpg", "landmarks/104169", "landmarks", "train", *e],
        ["gldv2/train/3/a/d/3ad87684c99c06e1.jpg", "landmarks/142820", "landmarks", "train", *e],
        ["gldv2/train/e/7/f/e7f70e9c61e66af3.jpg", "landmarks/142820", "landmarks", "train", *e],
        ["gldv2/train/4/0/7/4072182eddd0100e.jpg", "landmarks/104169", "landmarks", "train", *e],
        ["gldv2/train/0/a/1/0a1b2c3d4e5f6789.jpg", "landmarks/104169", "landmarks", "train", *e],
        # DeepFashion: train pairs only; both items have 3 distinct images
        ["deepfashion/img/CLOTHING/Blouse/id_00000001/comsumer_01.jpg", "apparel/id_00000001", "apparel", "train", *e],
        ["deepfashion/img/CLOTHING/Blouse/id_00000001/shop_01.jpg", "apparel/id_00000001", "apparel", "train", *e],
        ["deepfashion/img/CLOTHING/Blouse/id_00000001/comsumer_02.jpg", "apparel/id_00000001", "apparel", "train", *e],
        ["deepfashion/img/DRESSES/Dress/id_00000002/comsumer_01.jpg", "apparel/id_00000002", "apparel", "train", *e],
        ["deepfashion/img/DRESSES/Dress/id_00000002/shop_01.jpg", "apparel/id_00000002", "apparel", "train", *e],
        ["deepfashion/img/DRESSES/Dress/id_00000002/shop_02.jpg", "apparel/id_00000002", "apparel", "train", *e],
        # Stanford Cars: model x colour; only the red Hummer has 3 images
        ["stanford-cars/cars_train/00001.jpg", "cars/AM General Hummer SUV 2000/red", "cars", "train", "39", "116", "569", "375"],
        ["stanford-cars/cars_train/00002.jpg", "cars/AM General Hummer SUV 2000/red", "cars", "train", "36", "116", "868", "587"],
        ["stanford-cars/cars_train/00003.jpg", "cars/AM General Hummer SUV 2000/red", "cars", "train", "85", "109", "601", "381"],
    ]
    report = result.stdout
    assert "paper" in report and "34,800" in report and "328,400" in report and "79,166" in report
    total = next(line for line in report.splitlines() if "total" in line)
    assert [c.strip() for c in total.strip("│ ").split("│")] == ["total", "23", "6", "34,800", "18", "328,400"]


def test_recipe_builds_the_sources_at_hand_and_names_the_missing_ones(tmp_path, cli):
    import shutil

    data = write_m4d_data(tmp_path / "DATA")
    shutil.rmtree(data / "gldv2")
    shutil.rmtree(data / "stanford-cars")
    result = cli("manifest", "recipe", RECIPE, "--root", data, "--out", tmp_path / "m4d.csv")
    assert {r[2] for r in manifest_rows(tmp_path / "m4d.csv")[1:]} == {"products", "apparel"}
    assert "2 of 4 sources are not under" in result.output and "gldv2 (gldv2/)" in result.output
    assert "cars (stanford-cars/)" in result.output
    for folder in ("products10k", "deepfashion"):
        shutil.rmtree(data / folder)
    r = cli("manifest", "recipe", RECIPE, "--root", data, "--out", tmp_path / "none.csv", code=2)
    assert "none of the sources" in r.output and not (tmp_path / "none.csv").exists()


def test_recipe_file_is_checked(tmp_path, cli):
    recipe = load_recipe(RECIPE)
    assert [(s.name, s.builder, s.folder) for s in recipe.sources] == [
        ("products10k", "products10k", "products10k"), ("gldv2", "gldv2", "gldv2"),
        ("deepfashion", "deepfashion-c2s", "deepfashion"), ("stanford-cars", "stanford-cars", "stanford-cars")]
    assert recipe.sources[1].rule == Rule(min_per_class=3, max_per_class=10, max_classes=10000)
    assert sum(s.published.images for s in recipe.sources) == 328320  # the per-source numbers add up to 328.4k

    bad = tmp_path / "bad.toml"
    bad.write_text('[[source]]\nbuilder = "gldv2"\ncolors = "x.csv"\n')
    with pytest.raises(ManifestError, match=r"bad.toml: source 'gldv2': unknown key 'colors' \(builder gldv2 takes domain, annotations"):
        load_recipe(bad)
    bad.write_text('[[source]]\nbuilder = "flickr"\n')
    with pytest.raises(ManifestError, match=r"bad.toml: source 1: builder must be one of"):
        load_recipe(bad)
    result = cli("manifest", "recipe", RECIPE, "--root", tmp_path, "--out", tmp_path / "m.csv", code=2)
    assert result.stderr.strip() == (f"error: {tmp_path}: none of the sources of {RECIPE} is there "
                                     "(expected folders products10k, gldv2, deepfashion, stanford-cars)")


# ---------------------------------------------------------------------------------------------------
# manifest check


def test_check_finds_every_kind_of_problem(tmp_path, cli):
    names = write_images(tmp_path / "img", 4)
    (tmp_path / "img" / "copy.png").write_bytes((tmp_path / "img" / names[0]).read_bytes())
    (tmp_path / "img" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    write_csv(tmp_path / "m.csv", ["path", "label", "domain"], [
        ["img/img0000.png", "a", "d"],
        ["img/img0001.png", "a", "d"],
        ["img/./img0001.png", "a", "d"],  # the same file as the row above
        ["img/copy.png", "b", "d"],  # the same bytes as img0000.png, another label
        ["img/img0002.png", "b", "d"],
        ["img/img0003.png", "c", "d"],  # class c has one image
        ["img/gone.png", "b", "d"],
        ["img/broken.jpg", "b", "d"],
    ])
    result = cli("manifest", "check", tmp_path / "m.csv", "--json", code=1)
    report = json.loads(result.stdout)
    assert report["ok"] is False and report["rows"] == 8 and report["classes"] == 3
    assert report["missing"] == [{"path": "img/gone.png", "reason": "missing file"}]
    assert [x["path"] for x in report["undecodable"]] == ["img/broken.jpg"]
    assert report["undecodable"][0]["reason"].startswith(("decode error", "not an image"))
    assert report["duplicate_paths"] == [["img/img0001.png", "img/./img0001.png"]]
    assert [[r["path"], r["label"]] for r in report["identical_images"][0]["rows"]] == [["img/img0000.png", "a"], ["img/copy.png", "b"]]
    assert report["identical_same_class"] == 1  # img0001.png named twice
    assert report["small_classes"] == [{"domain": "d", "label": "c", "images": 1}]

    report = json.loads(cli("manifest", "check", tmp_path / "m.csv", "--json", "--no-decode", code=1).stdout)
    assert [x["path"] for x in report["missing"]] == ["img/gone.png"] and report["undecodable"] == []
    result = cli("manifest", "check", tmp_path / "m.csv", "--root", tmp_path, code=1)
    assert "missing files" in result.stdout and "FAIL" in result.stdout and "img/gone.png" in result.stdout


def test_check_clean_manifest_passes(tmp_path, cli):
    names = write_images(tmp_path / "img", 3, ext="jpg")
    write_csv(tmp_path / "m.csv", ["path", "label", "x1", "y1", "x2", "y2"],
              [[f"img/{n}", "a", 0, 0, 10, 10] for n in names])
    result = cli("manifest", "check", tmp_path / "m.csv", "--workers", "2")
    assert "ok" in result.stdout and "FAIL" not in result.stdout
    # a crop box outside the image is what extract would record as a failure
    write_csv(tmp_path / "m.csv", ["path", "label", "x1", "y1", "x2", "y2"], [[f"img/{names[0]}", "a", 100, 100, 200, 200]])
    report = json.loads(cli("manifest", "check", tmp_path / "m.csv", "--json", "--min-per-class", "1", code=1).stdout)
    assert "crop box" in report["undecodable"][0]["reason"] and report["small_classes"] == []


def test_check_bad_manifest_exits_2(tmp_path, cli):
    (tmp_path / "m.csv").write_text("path\nx.jpg\n")
    result = cli("manifest", "check", tmp_path / "m.csv", code=2)
    assert result.stderr.strip() == f"error: {tmp_path / 'm.csv'}:1: missing column 'label' (header is path)"


def test_benchmark_script_runs_small(tmp_path):
    """The benchmark at a tiny size, so it stays working."""
    env = {**subprocess_env(), "FEATCACHE_BENCH_ROWS": "20000", "FEATCACHE_BENCH_CLASSES": "1000"}
    out = subprocess.run([PYTHON, "benchmarks/manifests.py"], cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout
    assert "total" in out and "curate" in out
