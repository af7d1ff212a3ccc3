"""`loraplex sidecar`: wire the agent to the API, the runtime, the volume and the HTTP endpoints."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from loraplex.api.contract import SidecarSettings
from loraplex.kube import KubeClient
from loraplex.sidecar.agent import Agent, default_session
from loraplex.sidecar.desired import follow_adapter_set
from loraplex.sidecar.metrics import SidecarMetrics
from loraplex.sidecar.reporter import ReplicaReporter
from loraplex.sidecar.runtimes import client_for
from loraplex.sources import Downloader
from loraplex.sources.s3 import S3Client

logger = logging.getLogger(__name__)


def http_app(agent: Agent, metrics: SidecarMetrics) -> web.Application:
    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def readyz(request: web.Request) -> web.Response:
        if agent.initial_sync_done:
            return web.Response(text="ok")
        return web.Response(status=503, text="initial adapter sync in progress")

    async def metrics_endpoint(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_endpoint)
    return app


class _StoreEvents(FileSystemEventHandler):
    def __init__(self, loop: asyncio.AbstractEventLoop, agent: Agent):
        self.loop, self.agent = loop, agent

    def on_any_event(self, event: FileSystemEvent) -> None:
        self.loop.call_soon_threadsafe(self.agent.local_store_changed)


async def run(settings: SidecarSettings) -> None:
    metrics = SidecarMetrics()
    kube = KubeClient.from_environment()
    runtime = client_for(settings.runtime, settings.runtime_url, settings.served_model, settings.nim_refresh_seconds,
                         settings.runtime_version)
    session = default_session()
    reporter = ReplicaReporter(kube, settings.namespace, settings.pod_name, settings.pod_uid, settings.base_model)
    s3 = S3Client(settings.s3_endpoint, settings.s3_region, bool(settings.s3_force_path_style))
    agent = Agent(settings, reporter, runtime, Downloader(session, s3=s3, store_root=settings.store_root), metrics)

    runner = web.AppRunner(http_app(agent, metrics), access_log=None)  # probes every few seconds: no log spam
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", settings.http_port).start()
    observer = None
    if settings.store_root is not None and settings.store_root.is_dir():
        observer = Observer()
        observer.schedule(_StoreEvents(asyncio.get_running_loop(), agent), str(settings.store_root), recursive=True)
        observer.start()
    logger.info("sidecar of %s/%s following ConfigMap %s (runtime %s at %s)", settings.namespace, settings.pod_name,
                settings.adapter_set, settings.runtime.value, settings.runtime_url)
    tasks = [
        asyncio.create_task(agent.run(), name="agent"),
        asyncio.create_task(reporter.run(), name="reporter"),
        asyncio.create_task(agent.watch_runtime(), name="runtime-watch"),
        asyncio.create_task(agent.watch_demand(), name="demand-watch"),
        asyncio.create_task(reporter.watch(), name="report-watch"),
        asyncio.create_task(agent.watch_local_store(), name="local-store"),
        asyncio.create_task(follow_adapter_set(kube, settings.namespace, settings.adapter_set, agent.on_adapter_set),
                            name="adapter-set"),
    ]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()  # a crashed loop ends the sidecar so the kubelet restarts it
    finally:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            await reporter.flush()
        if observer is not None:
            observer.stop()
        await runner.cleanup()
        await session.close()
        await runtime.close()
        await kube.close()
