"""The real control plane as the benchmarks use it: an admin client, a watch that keeps every LoraAdapter at
hand, and readings of where an API request's time goes. kube-apiserver's own /metrics say how many requests
it served per verb and resource and how long they took, of which how long in etcd, admission,
authentication, authorization and priority and fairness; etcd's say how fast its disk is; /proc says how
much CPU each process and the machine used meanwhile."""

from __future__ import annotations

import base64
import collections
import json
import os
import ssl
import threading
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes
from prometheus_client.parser import text_string_to_metric_families

from bench.report import cpu_seconds
from loraplex.local.controlplane import ControlPlane

GROUP, VERSION = "loraplex.io", "v1alpha1"
# Long-running requests: their duration is how long the stream stayed open, not what serving it cost.
STREAMING_VERBS = frozenset({"WATCH", "CONNECT"})
Labels = tuple[tuple[str, str], ...]
MACHINE_BUSY, MACHINE_TOTAL = "machine, busy", "machine, all"


def admin_client(plane: ControlPlane, connections: int = 16) -> kubernetes.client.ApiClient:
    """The cluster admin's client, pooling enough connections for the benchmarks' creating threads."""
    configuration = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(str(plane.kubeconfig), client_configuration=configuration)
    configuration.connection_pool_maxsize = connections
    return kubernetes.client.ApiClient(configuration)


def token_subject(token: str) -> str:
    """The user a ServiceAccount token signs in as (its `sub` claim)."""
    payload = token.split(".")[1]
    return str(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["sub"])


class LoraAdapterWatch:
    """Every LoraAdapter (or other loraplex object: `plural`) of a namespace as the API has it now, kept current
    by a list and a watch in a thread of its own, so that waiting for thousands of them to change costs one
    stream rather than a list per poll."""

    def __init__(self, client: kubernetes.client.ApiClient, namespace: str, plural: str = "loraadapters"):
        self.custom = kubernetes.client.CustomObjectsApi(client)
        self.namespace, self.plural = namespace, plural
        self.objects: dict[str, dict[str, Any]] = {}
        self.resource_version = ""
        self.stopped = False
        self.stream: Any = None
        self.thread = threading.Thread(target=self._follow, name="lora-adapter-watch", daemon=True)

    def start(self) -> LoraAdapterWatch:
        listed = self.custom.list_namespaced_custom_object(GROUP, VERSION, self.namespace, self.plural)
        self.objects = {item["metadata"]["name"]: item for item in listed["items"]}
        self.resource_version = listed["metadata"]["resourceVersion"]
        self.thread.start()
        return self

    def count(self, predicate: Callable[[dict[str, Any]], bool]) -> int:
        return sum(1 for obj in list(self.objects.values()) if predicate(obj))

    def stop(self) -> None:
        self.stopped = True
        if self.stream is not None:
            self.stream.shutdown()
        self.thread.join(timeout=10)

    def _follow(self) -> None:
        while not self.stopped:
            # The raw stream rather than kubernetes.watch, so that stop() can end it at once: an open watch
            # would hold kube-apiserver's shutdown for its whole grace period.
            self.stream = self.custom.list_namespaced_custom_object(
                GROUP, VERSION, self.namespace, self.plural, watch=True, resource_version=self.resource_version,
                allow_watch_bookmarks=True, timeout_seconds=300, _preload_content=False)
            try:
                for line in self.stream:
                    event = json.loads(line)
                    obj = event["object"]
                    if event["type"] == "ERROR":
                        raise RuntimeError(f"the watch of LoraAdapters ended: {obj.get('message')}")
                    self.resource_version = obj["metadata"]["resourceVersion"]
                    if event["type"] == "DELETED":
                        self.objects.pop(obj["metadata"]["name"], None)
                    elif event["type"] != "BOOKMARK":
                        self.objects[obj["metadata"]["name"]] = obj
            except Exception:
                if self.stopped:
                    return
                raise
            finally:
                self.stream.release_conn()


@dataclass(frozen=True)
class ApiserverReading:
    """kube-apiserver's metrics and the control plane's CPU seconds at one moment; subtract two readings for
    what happened in between."""

    samples: dict[tuple[str, Labels], float]
    cpu: dict[str, float] = field(default_factory=dict)

    def __sub__(self, earlier: ApiserverReading) -> ApiserverReading:
        return ApiserverReading({key: value - earlier.samples.get(key, 0.0) for key, value in self.samples.items()},
                                {name: seconds - earlier.cpu.get(name, 0.0) for name, seconds in self.cpu.items()})

    def total(self, name: str, **match: str) -> float:
        return sum(value for (sample, labels), value in self.samples.items()
                   if sample == name and all(dict(labels).get(k) == v for k, v in match.items()))

    def requests(self) -> list[tuple[str, str, int, float]]:
        """(verb, resource[/subresource], requests, mean seconds) of every non-streaming request, most first."""
        counts: collections.Counter[tuple[str, str]] = collections.Counter()
        seconds: collections.Counter[tuple[str, str]] = collections.Counter()
        for (sample, labels), value in self.samples.items():
            if sample not in ("apiserver_request_duration_seconds_count", "apiserver_request_duration_seconds_sum"):
                continue
            tags = dict(labels)
            if tags.get("verb") in STREAMING_VERBS:
                continue
            resource = tags.get("resource", "") + (f"/{tags['subresource']}" if tags.get("subresource") else "")
            key = (tags.get("verb", ""), resource)
            (counts if sample.endswith("_count") else seconds)[key] += value
        return sorted(((verb, resource, round(n), seconds[(verb, resource)] / n)
                       for (verb, resource), n in counts.items() if n >= 1), key=lambda row: -row[2])

    def codes(self) -> dict[str, int]:
        """Responses per HTTP status code."""
        codes: collections.Counter[str] = collections.Counter()
        for (sample, labels), value in self.samples.items():
            if sample == "apiserver_request_total":
                codes[dict(labels).get("code", "")] += round(value)
        return {code: n for code, n in sorted(codes.items()) if n}

    def refusals(self) -> dict[str, int]:
        """Error responses by code, verb and resource ("409 PATCH loraadapters"), most first."""
        found: collections.Counter[str] = collections.Counter()
        for (sample, labels), value in self.samples.items():
            tags = dict(labels)
            if sample == "apiserver_request_total" and tags.get("code", "").startswith(("4", "5")) and value >= 1:
                resource = tags.get("resource", "") + (f"/{tags['subresource']}" if tags.get("subresource") else "")
                found[f"{tags['code']} {tags.get('verb', '')} {resource}"] += round(value)
        return dict(found.most_common())

    def time_split(self) -> dict[str, float]:
        """Seconds summed over all non-streaming requests, and the parts of it the apiserver measures."""
        served = sum(value for (sample, labels), value in self.samples.items()
                     if sample == "apiserver_request_duration_seconds_sum"
                     and dict(labels).get("verb") not in STREAMING_VERBS)
        filters = {dict(labels).get("filter", ""): value for (sample, labels), value in self.samples.items()
                   if sample == "apiserver_request_filter_duration_seconds_sum"}
        return {
            "requests": served,
            "etcd": self.total("etcd_request_duration_seconds_sum"),
            "admission": self.total("apiserver_admission_step_admission_duration_seconds_sum"),
            "authentication": filters.get("authentication", 0.0),
            "authorization": filters.get("authorization", 0.0),
            "priority and fairness": filters.get("priorityandfairness", 0.0),
        }

    def disk(self) -> str:
        """etcd's disk writes: WAL fsyncs and backend commits, with their mean latency."""
        parts = []
        for what, metric in (("WAL fsyncs", "etcd_disk_wal_fsync_duration_seconds"),
                             ("backend commits", "etcd_disk_backend_commit_duration_seconds")):
            count = self.total(f"{metric}_count")
            mean = self.total(f"{metric}_sum") / count * 1000 if count else 0.0
            parts.append(f"{count:.0f} {what} ({mean:.1f} ms mean)")
        return "etcd's disk: " + " and ".join(parts)


def read_apiserver(plane: ControlPlane) -> ApiserverReading:
    """kube-apiserver's metrics, etcd's (its disk: WAL fsyncs and backend commits) and the CPU seconds of
    every control-plane process and of the machine as a whole."""
    request = urllib.request.Request(plane.url + "/metrics", headers={"Authorization": f"Bearer {plane.admin_token}"})
    context = ssl.create_default_context(cafile=str(plane.ca_file))
    with urllib.request.urlopen(request, timeout=30, context=context) as response:
        text = response.read().decode()
    with urllib.request.urlopen(f"{plane.etcd_url}/metrics", timeout=30) as response:
        text += "\n".join(line for line in response.read().decode().splitlines() if line.startswith("etcd_disk_"))
    samples: dict[tuple[str, Labels], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    cpu = {name: cpu_seconds(component.process.pid) for name, component in plane.components.items()
           if component.process is not None and component.alive()}
    return ApiserverReading(samples, {**cpu, **machine_cpu_seconds()})


def machine_cpu_seconds() -> dict[str, float]:
    """CPU seconds every core together spent busy and in all, since boot (/proc/stat)."""
    fields = [int(n) for n in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    tick = os.sysconf("SC_CLK_TCK")
    return {MACHINE_BUSY: (sum(fields[:8]) - idle) / tick, MACHINE_TOTAL: sum(fields[:8]) / tick}
