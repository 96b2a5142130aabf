"""Atomic file-system writes: the one place where the package writes a file or a folder so that a reader
(or a crash, or Ctrl-C) never sees it half-written.

A file is written to a temporary sibling (``.<name>.<random>.tmp``, same folder, hence same file system),
flushed to disk and renamed over its destination with ``os.replace``; an existing file of that name stays
intact until the new one is complete, and the temporary file is removed on any failure. A folder is
assembled in a staging folder and renamed into place (:func:`replace_dir`, :func:`move_into_place`).
``OSError`` becomes :class:`~profusion_rt.core.errors.OutputPathError` (one line naming the path).

New files get the permissions an ordinary ``open(path, "w")`` would give (0o666 less the umask).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from profusion_rt.core.errors import OutputPathError

__all__ = [
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "file_mode",
    "fsync_path",
    "json_default",
    "move_into_place",
    "replace_dir",
    "staging_dir",
]


def file_mode() -> int:
    """0o666 less the process umask: what a plain ``open(..., "w")`` would give (mkstemp gives 0o600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a folder (a folder's entry list, after a rename); silently skipped where the file
    system does not support it."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _reason(exc: BaseException) -> str:
    text = " ".join(str(getattr(exc, "strerror", None) or exc).split())
    return text or type(exc).__name__


def _temp_sibling(target: Path) -> Path:
    """Create (exclusively, mode 0o666 less the umask) and return a fresh temporary file beside ``target``."""
    while True:
        temp = target.parent / f".{target.name}.{secrets.token_hex(6)}.tmp"
        try:
            os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return temp
        except FileExistsError:
            continue


def atomic_write(path: str | os.PathLike, writer: Callable[[Path], None], *, what: str | None = None,
                 errors: tuple[type[BaseException], ...] = (OSError,)) -> Path:
    """Write ``path`` atomically: ``writer(temp)`` writes the whole content to ``temp``, a fresh empty file
    beside ``path``; it is then fsynced and renamed over ``path``. On any exception the temporary file is
    removed and ``path`` is left as it was; an exception of a type in ``errors`` (``OSError`` by default)
    becomes :class:`OutputPathError` ``"cannot write [<what> to ]<path>: <reason>"``, others propagate as
    they are. The parent folder is created. Returns ``path`` as a :class:`Path`."""
    target = Path(path)
    label = f"{what} to {target}" if what else str(target)
    temp: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = _temp_sibling(target)
        writer(temp)
        with open(temp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(temp, target)
        temp = None
    except errors as exc:
        if isinstance(exc, OutputPathError):
            raise
        raise OutputPathError(f"cannot write {label}: {_reason(exc)}") from exc
    finally:
        if temp is not None:
            with contextlib.suppress(OSError):
                temp.unlink()
    fsync_path(target.parent)
    return target


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_write`)."""

    def write(temp: Path) -> None:
        with open(temp, "wb") as fh:
            fh.write(data)

    return atomic_write(path, write)


def json_default(obj: Any) -> Any:
    """``json.dumps`` fallback: sets as sorted lists, paths as strings, arrays/tensors as lists, else ``str``."""
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as JSON (indent 2, sorted keys, final newline, :func:`json_default`) atomically."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=json_default) + "\n").encode())


@contextlib.contextmanager
def staging_dir(parent: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder inside ``parent`` (same file system, so its files can be renamed into place),
    removed afterwards whatever happens."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".staging-", dir=parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def move_into_place(files: Mapping[Path, Path]) -> None:
    """Rename staged files (src -> dst) in order; put data files before the model file that names them."""
    for src, dst in files.items():
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)
    for parent in {dst.parent for dst in files.values()}:
        fsync_path(parent)


def replace_dir(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Replace the folder ``dst`` (if any) by the finished folder ``src`` with renames, removing the old one
    last: ``dst`` is at every moment either the old folder or the new one. Returns ``dst``."""
    src, dst = Path(src), Path(dst)
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{secrets.token_hex(4)}"
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)
    fsync_path(dst.parent)
    return dst
