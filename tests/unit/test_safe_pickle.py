"""The torch.save opener every restricted reader shares: how each reader refuses an archive laid out wrongly."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch

from loraplex.formats.safe_pickle.dcp import read_saved_tensor
from loraplex.formats.safe_pickle.lightning import read_lightning_checkpoint
from loraplex.formats.safe_pickle.restricted import UnsafeCheckpoint
from loraplex.formats.safe_pickle.torch_zip import read_state_dict, read_state_dict_shapes
from loraplex.formats.safe_pickle.xser import read_xser_structure, read_xser_tensor

READERS = {
    "shapes": read_state_dict_shapes,
    "state dict": read_state_dict,
    "xser structure": read_xser_structure,
    "xser tensor": read_xser_tensor,
    "lightning": lambda path: read_lightning_checkpoint(path).state_dict,
    "saved tensor": lambda path: read_saved_tensor(path.read_bytes()),
}


def _saved(path: Path) -> Path:
    torch.save(torch.arange(6, dtype=torch.float32).reshape(2, 3), path)
    return path


def _rewritten(source: Path, path: Path, change) -> Path:
    """A copy of the archive with each member's (name, bytes) replaced by what `change` returns for it."""
    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(path, "w") as copy:
        for info in archive.infolist():
            for name, data in change(info.filename, archive.read(info)):
                copy.writestr(name, data)
    return path


def _legacy(path: Path) -> Path:
    torch.save(torch.zeros(2), path, _use_new_zipfile_serialization=False)
    return path


def _two_pickles(path: Path) -> Path:
    return _rewritten(_saved(path.with_suffix(".src")), path, lambda name, data: [(name, data)] + (
        [("second/data.pkl", data)] if name.endswith("/data.pkl") else []))


def _big_endian(path: Path) -> Path:
    return _rewritten(_saved(path.with_suffix(".src")), path, lambda name, data: [
        (name, b"big\n" if name.endswith("/byteorder") else data)])


def _truncated(path: Path) -> Path:
    return _rewritten(_saved(path.with_suffix(".src")), path, lambda name, data: [
        (name, data[:20] if name.endswith("/data.pkl") else data)])


# (archive, reader) → the refusal; None: read without refusal
CASES = [
    (_legacy, "state dict", "is not a zip-format torch checkpoint (legacy pickles are refused)"),
    (_legacy, "xser tensor", "is not a zip-format torch checkpoint (legacy pickles are refused)"),
    (_legacy, "saved tensor", "is not a zip-format torch.save payload"),
    (_two_pickles, "shapes", "does not hold exactly one data.pkl"),
    (_two_pickles, "lightning", "does not hold exactly one data.pkl"),
    (_two_pickles, "saved tensor", "does not hold one small data.pkl, as a saved tensor does"),
    (_big_endian, "shapes", "is not a flat mapping of names to tensors"),  # shapes do not depend on byte order
    (_big_endian, "state dict", "stores big-endian tensors"),
    (_big_endian, "xser structure", "stores big-endian tensors"),
    (_big_endian, "saved tensor", "stores big-endian tensors"),
    (_truncated, "state dict", "could not be read as a state dict (UnpicklingError: pickle data was truncated)"),
    (_truncated, "xser tensor", "could not be read (UnpicklingError: pickle data was truncated)"),
    (_truncated, "saved tensor", "could not be read as a saved tensor (UnpicklingError: pickle data was truncated)"),
    (_saved, "xser tensor", None),
    (_saved, "saved tensor", None),
]


@pytest.mark.parametrize(("build", "reader", "refusal"), CASES,
                         ids=[f"{build.__name__.strip('_')}-{reader}" for build, reader, _ in CASES])
def test_each_reader_refuses_a_misshapen_archive_in_its_own_words(build, reader, refusal, tmp_path):
    path = build(tmp_path / "checkpoint.pt")
    if refusal is None:
        assert READERS[reader](path).array.tolist() == [[0, 1, 2], [3, 4, 5]]
        return
    with pytest.raises(UnsafeCheckpoint) as refused:
        READERS[reader](path)
    assert str(refused.value) == refusal


def test_a_data_pkl_above_the_limit_is_refused_before_it_is_read(tmp_path):
    path = _saved(tmp_path / "checkpoint.pt")
    with pytest.raises(UnsafeCheckpoint, match=r"^has a \d+-byte data\.pkl, above 10$"):
        read_state_dict(path, max_pickle_bytes=10)
