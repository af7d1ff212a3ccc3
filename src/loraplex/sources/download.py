"""What every source scheme shares: errors with a reason, progress, and one ranged HTTP downloader."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import os
import random
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import aiohttp

from loraplex.api.types import FailureReason

logger = logging.getLogger(__name__)
T = TypeVar("T")
SignFn = Callable[[str, str, dict[str, str]], Awaitable[dict[str, str]]]  # (method, url, headers) -> headers


class SourceError(Exception):
    """A download that did not succeed; `transient` ones are worth retrying."""

    def __init__(self, reason: FailureReason, message: str, transient: bool = False):
        super().__init__(message)
        self.reason, self.message, self.transient = reason, message, transient


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    """One file of an adapter: where to GET it and where it goes, relative to the adapter folder."""

    url: str
    relative_path: str
    size: int | None = None


class Progress:
    """Bytes done out of bytes expected, shared by every file of one adapter."""

    def __init__(self, on_change: Callable[[int, int], None] | None = None):
        self.done = 0
        self.total = 0
        self._on_change = on_change

    def expect(self, size: int) -> None:
        self.total += size
        self._notify()

    def advance(self, size: int) -> None:
        self.done += size
        self._notify()

    def _notify(self) -> None:
        if self._on_change is not None:
            self._on_change(self.done, self.total)


@dataclasses.dataclass(frozen=True)
class TransferSettings:
    part_size: int = 16 * 1024 * 1024
    first_part_size: int = 2 * 1024 * 1024  # small, so the parallel ranges start soon after the size is known
    parallel_parts: int = 8
    attempts: int = 5
    read_chunk: int = 1024 * 1024
    backoff_seconds: float = 0.5


async def no_signing(method: str, url: str, headers: dict[str, str]) -> dict[str, str]:
    return headers


def classify_status(status: int, url: str, body: str = "") -> SourceError:
    code = re.search(r"<Code>([A-Za-z]+)</Code>", body)  # S3 and GCS XML errors name the cause
    detail = f" {code.group(1)}" if code else ""
    if status == 404:
        return SourceError(FailureReason.SOURCE_NOT_FOUND, f"{_safe(url)} does not exist (404{detail})")
    if status in (401, 403):
        return SourceError(FailureReason.ACCESS_DENIED, f"access to {_safe(url)} was denied ({status}{detail}); "
                                                        "check the storage credentials")
    transient = status in (408, 429) or status >= 500
    return SourceError(FailureReason.DOWNLOAD_FAILED, f"{_safe(url)} answered HTTP {status}", transient=transient)


def _safe(url: str) -> str:
    """A URL fit for status and logs: no query string (it may carry a signature or a token)."""
    return url.split("?", 1)[0]


async def with_retries(what: str, attempt: Callable[[], Awaitable[T]], settings: TransferSettings) -> T:
    """Run `attempt` until it succeeds, retrying transient failures with jittered exponential backoff."""
    for number in range(1, settings.attempts + 1):
        try:
            return await attempt()
        except SourceError as exc:
            if not exc.transient or number == settings.attempts:
                raise
            error: Exception = exc
        except aiohttp.ClientConnectorCertificateError as exc:
            raise SourceError(FailureReason.DOWNLOAD_FAILED, f"{what}: the server's TLS certificate is not trusted "
                              f"({exc.certificate_error}); add its CA to SSL_CERT_FILE") from None
        except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
            if number == settings.attempts:
                raise SourceError(FailureReason.DOWNLOAD_FAILED,
                                  f"{what} failed after {number} attempts: {type(exc).__name__}: {exc}",
                                  transient=True) from None
            error = exc
        delay = settings.backoff_seconds * 2 ** (number - 1) * (0.5 + random.random())
        logger.warning("%s failed (%s); attempt %d of %d in %.1fs", what, error, number + 1, settings.attempts,
                       delay)
        await asyncio.sleep(delay)
    raise AssertionError("unreachable")


def _write_at(fd: int, data: bytes, offset: int) -> None:
    try:
        view = memoryview(data)
        while view:
            written = os.pwrite(fd, view, offset)
            view, offset = view[written:], offset + written
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise SourceError(FailureReason.DISK_FULL, "the adapter volume is full") from None
        raise


async def download_file(session: aiohttp.ClientSession, remote: RemoteFile, destination: Path,
                        progress: Progress, settings: TransferSettings, sign: SignFn = no_signing) -> None:
    """GET one file into `destination`, in parallel ranges when it is large and the server allows it.

    Each range is retried on its own, so an outage mid-download costs only the unfinished ranges. When
    the size is not known up front, the first range doubles as the probe: no extra request.
    """
    destination.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        size = remote.size
        first_end = 0
        if size is None:
            size, ranges_ok = await with_retries(
                f"GET {_safe(remote.url)}", lambda: _first_part(session, remote.url, fd, progress, sign, settings),
                settings)
            if not ranges_ok:
                return  # the server sent the whole file in answer to the first request
            first_end = min(settings.first_part_size, size)
        else:
            progress.expect(size)
        if size > 0:
            os.ftruncate(fd, size)
        ranged = first_end > 0 or size > settings.part_size
        if ranged:
            parts = [(start, min(start + settings.part_size, size))
                     for start in range(first_end, size, settings.part_size)]
        else:
            parts = [(0, size)] if size > 0 else []
        limit = asyncio.Semaphore(settings.parallel_parts)

        async def fetch_part(start: int, end: int) -> None:
            async with limit:
                await with_retries(f"GET {_safe(remote.url)} bytes {start}-{end - 1}",
                                   lambda: _get_range(session, remote.url, fd, start, end, size, progress, sign,
                                                      settings, ranged=ranged),
                                   settings)

        await asyncio.gather(*(fetch_part(start, end) for start, end in parts))
    finally:
        os.close(fd)


async def _first_part(session: aiohttp.ClientSession, url: str, fd: int, progress: Progress, sign: SignFn,
                      settings: TransferSettings) -> tuple[int, bool]:
    """GET the first part with a Range header: (file size, whether the server honours ranges)."""
    headers = await sign("GET", url, {"Range": f"bytes=0-{settings.first_part_size - 1}"})
    async with session.get(url, headers=headers) as response:
        if response.status == 206:
            size = int(response.headers.get("Content-Range", "").rpartition("/")[2])
            ranges_ok = True
        elif response.status == 200:
            length = response.headers.get("Content-Length")
            if length is None:
                raise SourceError(FailureReason.DOWNLOAD_FAILED, f"{_safe(url)} does not say how large it is")
            size, ranges_ok = int(length), False
        elif response.status == 416:
            return 0, False
        else:
            raise classify_status(response.status, url)
        progress.expect(size)
        end = min(settings.first_part_size, size) if ranges_ok else size
        try:
            await _stream_into(response, fd, 0, end, size, url, progress, settings)
        except BaseException:
            progress.expect(-size)
            raise
        return size, ranges_ok


async def _get_range(session: aiohttp.ClientSession, url: str, fd: int, start: int, end: int, size: int,
                     progress: Progress, sign: SignFn, settings: TransferSettings, ranged: bool) -> None:
    if end <= start:
        return
    headers = await sign("GET", url, {"Range": f"bytes={start}-{end - 1}"} if ranged else {})
    async with session.get(url, headers=headers) as response:
        if response.status not in (200, 206):
            raise classify_status(response.status, url, (await response.content.read(4096)).decode(errors="replace"))
        await _stream_into(response, fd, start, end, size, url, progress, settings)


async def _stream_into(response: aiohttp.ClientResponse, fd: int, start: int, end: int, size: int, url: str,
                       progress: Progress, settings: TransferSettings) -> None:
    """Write a response body at [start, end) of the file, in large writes off the event loop."""
    offset = start
    pending = bytearray()

    async def flush() -> None:
        nonlocal offset
        await asyncio.to_thread(_write_at, fd, bytes(pending), offset)
        offset += len(pending)
        progress.advance(len(pending))
        pending.clear()

    try:
        async for chunk in response.content.iter_any():
            if offset + len(pending) + len(chunk) > end:
                raise SourceError(FailureReason.DOWNLOAD_FAILED, f"{_safe(url)} sent more than {size} bytes")
            pending += chunk
            if len(pending) >= settings.read_chunk:
                await flush()
        if pending:
            await flush()
        if offset != end:
            raise SourceError(FailureReason.DOWNLOAD_FAILED, f"{_safe(url)} ended after {offset - start} of "
                                                             f"{end - start} bytes", transient=True)
    except BaseException:
        progress.advance(start - offset)  # this range starts over: take back what it counted
        raise


async def get_body(session: aiohttp.ClientSession, url: str, sign: SignFn, what: str,
                   settings: TransferSettings) -> bytes:
    """GET a small document (a listing), retried; `what` names the source in errors."""

    async def attempt() -> bytes:
        async with session.get(url, headers=await sign("GET", url, {})) as response:
            if response.status != 200:
                raise classify_status(response.status, what)
            return await response.read()

    return await with_retries(f"list {what}", attempt, settings)
