"""Where the local control plane's binaries come from, and what a user is told when they are not there."""

from __future__ import annotations

import hashlib
import lzma

import pytest

from loraplex.local.binaries import BINARIES, BinariesNotFound, find_binaries


def executable(path, content: bytes = b"#!/bin/sh\n") -> None:
    path.write_bytes(content)
    path.chmod(0o755)


def test_kubebuilder_assets_win_when_complete(tmp_path, monkeypatch):
    for name in BINARIES:
        executable(tmp_path / name)
    monkeypatch.setenv("KUBEBUILDER_ASSETS", str(tmp_path))
    assert find_binaries(tmp_path / "tools", archives=tmp_path / "none", download=False) == tmp_path


def test_incomplete_kubebuilder_assets_name_what_is_missing(tmp_path, monkeypatch):
    executable(tmp_path / "etcd")
    monkeypatch.setenv("KUBEBUILDER_ASSETS", str(tmp_path))
    with pytest.raises(BinariesNotFound, match="does not hold all of etcd, kube-apiserver"):
        find_binaries(tmp_path / "tools", archives=tmp_path / "none", download=False)


def write_archives(folder, sums: dict[str, str] | None = None) -> None:
    folder.mkdir()
    lines = []
    for name in BINARIES:
        content = f"#!/bin/sh\necho {name}\n".encode()
        (folder / f"{name}.xz").write_bytes(lzma.compress(content))
        lines.append(f"{(sums or {}).get(name, hashlib.sha256(content).hexdigest())}  {name}")
    (folder / "SHA256SUMS").write_text("\n".join(lines) + "\n")


def test_archives_are_unpacked_once_into_the_tools_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBEBUILDER_ASSETS", raising=False)
    write_archives(tmp_path / "archives")
    found = find_binaries(tmp_path / "tools", archives=tmp_path / "archives", download=False)
    assert found.parent == tmp_path / "tools"
    assert (found / "kube-apiserver").read_text() == "#!/bin/sh\necho kube-apiserver\n"
    (tmp_path / "archives" / "etcd.xz").unlink()  # already unpacked: the archives are not needed again
    assert find_binaries(tmp_path / "tools", archives=tmp_path / "archives", download=False) == found


def test_an_archive_whose_sum_does_not_match_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBEBUILDER_ASSETS", raising=False)
    write_archives(tmp_path / "archives", sums={"kube-scheduler": "0" * 64})
    with pytest.raises(BinariesNotFound, match="kube-scheduler: SHA-256 does not match"):
        find_binaries(tmp_path / "tools", archives=tmp_path / "archives", download=False)


def test_nothing_found_and_no_download_says_how_to_provide_them(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBEBUILDER_ASSETS", raising=False)
    with pytest.raises(BinariesNotFound, match="set KUBEBUILDER_ASSETS"):
        find_binaries(tmp_path / "tools", archives=tmp_path / "none", download=False)
