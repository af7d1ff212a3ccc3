"""Prometheus metrics of the operator, served on /metrics (LORAPLEX_METRICS_PORT, default 9090)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily


class OperatorMetrics:
    def __init__(self, adapter_phases: Callable[[], dict[str, int]] | None = None):
        self.registry = CollectorRegistry()
        self.reconciles = Counter("loraplex_operator_reconciles", "Reconciles by kind and result",
                                  ["kind", "result"], registry=self.registry)
        self.reconcile_seconds = Histogram("loraplex_operator_reconcile_seconds", "Reconcile duration by kind",
                                           ["kind"], registry=self.registry,
                                           buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        if adapter_phases is not None:
            self.registry.register(_PhaseCollector(adapter_phases))

    async def timed(self, kind: str, work: Callable[[], Awaitable[None]]) -> None:
        start = time.monotonic()
        try:
            await work()
        except BaseException:
            self.reconciles.labels(kind=kind, result="error").inc()
            raise
        else:
            self.reconciles.labels(kind=kind, result="ok").inc()
        finally:
            self.reconcile_seconds.labels(kind=kind).observe(time.monotonic() - start)

    async def serve(self, port: int) -> web.AppRunner:
        async def metrics(request: web.Request) -> web.Response:
            return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "0.0.0.0", port).start()
        return runner


class _PhaseCollector:
    def __init__(self, phases: Callable[[], dict[str, int]]):
        self.phases = phases

    def collect(self) -> Iterator[Any]:
        family = GaugeMetricFamily("loraplex_operator_adapters", "LoraAdapters by phase", labels=["phase"])
        for phase, count in sorted(self.phases().items()):
            family.add_metric([phase], count)
        yield family
