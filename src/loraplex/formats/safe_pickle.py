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


# Reading tensor values, not just shapes: converters need the numbers. The same refusal of every global
# outside the allow-list holds; what is added is plain data a trainer stores beside its tensors (NxD keeps
# its LoRA config dict in each checkpoint file, whose target_modules some releases keep as a set).
_NUMPY_DTYPES = {
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
    flat = np.frombuffer(storage.data, dtype=_NUMPY_DTYPES[storage.dtype], count=storage.numel)
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


_ALLOWED_WITH_DATA: dict[tuple[str, str], Any] = {
    **_ALLOWED,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_array,
    ("torch._utils", "_rebuild_tensor"): _rebuild_array,
    ("torch._utils", "_rebuild_parameter"): _rebuild_array_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_array_from_type,
    ("builtins", "set"): set, ("__builtin__", "set"): set,
    ("builtins", "frozenset"): frozenset, ("__builtin__", "frozenset"): frozenset,
}


class _DataUnpickler(_RestrictedUnpickler):
    def __init__(self, payload: bytes, archive: zipfile.ZipFile, prefix: str, max_bytes: int):
        super().__init__(io.BytesIO(payload))
        self._archive, self._prefix, self._left = archive, prefix, max_bytes
        self._storages: dict[str, _StoredBytes] = {}

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED_WITH_DATA.get((module, name))
        if allowed is None:
            raise UnsafeCheckpoint(f"refers to {module}.{name}, which a plain tensor checkpoint never needs")
        return allowed

    def persistent_load(self, pid: Any) -> _StoredBytes:
        info = super().persistent_load(pid)
        key = str(pid[2])
        if key not in self._storages:
            try:
                member = self._archive.getinfo(f"{self._prefix}data/{key}")
            except KeyError:
                raise UnsafeCheckpoint(f"names storage {key!r}, which the archive does not hold") from None
            import numpy as np

            needed = info.numel * np.dtype(_NUMPY_DTYPES[info.dtype]).itemsize
            if member.file_size < needed or member.file_size > self._left:
                raise UnsafeCheckpoint(f"storage {key!r} holds {member.file_size} bytes, not the {needed} it claims")
            self._left -= member.file_size
            self._storages[key] = _StoredBytes(info.dtype, info.numel, self._archive.read(member))
        return self._storages[key]


def _is_plain(value: Any) -> bool:
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, (list, tuple, set, frozenset)):
        return all(_is_plain(item) for item in value)
    return isinstance(value, dict) and all(isinstance(k, str) and _is_plain(v) for k, v in value.items())


def read_state_dict(path: Path, max_pickle_bytes: int = 64 * 1024 * 1024,
                    max_tensor_bytes: int = 16 * 1024**3) -> dict[str, Any]:
    """Name → TensorData of a `torch.save`d dict, with plain Python values (strings, numbers, lists, sets,
    dicts of them) kept as they are; raises UnsafeCheckpoint for anything else."""
    if not zipfile.is_zipfile(path):
        raise UnsafeCheckpoint("is not a zip-format torch checkpoint (legacy pickles are refused)")
    with zipfile.ZipFile(path) as archive:
        pickles = [info for info in archive.infolist() if info.filename.endswith("/data.pkl")
                   or info.filename == "data.pkl"]
        if len(pickles) != 1:
            raise UnsafeCheckpoint("does not hold exactly one data.pkl")
        if pickles[0].file_size > max_pickle_bytes:
            raise UnsafeCheckpoint(f"has a {pickles[0].file_size}-byte data.pkl, above {max_pickle_bytes}")
        prefix = pickles[0].filename.removesuffix("data.pkl")
        byteorder = f"{prefix}byteorder"
        if byteorder in archive.namelist() and archive.read(byteorder).strip() != b"little":
            raise UnsafeCheckpoint("stores big-endian tensors")
        unpickler = _DataUnpickler(archive.read(pickles[0]), archive, prefix, max_tensor_bytes)
        try:
            loaded = unpickler.load()
        except UnsafeCheckpoint:
            raise
        except Exception as exc:  # malformed pickles raise anything from IndexError to UnpicklingError
            raise UnsafeCheckpoint(f"could not be read as a state dict ({type(exc).__name__}: {exc})") from None
    if not isinstance(loaded, dict) or not all(
            isinstance(k, str) and (isinstance(v, TensorData) or _is_plain(v)) for k, v in loaded.items()):
        raise UnsafeCheckpoint("is not a mapping of names to tensors and plain values")
    return dict(loaded)


# ---- torch_xla serialization (xser), which NxD's use_xser=True uses -------------------------------------------
# Every tensor is its own torch.save file, <file>.tensors/tensor_<tid>.pt, and <file> pickles the structure with a
# TensorReference(tid) where each tensor was; NxD adds <file>.info.pt, tid → dtype and shape. Of torch_xla, only
# that one class is let through, as an inert stand-in holding the id; the caller, who knows the folder, resolves it.
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


def _torch_size(dims: Any) -> tuple[int, ...]:
    if not isinstance(dims, tuple) or not all(type(d) is int and d >= 0 for d in dims):
        raise UnsafeCheckpoint("has a torch.Size that is not a tuple of sizes")
    return dims


_XSER_STRUCTURE = {**_ALLOWED_WITH_DATA, ("torch_xla.utils.serialization", "TensorReference"): XserReference}
# a dtype pickles as the global torch.<name>; it stands in as that name
_XSER_INFO = {("torch", "Size"): _torch_size, **{("torch", dtype): dtype for dtype in _NUMPY_DTYPES}}


class _XserUnpickler(_DataUnpickler):
    def __init__(self, payload: bytes, archive: zipfile.ZipFile, prefix: str, max_bytes: int,
                 allowed: dict[tuple[str, str], Any]):
        super().__init__(payload, archive, prefix, max_bytes)
        self._xser_allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        allowed = self._xser_allowed.get((module, name))
        if allowed is None:
            raise UnsafeCheckpoint(f"refers to {module}.{name}, which a plain tensor checkpoint never needs")
        return allowed


def _load_xser_file(path: Path, allowed: dict[tuple[str, str], Any], max_pickle_bytes: int,
                    max_tensor_bytes: int) -> Any:
    if not zipfile.is_zipfile(path):
        raise UnsafeCheckpoint("is not a zip-format torch checkpoint (legacy pickles are refused)")
    with zipfile.ZipFile(path) as archive:
        pickles = [info for info in archive.infolist() if info.filename.endswith("/data.pkl")
                   or info.filename == "data.pkl"]
        if len(pickles) != 1:
            raise UnsafeCheckpoint("does not hold exactly one data.pkl")
        if pickles[0].file_size > max_pickle_bytes:
            raise UnsafeCheckpoint(f"has a {pickles[0].file_size}-byte data.pkl, above {max_pickle_bytes}")
        prefix = pickles[0].filename.removesuffix("data.pkl")
        byteorder = f"{prefix}byteorder"
        if byteorder in archive.namelist() and archive.read(byteorder).strip() != b"little":
            raise UnsafeCheckpoint("stores big-endian tensors")
        try:
            return _XserUnpickler(archive.read(pickles[0]), archive, prefix, max_tensor_bytes, allowed).load()
        except UnsafeCheckpoint:
            raise
        except Exception as exc:  # malformed pickles raise anything from IndexError to UnpicklingError
            raise UnsafeCheckpoint(f"could not be read ({type(exc).__name__}: {exc})") from None


def read_xser_structure(path: Path, max_pickle_bytes: int = 64 * 1024 * 1024,
                        max_tensor_bytes: int = 16 * 1024**3) -> dict[str, Any]:
    """read_state_dict for the main file of an xser save: a value may also be an XserReference."""
    loaded = _load_xser_file(path, _XSER_STRUCTURE, max_pickle_bytes, max_tensor_bytes)
    if not isinstance(loaded, dict) or not all(
            isinstance(k, str) and (isinstance(v, (TensorData, XserReference)) or _is_plain(v))
            for k, v in loaded.items()):
        raise UnsafeCheckpoint("is not a mapping of names to tensor references, tensors and plain values")
    if any(isinstance(v, XserReference) and not hasattr(v, "tid") for v in loaded.values()):
        raise UnsafeCheckpoint("has a TensorReference without a tensor id")
    return dict(loaded)


def read_xser_tensor(path: Path, max_tensor_bytes: int = 16 * 1024**3) -> TensorData:
    """The one tensor of an xser tensor file (torch.save of that tensor alone), under read_state_dict's
    allow-list."""
    loaded = _load_xser_file(path, _ALLOWED_WITH_DATA, 1024 * 1024, max_tensor_bytes)
    if not isinstance(loaded, TensorData):
        raise UnsafeCheckpoint("holds something other than one tensor")
    return loaded


def read_xser_info(path: Path, max_pickle_bytes: int = 64 * 1024 * 1024) -> dict[int, TensorInfo]:
    """tid → dtype and shape, from the .info.pt NxD writes beside an xser file."""
    loaded = _load_xser_file(path, _XSER_INFO, max_pickle_bytes, 0)
    fields = {"dtype", "shape", "expert_model_parallel"}
    if not isinstance(loaded, dict) or not all(
            type(tid) is int and isinstance(info, dict) and {"dtype", "shape"} <= info.keys() <= fields
            and isinstance(info["dtype"], str) and info["dtype"] in _NUMPY_DTYPES and isinstance(info["shape"], tuple)
            and isinstance(info.get("expert_model_parallel", False), bool) for tid, info in loaded.items()):
        raise UnsafeCheckpoint("is not a mapping of tensor ids to their dtype and shape")
    return {tid: TensorInfo(shape=info["shape"], dtype=info["dtype"]) for tid, info in loaded.items()}


# ---- A Lightning checkpoint written by NxD's NeuronCheckpointIO (parallel_layers/checkpointing.py save) ----------
# The file is Lightning's whole checkpoint dict: the adapter under "state_dict", beside loop counters, callback and
# optimizer states, and possibly hyper-parameters holding any object of the user's. Globals outside the allow-list
# resolve to inert stand-ins that record their arguments and run nothing (nothing is imported, no code of the file
# is called), so the entries around the state dict are skipped; the state dict itself must be made of allowed parts.
class ForeignObject:
    """Stand-in for a global the allow-list lacks, and for whatever it builds: holds what it was given, does
    nothing with it."""

    global_name = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> ForeignObject:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.parts = [args, kwargs]

    def __setstate__(self, state: Any) -> None:
        self.__dict__.setdefault("parts", []).append(state)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.__dict__.setdefault("parts", []).append((key, value))

    def append(self, value: Any) -> None:
        self.__dict__.setdefault("parts", []).append(value)

    def extend(self, values: Any) -> None:
        self.__dict__.setdefault("parts", []).extend(values)


@dataclasses.dataclass(frozen=True)
class LightningCheckpoint:
    state_dict: dict[str, Any] | None  # None when the file has no state_dict entry
    tids: frozenset[int]  # every xser tensor id the file refers to, in or outside the state dict


def _all_references(value: Any) -> set[int]:
    found: set[int] = set()
    seen: set[int] = set()
    pending = [value]
    while pending:
        item = pending.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, XserReference):
            found.add(item.tid)
        elif isinstance(item, dict):
            pending += [*item.keys(), *item.values()]
        elif isinstance(item, (list, tuple, set, frozenset)):
            pending += list(item)
        elif isinstance(item, ForeignObject):
            pending += item.__dict__.get("parts", [])
    return found


class _LightningUnpickler(_XserUnpickler):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._stand_ins: dict[tuple[str, str], type[ForeignObject]] = {}

    def find_class(self, module: str, name: str) -> Any:
        allowed = self._xser_allowed.get((module, name))
        if allowed is not None:
            return allowed
        if (module, name) not in self._stand_ins:
            self._stand_ins[(module, name)] = type(name, (ForeignObject,), {"global_name": f"{module}.{name}"})
        return self._stand_ins[(module, name)]


_LIGHTNING = {**_XSER_STRUCTURE, ("torch", "Size"): _torch_size}  # torch.Size: ZeRO-1's shape_info


def read_lightning_checkpoint(path: Path, max_pickle_bytes: int = 64 * 1024 * 1024,
                              max_tensor_bytes: int = 16 * 1024**3) -> LightningCheckpoint:
    """The state dict of a Lightning checkpoint (plain torch.save, or xser's main file with TensorReferences), and
    every xser tensor id the whole file names. Raises UnsafeCheckpoint when the state dict holds anything but
    tensors, references and plain values."""
    if not zipfile.is_zipfile(path):
        raise UnsafeCheckpoint("is not a zip-format torch checkpoint (legacy pickles are refused)")
    with zipfile.ZipFile(path) as archive:
        pickles = [info for info in archive.infolist() if info.filename.endswith("/data.pkl")
                   or info.filename == "data.pkl"]
        if len(pickles) != 1:
            raise UnsafeCheckpoint("does not hold exactly one data.pkl")
        if pickles[0].file_size > max_pickle_bytes:
            raise UnsafeCheckpoint(f"has a {pickles[0].file_size}-byte data.pkl, above {max_pickle_bytes}")
        prefix = pickles[0].filename.removesuffix("data.pkl")
        byteorder = f"{prefix}byteorder"
        if byteorder in archive.namelist() and archive.read(byteorder).strip() != b"little":
            raise UnsafeCheckpoint("stores big-endian tensors")
        try:
            loaded = _LightningUnpickler(archive.read(pickles[0]), archive, prefix, max_tensor_bytes,
                                         _LIGHTNING).load()
        except UnsafeCheckpoint:
            raise
        except Exception as exc:  # malformed pickles raise anything from IndexError to UnpicklingError
            raise UnsafeCheckpoint(f"could not be read ({type(exc).__name__}: {exc})") from None
    if not isinstance(loaded, dict):
        raise UnsafeCheckpoint("is not a Lightning checkpoint (its top level is not a dict)")
    tids = frozenset(_all_references(loaded))
    state = loaded.get("state_dict")
    if state is None:
        return LightningCheckpoint(None, tids)
    if isinstance(state, ForeignObject):
        raise UnsafeCheckpoint(f"has a state_dict built by {state.global_name}, which loraplex does not run")
    if not isinstance(state, dict):
        raise UnsafeCheckpoint("has a state_dict that is not a dict")
    try:
        for key, value in state.items():
            foreign = _first_foreign(value)
            if foreign is not None:
                raise UnsafeCheckpoint(f"has state_dict entry {key!r} built by {foreign}, which a state dict of "
                                       "tensors never needs; refused without running it")
            if not (isinstance(key, str) and (isinstance(value, (TensorData, XserReference)) or _is_plain(value))):
                raise UnsafeCheckpoint(f"has state_dict entry {key!r}, which is neither a tensor nor a plain value")
    except RecursionError:
        raise UnsafeCheckpoint("has a state_dict entry that contains itself") from None
    return LightningCheckpoint(dict(state), tids)


def _first_foreign(value: Any) -> str | None:
    if isinstance(value, ForeignObject):
        return value.global_name
    if isinstance(value, type) and issubclass(value, ForeignObject):
        return value.global_name
    if isinstance(value, dict):
        value = [*value.keys(), *value.values()]
    if isinstance(value, (list, tuple, set, frozenset)):
        return next((name for name in map(_first_foreign, value) if name is not None), None)
    return None


def read_saved_tensor(payload: bytes, max_tensor_bytes: int = 16 * 1024**3) -> TensorData:
    """The tensor of a `torch.save` archive of that tensor alone (a chunk of a torch distributed checkpoint, say),
    read under the same allow-list as read_state_dict."""
    source = io.BytesIO(payload)
    if not zipfile.is_zipfile(source):
        raise UnsafeCheckpoint("is not a zip-format torch.save payload")
    with zipfile.ZipFile(source) as archive:
        pickles = [info for info in archive.infolist() if info.filename.endswith("/data.pkl")
                   or info.filename == "data.pkl"]
        if len(pickles) != 1 or pickles[0].file_size > 1024 * 1024:
            raise UnsafeCheckpoint("does not hold one small data.pkl, as a saved tensor does")
        prefix = pickles[0].filename.removesuffix("data.pkl")
        byteorder = f"{prefix}byteorder"
        if byteorder in archive.namelist() and archive.read(byteorder).strip() != b"little":
            raise UnsafeCheckpoint("stores big-endian tensors")
        try:
            loaded = _DataUnpickler(archive.read(pickles[0]), archive, prefix, max_tensor_bytes).load()
        except UnsafeCheckpoint:
            raise
        except Exception as exc:  # malformed pickles raise anything from IndexError to UnpicklingError
            raise UnsafeCheckpoint(f"could not be read as a saved tensor ({type(exc).__name__}: {exc})") from None
    if not isinstance(loaded, TensorData):
        raise UnsafeCheckpoint("does not hold a single tensor")
    return loaded


# ---- torch.distributed.checkpoint's .metadata ----------------------------------------------------------------
# A pickle of torch's Metadata dataclass: per tensor its dtype, global shape and chunks, and per chunk the file,
# offset and length of its torch.save payload. Each class it names becomes a plain record; Megatron (core 0.12 to
# 0.15) adds its MCoreMetadata subclass and the save plans (all_local_plans) it gathered, which are records too.

@dataclasses.dataclass(frozen=True)
class DcpChunk:
    offsets: tuple[int, ...]  # where it sits in the global tensor
    sizes: tuple[int, ...]
    file: str  # relative to the checkpoint directory
    offset: int  # its torch.save payload's place in that file
    length: int


@dataclasses.dataclass(frozen=True)
class DcpTensor:
    shape: tuple[int, ...]
    dtype: str  # torch's name: float32, bfloat16...
    chunks: tuple[DcpChunk, ...]


class _Record:
    """Stand-in for a dataclass in .metadata: pickle fills its attributes from the saved state and calls nothing."""


def _record(name: str) -> type[_Record]:
    return type(name, (_Record,), {})


class _Properties(_Record):
    def __setstate__(self, state: Any) -> None:  # TensorProperties pickles as (dtype, layout, grad, format, pin)
        if not isinstance(state, tuple) or not state:
            raise UnsafeCheckpoint("has tensor properties of an unknown shape")
        self.dtype = state[0]


class _Index(_Record):
    """MetadataIndex: the key of a chunk's storage record."""

    def key(self) -> tuple[str, tuple[int, ...] | None]:
        offset = self.__dict__.get("offset")
        return self.__dict__.get("fqn"), (tuple(offset) if offset is not None else None)

    def __hash__(self) -> int:
        return hash(self.key())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Index) and self.key() == other.key()


_Metadata, _TensorStorage, _BytesStorage, _Chunk, _StorageInfo = (
    _record(name) for name in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                               "StorageInfo"))
_DCP = "torch.distributed.checkpoint"
_MEGATRON = "megatron.core.dist_checkpointing.strategies.torch"
_TORCH_DTYPES = ("float32", "float", "float16", "half", "bfloat16", "float64", "double", "int64", "long", "int32",
                 "int", "int16", "short", "int8", "uint8", "bool", "complex64", "complex128", "float8_e4m3fn",
                 "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "uint16", "uint32", "uint64")
_DTYPE_NAMES = {"float": "float32", "half": "float16", "double": "float64", "long": "int64", "int": "int32",
                "short": "int16"}


def _enum_value(value: Any) -> Any:
    return value


def _path(*parts: Any) -> str:
    if not all(isinstance(part, str) for part in parts):
        raise UnsafeCheckpoint("has a path made of something other than strings")
    return "/".join(parts)


_DCP_ALLOWED: dict[tuple[str, str], Any] = {
    (f"{_DCP}.metadata", "Metadata"): _Metadata,
    (f"{_DCP}.metadata", "TensorStorageMetadata"): _TensorStorage,
    (f"{_DCP}.metadata", "BytesStorageMetadata"): _BytesStorage,
    (f"{_DCP}.metadata", "ChunkStorageMetadata"): _Chunk,
    (f"{_DCP}.metadata", "TensorProperties"): _Properties,
    (f"{_DCP}.metadata", "MetadataIndex"): _Index,
    (f"{_DCP}.metadata", "StorageMeta"): _record("StorageMeta"),
    (f"{_DCP}.metadata", "_MEM_FORMAT_ENCODING"): _enum_value,
    # torch before 2.2 kept TensorProperties with the sharded tensor.
    ("torch.distributed._shard.sharded_tensor.metadata", "TensorProperties"): _Properties,
    ("torch.distributed._shard.sharded_tensor.metadata", "MEM_FORMAT_ENCODING"): _enum_value,
    (f"{_DCP}.filesystem", "_StorageInfo"): _StorageInfo,
    (f"{_DCP}.filesystem", "_StoragePrefix"): _record("StoragePrefix"),
    (f"{_DCP}.planner", "SavePlan"): _record("SavePlan"),
    (f"{_DCP}.planner", "WriteItem"): _record("WriteItem"),
    (f"{_DCP}.planner", "WriteItemType"): _enum_value,
    (f"{_DCP}.planner", "TensorWriteData"): _record("TensorWriteData"),
    (f"{_DCP}.planner", "BytesIOWriteData"): _record("BytesIOWriteData"),
    (_MEGATRON, "MCoreMetadata"): _Metadata,
    (_MEGATRON, "MCoreSavePlan"): _record("SavePlan"),
    ("torch", "Size"): lambda values: tuple(int(value) for value in values),
    ("torch.serialization", "_get_layout"): str,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{("pathlib", name): _path for name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath")},
    **{("pathlib._local", name): _path for name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath")},
    **{("torch", name): _DTYPE_NAMES.get(name, name) for name in _TORCH_DTYPES},
}


class _DcpMetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        allowed = _DCP_ALLOWED.get((module, name))
        if allowed is None:
            raise UnsafeCheckpoint(f"refers to {module}.{name}, which the metadata of a torch distributed "
                                   "checkpoint never needs; refused without running it")
        return allowed

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpoint("refers to external storage, which the metadata of a torch distributed checkpoint "
                               "never does")


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(isinstance(v, int) and v >= 0 for v in value):
        raise UnsafeCheckpoint(f"has a {what} that is not a tuple of sizes")
    return value


def read_dcp_metadata(payload: bytes) -> dict[str, DcpTensor]:
    """Tensor name → shape, dtype and stored chunks, from the bytes of a torch distributed checkpoint's .metadata.
    Non-tensor entries (BytesStorageMetadata) are left out."""
    try:
        metadata = _DcpMetadataUnpickler(io.BytesIO(payload)).load()
    except UnsafeCheckpoint:
        raise
    except Exception as exc:  # malformed pickles raise anything from IndexError to UnpicklingError
        raise UnsafeCheckpoint(f"could not be read as checkpoint metadata ({type(exc).__name__}: {exc})") from None
    fields = metadata.__dict__ if isinstance(metadata, _Metadata) else {}
    entries, storage = fields.get("state_dict_metadata"), fields.get("storage_data")
    if not isinstance(entries, dict) or not isinstance(storage, dict):
        raise UnsafeCheckpoint("is not the metadata of a torch distributed checkpoint (no state_dict_metadata "
                               "and storage_data)")
    places = {index.key(): info for index, info in storage.items()
              if isinstance(index, _Index) and isinstance(info, _StorageInfo)}
    tensors = {}
    for name, entry in entries.items():
        if isinstance(entry, _BytesStorage):
            continue
        if not isinstance(name, str) or not isinstance(entry, _TensorStorage):
            raise UnsafeCheckpoint(f"describes {name!r} as neither a tensor nor bytes")
        properties = entry.__dict__.get("properties")
        dtype = properties.__dict__.get("dtype") if isinstance(properties, _Properties) else None
        if not isinstance(dtype, str):
            raise UnsafeCheckpoint(f"gives {name} no dtype")
        chunks = []
        for chunk in entry.__dict__.get("chunks") or []:
            offsets = _ints(chunk.__dict__.get("offsets"), f"chunk offset of {name}")
            sizes = _ints(chunk.__dict__.get("sizes"), f"chunk size of {name}")
            info = places.get((name, offsets))
            if info is None:
                raise UnsafeCheckpoint(f"lists a chunk of {name} at {list(offsets)} without saying where it is "
                                       "stored")
            stored = info.__dict__
            if stored.get("transform_descriptors"):
                raise UnsafeCheckpoint(f"stores {name} through storage extensions "
                                       f"({', '.join(map(str, stored['transform_descriptors']))}), which loraplex "
                                       "does not read")
            file, start, length = stored.get("relative_path"), stored.get("offset"), stored.get("length")
            if not (isinstance(file, str) and isinstance(start, int) and isinstance(length, int)
                    and start >= 0 and length >= 0):
                raise UnsafeCheckpoint(f"has a storage record of {name} that is not a file, offset and length")
            chunks.append(DcpChunk(offsets, sizes, file, start, length))
        tensors[name] = DcpTensor(_ints(entry.__dict__.get("size"), f"shape of {name}"), dtype, tuple(chunks))
    return tensors
