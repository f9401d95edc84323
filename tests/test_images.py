import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from featcache.images import ImageFailure, load_image


def png_header_only(path, width, height):
    """A PNG whose header claims width x height pixels, with no pixel data: what a bomb looks like at open."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def test_exif_orientation_is_applied(tmp_path):
    a = np.zeros((2, 4, 3), dtype=np.uint8)  # 4 wide, 2 high
    a[0, 0] = (255, 0, 0)
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    im.save(tmp_path / "o.png", exif=exif)
    out = np.asarray(load_image(tmp_path / "o.png"))
    assert out.shape == (4, 2, 3)
    # after a clockwise quarter turn, the top-left pixel of a 4x2 image sits top-right
    assert tuple(out[0, 1]) == (255, 0, 0) and out.sum() == 255


def test_modes_become_8bit_rgb(tmp_path):
    g = Image.fromarray(np.array([[0, 128], [200, 255]], dtype=np.uint8), "L")
    g.save(tmp_path / "g.png")
    assert np.asarray(load_image(tmp_path / "g.png"))[1, 0].tolist() == [200, 200, 200]

    g16 = Image.fromarray(np.array([[0, 32768], [65535, 65535]], dtype=np.uint16))
    g16.save(tmp_path / "g16.png")
    assert np.asarray(load_image(tmp_path / "g16.png"))[:, :, 0].tolist() == [[0, 128], [255, 255]]

    rgba = Image.fromarray(np.array([[[255, 0, 0, 0], [255, 0, 0, 128]], [[0, 0, 255, 255], [0, 0, 0, 255]]], dtype=np.uint8), "RGBA")
    rgba.save(tmp_path / "a.png")
    out = np.asarray(load_image(tmp_path / "a.png")).astype(int)
    assert out[0, 0].tolist() == [255, 255, 255]  # fully transparent: the white background
    assert np.abs(out[0, 1] - [255, 127, 127]).max() <= 1  # half red over white
    assert out[1, 0].tolist() == [0, 0, 255]

    p = Image.new("P", (2, 2))
    p.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    p.putdata([0, 1, 1, 1])
    p.info["transparency"] = 0
    p.save(tmp_path / "p.png", transparency=0)
    out = np.asarray(load_image(tmp_path / "p.png"))
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [10, 200, 30]

    cmyk = Image.new("CMYK", (2, 2), (255, 0, 0, 0))
    cmyk.save(tmp_path / "c.tif")
    assert np.asarray(load_image(tmp_path / "c.tif"))[0, 0].tolist() == [0, 255, 255]


def test_crop_box_is_clipped_to_the_image(tmp_path):
    a = np.arange(10 * 8 * 3, dtype=np.uint8).reshape(8, 10, 3)
    Image.fromarray(a).save(tmp_path / "x.png")
    out = np.asarray(load_image(tmp_path / "x.png", box=(2, 3, 6, 20)))
    np.testing.assert_array_equal(out, a[3:8, 2:6])
    with pytest.raises(ImageFailure, match="outside"):
        load_image(tmp_path / "x.png", box=(20, 20, 30, 30))


@pytest.mark.parametrize("make,reason", [
    (lambda p: None, "missing file"),
    (lambda p: p.write_bytes(b""), "empty file (0 bytes)"),
    (lambda p: p.write_text("<html>not found</html>"), "not an image"),
    (lambda p: p.mkdir(), "not a regular file"),
    (lambda p: Image.new("RGB", (1, 1)).save(p, format="JPEG"), "image too small (1x1 px"),
    (lambda p: png_header_only(p, 20000, 20000), "decompression bomb"),
    (lambda p: png_header_only(p, 10000, 10000), "decompression bomb"),  # above the limit, below twice it
])
def test_failures_have_reasons(tmp_path, make, reason):
    p = tmp_path / "bad.jpg"
    make(p)
    with pytest.raises(ImageFailure) as e:
        load_image(p)
    assert str(e.value).startswith(reason)


def test_truncated_jpeg_fails(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "t.jpg", quality=95)
    data = (tmp_path / "t.jpg").read_bytes()
    (tmp_path / "t.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageFailure, match="decode error"):
        load_image(tmp_path / "t.jpg")
