"""Training data: image folders, subject grouping, the seeded pair sampler, customization augmentations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from profusion_rt.core.errors import ImageError, InvalidParameterError
from profusion_rt.training.augment import (
    AugmentParams,
    affine_augment,
    augment_image,
    blanked_augmentation,
    customization_images,
    face_box_mask,
    fill_augmentation,
    notebook_resize_crop,
    sample_params,
)
from profusion_rt.training.data import PairSampler, SubjectImageDataset, list_images
from profusion_rt.training.errors import DatasetError


def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_folder_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        list_images(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(DatasetError, match="holds no images"):
        list_images(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(ImageError, match="broken.png"):
        list_images(tmp_path)


def test_folder_dataset_groups_and_pixels(tmp_path):
    _save(tmp_path / "cat" / "a.png", skdata.chelsea())
    _save(tmp_path / "cat" / "b.jpg", skdata.chelsea()[:, ::-1].copy())
    _save(tmp_path / "rocket.png", skdata.rocket())
    flat = SubjectImageDataset.from_folder(tmp_path, 64)
    assert len(flat) == 3 and flat.num_subjects == 3
    grouped = SubjectImageDataset.from_folder(tmp_path, 64, group_by_subject=True)
    assert grouped.num_subjects == 2
    assert grouped.group(0) == [0, 1] and grouped.group(2) == [2]
    x = grouped[2]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and 0.0 <= float(x.min()) <= float(x.max()) <= 1.0
    lazy = SubjectImageDataset.from_folder(tmp_path, 64, cache=False)
    assert torch.equal(lazy[1], flat[1])


def test_pair_sampler_epochs_references_and_resume():
    ds = SubjectImageDataset([skdata.chelsea(), skdata.coffee(), skdata.rocket()], 32, subjects=["a", "a", "b"])
    sampler = PairSampler(ds, seed=3, exclude_self=True)
    g = torch.Generator().manual_seed(0)
    targets, refs = sampler.next(3, g)
    assert sorted(targets) == [0, 1, 2]  # one epoch is a permutation
    for t, r in zip(targets, refs):
        assert r == (t if t == 2 else 1 - t)  # the other image of the subject; itself when alone
    state, g_state = sampler.state_dict(), g.get_state()
    expected = [sampler.next(2, g) for _ in range(3)]
    again = PairSampler(ds, seed=3, exclude_self=True)
    again.load_state_dict(state)
    g.set_state(g_state)
    assert [again.next(2, g) for _ in range(3)] == expected


def test_affine_is_torchvisions_nearest_affine():
    """Checked against the transform's definition (torchvision ``affine`` on a tensor, NEAREST, fill 0):
    identity, flip, whole-pixel translation, a 90 degree counter-clockwise rotation, a 0.5 scale about the
    centre."""
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0)) + 0.1
    assert torch.equal(affine_augment(image, AugmentParams(False, 0.0, (0, 0), 1.0)), image)
    assert torch.equal(affine_augment(image, AugmentParams(True, 0.0, (0, 0), 1.0)), image.flip(-1))
    moved = affine_augment(image, AugmentParams(False, 0.0, (16, -8), 1.0))  # 16 px right, 8 px up
    assert torch.equal(moved[:, :56, 16:], image[:, 8:, :48])
    assert not moved[:, :, :16].any() and not moved[:, 56:, :].any()  # fill 0
    rotated = affine_augment(image, AugmentParams(False, 90.0, (0, 0), 1.0))
    assert torch.equal(rotated, torch.rot90(image, 1, dims=(1, 2)))  # counter-clockwise, as torchvision
    half = affine_augment(image, AugmentParams(False, 0.0, (0, 0), 0.5))
    assert not half[:, :16].any() and not half[:, :, 48:].any() and half[:, 16:48, 16:48].all()  # centred


def test_sample_params_are_the_notebooks_ranges():
    g = torch.Generator().manual_seed(0)
    draws = [sample_params(g, 512) for _ in range(400)]
    assert all(-10 <= d.degrees <= 10 and 0.6 <= d.scale <= 1.0 for d in draws)
    assert all(isinstance(v, int) and abs(v) <= 102 for d in draws for v in d.translate)  # 0.2 * 512 = 102.4
    assert max(abs(d.translate[0]) for d in draws) > 90 and 0.3 < sum(d.flip for d in draws) / 400 < 0.7


def test_face_box_and_blank_mask():
    box = face_box_mask(512)
    assert box[0, 30:460, 100:400].all() and box.sum() == 430 * 300
    small = face_box_mask(256)
    assert small[0, 15:230, 50:200].all() and small.sum() == 215 * 150
    image = torch.zeros(3, 256, 256)  # black pixels are not blank: the notebook offsets by 1e-5 first
    moved, blank = blanked_augmentation(image, AugmentParams(False, 0.0, (0, 0), 1.0))
    assert torch.equal(blank, 1 - small)
    moved, blank = blanked_augmentation(image, AugmentParams(False, 0.0, (20, 0), 1.0))
    assert blank[0, 15:230, 70:220].sum() == 0 and blank[0, 15:230, 50:70].all()


def test_fallback_fills_every_pixel_and_inpainter_gets_the_blank_area():
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1)) + 0.05
    params = AugmentParams(flip=False, degrees=10.0, translate=(6, -6), scale=0.7)
    border = fill_augmentation(image, params, "border")
    assert (border > 0.04).all()  # no blank pixel left
    mean = fill_augmentation(image, params, "mean")
    _, blank = blanked_augmentation(image, params, box=None)
    assert torch.allclose(mean[:, blank[0].bool()], image.mean(dim=(1, 2))[:, None].expand(3, int(blank.sum())))
    with pytest.raises(InvalidParameterError):
        fill_augmentation(image, params, "zeros")

    calls = []

    def paint_red(img, mask):
        calls.append((img.size, mask.mode, np.asarray(mask)))
        return Image.new("RGB", (32, 32), (255, 0, 0))  # another size: resized to the input's

    out = augment_image(image, params, inpainter=paint_red)
    expected = blanked_augmentation(image, params)[1][0].numpy() * 255
    assert len(calls) == 1 and calls[0][:2] == ((64, 64), "L") and np.array_equal(calls[0][2], expected)
    assert out.shape == (3, 64, 64) and torch.equal(out[0], torch.ones(64, 64)) and not out[1:].any()


def test_notebook_resize_crop():
    wide = Image.fromarray(np.random.default_rng(0).integers(0, 255, (100, 300, 3), dtype=np.uint8))
    out = notebook_resize_crop(wide, 50)
    expected = wide.resize((150, 50), Image.Resampling.BILINEAR).crop((50, 0, 100, 50))
    assert out.size == (50, 50) and np.array_equal(np.asarray(out), np.asarray(expected))


def test_customization_images_seeded():
    photo = skdata.chelsea()
    a = customization_images(photo, 64, count=4, seed=5)
    b = customization_images(photo, 64, count=4, seed=5)
    c = customization_images(photo, 64, count=4, seed=6)
    assert len(a) == 5 and all(im.size == (64, 64) and im.mode == "RGB" for im in a)
    arrays = [np.asarray(im) for im in a]
    assert all(np.array_equal(x, np.asarray(y)) for x, y in zip(arrays, b))
    assert not all(np.array_equal(x, np.asarray(y)) for x, y in zip(arrays[1:], c[1:]))
    assert all(not np.array_equal(arrays[0], x) for x in arrays[1:])
    with pytest.raises(InvalidParameterError):
        customization_images(photo, 64, count=-1)
