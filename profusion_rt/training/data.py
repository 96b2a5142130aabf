"""Training images: a dataset of square images grouped by subject, and the seeded (target, reference) sampler.

Every image goes through the reference preprocessing of the runtime (``load_image`` -> centre square crop ->
LANCZOS resize to the model's resolution, :func:`profusion_rt.core.image_io.center_crop_resize`) and becomes a
[0, 1] float tensor (3, R, R).

Subjects: a reference image and a target image are drawn from the same subject. ``from_folder`` with
``group_by_subject=True`` makes every sub-folder of the data folder one subject (``DIR/<subject>/*.jpg``;
images lying directly in ``DIR`` are each a subject of their own); without it every image is its own
subject, so the reference is the target itself (the official pre-training without a ``ref_img`` column).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from profusion_rt.core.image_io import center_crop_resize, load_image
from profusion_rt.training.errors import DatasetError

logger = logging.getLogger(__name__)

#: File name endings read as images; other files in a data folder are ignored (and logged).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")

#: Decoded images are kept in memory (as uint8) when the whole dataset needs at most this many bytes.
CACHE_LIMIT_BYTES = 768 * 2**20


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any printable parts (independent of Python's hash randomisation)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _to_uint8_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    square = center_crop_resize(load_image(image), resolution)
    return torch.from_numpy(np.asarray(square, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


class SubjectImageDataset:
    """Square training images at ``resolution`` with one subject name each.

    ``sources``: image paths (decoded when read, or all at construction when the dataset fits in
    :data:`CACHE_LIMIT_BYTES`) or in-memory images (PIL, arrays: prepared at construction). ``subjects``:
    one name per source (default: each image its own subject). ``dataset[i]`` is a float32 (3, R, R)
    tensor in [0, 1]; :meth:`pixels` stacks several.
    """

    def __init__(self, sources: Sequence, resolution: int, subjects: Sequence[str] | None = None,
                 cache: bool | None = None, root: Path | None = None):
        if len(sources) == 0:
            raise DatasetError("the training set has no images")
        if subjects is not None and len(subjects) != len(sources):
            raise DatasetError(f"{len(subjects)} subject names for {len(sources)} images")
        self.resolution = int(resolution)
        self.sources = list(sources)
        self.root = root
        self.subjects = [str(s) for s in subjects] if subjects is not None else [f"#{i}" for i in range(len(sources))]
        groups: dict[str, list[int]] = {}
        for i, s in enumerate(self.subjects):
            groups.setdefault(s, []).append(i)
        self._group = [groups[s] for s in self.subjects]
        if cache is None:
            cache = len(self.sources) * 3 * self.resolution**2 <= CACHE_LIMIT_BYTES
        in_memory = [not isinstance(s, (str, os.PathLike)) for s in self.sources]
        self._cache: dict[int, torch.Tensor] = {}
        for i, source in enumerate(self.sources):
            if cache or in_memory[i]:
                self._cache[i] = _to_uint8_tensor(source, self.resolution)  # ImageError names a bad file

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, resolution: int, group_by_subject: bool = False,
                    cache: bool | None = None) -> "SubjectImageDataset":
        """Every image file under ``folder`` (see :func:`list_images`)."""
        images, subjects = list_images(folder, group_by_subject)
        dataset = cls(images, resolution, subjects=subjects, cache=cache, root=Path(folder).expanduser())
        logger.info("dataset %s: %d images, %d subjects", folder, len(dataset), dataset.num_subjects)
        return dataset

    def __len__(self) -> int:
        return len(self.sources)

    @property
    def num_subjects(self) -> int:
        return len(set(self.subjects))

    def group(self, index: int) -> list[int]:
        """Indices of the images of ``index``'s subject (``index`` included)."""
        return self._group[index]

    def uint8(self, index: int) -> torch.Tensor:
        cached = self._cache.get(index)
        return cached if cached is not None else _to_uint8_tensor(self.sources[index], self.resolution)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.uint8(index).to(torch.float32).div_(255.0)

    def pixels(self, indices: Sequence[int]) -> torch.Tensor:
        return torch.stack([self[i] for i in indices])

    def fingerprint(self) -> str:
        """sha256 of the prepared content: pixels when in memory, else relative path and size of each file."""
        h = hashlib.sha256(f"resolution={self.resolution}".encode())
        for i, source in enumerate(self.sources):
            h.update(self.subjects[i].encode() + b"\0")
            if i in self._cache:
                h.update(self._cache[i].numpy().tobytes())
            else:
                path = Path(source)
                name = path.relative_to(self.root) if self.root is not None else path.name
                h.update(f"{name}:{path.stat().st_size}".encode())
        return h.hexdigest()


def list_images(folder: str | os.PathLike, group_by_subject: bool = False) -> tuple[list[Path], list[str] | None]:
    """Image files under ``folder`` (recursively, sorted by relative path; other files are ignored) and,
    with ``group_by_subject``, their subject names (the first sub-folder; files directly in ``folder`` are
    each a subject of their own).

    Every file's header is read, so a file that is not an image fails here, not hours into training:
    :class:`DatasetError` for a missing folder or one without images,
    :class:`~profusion_rt.core.errors.ImageError` naming the first file that cannot be read.
    """
    root = Path(folder).expanduser()
    if not root.exists():
        raise DatasetError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise DatasetError(f"data folder {root} is not a folder")
    try:
        files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    except OSError as exc:
        raise DatasetError(f"cannot list data folder {root}: {exc.strerror or exc}") from exc
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    if len(files) > len(images):
        logger.info("ignoring %d file(s) in %s that are not images by name", len(files) - len(images), root)
    if not images:
        raise DatasetError(f"data folder {root} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)})")
    for path in images:
        _check_header(path)
    if not group_by_subject:
        return images, None
    rel = [p.relative_to(root) for p in images]
    return images, [r.parts[0] if len(r.parts) > 1 else f"#{r}" for r in rel]


def _check_header(path: Path) -> None:
    """Cheap check that a file is an image (its header is read, not its pixels); ImageError otherwise."""
    try:
        with Image.open(path) as im:
            width, height = im.size
        if width > 0 and height > 0:
            return
    except Exception:  # noqa: BLE001 - load_image below gives the precise one-line message
        pass
    load_image(path)  # raises ImageError naming the file


class PairSampler:
    """Draws (target, reference) index pairs, deterministic given ``seed`` and resumable.

    Targets run through the dataset epoch by epoch, each epoch in the order of a permutation drawn from
    ``derive_seed(seed, "epoch", epoch)`` (so the state is just ``epoch`` and ``position``). The reference
    of each target is drawn with the run's generator from the target's subject group; with
    ``exclude_self`` the target itself is excluded when its group has other images.
    """

    def __init__(self, dataset: SubjectImageDataset, seed: int, exclude_self: bool):
        self.dataset = dataset
        self.seed = int(seed)
        self.exclude_self = bool(exclude_self)
        self.epoch = 0
        self.position = 0
        self._order: torch.Tensor | None = None

    def _epoch_order(self) -> torch.Tensor:
        if self._order is None:
            g = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", self.epoch))
            self._order = torch.randperm(len(self.dataset), generator=g)
        return self._order

    def next(self, batch: int, generator: torch.Generator) -> tuple[list[int], list[int]]:
        targets: list[int] = []
        while len(targets) < batch:
            order = self._epoch_order()
            targets.append(int(order[self.position]))
            self.position += 1
            if self.position == len(order):
                self.epoch, self.position, self._order = self.epoch + 1, 0, None
        references = []
        for t in targets:
            candidates = self.dataset.group(t)
            if self.exclude_self and len(candidates) > 1:
                candidates = [c for c in candidates if c != t]
            references.append(candidates[int(torch.randint(len(candidates), (1,), generator=generator))])
        return targets, references

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position, self._order = int(state["epoch"]), int(state["position"]), None
