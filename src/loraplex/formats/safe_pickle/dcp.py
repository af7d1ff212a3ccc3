"""torch.distributed.checkpoint's .metadata, and the torch.save payloads of the chunks it points at.

The .metadata is a pickle of torch's Metadata dataclass: per tensor its dtype, global shape and chunks, and per chunk
the file, offset and length of its torch.save payload. Each class it names becomes a plain record; Megatron (core
0.12 to 0.15) adds its MCoreMetadata subclass and the save plans (all_local_plans) it gathered, which are records too.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import io
import pickle
from typing import Any

from loraplex.formats.safe_pickle.restricted import DataUnpickler, TensorData, UnsafeCheckpoint, load_restricted
from loraplex.formats.safe_pickle.torch_zip import LayoutRefusals, load_data_pkl

_NOT_ONE_SMALL_PICKLE = "does not hold one small data.pkl, as a saved tensor does"
_SAVED_TENSOR = LayoutRefusals(not_zip="is not a zip-format torch.save payload", not_one_pickle=_NOT_ONE_SMALL_PICKLE,
                               pickle_too_big=_NOT_ONE_SMALL_PICKLE)


def read_saved_tensor(payload: bytes, max_tensor_bytes: int = 16 * 1024**3) -> TensorData:
    """The tensor of a `torch.save` archive of that tensor alone (a chunk of a torch distributed checkpoint, say),
    read under the same allow-list as read_state_dict."""
    loaded = load_data_pkl(io.BytesIO(payload), functools.partial(DataUnpickler, max_bytes=max_tensor_bytes),
                           max_pickle_bytes=1024 * 1024, what="a saved tensor", refusals=_SAVED_TENSOR)
    if not isinstance(loaded, TensorData):
        raise UnsafeCheckpoint("does not hold a single tensor")
    return loaded


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
    metadata = load_restricted(_DcpMetadataUnpickler(io.BytesIO(payload)), "checkpoint metadata")
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
