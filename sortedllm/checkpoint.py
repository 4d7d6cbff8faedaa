"""Atomic writes: a saved folder or file is either whole or absent, never half-written.

Write into a temporary sibling, fsync every file and the folder, then rename over the target (rename is atomic
on POSIX within one filesystem). A crash at any point leaves the previous version intact.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from .errors import SortedError


def fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _writable_parent(target: Path) -> Path:
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SortedError(f"cannot create output folder {parent}: {e.strerror}; choose a writable --output_dir")
    if not os.access(parent, os.W_OK):
        raise SortedError(f"output folder {parent} is not writable; choose a writable --output_dir")
    return parent


@contextlib.contextmanager
def atomic_dir(target: str | Path):
    """Yield a temporary folder; on success it replaces `target` atomically, on failure it is removed."""
    target = Path(target)
    parent = _writable_parent(target)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{target.name}.tmp-"))
    try:
        yield tmp
        fsync_tree(tmp)
        old = None
        if target.exists():
            old = parent / f".{target.name}.old-{os.getpid()}"
            target.rename(old)
        tmp.rename(target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SortedError(f"could not write {target}: {e.strerror or e}; nothing was written") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    parent = _writable_parent(path)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
