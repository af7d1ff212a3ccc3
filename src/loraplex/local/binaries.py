"""Where the control plane binaries come from: $KUBEBUILDER_ASSETS, a folder of xz archives (this
project's development machines), or the official release downloads, in that order."""

from __future__ import annotations

import hashlib
import io
import lzma
import os
import platform
import tarfile
import urllib.request
from pathlib import Path

KUBERNETES_VERSION = "v1.36.2"
ETCD_VERSION = "v3.6.13"
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
PROJECT_ROOT = Path(__file__).resolve().parents[3]


def _development_archives() -> Path:
    """The same binaries, xz-compressed with their SHA256SUMS, in `shared/k8s` beside the project (or beside
    a folder holding it) on the project's development machines."""
    for folder in PROJECT_ROOT.parents:
        if (folder / "shared" / "k8s" / "SHA256SUMS").is_file():
            return folder / "shared" / "k8s"
    return PROJECT_ROOT.parent / "shared" / "k8s"


DEFAULT_ARCHIVES = _development_archives()


class BinariesNotFound(RuntimeError):
    pass


def default_tools_dir() -> Path:
    if configured := os.environ.get("LORAPLEX_TOOLS_DIR"):
        return Path(configured)
    if (PROJECT_ROOT / "pyproject.toml").exists():
        return PROJECT_ROOT / ".tools"
    return Path.home() / ".cache" / "loraplex"


def _complete(directory: Path) -> bool:
    return all((directory / name).is_file() and os.access(directory / name, os.X_OK) for name in BINARIES)


def find_binaries(tools_dir: Path | None = None, archives: Path = DEFAULT_ARCHIVES, download: bool = True) -> Path:
    """The folder holding all four binaries, unpacking or downloading them into `tools_dir` if needed."""
    if assets := os.environ.get("KUBEBUILDER_ASSETS"):
        if _complete(Path(assets)):
            return Path(assets)
        raise BinariesNotFound(f"KUBEBUILDER_ASSETS={assets} does not hold all of {', '.join(BINARIES)}")
    target = (tools_dir or default_tools_dir()) / f"k8s-{KUBERNETES_VERSION}"
    if _complete(target):
        return target
    if all((archives / f"{name}.xz").is_file() for name in BINARIES):
        _unpack_archives(archives, target)
        return target
    if download:
        _download(target)
        return target
    raise BinariesNotFound(f"no Kubernetes binaries: set KUBEBUILDER_ASSETS, or put {', '.join(BINARIES)} "
                           f"in {target}")


def _install(target: Path, name: str, data: bytes, expected_sha256: str | None) -> None:
    if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise BinariesNotFound(f"{name}: SHA-256 does not match the published sum; refusing to run it")
    target.mkdir(parents=True, exist_ok=True)
    partial = target / f".{name}.partial"
    partial.write_bytes(data)
    partial.chmod(0o755)
    partial.replace(target / name)


def _unpack_archives(archives: Path, target: Path) -> None:
    sums_file = archives / "SHA256SUMS"
    sums = {}
    if sums_file.exists():
        sums = {line.split()[1]: line.split()[0] for line in sums_file.read_text().splitlines() if line.strip()}
    for name in BINARIES:
        _install(target, name, lzma.decompress((archives / f"{name}.xz").read_bytes()), sums.get(name))


def _arch() -> str:
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(machine, machine)


def _fetch(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=120) as response:
            return response.read()
    except OSError as exc:
        raise BinariesNotFound(f"could not download {url} ({exc}); set KUBEBUILDER_ASSETS to a folder holding "
                               f"{', '.join(BINARIES)} instead") from None


def _download(target: Path) -> None:
    """The official releases: dl.k8s.io for Kubernetes (each with a .sha256 beside it), GitHub for etcd."""
    arch = _arch()
    for name in BINARIES[1:]:
        url = f"https://dl.k8s.io/release/{KUBERNETES_VERSION}/bin/linux/{arch}/{name}"
        _install(target, name, _fetch(url), _fetch(url + ".sha256").decode().split()[0])
    release = f"etcd-{ETCD_VERSION}-linux-{arch}"
    base = f"https://github.com/etcd-io/etcd/releases/download/{ETCD_VERSION}"
    archive = _fetch(f"{base}/{release}.tar.gz")
    sums = {line.split()[1]: line.split()[0] for line in _fetch(f"{base}/SHA256SUMS").decode().splitlines()
            if line.strip()}
    if hashlib.sha256(archive).hexdigest() != sums.get(f"{release}.tar.gz"):
        raise BinariesNotFound(f"{release}.tar.gz: SHA-256 does not match etcd's published sum")
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        member = tar.extractfile(f"{release}/etcd")
        if member is None:
            raise BinariesNotFound(f"{release}.tar.gz holds no etcd binary")
        _install(target, "etcd", member.read(), None)
