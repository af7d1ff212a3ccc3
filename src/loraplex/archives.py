"""Which members of an untrusted tar archive are safe to read or extract.

`.nemo` adapters (formats/nemo.py) and tarred adapter folders from a source (sources/) are both checked
here before anything is read or written.
"""

from __future__ import annotations

import tarfile
from pathlib import PurePosixPath

MAX_MEMBERS = 10_000


class UnsafeArchive(ValueError):
    """An archive whose extraction could escape its folder, alias a file or exhaust the disk."""


def safe_members(archive: tarfile.TarFile, max_bytes: int) -> list[tarfile.TarInfo]:
    """Every member, once all of them are known to be plain files or folders inside the archive that unpack to
    at most `max_bytes`; else UnsafeArchive naming the first that is not."""
    members = []
    total = 0
    for count, member in enumerate(archive, start=1):
        if count > MAX_MEMBERS:
            raise UnsafeArchive(f"holds more than {MAX_MEMBERS} members")
        name = member.name
        if name.startswith("/") or PurePosixPath(name).is_absolute():
            raise UnsafeArchive(f"member {name!r} has an absolute path")
        if ".." in PurePosixPath(name).parts:
            raise UnsafeArchive(f"member {name!r} climbs out of the archive with '..'")
        if member.issym() or member.islnk():
            raise UnsafeArchive(f"member {name!r} is a link, which adapters never need")
        if not (member.isfile() or member.isdir()):
            raise UnsafeArchive(f"member {name!r} is a device, fifo or other special file")
        total += member.size
        if total > max_bytes:
            raise UnsafeArchive(f"unpacks to more than {max_bytes} bytes")
        members.append(member)
    return members
