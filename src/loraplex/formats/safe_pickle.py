"""Read tensor names, shapes and dtypes out of a torch checkpoint without executing any of it.

`torch.save` writes a zip whose `data.pkl` describes tensors and points at raw storage files. We
unpickle `data.pkl` with an allow-list of exactly the globals a plain state dict needs, replacing each
of them with a harmless stand-in; any other global (os.system, builtins.eval, a model class...) is
refused before it is resolved, so no code from the file can run. Tensor data is never read.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import pickle
import zipfile
from pathlib import Path
from typing import Any


class UnsafeCheckpoint(ValueError):
    """The checkpoint needs something beyond plain tensors to be read."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str


@dataclasses.dataclass(frozen=True)
class _StorageType:
    dtype: str


@dataclasses.dataclass(frozen=True)
class _Storage:
    dtype: str
    numel: int


_STORAGE_DTYPES = {
    "FloatStorage": "float32", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "DoubleStorage": "float64", "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16",
    "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
}


def _rebuild_tensor(storage: _Storage, offset: int, size: Any, stride: Any, *rest: Any) -> TensorInfo:
    shape = tuple(int(dim) for dim in size)
    count = 1
    for dim in shape:
        count *= dim
    if offset < 0 or (shape and offset + count > storage.numel and all(s > 0 for s in stride)):
        raise UnsafeCheckpoint("a tensor points outside its storage")
    return TensorInfo(shape=shape, dtype=storage.dtype)


def _rebuild_parameter(data: TensorInfo, *rest: Any) -> TensorInfo:
    return data


def _rebuild_from_type(func: Any, new_type: Any, args: tuple[Any, ...], state: Any) -> Any:
    if func not in (_rebuild_tensor, _rebuild_parameter):
        raise UnsafeCheckpoint("unexpected tensor subclass reconstruction")
    return func(*args)


class _ParameterType:
    """Stand-in for torch.nn.Parameter / torch.Tensor as a type argument."""


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch.nn.parameter", "Parameter"): _ParameterType,
    ("torch", "Tensor"): _ParameterType,
    **{("torch", name): _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED.get((module, name))
        if allowed is None:
            raise UnsafeCheckpoint(f"refers to {module}.{name}, which a plain tensor checkpoint never needs")
        return allowed

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise UnsafeCheckpoint("has a storage reference of an unknown kind")
        return _Storage(dtype=pid[1].dtype, numel=int(pid[4]))


def read_state_dict_shapes(path: Path, max_pickle_bytes: int = 64 * 1024 * 1024) -> dict[str, TensorInfo]:
    """Tensor name → shape/dtype of a `torch.save`d state dict; raises UnsafeCheckpoint otherwise."""
    if not zipfile.is_zipfile(path):
        raise UnsafeCheckpoint("is not a zip-format torch checkpoint (legacy pickles are refused)")
    with zipfile.ZipFile(path) as archive:
        pickles = [info for info in archive.infolist() if info.filename.endswith("/data.pkl")
                   or info.filename == "data.pkl"]
        if len(pickles) != 1:
            raise UnsafeCheckpoint("does not hold exactly one data.pkl")
        if pickles[0].file_size > max_pickle_bytes:
            raise UnsafeCheckpoint(f"has a {pickles[0].file_size}-byte data.pkl, above {max_pickle_bytes}")
        payload = archive.read(pickles[0])
    try:
        loaded = _RestrictedUnpickler(io.BytesIO(payload)).load()
    except UnsafeCheckpoint:
        raise
    except Exception as exc:  # malformed pickles raise anything from IndexError to UnpicklingError
        raise UnsafeCheckpoint(f"could not be read as a state dict ({type(exc).__name__}: {exc})") from None
    if isinstance(loaded, dict) and "state_dict" in loaded and isinstance(loaded["state_dict"], dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(isinstance(k, str) and isinstance(v, TensorInfo)
                                               for k, v in loaded.items()):
        raise UnsafeCheckpoint("is not a flat mapping of names to tensors")
    return dict(loaded)
