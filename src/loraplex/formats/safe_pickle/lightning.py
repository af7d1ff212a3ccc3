"""A Lightning checkpoint written by NxD's NeuronCheckpointIO (parallel_layers/checkpointing.py save).

The file is Lightning's whole checkpoint dict: the adapter under "state_dict", beside loop counters, callback and
optimizer states, and possibly hyper-parameters holding any object of the user's. Globals outside the allow-list
resolve to inert stand-ins that record their arguments and run nothing (nothing is imported, no code of the file
is called), so the entries around the state dict are skipped; the state dict itself must be made of allowed parts.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

from loraplex.formats.safe_pickle.restricted import DataUnpickler, TensorData, UnsafeCheckpoint, is_plain
from loraplex.formats.safe_pickle.torch_zip import load_data_pkl
from loraplex.formats.safe_pickle.xser import XSER_STRUCTURE, XserReference, torch_size


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


class _LightningUnpickler(DataUnpickler):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stand_ins: dict[tuple[str, str], type[ForeignObject]] = {}

    def find_class(self, module: str, name: str) -> Any:
        allowed = self._allowed.get((module, name))
        if allowed is not None:
            return allowed
        if (module, name) not in self._stand_ins:
            self._stand_ins[(module, name)] = type(name, (ForeignObject,), {"global_name": f"{module}.{name}"})
        return self._stand_ins[(module, name)]


_LIGHTNING = {**XSER_STRUCTURE, ("torch", "Size"): torch_size}  # torch.Size: ZeRO-1's shape_info


def read_lightning_checkpoint(path: Path, max_pickle_bytes: int = 64 * 1024 * 1024,
                              max_tensor_bytes: int = 16 * 1024**3) -> LightningCheckpoint:
    """The state dict of a Lightning checkpoint (plain torch.save, or xser's main file with TensorReferences), and
    every xser tensor id the whole file names. Raises UnsafeCheckpoint when the state dict holds anything but
    tensors, references and plain values."""
    loaded = load_data_pkl(path, functools.partial(_LightningUnpickler, max_bytes=max_tensor_bytes,
                                                   allowed=_LIGHTNING),
                           max_pickle_bytes=max_pickle_bytes)
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
            if not (isinstance(key, str) and (isinstance(value, (TensorData, XserReference)) or is_plain(value))):
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
