"""The API proxy of the local stack: what clients (kubectl, the python client) see through it, what it counts,
and the faults it injects, against the real control plane."""

from __future__ import annotations

import json
import queue
import ssl
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import kubernetes
import pytest
import urllib3
from kubernetes.client.rest import ApiException
from kubernetes.watch.watch import iter_resp_lines

from loraplex.local.apiproxy import ApiProxy
from loraplex.local.controlplane import ControlPlane, environment_for
from loraplex.local.request_info import RequestInfo, client_name, request_info
from tests.conftest import tool
from tests.integration.harness import wait_for

LORAPLEX = "/apis/loraplex.io/v1alpha1/namespaces/ns/loraadapters"


@pytest.mark.parametrize(("method", "path", "query", "expected"), [
    ("GET", "/api/v1/namespaces/ns/configmaps/a", "", RequestInfo("get", "configmaps", "a")),
    ("GET", "/api/v1/namespaces/ns/configmaps", "", RequestInfo("list", "configmaps")),
    ("GET", "/api/v1/namespaces/ns/configmaps", "watch=true", RequestInfo("watch", "configmaps")),
    ("GET", "/api/v1/namespaces/ns/configmaps", "watch=1&resourceVersion=5", RequestInfo("watch", "configmaps")),
    ("GET", "/api/v1/namespaces/ns/configmaps", "watch=false", RequestInfo("list", "configmaps")),
    ("GET", "/api/v1/pods", "watch=true", RequestInfo("watch", "pods")),
    ("GET", "/api/v1/watch/namespaces/ns/pods", "", RequestInfo("watch", "pods")),
    ("POST", "/api/v1/namespaces/ns/events", "", RequestInfo("create", "events")),
    ("PUT", "/apis/apps/v1/namespaces/ns/deployments/web", "", RequestInfo("update", "deployments.apps", "web")),
    ("PATCH", f"{LORAPLEX}/math", "", RequestInfo("patch", "loraadapters.loraplex.io", "math")),
    ("PATCH", f"{LORAPLEX}/math/status", "", RequestInfo("patch", "loraadapters.loraplex.io/status", "math")),
    ("DELETE", f"{LORAPLEX}/math", "", RequestInfo("delete", "loraadapters.loraplex.io", "math")),
    ("DELETE", LORAPLEX, "", RequestInfo("deletecollection", "loraadapters.loraplex.io")),
    ("GET", "/api/v1/namespaces/ns", "", RequestInfo("get", "namespaces", "ns")),
    ("PUT", "/api/v1/namespaces/ns/finalize", "", RequestInfo("update", "namespaces/finalize", "ns")),
    ("GET", "/api/v1/namespaces", "", RequestInfo("list", "namespaces")),
    ("GET", "/apis/loraplex.io/v1alpha1", "", RequestInfo("get", "/apis/loraplex.io/v1alpha1")),
    ("GET", "/version", "", RequestInfo("get", "/version")),
])
def test_requests_are_named_as_the_apiserver_authorizes_them(method, path, query, expected):
    assert request_info(method, path, parse_qs(query)) == expected


@pytest.mark.parametrize(("user_agent", "client"), [
    ("kopf/1.45.2", "kopf"),
    ("Python/3.11 aiohttp/3.14.5", "aiohttp"),
    ("kubectl/v1.36.2 (linux/amd64) kubernetes/abcdef0", "kubectl"),
    ("OpenAPI-Generator/36.0.3/python", "OpenAPI-Generator"),
    ("", ""),
])
def test_clients_are_named_by_their_product_token(user_agent, client):
    assert client_name(user_agent) == client


# ---- through the proxy to the real apiserver ----------------------------------------------------------

@pytest.fixture
def proxy_kubeconfig(proxy: ApiProxy, control_plane: ControlPlane, namespace: str, tmp_path: Path) -> Path:
    return proxy.write_kubeconfig(tmp_path / "proxy.kubeconfig", control_plane.admin_token, namespace)


@pytest.fixture
def client(proxy_kubeconfig: Path) -> Iterator[kubernetes.client.ApiClient]:
    configuration = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(str(proxy_kubeconfig), client_configuration=configuration)
    with kubernetes.client.ApiClient(configuration) as api:
        yield api


def kubectl(kubeconfig: Path, *args: str, stdin: str | None = None) -> str:
    result = subprocess.run([tool("kubectl"), *args], input=stdin, capture_output=True, text=True, timeout=60,
                            env=environment_for(kubeconfig))
    assert result.returncode == 0, result.stderr
    return result.stdout


def watch_lines(response: urllib3.HTTPResponse, into: queue.Queue[Any]) -> threading.Thread:
    """Read a watch stream on a thread, one event at a time; then None if the stream ended cleanly, or the
    exception that cut it."""
    def read() -> None:
        try:
            for line in iter_resp_lines(response):
                if line:
                    into.put(json.loads(line))
        except Exception as exc:
            into.put(exc)
        else:
            into.put(None)
    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


@pytest.mark.integration
def test_kubectl_applies_and_reads_through_the_proxy(proxy, proxy_kubeconfig, namespace):
    manifest = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings"}, "data": {"a": "1"}}
    kubectl(proxy_kubeconfig, "apply", "-f", "-", stdin=json.dumps(manifest))
    manifest["data"] = {"a": "2"}
    kubectl(proxy_kubeconfig, "apply", "-f", "-", stdin=json.dumps(manifest))
    read = json.loads(kubectl(proxy_kubeconfig, "get", "configmap", "settings", "-o", "json"))
    assert read["metadata"]["namespace"] == namespace and read["data"] == {"a": "2"}
    counts = proxy.counts
    assert counts[("kubectl", "create", "configmaps")] == 1
    assert counts[("kubectl", "patch", "configmaps")] == 1


@pytest.mark.integration
def test_a_watch_streams_each_event_as_it_happens(proxy_kubeconfig):
    kubectl(proxy_kubeconfig, "create", "configmap", "first", "--from-literal=a=0")
    kubectl(proxy_kubeconfig, "label", "configmap", "first", "watched=yes")
    watcher = subprocess.Popen(
        [tool("kubectl"), "get", "configmaps", "-l", "watched", "--watch", "--output-watch-events",
         "-o", 'jsonpath={.type} {.object.metadata.name} {.object.data.a}{"\\n"}'],
        env=environment_for(proxy_kubeconfig), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[list[str]] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line.split()) for line in watcher.stdout or ()], daemon=True).start()
    try:
        assert lines.get(timeout=30) == ["ADDED", "first", "0"]
        kubectl(proxy_kubeconfig, "create", "configmap", "second", "--from-literal=a=1")
        kubectl(proxy_kubeconfig, "label", "configmap", "second", "watched=yes")
        assert lines.get(timeout=30) == ["ADDED", "second", "1"]
        kubectl(proxy_kubeconfig, "patch", "configmap", "second", "-p", '{"data": {"a": "2"}}')
        assert lines.get(timeout=30) == ["MODIFIED", "second", "2"]
        assert watcher.poll() is None, "the watch ended"
    finally:
        watcher.kill()
        watcher.wait()


@pytest.mark.integration
def test_injected_conflict_reaches_the_client_as_the_apiserver_words_it(proxy, client, namespace):
    core = kubernetes.client.CoreV1Api(client)
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "settings"}, "data": {"a": "1"}})
    proxy.inject("patch", "configmaps", 409)
    with pytest.raises(ApiException) as refused:
        core.patch_namespaced_config_map("settings", namespace, {"data": {"a": "2"}})
    status = json.loads(refused.value.body)
    assert (refused.value.status, status["kind"], status["reason"]) == (409, "Status", "Conflict")
    assert 'configmaps "settings"' in status["message"]
    assert proxy.injected_remaining("patch", "configmaps") == 0
    assert core.read_namespaced_config_map("settings", namespace).data == {"a": "1"}, "forwarded after all"

    core.patch_namespaced_config_map("settings", namespace, {"data": {"a": "2"}})
    assert core.read_namespaced_config_map("settings", namespace).data == {"a": "2"}


@pytest.mark.integration
def test_injected_throttling_carries_retry_after(proxy, control_plane, namespace):
    proxy.inject("list", "configmaps", 429, retry_after=1)
    request = urllib.request.Request(f"{proxy.url}/api/v1/namespaces/{namespace}/configmaps",
                                     headers={"Authorization": f"Bearer {control_plane.admin_token}"})
    tls = ssl.create_default_context(cafile=str(proxy.ca_file))
    with pytest.raises(urllib.error.HTTPError) as throttled:
        urllib.request.urlopen(request, context=tls, timeout=30)
    assert (throttled.value.code, throttled.value.headers["Retry-After"]) == (429, "1")
    status = json.loads(throttled.value.read())
    assert (status["reason"], status["details"]["retryAfterSeconds"]) == ("TooManyRequests", 1)
    with urllib.request.urlopen(request, context=tls, timeout=30) as response:
        assert json.loads(response.read())["kind"] == "ConfigMapList"


@pytest.mark.integration
def test_a_client_that_honours_retry_after_gets_through(proxy, client, namespace):
    proxy.inject("list", "configmaps", 429, count=2, retry_after=1)
    kubernetes.client.CoreV1Api(client).list_namespaced_config_map(namespace)  # urllib3 waits and retries
    assert proxy.injected_remaining("list", "configmaps") == 0
    assert proxy.counts[("OpenAPI-Generator", "list", "configmaps")] == 3


@pytest.mark.integration
def test_requests_are_counted_by_client_verb_and_resource(proxy, client, namespace):
    custom = kubernetes.client.CustomObjectsApi(client)
    args = ("loraplex.io", "v1alpha1", namespace, "loraadapters")
    custom.create_namespaced_custom_object(*args, {
        "apiVersion": "loraplex.io/v1alpha1", "kind": "LoraAdapter", "metadata": {"name": "math"},
        "spec": {"baseModel": "llama3", "source": "s3://adapters/math"}})
    custom.patch_namespaced_custom_object_status(*args, "math", {"status": {"phase": "Pending"}})
    custom.get_namespaced_custom_object(*args, "math")
    custom.get_namespaced_custom_object(*args, "math")
    custom.list_namespaced_custom_object(*args)
    custom.delete_namespaced_custom_object(*args, "math")
    assert proxy.counts == {
        ("OpenAPI-Generator", "create", "loraadapters.loraplex.io"): 1,
        ("OpenAPI-Generator", "patch", "loraadapters.loraplex.io/status"): 1,
        ("OpenAPI-Generator", "get", "loraadapters.loraplex.io"): 2,
        ("OpenAPI-Generator", "list", "loraadapters.loraplex.io"): 1,
        ("OpenAPI-Generator", "delete", "loraadapters.loraplex.io"): 1,
    }
    proxy.reset_counts()
    assert not proxy.counts


def open_watch(core: kubernetes.client.CoreV1Api, namespace: str) -> queue.Queue[Any]:
    """Watch one labelled ConfigMap, and wait until the stream delivered it."""
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "settings", "labels": {"watched": "yes"}}})
    response = core.list_namespaced_config_map(namespace, label_selector="watched", watch=True,
                                               timeout_seconds=300, _preload_content=False)
    events: queue.Queue[Any] = queue.Queue()
    watch_lines(response, events)
    assert events.get(timeout=30)["object"]["metadata"]["name"] == "settings"
    return events


@pytest.mark.integration
def test_close_watches_ends_open_watch_streams(proxy, client, namespace):
    core = kubernetes.client.CoreV1Api(client)
    events = open_watch(core, namespace)
    proxy.close_watches()
    assert events.get(timeout=30) is None, "the stream ended without an error"
    assert core.read_namespaced_config_map("settings", namespace), "the proxy still serves"


@pytest.mark.integration
def test_down_refuses_connections_and_cuts_streams_until_up(proxy, client, namespace):
    core = kubernetes.client.CoreV1Api(client)
    events = open_watch(core, namespace)
    proxy.down()
    assert isinstance(events.get(timeout=30), urllib3.exceptions.ProtocolError), "the stream was cut"
    with pytest.raises(urllib3.exceptions.MaxRetryError, match="Connection refused"):
        core.read_namespaced_config_map("settings", namespace, _request_timeout=5)
    proxy.up()
    assert core.read_namespaced_config_map("settings", namespace)


@pytest.mark.integration
def test_an_outage_ends_by_itself(proxy, client, namespace):
    core = kubernetes.client.CoreV1Api(client)
    proxy.outage(5)
    with pytest.raises(urllib3.exceptions.MaxRetryError, match="Connection refused"):
        core.list_namespaced_config_map(namespace, _request_timeout=5)
    wait_for(lambda: core.list_namespaced_config_map(namespace, _request_timeout=5), what="the proxy back up")
