"""The PEFT volume: adapters/ (what the runtime reads), staging/ (downloads in progress), state/ (what
loraplex installed, so a restarted sidecar re-verifies instead of re-downloading).

Every method blocks on the filesystem; the agent calls them in a thread.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any


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


class VolumeStore:
    def __init__(self, root: Path):
        self.root = root
        self.adapters = root / "adapters"
        self.staging = root / "staging"
        self.state = root / "state"
        self.trash = root / "trash"

    def prepare(self) -> None:
        """Create the layout and drop what an interrupted life left behind (never visible to the runtime)."""
        for folder in (self.adapters, self.staging, self.state, self.trash):
            folder.mkdir(parents=True, exist_ok=True)
        for leftover in [*self.staging.iterdir(), *self.trash.iterdir()]:
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)

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
                record = InstalledAdapter(**json.loads(path.read_text()))
            except (ValueError, TypeError):
                path.unlink(missing_ok=True)
                continue
            found[record.served_name] = record
        return found

    def intact(self, record: InstalledAdapter) -> bool:
        folder = self.adapters / record.served_name
        try:
            return all((folder / name).stat().st_size == size for name, size in record.files.items())
        except OSError:
            return False

    def install(self, staging: Path, record: InstalledAdapter) -> None:
        """Move a validated staging folder into place. Renames within one volume are atomic, so the runtime
        sees the old folder or the new one, never a half-written one."""
        target = self.adapters / record.served_name
        if target.exists():
            os.replace(target, self.trash / f"{record.served_name}.{uuid.uuid4().hex[:8]}")
        os.replace(staging, target)
        self._write_state(record)
        for old in self.trash.iterdir():
            shutil.rmtree(old, ignore_errors=True)

    def remove(self, served_name: str) -> None:
        target = self.adapters / served_name
        if target.exists():
            moved = self.trash / f"{served_name}.{uuid.uuid4().hex[:8]}"
            os.replace(target, moved)
            shutil.rmtree(moved, ignore_errors=True)
        (self.state / f"{served_name}.json").unlink(missing_ok=True)

    def folder(self, served_name: str) -> Path:
        return self.adapters / served_name

    def used_bytes(self) -> int:
        return sum(f.stat().st_size for base in (self.adapters, self.staging) for f in base.rglob("*") if f.is_file())

    def _write_state(self, record: InstalledAdapter) -> None:
        path = self.state / f"{record.served_name}.json"
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(dataclasses.asdict(record), sort_keys=True))
        os.replace(temporary, path)


def files_of(folder: Path) -> dict[str, Any]:
    return {str(f.relative_to(folder)): f.stat().st_size for f in sorted(folder.rglob("*")) if f.is_file()}
