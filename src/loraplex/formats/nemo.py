"""NeMo `.nemo` LoRA adapters: a tar of model_config.yaml (peft.lora_tuning) and model_weights.ckpt.

Every member is checked (loraplex.archives) before anything is read. The checkpoint is read with the
restricted unpickler, never executed.
"""

from __future__ import annotations

import re
import tarfile
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from loraplex.api.types import AdapterFormat
from loraplex.archives import UnsafeArchive, safe_members
from loraplex.formats.report import AdapterReport, LoraWeights, Rejection
from loraplex.formats.safe_pickle import UnsafeCheckpoint, read_state_dict_shapes

CONFIG = "model_config.yaml"
WEIGHTS = "model_weights.ckpt"
MAX_CONFIG_BYTES = 4 * 1024 * 1024
# NeMo's adapter modules and the target_modules names that select them.
ADAPTER_MODULES = {
    "lora_kqv_adapter": "attention_qkv",
    "lora_dense_attention_adapter": "attention_dense",
    "lora_hto4h_adapter": "mlp_fc1",
    "lora_4htoh_adapter": "mlp_fc2",
}
_KEY = re.compile(r"layers\.(?P<layer>\d+)\..*\.(?P<adapter>lora_[a-z0-9_]+_adapter)\.linear_(?P<side>in|out)\.weight$")


def find_archive(directory: Path) -> Path | None:
    archives = sorted(directory.glob("*.nemo"))
    return archives[0] if len(archives) == 1 else None


def _normalized(name: str) -> str:
    return str(PurePosixPath(name.lstrip("./"))) if name not in (".", "./") else "."


def inspect(directory: Path, max_bytes: int = 50 * 1024**3) -> AdapterReport:
    path = find_archive(directory)
    if path is None:
        raise Rejection(directory.name or str(directory), "must hold exactly one .nemo file")
    label = path.name
    try:
        archive = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError) as exc:
        raise Rejection(label, f"is not a readable tar archive ({exc})") from None
    with archive:
        try:
            members = {_normalized(m.name): m for m in safe_members(archive, max_bytes)}
        except UnsafeArchive as exc:
            raise Rejection(label, str(exc)) from None
        except tarfile.TarError as exc:
            raise Rejection(label, f"is a corrupt tar archive ({exc})") from None
        config_member, weights_member = members.get(CONFIG), members.get(WEIGHTS)
        if config_member is None or weights_member is None:
            raise Rejection(label, f"must contain {CONFIG} and {WEIGHTS}")
        if config_member.size > MAX_CONFIG_BYTES:
            raise Rejection(label, f"{CONFIG} is {config_member.size} bytes, far above any real config")
        config = _read_config(archive.extractfile(config_member).read(), label)  # type: ignore[union-attr]
        with tempfile.TemporaryDirectory(prefix="loraplex-nemo-") as scratch:
            checkpoint = Path(scratch) / WEIGHTS
            with archive.extractfile(weights_member) as source, checkpoint.open("wb") as target:  # type: ignore[union-attr]
                while chunk := source.read(1024 * 1024):
                    target.write(chunk)
            try:
                shapes = read_state_dict_shapes(checkpoint)
            except UnsafeCheckpoint as exc:
                raise Rejection(f"{label}/{WEIGHTS}", f"refused: {exc}") from None

    rank, targets = config
    pairs: dict[tuple[str, int], dict[str, tuple[int, ...]]] = {}
    for key, info in shapes.items():
        match = _KEY.search(key)
        if not match:
            continue
        module = ADAPTER_MODULES.get(match.group("adapter"), match.group("adapter"))
        pairs.setdefault((module, int(match.group("layer"))), {})[match.group("side")] = info.shape
    if not pairs:
        raise Rejection(f"{label}/{WEIGHTS}", "holds no LoRA adapter weights (…adapter.linear_in/out.weight)")
    weights = []
    for (module, layer), sides in sorted(pairs.items(), key=lambda item: (item[0][1], item[0][0])):
        if set(sides) != {"in", "out"} or len(sides["in"]) != 2 or len(sides["out"]) != 2:
            raise Rejection(f"{label}/{WEIGHTS}", f"layer {layer} {module} lacks a 2-D linear_in/linear_out pair")
        (in_rank, in_features), (out_features, out_rank) = sides["in"], sides["out"]
        if in_rank != rank or out_rank != rank:
            raise Rejection(f"{label}/{WEIGHTS}", f"layer {layer} {module} has rank {in_rank}/{out_rank} but "
                                                  f"{CONFIG} says adapter_dim={rank}")
        weights.append(LoraWeights(module, layer, rank, in_features, out_features))
    found = tuple(sorted({w.module for w in weights}))
    return AdapterReport(
        format=AdapterFormat.NEMO, rank=rank, rank_source=f"{label}: peft.lora_tuning.adapter_dim={rank}",
        target_modules=found if found else targets, weights=tuple(weights),
        size_bytes=path.stat().st_size, files=(label,),
    )


def _read_config(raw: bytes, label: str) -> tuple[int, tuple[str, ...]]:
    try:
        config: Any = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise Rejection(f"{label}/{CONFIG}", f"is not valid YAML ({exc})") from None
    peft = config.get("peft") if isinstance(config, dict) else None
    lora = peft.get("lora_tuning") if isinstance(peft, dict) else None
    if not isinstance(lora, dict):
        raise Rejection(f"{label}/{CONFIG}", "has no peft.lora_tuning section: not a LoRA adapter")
    scheme = peft.get("peft_scheme", "lora")
    if scheme != "lora":
        raise Rejection(f"{label}/{CONFIG}", f"peft.peft_scheme {scheme!r} is not lora")
    rank = lora.get("adapter_dim")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise Rejection(f"{label}/{CONFIG}", f"peft.lora_tuning.adapter_dim={rank!r} must be an integer of at least 1")
    targets = lora.get("target_modules") or ["attention_qkv"]
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise Rejection(f"{label}/{CONFIG}", "peft.lora_tuning.target_modules must be a list of names")
    return rank, tuple(targets)
