"""https:// sources: one file (a .nemo, or a .tar / .tar.gz of the adapter folder), optional bearer token."""

from __future__ import annotations

import os
from pathlib import PurePosixPath

import aiohttp

from loraplex.api.sources import SourceRef
from loraplex.api.types import FailureReason
from loraplex.sources.download import RemoteFile, SourceError

SINGLE_FILE_SUFFIXES = (".nemo", ".tar", ".tar.gz", ".tgz")


def single_file_name(path: str, uri: str) -> str:
    name = PurePosixPath(path.split("?", 1)[0]).name
    if not name.endswith(SINGLE_FILE_SUFFIXES):
        raise SourceError(FailureReason.VALIDATION_FAILED,
                          f"source {uri.split('?', 1)[0]!r} must name a .nemo file or a .tar/.tar.gz archive of "
                          "the adapter folder")
    return name


async def sign(method: str, url: str, headers: dict[str, str]) -> dict[str, str]:
    token = os.environ.get("HTTP_BEARER_TOKEN")
    return {**headers, "Authorization": f"Bearer {token}"} if token else headers


async def list_files(session: aiohttp.ClientSession, ref: SourceRef) -> list[RemoteFile]:
    return [RemoteFile(ref.uri, single_file_name(ref.path, ref.uri))]
