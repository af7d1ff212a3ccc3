"""The restricted unpickler every checkpoint reader shares.

`torch.save` writes a zip whose `data.pkl` describes tensors and points at raw storage files. We
unpickle `data.pkl` with an allow-list of exactly the globals a plain state dict needs, replacing each
of them with a harmless stand-in; any other global (os.system, builtins.eval, a model class...) is
refused before it is resolved, so no code from the file can run.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import pickle
import zipfile
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


ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch.nn.parameter", "Parameter"): _ParameterType,
    ("torch", "Tensor"): _ParameterType,
    **{("torch", name): _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


class RestrictedUnpickler(pickle.Unpickler):
    """Tensors as their shape and dtype (TensorInfo), from globals in `allowed` only; tensor data is never read."""

    def __init__(self, file: io.BytesIO, allowed: dict[tuple[str, str], Any] = ALLOWED):
        super().__init__(file)
        self._allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        allowed = self._allowed.get((module, name))
        if allowed is None:
            raise UnsafeCheckpoint(f"refers to {module}.{name}, which a plain tensor checkpoint never needs")
        return allowed

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise UnsafeCheckpoint("has a storage reference of an unknown kind")
        return _Storage(dtype=pid[1].dtype, numel=int(pid[4]))


def load_restricted(unpickler: pickle.Unpickler, what: str = "") -> Any:
    """What `unpickler` loads; any failure of a malformed pickle becomes an UnsafeCheckpoint that says it could not
    be read (as `what`, when given)."""
    try:
        return unpickler.load()
    except UnsafeCheckpoint:
        raise
    except Exception as exc:  # malformed pickles raise anything from IndexError to UnpicklingError
        read_as = f" as {what}" if what else ""
        raise UnsafeCheckpoint(f"could not be read{read_as} ({type(exc).__name__}: {exc})") from None


# Reading tensor values, not just shapes: converters need the numbers. The same refusal of every global
# outside the allow-list holds; what is added is plain data a trainer stores beside its tensors (NxD keeps
# its LoRA config dict in each checkpoint file, whose target_modules some releases keep as a set).
NUMPY_DTYPES = {
    "float32": "<f4", "float16": "<f2", "bfloat16": "<u2", "float64": "<f8", "int64": "<i8", "int32": "<i4",
    "int16": "<i2", "int8": "i1", "uint8": "u1", "bool": "?",
}
_PLAIN = (str, int, float, bool, type(None))


@dataclasses.dataclass(frozen=True)
class TensorData:
    """A tensor's values; bfloat16 ones are held as their uint16 bit patterns, since numpy has no bfloat16."""

    array: Any  # numpy.ndarray
    dtype: str  # torch's name: float32, bfloat16...


@dataclasses.dataclass(frozen=True)
class _StoredBytes:
    dtype: str
    numel: int
    data: bytes


def _rebuild_array(storage: _StoredBytes, offset: int, size: Any, stride: Any, *rest: Any) -> TensorData:
    import numpy as np

    shape, strides = tuple(int(d) for d in size), tuple(int(s) for s in stride)
    if offset < 0 or len(shape) != len(strides) or any(s < 0 for s in strides):
        raise UnsafeCheckpoint("a tensor has a negative offset or stride")
    flat = np.frombuffer(storage.data, dtype=NUMPY_DTYPES[storage.dtype], count=storage.numel)
    if 0 in shape:
        return TensorData(np.zeros(shape, dtype=flat.dtype), storage.dtype)
    last = offset + sum((d - 1) * s for d, s in zip(shape, strides, strict=True))
    if last >= storage.numel:
        raise UnsafeCheckpoint("a tensor points outside its storage")
    view = np.lib.stride_tricks.as_strided(flat[offset:], shape, tuple(s * flat.itemsize for s in strides),
                                           writeable=False)
    return TensorData(np.array(view), storage.dtype)


def _rebuild_array_parameter(data: TensorData, *rest: Any) -> TensorData:
    return data


def _rebuild_array_from_type(func: Any, new_type: Any, args: tuple[Any, ...], state: Any) -> Any:
    if func not in (_rebuild_array, _rebuild_array_parameter):
        raise UnsafeCheckpoint("unexpected tensor subclass reconstruction")
    return func(*args)


ALLOWED_WITH_DATA: dict[tuple[str, str], Any] = {
    **ALLOWED,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_array,
    ("torch._utils", "_rebuild_tensor"): _rebuild_array,
    ("torch._utils", "_rebuild_parameter"): _rebuild_array_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_array_from_type,
    ("builtins", "set"): set, ("__builtin__", "set"): set,
    ("builtins", "frozenset"): frozenset, ("__builtin__", "frozenset"): frozenset,
}


class DataUnpickler(RestrictedUnpickler):
    """Tensors with their values (TensorData), each storage read from `archive` under `prefix` once, at most
    `max_bytes` of them in all."""

    def __init__(self, payload: bytes, archive: zipfile.ZipFile, prefix: str, max_bytes: int,
                 allowed: dict[tuple[str, str], Any] = ALLOWED_WITH_DATA):
        super().__init__(io.BytesIO(payload), allowed)
        self._archive, self._prefix, self._left = archive, prefix, max_bytes
        self._storages: dict[str, _StoredBytes] = {}

    def persistent_load(self, pid: Any) -> _StoredBytes:
        info = super().persistent_load(pid)
        key = str(pid[2])
        if key not in self._storages:
            try:
                member = self._archive.getinfo(f"{self._prefix}data/{key}")
            except KeyError:
                raise UnsafeCheckpoint(f"names storage {key!r}, which the archive does not hold") from None
            import numpy as np

            needed = info.numel * np.dtype(NUMPY_DTYPES[info.dtype]).itemsize
            if member.file_size < needed or member.file_size > self._left:
                raise UnsafeCheckpoint(f"storage {key!r} holds {member.file_size} bytes, not the {needed} it claims")
            self._left -= member.file_size
            self._storages[key] = _StoredBytes(info.dtype, info.numel, self._archive.read(member))
        return self._storages[key]


def is_plain(value: Any) -> bool:
    """Whether `value` is plain data: strings, numbers, None, and lists, sets and str-keyed dicts of them."""
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, (list, tuple, set, frozenset)):
        return all(is_plain(item) for item in value)
    return isinstance(value, dict) and all(isinstance(k, str) and is_plain(v) for k, v in value.items())
