"""Placement scale: B base models x R replicas, A adapters placed on P replicas each, every pod's real sidecar.

    .venv/bin/python bench/placement_scale.py [--adapters 2000] [--replicas 10] [--placement 3]

A real control plane (loraplex.local, no kubelet), the CRDs, the real operator as the chart's ServiceAccount. Each
BaseModelDeployment's pods stay Pending (the operator counts them as replicas); for each, bench/sidecar_pods.py runs
the real `loraplex sidecar` with the environment the operator rendered into the pod, signed in as the pod's
ServiceAccount, with a PEFT folder of its own and a vLLM stand-in (bench/vllm_standin.py: vLLM 0.32's runtime LoRA
API; twenty real vLLMs do not fit 2 cores). Adapters are small real PEFT adapters of four ranks in moto S3.
Three API proxies count requests per client: the operator, the sidecars, this script (creates and the status
watch); kube-apiserver's `apiserver_request_total` counts everyone, the controller-manager and scheduler too.
Measured: time until every adapter is Ready with ready P/P; requests per adapter per client; requests at rest;
bytes in each sidecar's PEFT folder; movement when base model 0 scales R→R+1→R (the adapter set's slots before
and after, and what the sidecars loaded into and unloaded from their runtimes); the operator's peak RSS and CPU.
Writes bench/results/placement_scale.{md,png}.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import kubernetes

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.apiserver import MACHINE_BUSY, MACHINE_TOTAL, LoraAdapterWatch, read_apiserver  # noqa: E402
from bench.operator_scale import WRITE_VERBS, Cluster  # noqa: E402
from bench.report import add_results_argument, cpu_seconds, machine, peak_rss_mb, table, write  # noqa: E402
from bench.sidecar_pods import SidecarPod, folder_bytes, start_sidecar  # noqa: E402
from loraplex.api.adapter_set import AdapterSet  # noqa: E402
from loraplex.local.apiproxy import ApiProxy  # noqa: E402
from loraplex.operator.naming import ChildNames  # noqa: E402
from tests.adapters import make_hf_adapter_for, make_tiny_model  # noqa: E402
from tests.integration.harness import wait_for  # noqa: E402
from tests.integration.sidecar_harness import REFUSAL, MotoServer  # noqa: E402

GROUP, VERSION = "loraplex.io", "v1alpha1"
NAMESPACE = "placement"
BASE_MODEL_LABEL = "loraplex.io/base-model"
RANKS = (4, 8, 12, 16)  # four adapter sizes, so that the byte balance shows
ADAPTERS_PER_BUCKET = 100  # moto lists a prefix by walking every key of its bucket


class Clients:
    """The three API proxies, one per client whose requests are counted."""

    def __init__(self, cluster: Cluster):
        self.operator = cluster.proxy
        self.sidecars = ApiProxy(cluster.plane.url, cluster.plane.ca_file).start()
        self.script = ApiProxy(cluster.plane.url, cluster.plane.ca_file).start()

    def by_client(self) -> dict[str, collections.Counter[tuple[str, str, str]]]:
        return {"operator": self.operator.counts, "sidecars": self.sidecars.counts, "this script": self.script.counts}

    def reset(self) -> None:
        for proxy in (self.operator, self.sidecars, self.script):
            proxy.reset_counts()

    def stop(self) -> None:
        self.sidecars.stop()
        self.script.stop()


def requests_and_writes(counts: collections.Counter[tuple[str, str, str]]) -> tuple[int, int]:
    return sum(counts.values()), sum(n for (_, verb, _), n in counts.items() if verb in WRITE_VERBS)


def client_through(proxy: ApiProxy, token: str, path: Path) -> kubernetes.client.ApiClient:
    configuration = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(str(proxy.write_kubeconfig(path, token, NAMESPACE)),
                                       client_configuration=configuration)
    configuration.connection_pool_maxsize = 16
    return kubernetes.client.ApiClient(configuration)


def build_sources(work: Path, moto: MotoServer, names: list[str], base_models: int) -> dict[str, tuple[str, int]]:
    """Upload one adapter per name into moto, each base model's (every `base_models`-th name) taking the ranks in
    turn, so that every base model holds the same mix of sizes; each name's source URI and size in bytes."""
    make_tiny_model(work / "model")
    variants = {}
    for rank in RANKS:
        folder = make_hf_adapter_for(work / "model", work / f"adapter-r{rank}", rank=rank, seed=rank)
        variants[rank] = sorted(path for path in folder.iterdir() if path.is_file())
    s3 = moto.client()
    buckets = {f"adapters-{index // ADAPTERS_PER_BUCKET}" for index in range(len(names))}
    for bucket in sorted(buckets):
        s3.create_bucket(Bucket=bucket)
    jobs, sources = [], {}
    for index, name in enumerate(names):
        files = variants[RANKS[index // base_models % len(RANKS)]]
        bucket = f"adapters-{index // ADAPTERS_PER_BUCKET}"
        sources[name] = (f"s3://{bucket}/{name}/", sum(path.stat().st_size for path in files))
        jobs += [(bucket, f"{name}/{path.name}", path) for path in files]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda job: s3.upload_file(str(job[2]), job[0], job[1]), jobs))
    return sources


def adapter_set(core: kubernetes.client.CoreV1Api, model: str) -> AdapterSet:
    configmap = core.read_namespaced_config_map(ChildNames(model).adapter_set, NAMESPACE)
    return AdapterSet.from_configmap_data(configmap.data or {})


def slots_by_adapter(published: AdapterSet) -> dict[str, frozenset[int]]:
    every = frozenset((published.replica_slots or {}).values())
    return {a.name: every if a.slots is None else frozenset(a.slots) for a in published.adapters}


def runtime_activity(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/standin/activity", timeout=10) as response:
        return json.loads(response.read())


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path, cluster: Cluster, clients: Clients, moto: MotoServer):
        self.args, self.work, self.cluster, self.clients, self.moto = args, work, cluster, clients, moto
        self.admin = client_through(clients.script, cluster.plane.admin_token, work / "script.kubeconfig")
        self.custom = kubernetes.client.CustomObjectsApi(self.admin)
        self.core = kubernetes.client.CoreV1Api(self.admin)
        self.models = [f"model-{index}" for index in range(args.base_models)]
        self.sidecars: dict[str, SidecarPod] = {}
        self.free_runtimes: dict[str, list[str]] = {}
        self.standins: list[subprocess.Popen[bytes]] = []
        self.operator: subprocess.Popen[bytes] | None = None
        self.adapters: LoraAdapterWatch | None = None

    # ---- setup -------------------------------------------------------------------------------------------------

    def start(self) -> None:
        self.core.create_namespace({"metadata": {"name": NAMESPACE}})
        self.core.create_namespaced_secret(NAMESPACE, {"metadata": {"name": "s3-credentials"}, "stringData": {
            "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}})
        kubeconfig = self.cluster.proxy.write_kubeconfig(self.work / "operator.kubeconfig",
                                                         self.cluster.operator_token, NAMESPACE)
        env = {**os.environ, "KUBECONFIG": str(kubeconfig), "LORAPLEX_METRICS_PORT": "0",
               "LORAPLEX_RESYNC_SECONDS": "600"}
        self.operator = subprocess.Popen(
            [sys.executable, "-m", "loraplex.cli", "operator", "-n", NAMESPACE, "--standalone"], env=env,
            stdout=(self.work / "operator.log").open("wb"), stderr=subprocess.STDOUT)
        for model in self.models:
            self.free_runtimes[model] = self.start_standins(model, self.args.replicas + 1)
            self.custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, "basemodeldeployments", {
                "apiVersion": f"{GROUP}/{VERSION}", "kind": "BaseModelDeployment", "metadata": {"name": model},
                "spec": {"model": model, "runtime": "vllm", "image": "vllm/vllm-openai:v0.11.0",
                         "replicas": self.args.replicas, "lora": {"maxCpuLoras": 10000},
                         "storage": {"credentialsSecret": "s3-credentials",
                                     "s3": {"endpoint": self.moto.url, "region": "us-east-1",
                                            "forcePathStyle": True}}}})
        for model in self.models:
            self.follow_pods(model, self.args.replicas)
        self.adapters = LoraAdapterWatch(self.admin, NAMESPACE).start()

    def start_standins(self, model: str, instances: int) -> list[str]:
        ports_file = self.work / f"standin-{model}.ports"
        self.standins.append(subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "vllm_standin.py"), "--served-model", model, "--instances",
             str(instances), "--max-lora-rank", "64", "--ports-file", str(ports_file)],
            stdout=(self.work / f"standin-{model}.log").open("wb"), stderr=subprocess.STDOUT))
        wait_for(ports_file.exists, 30, f"the vLLM stand-ins of {model}")
        return [f"http://127.0.0.1:{port}" for port in ports_file.read_text().split()]

    def pods(self, model: str) -> list[dict[str, Any]]:
        listed = self.core.list_namespaced_pod(NAMESPACE, label_selector=f"{BASE_MODEL_LABEL}={model}")
        return [self.admin.sanitize_for_serialization(pod) for pod in listed.items
                if pod.metadata.deletion_timestamp is None]

    def follow_pods(self, model: str, count: int) -> None:
        """Wait for `count` live pods of `model`, start a sidecar for each new one and stop those of gone ones."""
        wait_for(lambda: len(self.pods(model)) == count, 120, f"{count} pods of {model}")
        live = {pod["metadata"]["name"]: pod for pod in self.pods(model)}
        for name in [name for name, sidecar in self.sidecars.items()
                     if name.startswith(f"{model}-") and name not in live]:
            sidecar = self.sidecars.pop(name)
            sidecar.stop()
            self.free_runtimes[model].append(sidecar.runtime_url)
        for name, pod in sorted(live.items()):
            if name not in self.sidecars:
                self.sidecars[name] = start_sidecar(self.admin, self.clients.sidecars, pod, self.work / "pods" / name,
                                                    self.free_runtimes[model].pop(0))

    # ---- waiting ------------------------------------------------------------------------------------------------

    def converged(self, model: str) -> bool:
        """Every adapter of `model` Ready on all it wants, and each pod's runtime serving exactly its assignment."""
        assert self.adapters is not None
        mine = [a for a in list(self.adapters.objects.values()) if a["spec"]["baseModel"] == model]
        status = [a.get("status") or {} for a in mine]
        if not all(s.get("phase") == "Ready" and s.get("ready") == f"{self.args.placement}/{self.args.placement}"
                   for s in status):
            return False
        published = adapter_set(self.core, model)
        pods = {name: sidecar for name, sidecar in self.sidecars.items() if name.startswith(f"{model}-")}
        if set(published.replica_slots or {}) != set(pods):
            return False
        return all(set(runtime_activity(sidecar.runtime_url)["served"])
                   == {a.served_name for a in published.assigned_to(name)} for name, sidecar in pods.items())

    def quiet(self, seconds: float = 5.0, limit: float = 180.0) -> None:
        """Wait until no counted client has written for `seconds`."""
        start = last_change = time.perf_counter()
        last = None
        while time.perf_counter() - last_change < seconds:
            writes = [requests_and_writes(c)[1] for c in self.clients.by_client().values()]
            if writes != last:
                last, last_change = writes, time.perf_counter()
            if time.perf_counter() - start > limit:
                raise TimeoutError(f"loraplex kept writing for {limit:.0f} s")
            time.sleep(0.5)

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of the operator, all sidecars, the runtimes' stand-ins, moto and this script."""
        assert self.operator is not None
        return {"operator": cpu_seconds(self.operator.pid),
                "sidecars": sum(cpu_seconds(s.process.pid) for s in self.sidecars.values() if s.process.poll() is None),
                "vLLM stand-ins": sum(cpu_seconds(p.pid) for p in self.standins),
                "moto": cpu_seconds(self.moto.process.pid), "this script and its proxies": cpu_seconds(os.getpid())}

    def refusals(self) -> int:
        """Lines in the sidecars' logs where the API server refused them something."""
        return sum(1 for log in (self.work / "pods").glob("*/sidecar.log")
                   for line in log.read_text(errors="replace").splitlines() if REFUSAL.search(line.split(" ", 2)[-1]))

    # ---- phases ---------------------------------------------------------------------------------------------

    def create_adapters(self, sources: dict[str, tuple[str, int]]) -> dict[str, Any]:
        assert self.adapters is not None and self.operator is not None
        self.clients.reset()
        apiserver_before = read_apiserver(self.cluster.plane)
        cpu_before = self.cpu()
        total = len(sources)
        start = time.perf_counter()

        def create(item: tuple[int, str]) -> None:
            index, name = item
            self.custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, "loraadapters", {
                "apiVersion": f"{GROUP}/{VERSION}", "kind": "LoraAdapter", "metadata": {"name": name},
                "spec": {"baseModel": self.models[index % len(self.models)], "source": sources[name][0],
                         "replicas": self.args.placement}})

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(create, enumerate(sources)))
        created = time.perf_counter() - start
        wanted = f"{self.args.placement}/{self.args.placement}"
        progress: list[tuple[float, int]] = []
        while True:
            ready = self.adapters.count(lambda a: (a.get("status") or {}).get("phase") == "Ready"
                                        and a["status"].get("ready") == wanted)
            progress.append((time.perf_counter() - start, ready))
            if ready == total:
                break
            if time.perf_counter() - start > self.args.timeout:
                raise TimeoutError(f"{ready} of {total} adapters Ready {wanted} after {self.args.timeout} s")
            time.sleep(0.5)
        elapsed = time.perf_counter() - start
        counts = self.clients.by_client()
        apiserver = read_apiserver(self.cluster.plane) - apiserver_before
        cpu = {name: seconds - cpu_before.get(name, 0.0) for name, seconds in self.cpu().items()}
        cpu.update({name: apiserver.cpu[name] for name in ("kube-apiserver", "etcd") if name in apiserver.cpu})
        wait_for(lambda: all(self.converged(model) for model in self.models), 300, "every runtime serving its part")
        return {"created_s": created, "ready_s": elapsed, "progress": progress, "counts": counts,
                "apiserver_requests": round(apiserver.total("apiserver_request_total")),
                "cpu_s": cpu, "busy": apiserver.cpu[MACHINE_BUSY] / apiserver.cpu[MACHINE_TOTAL]}

    def at_rest(self) -> dict[str, Any]:
        self.quiet()
        self.clients.reset()
        before = read_apiserver(self.cluster.plane)
        time.sleep(self.args.rest_seconds)
        after = read_apiserver(self.cluster.plane) - before
        apiserver_writes = collections.Counter()
        for (sample, labels), value in after.samples.items():
            tags = dict(labels)
            if sample == "apiserver_request_total" and tags.get("verb") in ("POST", "PUT", "PATCH", "DELETE") \
                    and round(value):
                apiserver_writes[f"{tags['verb']} {tags.get('resource', '')}"] += round(value)
        return {"counts": self.clients.by_client(), "apiserver_total": round(after.total("apiserver_request_total")),
                "apiserver_writes": dict(apiserver_writes.most_common())}

    def bytes_per_replica(self, sources: dict[str, tuple[str, int]]) -> dict[str, Any]:
        held = {name: folder_bytes(sidecar.peft_dir) for name, sidecar in self.sidecars.items()}
        served = {name: len(runtime_activity(sidecar.runtime_url)["served"]) for name, sidecar in self.sidecars.items()}
        total = sum(size for _, size in sources.values())
        return {"held": held, "served": served, "total": total,
                "fair": total * self.args.placement / len(self.sidecars)}

    def scale(self, model: str, replicas: int) -> dict[str, Any]:
        """Scale `model` to `replicas` and measure what moved: in the adapter set, and in the runtimes."""
        before_set = adapter_set(self.core, model)
        urls = {name: s.runtime_url for name, s in self.sidecars.items() if name.startswith(f"{model}-")}
        before_runtime = {url: runtime_activity(url) for url in self.free_runtimes[model] + list(urls.values())}
        start = time.perf_counter()
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, NAMESPACE, "basemodeldeployments", model,
                                                   {"spec": {"replicas": replicas}})
        self.follow_pods(model, replicas)
        wait_for(lambda: self.converged(model), self.args.timeout, f"{model} converged at {replicas} replicas")
        elapsed = time.perf_counter() - start
        after_set = adapter_set(self.core, model)
        before, after = slots_by_adapter(before_set), slots_by_adapter(after_set)
        gained = collections.Counter(slot for name, slots in after.items() for slot in slots - before.get(name, set()))
        lost = collections.Counter(slot for name, slots in before.items() for slot in slots - after.get(name, set()))
        loads = unloads = 0
        for url, earlier in before_runtime.items():
            now = runtime_activity(url)
            loads += now["loads"] - earlier["loads"]
            unloads += now["unloads"] - earlier["unloads"]
        old_slots = set((before_set.replica_slots or {}).values())
        new_slots = set((after_set.replica_slots or {}).values())
        return {"to": replicas, "converged_s": elapsed, "moved": sum(gained.values()), "removed": sum(lost.values()),
                "onto_new": sum(n for slot, n in gained.items() if slot not in old_slots),
                "off_gone": sum(n for slot, n in lost.items() if slot not in new_slots),
                "gone_held": sum(len(slots - new_slots) for slots in before.values()),
                "placements": sum(len(slots) for slots in before.values()),
                "loads": loads, "unloads": unloads, "slots": len(new_slots)}

    def stop(self) -> None:
        if self.adapters is not None:
            self.adapters.stop()
        for sidecar in self.sidecars.values():
            sidecar.stop()
        for process in [*self.standins, self.operator]:
            if process is not None and process.poll() is None:
                process.terminate()
                process.wait(timeout=30)
        self.admin.close()


def run(args: argparse.Namespace, total: int, work: Path) -> dict[str, Any]:
    """One size, on a control plane of its own."""
    work.mkdir(parents=True)
    moto = MotoServer(work / "moto.log")
    cluster: Cluster | None = None
    clients: Clients | None = None
    bench: Bench | None = None
    try:
        sources = build_sources(work, moto, [f"a{index:05d}" for index in range(total)], args.base_models)
        cluster = Cluster.start(work)
        clients = Clients(cluster)
        bench = Bench(args, work, cluster, clients, moto)
        bench.start()
        result: dict[str, Any] = {"adapters": total, "first": bench.create_adapters(sources)}
        result["rest"] = bench.at_rest()
        result["bytes"] = bench.bytes_per_replica(sources)
        result["up"] = bench.scale(bench.models[0], args.replicas + 1)
        result["down"] = bench.scale(bench.models[0], args.replicas)
        assert bench.operator is not None
        result["operator"] = {"peak_rss_mb": peak_rss_mb(bench.operator.pid),
                              "cpu_s": cpu_seconds(bench.operator.pid)}
        result["refusals"] = bench.refusals()
        return result
    finally:
        if bench is not None:
            bench.stop()
        if clients is not None:
            clients.stop()
        if cluster is not None:
            cluster.stop()
        moto.stop()


def spread(values: list[float], unit: str = "", scale: float = 1.0) -> str:
    mean = sum(values) / len(values)
    return f"{min(values) / scale:.0f} / {mean / scale:.0f} / {max(values) / scale:.0f}{unit}"


def per_size_rows(args: argparse.Namespace, result: dict[str, Any]) -> list[tuple[str, str]]:
    """(what, figure) for one size, in the table's order."""
    first, rest, held, up, down = result["first"], result["rest"], result["bytes"], result["up"], result["down"]
    total, placement = result["adapters"], args.placement
    minutes = args.rest_seconds / 60
    kib = 1024
    rows = [
        ("adapters created (8 clients) in", f"{first['created_s']:.1f} s"),
        (f"first create → all Ready with ready {placement}/{placement}", f"{first['ready_s']:.1f} s"),
    ]
    for name, counts in first["counts"].items():
        requests, writes = requests_and_writes(counts)
        rows.append((f"API requests per adapter (writes): {name}", f"{requests / total:.2f} ({writes / total:.2f})"))
    rows.append(("API requests per adapter: everyone (kube-apiserver's `apiserver_request_total`)",
                 f"{first['apiserver_requests'] / total:.2f}"))
    for name, counts in rest["counts"].items():
        requests, writes = requests_and_writes(counts)
        rows.append((f"at rest, {args.rest_seconds:.0f} s: requests / min (writes): {name}",
                     f"{requests / minutes:.1f} ({writes})"))
    rows += [
        ("at rest: kube-apiserver's requests / min, every client", f"{rest['apiserver_total'] / minutes:.1f}"),
        ("KiB per replica, min / mean / max (its PEFT folder)", spread(list(held["held"].values()), "", kib)),
        (f"KiB per replica if even: all adapters' bytes x {placement} / replicas", f"{held['fair'] / kib:.0f}"),
        ("adapters per replica, min / mean / max (its runtime)", spread(list(held["served"].values()))),
        (f"adapter replicas held in all (adapters x {placement})", str(sum(held["served"].values()))),
        *movement_rows(up, args.replicas), *movement_rows(down, args.replicas + 1),
        ("operator peak RSS", f"{result['operator']['peak_rss_mb']:.0f} MB"),
        ("operator CPU: first create → all Ready (whole run)",
         f"{first['cpu_s']['operator']:.1f} s ({result['operator']['cpu_s']:.1f} s)"),
        ("API refusals in the sidecars' logs", str(result["refusals"])),
    ]
    return rows


def movement_rows(move: dict[str, Any], before: int) -> list[tuple[str, str]]:
    step, placements = f"{before}→{move['to']}", move["placements"]
    if move["to"] > before:
        moved = (f"{move['moved']} of {placements} ({move['onto_new']} onto the new slot; "
                 f"{placements} / {move['to']} = {placements / move['to']:.0f})")
    else:
        moved = (f"{move['moved']} of {placements} ({move['off_gone']} off the removed slot, which held "
                 f"{move['gone_held']})")
    return [
        (f"scale {step}: adapter replicas whose slot changed", moved),
        (f"scale {step}: loads / unloads in the runtimes", f"{move['loads']} / {move['unloads']}"),
        (f"scale {step}: until converged", f"{move['converged_s']:.1f} s"),
    ]


def report(args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    largest = results[-1]
    first = largest["first"]
    sizes = " ".join(str(r["adapters"]) for r in results)
    columns = [per_size_rows(args, result) for result in results]
    cpu = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in sorted(first["cpu_s"].items(), key=lambda i: -i[1]))
    lines = [
        "# Placement scale",
        "",
        f"`python bench/placement_scale.py --adapters {sizes} --replicas {args.replicas} --placement {args.placement}` "
        f"on {machine()}: a real Kubernetes v1.36 control plane (no kubelet) per size, the real operator as the "
        f"chart's ServiceAccount, {args.base_models} base models x {args.replicas} Pending replicas, each pod's "
        "real sidecar as the pod's ServiceAccount with the environment the operator rendered, a PEFT folder of its "
        "own and a vLLM 0.32 stand-in (`bench/vllm_standin.py`); the adapters split evenly over the base models, "
        f"each `spec.replicas: {args.placement}`, real PEFT adapters of ranks {', '.join(map(str, RANKS))} in moto "
        "S3. Requests are counted at one API proxy per client (the operator; the sidecars; this script's creates "
        "and status watch), and by kube-apiserver for everyone. Movement is base model 0's: an adapter replica "
        "moved when one of its slots in the adapter set is new; loads and unloads are what the sidecars asked "
        "of the runtimes (a removed pod's runtime goes with it).",
        "",
        *table(["adapters", *(str(r["adapters"]) for r in results)],
               [[what, *(column[index][1] for column in columns)] for index, (what, _) in enumerate(columns[0])]),
        "",
        f"CPU from the first create to all Ready at {largest['adapters']}: {cpu}; the machine's cores were "
        f"{first['busy']:.0%} busy. Writes kube-apiserver served at rest, for anyone (the control plane's own "
        "leases and the like): "
        + (", ".join(f"{what} {n}" for what, n in largest["rest"]["apiserver_writes"].items()) or "none") + ".",
        "",
        f"### Requests per client, first create → all Ready ({largest['adapters']} adapters)",
        "",
        *table(["client", "verb", "resource", "requests", "per adapter"],
               [[name, verb, resource, str(n), f"{n / largest['adapters']:.2f}"]
                for name, counts in first["counts"].items()
                for (_, verb, resource), n in counts.most_common(8)], align="lllrr"),
    ]

    def draw(figure) -> None:  # type: ignore[no-untyped-def]
        over_time, balance = figure.subplots(1, 2)
        for result in results:
            progress = result["first"]["progress"]
            over_time.plot([t for t, _ in progress], [n / result["adapters"] for _, n in progress],
                           label=f"{result['adapters']} adapters")
        over_time.set(xlabel="seconds after the first create", ylabel=f"fraction Ready {args.placement}/"
                      f"{args.placement}", title=f"{args.base_models * args.replicas} replicas, placement "
                      f"{args.placement}")
        over_time.legend()
        held = largest["bytes"]
        pods = sorted(held["held"])
        balance.bar(range(len(pods)), [held["held"][pod] / 1024 for pod in pods])
        balance.axhline(held["fair"] / 1024, color="grey", linestyle="--", label="all bytes x placement / replicas")
        balance.set(xlabel="replica", ylabel="KiB in its PEFT folder",
                    title=f"Bytes per replica, {largest['adapters']} adapters")
        balance.legend()

    write(args.results, "placement_scale", lines, draw, size=(11, 4))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, nargs="+", default=[2000],
                        help="adapters in all, split over the base models; one run per size")
    parser.add_argument("--replicas", type=int, default=10, help="replicas per base model")
    parser.add_argument("--placement", type=int, default=3, help="each adapter's spec.replicas")
    parser.add_argument("--base-models", type=int, default=2)
    parser.add_argument("--rest-seconds", type=float, default=120, help="the window at rest")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds any phase may take")
    add_results_argument(parser)
    args = parser.parse_args()
    if args.placement > args.replicas:
        parser.error(f"--placement {args.placement} exceeds --replicas {args.replicas}: no adapter could be Ready")
    work = Path(tempfile.mkdtemp(prefix="loraplex-placement-"))
    results = []
    try:
        for total in args.adapters:
            results.append(run(args, total, work / str(total)))
            print(json.dumps({k: v for k, v in results[-1].items() if k in ("adapters", "up", "down", "operator")}),
                  flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(args, results)


if __name__ == "__main__":
    main()
