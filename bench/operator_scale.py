"""Operator scale: B base models x A adapters each, until every adapter is Ready.

    .venv/bin/python bench/operator_scale.py [--base-models 10] [--adapters 10 100 500]

Runs the real operator, signed in as the chart's ServiceAccount with exactly the chart's RBAC, against a
real Kubernetes control plane (loraplex.local: etcd, kube-apiserver, controller-manager, scheduler) with no
kubelet. The Deployment controller makes each base model's pod from the operator's Deployment; it stays
Pending, and bench/simulated_replicas.py plays its sidecar: it follows the adapter-set ConfigMap and reports
each adapter Loaded in the pod's LoraReplica, as the real sidecar does (its own cost is measured in the sidecar
benchmarks). What is measured is the operator: time until every adapter is Ready, its peak RSS, and the API
requests it made per adapter, counted per client, verb and resource by an API proxy that only the
operator talks through (kopf's requests and loraplex's own client's alike); this script's creates and the
simulated sidecars go to the apiserver directly. kube-apiserver's own metrics say where its time went.
Writes bench/results/operator_scale.{md,png}.
"""

from __future__ import annotations

import argparse
import collections
import copy
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.apiserver import (  # noqa: E402
    MACHINE_BUSY,
    MACHINE_TOTAL,
    ApiserverReading,
    LoraAdapterWatch,
    admin_client,
    read_apiserver,
    token_subject,
)
from bench.report import add_results_argument, cpu_seconds, machine, peak_rss_mb, table, write  # noqa: E402
from loraplex.local.apiproxy import ApiProxy  # noqa: E402
from loraplex.local.controlplane import ControlPlane  # noqa: E402
from loraplex.local.install import install_crds, install_operator_identity  # noqa: E402
from loraplex.local.request_info import request_info  # noqa: E402
from tests.conftest import tool  # noqa: E402
from tests.integration.harness import kubeconfig_token, wait_for  # noqa: E402
from tests.integration.sidecar_harness import allowed  # noqa: E402

GROUP, VERSION = "loraplex.io", "v1alpha1"
# The operator's two HTTP clients, by the product token of their User-Agent: kopf's watches and lists, and
# loraplex.kube.KubeClient (aiohttp's default agent) for everything it reads and writes itself.
OPERATOR_CLIENTS = ("kopf", "aiohttp")
WRITE_VERBS = ("create", "update", "patch", "delete")


def is_ready(adapter: dict[str, Any]) -> bool:
    return (adapter.get("status") or {}).get("phase") == "Ready"


def changed_fields(before: dict[str, Any], after: dict[str, Any], path: str = "status"
                   ) -> list[tuple[str, str]]:
    """The fields that differ between two versions of a status, conditions named by their type, each with
    what it was and became: ("status.conditions[Ready].message", "'a' → 'b'")."""
    changed = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if key == "conditions" and isinstance(old, list) and isinstance(new, list):
            old, new = ({c.get("type"): c for c in conditions} for conditions in (old, new))
            changed += [field for kind in sorted(set(old) | set(new))
                        for field in changed_fields(old.get(kind, {}), new.get(kind, {}), f"{path}.conditions[{kind}]")]
        elif isinstance(old, dict) and isinstance(new, dict) and key != "replicaStatus":
            changed += changed_fields(old, new, f"{path}.{key}")
        elif old != new:
            changed.append((f"{path}.{key}", f"{old!r} → {new!r}"[:80]))
    return changed


def operator_requests(proxy: ApiProxy) -> collections.Counter[tuple[str, str, str]]:
    return collections.Counter({key: n for key, n in proxy.counts.items() if key[0] in OPERATOR_CLIENTS})


def totals(counts: collections.Counter[tuple[str, str, str]]) -> tuple[int, int]:
    """All of the operator's requests, and its writes."""
    return sum(counts.values()), sum(n for (_, verb, _), n in counts.items() if verb in WRITE_VERBS)


def retries(log: Path) -> dict[str, int]:
    """Requests the operator's client repeated, by request and the answer that made it repeat them
    ("429 on POST events")."""
    repeated: collections.Counter[str] = collections.Counter()
    for method, path, code, error in re.findall(r"([A-Z]+) (/\S+) (?:answered (\d{3})|failed \((\w+))",
                                               log.read_text(errors="replace")):
        info = request_info(method, urlsplit(path).path, {})
        repeated[f"{code or error} on {method} {info.resource}"] += 1
    return dict(repeated.most_common())


@dataclass
class Cluster:
    """One control plane for every size, each size in a namespace of its own; the operator talks through
    the proxy, as its ServiceAccount."""

    plane: ControlPlane
    proxy: ApiProxy
    admin: kubernetes.client.ApiClient
    operator_token: str

    @classmethod
    def start(cls, work: Path) -> Cluster:
        plane = ControlPlane(work / "control-plane").start()
        admin = admin_client(plane)
        try:
            install_crds(admin, ROOT)
            identity = install_operator_identity(plane, admin, tool("helm"), ROOT / "charts" / "loraplex",
                                                 work / "operator-direct.kubeconfig")
            token = kubeconfig_token(identity)
            user = token_subject(token)
            wait_for(lambda: allowed(admin, user, "", "watch", "loraadapters", GROUP)
                     and allowed(admin, user, "", "list", "customresourcedefinitions", "apiextensions.k8s.io"),
                     30, "the operator's ClusterRoleBindings to take effect")
            return cls(plane, ApiProxy(plane.url, plane.ca_file).start(), admin, token)
        except BaseException:
            admin.close()
            plane.stop()
            raise

    def stop(self) -> None:
        self.proxy.stop()
        self.admin.close()
        self.plane.stop()


def run(cluster: Cluster, base_model_count: int, adapters_per_model: int, work: Path) -> dict[str, Any]:
    namespace = f"scale-{base_model_count * adapters_per_model}"
    work.mkdir()
    proxy, admin = cluster.proxy, cluster.admin
    custom = kubernetes.client.CustomObjectsApi(admin)
    core = kubernetes.client.CoreV1Api(admin)
    core.create_namespace({"metadata": {"name": namespace}})
    kubeconfig = proxy.write_kubeconfig(work / "operator.kubeconfig", cluster.operator_token, namespace)
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "LORAPLEX_METRICS_PORT": "0",
           "LORAPLEX_RESYNC_SECONDS": "600"}
    operator: subprocess.Popen[bytes] | None = None
    replicas: subprocess.Popen[bytes] | None = None
    adapters: LoraAdapterWatch | None = None

    def launch_operator(log: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "loraplex.cli", "operator", "-n", namespace, "--standalone"],
                                env=env, stdout=(work / log).open("wb"), stderr=subprocess.STDOUT)

    def wait_until_settled(process: subprocess.Popen[bytes], since: float) -> tuple[float, float]:
        """When the operator last made a request or used the CPU (under 0.1 s in 3 s counts as idle), and
        its CPU seconds by then."""
        last = (totals(operator_requests(proxy))[0], cpu_seconds(process.pid))
        last_change, busy_cpu = since, last[1]
        while time.perf_counter() - last_change < 3 or last[0] == 0:
            time.sleep(0.5)
            requests, cpu = totals(operator_requests(proxy))[0], cpu_seconds(process.pid)
            if requests != last[0] or cpu - last[1] >= 0.1 * 0.5 / 3:
                last_change, busy_cpu = time.perf_counter(), cpu
            last = (requests, cpu)
            if time.perf_counter() - since > 600:
                raise TimeoutError("the operator never settled")
        return last_change, busy_cpu

    try:
        operator = launch_operator("operator.log")
        names = [f"model-{index}" for index in range(base_model_count)]
        for name in names:
            custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "basemodeldeployments", {
                "apiVersion": f"{GROUP}/{VERSION}", "kind": "BaseModelDeployment", "metadata": {"name": name},
                "spec": {"model": name, "runtime": "vllm", "image": "vllm/vllm-openai:v0.11.0",
                         "lora": {"maxCpuLoras": 10000}}})
        plane = cluster.plane
        plane.write_kubeconfig(work / "replicas.kubeconfig", plane.admin_token, "bench-replicas")
        replicas = subprocess.Popen([sys.executable, str(ROOT / "bench" / "simulated_replicas.py"),
                                     str(work / "replicas.kubeconfig"), namespace, *names],
                                    stdout=(work / "replicas.log").open("wb"), stderr=subprocess.STDOUT)

        def replicas_seen() -> bool:
            """Every base model has its (Pending) pod, and the operator says so in the model's status."""
            pods = core.list_namespaced_pod(namespace, label_selector="loraplex.io/base-model").items
            statuses = [custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "basemodeldeployments",
                                                            name).get("status") or {} for name in names]
            return len(pods) == base_model_count and all(s.get("replicas") == 1 for s in statuses)

        wait_for(replicas_seen, 120, "a pod per base model, seen by the operator",
                 lambda: (work / "operator.log").read_text()[-3000:])
        wait_until_settled(operator, time.perf_counter())
        adapters = LoraAdapterWatch(admin, namespace).start()
        proxy.reset_counts()
        operator_cpu_before = cpu_seconds(operator.pid)
        replicas_cpu_before = cpu_seconds(replicas.pid)
        own_cpu_before = cpu_seconds(os.getpid())
        load_before = os.getloadavg()[0]
        apiserver_before = read_apiserver(plane)
        total = base_model_count * adapters_per_model
        start = time.perf_counter()

        def create(index: int) -> None:
            model = names[index % base_model_count]
            custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "loraadapters", {
                "apiVersion": f"{GROUP}/{VERSION}", "kind": "LoraAdapter", "metadata": {"name": f"{model}-a{index}"},
                "spec": {"baseModel": model, "source": f"s3://adapters/{model}/a{index}/"}})

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(create, range(total)))
        created = time.perf_counter() - start
        progress: list[tuple[float, int]] = []
        while True:
            ready = adapters.count(is_ready)
            progress.append((time.perf_counter() - start, ready))
            if ready == total:
                break
            if time.perf_counter() - start > 1800:
                raise TimeoutError(f"{ready} of {total} Ready after 1800 s")
            time.sleep(0.2)
        elapsed = time.perf_counter() - start
        apiserver = read_apiserver(plane) - apiserver_before
        peak_rss = peak_rss_mb(operator.pid)
        counts = operator_requests(proxy)
        operator_total, writes = totals(counts)
        cpu = {"operator": cpu_seconds(operator.pid) - operator_cpu_before,
               "simulated sidecars": cpu_seconds(replicas.pid) - replicas_cpu_before,
               "this script (creates, Ready watch, API proxy)": cpu_seconds(os.getpid()) - own_cpu_before,
               **apiserver.cpu}
        breakdown = {f"{client} {verb} {resource}": n for (client, verb, resource), n in counts.most_common()}

        # A restarted operator must find everything converged: it reads, and writes nothing.
        wait_until_settled(operator, time.perf_counter())  # its last batched status writes are out
        before_restart = {name: copy.deepcopy(obj.get("status") or {}) for name, obj in adapters.objects.items()}
        operator.kill()
        operator.wait(timeout=30)
        proxy.reset_counts()
        restarted = time.perf_counter()
        operator = launch_operator("operator-restarted.log")
        settled, restart_cpu = wait_until_settled(operator, restarted)
        restart_counts = operator_requests(proxy)
        restart_requests, restart_writes = totals(restart_counts)
        if (ready := adapters.count(is_ready)) != total:
            raise AssertionError(f"only {ready} of {total} adapters Ready after the operator restart")
        restart_changes = collections.Counter(
            change for name, obj in adapters.objects.items()
            for change in changed_fields(before_restart.get(name, {}), obj.get("status") or {}))
        return {"adapters": total, "created_s": created, "ready_s": elapsed, "peak_rss_mb": peak_rss,
                "requests_per_adapter": operator_total / total, "writes_per_adapter": writes / total,
                "restart_s": settled - restarted, "restart_cpu_s": restart_cpu, "restart_requests": restart_requests,
                "restart_writes": restart_writes,
                "restart_changes": {f"{field}: {how}": n for (field, how), n in restart_changes.most_common()},
                "restart_breakdown": {f"{c} {v} {r}": n for (c, v, r), n in restart_counts.most_common()},
                "breakdown": breakdown, "cpu_s": cpu, "retries": retries(work / "operator.log"),
                "load_before": load_before, "apiserver": apiserver, "progress": progress}
    finally:
        if adapters is not None:
            adapters.stop()
        for process in (replicas, operator):
            if process is not None and process.poll() is None:
                process.terminate()
                process.wait(timeout=30)


def apiserver_lines(row: dict[str, Any]) -> list[str]:
    """Where kube-apiserver's time went between the first create and the last Ready, from its /metrics."""
    apiserver: ApiserverReading = row["apiserver"]
    split = apiserver.time_split()
    served = split.pop("requests")
    rows = [[verb, resource, str(n), f"{seconds * 1000:.1f} ms"] for verb, resource, n, seconds in
            apiserver.requests()[:10]]
    processes = {name: seconds for name, seconds in row["cpu_s"].items() if name not in (MACHINE_BUSY, MACHINE_TOTAL)}
    cpu = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in sorted(processes.items(), key=lambda i: -i[1]))
    busy, whole = row["cpu_s"][MACHINE_BUSY], row["cpu_s"][MACHINE_TOTAL]
    return [
        f"### Inside kube-apiserver, {row['adapters']} adapters, first create → all Ready",
        "",
        "All clients' requests (the operator's, this script's creates, the simulated sidecars', the "
        "controllers'), from kube-apiserver's `/metrics` (`apiserver_request_duration_seconds`, watches "
        "excluded); the ten most frequent:",
        "",
        *table(["verb", "resource", "requests", "mean latency"], [*rows], align="llrr"),
        "",
        f"Latency summed over those requests: {served:.1f} s, of which "
        + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in split.items())
        + " (the rest: decoding, conversion, field management, encoding, the watch cache). "
        f"Responses by status code: {', '.join(f'{code}: {n}' for code, n in apiserver.codes().items())}; the "
        f"refusals: {', '.join(f'{what}: {n}' for what, n in apiserver.refusals().items()) or 'none'}. "
        f"Watch events sent: {apiserver.total('apiserver_watch_events_total'):.0f}. {apiserver.disk()}.",
        "",
        f"CPU used meanwhile: {cpu}. The machine's {os.cpu_count()} cores were {busy / whole:.0%} busy over the "
        f"{row['ready_s']:.1f} s ({busy:.1f} of {whole:.1f} core-seconds, whatever else ran too; load average "
        f"{row['load_before']:.1f} at the start).",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base-models", type=int, default=10)
    parser.add_argument("--adapters", type=int, nargs="+", default=[10, 100, 500],
                        help="adapters per base model, one run each")
    add_results_argument(parser)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="loraplex-scale-") as scratch:
        cluster = Cluster.start(Path(scratch))
        try:
            for per_model in args.adapters:
                row = run(cluster, args.base_models, per_model, Path(scratch) / f"{per_model}-per-model")
                rows.append(row)
                print(json.dumps({key: value for key, value in row.items() if key not in ("progress", "apiserver")}),
                      flush=True)
        finally:
            cluster.stop()
    largest = rows[-1]
    lines = [
        "# Operator scale",
        "",
        f"`python bench/operator_scale.py --base-models {args.base_models} --adapters "
        f"{' '.join(map(str, args.adapters))}` on {machine()}: the real operator, as the chart's ServiceAccount, "
        "against a real Kubernetes v1.36 control plane (etcd, kube-apiserver, controller-manager, scheduler; "
        "no kubelet) on the same cores, each size in a namespace of its own, one Pending pod per base model "
        "whose sidecar is simulated, reporting every adapter Loaded. Requests are the operator's own (kopf's "
        "and its own client's), counted at an API proxy only the operator talks through.",
        "",
        *table(["adapters", "created in", "all Ready after", "operator peak RSS", "API requests / adapter",
                "writes / adapter", "restart: settled after (CPU)", "restart: requests (writes)"],
               [[str(row["adapters"]), f"{row['created_s']:.1f} s", f"{row['ready_s']:.1f} s",
                 f"{row['peak_rss_mb']:.0f} MB", f"{row['requests_per_adapter']:.2f}",
                 f"{row['writes_per_adapter']:.2f}", f"{row['restart_s']:.1f} s ({row['restart_cpu_s']:.1f} s)",
                 f"{row['restart_requests']} ({row['restart_writes']})"] for row in rows], align="rrrrrrrr"),
        "",
        "Restart: once every adapter is Ready and the operator idle, it is SIGKILLed and started again; the time "
        "is until it is idle again (no request and under 0.1 s of CPU in 3 s), with the CPU it used by then; the "
        "requests are all of its own, including its lists and watches.",
    ]
    if len(rows) > 1:
        steps = [f"{a['adapters']} → {b['adapters']}: time to Ready {b['ready_s'] / a['ready_s']:.1f}x for "
                 f"{b['adapters'] / a['adapters']:.0f}x the adapters "
                 f"({(b['ready_s'] / a['ready_s']) / (b['adapters'] / a['adapters']):.2f} of linear)"
                 for a, b in itertools.pairwise(rows)]
        lines += ["", "Growth: " + "; ".join(steps) + ". Requests per adapter: "
                  + ", ".join(f"{row['requests_per_adapter']:.1f}" for row in rows) + "."]
    lines += [
        "",
        f"### The operator's requests, {largest['adapters']} adapters, first create → all Ready",
        "",
        *table(["client", "verb", "resource", "requests", "per adapter"],
               [[*key.split(" "), str(n), f"{n / largest['adapters']:.2f}"]
                for key, n in largest["breakdown"].items()], align="lllrr"),
        "",
        "What the restarted operator's writes changed, by field (adapters): "
        + (", ".join(f"`{field}` ({n})" for field, n in largest["restart_changes"].items()) or "nothing") + ".",
        "",
        "Requests its client repeated (by the answer that made it repeat them): "
        + (", ".join(f"{answer}: {n}" for answer, n in largest["retries"].items()) or "none") + ".",
        "",
        *apiserver_lines(largest),
    ]

    def draw(figure) -> None:  # type: ignore[no-untyped-def]
        over_time, per_adapter, memory = figure.subplots(1, 3)
        for row in rows:
            over_time.plot([t for t, _ in row["progress"]], [ready / row["adapters"] for _, ready in row["progress"]],
                           label=f"{row['adapters']} adapters")
        over_time.set(xlabel="seconds after the first create", ylabel="fraction Ready", title="Ready over time")
        over_time.legend()
        counts = [row["adapters"] for row in rows]
        per_adapter.plot(counts, [row["requests_per_adapter"] for row in rows], "o-", label="requests")
        per_adapter.plot(counts, [row["writes_per_adapter"] for row in rows], "o-", label="writes")
        per_adapter.set(xscale="log", xlabel="adapters", ylabel="per adapter", title="Operator API requests",
                        ylim=(0, None))
        per_adapter.legend()
        memory.plot(counts, [row["peak_rss_mb"] for row in rows], "o-")
        memory.axhline(300, color="grey", linestyle="--", label="target 300 MB")
        memory.set(xscale="log", xlabel="adapters", ylabel="MB", title="Operator peak RSS", ylim=(0, None))
        memory.legend()

    write(args.results, "operator_scale", lines, draw, size=(13, 4))

if __name__ == "__main__":
    main()
