"""The manifest commands under hostile input: each case does through the CLI what a user (or a damaged file)
did, and checks the one-line error names the file at fault and that nothing already there was changed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import write_csv, write_images
from tests.test_builders import manifest_rows, write_deepfashion, write_products10k, write_stanford_cars, write_uned
from tests.test_builders_study import deepfashion2_item, write_food_rec22, write_furniture180, write_met


def one_line(result) -> str:
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def recipe_error(result) -> str:
    """A recipe's error: one line, after the progress lines of the sources it built first."""
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("error: ") and all(": building from " in x or ": curating " in x for x in lines[:-1]), result.output
    return lines[-1]


def foreign_manifest_header() -> bytes:
    return b"path,label\nx.jpg,1\n"  # a valid manifest, but not one featcache wrote


# ---------------------------------------------------------------------------------------------------
# 1. --out never replaces a file featcache did not write, nor one the command reads; a manifest it wrote
#    only with --overwrite


def test_build_refuses_to_overwrite_the_datasets_own_annotation_file(tmp_path, cli):
    data = tmp_path / "furniture180"
    write_furniture180(data)
    annotations = data / "furniture180_train.csv"
    before = annotations.read_bytes()
    for extra in ([], ["--overwrite"]):
        r = cli("manifest", "build", "furniture180", "--root", data, "--out", annotations, *extra, code=2)
        assert one_line(r) == (f"error: {annotations} is a file that featcache did not make (a manifest goes there); "
                               "nothing was changed: choose another --out")
        assert annotations.read_bytes() == before
    assert sorted(p.name for p in data.iterdir()) == ["furniture180_train.csv"]  # no temporary file left

    # what the builder read is known by identity, so even a manifest it read is never written over
    from featcache.files import OutputError
    from featcache.manifest.builders import build
    from featcache.manifest.builders.common import recording_reads
    from featcache.manifest.schema import check_manifest_out

    with recording_reads() as reads:
        build("furniture180", data)
    assert list(reads.values()) == [annotations]
    with pytest.raises(OutputError, match="is a file this command reads"):
        check_manifest_out(annotations, overwrite=True, reads=reads)

    out = tmp_path / "f.csv"
    cli("manifest", "build", "furniture180", "--root", data, "--out", out)
    first = out.read_bytes()
    assert manifest_rows(out)[1] == ["air_condition/156501-14912605.jpg", "furniture/0", "furniture", "train"]
    r = cli("manifest", "build", "furniture180", "--root", data, "--domain", "home", "--out", out, code=2)
    assert one_line(r) == f"error: {out} already holds a manifest; pass --overwrite to replace it, or choose another --out"
    assert out.read_bytes() == first
    cli("manifest", "build", "furniture180", "--root", data, "--domain", "home", "--out", out, "--overwrite")
    assert manifest_rows(out)[1] == ["air_condition/156501-14912605.jpg", "home/0", "home", "train"]


def test_curate_never_writes_over_its_own_input_or_a_foreign_file(tmp_path, cli):
    write_products10k(tmp_path / "p")
    m = tmp_path / "p.csv"
    cli("manifest", "build", "products10k", "--root", tmp_path / "p", "--out", m)
    before = m.read_bytes()
    r = cli("manifest", "curate", m, "--out", m, "--overwrite", code=2)
    assert one_line(r) == f"error: {m} is a file this command reads; nothing was changed: choose another --out"
    link = tmp_path / "also-p.csv"
    os.link(m, link)  # the same file under another name
    r = cli("manifest", "curate", m, "--out", link, "--overwrite", code=2)
    assert one_line(r) == (f"error: {link} is a file this command reads (it is {m}); nothing was changed: "
                           "choose another --out")
    assert m.read_bytes() == before

    notes = tmp_path / "notes.csv"
    notes.write_bytes(foreign_manifest_header())
    r = cli("manifest", "curate", m, "--out", notes, "--overwrite", code=2)
    assert f"{notes} is a file that featcache did not make" in one_line(r)
    assert notes.read_bytes() == foreign_manifest_header()
    target = tmp_path / "target.csv"
    cli("manifest", "curate", m, "--out", target)
    (tmp_path / "to-target.csv").symlink_to(target)
    r = cli("manifest", "curate", m, "--out", tmp_path / "to-target.csv", "--overwrite", code=2)
    assert f"to-target.csv is a link that featcache did not make" in one_line(r)
    assert (tmp_path / "to-target.csv").is_symlink()

    out = tmp_path / "c.csv"
    cli("manifest", "curate", m, "--min-per-class", "3", "--out", out)
    assert [row[1] for row in manifest_rows(out)[1:]] == ["products/1"] * 3
    r = cli("manifest", "curate", m, "--min-per-class", "2", "--out", out, code=2)
    assert "already holds a manifest; pass --overwrite" in one_line(r)
    cli("manifest", "curate", m, "--min-per-class", "2", "--out", out, "--overwrite")
    assert [row[1] for row in manifest_rows(out)[1:]] == ["products/1"] * 3 + ["products/7"] * 2


def test_recipe_refuses_foreign_files_and_replaces_its_manifest_only_when_told(tmp_path, cli):
    data = tmp_path / "DATA"
    write_products10k(data / "p10k")
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[source]]\nbuilder = "products10k"\nfolder = "p10k"\nmin_per_class = 3\n')
    before = recipe.read_bytes()
    r = cli("manifest", "recipe", recipe, "--root", data, "--out", recipe, "--overwrite", code=2)
    assert one_line(r).startswith(f"error: {recipe} is a file this command reads")
    assert recipe.read_bytes() == before
    train = data / "p10k" / "train.csv"
    r = cli("manifest", "recipe", recipe, "--root", data, "--out", train, "--overwrite", code=2)
    assert f"{train} is a file that featcache did not make" in one_line(r)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "keep.txt").write_text("mine")
    r = cli("manifest", "recipe", recipe, "--root", data, "--out", tmp_path / "folder", "--overwrite", code=2)
    assert f"{tmp_path / 'folder'} is a folder that featcache did not make" in one_line(r)
    assert (tmp_path / "folder" / "keep.txt").read_text() == "mine"

    out = tmp_path / "m.csv"
    cli("manifest", "recipe", recipe, "--root", data, "--out", out)
    first = out.read_bytes()
    r = cli("manifest", "recipe", recipe, "--root", data, "--out", out, code=2)
    assert "already holds a manifest; pass --overwrite" in recipe_error(r) and out.read_bytes() == first
    cli("manifest", "recipe", recipe, "--root", data, "--out", out, "--overwrite")
    assert manifest_rows(out)[1] == ["p10k/train/0.jpg", "products/1", "products", "train"]


# ---------------------------------------------------------------------------------------------------
# 2. A file that is not UTF-8 is named, with the byte and its offset


def _bad_utf8(path: Path, text: str, at: int) -> Path:
    """``text`` with a byte that is not UTF-8 (0xff) put in at offset ``at``."""
    data = text.encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[:at] + b"\xff" + data[at:])
    return path


NOT_UTF8 = [  # source, file (relative to the root), its text, where the bad byte goes, extra options
    ("products10k", "train.csv", "name,class,group\n0.jpg,1,0\n", 20, []),
    ("gldv2", "train.csv", "id,url,landmark_id\n6e158a47eb2ca3f6,u,1\n", 3, []),
    ("deepfashion-c2s", "Eval/list_eval_partition.txt", "1\nimage_pair_name_1 image_pair_name_2 item_id evaluation_status\n", 1, []),
    ("sop", "Ebay_train.txt", "image_id class_id super_class_id path\n1 1 1 a.JPG\n", 40, []),
    ("food101", "meta/test.json", '{"ramen": ["ramen/1"]}', 12, []),
    ("met", "ground_truth/MET_database.json", '[{"id": 1, "path": "MET/1/0.jpg"}]', 25, []),
    ("uned", "info_files/cars/test.json", '[{"path": "cars/1.jpg", "class_id": 1}]', 15, ["--domain", "cars"]),
    ("food-rec22", "annotations.json", '{"images": [], "annotations": [], "categories": []}', 5, []),
    ("deepfashion2", "train/annos/000001.json", '{"source": "user", "pair_id": 1}', 13, []),
    ("fashion200k", "labels/dress_train_detect_all.txt", "women/d/1/1_0.jpeg\t1\tx\n", 8, []),
    ("furniture180", "furniture180_train.csv", "img_path,label\na.jpg,0\n", 0, []),
]


@pytest.mark.parametrize("source, name, text, at, extra", NOT_UTF8, ids=[c[0] for c in NOT_UTF8])
def test_annotation_file_that_is_not_utf8_is_named(tmp_path, cli, source, name, text, at, extra):
    bad = _bad_utf8(tmp_path / "data" / name, text, at)
    out = tmp_path / "m.csv"
    r = cli("manifest", "build", source, "--root", tmp_path / "data", *extra, "--out", out, code=2)
    assert one_line(r) == f"error: {bad}: not UTF-8 text (byte 0xff at offset {at})"
    assert not out.exists()


def test_colour_file_recipe_and_manifest_that_are_not_utf8_are_named(tmp_path, cli):
    cars = write_stanford_cars(tmp_path / "cars")
    colours = _bad_utf8(cars / "colors.csv", "image,colour\n00001.jpg,red\n", 24)
    r = cli("manifest", "build", "stanford-cars", "--root", cars, "--colors", colours, "--out", tmp_path / "c.csv", code=2)
    assert one_line(r) == f"error: {colours}: not UTF-8 text (byte 0xff at offset 24)"

    recipe = _bad_utf8(tmp_path / "r.toml", 'name = "caf"\n', 10)
    r = cli("manifest", "recipe", recipe, "--root", tmp_path, "--out", tmp_path / "r.csv", code=2)
    assert one_line(r) == f"error: {recipe}: not UTF-8 text (byte 0xff at offset 10)"

    manifest = _bad_utf8(tmp_path / "m.csv", "path,label\na.jpg,1\nb.jpg,1\n", 21)
    r = cli("manifest", "curate", manifest, "--out", tmp_path / "out.csv", code=2)
    assert one_line(r) == f"error: {manifest}:3: not UTF-8 text (byte 0xff at offset 21); save the manifest as UTF-8"
    r = cli("manifest", "check", manifest, code=2)
    assert one_line(r).startswith(f"error: {manifest}:3: not UTF-8 text")
    assert not (tmp_path / "out.csv").exists() and not (tmp_path / "r.csv").exists()


# ---------------------------------------------------------------------------------------------------
# 3. JSON nested too deeply, or of another shape than the source's, is one line naming the file


DEEP = "[" * 100_000 + "]" * 100_000

HOSTILE_JSON = [  # source, file, its text, extra options, what the error says after the file's name
    ("food101", "meta/test.json", DEEP, [], ": not readable JSON (nested too deeply)"),
    ("met", "ground_truth/MET_database.json", DEEP, [], ": not readable JSON (nested too deeply)"),
    ("uned", "info_files/cars/test.json", DEEP, ["--domain", "cars"], ": not readable JSON (nested too deeply)"),
    ("deepfashion-c2s", "deepfashion_train.json", DEEP, [], ": not readable JSON (nested too deeply)"),
    ("food-rec22", "annotations.json", DEEP, [], ": not readable JSON (nested too deeply)"),
    ("deepfashion2", "train/annos/000001.json", '{"a": ' + DEEP + "}", [], ": not readable JSON (nested too deeply)"),
    ("food101", "meta/test.json", '["ramen/1"]', [], ': expected an object {class: ["class/id", ...]}, found a list'),
    ("food101", "meta/test.json", '{"ramen": "ramen/1"}', [], ": class 'ramen': expected a list of \"class/id\" strings, found a string ('ramen/1')"),
    ("food101", "meta/test.json", '{"ramen": [1, 2]}', [], ": class 'ramen', entry 1: expected \"ramen/ID\", found a number"),
    ("met", "ground_truth/MET_database.json", '"MET/1/0.jpg"', [], ": expected a list of {\"id\": ..., \"path\": ...} entries, found a string ('MET/1/0.jpg')"),
    ("met", "ground_truth/MET_database.json", '[{"id": 1, "path": 5}]', [], ": entry 1: path 5 is not a file path"),
    ("uned", "info_files/cars/test.json", '"cars/1.jpg"', ["--domain", "cars"], ": expected a JSON list of {\"path\", \"class_id\"} objects, found a string ('cars/1.jpg')"),
    ("uned", "info_files/cars/test.json", '[{"path": 7, "class_id": 1}]', ["--domain", "cars"], ": entry 1: 'path' must be a non-empty string"),
    ("uned", "info_files/cars/test.json", '[{"path": "a.jpg", "class_id": "--5"}]', ["--domain", "cars"], ": entry 1: 'class_id' must be an integer or a list of integers, found '--5'"),
    ("uned", "info_files/cars/test.json", '[{"path": "a\\ud800.jpg", "class_id": 1}]', ["--domain", "cars"], ": a string holds an escaped lone surrogate (\\ud800-\\udfff), which is not text; refused"),
    ("uned", "info_files/cars/test.json", '[{"path": "a\\u0000.jpg", "class_id": 1}]', ["--domain", "cars"], ": entry 1: path 'a\\x00.jpg' holds a NUL character; refused"),
    ("deepfashion-c2s", "deepfashion_train.json", '[["a.jpg"]]', [], ": expected an object {GROUP: {ITEM_ID: [paths]}}, found a list"),
    ("deepfashion-c2s", "deepfashion_train.json", '{"g": ["a.jpg"]}', [], ": group 'g': expected an object {ITEM_ID: [paths]}, found a list"),
    ("deepfashion-c2s", "deepfashion_train.json", '{"g": {"id_1": [3]}}', [], ": group 'g', item 'id_1': expected a list of image paths"),
    ("food-rec22", "annotations.json", '[]', [], ": expected a COCO object with lists images, annotations and categories"),
    ("food-rec22", "annotations.json",
     '{"images": [{"id": 1, "file_name": "1.jpg"}], "categories": [{"id": 2}], '
     '"annotations": [{"image_id": 1, "category_id": 2, "bbox": [0, 0, 1' + "0" * 400 + ', 5]}]}', [],
     ": annotations[0]: bbox [0, 0, 1" + "0" * 59 + ", 5]: "
     "box values must be finite numbers >= 0 (one is too large for a float)"),
    ("food-rec22", "annotations.json",
     '{"images": [{"id": 1, "file_name": "1.jpg"}], "categories": [{"id": 2}], '
     '"annotations": [{"image_id": 1, "category_id": 2, "bbox": ["0", 0, 4, 4]}]}', [],
     ": annotations[0]: bbox ['0', 0, 4, 4] is not [x, y, width, height] numbers"),
    ("deepfashion2", "train/annos/000001.json", '["user", 1]', [], ": expected an object with source, pair_id and item1, item2, ..."),
    ("deepfashion2", "train/annos/000001.json", '{"source": "user", "pair_id": {"a": 1}, "item1": {}}', [], ": pair_id must be an integer, found an object"),
    ("deepfashion2", "train/annos/000001.json", '{"source": "user", "pair_id": 1, "item\u00b2": {"style": 1}}', [],
     ": DeepFashion2 found no items with a style > 0"),
    ("food101", "meta/test.json", '{"ramen": [' + "9" * 5000 + "]}", [], ": not readable JSON (Exceeds the limit (4300 digits) for integer string conversion"),
]


@pytest.mark.parametrize("source, name, text, extra, message", HOSTILE_JSON, ids=[f"{c[0]}-{k}" for k, c in enumerate(HOSTILE_JSON)])
def test_hostile_json_is_one_line_naming_the_file(tmp_path, cli, source, name, text, extra, message):
    bad = tmp_path / "data" / name
    bad.parent.mkdir(parents=True)
    bad.write_text(text, encoding="utf-8")
    out = tmp_path / "m.csv"
    r = cli("manifest", "build", source, "--root", tmp_path / "data", *extra, "--out", out, code=2)
    line = one_line(r)
    if "found no items" in message:  # an item key int() would choke on ('item²') is not an item
        assert line == f"error: {tmp_path / 'data'}{message}"
    else:
        assert line.startswith(f"error: {bad}{message}"), line
    assert not out.exists()


def test_json_builders_still_read_good_files(tmp_path, cli):
    write_met(tmp_path / "met")
    cli("manifest", "build", "met", "--root", tmp_path / "met", "--out", tmp_path / "met.csv")
    assert manifest_rows(tmp_path / "met.csv")[1] == ["MET/34/0.jpg", "artwork/34", "artwork", "train"]
    write_food_rec22(tmp_path / "food")
    cli("manifest", "build", "food-rec22", "--root", tmp_path / "food", "--out", tmp_path / "food.csv")
    assert manifest_rows(tmp_path / "food.csv")[1] == ["images/131094.jpg", "food-rec22/101246", "food-rec22", "train",
                                                       "10", "20", "110", "70"]
    write_uned(tmp_path / "uned")
    # a query with two class ids written as strings, and an escaped pair (an emoji) that is text
    (tmp_path / "uned" / "info_files" / "cars" / "test.json").write_text(
        '[{"path": "cars/\\ud83d\\ude97.jpg", "class_id": ["007", 9]}]')
    cli("manifest", "build", "uned", "--root", tmp_path / "uned", "--domain", "cars", "--out", tmp_path / "u.csv")
    assert manifest_rows(tmp_path / "u.csv")[1] == ["images/cars/\U0001f697.jpg", "cars/7|cars/9", "cars", "query"]


# ---------------------------------------------------------------------------------------------------
# 4. Recipe values of the wrong type or range: one line naming the recipe, the key and what was expected


RECIPE_HEAD = '[[source]]\nbuilder = "products10k"\nfolder = "p10k"\n'

BAD_RECIPES = [  # the recipe's text, the error after the recipe's name
    (RECIPE_HEAD + 'min_per_class = "3"\n', ": source 'products10k': min_per_class must be an integer, got the string '3'"),
    (RECIPE_HEAD + "min_per_class = 3.0\n", ": source 'products10k': min_per_class must be an integer, got the number 3.0"),
    (RECIPE_HEAD + "max_classes = -1\n", ": source 'products10k': max_classes must be at least 1, got -1"),
    (RECIPE_HEAD + "min_per_class = 0\n", ": source 'products10k': min_per_class must be at least 1, got 0"),
    (RECIPE_HEAD + "min_per_class = 5\nmax_per_class = 2\n", ": source 'products10k': max_per_class 2 is below min_per_class 5"),
    (RECIPE_HEAD + "domain = 5\n", ": source 'products10k': domain must be a string, got the number 5"),
    (RECIPE_HEAD + "colour = 'red'\n", ": source 'products10k': unknown key 'colour' (builder products10k takes domain;"),
    (RECIPE_HEAD + "published = { classes = -3 }\n", ": source 'products10k': published.classes must be an integer >= 0, got the number -3"),
    ('[[source]]\nbuilder = "sop"\npartition = 5\n', ": source 'sop': partition must be a string or an array of strings, got the number 5"),
    ('[[source]]\nbuilder = "sop"\npartition = ["train", 1]\n', ": source 'sop': partition must be a string or an array of strings, got an array"),
    ('[[source]]\nbuilder = ["sop"]\n', ": source 1: builder must be one of products10k,"),
    ('[[source]]\nbuilder = "sop"\nname = 5\n', ": source 1: name must be a non-empty string, got the number 5"),
    ('[[source]]\nbuilder = "sop"\nfolder = { a = 1 }\n', ": source 'sop': folder must be a relative folder name under the data root, got a table"),
    ('source = ["products10k"]\n', ": source 1: expected a [[source]] table (builder = \"...\", rules, options), got the string 'products10k'"),
    ("source = 5\n", ": source must be [[source]] tables (one per source dataset), got the number 5"),
    ("sources = 5\n" + RECIPE_HEAD, ": unknown key 'sources' (expected name, seed, published, [[source]])"),
    ("seed = -1\n" + RECIPE_HEAD, ": seed must be a non-negative integer, got the number -1"),
    ("name = [1]\n" + RECIPE_HEAD, ": name must be a non-empty string, got an array"),
    ("x = " + "[" * 100_000 + "]" * 100_000 + "\n", ": not readable TOML (nested too deeply)"),
    ('name = "a\n', ": not valid TOML (Illegal character"),
]


@pytest.mark.parametrize("text, message", BAD_RECIPES, ids=[str(k) for k in range(len(BAD_RECIPES))])
def test_recipe_values_of_the_wrong_type_are_one_line(tmp_path, cli, text, message):
    write_products10k(tmp_path / "DATA" / "p10k")
    recipe = tmp_path / "r.toml"
    recipe.write_text(text)
    r = cli("manifest", "recipe", recipe, "--root", tmp_path / "DATA", "--out", tmp_path / "m.csv", code=2)
    assert one_line(r).startswith(f"error: {recipe}{message}"), one_line(r)
    assert not (tmp_path / "m.csv").exists()


def test_recipe_option_value_the_builder_refuses_names_the_recipe_and_key(tmp_path, cli):
    write_deepfashion(tmp_path / "DATA" / "deepfashion")
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[source]]\nbuilder = "deepfashion-c2s"\nfolder = "deepfashion"\npartition = "gallery"\n')
    r = cli("manifest", "recipe", recipe, "--root", tmp_path / "DATA", "--out", tmp_path / "m.csv", code=2)
    assert recipe_error(r) == (f"error: {recipe}: source 'deepfashion-c2s': partition: unknown value 'gallery' "
                           "(expected one of train, val, test)")


# ---------------------------------------------------------------------------------------------------
# 5. A source that curates to nothing is left out and named, as a missing one is


def test_recipe_leaves_out_a_source_with_no_class_big_enough(tmp_path, cli):
    data = tmp_path / "DATA"
    write_products10k(data / "products10k")  # largest class: 3 images
    write_deepfashion(data / "deepfashion")  # two items of 3 images each
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[source]]\nbuilder = "products10k"\nmin_per_class = 4\n\n'
                      '[[source]]\nname = "deepfashion"\nbuilder = "deepfashion-c2s"\nmin_per_class = 3\n\n'
                      '[[source]]\nbuilder = "sop"\n')
    out = tmp_path / "m.csv"
    r = cli("manifest", "recipe", recipe, "--root", data, "--out", out)
    rows = manifest_rows(out)
    assert {row[2] for row in rows[1:]} == {"apparel"} and len(rows) == 7
    assert "1 of 3 sources kept no images and were left out: products10k (no class passes at least 4 per class)" in r.output
    assert "1 of 3 sources are not under" in r.output and "sop (sop/)" in r.output
    assert "(empty)" in r.output and "(missing)" in r.output  # the table's rows of the two left out
    assert "note: products10k: no class has at least 4 images (largest has 3)" in r.output

    recipe.write_text('[[source]]\nbuilder = "products10k"\nmin_per_class = 4\n\n[[source]]\nbuilder = "sop"\n')
    r = cli("manifest", "recipe", recipe, "--root", data, "--out", tmp_path / "none.csv", code=2)
    assert recipe_error(r) == (f"error: {recipe}: no images left under {data}: no class of products10k passes its rule; "
                           "the other sources are not there")
    assert not (tmp_path / "none.csv").exists()


# ---------------------------------------------------------------------------------------------------
# 6. Other damaged or odd input found across the manifest commands


def test_other_odd_input_is_one_line(tmp_path, cli):
    write_csv(tmp_path / "a.csv", ["path", "label"], [["a.jpg", "1"], ["b.jpg", "1"]])
    r = cli("manifest", "curate", tmp_path / "a.csv", "--min-per-class", "1", "--seed", "-1", "--out", tmp_path / "o.csv", code=2)
    assert one_line(r) == "error: --seed must be a non-negative integer, got -1"
    r = cli("manifest", "check", tmp_path / "a.csv", "--workers", "-1", code=2)
    assert one_line(r) == "error: --workers must be at least 1 (or 0 for the default), got -1"  # no progress bar above it

    # an --out below a file: no folder can be made there
    (tmp_path / "plain").write_text("x")
    r = cli("manifest", "curate", tmp_path / "a.csv", "--min-per-class", "1", "--out", tmp_path / "plain" / "o.csv", code=2)
    assert one_line(r).startswith(f"error: {tmp_path / 'plain' / 'o.csv'}: cannot write there (Not a directory)")

    # a quote never closed in a builder's CSV, and a class number int() would take
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "train.csv").write_text('name,class,group\n"0.jpg,1,0\n' + "x" * 200_000 + "\n")
    r = cli("manifest", "build", "products10k", "--root", tmp_path / "p", "--out", tmp_path / "o.csv", code=2)
    assert one_line(r).startswith(f"error: {tmp_path / 'p' / 'train.csv'}:3: not a readable CSV record")
    cars = tmp_path / "cars"
    write_stanford_cars(cars)
    (cars / "devkit" / "cars_train_annos.mat").unlink()
    write_csv(cars / "sc_train.csv", ["", "x1", "y1", "x2", "y2", "Label", "image"], [[0, 1, 1, 9, 9, "\u00b2", "a.jpg"]])
    r = cli("manifest", "build", "stanford-cars", "--root", cars, "--out", tmp_path / "o.csv", code=2)
    assert one_line(r) == (f"error: {cars / 'sc_train.csv'}:2: column 'Label': class \u00b2 is outside 1..3 of "
                           f"{cars / 'devkit' / 'cars_meta.mat'}")
    assert not (tmp_path / "o.csv").exists()


def test_a_file_name_that_is_not_utf8_is_named(tmp_path, cli):
    root = tmp_path / "photos"
    write_images(root / "cat", 1)
    odd = os.fsencode(root / "cat") + b"/caf\xe9.png"
    with open(odd, "wb") as f:
        f.write((root / "cat" / "img0000.png").read_bytes())
    r = cli("manifest", "build", "imagefolder", "--root", root, "--out", tmp_path / "m.csv", code=2)
    assert one_line(r) == f"error: {root / 'cat'}/caf\\xe9.png: file name is not UTF-8 (a manifest is UTF-8 text); rename it"
    assert not (tmp_path / "m.csv").exists()
    os.remove(odd)
    cli("manifest", "build", "imagefolder", "--root", root, "--out", tmp_path / "m.csv")
    assert manifest_rows(tmp_path / "m.csv")[1:] == [["cat/img0000.png", "photos/cat", "photos", "train"]]


def test_deepfashion2_odd_items_and_a_fifo_for_an_annotation_file(tmp_path, cli):
    annos = tmp_path / "train" / "annos"
    annos.mkdir(parents=True)
    (annos / "000001.json").write_text(json.dumps({"source": "user", "pair_id": 1, "item1": deepfashion2_item(1, [1, 1, 9, 9])}))
    cli("manifest", "build", "deepfashion2", "--root", tmp_path, "--out", tmp_path / "m.csv")
    assert manifest_rows(tmp_path / "m.csv")[1] == ["train/image/000001.jpg", "deepfashion2/1_1", "deepfashion2", "train",
                                                    "1", "1", "9", "9"]
    os.mkfifo(annos / "000002.json")  # would block a reader for ever
    r = cli("manifest", "build", "deepfashion2", "--root", tmp_path, "--out", tmp_path / "n.csv", code=2)
    assert one_line(r) == f"error: {annos / '000002.json'}: not a regular file (DeepFashion2 annotation)"
