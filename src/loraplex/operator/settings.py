"""Operator-wide settings, read once from the environment (the Helm chart sets them)."""

from __future__ import annotations

import dataclasses
import os

from loraplex import __version__


@dataclasses.dataclass(frozen=True)
class OperatorSettings:
    sidecar_image: str = f"loraplex/loraplex:{__version__}"
    sidecar_image_pull_policy: str = "IfNotPresent"
    # A full level-triggered pass over every BaseModelDeployment, in case an event was missed.
    resync_seconds: float = 300.0
    metrics_port: int = 9090  # 0 turns the /metrics endpoint off
    # Least time between two writes of one base model's adapter set (or status) during a burst of changes.
    batch_seconds: float = 0.2
    # The API server refuses a ConfigMap with more than 1 MiB of data; lower it for a stricter server.
    adapter_set_max_bytes: int = 1024 * 1024

    @classmethod
    def from_environment(cls) -> OperatorSettings:
        defaults = cls()
        return cls(
            sidecar_image=os.environ.get("LORAPLEX_SIDECAR_IMAGE", defaults.sidecar_image),
            sidecar_image_pull_policy=os.environ.get("LORAPLEX_SIDECAR_IMAGE_PULL_POLICY",
                                                     defaults.sidecar_image_pull_policy),
            resync_seconds=float(os.environ.get("LORAPLEX_RESYNC_SECONDS", defaults.resync_seconds)),
            metrics_port=int(os.environ.get("LORAPLEX_METRICS_PORT", defaults.metrics_port)),
            batch_seconds=float(os.environ.get("LORAPLEX_BATCH_SECONDS", defaults.batch_seconds)),
            adapter_set_max_bytes=int(os.environ.get("LORAPLEX_ADAPTER_SET_MAX_BYTES",
                                                     defaults.adapter_set_max_bytes)),
        )
