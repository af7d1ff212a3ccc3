"""Adapter formats: detect which one a folder holds, inspect it from headers, check it against a policy.

Each format is one module with `inspect(directory) -> AdapterReport`; `rules.check` holds the rules
common to all of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loraplex.api.types import AdapterFormat
from loraplex.formats import hf, nemo, nemo2, nxd, trtllm
from loraplex.formats.report import AdapterReport, LoraWeights, Rejection
from loraplex.formats.rules import AdapterPolicy, check

__all__ = ["AdapterPolicy", "AdapterReport", "LoraWeights", "Rejection", "detect_format", "inspect", "validate"]


def detect_format(directory: Path) -> AdapterFormat:
    if nxd.is_nxd(directory):  # first: NxD's own adapter_config.json sits where a PEFT one would
        return AdapterFormat.NXD
    if hf.is_hf(directory):
        return AdapterFormat.HF
    if nemo.find_archive(directory) is not None or nemo2.is_nemo2(directory):
        return AdapterFormat.NEMO
    if trtllm.is_trtllm(directory):
        return AdapterFormat.TRTLLM
    raise Rejection(directory.name or str(directory), "holds no adapter: expected adapter_config.json, one .nemo "
                    "file, NeMo 2's weights/ and context/ folders, model.lora_config.npy with "
                    "model.lora_weights.npy, or NxD's dp_rank_00_tp_rank_XX_pp_rank_00.pt rank files or "
                    "adapter_model.pt")


def inspect(directory: Path, fmt: AdapterFormat = AdapterFormat.AUTO) -> AdapterReport:
    found = detect_format(directory)
    if fmt not in (AdapterFormat.AUTO, found):
        raise Rejection(directory.name or str(directory), f"holds a {found.value} adapter, not {fmt.value}")
    return {AdapterFormat.HF: hf.inspect, AdapterFormat.NEMO: nemo_module(directory).inspect,
            AdapterFormat.TRTLLM: trtllm.inspect, AdapterFormat.NXD: nxd.inspect}[found](directory)


def nemo_module(directory: Path) -> Any:
    """The reader of a NeMo adapter (format nemo): nemo for a .nemo archive, nemo2 for a NeMo 2 checkpoint."""
    return nemo if nemo.find_archive(directory) is not None or not nemo2.is_nemo2(directory) else nemo2


def validate(directory: Path, policy: AdapterPolicy) -> AdapterReport:
    """The full verdict: an AdapterReport when the runtime may load it, else a Rejection."""
    report = inspect(directory, policy.expected_format or AdapterFormat.AUTO)
    check(report, policy)
    return report
