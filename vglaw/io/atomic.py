"""Outputs written whole or not at all.

Every file vglaw writes (checkpoints, model folders, overlays, JSON, metrics) goes to a
temporary name in the destination's folder and is renamed into place, so a full disk, a crash
or two processes writing the same path never leave a truncated or interleaved file that looks
valid: a reader sees the old file or the new one.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from PIL import Image

from vglaw.errors import UsageError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file next to `path`; on success flush, fsync and rename it onto `path`.

    On any exception the temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; the result should read as any new file
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: str | Path, text: str) -> Path:
    with atomic_write(path, "w") as f:
        f.write(text)
    return Path(path)


def save_image(image, path: str | Path, **kwargs) -> Path:
    """Save a PIL image atomically, in the format its extension names."""
    path = Path(path)
    fmt = image_format(path)
    with atomic_write(path) as f:
        image.save(f, format=fmt, **kwargs)
    return path


def image_format(path: str | Path) -> str:
    """The PIL format an output path's extension names.

    Raises:
        ValueError: no extension PIL can write.
    """
    Image.init()
    ext = Path(path).suffix.lower()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None or fmt not in Image.SAVE:
        raise ValueError(f"{path}: not an image file name (use .png or .jpg)")
    return fmt


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """A temporary folder next to `path`, put in place of `path` when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
            os.rmdir(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (links and relative spellings included)."""
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return os.path.abspath(a) == os.path.abspath(b)


def check_output(path: str | Path, inputs: list[Path] = (), kind: str = "file", flag: str = "--out",
                 outputs: dict[str, Path] | None = None, overwrite: bool = False) -> Path:
    """Refuse an output path before any work starts, in one line naming `flag`: a folder where a
    file goes (or a file where a folder goes, `kind="dir"`), an input of the run or a folder
    holding one (`inputs`), another output of the same run (`outputs`, by flag), an existing
    output without `overwrite`, a place under a file or not writable, or (`kind="image"`) a
    name without an image extension."""
    path = Path(path).expanduser()
    if kind == "dir":
        if path.exists() and not path.is_dir():
            raise UsageError(f"{flag} {path} is a file; a folder is written there")
    elif path.is_dir():
        example = path / ("overlay.png" if kind == "image" else "out")
        raise UsageError(f"{flag} {path} is a folder; give a file name (e.g. {example})")
    if kind == "image":
        try:
            image_format(path)
        except ValueError as err:
            raise UsageError(f"{flag} {err}") from err
    for src in inputs:
        src = Path(src).expanduser()
        if _same_file(path, src) or (kind == "dir" and path.is_dir() and src.exists()
                                     and Path(os.path.abspath(src)).is_relative_to(os.path.abspath(path))):
            raise UsageError(f"{flag} {path} is an input of this run ({src}) or holds it; writing there would "
                             "destroy it")
    for other_flag, other in (outputs or {}).items():
        if _same_file(path, Path(other).expanduser()):
            raise UsageError(f"{flag} {path} is also {other_flag}; give each output its own name")
    if path.exists() and not overwrite:
        raise UsageError(f"{flag} {path} exists; add --overwrite to replace it, or give another name")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{flag} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"cannot write {path}: {parent} is not writable")
    return path


def free_name(path: str | Path) -> Path:
    """`path`, or the first of `stem-2.ext`, `stem-3.ext`, ... that does not exist: where an
    output the user did not name goes, so a default name never replaces an earlier result."""
    path = Path(path)
    k = 2
    candidate = path
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}-{k}{path.suffix}")
        k += 1
    return candidate


def slug(path: str | Path) -> str:
    """A file-name-safe, collision-free stem for an input path: its stem and a short hash of the
    full path, so two `photo.jpg` in different folders get different outputs."""
    path = Path(path)
    digest = hashlib.sha1(str(path.expanduser().resolve()).encode()).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', path.stem)[:60]}-{digest}"
