"""Image reading: EXIF orientation, alpha, grayscale, CMYK, 16-bit, palette, lying extensions, broken files."""

from __future__ import annotations

import io
import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from library.data.images import BadImageError, list_images, load_image, read_size, resize_crop
from library.data.config import load_dataset_config
from library.errors import UserError


def _png16(arr: np.ndarray) -> bytes:
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit RGB)."""
    h, w, c = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 3: 2, 4: 6}[c], 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def test_exif_orientation_applied_to_pixels_and_size(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)  # left half red, right half blue
    arr[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    p = tmp_path / "rot.jpg"
    Image.fromarray(arr).save(p, quality=95, exif=exif)
    assert read_size(p) == (20, 40)
    img = load_image(p)
    assert img.rgb.shape == (40, 20, 3)
    assert img.rgb[5, 10, 0] > 200 and img.rgb[5, 10, 2] < 60  # the left half is now on top
    assert img.rgb[35, 10, 2] > 200 and img.rgb[35, 10, 0] < 60


def test_rgba_la_and_palette_transparency(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 1] = 200
    rgba[:4, :, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    img = load_image(tmp_path / "a.png")
    assert img.rgb.shape == (8, 8, 3) and img.rgb[0, 0, 1] == 200
    assert img.alpha is not None and img.alpha[0, 0] == 255 and img.alpha[7, 7] == 0

    la = Image.fromarray(np.full((4, 4), 90, np.uint8), "L").convert("LA")
    la.putalpha(Image.fromarray(np.full((4, 4), 17, np.uint8)))
    la.save(tmp_path / "la.png")
    img = load_image(tmp_path / "la.png")
    assert (img.rgb == 90).all() and (img.alpha == 17).all()

    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.save(tmp_path / "p.png", transparency=0)
    img = load_image(tmp_path / "p.png")
    assert img.alpha[0, 0] == 0 and img.alpha[1, 1] == 255 and tuple(img.rgb[1, 1]) == (10, 20, 30)

    pal.save(tmp_path / "p_opaque.gif")
    img = load_image(tmp_path / "p_opaque.gif")
    assert img.alpha is None and tuple(img.rgb[1, 1]) == (10, 20, 30)


def test_grayscale_one_bit_and_cmyk(tmp_path):
    Image.fromarray(np.full((4, 6), 77, np.uint8), "L").save(tmp_path / "g.png")
    img = load_image(tmp_path / "g.png")
    assert img.rgb.shape == (4, 6, 3) and (img.rgb == 77).all() and img.alpha is None
    Image.new("1", (5, 5), 1).save(tmp_path / "b.png")
    assert (load_image(tmp_path / "b.png").rgb == 255).all()
    Image.new("CMYK", (6, 6), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=95)  # pure red in CMYK
    rgb = load_image(tmp_path / "c.jpg").rgb
    assert rgb[3, 3, 0] > 220 and rgb[3, 3, 1] < 40 and rgb[3, 3, 2] < 40


def test_sixteen_bit_gray_and_rgb(tmp_path):
    g = np.array([[0, 32896, 65535]], np.uint16)
    Image.fromarray(g).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    assert np.asarray(Image.open(tmp_path / "g16.png").convert("L"))[0, 1] == 255  # Pillow alone clips
    rgb = load_image(tmp_path / "g16.png").rgb
    assert rgb[0, :, 0].tolist() == [0, 128, 255]
    a = np.zeros((2, 3, 3), np.uint16)
    a[..., 0], a[..., 1] = 65535, 32896
    (tmp_path / "c16.png").write_bytes(_png16(a))
    assert tuple(load_image(tmp_path / "c16.png").rgb[0, 0]) == (255, 128, 0)
    a4 = np.zeros((2, 2, 4), np.uint16)
    a4[..., 3] = 65535
    a4[0, 0, 3] = 0
    (tmp_path / "c16a.png").write_bytes(_png16(a4))
    img = load_image(tmp_path / "c16a.png")
    assert img.alpha[0, 0] == 0 and img.alpha[1, 1] == 255


def test_float_tiff(tmp_path):
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), "F").save(tmp_path / "f.tif")
    assert load_image(tmp_path / "f.tif").rgb[0, :, 0].tolist() == [0, 128, 255]


def test_lying_extension(tmp_path):
    Image.new("RGB", (9, 7), (1, 2, 3)).save(tmp_path / "png_inside.jpg", format="PNG")
    Image.new("RGB", (9, 7), (200, 10, 10)).save(tmp_path / "jpeg_inside.png", format="JPEG")
    assert read_size(tmp_path / "png_inside.jpg") == (9, 7)
    assert tuple(load_image(tmp_path / "png_inside.jpg").rgb[0, 0]) == (1, 2, 3)
    assert load_image(tmp_path / "jpeg_inside.png").rgb[3, 3, 0] > 180


def test_corrupt_and_truncated_named_in_errors(tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(BadImageError) as e:
        read_size(junk)
    assert str(junk) in str(e.value) and "--skip_bad_images" in str(e.value)
    assert isinstance(e.value, UserError)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    assert read_size(cut) == (64, 64)  # the header is intact ...
    with pytest.raises(BadImageError, match="cut.jpg: cannot read image"):  # ... the pixels are not
        load_image(cut)
    empty = tmp_path / "empty.webp"
    empty.write_bytes(b"")
    with pytest.raises(BadImageError):
        read_size(empty)


def _dataset_dir(tmp_path: Path) -> Path:
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(3):
        Image.new("RGB", (64, 64), (i, i, i)).save(d / f"ok{i}.png")
    (d / "bad.png").write_bytes(b"\x89PNG broken")
    (d / "bad2.jpg").write_bytes(b"")
    (d / "notes.txt").write_text("not an image")
    (d / ".hidden.png").write_bytes(b"x")
    return d


def test_scan_reports_every_bad_image_or_skips_them(tmp_path, caplog):
    from library.data.dataset import build_datasets

    d = _dataset_dir(tmp_path)
    assert [p.name for p in list_images(d)] == ["bad.png", "bad2.jpg", "ok0.png", "ok1.png", "ok2.png"]
    cfg_path = tmp_path / "c.toml"
    cfg_path.write_text(f'[general]\nresolution = 64\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{d}"\n')
    cfg = load_dataset_config(cfg_path)
    with pytest.raises(UserError) as e:
        build_datasets(cfg, seed=0, progress=False)
    lines = str(e.value).splitlines()
    assert len(lines) == 2 and "bad.png: cannot read image" in lines[0] and "bad2.jpg" in lines[1]
    with caplog.at_level(logging.WARNING):
        train, _ = build_datasets(cfg, seed=0, skip_bad_images=True, progress=False)
    assert sorted(p.path.name for p in train.items[0]) == ["ok0.png", "ok1.png", "ok2.png"]
    assert "bad.png" in caplog.text


def test_truncated_image_at_batch_time(tmp_path, caplog):
    from library.data.dataset import BatchLoader, build_datasets

    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (i, 0, 0)).save(d / f"ok{i}.png")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (d / "cut.jpg").write_bytes(buf.getvalue()[:-2000])  # header intact: passes the scan, fails decoding
    cfg_path = tmp_path / "c.toml"
    cfg_path.write_text(f'[general]\nresolution = 64\nbatch_size = 3\n[[datasets]]\n'
                        f'[[datasets.subsets]]\nimage_dir = "{d}"\n')
    cfg = load_dataset_config(cfg_path)
    train, _ = build_datasets(cfg, seed=0, progress=False)
    with pytest.raises(BadImageError, match="cut.jpg"):
        list(BatchLoader(train).iter_epoch(0))
    train, _ = build_datasets(cfg, seed=0, skip_bad_images=True, progress=False)
    with caplog.at_level(logging.WARNING):
        batches = list(BatchLoader(train).iter_epoch(0))
    assert len(batches) == 1 and batches[0].images.shape[0] == 2 and "cut.jpg" in caplog.text


def test_resize_crop_default_filters():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
    down = resize_crop(arr, (20, 20), (0, 0, 20, 20), None)
    box = np.asarray(Image.fromarray(arr).resize((20, 20), Image.Resampling.BOX))
    assert np.array_equal(down, box)  # area when shrinking
    up = resize_crop(arr, (80, 80), (10, 20, 74, 68), None)
    lz = np.asarray(Image.fromarray(arr).resize((80, 80), Image.Resampling.LANCZOS))[20:68, 10:74]
    assert up.shape == (48, 64, 3) and np.array_equal(up, lz)  # lanczos when enlarging, then the crop box
    near = resize_crop(arr, (80, 80), (0, 0, 80, 80), "nearest")
    assert np.array_equal(near[::2, ::2], arr)
