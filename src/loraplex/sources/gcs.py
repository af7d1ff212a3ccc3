"""gs:// sources through the Cloud Storage JSON API.

Authentication: a bearer token in GCS_OAUTH_TOKEN, else the metadata server (GKE workload identity).
STORAGE_EMULATOR_HOST points it at an emulator, as Google's own client libraries do.
"""

from __future__ import annotations

import json
import os
import time
from urllib.parse import quote, urlencode

import aiohttp

from loraplex.api.sources import SourceRef
from loraplex.api.types import FailureReason
from loraplex.sources.download import RemoteFile, SourceError, TransferSettings, get_body

METADATA_TOKEN = "http://metadata.google.internal/computeMetadata/v1/instance/service-accounts/default/token"


class GcsClient:
    def __init__(self, session: aiohttp.ClientSession):
        self.session = session
        self.endpoint = os.environ.get("STORAGE_EMULATOR_HOST", "https://storage.googleapis.com").rstrip("/")
        self._token: tuple[str, float] | None = None

    async def sign(self, method: str, url: str, headers: dict[str, str]) -> dict[str, str]:
        token = os.environ.get("GCS_OAUTH_TOKEN")
        if token is None and "STORAGE_EMULATOR_HOST" not in os.environ:
            token = await self._metadata_token()
        return {**headers, "Authorization": f"Bearer {token}"} if token else headers

    async def _metadata_token(self) -> str:
        if self._token is not None and self._token[1] > time.monotonic() + 60:
            return self._token[0]
        try:
            async with self.session.get(METADATA_TOKEN, headers={"Metadata-Flavor": "Google"},
                                        timeout=aiohttp.ClientTimeout(total=5)) as response:
                if response.status != 200:
                    raise SourceError(FailureReason.ACCESS_DENIED,
                                      f"the metadata server refused a token ({response.status})")
                payload = await response.json()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise SourceError(FailureReason.ACCESS_DENIED, "no GCS credentials: set GCS_OAUTH_TOKEN in the storage "
                              f"Secret or use workload identity ({type(exc).__name__})") from None
        self._token = (payload["access_token"], time.monotonic() + float(payload.get("expires_in", 300)))
        return self._token[0]

    def media_url(self, bucket: str, name: str) -> str:
        return f"{self.endpoint}/storage/v1/b/{bucket}/o/{quote(name, safe='')}?alt=media"

    async def list_files(self, ref: SourceRef, settings: TransferSettings) -> list[RemoteFile]:
        objects: list[tuple[str, int]] = []
        token: str | None = None
        while True:
            query = {"prefix": ref.path, **({"pageToken": token} if token else {})}
            url = f"{self.endpoint}/storage/v1/b/{ref.location}/o?{urlencode(query)}"
            page = json.loads(await get_body(self.session, url, self.sign, f"gs://{ref.location}/{ref.path}",
                                             settings))
            objects += [(item["name"], int(item.get("size", 0))) for item in page.get("items", [])]
            token = page.get("nextPageToken")
            if not token:
                break
        exact = [(name, size) for name, size in objects if name == ref.path]
        if exact:
            return [RemoteFile(self.media_url(ref.location, exact[0][0]), ref.path.rsplit("/", 1)[-1], exact[0][1])]
        folder = ref.path if ref.path.endswith("/") else ref.path + "/"
        files = [RemoteFile(self.media_url(ref.location, name), name[len(folder):], size)
                 for name, size in objects if name.startswith(folder) and not name.endswith("/")]
        if not files:
            raise SourceError(FailureReason.SOURCE_NOT_FOUND, f"gs://{ref.location}/{ref.path} matches no objects")
        return files
