"""Prometheus metrics of one sidecar, served on /metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from loraplex.sidecar.residency import ResidencyGauge


class SidecarMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.adapters = Gauge("loraplex_sidecar_adapters", "Adapters of this replica by state", ["state"],
                              registry=self.registry)
        self.sync_seconds = Histogram("loraplex_sidecar_sync_seconds", "Seconds from starting an adapter sync to "
                                      "loaded or failed", registry=self.registry,
                                      buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900))
        self.bytes = Counter("loraplex_sidecar_downloaded_bytes", "Adapter bytes transferred",
                             registry=self.registry)
        self.failures = Counter("loraplex_sidecar_failures", "Adapter failures by reason", ["reason"],
                                registry=self.registry)
        self.load_seconds = Histogram("loraplex_sidecar_runtime_load_seconds", "Seconds the runtime took to load "
                                      "an adapter", registry=self.registry,
                                      buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.residency = ResidencyGauge(self.registry)
