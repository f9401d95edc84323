"""Builders read tiny trees written in each source's real layout; manifests are checked row by row
against rows written out literally here."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from featcache.manifest import ManifestError, read_manifest
from featcache.manifest.builders import build
from featcache.manifest.builders.deepfashion import deepfashion_c2s
from featcache.manifest.builders.gldv2 import gldv2
from featcache.manifest.builders.imagefolder import imagefolder
from featcache.manifest.builders.products10k import products10k
from featcache.manifest.builders.stanford_cars import stanford_cars
from featcache.manifest.builders.uned import uned
from tests.conftest import write_csv, write_images

# ---------------------------------------------------------------------------------------------------
# Source trees in their real layouts (also used by test_curate's recipe test)


def write_products10k(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    write_csv(root / "train.csv", ["name", "class", "group"],
              [["0.jpg", 1, 0], ["1.jpg", 1, 0], ["2.jpg", 1, 0], ["3.jpg", 7, 2], ["4.jpg", 7, 2], ["5.jpg", 12, 3]])
    return root


def write_gldv2(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rows = [
        ["6e158a47eb2ca3f6", "http://x/1.jpg", 142820],
        ["202cd79556f30760", "http://x/2.jpg", 104169],
        ["3ad87684c99c06e1", "http://x/a,b.jpg", 142820],
        ["e7f70e9c61e66af3", "http://x/4.jpg", 142820],
        ["4072182eddd0100e", "http://x/5.jpg", 104169],
        ["0a1b2c3d4e5f6789", "http://x/6.jpg", 104169],
    ]
    write_csv(root / "train.csv", ["id", "url", "landmark_id"], rows)
    return root


DEEPFASHION_PARTITION = """\
5
image_pair_name_1 image_pair_name_2 item_id evaluation_status
img/CLOTHING/Blouse/id_00000001/comsumer_01.jpg img/CLOTHING/Blouse/id_00000001/shop_01.jpg id_00000001 train
img/CLOTHING/Blouse/id_00000001/comsumer_02.jpg img/CLOTHING/Blouse/id_00000001/shop_01.jpg id_00000001 train
img/DRESSES/Dress/id_00000002/comsumer_01.jpg   img/DRESSES/Dress/id_00000002/shop_01.jpg  id_00000002 train
img/DRESSES/Dress/id_00000002/comsumer_01.jpg   img/DRESSES/Dress/id_00000002/shop_02.jpg  id_00000002 train
img/TOPS/Tee/id_00000009/comsumer_01.jpg img/TOPS/Tee/id_00000009/shop_01.jpg id_00000009 test
"""


def write_deepfashion(root: Path, text: str = DEEPFASHION_PARTITION) -> Path:
    (root / "Eval").mkdir(parents=True, exist_ok=True)
    (root / "Eval" / "list_eval_partition.txt").write_text(text)
    return root


CAR_CLASSES = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Ram C/V Cargo Van Minivan 2012"]
CAR_TRAIN = [  # x1, y1, x2, y2, class (1-based), fname: as in cars_train_annos.mat
    (39, 116, 569, 375, 1, "00001.jpg"),
    (36, 116, 868, 587, 1, "00002.jpg"),
    (85, 109, 601, 381, 1, "00003.jpg"),
    (621, 393, 1484, 1096, 2, "00004.jpg"),
    (14, 36, 133, 99, 3, "00005.jpg"),
]
CAR_TEST = [(30, 52, 246, 147, 2, "00001.jpg")]


def write_cars_annos(path: Path, annos, fields=("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")) -> None:
    """A 1 x N MATLAB struct array named 'annotations', each field a 1 x 1 matrix or a string."""
    dt = [(f, "O") for f in fields]
    arr = np.zeros((1, len(annos)), dtype=dt)
    for k, a in enumerate(annos):
        values = dict(zip(("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"), a))
        arr[0, k] = tuple(np.array(values[f]) if f == "fname" else np.array([[values[f]]], dtype=np.uint16) for f in fields)
    scipy.io.savemat(path, {"annotations": arr})


def write_stanford_cars(root: Path, colors: list[list[str]] | None = None) -> Path:
    devkit = root / "devkit"
    devkit.mkdir(parents=True, exist_ok=True)
    names = np.empty((1, len(CAR_CLASSES)), dtype=object)
    for k, n in enumerate(CAR_CLASSES):
        names[0, k] = np.array(n)
    scipy.io.savemat(devkit / "cars_meta.mat", {"class_names": names})
    write_cars_annos(devkit / "cars_train_annos.mat", CAR_TRAIN)
    write_cars_annos(root / "cars_test_annos_withlabels.mat", CAR_TEST)
    if colors is not None:
        write_csv(root / "colors.csv", ["image", "colour"], colors)
    return root


CAR_COLOURS = [["00001.jpg", "Red"], ["00002.jpg", "red"], ["cars_train/00003.jpg", "red"],
               ["00004.jpg", "white"], ["00005.jpg", "black"]]


def write_uned(root: Path) -> Path:
    info = root / "info_files"
    files = {
        "cars/test.json": [{"path": "cars/car_ims/000001.jpg", "class_id": 98}, {"path": "cars/car_ims/000002.jpg", "class_id": 98}],
        "cars/train.json": [{"path": "cars/car_ims/000010.jpg", "class_id": 0}],
        "inshop/test.json": [{"path": "deepfashion/inshop/img/a_front.jpg", "class_id": 5}],
        "inshop/index.json": [{"path": "deepfashion/inshop/img/a_back.jpg", "class_id": 5},
                              {"path": "deepfashion/inshop/img/b_front.jpg", "class_id": 6}],
        "inshop/train.json": [{"path": "deepfashion/inshop/img/c_front.jpg", "class_id": 1}],
        "gldv2/test.json": [{"path": "gldv2/images/test/0/1/2/012aa.jpg", "class_id": [7, 9]}],
        "gldv2/index.json": [{"path": "gldv2/images/index/3/4/5/345bb.jpg", "class_id": 7}],
    }
    for name, entries in files.items():
        (info / name).parent.mkdir(parents=True, exist_ok=True)
        (info / name).write_text(json.dumps(entries))
    return root


def manifest_rows(path: Path) -> list[list[str]]:
    with path.open(newline="") as f:
        return list(csv.reader(f))


# ---------------------------------------------------------------------------------------------------
# Products-10k


def test_products10k_rows(tmp_path, cli):
    write_products10k(tmp_path / "p10k")
    cli("manifest", "build", "products10k", "--root", tmp_path / "p10k", "--out", tmp_path / "p.csv")
    assert manifest_rows(tmp_path / "p.csv") == [
        ["path", "label", "domain", "split"],
        ["train/0.jpg", "products/1", "products", "train"],
        ["train/1.jpg", "products/1", "products", "train"],
        ["train/2.jpg", "products/1", "products", "train"],
        ["train/3.jpg", "products/7", "products", "train"],
        ["train/4.jpg", "products/7", "products", "train"],
        ["train/5.jpg", "products/12", "products", "train"],
    ]
    read_manifest(tmp_path / "p.csv")  # what builders write, the reader accepts


def test_products10k_custom_domain(tmp_path):
    rows = products10k(write_products10k(tmp_path), domain="retail")
    assert rows.labels[:1] == ["retail/1"] and set(rows.domains) == {"retail"}


@pytest.mark.parametrize("body, message", [
    ("name,class,group\n0.jpg,1,0\n1.jpg,1\n", r"train.csv:3: expected 3 columns"),
    ("name,class,group\n0.jpg,1,0\n\n1.jpg,,0\n", r"train.csv:4: column 'class': empty class"),
    ("name,class,group\n../../etc/passwd,1,0\n", r"train.csv:2: column 'name': image name '../../etc/passwd' leaves"),
    ("name,group\n0.jpg,0\n", r"train.csv:1: missing column 'class'"),
    ("name,class,group\n0.jpg,1,0\n1.jpg,1,0\n0.jpg,2,0\n", r"train.csv:4: column 'name': '0.jpg' is listed twice \(first on line 2\)"),
    ('name,class,group\n"0.jpg",1,0\n"1.jpg",1\n', r"train.csv:3: expected 3 columns"),
    ("", r"train.csv: empty file"),
])
def test_products10k_bad_rows_name_file_and_line(tmp_path, body, message):
    (tmp_path / "train.csv").write_text(body)
    with pytest.raises(ManifestError, match=message):
        products10k(tmp_path)


# ---------------------------------------------------------------------------------------------------
# GLDv2


def test_gldv2_train_csv(tmp_path):
    rows = gldv2(write_gldv2(tmp_path))
    assert list(zip(rows.paths, rows.labels, rows.domains, rows.splits)) == [
        ("train/6/e/1/6e158a47eb2ca3f6.jpg", "landmarks/142820", "landmarks", "train"),
        ("train/2/0/2/202cd79556f30760.jpg", "landmarks/104169", "landmarks", "train"),
        ("train/3/a/d/3ad87684c99c06e1.jpg", "landmarks/142820", "landmarks", "train"),
        ("train/e/7/f/e7f70e9c61e66af3.jpg", "landmarks/142820", "landmarks", "train"),
        ("train/4/0/7/4072182eddd0100e.jpg", "landmarks/104169", "landmarks", "train"),
        ("train/0/a/1/0a1b2c3d4e5f6789.jpg", "landmarks/104169", "landmarks", "train"),
    ]
    assert rows.boxes is None


def test_gldv2_kaggle_2021_columns_and_train_clean(tmp_path):
    write_csv(tmp_path / "train.csv", ["id", "landmark_id"], [["17660ef415d37059", 1], ["92b6290d571448f6", 1]])
    rows = gldv2(tmp_path)
    assert rows.paths == ["train/1/7/6/17660ef415d37059.jpg", "train/9/2/b/92b6290d571448f6.jpg"]
    assert rows.labels == ["landmarks/1", "landmarks/1"]

    clean = tmp_path / "clean"
    clean.mkdir()
    write_csv(clean / "train_clean.csv", ["landmark_id", "images"],
              [[1, "17660ef415d37059 92b6290d571448f6"], [7, "cd41bf948edc0340"]])
    rows = gldv2(clean)  # no train.csv: train_clean.csv is used
    assert list(zip(rows.paths, rows.labels)) == [
        ("train/1/7/6/17660ef415d37059.jpg", "landmarks/1"),
        ("train/9/2/b/92b6290d571448f6.jpg", "landmarks/1"),
        ("train/c/d/4/cd41bf948edc0340.jpg", "landmarks/7"),
    ]


@pytest.mark.parametrize("rows, message", [
    ([["6e158a47eb2ca3f6", "u", 1], ["../../x", "u", 2]], r"train.csv:3: column 'id': image id '../../x' is not a GLDv2 id"),
    ([["6e158a47eb2ca3f6", "u", 1], ["ab", "u", 2]], r"train.csv:3: column 'id': image id 'ab'"),
    ([["6e158a47eb2ca3f6", "u", "x7"]], r"train.csv:2: column 'landmark_id': landmark id 'x7' is not an integer"),
    ([["6e158a47eb2ca3f6", "u", 1], ["6e158a47eb2ca3f6", "u", 2]], r"train.csv:3: column 'id': '6e158a47eb2ca3f6' is listed twice"),
])
def test_gldv2_bad_rows(tmp_path, rows, message):
    write_csv(tmp_path / "train.csv", ["id", "url", "landmark_id"], rows)
    with pytest.raises(ManifestError, match=message):
        gldv2(tmp_path)


def test_gldv2_train_clean_bad_id_names_line(tmp_path):
    write_csv(tmp_path / "train_clean.csv", ["landmark_id", "images"], [[1, "17660ef415d37059"], [2, "92b6290d571448f6 zz/../x"]])
    with pytest.raises(ManifestError, match=r"train_clean.csv:3: column 'images': image id 'zz/../x' is not a GLDv2 id"):
        gldv2(tmp_path, annotations="train_clean.csv")


def test_gldv2_missing_annotations(tmp_path):
    with pytest.raises(ManifestError, match=r"train.csv: not found"):
        gldv2(tmp_path)


# ---------------------------------------------------------------------------------------------------
# DeepFashion consumer-to-shop


def test_deepfashion_one_row_per_distinct_image(tmp_path):
    rows = deepfashion_c2s(write_deepfashion(tmp_path))
    assert list(zip(rows.paths, rows.labels, rows.domains, rows.splits)) == [
        ("img/CLOTHING/Blouse/id_00000001/comsumer_01.jpg", "apparel/id_00000001", "apparel", "train"),
        ("img/CLOTHING/Blouse/id_00000001/shop_01.jpg", "apparel/id_00000001", "apparel", "train"),
        ("img/CLOTHING/Blouse/id_00000001/comsumer_02.jpg", "apparel/id_00000001", "apparel", "train"),
        ("img/DRESSES/Dress/id_00000002/comsumer_01.jpg", "apparel/id_00000002", "apparel", "train"),
        ("img/DRESSES/Dress/id_00000002/shop_01.jpg", "apparel/id_00000002", "apparel", "train"),
        ("img/DRESSES/Dress/id_00000002/shop_02.jpg", "apparel/id_00000002", "apparel", "train"),
    ]


def test_deepfashion_test_partition_is_query_and_index(tmp_path):
    rows = deepfashion_c2s(write_deepfashion(tmp_path), partition="test")
    assert list(zip(rows.paths, rows.labels, rows.splits)) == [
        ("img/TOPS/Tee/id_00000009/comsumer_01.jpg", "apparel/id_00000009", "query"),
        ("img/TOPS/Tee/id_00000009/shop_01.jpg", "apparel/id_00000009", "index"),
    ]
    assert len(deepfashion_c2s(tmp_path, partition=["train", "test"])) == 8


HEADER = "image_pair_name_1 image_pair_name_2 item_id evaluation_status\n"


@pytest.mark.parametrize("text, message", [
    ("2\n" + HEADER + "img/a/comsumer_01.jpg img/a/shop_01.jpg id_1 train\nimg/a/comsumer_02.jpg id_1 train\n",
     r"list_eval_partition.txt:4: expected 4 fields"),
    ("1\n" + HEADER + "img/a/comsumer_01.jpg img/a/shop_01.jpg id_1 gallery\n", r"list_eval_partition.txt:3: unknown evaluation_status 'gallery'"),
    ("1\n" + HEADER + "../img/comsumer_01.jpg img/a/shop_01.jpg id_1 train\n", r"list_eval_partition.txt:3: path '../img/comsumer_01.jpg' leaves"),
    ("3\n" + HEADER + "img/a/comsumer_01.jpg img/a/shop_01.jpg id_1 train\n", r"list_eval_partition.txt:1: the file says 3 pairs but lists 1"),
    ("2\n" + HEADER + "img/a/c_01.jpg img/a/shop_01.jpg id_1 train\nimg/a/c_02.jpg img/a/shop_01.jpg id_2 train\n",
     r"list_eval_partition.txt:4: image 'img/a/shop_01.jpg' has item id id_2 here but id_1 on line 3"),
    ("pairs\n" + HEADER, r"list_eval_partition.txt:1: expected the number of pairs"),
    ("1\nimage_1 image_2 item status\n", r"list_eval_partition.txt:2: expected header"),
])
def test_deepfashion_bad_input(tmp_path, text, message):
    with pytest.raises(ManifestError, match=message):
        deepfashion_c2s(write_deepfashion(tmp_path, text))


def test_deepfashion_unknown_partition(tmp_path):
    with pytest.raises(ManifestError, match=r"--partition: unknown value 'gallery'"):
        deepfashion_c2s(write_deepfashion(tmp_path), partition="train,gallery")


# ---------------------------------------------------------------------------------------------------
# Stanford Cars


def test_stanford_cars_devkit_rows_and_boxes(tmp_path, cli):
    write_stanford_cars(tmp_path / "cars")
    cli("manifest", "build", "stanford-cars", "--root", tmp_path / "cars", "--partition", "train,test", "--out", tmp_path / "c.csv")
    assert manifest_rows(tmp_path / "c.csv") == [
        ["path", "label", "domain", "split", "x1", "y1", "x2", "y2"],
        ["cars_train/00001.jpg", "cars/AM General Hummer SUV 2000", "cars", "train", "39", "116", "569", "375"],
        ["cars_train/00002.jpg", "cars/AM General Hummer SUV 2000", "cars", "train", "36", "116", "868", "587"],
        ["cars_train/00003.jpg", "cars/AM General Hummer SUV 2000", "cars", "train", "85", "109", "601", "381"],
        ["cars_train/00004.jpg", "cars/Acura RL Sedan 2012", "cars", "train", "621", "393", "1484", "1096"],
        ["cars_train/00005.jpg", "cars/Ram C/V Cargo Van Minivan 2012", "cars", "train", "14", "36", "133", "99"],
        ["cars_test/00001.jpg", "cars/Acura RL Sedan 2012", "cars", "train", "30", "52", "246", "147"],
    ]
    m = read_manifest(tmp_path / "c.csv")
    assert m.box(5) == (30.0, 52.0, 246.0, 147.0)


def test_stanford_cars_single_annotation_file(tmp_path):
    root = write_stanford_cars(tmp_path)
    rows = stanford_cars(root, partition="test")  # a 1 x 1 struct array loads as a scalar struct
    assert rows.paths == ["cars_test/00001.jpg"] and rows.labels == ["cars/Acura RL Sedan 2012"]


def test_stanford_cars_colours_refine_classes(tmp_path):
    colours = CAR_COLOURS[:4]  # 00005.jpg has no colour: left out, and said so
    rows = stanford_cars(write_stanford_cars(tmp_path, colours), colors=tmp_path / "colors.csv")
    assert list(zip(rows.paths, rows.labels)) == [
        ("cars_train/00001.jpg", "cars/AM General Hummer SUV 2000/red"),
        ("cars_train/00002.jpg", "cars/AM General Hummer SUV 2000/red"),
        ("cars_train/00003.jpg", "cars/AM General Hummer SUV 2000/red"),
        ("cars_train/00004.jpg", "cars/Acura RL Sedan 2012/white"),
    ]
    assert rows.boxes[3].tolist() == [621, 393, 1484, 1096]
    assert rows.notes == [f"1 of 5 images have no colour in {tmp_path / 'colors.csv'} and were left out"]


def test_stanford_cars_colour_file_without_header(tmp_path):
    root = write_stanford_cars(tmp_path)
    (root / "colors.csv").write_text("00001.jpg,blue\n00004.jpg,grey\n")
    rows = stanford_cars(root, colors=root / "colors.csv")
    assert rows.labels == ["cars/AM General Hummer SUV 2000/blue", "cars/Acura RL Sedan 2012/grey"]
    (root / "colors.csv").write_text("image,colour\n00001.jpg,blue,extra\n")
    with pytest.raises(ManifestError, match=r"colors.csv:2: expected 2 columns"):
        stanford_cars(root, colors=root / "colors.csv")


def test_stanford_cars_ambiguous_colour_name(tmp_path):
    root = write_stanford_cars(tmp_path, [["00001.jpg", "red"]])
    with pytest.raises(ManifestError, match=r"colors.csv:2: '00001.jpg' is ambiguous"):
        stanford_cars(root, partition="train,test", colors=root / "colors.csv")


def test_stanford_cars_missing_field_is_named(tmp_path):
    root = write_stanford_cars(tmp_path)
    write_cars_annos(root / "devkit" / "cars_train_annos.mat", CAR_TRAIN,
                     fields=("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "fname"))
    with pytest.raises(ManifestError, match=r"cars_train_annos.mat: 'annotations' has no field 'class' \(fields: bbox_x1"):
        stanford_cars(root)


def test_stanford_cars_bad_files(tmp_path):
    root = write_stanford_cars(tmp_path)
    (root / "devkit" / "cars_meta.mat").write_bytes(b"not a mat file")
    with pytest.raises(ManifestError, match=r"cars_meta.mat: not a readable MATLAB .mat file"):
        stanford_cars(root)
    (root / "devkit" / "cars_meta.mat").unlink()
    with pytest.raises(ManifestError, match=r"cars_meta.mat: not found \(also looked in"):
        stanford_cars(root)
    write_stanford_cars(root)
    write_cars_annos(root / "devkit" / "cars_train_annos.mat", [(1, 1, 5, 5, 4, "00001.jpg")])
    with pytest.raises(ManifestError, match=r"annotation 1 \(00001.jpg\): class 4 is outside 1..3"):
        stanford_cars(root)


# ---------------------------------------------------------------------------------------------------
# UnED


def test_uned_test_partition_queries_and_index(tmp_path, cli):
    write_uned(tmp_path / "uned")
    cli("manifest", "build", "uned", "--root", tmp_path / "uned", "--domain", "cars,inshop,gldv2", "--out", tmp_path / "u.csv")
    assert manifest_rows(tmp_path / "u.csv") == [
        ["path", "label", "domain", "split"],
        ["images/cars/car_ims/000001.jpg", "cars/98", "cars", "query"],
        ["images/cars/car_ims/000002.jpg", "cars/98", "cars", "query"],
        ["images/deepfashion/inshop/img/a_front.jpg", "inshop/5", "inshop", "query"],
        ["images/deepfashion/inshop/img/a_back.jpg", "inshop/5", "inshop", "index"],
        ["images/deepfashion/inshop/img/b_front.jpg", "inshop/6", "inshop", "index"],
        ["images/gldv2/images/test/0/1/2/012aa.jpg", "gldv2/7|gldv2/9", "gldv2", "query"],
        ["images/gldv2/images/index/3/4/5/345bb.jpg", "gldv2/7", "gldv2", "index"],
    ]


def test_uned_train_partition(tmp_path):
    rows = uned(write_uned(tmp_path), partition="train", domain=["cars", "inshop"])
    assert list(zip(rows.paths, rows.labels, rows.domains, rows.splits)) == [
        ("images/cars/car_ims/000010.jpg", "cars/0", "cars", "train"),
        ("images/deepfashion/inshop/img/c_front.jpg", "inshop/1", "inshop", "train"),
    ]


def test_uned_info_dir_elsewhere(tmp_path):
    write_uned(tmp_path / "splits")
    rows = uned(tmp_path / "data", domain="cars", info_dir=tmp_path / "splits" / "info_files")
    assert rows.paths == ["images/cars/car_ims/000001.jpg", "images/cars/car_ims/000002.jpg"]


def test_uned_missing_split_file_says_where_to_get_it(tmp_path):
    write_uned(tmp_path)
    with pytest.raises(ManifestError, match=r"sop/test.json: not found .*info_files.zip"):
        uned(tmp_path)  # all 8 domains by default; only 3 written


@pytest.mark.parametrize("entries, message", [
    ([{"path": "cars/1.jpg", "class_id": 1}, {"path": "cars/2.jpg"}], r"test.json: entry 2: expected an object with keys 'path' and 'class_id'"),
    ([{"path": "../../etc/passwd", "class_id": 1}], r"test.json: entry 1: path '../../etc/passwd' leaves"),
    ([{"path": "/abs/1.jpg", "class_id": 1}], r"test.json: entry 1: path '/abs/1.jpg' leaves"),
    ([{"path": "cars/1.jpg", "class_id": "red"}], r"test.json: entry 1: 'class_id' must be an integer"),
    ({"cars/1.jpg": 1}, r"test.json: expected a JSON list"),
])
def test_uned_bad_entries(tmp_path, entries, message):
    (tmp_path / "info_files" / "cars").mkdir(parents=True)
    (tmp_path / "info_files" / "cars" / "test.json").write_text(json.dumps(entries))
    with pytest.raises(ManifestError, match=message):
        uned(tmp_path, domain="cars")


def test_uned_invalid_json_names_line(tmp_path):
    (tmp_path / "info_files" / "cars").mkdir(parents=True)
    (tmp_path / "info_files" / "cars" / "test.json").write_text('[\n{"path": "a.jpg", "class_id": 1},\n{"path": }\n]')
    with pytest.raises(ManifestError, match=r"test.json:3: not valid JSON"):
        uned(tmp_path, domain="cars")


def test_uned_rp2k_escaped_file_names(tmp_path):
    (tmp_path / "info_files" / "rp2k").mkdir(parents=True)
    (tmp_path / "info_files" / "rp2k" / "test.json").write_text(json.dumps([{"path": "rp2k/all/test/饮料/1.jpg", "class_id": 3}]))
    (tmp_path / "images" / "rp2k" / "all" / "test" / "#U996e#U6599").mkdir(parents=True)
    (tmp_path / "images" / "rp2k" / "all" / "test" / "#U996e#U6599" / "1.jpg").write_bytes(b"x")
    rows = uned(tmp_path, domain="rp2k")
    assert rows.paths == ["images/rp2k/all/test/#U996e#U6599/1.jpg"]


# ---------------------------------------------------------------------------------------------------
# Image folders


def test_imagefolder(tmp_path, cli):
    root = tmp_path / "flowers"
    write_images(root / "rose", 2, ext="png")
    write_images(root / "tulip", 1, ext="jpg")
    (root / "tulip" / "notes.txt").write_text("not an image")
    (root / "README").write_text("loose file")
    cli("manifest", "build", "imagefolder", "--root", root, "--out", tmp_path / "f.csv")
    assert manifest_rows(tmp_path / "f.csv") == [
        ["path", "label", "domain", "split"],
        ["rose/img0000.png", "flowers/rose", "flowers", "train"],
        ["rose/img0001.png", "flowers/rose", "flowers", "train"],
        ["tulip/img0000.jpg", "flowers/tulip", "flowers", "train"],
    ]
    rows = imagefolder(root, domain="plants")
    assert rows.labels == ["plants/rose", "plants/rose", "plants/tulip"] and rows.domains == ["plants"] * 3
    assert rows.notes == ["skipped 1 files whose extension Pillow does not read",
                          f"ignored 1 files directly in {root} (images belong in a folder per class)"]


def test_imagefolder_empty_is_an_error(tmp_path, cli):
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    result = cli("manifest", "build", "imagefolder", "--root", tmp_path / "empty", "--out", tmp_path / "f.csv", code=2)
    assert result.stderr.startswith("error: ") and "no images in class folders" in result.stderr
    assert "Traceback" not in result.output and not (tmp_path / "f.csv").exists()


# ---------------------------------------------------------------------------------------------------
# Registry and command line


def test_option_that_does_not_apply_is_refused(tmp_path, cli):
    write_products10k(tmp_path)
    with pytest.raises(ManifestError, match=r"--colors does not apply to products10k \(it takes --domain\)"):
        build("products10k", tmp_path, colors="x.csv")
    result = cli("manifest", "build", "products10k", "--root", tmp_path, "--partition", "test", "--out", tmp_path / "o.csv", code=2)
    assert result.stderr.strip() == "error: --partition does not apply to products10k (it takes --domain)"


def test_cli_error_is_one_line(tmp_path, cli):
    (tmp_path / "train.csv").write_text("name,class,group\n0.jpg,1\n")
    result = cli("manifest", "build", "products10k", "--root", tmp_path, "--out", tmp_path / "o.csv", code=2)
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'train.csv'}:2: expected 3 columns (name,class,group), found 2"]


def test_boxes_are_nan_free_for_sources_without_them(tmp_path):
    rows = products10k(write_products10k(tmp_path))
    assert rows.boxes is None
    rows = stanford_cars(write_stanford_cars(tmp_path / "c"))
    assert not any(math.isnan(v) for v in rows.boxes.ravel())


# ---------------------------------------------------------------------------------------------------
# Stanford Online Products, Food-101, Shopee, the published M4D-35k list


def test_sop_reads_ebay_train_txt(tmp_path, cli):
    from featcache.manifest.builders.sop import sop

    (tmp_path / "Ebay_train.txt").write_text(
        "image_id class_id super_class_id path\n"
        "1 1 1 bicycle_final/111085122871_0.JPG\n"
        "2 1 1 bicycle_final/111085122871_1.JPG\n"
        "\n"
        "3 7 2 cabinet_final/222_0.JPG\n")
    rows = sop(tmp_path)
    assert rows.paths == ["bicycle_final/111085122871_0.JPG", "bicycle_final/111085122871_1.JPG", "cabinet_final/222_0.JPG"]
    assert rows.labels == ["sop/1", "sop/1", "sop/7"] and set(rows.domains) == {"sop"} and set(rows.splits) == {"train"}
    (tmp_path / "Ebay_test.txt").write_text("image_id class_id super_class_id path\n4 9 3 x/1.JPG 5\n")
    with pytest.raises(ManifestError, match=r"Ebay_test.txt:2: expected 4 fields"):
        sop(tmp_path, partition="train,test")
    (tmp_path / "Ebay_train.txt").write_text("image_id class_id super_class_id path\n1 a 1 x.JPG\n")
    with pytest.raises(ManifestError, match=r"Ebay_train.txt:2: class_id 'a' is not an integer"):
        sop(tmp_path)
    (tmp_path / "Ebay_train.txt").write_text("image_id class_id super_class_id path\n1 1 1 ../x.JPG\n")
    with pytest.raises(ManifestError, match=r"Ebay_train.txt:2: path '../x.JPG' leaves"):
        sop(tmp_path)


def test_food101_reads_meta_json_and_takes_the_test_images_by_default(tmp_path):
    from featcache.manifest.builders.food101 import food101

    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "test.json").write_text(json.dumps({"apple_pie": ["apple_pie/1011328", "apple_pie/101251"],
                                                              "ramen": ["ramen/99"]}))
    (tmp_path / "meta" / "train.json").write_text(json.dumps({"ramen": ["ramen/5"]}))
    rows = food101(tmp_path)
    assert rows.paths == ["images/apple_pie/1011328.jpg", "images/apple_pie/101251.jpg", "images/ramen/99.jpg"]
    assert rows.labels == ["food/apple_pie", "food/apple_pie", "food/ramen"]
    assert food101(tmp_path, partition="train").paths == ["images/ramen/5.jpg"]
    (tmp_path / "meta" / "test.json").write_text(json.dumps({"ramen": ["sushi/1"]}))
    with pytest.raises(ManifestError, match=r"test.json: class 'ramen', entry 1: expected \"ramen/ID\""):
        food101(tmp_path)
    (tmp_path / "meta" / "test.json").write_text('{"ramen": [')
    with pytest.raises(ManifestError, match=r"test.json:1: not valid JSON"):
        food101(tmp_path)


def test_shopee_reads_quoted_titles_and_one_row_per_image_file(tmp_path):
    from featcache.manifest.builders.shopee import shopee

    write_csv(tmp_path / "train.csv", ["posting_id", "image", "image_phash", "title", "label_group"], [
        ["train_1", "a.jpg", "94974f937d4c2433", "Paper Bag, Victoria \"Secret\"", 249114794],
        ["train_2", "b.jpg", "af3f9460c2838f0f", "Double Tape, 3M", 2937985045],
        ["train_3", "a.jpg", "94974f937d4c2433", "same picture, other posting", 249114794],
        ["train_4", "c.jpg", "b94cb00ed3e50f78", "Maling TTS", 2395904891],
    ])
    rows = shopee(tmp_path)
    assert rows.paths == ["train_images/a.jpg", "train_images/b.jpg", "train_images/c.jpg"]
    assert rows.labels == ["shopee/249114794", "shopee/2937985045", "shopee/2395904891"]
    assert rows.notes and "1 postings reuse an image file" in rows.notes[0]
    write_csv(tmp_path / "train.csv", ["posting_id", "image", "image_phash", "title", "label_group"],
              [["train_1", "a.jpg", "9", "x, y", "group"]])
    with pytest.raises(ManifestError, match=r"train.csv:2: column 'label_group': label_group 'group' is not an integer"):
        shopee(tmp_path)


def test_m4d35k_reads_the_published_list(tmp_path, cli):
    write_csv(tmp_path / "m4d-35k_train.csv", ["img_path", "label"], [
        ["products-10k/train/0.jpg", 0],
        ["google_landmark_recognition_2021/train/6/e/1/6e158a47eb2ca3f6.jpg", 1],
        ["deepfashion/img/CLOTHING/Dress/id_00000001/comsumer_01.jpg", 2],
        ["stanford_cars/cars_train/00001.jpg", 3],
        ["products-10k/train/1.jpg", 0],
    ])
    out = tmp_path / "m.csv"
    cli("manifest", "build", "m4d-35k", "--root", tmp_path, "--out", out)
    m = read_manifest(out)
    assert m.domains == ["products", "landmarks", "apparel", "cars", "products"]
    assert m.labels == ["m4d/0", "m4d/1", "m4d/2", "m4d/3", "m4d/0"]
    assert m.paths[1] == "google_landmark_recognition_2021/train/6/e/1/6e158a47eb2ca3f6.jpg"
    write_csv(tmp_path / "m4d-35k_train.csv", ["img_path", "label"], [["a.jpg", 0], ["a.jpg", 1]])
    r = cli("manifest", "build", "m4d-35k", "--root", tmp_path, "--out", out, code=2)
    assert "m4d-35k_train.csv:3: column 'img_path': 'a.jpg' is listed twice" in r.output
