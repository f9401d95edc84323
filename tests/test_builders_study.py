"""The study's other sources (the paper's 15 candidates): each builder reads a tiny tree written here in
the source's published layout; rows are checked against values written out literally."""

import json
from pathlib import Path

import numpy as np
import pytest

from featcache.manifest import ManifestError, read_manifest
from featcache.manifest.builders import build
from tests.conftest import write_csv, write_images

# ---------------------------------------------------------------------------------------------------
# Trees in the published layouts (the guiec-15 recipe test writes them all under one root)


def write_met(root: Path, nested: bool = False) -> None:
    (root / "ground_truth").mkdir(parents=True, exist_ok=True)
    (root / "MET" / "MET" if nested else root / "MET").mkdir(parents=True, exist_ok=True)
    entries = [{"id": 34, "path": "MET/34/0.jpg"}, {"id": 34, "path": "MET/34/1.jpg"}, {"id": 34, "path": "MET/34/2.jpg"},
               {"id": 770869, "path": "MET/770869/0.jpg"}]
    (root / "ground_truth" / "MET_database.json").write_text(json.dumps(entries))


def write_hm(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    write_csv(root / "articles.csv", ["article_id", "product_code", "prod_name", "detail_desc"], [
        ["0108775015", "0108775", "Strap top", "Jersey top with narrow shoulder straps, fitted."],
        ["0108775044", "0108775", "Strap top", "Same top, another colour"],
        ["108775051", "108775", "Strap top (3)", "leading zeros dropped by a spreadsheet"],
        ["0110065001", "0110065", "OP T-shirt(Idro)", "no image for this one"],
        ["0111565001", "0111565", "20 den 1p Stockings", "Semi shiny nylon stockings"],
    ])
    for article in ("0108775015", "0108775044", "0108775051", "0111565001"):
        (root / "images" / article[:3]).mkdir(parents=True, exist_ok=True)
        (root / "images" / article[:3] / f"{article}.jpg").write_bytes(b"jpeg")


def write_rp2k(root: Path) -> None:
    for part, files in (("train", {"可口可乐": ["1.jpg", "2.jpg", "3.jpg"], "雪碧": ["1.jpg"]}), ("test", {"雪碧": ["9.jpg"]})):
        for product, names in files.items():
            (root / "all" / part / product).mkdir(parents=True, exist_ok=True)
            for n in names:
                (root / "all" / part / product / n).write_bytes(b"jpeg")
    (root / "all" / "train" / "雪碧" / "notes.txt").write_text("not an image")


FASHION200K_LINES = {
    "dress_train_detect_all.txt": [
        "women/dresses/casual_and_day_dresses/51727804/51727804_0.jpeg\t-1.78\tgreen seamed a-line dress",
        "women/dresses/casual_and_day_dresses/51727804/51727804_1.jpeg\t0.91\tgreen seamed a-line dress",
        "women/dresses/casual_and_day_dresses/51727804/51727804_3.jpeg\t0.12\tgreen seamed a-line dress",
    ],
    "top_train_detect_all.txt": [
        "women/tops/blouses/54686996/54686996_0.jpeg\t1.2\twhite, cotton, blouse",
        "women/tops/blouses/54686996/54686996_0.jpeg\t1.2\twhite, cotton, blouse",
    ],
    "top_test_detect_all.txt": ["women/tops/blouses/60000001/60000001_0.jpeg\t0.5\tred top"],
}


def write_fashion200k(root: Path) -> None:
    (root / "labels").mkdir(parents=True, exist_ok=True)
    for name, lines in FASHION200K_LINES.items():
        (root / "labels" / name).write_text("\n".join(lines) + "\n")


def deepfashion2_item(style: int, box: list, category: str = "short sleeve top") -> dict:
    return {"category_id": 1, "category_name": category, "style": style, "bounding_box": box,
            "landmarks": [0, 0, 0], "segmentation": [[0, 0, 1, 1]], "scale": 2, "occlusion": 1, "zoom_in": 1, "viewpoint": 2}


def write_deepfashion2(root: Path) -> None:
    records = {
        ("train", "000001"): {"source": "user", "pair_id": 1, "item1": deepfashion2_item(1, [10, 20, 110, 220]),
                              "item2": deepfashion2_item(0, [0, 0, 5, 5]),
                              "item10": deepfashion2_item(2, [5, 6, 50, 60], "trousers")},
        ("train", "000002"): {"source": "shop", "pair_id": 1, "item1": deepfashion2_item(1, [1, 2, 30, 40])},
        # pair ids restart in each partition: validation's pair 1 is another garment than train's
        ("validation", "000001"): {"source": "user", "pair_id": 1, "item1": deepfashion2_item(1, [3, 3, 9, 9])},
        ("validation", "000002"): {"source": "shop", "pair_id": 1, "item1": deepfashion2_item(1, [0, 0, 8, 8])},
    }
    for (part, stem), record in records.items():
        (root / part / "annos").mkdir(parents=True, exist_ok=True)
        (root / part / "image").mkdir(parents=True, exist_ok=True)
        (root / part / "annos" / f"{stem}.json").write_text(json.dumps(record))


def write_food_rec22(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    coco = {
        "images": [{"id": 131094, "file_name": "131094.jpg", "width": 480, "height": 480},
                   {"id": 131095, "file_name": "131095.jpg", "width": 640, "height": 480}],
        "annotations": [
            {"id": 1, "image_id": 131094, "category_id": 101246, "segmentation": [[]], "area": 5059.0, "bbox": [10, 20, 100, 50], "iscrowd": 0},
            {"id": 2, "image_id": 131094, "category_id": 2578, "segmentation": [[]], "area": 100.0, "bbox": [200.5, 0, 40, 30.5], "iscrowd": 0},
            {"id": 3, "image_id": 131095, "category_id": 2578, "segmentation": [[]], "area": 10.0, "bbox": [0, 0, 640, 480], "iscrowd": 0},
        ],
        "categories": [{"id": 2578, "name": "water", "name_readable": "Water", "supercategory": "food"},
                       {"id": 101246, "name": "bread-wholemeal", "name_readable": "Bread, wholemeal", "supercategory": "food"}],
    }
    (root / "annotations.json").write_text(json.dumps(coco))


def write_furniture180(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    write_csv(root / "furniture180_train.csv", ["img_path", "label"], [
        ["air_condition/156501-14912605.jpg", 0], ["bar_stool/1121606801.jpg.webp", 1], ["window_window/010.JPG", 179]])


def write_storefronts146(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    write_csv(root / "storefronts146_train.csv", ["img_path", "label"], [
        ["7-Eleven/google_in_london_1.jpg", 0], ["Albertson's/google_street_view_1.jpg", 4],
        ["Apple Store/iTunes/google_in_london_1.jpg", 9], ["Apple Store/iTunes/google_in_london_2.jpg", 9],
        ["Apple Store/iTunes/google_street_view_1.jpg", 9]])


# ---------------------------------------------------------------------------------------------------


def test_met_reads_the_database_in_both_layouts(tmp_path, cli):
    write_met(tmp_path)
    rows = build("met", tmp_path)
    assert rows.paths == ["MET/34/0.jpg", "MET/34/1.jpg", "MET/34/2.jpg", "MET/770869/0.jpg"]
    assert rows.labels == ["artwork/34"] * 3 + ["artwork/770869"] and set(rows.domains) == {"artwork"}
    nested = tmp_path / "kaggle"
    write_met(nested, nested=True)
    assert build("met", nested).paths[0] == "MET/MET/34/0.jpg"
    (tmp_path / "ground_truth" / "MET_database.json").write_text(json.dumps([{"id": 1, "path": "MET/1/0.jpg"}, {"id": 2}]))
    r = cli("manifest", "build", "met", "--root", tmp_path, "--out", tmp_path / "m.csv", code=2)
    assert "MET_database.json: entry 2: expected" in r.output
    (tmp_path / "ground_truth" / "MET_database.json").write_text('[{"id": 1,\n "path": }]')
    with pytest.raises(ManifestError, match=r"MET_database.json:2: not valid JSON"):
        build("met", tmp_path)


def test_hm_labels_by_product_and_leaves_out_articles_without_images(tmp_path):
    write_hm(tmp_path)
    rows = build("hm", tmp_path)
    assert rows.paths == ["images/010/0108775015.jpg", "images/010/0108775044.jpg", "images/010/0108775051.jpg",
                          "images/011/0111565001.jpg"]
    assert rows.labels == ["hm/0108775"] * 3 + ["hm/0111565"]
    assert rows.notes == [f"1 of 5 articles have no image in {tmp_path / 'images'} and were left out"]
    write_csv(tmp_path / "articles.csv", ["article_id", "product_code"], [["0108775015", "0108775"], ["01087x5044", "0108775"]])
    with pytest.raises(ManifestError, match=r"articles.csv:3: column 'article_id': article_id '01087x5044' is not a number"):
        build("hm", tmp_path)


def test_rp2k_reads_the_folder_per_product_or_the_original_codes_list(tmp_path):
    write_rp2k(tmp_path)
    rows = build("rp2k", tmp_path)
    assert rows.paths == ["all/train/可口可乐/1.jpg", "all/train/可口可乐/2.jpg", "all/train/可口可乐/3.jpg", "all/train/雪碧/1.jpg"]
    assert rows.labels == ["rp2k/可口可乐"] * 3 + ["rp2k/雪碧"]
    assert any("skipped 1 files" in n for n in rows.notes)
    assert build("rp2k", tmp_path, partition="test").paths == ["all/test/雪碧/9.jpg"]
    write_csv(tmp_path / "train.csv", ["img_path", "img_id"], [["可口可乐/1.jpg", 17], ["雪碧/1.jpg", 3]])
    rows = build("rp2k", tmp_path)
    assert rows.paths == ["train/可口可乐/1.jpg", "train/雪碧/1.jpg"] and rows.labels == ["rp2k/17", "rp2k/3"]
    with pytest.raises(ManifestError, match=r"all/test: folder not found"):
        build("rp2k", tmp_path / "all" / "train", partition="test")


def test_fashion200k_labels_by_product_folder(tmp_path):
    write_fashion200k(tmp_path)
    rows = build("fashion200k", tmp_path)
    assert rows.paths == [line.split("\t")[0] for line in FASHION200K_LINES["dress_train_detect_all.txt"]] + \
        ["women/tops/blouses/54686996/54686996_0.jpeg"]
    assert rows.labels == ["fashion200k/51727804"] * 3 + ["fashion200k/54686996"]
    assert rows.notes == ["1 lines repeat an image already listed: one row per image"]
    assert build("fashion200k", tmp_path, partition="test").labels == ["fashion200k/60000001"]
    (tmp_path / "labels" / "top_train_detect_all.txt").write_text("ok/1/1_0.jpeg\t1\tx\n../up/1_0.jpeg\t1\tx\n")
    with pytest.raises(ManifestError, match=r"top_train_detect_all.txt:2: path '../up/1_0.jpeg' leaves"):
        build("fashion200k", tmp_path)
    # the original code's own list, when the label files are not there
    other = tmp_path / "unifex"
    other.mkdir()
    write_csv(other / "fashion200k_train.csv", ["img_path", "img_id"], [["women/a/1/1_0.jpeg", 1], ["women/a/1/1_1.jpeg", 1]])
    assert build("fashion200k", other).labels == ["fashion200k/1", "fashion200k/1"]


def test_deepfashion2_one_row_per_matched_item_with_its_box(tmp_path, cli):
    write_deepfashion2(tmp_path)
    out = tmp_path / "m.csv"
    cli("manifest", "build", "deepfashion2", "--root", tmp_path, "--out", out, "--partition", "train,validation")
    m = read_manifest(out, tmp_path)
    assert m.paths == ["train/image/000001.jpg", "train/image/000001.jpg", "train/image/000002.jpg",
                       "validation/image/000001.jpg", "validation/image/000002.jpg"]
    assert m.labels == ["deepfashion2/1_1", "deepfashion2/1_2", "deepfashion2/1_1", "deepfashion2/validation/1_1",
                        "deepfashion2/validation/1_1"]
    assert m.splits == ["train", "train", "train", "query", "index"]
    np.testing.assert_array_equal(m.boxes, [[10, 20, 110, 220], [5, 6, 50, 60], [1, 2, 30, 40], [3, 3, 9, 9], [0, 0, 8, 8]])
    bad = tmp_path / "bad"
    (bad / "train" / "annos").mkdir(parents=True)
    (bad / "train" / "annos" / "000001.json").write_text(json.dumps({"source": "user", "pair_id": 1,
                                                                      "item1": deepfashion2_item(1, [5, 5, 2, 9])}))
    with pytest.raises(ManifestError, match=r"000001.json: item1: bounding_box: empty box \(5,5,2,9\)"):
        build("deepfashion2", bad)


def test_food_rec22_one_row_per_annotation_box(tmp_path):
    write_food_rec22(tmp_path)
    rows = build("food-rec22", tmp_path)
    assert rows.paths == ["images/131094.jpg", "images/131094.jpg", "images/131095.jpg"]
    assert rows.labels == ["food-rec22/101246", "food-rec22/2578", "food-rec22/2578"]
    # COCO's [x, y, width, height] -> x1, y1, x2, y2
    np.testing.assert_array_equal(rows.boxes, [[10, 20, 110, 70], [200.5, 0, 240.5, 30.5], [0, 0, 640, 480]])
    coco = json.loads((tmp_path / "annotations.json").read_text())
    coco["annotations"][1]["image_id"] = 5
    (tmp_path / "annotations.json").write_text(json.dumps(coco))
    with pytest.raises(ManifestError, match=r"annotations.json: annotations\[1\]: image_id 5 is not in images"):
        build("food-rec22", tmp_path)


def test_crops_of_one_image_are_rows_of_one_manifest_and_extract_crops_each(tmp_path, cli):
    # two items of one image: the manifest keeps both rows, extraction crops each box
    write_images(tmp_path / "images", 1, size=(60, 40))
    (tmp_path / "images" / "img0000.png").rename(tmp_path / "images" / "131094.jpg.png")
    write_food_rec22(tmp_path)
    coco = json.loads((tmp_path / "annotations.json").read_text())
    coco["images"] = [{"id": 131094, "file_name": "131094.jpg.png"}]
    coco["annotations"] = [dict(coco["annotations"][0], bbox=[0, 0, 30, 40]), dict(coco["annotations"][1], bbox=[30, 0, 30, 40])]
    (tmp_path / "annotations.json").write_text(json.dumps(coco))
    cli("manifest", "build", "food-rec22", "--root", tmp_path, "--out", tmp_path / "m.csv")
    cli("extract", "-m", "tiny-vit", "--manifest", tmp_path / "m.csv", "--out", tmp_path / "c.zarr", "--quiet", "--workers", "0")
    from featcache.cache import FeatureCache

    feats = FeatureCache.open(tmp_path / "c.zarr").features()
    assert feats.shape[0] == 2 and not np.allclose(feats[0], feats[1], atol=1e-2)
    write_csv(tmp_path / "dup.csv", ["path", "label", "x1", "y1", "x2", "y2"], [["a.jpg", 1, 0, 0, 5, 5], ["a.jpg", 2, 0, 0, 5, 5]])
    with pytest.raises(ManifestError, match=r"dup.csv:3: column 'path': duplicate row: path 'a.jpg' with the same crop box"):
        read_manifest(tmp_path / "dup.csv")


def test_furniture180_and_storefronts146_read_the_shipped_lists(tmp_path):
    write_furniture180(tmp_path / "f")
    rows = build("furniture180", tmp_path / "f")
    assert rows.paths == ["air_condition/156501-14912605.jpg", "bar_stool/1121606801.jpg.webp", "window_window/010.JPG"]
    assert rows.labels == ["furniture/0", "furniture/1", "furniture/179"]
    write_storefronts146(tmp_path / "s")
    rows = build("storefronts146", tmp_path / "s")
    assert rows.paths[1] == "Albertson's/google_street_view_1.jpg" and rows.paths[2] == "Apple Store/iTunes/google_in_london_1.jpg"
    assert rows.labels == ["storefronts/0", "storefronts/4", "storefronts/9", "storefronts/9", "storefronts/9"]
    write_csv(tmp_path / "s" / "storefronts146_train.csv", ["img_path", "label"], [["a.jpg", 0], ["", 1]])
    with pytest.raises(ManifestError, match=r"storefronts146_train.csv:3: column 'img_path': empty path"):
        build("storefronts146", tmp_path / "s")


def test_deepfashion_kaggle_json_layout(tmp_path):
    (tmp_path / "deepfashion_train.json").write_text(json.dumps({
        "CLOTHING/Blouse": {"id_00000001": ["train/CLOTHING/Blouse/id_00000001/comsumer_01.jpg",
                                            "train/CLOTHING/Blouse/id_00000001/shop_01.jpg"]},
        "DRESSES/Dress": {"id_00000007": ["train/DRESSES/Dress/id_00000007/shop_01.jpg"]},
    }))
    rows = build("deepfashion-c2s", tmp_path)
    assert rows.paths == ["train/CLOTHING/Blouse/id_00000001/comsumer_01.jpg", "train/CLOTHING/Blouse/id_00000001/shop_01.jpg",
                          "train/DRESSES/Dress/id_00000007/shop_01.jpg"]
    assert rows.labels == ["apparel/id_00000001"] * 2 + ["apparel/id_00000007"]
    with pytest.raises(ManifestError, match=r"holds the train pairs only"):
        build("deepfashion-c2s", tmp_path, partition="test")
    (tmp_path / "deepfashion_train.json").write_text(json.dumps({"g": {"id_1": ["a.jpg"], "id_2": ["a.jpg"]}}))
    with pytest.raises(ManifestError, match=r"item 'id_2': image 'a.jpg' is also listed under item 'id_1'"):
        build("deepfashion-c2s", tmp_path)


def test_stanford_cars_csv_copy(tmp_path):
    (tmp_path / "cars_train" / "cars_train").mkdir(parents=True)  # the Kaggle copy's nested folder
    write_csv(tmp_path / "sc_train.csv", ["", "x1", "y1", "x2", "y2", "Label", "image"],
              [[0, 39, 116, 569, 375, 14, "00001.jpg"], [1, 36, 116, 868, 587, 3, "00002.jpg"], [2, 1, 2, 3, 4, "14_8", "00003.jpg"]])
    rows = build("stanford-cars", tmp_path)
    assert rows.paths == ["cars_train/cars_train/00001.jpg", "cars_train/cars_train/00002.jpg", "cars_train/cars_train/00003.jpg"]
    assert rows.labels == ["cars/14", "cars/3", "cars/14/8"]
    np.testing.assert_array_equal(rows.boxes[:2], [[39, 116, 569, 375], [36, 116, 868, 587]])
    # with the devkit's class names at hand, labels are model names, as from the .mat layout
    names = np.array([f"Model {i}" for i in range(1, 197)], dtype=object)
    import scipy.io

    scipy.io.savemat(tmp_path / "cars_meta.mat", {"class_names": names[None, :]})
    assert build("stanford-cars", tmp_path).labels == ["cars/Model 14", "cars/Model 3", "cars/Model 14/8"]
    write_csv(tmp_path / "sc_train.csv", ["", "x1", "y1", "x2", "y2", "Label", "image"], [[0, 1, 2, "x", 4, 14, "a.jpg"]])
    with pytest.raises(ManifestError, match=r"sc_train.csv:2: x1,y1,x2,y2 must be numbers"):
        build("stanford-cars", tmp_path)


# ---------------------------------------------------------------------------------------------------
# The 15-source recipe


def write_guiec15_data(data: Path) -> Path:
    from tests.test_builders import write_deepfashion, write_gldv2, write_products10k, write_stanford_cars

    write_products10k(data / "products10k")
    write_gldv2(data / "gldv2")
    write_deepfashion(data / "deepfashion")
    write_met(data / "met")
    (data / "shopee").mkdir()
    write_csv(data / "shopee" / "train.csv", ["posting_id", "image", "image_phash", "title", "label_group"],
              [[f"train_{i}", f"{i}.jpg", "0", "a, b", 7 if i < 3 else 9] for i in range(5)])
    write_hm(data / "hm")
    write_rp2k(data / "rp2k")
    (data / "sop").mkdir()
    (data / "sop" / "Ebay_train.txt").write_text("image_id class_id super_class_id path\n" +
                                                 "".join(f"{i} {1 + i // 3} 1 bicycle_final/{i}.JPG\n" for i in range(7)))
    write_fashion200k(data / "fashion200k")
    write_food_rec22(data / "food-rec22")
    coco = json.loads((data / "food-rec22" / "annotations.json").read_text())
    coco["annotations"].append(dict(coco["annotations"][2], id=4, bbox=[1, 1, 5, 5]))  # a third item of category 2578
    (data / "food-rec22" / "annotations.json").write_text(json.dumps(coco))
    write_stanford_cars(data / "stanford-cars")
    write_deepfashion2(data / "deepfashion2")
    (data / "deepfashion2" / "train" / "annos" / "000003.json").write_text(json.dumps(
        {"source": "shop", "pair_id": 1, "item1": deepfashion2_item(1, [0, 0, 9, 9])}))  # garment 1_1's third image
    (data / "food101" / "meta").mkdir(parents=True)
    (data / "food101" / "meta" / "test.json").write_text(json.dumps({"ramen": [f"ramen/{i}" for i in range(4)], "pho": ["pho/1"]}))
    write_furniture180(data / "furniture180")
    write_storefronts146(data / "storefronts146")
    return data


def test_guiec15_recipe_builds_all_fifteen_sources(tmp_path, cli):
    from collections import Counter

    from featcache.manifest.recipe import load_recipe

    recipe = load_recipe(Path(__file__).resolve().parents[1] / "manifests" / "guiec-15.toml")
    assert len(recipe.sources) == 15 and len({s.builder for s in recipe.sources}) == 15
    data = write_guiec15_data(tmp_path / "DATA")
    out = tmp_path / "guiec.csv"
    result = cli("manifest", "recipe", recipe.path, "--root", data, "--out", out)
    m = read_manifest(out, data)
    # images kept per source, counted by hand from the trees above: classes with >= 3 images (furniture180: all)
    assert Counter(m.domains) == {
        "products": 3,  # class 1 (3 images); 7 and 12 too small
        "landmarks": 6,  # both landmarks have 3
        "apparel": 6,  # DeepFashion's two train items, 3 images each
        "artwork": 3,  # exhibit 34; 770869 has one image
        "shopee": 3,  # label group 7; 9 has two postings
        "hm": 3,  # product 0108775 (three articles with images); 0111565 has one
        "rp2k": 3,  # 可口可乐; 雪碧 has one image (and a text file, skipped)
        "sop": 6,  # classes 1 and 2; class 3 has one image
        "fashion200k": 3,  # product 51727804; 54686996 has one distinct image
        "food-rec22": 3,  # category 2578's three item boxes; 101246 has one
        "cars": 3,  # the Hummer (class 1); the others have one image each
        "deepfashion2": 3,  # garment 1_1 in three images; 1_2 in one
        "food": 4,  # ramen; pho has one image
        "furniture": 3,  # unfiltered: one image per class
        "storefronts": 3,  # label 9
    }
    assert m.paths.count("deepfashion2/train/image/000001.jpg") == 1  # its garment 1_2 has one image: curated away
    assert "furniture180/bar_stool/1121606801.jpg.webp" in m.paths  # furniture180: unfiltered
    assert m.has_boxes and "storefronts146" in result.output


@pytest.mark.parametrize("source, write, message", [
    ("food-rec22", lambda r: (r / "annotations.json").write_text(
        '{"images": [{"id": 1, "file_name": "1.jpg"}], "categories": [{"id": 5, "name": "x"}], '
        '"annotations": [{"image_id": 1, "category_id": 5, "bbox": [NaN, 0, 4, 4]}]}'),
     r"annotations\[0\]: bbox \[nan, 0, 4, 4\]: box values must be finite"),
    ("food-rec22", lambda r: (r / "annotations.json").write_text(
        '{"images": [{"id": [1], "file_name": "1.jpg"}], "categories": [], "annotations": []}'),
     r"annotations.json: images\[0\]: expected \{\"id\": NUMBER"),
    ("food-rec22", lambda r: (r / "annotations.json").write_text(
        '{"images": [{"id": 1, "file_name": "1.jpg"}, {"id": 1, "file_name": "2.jpg"}], "categories": [], "annotations": []}'),
     r"images\[1\]: id 1 is used by another image too"),
    ("stanford-cars", lambda r: write_csv(r / "sc_train.csv", ["", "x1", "y1", "x2", "y2", "Label", "image"],
                                          [[0, 1, 1, 9, 9, 1, "a.jpg"], [1, 50, 5, 10, 4, 2, "b.jpg"]]),
     r"sc_train.csv:3: empty box \(50,5,10,4\)"),
    ("stanford-cars", lambda r: write_csv(r / "sc_train.csv", ["", "x1", "y1", "x2", "y2", "Label", "image"],
                                          [[0, 1, 1, 9, 9, 1, ""]]),
     r"sc_train.csv:2: column 'image': empty image name"),
    ("fashion200k", lambda r: ((r / "labels").mkdir(), (r / "labels" / "top_train_detect_all.txt").write_bytes(b"women/caf\xe9/1/1_0.jpeg\t1\tx\n")),
     r"top_train_detect_all.txt: not UTF-8 text \(byte 0xe9"),
])
def test_malformed_source_files_name_file_and_place(tmp_path, source, write, message):
    write(tmp_path)
    with pytest.raises(ManifestError, match=message):
        build(source, tmp_path)
