"""Adapter sources: `Downloader.fetch(uri, staging)` puts an adapter's files in a staging folder.

One module per scheme (s3, gcs, http, hf, local) lists what to fetch; download.py downloads it with
ranged, retried GETs. Single-file archives are unpacked safely; sha256 is checked before anything
leaves staging.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import shutil
import tarfile
from pathlib import Path

import aiohttp

from loraplex.api.sources import InvalidSource, parse_source
from loraplex.api.types import FailureReason
from loraplex.archives import UnsafeArchive, safe_members
from loraplex.sources import hf, http, local
from loraplex.sources.download import (
    Progress,
    RemoteFile,
    SignFn,
    SourceError,
    TransferSettings,
    download_file,
    no_signing,
)
from loraplex.sources.gcs import GcsClient
from loraplex.sources.s3 import S3Client

__all__ = ["Downloader", "FetchResult", "Progress", "SourceError", "TransferSettings"]

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin", "model.lora_weights.npy")


@dataclasses.dataclass(frozen=True)
class FetchResult:
    size_bytes: int
    fingerprint: str | None  # file:// sources: changes when the source folder changes


class Downloader:
    def __init__(self, session: aiohttp.ClientSession, settings: TransferSettings | None = None,
                 s3: S3Client | None = None, store_root: Path | None = None):
        self.session = session
        self.settings = settings or TransferSettings()
        self.s3 = s3 or S3Client()  # the sidecar passes its settings' endpoint, region and addressing
        self.gcs = GcsClient(session)
        self.store_root = store_root

    async def fetch(self, uri: str, staging: Path, progress: Progress, budget_bytes: int | None = None,
                    sha256: str | None = None) -> FetchResult:
        try:
            ref = parse_source(uri)
        except InvalidSource as exc:
            raise SourceError(FailureReason.VALIDATION_FAILED, str(exc)) from None
        await asyncio.to_thread(staging.mkdir, parents=True, exist_ok=True)
        fingerprint = None
        if ref.scheme == "file":
            path = local.resolve(ref, self.store_root)
            _check_budget(await asyncio.to_thread(folder_size, path), budget_bytes)
            fingerprint = await asyncio.to_thread(local.fingerprint, path)
            files = [relative for relative, _ in await asyncio.to_thread(local.copy, path, staging, progress)]
        else:
            remote, sign = await self._list(ref)
            _check_budget(sum(f.size or 0 for f in remote), budget_bytes)
            for item in remote:
                if Path(item.relative_path).is_absolute() or ".." in Path(item.relative_path).parts:
                    raise SourceError(FailureReason.VALIDATION_FAILED,
                                      f"source lists an unsafe path {item.relative_path!r}")
            await asyncio.gather(*(download_file(self.session, item, staging / item.relative_path, progress,
                                                 self.settings, sign) for item in remote))
            files = [item.relative_path for item in remote]
        if sha256:
            await asyncio.to_thread(_verify_sha256, staging, files, sha256)
        if len(files) == 1 and files[0].endswith(ARCHIVE_SUFFIXES):
            await asyncio.to_thread(_unpack, staging / files[0], staging, budget_bytes)
        return FetchResult(size_bytes=await asyncio.to_thread(folder_size, staging), fingerprint=fingerprint)

    async def _list(self, ref) -> tuple[list[RemoteFile], SignFn]:  # type: ignore[no-untyped-def]
        if ref.scheme == "s3":
            return await self.s3.list_files(self.session, ref, self.settings), self.s3.sign
        if ref.scheme == "gs":
            return await self.gcs.list_files(ref, self.settings), self.gcs.sign
        if ref.scheme == "hf":
            return await hf.list_files(self.session, ref, self.settings), hf.sign
        if ref.scheme == "https":
            return await http.list_files(self.session, ref), http.sign
        return [], no_signing

    def local_fingerprint(self, uri: str) -> str | None:
        """Current fingerprint of a file:// source, or None when it is not one or is missing."""
        ref = parse_source(uri)
        if ref.scheme != "file":
            return None
        try:
            return local.fingerprint(local.resolve(ref, self.store_root))
        except SourceError:
            return None


def folder_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _check_budget(size: int, budget_bytes: int | None) -> None:
    if budget_bytes is not None and size > budget_bytes:
        raise SourceError(FailureReason.DISK_FULL, f"the adapter needs {size} bytes but only {max(budget_bytes, 0)} "
                                                   "are left under the PEFT volume's size limit")


def _verify_sha256(staging: Path, files: list[str], expected: str) -> None:
    candidates = files if len(files) == 1 else [f for f in files if Path(f).name in WEIGHT_FILES]
    if len(candidates) != 1:
        raise SourceError(FailureReason.CHECKSUM_MISMATCH,
                          "sha256 is set but the source has no single file or weights file to check it against")
    digest = hashlib.sha256()
    with (staging / candidates[0]).open("rb") as handle:
        while chunk := handle.read(8 * 1024 * 1024):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        raise SourceError(FailureReason.CHECKSUM_MISMATCH,
                          f"{candidates[0]} has sha256 {digest.hexdigest()}, not the expected {expected}")


def _unpack(archive_path: Path, staging: Path, budget_bytes: int | None) -> None:
    """Unpack a .tar/.tar.gz of the adapter folder with the same member checks as .nemo files."""
    limit = budget_bytes if budget_bytes is not None else 50 * 1024**3
    try:
        with tarfile.open(archive_path, "r:*") as archive:
            members = safe_members(archive, limit)
            archive.extractall(staging, members=members, filter="data")
    except UnsafeArchive as exc:
        raise SourceError(FailureReason.VALIDATION_FAILED, f"{archive_path.name}: {exc}") from None
    except tarfile.TarError as exc:
        raise SourceError(FailureReason.VALIDATION_FAILED, f"{archive_path.name}: not a readable tar ({exc})") from None
    archive_path.unlink()
    # An archive of one top folder is the adapter folder itself.
    entries = [p for p in staging.iterdir()]
    if len(entries) == 1 and entries[0].is_dir():
        inner = entries[0]
        for child in inner.iterdir():
            shutil.move(str(child), staging / child.name)
        inner.rmdir()
