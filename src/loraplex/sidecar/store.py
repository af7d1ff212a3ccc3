"""The PEFT volume: adapters/ (what the runtime reads), staging/ (downloads in progress), state/ (what
loraplex installed, so a restarted sidecar re-verifies instead of re-downloading).

Where an adapter sits in adapters/ depends on the runtime (AdapterLayout). NIM finds adapters by folder, so an
update replaces adapters/<served name>/. vLLM is told a path, reads it again whenever it has evicted the adapter,
and keys its prefix cache by name and path, so every generation gets a folder of its own,
adapters/<served name>/<generation id>/, whose files never change and go only once vLLM reads another.

Every method blocks on the filesystem; the agent calls them in a thread.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

from loraplex.api.contract import ADAPTERS_SUBPATH
from loraplex.api.runtime_capabilities import AdapterLayout

# The generation folders install() names: g<LoraAdapter generation>-<8 hex digits unique to one install>.
GENERATION_FOLDER = re.compile(r"g\d+-[0-9a-f]{8}")


@dataclasses.dataclass(frozen=True)
class InstalledAdapter:
    served_name: str
    adapter: str  # LoraAdapter metadata.name
    uid: str
    generation: int
    source: str
    sha256: str | None
    format: str
    rank: int
    target_modules: list[str]
    size_bytes: int
    files: dict[str, int]  # relative path -> size, to notice tampering or truncation
    fingerprint: str | None = None  # file:// sources
    converted_from: str | None = None  # the format it came in, when converted for the runtime
    # Under adapters/: "<served name>/<generation id>", or "<served name>" for the per-name layout (and for
    # records written before generation folders existed, which are adopted where they are).
    folder: str = ""


class VolumeStore:
    def __init__(self, root: Path, layout: AdapterLayout = AdapterLayout.FOLDER_PER_GENERATION):
        self.root = root
        self.layout = layout
        self.adapters = root / ADAPTERS_SUBPATH
        self.staging = root / "staging"
        self.state = root / "state"
        self.trash = root / "trash"

    def prepare(self) -> None:
        """Create the layout and drop what an interrupted life left behind (never visible to the runtime)."""
        for folder in (self.adapters, self.staging, self.state, self.trash):
            folder.mkdir(parents=True, exist_ok=True)
        for leftover in [*self.staging.iterdir(), *self.trash.iterdir()]:
            _delete_now(leftover)

    def new_staging(self, served_name: str) -> Path:
        path = self.staging / f"{served_name}.{uuid.uuid4().hex[:8]}"
        path.mkdir(parents=True)
        return path

    def discard(self, path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)

    def installed(self) -> dict[str, InstalledAdapter]:
        found = {}
        for path in self.state.glob("*.json"):
            try:
                fields = json.loads(path.read_text())
                record = InstalledAdapter(**{"folder": fields.get("served_name"), **fields})
            except (ValueError, TypeError):
                path.unlink(missing_ok=True)
                continue
            found[record.served_name] = record
        return found

    def path(self, record: InstalledAdapter) -> Path:
        return self.adapters / record.folder

    def intact(self, record: InstalledAdapter) -> bool:
        folder = self.path(record)
        try:
            return all((folder / name).stat().st_size == size for name, size in record.files.items())
        except OSError:
            return False

    def install(self, staging: Path, record: InstalledAdapter) -> InstalledAdapter:
        """Move a validated staging folder into place and record it; returns the record with its folder.
        Renames within one volume are atomic, so the runtime sees a folder whole or not at all. Per generation,
        the folder is new and the previous generation stays until prune(); per name, it replaces the old one."""
        if self.layout == AdapterLayout.FOLDER_PER_GENERATION:
            placed = dataclasses.replace(
                record, folder=f"{record.served_name}/g{record.generation}-{uuid.uuid4().hex[:8]}")
            (self.adapters / record.served_name).mkdir(exist_ok=True)
            os.replace(staging, self.path(placed))
        else:
            placed = dataclasses.replace(record, folder=record.served_name)
            target = self.path(placed)
            if target.exists():
                self._delete(target)
            os.replace(staging, target)
        self.record(placed)
        return placed

    def record(self, record: InstalledAdapter) -> None:
        """Make `record` the generation a restarted sidecar adopts for its served name."""
        path = self.state / f"{record.served_name}.json"
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(dataclasses.asdict(record), sort_keys=True))
        os.replace(temporary, path)

    def prune(self, served_name: str, keep: set[str]) -> None:
        """Delete the served name's generations whose folders are not in `keep`: the one an update replaced,
        or those a crash left. Call it only once the runtime reads none of them."""
        folder = self.adapters / served_name
        if self.layout != AdapterLayout.FOLDER_PER_GENERATION or not folder.is_dir():
            return
        # A record from before generation folders keeps its files in the served name's folder itself.
        keeps_unversioned = served_name in keep
        for entry in list(folder.iterdir()):
            if f"{served_name}/{entry.name}" in keep:
                continue
            if keeps_unversioned and not (entry.is_dir() and GENERATION_FOLDER.fullmatch(entry.name)):
                continue
            self._delete(entry)

    def prune_all(self, keep: dict[str, set[str]]) -> None:
        """At startup: delete every adapter folder `keep` does not name (served name -> folders to keep)."""
        for entry in list(self.adapters.iterdir()):
            if keep.get(entry.name):
                self.prune(entry.name, keep[entry.name])
            else:
                self._delete(entry)

    def discard_generation(self, record: InstalledAdapter) -> None:
        """Delete one generation the runtime never served (an update rolled back)."""
        if self.layout == AdapterLayout.FOLDER_PER_GENERATION and self.path(record).exists():
            self._delete(self.path(record))

    def remove(self, served_name: str) -> None:
        target = self.adapters / served_name
        if target.exists():
            self._delete(target)
        (self.state / f"{served_name}.json").unlink(missing_ok=True)

    def used_bytes(self) -> int:
        return sum(f.stat().st_size for base in (self.adapters, self.staging) for f in base.rglob("*") if f.is_file())

    def _delete(self, path: Path) -> None:
        """Out of adapters/ in one rename, then deleted: an interrupted delete never leaves a partial folder
        where the runtime looks."""
        moved = self.trash / f"{path.name}.{uuid.uuid4().hex[:8]}"
        os.replace(path, moved)
        _delete_now(moved)


def _delete_now(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True) if path.is_dir() and not path.is_symlink() else path.unlink(
        missing_ok=True)


def files_of(folder: Path) -> dict[str, Any]:
    return {str(f.relative_to(folder)): f.stat().st_size for f in sorted(folder.rglob("*")) if f.is_file()}
