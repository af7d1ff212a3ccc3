"""The zip `torch.save` writes: one opener every reader of such a file uses, and the readers of a plain state dict.

The opener finds the one `data.pkl`, checks its size and the tensors' byte order, and unpickles it with the
restricted unpickler the caller picks; the storage files beside it are only read through that unpickler.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from loraplex.formats.safe_pickle.restricted import (
    DataUnpickler,
    RestrictedUnpickler,
    TensorData,
    TensorInfo,
    UnsafeCheckpoint,
    is_plain,
    load_restricted,
)

# Builds the unpickler of data.pkl from its bytes, the open archive and the prefix its storages sit under
# (<prefix>data/<key>).
UnpicklerFactory = Callable[[bytes, zipfile.ZipFile, str], pickle.Unpickler]


@dataclasses.dataclass(frozen=True)
class LayoutRefusals:
    """How a reader words the refusal of an archive that is not laid out as it expects."""

    not_zip: str = "is not a zip-format torch checkpoint (legacy pickles are refused)"
    not_one_pickle: str = "does not hold exactly one data.pkl"
    pickle_too_big: str = "has a {size}-byte data.pkl, above {limit}"  # formatted with both sizes


CHECKPOINT = LayoutRefusals()


def load_data_pkl(source: Path | IO[bytes], unpickler: UnpicklerFactory, *, max_pickle_bytes: int,
                  what: str = "", checks_byteorder: bool = True, refusals: LayoutRefusals = CHECKPOINT) -> Any:
    """What the one data.pkl of a torch.save zip (a path, or its bytes as a file) unpickles to; `what` names the
    expected content in the refusal of a malformed pickle. Byte order only matters to readers of tensor values."""
    if not zipfile.is_zipfile(source):
        raise UnsafeCheckpoint(refusals.not_zip)
    with zipfile.ZipFile(source) as archive:
        pickles = [info for info in archive.infolist() if info.filename.endswith("/data.pkl")
                   or info.filename == "data.pkl"]
        if len(pickles) != 1:
            raise UnsafeCheckpoint(refusals.not_one_pickle)
        if pickles[0].file_size > max_pickle_bytes:
            raise UnsafeCheckpoint(refusals.pickle_too_big.format(size=pickles[0].file_size, limit=max_pickle_bytes))
        prefix = pickles[0].filename.removesuffix("data.pkl")
        byteorder = f"{prefix}byteorder"
        if checks_byteorder and byteorder in archive.namelist() and archive.read(byteorder).strip() != b"little":
            raise UnsafeCheckpoint("stores big-endian tensors")
        return load_restricted(unpickler(archive.read(pickles[0]), archive, prefix), what)


def _shapes_only(payload: bytes, archive: zipfile.ZipFile, prefix: str) -> RestrictedUnpickler:
    return RestrictedUnpickler(io.BytesIO(payload))


def read_state_dict_shapes(path: Path, max_pickle_bytes: int = 64 * 1024 * 1024) -> dict[str, TensorInfo]:
    """Tensor name → shape/dtype of a `torch.save`d state dict; raises UnsafeCheckpoint otherwise."""
    loaded = load_data_pkl(path, _shapes_only, max_pickle_bytes=max_pickle_bytes, what="a state dict",
                           checks_byteorder=False)
    if isinstance(loaded, dict) and "state_dict" in loaded and isinstance(loaded["state_dict"], dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(isinstance(k, str) and isinstance(v, TensorInfo)
                                               for k, v in loaded.items()):
        raise UnsafeCheckpoint("is not a flat mapping of names to tensors")
    return dict(loaded)


def read_state_dict(path: Path, max_pickle_bytes: int = 64 * 1024 * 1024,
                    max_tensor_bytes: int = 16 * 1024**3) -> dict[str, Any]:
    """Name → TensorData of a `torch.save`d dict, with plain Python values (strings, numbers, lists, sets,
    dicts of them) kept as they are; raises UnsafeCheckpoint for anything else."""
    loaded = load_data_pkl(path, functools.partial(DataUnpickler, max_bytes=max_tensor_bytes),
                           max_pickle_bytes=max_pickle_bytes, what="a state dict")
    if not isinstance(loaded, dict) or not all(
            isinstance(k, str) and (isinstance(v, TensorData) or is_plain(v)) for k, v in loaded.items()):
        raise UnsafeCheckpoint("is not a mapping of names to tensors and plain values")
    return dict(loaded)
