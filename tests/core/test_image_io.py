"""Tests of image loading, cropping, conversion and saving."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from profusion_rt.core.errors import ImageError, OutputPathError
from profusion_rt.core.image_io import (
    center_crop_resize,
    load_image,
    pil_to_tensor,
    save_image,
    tensor_to_pil,
    to_uint8,
)


@pytest.fixture(scope="module")
def astronaut():
    return skdata.astronaut()  # 512x512x3 uint8


def test_load_rgb_png_and_jpeg(tmp_path, astronaut):
    png = tmp_path / "astronaut.png"
    Image.fromarray(astronaut).save(png)
    image = load_image(png)
    assert image.mode == "RGB" and image.size == (512, 512)
    assert np.array_equal(np.asarray(image), astronaut)
    assert np.array_equal(np.asarray(load_image(str(png))), astronaut)

    jpg = tmp_path / "astronaut.jpg"
    Image.fromarray(astronaut).save(jpg, quality=95)
    image = load_image(jpg)
    assert image.mode == "RGB" and image.size == (512, 512)
    assert np.abs(np.asarray(image).astype(int) - astronaut.astype(int)).mean() < 5

    from_bytes = load_image(jpg.read_bytes())
    assert np.array_equal(np.asarray(from_bytes), np.asarray(image))


def test_load_grayscale(tmp_path):
    camera = skdata.camera()  # 512x512 uint8
    path = tmp_path / "camera.png"
    Image.fromarray(camera).save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (512, 512)
    array = np.asarray(image)
    for c in range(3):
        assert np.array_equal(array[:, :, c], camera)
    assert load_image(camera).mode == "RGB"
    assert load_image(camera[:, :, None]).mode == "RGB"


def test_rgba_composited_on_white(tmp_path):
    rgba = np.zeros((4, 6, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red
    rgba[:, :3, 3] = 255  # left half opaque, right half transparent
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    for source in (path, rgba, Image.fromarray(rgba, mode="RGBA")):
        array = np.asarray(load_image(source))
        assert array.shape == (4, 6, 3)
        assert (array[:, :3] == [255, 0, 0]).all()
        assert (array[:, 3:] == [255, 255, 255]).all()


def test_palette_and_la_converted(tmp_path, astronaut):
    palette = Image.fromarray(astronaut).convert("P")
    path = tmp_path / "palette.png"
    palette.save(path)
    assert load_image(path).mode == "RGB"
    la = Image.fromarray(skdata.camera()).convert("LA")
    assert load_image(la).mode == "RGB"


def test_float_array(astronaut):
    image = load_image(astronaut.astype(np.float32) / 255.0)
    assert np.array_equal(np.asarray(image), astronaut)
    with pytest.raises(ImageError, match=r"expected values in \[0, 1\]"):
        load_image(astronaut.astype(np.float32))


def test_truncated_jpeg(tmp_path, astronaut):
    buffer = io.BytesIO()
    Image.fromarray(astronaut).save(buffer, format="JPEG", quality=95)
    path = tmp_path / "truncated.jpg"
    data = buffer.getvalue()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated") as info:
        load_image(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ImageError):
        load_image(data[: len(data) // 2])


def test_text_file_named_png(tmp_path):
    path = tmp_path / "x.png"
    path.write_text("this is not an image\n")
    with pytest.raises(ImageError, match="not an image") as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_missing_file_and_directory(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(ImageError, match="does not exist") as info:
        load_image(missing)
    assert str(missing) in str(info.value)
    with pytest.raises(ImageError, match="directory"):
        load_image(tmp_path)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        load_image(empty)


def test_zero_size():
    with pytest.raises(ImageError, match="zero size"):
        load_image(np.zeros((0, 10, 3), dtype=np.uint8))
    with pytest.raises(ImageError, match="zero size"):
        load_image(Image.new("RGB", (0, 10)))


def test_bad_array_shape_and_type():
    with pytest.raises(ImageError, match="shape"):
        load_image(np.zeros((4, 4, 2), dtype=np.uint8))
    with pytest.raises(ImageError, match="cannot load an image"):
        load_image(12345)


def test_max_pixels(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (200, 100)).save(path)
    with pytest.raises(ImageError, match="max_pixels"):
        load_image(path, max_pixels=10_000)
    assert load_image(path, max_pixels=20_000).size == (200, 100)


def test_decompression_bomb_mapped(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("RGB", (200, 100)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5_000)  # warning above 5,000, error above 10,000
    with pytest.raises(ImageError, match="too large"):
        load_image(path, max_pixels=None)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 15_000)  # 20,000 pixels: warning only
    with pytest.raises(ImageError, match="too large"):
        load_image(path, max_pixels=None)


def test_center_crop_geometry():
    width, height = 300, 200
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[:, 50:250] = 255  # the centred 200x200 square is white, the side strips black
    image = Image.fromarray(array)
    same = center_crop_resize(image, 200)
    assert same.size == (200, 200)
    assert np.asarray(same).min() == 255
    small = center_crop_resize(image, 64)
    assert small.size == (64, 64)
    assert np.asarray(small).min() >= 250

    # odd difference: offset is floor((w - s) / 2)
    marked = np.zeros((5, 8, 3), dtype=np.uint8)
    marked[:, 1] = 10  # column 1 is the first kept column for w=8, s=5 → offset (8-5)//2 = 1
    cropped = np.asarray(center_crop_resize(Image.fromarray(marked), 5))
    assert (cropped[:, 0] == 10).all() and (cropped[:, 1:] == 0).all()

    tall = center_crop_resize(Image.new("RGB", (100, 301)), 32)
    assert tall.size == (32, 32)


def test_tensor_round_trip(astronaut):
    image = Image.fromarray(astronaut)
    tensor = pil_to_tensor(image)
    assert tensor.dtype == torch.float32 and tensor.shape == (3, 512, 512)
    assert 0.0 <= tensor.min().item() and tensor.max().item() <= 1.0
    back = tensor_to_pil(tensor)
    assert np.array_equal(np.asarray(back), astronaut)
    assert tensor_to_pil(tensor[None]).size == (512, 512)


def test_to_uint8_rounding_and_clamp():
    values = np.array([-0.5, 0.0, 0.5 / 255, 0.5, 1.0, 2.0])
    assert to_uint8(values).tolist() == [0, 0, 0, 128, 255, 255]
    assert to_uint8(torch.tensor([0.2, 1.5])).tolist() == [51, 255]


def test_save_image_atomic(tmp_path, astronaut):
    target = tmp_path / "out" / "nested" / "image.png"
    written = save_image(Image.fromarray(astronaut), target)
    assert written == target and target.is_file()
    assert np.array_equal(np.asarray(load_image(target)), astronaut)
    assert [p.name for p in target.parent.iterdir()] == ["image.png"]  # no temporary files left
    save_image(Image.fromarray(astronaut[::-1]), target)  # overwrite
    assert np.array_equal(np.asarray(load_image(target)), astronaut[::-1])
    save_image(pil_to_tensor(Image.fromarray(astronaut)), tmp_path / "t.jpg")
    assert load_image(tmp_path / "t.jpg").size == (512, 512)


def test_save_image_failures(tmp_path):
    image = Image.new("RGB", (8, 8))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputPathError) as info:
        save_image(image, blocker / "sub" / "image.png")  # parent is a file
    assert "\n" not in str(info.value)
    with pytest.raises(OutputPathError, match="extension"):
        save_image(image, tmp_path / "image.unknownext")
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(OutputPathError, match="directory"):
        save_image(image, tmp_path / "dir.png")
