"""The first process of every container the local kubelet starts: it enters a private mount namespace,
bind-mounts each volume at its mount path (the service-account token at the in-cluster path included),
and then becomes the container's command.

    python -m loraplex.local.container_init MOUNTS.json -- COMMAND [ARG...]

MOUNTS.json is {"mounts": [{"source": host path, "target": mount path, "readOnly": bool}], "keepVisible":
[host paths]}. There is no image: the container runs this machine's programs, so the folders holding them
(the project and its virtual environments, Python itself) are bound back where they were when a volume
is mounted over a folder above them, as an emptyDir on /tmp is over a checkout under /tmp.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import stat
import sys
from pathlib import Path

CLONE_NEWNS = 0x00020000
MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 0x1, 0x20, 0x1000, 0x4000, 0x40000
O_PATH = getattr(os, "O_PATH", 0o10000000)

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"{what}: {os.strerror(error)}")


def _mount(source: str | None, target: str, flags: int) -> None:
    _check(_libc.mount(source.encode() if source else None, target.encode(), None, flags, None),
           f"mount {source} on {target}")


def _prepare_target(source_is_dir: bool, target: Path) -> None:
    if source_is_dir:
        target.mkdir(parents=True, exist_ok=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.touch(exist_ok=True)


def _under(path: str, folder: str) -> bool:
    return path != folder and path.startswith(folder.rstrip("/") + "/")


def enter(mounts: list[dict[str, object]], keep_visible: list[str] | None = None) -> None:
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _mount(None, "/", MS_REC | MS_PRIVATE)  # nothing mounted here leaks back to the host
    targets = [str(m["target"]) for m in mounts]
    hidden = [path for path in keep_visible or [] if any(_under(path, target) for target in targets)]
    mounts = [*mounts, *({"source": path, "target": path, "readOnly": False} for path in hidden)]
    # Every source is opened before anything is mounted: a mount on /tmp must not hide a source under /tmp.
    opened = [(os.open(str(m["source"]), O_PATH), m) for m in mounts]
    for descriptor, mount in sorted(opened, key=lambda item: len(str(item[1]["target"]))):
        target = Path(str(mount["target"]))
        _prepare_target(stat.S_ISDIR(os.fstat(descriptor).st_mode), target)
        _mount(f"/proc/self/fd/{descriptor}", str(target), MS_BIND | MS_REC)
        if mount.get("readOnly"):
            _mount(None, str(target), MS_REMOUNT | MS_BIND | MS_RDONLY)
    for descriptor, _ in opened:
        os.close(descriptor)


def main() -> None:
    arguments = sys.argv[1:]
    separator = arguments.index("--")
    spec = json.loads(Path(arguments[0]).read_text())
    command = arguments[separator + 1:]
    try:
        enter(spec["mounts"], spec.get("keepVisible", []))
    except OSError as exc:
        print(f"loraplex local kubelet: cannot give the container its volumes: {exc}", file=sys.stderr)
        sys.exit(127)
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        print(f"loraplex local kubelet: cannot run {command[0]}: {exc}", file=sys.stderr)
        sys.exit(127)


if __name__ == "__main__":
    main()
