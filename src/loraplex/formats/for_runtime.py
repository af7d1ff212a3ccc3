"""What the sidecar does with a downloaded adapter before the runtime sees it: validate it, and convert it first
when its runtime loads that format only through loraplex (formats/convert.py)."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path

from loraplex.api.runtime_capabilities import capabilities
from loraplex.api.types import AdapterFormat
from loraplex.formats import inspect, nemo2
from loraplex.formats.convert import ConversionError, convert
from loraplex.formats.report import AdapterReport, Rejection
from loraplex.formats.rules import AdapterPolicy, check


def validate_or_convert(directory: Path, policy: AdapterPolicy) -> tuple[AdapterReport, AdapterFormat | None]:
    """The sidecar's verdict on a downloaded adapter, and the format it was converted from, if it was.

    An adapter whose runtime loads its format only through loraplex's conversion is checked as it came (format,
    rank, shapes against the base model), converted in place, so that `directory` then holds what the runtime
    reads, and that is checked against the runtime's rules as any adapter of its format would be.
    """
    source = inspect(directory, policy.expected_format or AdapterFormat.AUTO)
    caps = capabilities(policy.runtime, policy.runtime_version) if policy.runtime is not None else None
    target = caps.conversion(source.format, nemo2.is_nemo2(directory)) if caps is not None else None
    if target is None:
        check(source, policy)
        return source, None
    check(source, dataclasses.replace(policy, runtime=None, allowed_target_modules=None))
    runtime = caps.name  # type: ignore[union-attr]
    if policy.base_config is None:
        raise Rejection(source.files[0], f"{runtime} loads {source.format.value} adapters only once loraplex "
                                         f"converts them to {target.value}, which needs the base model's "
                                         "config.json: set the BaseModelDeployment's lora.baseModelConfigMap")
    with tempfile.TemporaryDirectory(prefix=".convert-", dir=directory.parent) as scratch:
        converted = Path(scratch) / "adapter"
        try:
            convert(directory, converted, policy.base_config)
        except ConversionError as exc:
            raise Rejection(source.files[0], str(exc)) from None
        for path in list(directory.iterdir()):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        for path in converted.iterdir():
            path.rename(directory / path.name)
    report = inspect(directory, target)
    check(report, dataclasses.replace(policy, expected_format=target, allowed_formats=None))
    return report, source.format
