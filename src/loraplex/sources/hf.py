"""hf://org/repo@revision[/subfolder] sources: only the adapter's own files from the Hugging Face Hub."""

from __future__ import annotations

import json
import os
from urllib.parse import quote

import aiohttp

from loraplex.api.sources import SourceRef
from loraplex.api.types import FailureReason
from loraplex.sources.download import RemoteFile, SourceError, TransferSettings, get_body

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


async def sign(method: str, url: str, headers: dict[str, str]) -> dict[str, str]:
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    return {**headers, "Authorization": f"Bearer {token}"} if token else headers


async def list_files(session: aiohttp.ClientSession, ref: SourceRef, settings: TransferSettings) -> list[RemoteFile]:
    revision = ref.revision or "main"
    url = f"{endpoint()}/api/models/{ref.location}/revision/{quote(revision, safe='')}?blobs=true"
    info = [json.loads(await get_body(session, url, sign, f"hf://{ref.location}@{revision}", settings))]
    folder = ref.path.strip("/")
    available = {sibling["rfilename"]: sibling.get("size") for sibling in info[0].get("siblings", [])}
    wanted = [name for name in ADAPTER_FILES if (f"{folder}/{name}" if folder else name) in available]
    if "adapter_model.safetensors" in wanted and "adapter_model.bin" in wanted:
        wanted.remove("adapter_model.bin")  # never fetch a pickle when safetensors exist
    if "adapter_config.json" not in wanted:
        raise SourceError(FailureReason.SOURCE_NOT_FOUND,
                          f"hf://{ref.location}@{revision}{'/' + folder if folder else ''} has no adapter_config.json")
    commit = info[0].get("sha") or revision  # pin the download to the commit the listing saw
    files = []
    for name in wanted:
        path = f"{folder}/{name}" if folder else name
        files.append(RemoteFile(f"{endpoint()}/{ref.location}/resolve/{commit}/{quote(path)}", name, available[path]))
    return files
