"""torch_xla serialization (xser), which NxD's use_xser=True uses.

Every tensor is its own torch.save file, <file>.tensors/tensor_<tid>.pt, and <file> pickles the structure with a
TensorReference(tid) where each tensor was; NxD adds <file>.info.pt, tid → dtype and shape. Of torch_xla, only
that one class is let through, as an inert stand-in holding the id; the caller, who knows the folder, resolves it.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from loraplex.formats.safe_pickle.restricted import (
    ALLOWED_WITH_DATA,
    NUMPY_DTYPES,
    DataUnpickler,
    TensorData,
    TensorInfo,
    UnsafeCheckpoint,
    is_plain,
)
from loraplex.formats.safe_pickle.torch_zip import load_data_pkl


class XserReference:
    """Stand-in for torch_xla.utils.serialization.TensorReference: the id of the tensor file holding the value."""

    __slots__ = ("tid",)

    def __init__(self, tid: Any) -> None:
        self.__setstate__({"tid": tid})

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, dict) and state.keys() == {"tid"} and type(state["tid"]) is int
                and state["tid"] >= 0):
            raise UnsafeCheckpoint("has a TensorReference that holds more or other than one tensor id")
        self.tid = state["tid"]


def torch_size(dims: Any) -> tuple[int, ...]:
    """Stand-in for torch.Size: the tuple of sizes it was built from."""
    if not isinstance(dims, tuple) or not all(type(d) is int and d >= 0 for d in dims):
        raise UnsafeCheckpoint("has a torch.Size that is not a tuple of sizes")
    return dims


XSER_STRUCTURE = {**ALLOWED_WITH_DATA, ("torch_xla.utils.serialization", "TensorReference"): XserReference}
# a dtype pickles as the global torch.<name>; it stands in as that name
_XSER_INFO = {("torch", "Size"): torch_size, **{("torch", dtype): dtype for dtype in NUMPY_DTYPES}}


def _load_xser_file(path: Path, allowed: dict[tuple[str, str], Any], max_pickle_bytes: int,
                    max_tensor_bytes: int) -> Any:
    return load_data_pkl(path, functools.partial(DataUnpickler, max_bytes=max_tensor_bytes, allowed=allowed),
                         max_pickle_bytes=max_pickle_bytes)


def read_xser_structure(path: Path, max_pickle_bytes: int = 64 * 1024 * 1024,
                        max_tensor_bytes: int = 16 * 1024**3) -> dict[str, Any]:
    """read_state_dict for the main file of an xser save: a value may also be an XserReference."""
    loaded = _load_xser_file(path, XSER_STRUCTURE, max_pickle_bytes, max_tensor_bytes)
    if not isinstance(loaded, dict) or not all(
            isinstance(k, str) and (isinstance(v, (TensorData, XserReference)) or is_plain(v))
            for k, v in loaded.items()):
        raise UnsafeCheckpoint("is not a mapping of names to tensor references, tensors and plain values")
    if any(isinstance(v, XserReference) and not hasattr(v, "tid") for v in loaded.values()):
        raise UnsafeCheckpoint("has a TensorReference without a tensor id")
    return dict(loaded)


def read_xser_tensor(path: Path, max_tensor_bytes: int = 16 * 1024**3) -> TensorData:
    """The one tensor of an xser tensor file (torch.save of that tensor alone), under read_state_dict's
    allow-list."""
    loaded = _load_xser_file(path, ALLOWED_WITH_DATA, 1024 * 1024, max_tensor_bytes)
    if not isinstance(loaded, TensorData):
        raise UnsafeCheckpoint("holds something other than one tensor")
    return loaded


def read_xser_info(path: Path, max_pickle_bytes: int = 64 * 1024 * 1024) -> dict[int, TensorInfo]:
    """tid → dtype and shape, from the .info.pt NxD writes beside an xser file."""
    loaded = _load_xser_file(path, _XSER_INFO, max_pickle_bytes, 0)
    fields = {"dtype", "shape", "expert_model_parallel"}
    if not isinstance(loaded, dict) or not all(
            type(tid) is int and isinstance(info, dict) and {"dtype", "shape"} <= info.keys() <= fields
            and isinstance(info["dtype"], str) and info["dtype"] in NUMPY_DTYPES and isinstance(info["shape"], tuple)
            and isinstance(info.get("expert_model_parallel", False), bool) for tid, info in loaded.items()):
        raise UnsafeCheckpoint("is not a mapping of tensor ids to their dtype and shape")
    return {tid: TensorInfo(shape=info["shape"], dtype=info["dtype"]) for tid, info in loaded.items()}
