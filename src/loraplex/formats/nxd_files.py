"""Where an NxD LoRA checkpoint's files sit and how they load (docs/formats/nxd.md §1): nxd.save_checkpoint's rank
files, written by torch.save or by torch_xla's xser (use_xser=True), the Lightning checkpoints NxD's
NeuronCheckpointIO writes per rank (tp_rank_XX_pp_rank_YY/checkpoint.pt, or xser's tp_rank_XX_pp_rank_YY file),
LoraModel.save_lora's adapter_model.pt, and NxD's adapter_config.json. Every file goes through the restricted
unpickler, so nothing in them runs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from loraplex.formats.report import Rejection
from loraplex.formats.safe_pickle.lightning import read_lightning_checkpoint
from loraplex.formats.safe_pickle.restricted import TensorData, TensorInfo, UnsafeCheckpoint
from loraplex.formats.safe_pickle.xser import XserReference, read_xser_info, read_xser_structure, read_xser_tensor

SINGLE = "adapter_model.pt"  # LoraModel.save_lora, single device
CONFIG = "adapter_config.json"
CONFIG_KEY = "lora_config"
MAX_CONFIG_BYTES = 1024 * 1024
RANK_FILE = re.compile(r"^dp_rank_(?P<dp>\d+)_tp_rank_(?P<tp>\d+)_pp_rank_(?P<pp>\d+)(?:_ep_rank_(?P<ep>\d+))?\.pt$")
# The rank files sit in <checkpoint_dir>/<tag>/model/ (save_checkpoint) or <lora_save_dir>/<tag>/ (what the
# LoRA loader reads); the user may point at any of those folders, or at the training's working directory.
_RANK_GLOBS = ("dp_rank_*.pt", "*/dp_rank_*.pt", "*/*/dp_rank_*.pt", "*/*/*/dp_rank_*.pt")
# NeuronCheckpointIO (parallel_layers/checkpointing.py save): <.ckpt folder>/tp_rank_XX_pp_rank_YY/checkpoint.pt, or
# with xser the file tp_rank_XX_pp_rank_YY itself; _dp_rank_ZZ is added when every data-parallel rank saves (ZeRO-1).
LIGHTNING_RANK = re.compile(r"^tp_rank_(?P<tp>\d{2,})_pp_rank_(?P<pp>\d{2,})(?:_dp_rank_(?P<dp>\d{2,}))?$")
LIGHTNING_FILE = "checkpoint.pt"
# xser names a rank file's tensors by the order it met them in (torch_xla serialization._get_tensor_file).
_TENSOR_FILE = re.compile(r"^tensor_(?P<tid>0|[1-9]\d*)\.pt$")


def rank_files(directory: Path) -> list[Path]:
    found = {path for pattern in _RANK_GLOBS for path in directory.glob(pattern) if RANK_FILE.match(path.name)}
    return sorted(found)


def lightning_files(directory: Path) -> list[Path]:
    """Each rank's file of NeuronCheckpointIO's save, in the folder given or up to three levels below it."""
    found: set[Path] = set()
    for prefix in ("", "*/", "*/*/", "*/*/*/"):
        found |= {path for path in directory.glob(f"{prefix}tp_rank_*/{LIGHTNING_FILE}")
                  if LIGHTNING_RANK.match(path.parent.name) and path.is_file()}
        found |= {path for path in directory.glob(f"{prefix}tp_rank_*")
                  if LIGHTNING_RANK.match(path.name) and path.is_file()}
    return sorted(found)


def is_lightning(path: Path) -> bool:
    return LIGHTNING_RANK.match(path.name) is not None or (path.name == LIGHTNING_FILE
                                                           and LIGHTNING_RANK.match(path.parent.name) is not None)


def _rank_name(path: Path) -> str:
    """The name that carries the ranks: the file's own, or for checkpoint.pt its folder's."""
    return path.parent.name if path.name == LIGHTNING_FILE else path.name


def _save_folder(path: Path) -> Path:
    """The folder one save wrote its rank files into."""
    return path.parent.parent if path.name == LIGHTNING_FILE else path.parent


def single_files(directory: Path) -> list[Path]:
    return sorted(path for path in (directory / SINGLE, *directory.glob(f"*/{SINGLE}")) if path.is_file())


def is_nxd_config(path: Path) -> bool:
    try:
        config = json.loads(path.read_text()) if path.stat().st_size <= MAX_CONFIG_BYTES else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(config, dict) and "lora_rank" in config and "peft_type" not in config


def _relative(path: Path, directory: Path) -> str:
    return str(path.relative_to(directory))


def locate(directory: Path) -> tuple[list[Path], list[str]]:
    """The files of one checkpoint, in tp order, and their labels; refuses what cannot be converted."""
    label = directory.name or str(directory)
    found, singles = rank_files(directory) + lightning_files(directory), single_files(directory)
    if not found:
        if len(singles) > 1:
            names = ", ".join(_relative(path, directory) for path in singles)
            raise Rejection(label, f"holds {len(singles)} NxD adapters ({names}); point at the folder of one of them")
        if not singles:
            raise Rejection(label, "holds no NxD LoRA checkpoint: expected dp_rank_00_tp_rank_XX_pp_rank_YY.pt rank "
                                   f"files, Lightning's tp_rank_XX_pp_rank_YY/{LIGHTNING_FILE} or {SINGLE}")
        return singles, [_relative(singles[0], directory)]
    saves = sorted({(_save_folder(path), is_lightning(path), path.name == LIGHTNING_FILE) for path in found})
    if len(saves) > 1:
        names = ", ".join(_relative(folder, directory) or "." for folder, _, _ in saves)
        raise Rejection(label, f"holds {len(saves)} NxD checkpoints ({names}); point at the tag or .ckpt folder of "
                               "the one to convert")
    folder, lightning, _ = saves[0]
    folder_label = label if folder == directory else _relative(folder, directory)
    if (folder.parent / "checkpoint").is_file() and not (folder.parent / "done").is_file() and not lightning:
        raise Rejection(_relative(folder.parent, directory) or label,
                        "has a checkpoint marker but no done marker: the save did not finish on every rank")
    by_rank: dict[tuple[int, int], Path] = {}
    for path in found:
        name = _relative(path, directory)
        tp, pp = _ranks(path, name)
        if (tp, pp) in by_rank:
            raise Rejection(folder_label, f"holds two files for tp rank {tp:02d} and pp rank {pp:02d} "
                                          f"({_relative(by_rank[(tp, pp)], directory)} and {name}); they come from "
                                          "different saves")
        if tp >= 0:
            by_rank[(tp, pp)] = path
    pipeline = sorted({pp for _, pp in by_rank})
    if len(pipeline) > 1:
        raise Rejection(folder_label,
                        f"holds pipeline-parallel ranks {', '.join(f'{pp:02d}' for pp in pipeline)}, but NxD cannot "
                        "save a LoRA adapter with pp>1: NxDModel.state_dict() then returns each stage's "
                        "local_state_dict, past LoraModel's adapter filter and lora_config, and the stages were cut "
                        "before LoRA was injected, so they hold base weights only (docs/formats/nxd.md §4.3); "
                        "loraplex converts checkpoints saved with pp=1")
    if not by_rank:
        raise Rejection(folder_label, "holds rank files of data-parallel ranks other than 00 only; NxD's dp rank 00 "
                                      "file of each tp rank is the one to copy")
    tp_ranks = sorted(tp for tp, _ in by_rank)
    missing = sorted(set(range(tp_ranks[-1] + 1)) - set(tp_ranks))
    if missing:
        names = ", ".join(_rank_file_name(found[0], tp, pipeline[0]) for tp in missing)
        raise Rejection(folder_label, f"lacks the tensor-parallel rank file {names}: every tp rank holds its own slice")
    files = [by_rank[(tp, pipeline[0])] for tp in tp_ranks]
    return files, [_relative(path, directory) for path in files]


def _rank_file_name(like: Path, tp: int, pp: int) -> str:
    """The name rank `tp` of stage `pp` has in the layout of `like`."""
    if not is_lightning(like):
        return f"dp_rank_00_tp_rank_{tp:02d}_pp_rank_{pp:02d}.pt"
    match = LIGHTNING_RANK.match(_rank_name(like))
    assert match is not None
    name = f"tp_rank_{tp:02d}_pp_rank_{pp:02d}" + ("" if match["dp"] is None else "_dp_rank_00")
    return f"{name}/{LIGHTNING_FILE}" if like.name == LIGHTNING_FILE else name


def _ranks(path: Path, name: str) -> tuple[int, int]:
    """(tp, pp) of a rank file; tp is -1 for a Lightning file of a data-parallel rank other than 00, which holds
    the same model as rank 00's and is left unread."""
    if is_lightning(path):
        match = LIGHTNING_RANK.match(_rank_name(path))
        assert match is not None
        if match["dp"] is not None and int(match["dp"]) != 0:
            return -1, int(match["pp"])
        return int(match["tp"]), int(match["pp"])
    match = RANK_FILE.match(path.name)
    assert match is not None
    if match["ep"] is not None:
        raise Rejection(name, "comes from an expert-parallel run (ep_rank in its name), which NxD's LoRA layers "
                              "do not shard and loraplex does not convert")
    if int(match["dp"]) != 0:
        raise Rejection(name, "has a data-parallel rank other than 00, which NxD never writes for a model")
    return int(match["tp"]), int(match["pp"])


def _tensor_folder(path: Path) -> Path:
    return path.with_name(f"{path.name}.tensors")


def _info_file(path: Path) -> Path:
    return path.with_name(f"{path.name}.info.pt")


def load_rank(path: Path, label: str) -> dict[str, Any]:
    """A rank file's dict (a Lightning file's state_dict), with xser's tensor references replaced by the tensors
    they name."""
    if is_lightning(path):
        return _lightning_state_dict(path, label)
    structure = _unpickled(read_xser_structure, path, label)
    references = {key: value.tid for key, value in structure.items() if isinstance(value, XserReference)}
    if references:
        return {**structure, **_xser_tensors(path, label, structure, references, set(references.values()))}
    if _tensor_folder(path).exists():
        raise Rejection(f"{label}.tensors", f"sits beside {path.name}, which refers to no xser tensor: the folder "
                                            "belongs to another save")
    return structure


def _lightning_state_dict(path: Path, label: str) -> dict[str, Any]:
    """The adapter of a Lightning checkpoint: NeuronLTModule.state_dict() is NxDModel's, hence LoraModel's, under
    "state_dict". With xser, tensors outside it have files too; they must exist only as far as the state dict
    needs them."""
    checkpoint = _unpickled(read_lightning_checkpoint, path, label)
    if checkpoint.state_dict is None:
        raise Rejection(label, "holds no state_dict entry, so it is not a Lightning checkpoint of a model")
    state = checkpoint.state_dict
    references = {key: value.tid for key, value in state.items() if isinstance(value, XserReference)}
    if checkpoint.tids:
        return {**state, **_xser_tensors(path, label, state, references, set(checkpoint.tids))}
    if _tensor_folder(path).exists():
        raise Rejection(f"{label}.tensors", f"sits beside {path.name}, which refers to no xser tensor: the folder "
                                            "belongs to another save")
    return state


def _unpickled(read: Any, path: Path, label: str) -> Any:
    try:
        return read(path)
    except UnsafeCheckpoint as exc:
        raise Rejection(label, f"refused: {exc}") from None
    except OSError as exc:
        raise Rejection(label, f"could not be read ({exc})") from None


def _xser_tensors(path: Path, label: str, structure: dict[str, Any], references: dict[str, int],
                  claimed: set[int]) -> dict[str, Any]:
    """key → TensorData for each reference, read from <rank file>.tensors/tensor_<tid>.pt by id: the ids, not the
    order of the keys, say which file is whose. `claimed` holds every id the main file names, for the folder may
    hold no other file."""
    folder, folder_label = _tensor_folder(path), f"{label}.tensors"
    if not folder.is_dir():
        raise Rejection(label, f"is an xser file (it holds tensor references), but its tensor folder {folder.name}/ "
                               "is missing beside it; copy the folder with it")
    inline = sorted(key for key, value in structure.items() if isinstance(value, TensorData))
    if inline and references:
        raise Rejection(label, f"holds {inline[0]} as a tensor beside xser tensor references, which NxD never writes")
    present = {entry.name for entry in folder.iterdir()}
    strays = sorted(name for name in present if not _TENSOR_FILE.match(name) or not (folder / name).is_file())
    if strays:
        raise Rejection(f"{folder_label}/{strays[0]}", "is not an xser tensor file (tensor_<id>.pt)")
    wanted = {f"tensor_{tid}.pt": key for key, tid in references.items()}
    lacking = sorted(wanted.keys() - present, key=lambda name: references[wanted[name]])
    if lacking:
        raise Rejection(folder_label, f"lacks {lacking[0]}, which holds {wanted[lacking[0]]}: the save did not "
                                      "finish or the folder was copied in part")
    unclaimed = sorted(present - {f"tensor_{tid}.pt" for tid in claimed})
    if unclaimed:
        raise Rejection(f"{folder_label}/{unclaimed[0]}", f"is named by no key of {path.name}: the folder mixes "
                                                           "tensors of another save")
    info = _info(path, label, claimed)
    tensors: dict[int, TensorData] = {}
    for tid in sorted(set(references.values())):
        name = f"tensor_{tid}.pt"
        tensor = _unpickled(read_xser_tensor, folder / name, f"{folder_label}/{name}")
        expected = info.get(tid)
        if expected is not None and (expected.dtype, expected.shape) != (tensor.dtype, tensor.array.shape):
            raise Rejection(f"{folder_label}/{name}",
                            f"holds a {list(tensor.array.shape)} {tensor.dtype} tensor, but {_info_file(path).name} "
                            f"gives {list(expected.shape)} {expected.dtype} for {wanted[name]}")
        tensors[tid] = tensor
    return {key: tensors[tid] for key, tid in references.items()}


def _info(path: Path, label: str, tids: set[int]) -> dict[int, TensorInfo]:
    """NxD's side file of each tensor's dtype and shape; older NxD releases and torch_xla's own xser.save write
    none."""
    info_path = _info_file(path)
    if not info_path.is_file():
        return {}
    info = _unpickled(read_xser_info, info_path, f"{label}.info.pt")
    if info.keys() != tids:
        odd = sorted(info.keys() ^ tids)[0]
        raise Rejection(f"{label}.info.pt", f"describes other tensors than {path.name} refers to (tensor id {odd} "
                                            "is in one only): they come from different saves")
    return info


def checkpoint_bytes(path: Path) -> int:
    """A rank file's size with its xser tensor folder and info file, if it has them."""
    extra = [_info_file(path), *(_tensor_folder(path).glob("tensor_*.pt"))]
    return path.stat().st_size + sum(file.stat().st_size for file in extra if file.is_file())


def config_file(directory: Path, first: Path) -> Path | None:
    """adapter_config.json where NxD writes it (lora_save_dir, relative to the training's working directory):
    beside the rank files, in a folder above them up to the one given, or in lora_adapter/ under one of those."""
    folder = first.parent
    candidates = []
    while True:
        candidates += [folder / CONFIG, folder / "lora_adapter" / CONFIG]
        if folder == directory or directory not in folder.parents:
            break
        folder = folder.parent
    return next((path for path in candidates if path.is_file()), None)
