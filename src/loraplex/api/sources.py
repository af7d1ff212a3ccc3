"""Adapter source URIs: parsed once, with one clear sentence for each way a URI can be wrong."""

from __future__ import annotations

import dataclasses
import functools
import re
from urllib.parse import urlparse

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-_]{1,221}[a-z0-9]$")
_HF_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class InvalidSource(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class SourceRef:
    scheme: str  # s3, gs, https, hf, file
    location: str  # bucket, host, org/repo; empty for file
    path: str  # key prefix, URL path, subfolder, absolute path
    revision: str | None = None  # hf only
    uri: str = ""


@functools.lru_cache(maxsize=65536)  # pure, and asked again for every adapter on every adapter-set render
def parse_source(uri: str) -> SourceRef:
    parsed = urlparse(uri)
    scheme = parsed.scheme
    if scheme in ("s3", "gs"):
        bucket, key = parsed.netloc, parsed.path.lstrip("/")
        if not _BUCKET.match(bucket):
            raise InvalidSource(f"source {uri!r}: {bucket!r} is not a valid bucket name")
        if not key:
            raise InvalidSource(f"source {uri!r}: name the adapter's object or prefix after the bucket")
        return SourceRef(scheme, bucket, key, uri=uri)
    if scheme == "https":
        if not parsed.hostname:
            raise InvalidSource(f"source {uri!r}: an https source needs a host")
        if not parsed.path.strip("/"):
            raise InvalidSource(f"source {uri!r}: an https source needs a path to the adapter file")
        if parsed.username or parsed.password:
            raise InvalidSource(f"source {uri!r}: put credentials in the storage Secret, not in the URI")
        return SourceRef(scheme, parsed.netloc, parsed.path + (f"?{parsed.query}" if parsed.query else ""), uri=uri)
    if scheme == "hf":
        org, _, rest = uri[len("hf://"):].partition("/")
        repo_and_revision, _, subfolder = rest.partition("/")
        name, at, revision = repo_and_revision.partition("@")
        repo = f"{org}/{name}"
        if not _HF_REPO.match(repo):
            raise InvalidSource(f"source {uri!r}: expected hf://org/repo[@revision][/subfolder]")
        if at and not revision:
            raise InvalidSource(f"source {uri!r}: '@' must be followed by a revision")
        return SourceRef(scheme, repo, subfolder, revision or None, uri=uri)
    if scheme == "file":
        if parsed.netloc:
            raise InvalidSource(f"source {uri!r}: file URIs take an absolute path, as in file:///store/math")
        path = parsed.path
        if not path.startswith("/") or path == "/" or ".." in path.split("/"):
            raise InvalidSource(f"source {uri!r}: file URIs need an absolute path without '..'")
        return SourceRef(scheme, "", path.rstrip("/"), uri=uri)
    raise InvalidSource(f"source {uri!r}: scheme must be one of s3, gs, https, hf or file")
