"""A kube-proxy for the local cluster: each TCP port of each Service gets a port on 127.0.0.1, and every
connection to it goes to the next ready pod (round-robin) that the Service selects. A Service without a ready
pod refuses connections, as kube-proxy's reject rule does.

Pods have no network of their own here: every pod IP is 127.0.0.1 and the process kubelet maps each container
port to a host port. The endpoints come from the pods themselves, not from EndpointSlices, because the API
refuses loopback addresses in a slice and kube-controller-manager cannot write these pods' endpoints (its
Services show FailedToUpdateEndpointSlices events). ClusterIPs stay unrouted: clients use
`ServiceProxy.url(service, port)` instead of the Service's address.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes
import urllib3
from kubernetes.client.rest import ApiException

from loraplex.local.kubelet import ProcessKubelet

logger = logging.getLogger(__name__)

# Watches end after this long and start over from a fresh list, which also lets stop() return promptly.
WATCH_SECONDS = 5
COPY_CHUNK = 64 * 1024

ServiceKey = tuple[str, str, int]  # namespace, Service name, Service port
Backend = tuple[str, int]  # pod name, host port


@dataclass
class ServicePort:
    key: ServiceKey
    host_port: int
    # Bound, never listening: holds the host port while there is nothing to forward to, so connections
    # are refused instead of reaching some other program that took the port.
    reservation: socket.socket
    backends: list[Backend] = field(default_factory=list)
    server: asyncio.Server | None = None
    turn: int = 0


class ServiceProxy:
    def __init__(self, kubeconfig: Path, kubelets: Sequence[ProcessKubelet], namespace: str | None = None):
        """Forwards the Services of `namespace` (every namespace when None) to pods run by `kubelets`."""
        configuration = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(str(kubeconfig), client_configuration=configuration)
        self.client = kubernetes.client.ApiClient(configuration)
        self.client.user_agent = "loraplex-local-service-proxy"
        self.core = kubernetes.client.CoreV1Api(self.client)
        self.kubelets = {kubelet.node_name: kubelet for kubelet in kubelets}
        self.namespace = namespace
        self._services: dict[tuple[str, str], dict[str, Any]] = {}
        self._pods: dict[tuple[str, str], dict[str, Any]] = {}
        self._ports: dict[ServiceKey, ServicePort] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._threads = [
            threading.Thread(target=self._loop.run_forever, name="service-proxy", daemon=True),
            threading.Thread(target=self._watch, args=("services", self._services), name="service-watch",
                             daemon=True),
            threading.Thread(target=self._watch, args=("pods", self._pods), name="pod-watch", daemon=True),
        ]

    # ---- control ------------------------------------------------------------------------------------------

    def start(self) -> ServiceProxy:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads[1:]:
            thread.join(timeout=WATCH_SECONDS + 10)
        asyncio.run_coroutine_threadsafe(self._apply({}), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._threads[0].join(timeout=10)
        self._loop.close()
        self.client.close()

    def __enter__(self) -> ServiceProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def port(self, service: str, port: int, namespace: str | None = None) -> int:
        """The host port that forwards to `port` of the Service `service`."""
        key = (namespace or self.namespace or "default", service, port)
        with self._lock:
            if key not in self._ports:
                known = ", ".join(f"{ns}/{name}:{number}" for ns, name, number in sorted(self._ports)) or "none"
                raise LookupError(f"no Service {key[0]}/{service} with port {port} is proxied (proxied: {known})")
            return self._ports[key].host_port

    def url(self, service: str, port: int, namespace: str | None = None) -> str:
        return f"http://127.0.0.1:{self.port(service, port, namespace)}"

    def backends(self, service: str, port: int, namespace: str | None = None) -> list[str]:
        """The pods that connections to this Service port go to now."""
        key = (namespace or self.namespace or "default", service, port)
        with self._lock:
            entry = self._ports.get(key)
            return [pod for pod, _ in entry.backends] if entry else []

    # ---- what the API says ---------------------------------------------------------------------------------

    def _lister(self, resource: str) -> tuple[Callable[..., Any], tuple[str, ...]]:
        """The list call for `resource` and its positional arguments (the watch needs the call itself)."""
        namespaced, everywhere = {
            "services": (self.core.list_namespaced_service, self.core.list_service_for_all_namespaces),
            "pods": (self.core.list_namespaced_pod, self.core.list_pod_for_all_namespaces),
        }[resource]
        return (namespaced, (self.namespace,)) if self.namespace is not None else (everywhere, ())

    def _watch(self, resource: str, cache: dict[tuple[str, str], dict[str, Any]]) -> None:
        def key(item: dict[str, Any]) -> tuple[str, str]:
            return item["metadata"]["namespace"], item["metadata"]["name"]

        list_call, args = self._lister(resource)
        while not self._stop.is_set():
            try:
                listed = list_call(*args)
                with self._lock:
                    cache.clear()
                    for item in listed.items:
                        serialized = self.client.sanitize_for_serialization(item)
                        cache[key(serialized)] = serialized
                self._refresh()
                stream = kubernetes.watch.Watch().stream(
                    list_call, *args, resource_version=listed.metadata.resource_version, timeout_seconds=WATCH_SECONDS)
                for event in stream:
                    item = self.client.sanitize_for_serialization(event["object"])
                    with self._lock:
                        if event["type"] == "DELETED":
                            cache.pop(key(item), None)
                        elif event["type"] in ("ADDED", "MODIFIED"):
                            cache[key(item)] = item
                    self._refresh()
                    if self._stop.is_set():
                        return
            except (ApiException, OSError, ValueError, urllib3.exceptions.HTTPError) as exc:
                logger.info("%s watch ended (%s); listing again", resource, exc)
                self._stop.wait(1)

    def _refresh(self) -> None:
        with self._lock:
            desired = self._desired()
        asyncio.run_coroutine_threadsafe(self._apply(desired), self._loop).result(timeout=30)

    def _desired(self) -> dict[ServiceKey, list[Backend]]:
        """Each proxied Service port and its ready backends, from the Services and pods seen."""
        desired: dict[ServiceKey, list[Backend]] = {}
        for (namespace, name), service in self._services.items():
            spec = service.get("spec") or {}
            selector = spec.get("selector") or {}
            # ExternalName and headless Services are DNS names only; a Service without a selector has its
            # endpoints written by someone else (`kubernetes`: the apiserver), which this proxy does not read.
            if spec.get("type") == "ExternalName" or spec.get("clusterIP") == "None" or not selector:
                continue
            pods = [pod for (pod_namespace, _), pod in self._pods.items() if pod_namespace == namespace
                    and selector.items() <= (pod["metadata"].get("labels") or {}).items() and _ready(pod)]
            for port in spec.get("ports") or []:
                if port.get("protocol", "TCP") == "TCP":
                    desired[(namespace, name, port["port"])] = sorted(self._backends(pods, port))
        return desired

    def _backends(self, pods: list[dict[str, Any]], service_port: dict[str, Any]) -> list[Backend]:
        backends = []
        for pod in pods:
            kubelet = self.kubelets.get(pod["spec"].get("nodeName", ""))
            container_port = _target_port(pod, service_port.get("targetPort", service_port["port"]))
            if kubelet is None or container_port is None:
                continue  # not run by a kubelet of this proxy, or no such named port: not an endpoint
            meta = pod["metadata"]
            try:
                backends.append((meta["name"], kubelet.port_of(meta["namespace"], meta["name"], container_port)))
            except KeyError:
                continue  # the kubelet stopped the pod since the API last said it was ready
        return backends

    # ---- forwarding (on the event loop) --------------------------------------------------------------------

    async def _apply(self, desired: dict[ServiceKey, list[Backend]]) -> None:
        with self._lock:
            for key in [key for key in self._ports if key not in desired]:
                entry = self._ports.pop(key)
                if entry.server is not None:
                    entry.server.close()
                entry.reservation.close()
                logger.info("service %s/%s:%d no longer proxied", *key)
            for key, backends in desired.items():
                entry = self._ports.get(key)
                if entry is None:
                    entry = self._ports[key] = _reserve(key)
                    logger.info("service %s/%s:%d proxied on 127.0.0.1:%d", *key, entry.host_port)
                if backends != entry.backends:
                    logger.info("service %s/%s:%d endpoints: %s", *key,
                                ", ".join(pod for pod, _ in backends) or "none ready (refusing connections)")
                entry.backends = backends
                if backends and entry.server is None:
                    entry.server = await asyncio.start_server(
                        _bind(self._forward, entry), sock=_listener(entry.host_port))
                elif not backends and entry.server is not None:
                    entry.server.close()  # connections already forwarded carry on, as with kube-proxy
                    entry.server = None

    async def _forward(self, entry: ServicePort, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:
        backends, start = list(entry.backends), entry.turn
        entry.turn += 1
        upstream = None
        for attempt in range(len(backends)):
            pod, port = backends[(start + attempt) % len(backends)]
            try:
                upstream = await asyncio.open_connection("127.0.0.1", port)
                break
            except OSError as exc:
                logger.info("service %s/%s:%d: pod %s refused the connection (%s)", *entry.key, pod, exc)
        if upstream is None:
            writer.close()
            return
        upstream_reader, upstream_writer = upstream
        await asyncio.gather(_copy(reader, upstream_writer), _copy(upstream_reader, writer))
        for stream in (writer, upstream_writer):
            stream.close()


def _ready(pod: dict[str, Any]) -> bool:
    """Ready and not terminating: what kube-proxy sends new connections to."""
    conditions = (pod.get("status") or {}).get("conditions") or []
    return not pod["metadata"].get("deletionTimestamp") and any(
        c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def _target_port(pod: dict[str, Any], target: int | str) -> int | None:
    """A Service's targetPort in this pod: a number as it is, a name looked up in the pod's containers."""
    if isinstance(target, int) or str(target).isdigit():
        return int(target)
    return next((port["containerPort"] for container in pod["spec"].get("containers", [])
                 for port in container.get("ports") or [] if port.get("name") == target), None)


def _reserve(key: ServiceKey) -> ServicePort:
    reservation = socket.socket()
    reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    reservation.bind(("127.0.0.1", 0))
    return ServicePort(key, reservation.getsockname()[1], reservation)


def _listener(port: int) -> socket.socket:
    # Both sockets carry SO_REUSEADDR, so the listener may share the port the reservation holds.
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    return listener


def _bind(forward: Callable[..., Any], entry: ServicePort) -> Callable[..., Any]:
    return lambda reader, writer: forward(entry, reader, writer)


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while data := await reader.read(COPY_CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
