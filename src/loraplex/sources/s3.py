"""s3:// sources on AWS or any S3-compatible endpoint, signed with SigV4 by botocore's signer.

Credentials come from botocore's usual chain: environment (a Secret mounted as env), shared config,
web identity tokens (EKS IRSA / pod identity) and instance metadata. Objects are listed with
ListObjectsV2 and fetched with parallel ranged GETs.
"""

from __future__ import annotations

import asyncio
import os
import xml.etree.ElementTree as ElementTree
from urllib.parse import quote, urlencode

import aiohttp
import botocore.session
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest

from loraplex.api.sources import SourceRef
from loraplex.api.types import FailureReason
from loraplex.sources.download import RemoteFile, SourceError, TransferSettings, get_body

_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


class S3Client:
    def __init__(self, endpoint: str | None = None, region: str | None = None, force_path_style: bool = False):
        self.region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        self.endpoint = (endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
                         or f"https://s3.{self.region}.amazonaws.com").rstrip("/")
        self.force_path_style = force_path_style
        self._session = botocore.session.Session()

    def object_url(self, bucket: str, key: str = "") -> str:
        path = quote(key, safe="/~")
        if self.force_path_style or "." in bucket:
            return f"{self.endpoint}/{bucket}/{path}"
        scheme, _, host = self.endpoint.partition("://")
        return f"{scheme}://{bucket}.{host}/{path}"

    async def sign(self, method: str, url: str, headers: dict[str, str]) -> dict[str, str]:
        credentials = await asyncio.to_thread(self._frozen_credentials)
        if credentials is None:
            return headers  # anonymous access to a public bucket
        request = AWSRequest(method=method, url=url, headers={**headers, "x-amz-content-sha256": "UNSIGNED-PAYLOAD"})
        S3SigV4Auth(credentials, "s3", self.region).add_auth(request)
        return dict(request.headers.items())

    def _frozen_credentials(self):  # type: ignore[no-untyped-def]
        credentials = self._session.get_credentials()
        return credentials.get_frozen_credentials() if credentials is not None else None

    async def list_files(self, session: aiohttp.ClientSession, ref: SourceRef,
                         settings: TransferSettings) -> list[RemoteFile]:
        """The object itself when the key names one, else every object under the key as a prefix."""
        prefix = ref.path
        objects: list[tuple[str, int]] = []
        token: str | None = None
        while True:
            query = {"list-type": "2", "prefix": prefix}
            if token:
                query["continuation-token"] = token
            url = self.object_url(ref.location) + "?" + urlencode(query)
            root = ElementTree.fromstring(await get_body(session, url, self.sign, f"s3://{ref.location}/{prefix}",
                                                         settings))
            for item in root.iter(f"{_NS}Contents"):
                objects.append((item.findtext(f"{_NS}Key") or "", int(item.findtext(f"{_NS}Size") or 0)))
            if root.findtext(f"{_NS}IsTruncated") != "true":
                break
            token = root.findtext(f"{_NS}NextContinuationToken")
        exact = [(key, size) for key, size in objects if key == prefix]
        if exact:
            key, size = exact[0]
            return [RemoteFile(self.object_url(ref.location, key), key.rsplit("/", 1)[-1], size)]
        folder = prefix if prefix.endswith("/") else prefix + "/"
        files = [RemoteFile(self.object_url(ref.location, key), key[len(folder):], size)
                 for key, size in objects if key.startswith(folder) and not key.endswith("/")]
        if not files:
            raise SourceError(FailureReason.SOURCE_NOT_FOUND, f"s3://{ref.location}/{prefix} matches no objects")
        return files
