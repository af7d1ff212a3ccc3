"""The process kubelet on the real control plane: scheduling onto its GPU node, what a container gets (env,
volumes, its ServiceAccount's token with RBAC enforced), probes, restarts and termination."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest

from loraplex.local.controlplane import ControlPlane
from loraplex.local.kubelet import ProcessKubelet
from tests.integration.harness import wait_for

pytestmark = pytest.mark.integration

# Run in the container: in-cluster credentials, one allowed call and one the Role does not grant.
PROBE_SCRIPT = textwrap.dedent("""
    import os, kubernetes
    kubernetes.config.load_incluster_config()
    core = kubernetes.client.CoreV1Api()
    namespace = open("/var/run/secrets/kubernetes.io/serviceaccount/namespace").read()
    names = sorted(cm.metadata.name for cm in core.list_namespaced_config_map(namespace).items)
    print("configmaps:", ",".join(names))
    try:
        core.list_namespaced_secret(namespace)
        print("secrets: allowed")
    except kubernetes.client.ApiException as exc:
        print("secrets:", exc.status)
    print("env:", os.environ["FROM_SECRET"], os.environ["FROM_KEY"], os.environ["MY_NAME"], os.environ["MY_NODE"])
    print("file:", open("/etc/greeting/greeting.txt").read())
    open("/shared/handoff", "w").write("from the first container")
    import http.server, socketserver
    socketserver.TCPServer(("127.0.0.1", int(os.environ["PORT"])), http.server.SimpleHTTPRequestHandler
                           ).serve_forever()
""")


@pytest.fixture(scope="module")
def kubelet(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessKubelet]:
    node = ProcessKubelet(control_plane.kubeconfig, tmp_path_factory.mktemp("kubelet"), node_name="kubelet-test",
                          gpus=2, labels={"gpu.example/product": "tiny"}, restart_backoff_seconds=1).start()
    yield node
    node.stop()


def core(api_client: kubernetes.client.ApiClient) -> kubernetes.client.CoreV1Api:
    return kubernetes.client.CoreV1Api(api_client)


def pod_status(api_client: kubernetes.client.ApiClient, namespace: str, name: str) -> dict[str, Any]:
    pod = core(api_client).read_namespaced_pod(name, namespace)
    return api_client.sanitize_for_serialization(pod)


def condition(status: dict[str, Any], kind: str) -> str | None:
    return next((c["status"] for c in status.get("conditions") or [] if c["type"] == kind), None)


def python_container(name: str, script: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "image": "python:3.11", "command": [sys.executable, "-u", "-c", script], **extra}


def test_node_is_ready_with_gpus_and_its_lease_renewed(kubelet, api_client):
    node = core(api_client).read_node("kubelet-test")
    assert node.status.allocatable["nvidia.com/gpu"] == "2"
    assert node.metadata.labels["gpu.example/product"] == "tiny"
    assert next(c for c in node.status.conditions if c.type == "Ready").status == "True"
    leases = kubernetes.client.CoordinationV1Api(api_client)
    wait_for(lambda: "kubelet-test" in [lease.metadata.name for lease in leases.list_namespaced_lease(
        "kube-node-lease").items], 30, "the node's Lease")
    lease = leases.read_namespaced_lease("kubelet-test", "kube-node-lease")
    assert lease.spec.holder_identity == "kubelet-test"
    # The node-lifecycle controller lifts the not-ready taint admission put on the new Node.
    wait_for(lambda: not any(t.key == "node.kubernetes.io/not-ready"
                             for t in core(api_client).read_node("kubelet-test").spec.taints or []),
             60, "the not-ready taint lifted")


def test_a_pod_gets_env_volumes_and_its_own_service_account_token(kubelet, api_client, namespace):
    api = core(api_client)
    api.create_namespaced_service_account(namespace, {"metadata": {"name": "reader"}})
    rbac = kubernetes.client.RbacAuthorizationV1Api(api_client)
    rbac.create_namespaced_role(namespace, {"metadata": {"name": "reader"}, "rules": [
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["list"]}]})
    rbac.create_namespaced_role_binding(namespace, {
        "metadata": {"name": "reader"}, "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                                    "name": "reader"},
        "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}]})
    api.create_namespaced_secret(namespace, {"metadata": {"name": "creds"}, "stringData": {"FROM_SECRET": "s3cr3t"}})
    api.create_namespaced_config_map(namespace, {"metadata": {"name": "settings"},
                                                 "data": {"key": "value", "greeting.txt": "hello"}})
    api.create_namespaced_pod(namespace, {"metadata": {"name": "probe"}, "spec": {
        "serviceAccountName": "reader",
        "containers": [
            python_container("main", PROBE_SCRIPT, envFrom=[{"secretRef": {"name": "creds"}}], env=[
                {"name": "FROM_KEY", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "key"}}},
                {"name": "MY_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "MY_NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                {"name": "PORT", "value": "8000"}],
                ports=[{"containerPort": 8000}], readinessProbe={"tcpSocket": {"port": 8000}, "periodSeconds": 1},
                volumeMounts=[{"name": "greeting", "mountPath": "/etc/greeting", "readOnly": True},
                              {"name": "shared", "mountPath": "/shared"}]),
            python_container("second", "import time, pathlib\nwhile not pathlib.Path('/data/handoff').exists():"
                             " time.sleep(0.1)\nprint(open('/data/handoff').read(), flush=True)\ntime.sleep(3600)",
                             volumeMounts=[{"name": "shared", "mountPath": "/data"}]),
        ],
        "volumes": [{"name": "greeting", "configMap": {"name": "settings", "items": [
            {"key": "greeting.txt", "path": "greeting.txt"}]}}, {"name": "shared", "emptyDir": {}}],
    }})
    wait_for(lambda: condition(pod_status(api_client, namespace, "probe")["status"], "Ready") == "True", 60,
             "the pod Ready (its readiness probe passing)")
    status = pod_status(api_client, namespace, "probe")
    assert status["spec"]["nodeName"] == "kubelet-test"
    assert status["status"]["phase"] == "Running"
    log = kubelet.logs(namespace, "probe", "main")
    assert "configmaps: kube-root-ca.crt" in log and "settings" in log
    assert "secrets: 403" in log  # RBAC is enforced on the pod's own token
    assert "env: s3cr3t value probe kubelet-test" in log
    assert "file: hello" in log
    wait_for(lambda: "from the first container" in kubelet.logs(namespace, "probe", "second"), 20,
             "the emptyDir shared between the two containers")
    assert Path("/shared/handoff").exists() is False  # the mount stayed inside the container


def test_the_scheduler_keeps_pods_off_a_node_without_room(kubelet, api_client, namespace):
    api = core(api_client)
    sleeper = python_container("main", "import time; time.sleep(3600)",
                               resources={"limits": {"nvidia.com/gpu": "3"}})
    api.create_namespaced_pod(namespace, {"metadata": {"name": "too-big"}, "spec": {"containers": [sleeper]}})
    api.create_namespaced_pod(namespace, {"metadata": {"name": "elsewhere"}, "spec": {
        "containers": [{**sleeper, "resources": {}}], "nodeSelector": {"gpu.example/product": "huge"}}})
    for name, reason in (("too-big", "Insufficient nvidia.com/gpu"), ("elsewhere", "didn't match")):
        wait_for(lambda name=name, reason=reason: reason in (next(
            (c.get("message") or "" for c in pod_status(api_client, namespace, name)["status"].get("conditions")
             or [] if c["type"] == "PodScheduled"), "")), 30, f"{name} unschedulable: {reason}")
        assert not pod_status(api_client, namespace, name)["spec"].get("nodeName")


def test_killed_containers_restart_and_deleted_pods_stop(kubelet, api_client, namespace):
    api = core(api_client)
    api.create_namespaced_pod(namespace, {"metadata": {"name": "worker"}, "spec": {
        "terminationGracePeriodSeconds": 5,
        "containers": [python_container("main", "import signal, sys, time\n"
                                        "signal.signal(signal.SIGTERM, lambda *_: (print('SIGTERM', flush=True),"
                                        " sys.exit(0)))\nprint('started', flush=True)\ntime.sleep(3600)")]}})
    wait_for(lambda: "started" in kubelet.logs(namespace, "worker", "main"), 60, "the container running")
    kubelet.kill_container(namespace, "worker", "main")
    wait_for(lambda: pod_status(api_client, namespace, "worker")["status"]["containerStatuses"][0]["restartCount"]
             == 1, 30, "restartCount 1")
    last = pod_status(api_client, namespace, "worker")["status"]["containerStatuses"][0]["lastState"]
    assert last["terminated"]["exitCode"] == 137
    wait_for(lambda: kubelet.logs(namespace, "worker", "main").count("started") == 2, 30, "running again")
    log_before_delete = kubelet.logs(namespace, "worker", "main")
    assert log_before_delete.count("started") == 2
    api.delete_namespaced_pod("worker", namespace)
    wait_for(lambda: "worker" not in [p.metadata.name for p in api.list_namespaced_pod(namespace).items], 30,
             "the pod object removed once its containers stopped")
    assert "worker" not in kubelet.running_pods(namespace)


def test_a_crashing_container_backs_off_with_its_log_tail_as_termination_message(kubelet, api_client, namespace):
    crash = "print('loading', flush=True); raise SystemExit('ValueError: max_model_len 256 exceeds 128')"
    core(api_client).create_namespaced_pod(namespace, {"metadata": {"name": "crashing"}, "spec": {"containers": [
        python_container("told", crash, terminationMessagePolicy="FallbackToLogsOnError"),
        python_container("silent", crash)]}})

    def statuses() -> dict[str, dict[str, Any]]:
        status = pod_status(api_client, namespace, "crashing")["status"]
        return {c["name"]: c for c in status.get("containerStatuses") or []}

    wait_for(lambda: all(c["restartCount"] >= 2 and c["state"].get("waiting", {}).get("reason") == "CrashLoopBackOff"
                         for c in statuses().values()) and len(statuses()) == 2, 60, "both in CrashLoopBackOff")
    told, silent = statuses()["told"]["lastState"]["terminated"], statuses()["silent"]["lastState"]["terminated"]
    assert told["exitCode"] == silent["exitCode"] == 1
    assert told["message"].splitlines()[-2:] == ["loading", "ValueError: max_model_len 256 exceeds 128"]
    assert "message" not in silent  # the File policy, and nothing written to the termination-log file


def test_a_missing_secret_holds_the_container_until_it_exists(kubelet, api_client, namespace):
    api = core(api_client)
    api.create_namespaced_pod(namespace, {"metadata": {"name": "waiting"}, "spec": {"containers": [
        python_container("main", "import time; time.sleep(3600)", envFrom=[{"secretRef": {"name": "later"}}])]}})
    wait_for(lambda: 'secret "later" not found' in str(pod_status(api_client, namespace, "waiting")["status"]),
             30, "the pod saying which secret it waits for")
    assert pod_status(api_client, namespace, "waiting")["status"].get("phase") == "Pending"
    api.create_namespaced_secret(namespace, {"metadata": {"name": "later"}, "stringData": {"A": "b"}})
    wait_for(lambda: pod_status(api_client, namespace, "waiting")["status"].get("phase") == "Running", 30,
             "running once the secret exists")


def test_a_volume_over_tmp_leaves_the_software_under_it_runnable(tmp_path):
    """Checkouts under /tmp (CI's, say) stay visible to containers that mount an emptyDir on /tmp."""
    import json
    import subprocess

    software = tmp_path / "checkout"
    software.mkdir()
    (software / "program").write_text("#!/bin/sh\necho still here\n")
    (software / "program").chmod(0o755)
    volume = tmp_path / "empty-dir"
    volume.mkdir()
    spec = tmp_path / "mounts.json"
    spec.write_text(json.dumps({"mounts": [{"source": str(volume), "target": "/tmp", "readOnly": False}],
                                "keepVisible": [str(software)]}))
    result = subprocess.run([sys.executable, "-m", "loraplex.local.container_init", str(spec), "--",
                             str(software / "program")], capture_output=True, text=True, timeout=30)
    assert (result.returncode, result.stdout) == (0, "still here\n"), result.stderr


def test_liveness_waits_for_the_startup_probe(kubelet, api_client, namespace):
    """A server that takes seconds to start (as vLLM takes minutes) is not killed by its liveness probe."""
    slow_server = ("import http.server, os, socketserver, time\ntime.sleep(4)\nprint('serving', flush=True)\n"
                   "port = int(os.environ['PORT'])\n"
                   "socketserver.TCPServer(('127.0.0.1', port), http.server.SimpleHTTPRequestHandler).serve_forever()")
    probe = {"tcpSocket": {"port": 8000}, "periodSeconds": 1}
    core(api_client).create_namespaced_pod(namespace, {"metadata": {"name": "slow"}, "spec": {"containers": [
        python_container("main", slow_server, ports=[{"containerPort": 8000}], env=[{"name": "PORT", "value": "8000"}],
                         startupProbe={**probe, "failureThreshold": 30},
                         livenessProbe={**probe, "failureThreshold": 1}, readinessProbe=probe)]}})
    wait_for(lambda: condition(pod_status(api_client, namespace, "slow")["status"], "Ready") == "True", 60,
             "the slow server Ready")
    container = pod_status(api_client, namespace, "slow")["status"]["containerStatuses"][0]
    assert container["restartCount"] == 0 and container["started"] is True
