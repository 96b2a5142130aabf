"""Training data: image folders, subject grouping, the seeded pair sampler, customization augmentations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from profusion_rt.errors import ImageError, InvalidParameterError
from profusion_rt.training.augment import (
    AugmentParams,
    affine_augment,
    augment_image,
    customization_images,
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


def test_affine_augment_fill_and_mask():
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    identity = AugmentParams(flip=False, degrees=0.0, translate=(0.0, 0.0), scale=1.0)
    same, mask = affine_augment(image, identity)
    assert torch.allclose(same, image, atol=1e-5) and not mask.any()
    flipped, _ = affine_augment(image, AugmentParams(True, 0.0, (0.0, 0.0), 1.0))
    assert torch.allclose(flipped, image.flip(-1), atol=1e-5)
    moved = AugmentParams(flip=False, degrees=0.0, translate=(0.25, 0.0), scale=1.0)  # 16 px to the right
    out, mask = affine_augment(image, moved, fill="mean")
    assert mask[0, :, :16].all() and not mask[0, :, 17:].any()
    assert torch.allclose(out[:, :, 20:], image[:, :, 4:48], atol=1e-5)
    assert torch.allclose(out[:, 10, 3], image.mean(dim=(1, 2)), atol=1e-5)  # uncovered: mean colour
    border, _ = affine_augment(image, moved, fill="border")
    assert torch.allclose(border[:, :, 3], image[:, :, 0], atol=1e-5)  # uncovered: nearest edge pixel
    with pytest.raises(InvalidParameterError):
        affine_augment(image, moved, fill="zeros")


def test_inpainter_fills_only_uncovered_pixels():
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1))
    params = AugmentParams(flip=False, degrees=10.0, translate=(0.1, -0.1), scale=0.7)
    calls = []

    def paint_red(img, mask):
        calls.append((img.size, mask.mode, np.asarray(mask).max()))
        return Image.new("RGB", img.size, (255, 0, 0))

    out = augment_image(image, params, inpainter=paint_red)
    plain, mask = affine_augment(image, params)
    assert calls == [((32, 32), "L", 255)]
    m = mask[0].bool()
    assert torch.equal(out[:, ~m], plain[:, ~m])
    assert torch.equal(out[0, m], torch.ones(int(m.sum()))) and not out[1:, m].any()


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
