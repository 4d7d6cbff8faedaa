"""Atomic, verified folders: a saved checkpoint is either whole or absent, never half-written.

Saving writes into a temporary sibling (`.<name>.tmp-*`), hashes and fsyncs every file, writes `manifest.json`
(size + SHA-256 of every file) last, then renames the folder over the target (atomic on POSIX within one
filesystem). A crash at any point leaves the previous version intact plus, at worst, a stale temp folder that
nothing reads. Loading verifies the manifest, so a folder damaged after the fact (truncated copy, bit rot) is
refused with one clear line instead of failing deep inside torch.

Test hook: `SORTEDLLM_CRASH_DURING_SAVE=<n>[@<folder name>]` kills the process (SIGKILL) after n files of a save
are on disk, leaving the next file half-written; `enospc:<n>[@<name>]` raises "No space left on device" there
instead (a disk that fills during the save). Without `@name` the first save is hit.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import tempfile
from pathlib import Path

from .errors import SortedError

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "sortedllm-manifest"
CRASH_ENV = "SORTEDLLM_CRASH_DURING_SAVE"
TMP_MARK = ".tmp-"  # temp folders are `.<name>.tmp-<random>`: hidden, and never matched as checkpoint-N
CHUNK = 8 << 20
# errno values that are the user's environment, not a bug: reported as one line by the CLI.
USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EFBIG}


def _read_umask() -> int:
    mask = os.umask(0o22)  # the only way to read it is to set it: done once, at import
    os.umask(mask)
    return mask


UMASK = _read_umask()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(folder: Path) -> list[str]:
    """Every file below `folder` (relative, sorted), except the manifest itself."""
    out = []
    for root, _, files in os.walk(folder):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), folder)
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def _digest(path: Path, fsync: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
        if fsync:
            os.fsync(f.fileno())
    return h.hexdigest()


def _crash_hook(name: str) -> tuple[str, int] | None:
    """Parse the test hook for a save of folder `name`: (kind, n) or None."""
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return None
    spec, _, only = spec.partition("@")
    if only and only != name:
        return None
    kind, _, n = spec.rpartition(":")
    return (kind or "kill"), int(n)


def _crash(kind: str, path: Path) -> None:
    if kind == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    with open(path, "r+b") as f:  # leave this file half-written, as a write cut short would
        f.truncate(os.path.getsize(path) // 2)
    os.kill(os.getpid(), signal.SIGKILL)


def _seal(folder: Path, name: str, checksums: bool) -> dict:
    """fsync every file of a save (hashing it when `checksums`); the crash test hook fires here."""
    hook = _crash_hook(name)
    files = {}
    for i, rel in enumerate(_files(folder)):
        path = folder / rel
        if hook and i == hook[1]:
            _crash(hook[0], path)
        if checksums:
            files[rel] = {"size": path.stat().st_size, "sha256": _digest(path, fsync=True)}
        else:
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    return files


def write_manifest(folder: str | Path, meta: dict | None = None, name: str | None = None) -> dict:
    """Hash and fsync every file in `folder`, then write `manifest.json` (atomically, last)."""
    folder = Path(folder)
    files = _seal(folder, name or folder.name, checksums=True)
    manifest = {"format": MANIFEST_FORMAT, "version": 1, "files": files, **(meta or {})}
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest


def read_manifest(folder: str | Path) -> dict | None:
    """The folder's manifest, or None when it has none; a manifest that is not valid JSON counts as damage."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {"format": "malformed"}
    return manifest if isinstance(manifest, dict) else {"format": "malformed"}


def manifest_problem(folder: str | Path, require: bool = True) -> str | None:
    """What is wrong with a saved folder (missing, truncated or altered file), or None if it is whole."""
    folder = Path(folder)
    if not folder.is_dir():
        return "it does not exist"
    manifest = read_manifest(folder)
    if manifest is None:
        return f"it has no {MANIFEST} (the save did not finish, or it was not written by sortedllm)" if require \
            else None
    if manifest.get("format") != MANIFEST_FORMAT or not isinstance(manifest.get("files"), dict):
        return f"its {MANIFEST} is malformed"
    for rel, entry in manifest["files"].items():
        path = folder / rel
        if not path.is_file():
            return f"{rel} is missing"
        size = path.stat().st_size
        if size != entry.get("size"):
            return f"{rel} is truncated or altered ({size} bytes, {entry.get('size')} expected)"
        if _digest(path) != entry.get("sha256"):
            return f"{rel} does not match its checksum"
    return None


def verify_manifest(folder: str | Path, require: bool = True, fix: str = "re-save it or use another copy") -> dict:
    """Raise one clear line unless `folder` is whole; returns its manifest ({} if it has none and not required)."""
    problem = manifest_problem(folder, require)
    if problem:
        raise SortedError(f"{folder} is incomplete or corrupted: {problem}; {fix}")
    return read_manifest(folder) or {}


def writable_folder(folder: str | Path, flag: str = "--output_dir") -> Path:
    """Check, without creating anything, that `folder` can be created or written (fail before hours of work)."""
    folder = Path(folder).expanduser().absolute()
    probe = folder
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise SortedError(f"cannot create output folder {folder}: {probe} is a file; choose another {flag}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise SortedError(f"output folder {probe} is not writable; choose a writable {flag}")
    return folder


def _writable_parent(target: Path, flag: str = "--output_dir") -> Path:
    parent = target.parent
    writable_folder(parent, flag)
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SortedError(f"cannot create output folder {parent}: {e.strerror}; choose a writable {flag}")
    return parent


def io_problem(e: BaseException) -> str | None:
    """A one-line description of an environment I/O failure (disk full, read-only...), or None for a bug.
    safetensors' writer reports OS errors as SafetensorError text, so that is matched too."""
    if isinstance(e, OSError) and e.errno in USER_ERRNOS:
        return e.strerror or os.strerror(e.errno)
    text = str(e)
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        if f"os error {code})" in text or os.strerror(code) in text:
            return os.strerror(code)
    return None


@contextlib.contextmanager
def atomic_dir(target: str | Path, manifest: bool = True, meta: dict | None = None, flag: str = "--output_dir"):
    """Yield a temporary folder; on success it gets a manifest and replaces `target` atomically, on failure it is
    removed. `meta` is stored in the manifest (e.g. what run wrote a training checkpoint); `flag` is the option
    named in error messages."""
    target = Path(target)
    parent = _writable_parent(target, flag)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{target.name}{TMP_MARK}"))
    os.chmod(tmp, 0o777 & ~UMASK)  # mkdtemp makes it private; the result should look like any other folder
    try:
        yield tmp
        if manifest:
            write_manifest(tmp, meta, name=target.name)
        else:
            _seal(tmp, target.name, checksums=False)
        for root, _, _ in os.walk(tmp):
            _fsync_dir(Path(root))
        old = None
        if target.exists():
            old = parent / f".{target.name}.old-{os.getpid()}"
            target.rename(old)
        tmp.rename(target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        problem = io_problem(e) if isinstance(e, Exception) else None
        if problem:
            raise SortedError(f"could not write {target}: {problem}; nothing was written (free space or choose "
                              f"another {flag})") from e
        raise


def stale_temp_folders(folder: str | Path) -> list[Path]:
    """Temp folders left in `folder` by a save that was killed (safe to delete: nothing reads them)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.startswith(".") and (TMP_MARK in p.name or ".old-" in p.name))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a whole file or nothing: a temp file beside it, fsync, rename."""
    path = Path(path)
    parent = _writable_parent(path)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{path.name}{TMP_MARK}")
    try:
        os.chmod(tmp, 0o666 & ~UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        problem = io_problem(e) if isinstance(e, Exception) else None
        if problem:
            raise SortedError(f"could not write {path}: {problem}; free space or choose another location") from e
        raise


def check_model_folder(folder: str | Path, spec: str, trust_remote_code: bool = False) -> None:
    """Refuse, before any weight is read, a local model folder that is damaged or would need unsafe loading:
    a manifest that does not verify, pickle-only weights (unpickling can run code), or custom code without
    --trust_remote_code."""
    folder = Path(folder)
    if not folder.is_dir():
        return  # a hub id: transformers fetches safetensors only (use_safetensors=True)
    verify_manifest(folder, require=False, fix="re-save or re-copy it")
    names = {p.name for p in folder.iterdir()}
    if not any(n.endswith(".safetensors") or n.endswith(".safetensors.index.json") for n in names):
        pickles = sorted(n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl")))
        if pickles:
            raise SortedError(f"model folder {spec} has only pickle weights ({pickles[0]}); sortedllm loads "
                              "safetensors only because unpickling can run code: convert it, if you trust its "
                              "source, with transformers' save_pretrained")
    config = folder / "config.json"
    if not trust_remote_code and config.is_file():
        try:
            data = json.loads(config.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SortedError(f"{config} is not valid JSON ({e}); re-save or re-copy the model") from e
        if isinstance(data, dict) and data.get("auto_map"):
            from transformers import CONFIG_MAPPING

            if data.get("model_type") not in CONFIG_MAPPING:
                raise SortedError(f"model {spec} needs its own Python code (auto_map in config.json), which is "
                                  "not run by default; pass --trust_remote_code only if you trust its author")
