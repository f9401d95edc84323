import math

import numpy as np
import pytest

from featcache.manifest import ManifestError, read_manifest, write_manifest
from tests.conftest import write_csv


def test_reads_rows_defaults_and_class_order(tmp_path):
    m = write_csv(tmp_path / "m.csv", ["label", "path", "split"], [
        ["10", "a.jpg", "query"], ["2", "sub/b.jpg", ""], ["10", "/abs/c.jpg", "index"],
    ])
    man = read_manifest(m)
    assert man.paths == ["a.jpg", "sub/b.jpg", "/abs/c.jpg"]
    assert man.splits == ["query", "train", "index"]
    assert man.domains == ["default"] * 3
    assert man.classes == ["2", "10"]  # numeric order when all labels are integers
    assert man.label_ids.tolist() == [1, 0, 1]
    assert man.root == tmp_path
    assert man.resolve(1) == tmp_path / "sub/b.jpg"
    assert str(man.resolve(2)) == "/abs/c.jpg"
    assert not man.has_boxes


def test_string_labels_sort_lexicographically_and_boxes_parse(tmp_path):
    m = write_csv(tmp_path / "m.csv", ["path", "label", "domain", "x1", "y1", "x2", "y2"], [
        ["a.jpg", "cars/b", "cars", "1", "2", "30.5", "40"], ["b.jpg", "cars/a", "cars", "", "", "", ""],
    ])
    man = read_manifest(m, root=tmp_path / "elsewhere")
    assert man.classes == ["cars/a", "cars/b"]
    assert man.box(0) == (1.0, 2.0, 30.5, 40.0)
    assert man.box(1) is None and math.isnan(man.boxes[1, 0])
    assert man.root == tmp_path / "elsewhere"


@pytest.mark.parametrize("header,rows,message", [
    (["path"], [["a.jpg"]], "m.csv:1: missing column 'label'"),
    (["path", "label"], [["a.jpg", "1"], ["", "2"]], "m.csv:3: column 'path': empty path"),
    (["path", "label"], [["a.jpg", " "]], "m.csv:2: column 'label': empty label"),
    (["path", "label"], [["a.jpg", "1"], ["b.jpg", "1"], ["a.jpg", "2"]], "m.csv:4: column 'path': duplicate path 'a.jpg' (first on line 2)"),
    (["path", "label", "split"], [["a.jpg", "1", "val"]], "m.csv:2: column 'split': unknown split 'val'"),
    (["path", "label", "x1", "y1", "x2", "y2"], [["a.jpg", "1", "1", "2", "x", "4"]], "m.csv:2: column 'x2': malformed box value 'x'"),
    (["path", "label", "x1", "y1", "x2", "y2"], [["a.jpg", "1", "5", "2", "3", "4"]], "m.csv:2: columns 'x1,y1,x2,y2': empty box"),
    (["path", "label", "x1", "y1"], [["a.jpg", "1", "5", "2"]], "m.csv:1: crop box needs all of x1,y1,x2,y2; missing x2,y2"),
    (["path", "label"], [["ok/../../etc/passwd", "1"]], "m.csv:2: column 'path': 'ok/../../etc/passwd' leaves the root folder"),
    (["path", "label"], [["a.jpg"]], "m.csv:2: expected 2 columns, found 1"),
    (["path", "label"], [], "m.csv: no rows"),
])
def test_bad_rows_name_file_line_and_column(tmp_path, header, rows, message):
    m = write_csv(tmp_path / "m.csv", header, rows)
    with pytest.raises(ManifestError) as e:
        read_manifest(m)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_dotdot_inside_root_is_allowed(tmp_path):
    m = write_csv(tmp_path / "m.csv", ["path", "label"], [["a/../b..c.jpg", "1"]])
    assert read_manifest(m).paths == ["a/../b..c.jpg"]


def test_write_manifest_round_trips_and_is_atomic(tmp_path):
    out = tmp_path / "out" / "m.csv"
    boxes = np.array([[0, 0, 10, 10], [np.nan] * 4])
    write_manifest(out, ["a.jpg", "b.jpg"], ["x", "y"], ["d", "d"], ["train", "index"], boxes)
    man = read_manifest(out)
    assert man.paths == ["a.jpg", "b.jpg"] and man.labels == ["x", "y"] and man.splits == ["train", "index"]
    assert man.box(0) == (0, 0, 10, 10) and man.box(1) is None
    assert not list(out.parent.glob("*.tmp"))
    assert out.read_text().splitlines()[0] == "path,label,domain,split,x1,y1,x2,y2"


def test_content_hash_follows_rows_not_bytes(tmp_path):
    a = write_csv(tmp_path / "a.csv", ["path", "label"], [["a.jpg", "1"]])
    b = write_csv(tmp_path / "b.csv", ["label", "path", "split"], [["1", "a.jpg", "train"]])
    c = write_csv(tmp_path / "c.csv", ["path", "label"], [["a.jpg", "2"]])
    assert read_manifest(a).content_sha256() == read_manifest(b).content_sha256()
    assert read_manifest(a).content_sha256() != read_manifest(c).content_sha256()
