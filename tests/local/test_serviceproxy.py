"""The local kube-proxy on the real control plane: a Service's connections spread over the ready pods it
selects, a pod turning unready (its readiness probe failing, as the kubelet reports) is dropped, and a Service
with no ready pod refuses connections."""

from __future__ import annotations

import socket
import sys
import textwrap
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import kubernetes
import pytest

from loraplex.local.controlplane import ControlPlane
from loraplex.local.kubelet import ProcessKubelet
from loraplex.local.serviceproxy import ServiceProxy
from tests.integration.harness import wait_for

pytestmark = pytest.mark.integration

# Answers every GET with its pod's name; readiness (GET /ready) fails once it is told POST /unready.
NAMED_SERVER = textwrap.dedent("""
    import http.server, os
    ready = True
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            ok = ready or self.path != "/ready"
            self.send_response(200 if ok else 503)
            self.end_headers()
            self.wfile.write(os.environ["HOSTNAME"].encode())
        def do_POST(self):
            global ready
            ready = False
            self.send_response(200)
            self.end_headers()
    http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
""")


@pytest.fixture(scope="module")
def kubelet(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessKubelet]:
    node = ProcessKubelet(control_plane.kubeconfig, tmp_path_factory.mktemp("kubelet"),
                          node_name="serviceproxy-test", gpus=0).start()
    yield node
    node.stop()


@pytest.fixture
def service_proxy(kubeconfig: Path, kubelet: ProcessKubelet, namespace: str) -> Iterator[ServiceProxy]:
    with ServiceProxy(kubeconfig, [kubelet], namespace=namespace) as proxy:
        yield proxy


def core(api_client: kubernetes.client.ApiClient) -> kubernetes.client.CoreV1Api:
    return kubernetes.client.CoreV1Api(api_client)


def create_pod(api_client: kubernetes.client.ApiClient, namespace: str, name: str) -> None:
    core(api_client).create_namespaced_pod(namespace, {"metadata": {"name": name, "labels": {"app": "named"}},
                                                       "spec": {"terminationGracePeriodSeconds": 1, "containers": [{
        "name": "main", "image": "python:3.11", "command": [sys.executable, "-u", "-c", NAMED_SERVER],
        "env": [{"name": "PORT", "value": "8080"}], "ports": [{"name": "http", "containerPort": 8080}],
        "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 1,
                           "failureThreshold": 1}}]}})


def create_service(api_client: kubernetes.client.ApiClient, namespace: str, name: str, app: str) -> None:
    core(api_client).create_namespaced_service(namespace, {"metadata": {"name": name}, "spec": {
        "selector": {"app": app}, "ports": [{"name": "web", "port": 80, "targetPort": "http"}]}})


def answers(url: str, count: int) -> list[str]:
    """Which pod answered each of `count` requests, one connection each."""
    names = []
    for _ in range(count):
        with urllib.request.urlopen(url, timeout=10) as response:
            names.append(response.read().decode())
    return names


def test_connections_spread_over_ready_pods_and_an_unready_pod_is_dropped(service_proxy, kubelet, api_client,
                                                                          namespace):
    create_service(api_client, namespace, "named", app="named")
    for pod in ("first", "second"):
        create_pod(api_client, namespace, pod)
    wait_for(lambda: service_proxy.backends("named", 80) == ["first", "second"], 90, "both pods behind the Service")

    served = Counter(answers(service_proxy.url("named", 80), 6))
    assert served == {"first": 3, "second": 3}  # round-robin, one connection each

    urllib.request.urlopen(urllib.request.Request(kubelet.url(namespace, "first", 8080) + "/unready",
                                                  method="POST"), timeout=10).close()
    wait_for(lambda: service_proxy.backends("named", 80) == ["second"], 60, "the unready pod dropped")
    assert answers(service_proxy.url("named", 80), 4) == ["second"] * 4


def test_a_service_without_ready_endpoints_refuses_connections(service_proxy, api_client, namespace):
    create_service(api_client, namespace, "nobody", app="absent")
    port = wait_for(lambda: service_proxy.port("nobody", 80), 30, "the Service proxied")
    with socket.socket() as client, pytest.raises(ConnectionRefusedError):
        client.connect(("127.0.0.1", port))

    core(api_client).delete_namespaced_service("nobody", namespace)
    wait_for(lambda: not _proxied(service_proxy, "nobody", 80), 30, "the deleted Service no longer proxied")
    with pytest.raises(LookupError, match=f"no Service {namespace}/nobody with port 80"):
        service_proxy.url("nobody", 80)


def test_a_service_whose_pods_all_go_stops_accepting(service_proxy, api_client, namespace):
    create_service(api_client, namespace, "named", app="named")
    create_pod(api_client, namespace, "only")
    wait_for(lambda: service_proxy.backends("named", 80) == ["only"], 90, "the pod behind the Service")
    port = service_proxy.port("named", 80)
    assert answers(f"http://127.0.0.1:{port}", 1) == ["only"]

    core(api_client).delete_namespaced_pod("only", namespace)
    wait_for(lambda: service_proxy.backends("named", 80) == [], 60, "the deleted pod dropped")
    assert service_proxy.port("named", 80) == port  # the Service keeps its port while it has no endpoints
    with socket.socket() as client, pytest.raises(ConnectionRefusedError):
        client.connect(("127.0.0.1", port))


def _proxied(proxy: ServiceProxy, service: str, port: int) -> bool:
    try:
        proxy.port(service, port)
        return True
    except LookupError:
        return False
