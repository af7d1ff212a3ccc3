"""file:// sources: a folder or file on a volume mounted into the sidecar (an adapter store PVC)."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from loraplex.api.sources import SourceRef
from loraplex.api.types import FailureReason
from loraplex.sources.download import Progress, SourceError


def resolve(ref: SourceRef, store_root: Path | None) -> Path:
    if store_root is None:
        raise SourceError(FailureReason.SOURCE_NOT_FOUND, f"{ref.uri}: no adapter store is mounted in this pod")
    path = Path(ref.path)
    try:
        path.resolve().relative_to(store_root.resolve())
    except ValueError:
        raise SourceError(FailureReason.ACCESS_DENIED, f"{ref.uri} is outside the adapter store {store_root}") from None
    if not path.exists():
        raise SourceError(FailureReason.SOURCE_NOT_FOUND, f"{ref.uri} does not exist (yet); loraplex picks it up as "
                                                          "soon as it appears")
    return path


def _files(path: Path) -> list[tuple[Path, str]]:
    if path.is_file():
        return [(path, path.name)]
    found = []
    for root, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if not name.startswith("."):
                full = Path(root) / name
                found.append((full, str(full.relative_to(path))))
    return found


def fingerprint(path: Path) -> str:
    """Changes whenever a file under `path` is added, removed, resized or rewritten."""
    digest = hashlib.sha256()
    for full, relative in _files(path):
        stat = full.stat()
        digest.update(f"{relative}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def copy(path: Path, staging: Path, progress: Progress) -> list[tuple[str, int]]:
    """Copy the adapter's files into staging (blocking: run it in a thread). Returns (relative path, size)."""
    files = _files(path)
    copied = []
    for full, _ in files:
        progress.expect(full.stat().st_size)
    for full, relative in files:
        target = staging / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copyfile(full, target)
        except OSError as exc:
            if exc.errno == 28:
                raise SourceError(FailureReason.DISK_FULL, "the adapter volume is full") from None
            raise
        size = target.stat().st_size
        progress.advance(size)
        copied.append((relative, size))
    if not copied:
        raise SourceError(FailureReason.SOURCE_NOT_FOUND, f"{path} holds no files")
    return copied
