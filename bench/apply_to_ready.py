"""Apply→Ready time of a LoraAdapter, split into transfer and everything else, on the local stack.

    .venv/bin/python bench/apply_to_ready.py [--adapters 50] [--replicas 2]

The local stack is a real Kubernetes control plane (loraplex.local) with the operator as the chart's
ServiceAccount, and a process kubelet running the pods the Deployment controller makes (real vLLM, its CPU
build from `make vllm`, and the sidecar, each sidecar with its own ServiceAccount token). Each adapter is created with
kubectl-equivalent API calls and timed until its status says Ready on every replica (polled every 10 ms).
"Transfer" is the median time the sidecar's own downloader takes to fetch the same adapter from the same
S3 server; the rest is watches, the adapter set, validation, the atomic install, vLLM's own load and status
aggregation. vLLM's load (POST /v1/load_lora_adapter) is read from each sidecar's
loraplex_sidecar_runtime_load_seconds histogram, so it is split out too.
Writes bench/results/apply_to_ready.{md,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp
import kubernetes
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.apiserver import ApiserverReading, read_apiserver  # noqa: E402
from bench.report import add_results_argument, machine, table, write  # noqa: E402
from demo.stack import LocalStack, build_artifacts  # noqa: E402
from loraplex.api.contract import SIDECAR_PORT  # noqa: E402
from loraplex.sources import Downloader, Progress  # noqa: E402
from loraplex.sources.s3 import S3Client  # noqa: E402
from tests.adapters import make_hf_adapter_for  # noqa: E402
from tests.integration.harness import wait_for  # noqa: E402
from tests.integration.sidecar_harness import free_port  # noqa: E402
from tests.vllm_server import VLLM_PYTHON  # noqa: E402

GROUP, VERSION = "loraplex.io", "v1alpha1"


def transfer_seconds(port: int, prefix: str, scratch: Path) -> float:
    os.environ.update(AWS_ACCESS_KEY_ID="demo", AWS_SECRET_ACCESS_KEY="demo-secret", AWS_REGION="us-east-1")

    async def fetch() -> float:
        async with aiohttp.ClientSession() as session:
            downloader = Downloader(session, s3=S3Client(endpoint=f"http://127.0.0.1:{port}", force_path_style=True))
            target = scratch / f"fetch-{time.monotonic_ns()}"
            start = time.perf_counter()
            await downloader.fetch(f"s3://demo-adapters/{prefix}/", target, Progress())
            elapsed = time.perf_counter() - start
            shutil.rmtree(target)
            return elapsed

    return asyncio.run(fetch())


def vllm_load_seconds(stack: LocalStack, pod: str) -> float:
    """Seconds this pod's vLLM has spent in load calls so far, as its sidecar counted them."""
    with urllib.request.urlopen(stack.url(pod, SIDECAR_PORT) + "/metrics", timeout=10) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "loraplex_sidecar_runtime_load_seconds_sum":
                return sample.value
    raise RuntimeError(f"{pod}: its sidecar reports no runtime load seconds")


def measure(stack: LocalStack, api: kubernetes.client.ApiClient, adapters: int, replicas: int,
            scratch: Path) -> tuple[list[float], list[float], list[float], ApiserverReading]:
    """Apply→Ready, transfer and vLLM load seconds of each adapter, created one after another, and what
    kube-apiserver served meanwhile."""
    namespace = stack.namespace
    custom = kubernetes.client.CustomObjectsApi(api)
    credentials = {"AWS_ACCESS_KEY_ID": "demo", "AWS_SECRET_ACCESS_KEY": "demo-secret", "AWS_REGION": "us-east-1"}
    kubernetes.client.CoreV1Api(api).create_namespaced_secret(
        namespace, {"metadata": {"name": "s3"}, "stringData": credentials})
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "basemodeldeployments", {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "BaseModelDeployment", "metadata": {"name": "tiny-llama"},
        "spec": {"model": "tiny-llama", "modelSource": "/root/.cache/huggingface/tiny-llama", "runtime": "vllm",
                 "image": "vllm/vllm-openai:v0.32.0", "replicas": replicas, "gpus": {"count": 1},
                 "cache": {"persistentVolumeClaim": {"claimName": "demo-models"}},
                 "env": [{"name": "VLLM_CPU_KVCACHE_SPACE", "value": "1"},
                         {"name": "VLLM_ENABLE_V1_MULTIPROCESSING", "value": "0"}],
                 "runtimeArgs": ["--dtype", "float32", "--max-model-len", "128"],
                 # fewer than the adapters: vLLM evicts the least recently used ones and never refuses a load
                 "lora": {"maxRank": 16, "maxCpuLoras": 8, "maxGpuLoras": 4},
                 "storage": {"credentialsSecret": "s3",
                             "s3": {"endpoint": f"http://127.0.0.1:{stack.s3_port}", "forcePathStyle": True}}}})
    wait_for(lambda: (stack.base_model("tiny-llama").get("status") or {}).get("readyReplicas") == replicas,
             600, "replicas ready (real vLLM starting)", stack.log_tail)
    pods = stack.pod_names("tiny-llama")
    totals, transfers, loads = [], [], []
    assert stack.control_plane is not None
    before = read_apiserver(stack.control_plane)
    for index in range(adapters):
        name = f"bench-{index}"
        loaded_before = {pod: vllm_load_seconds(stack, pod) for pod in pods}
        start = time.perf_counter()
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "loraadapters", {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "LoraAdapter", "metadata": {"name": name},
            "spec": {"baseModel": "tiny-llama", "source": f"s3://demo-adapters/tiny-llama/{name}/"}})
        while True:
            status = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "loraadapters",
                                                         name).get("status") or {}
            if status.get("phase") == "Ready" and status.get("readyReplicas") == replicas:
                break
            if time.perf_counter() - start > 60:
                raise TimeoutError(f"{name} not Ready after 60s" + stack.log_tail())
            time.sleep(0.01)
        totals.append(time.perf_counter() - start)
        loads.append(max(vllm_load_seconds(stack, pod) - loaded_before[pod] for pod in pods))
        transfers.append(transfer_seconds(stack.s3_port, f"tiny-llama/{name}", scratch))
        print(f"{name}: apply->Ready {totals[-1]:.3f}s, transfer {transfers[-1]:.3f}s, vLLM load {loads[-1]:.3f}s",
              flush=True)
    return totals, transfers, loads, read_apiserver(stack.control_plane) - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--adapters", type=int, default=50)
    parser.add_argument("--replicas", type=int, default=2)
    add_results_argument(parser)
    args = parser.parse_args()
    if not VLLM_PYTHON.exists():
        parser.error("real vLLM is not installed: run `make vllm` first")
    work = Path(tempfile.mkdtemp(prefix="loraplex-bench-"))
    artifacts = build_artifacts(work / "artifacts")
    for index in range(args.adapters):
        make_hf_adapter_for(artifacts / "model", artifacts / "adapters" / f"bench-{index}", rank=8, seed=100 + index)
    stack = LocalStack(work / "cluster", artifacts, s3_port=free_port(), resync_seconds=300)
    try:
        stack.start()
        with stack.api() as api:
            totals, transfers, loads, apiserver = measure(stack, api, args.adapters, args.replicas, work)
    finally:
        stack.stop()
        shutil.rmtree(work, ignore_errors=True)
    overheads = [total - transfer for total, transfer in zip(totals, transfers, strict=True)]
    size = "tiny (about 10 kB: rank 8 on q_proj and v_proj of a 2-layer model)"

    def p95(values: list[float]) -> float:
        return statistics.quantiles(values, n=20)[18] if len(values) >= 2 else values[0]

    lines = [
        "# Apply→Ready beyond transfer",
        "",
        f"`python bench/apply_to_ready.py --adapters {args.adapters} --replicas {args.replicas}` on {machine()}: "
        "the real operator, sidecars and real vLLM 0.32 (CPU build) on the local stack (a real Kubernetes v1.36 "
        "control plane with the operator as the chart's ServiceAccount, pods run by a process kubelet, moto S3), "
        "adapters "
        f"{size}, created one after another, Ready polled every 10 ms.",
        "",
        *table(["", "median", "p95"], [
            [f"apply→Ready on all {args.replicas} replicas", f"{statistics.median(totals):.3f} s",
             f"{p95(totals):.3f} s"],
            ["transfer (the sidecar's downloader, same objects)", f"{statistics.median(transfers):.3f} s",
             f"{p95(transfers):.3f} s"],
            ["vLLM's load call (the slower replica)", f"{statistics.median(loads):.3f} s", f"{p95(loads):.3f} s"],
            ["everything else (apply→Ready minus transfer)", f"{statistics.median(overheads):.3f} s",
             f"{p95(overheads):.3f} s"],
        ]),
        "",
        "The product promises under 1 s beyond transfer; vLLM's own load is inside that second.",
        "",
        "Meanwhile kube-apiserver served (all clients; the GETs of loraadapters are this script's polling), "
        "with their mean latency: " + ", ".join(
            f"{verb} {resource} {n} ({seconds * 1000:.1f} ms)" for verb, resource, n, seconds in apiserver.requests()
            if verb in ("POST", "PATCH", "PUT", "GET") and n >= args.adapters) + ".",
    ]

    def draw(figure) -> None:  # type: ignore[no-untyped-def]
        axes = figure.subplots()
        axes.hist(overheads, bins=20, color="tab:blue")
        for label, value, style in (("p50", statistics.median(overheads), "-"), ("p95", p95(overheads), "--")):
            axes.axvline(value, color="black", linestyle=style, label=f"{label} {value:.3f} s")
        axes.set(xlabel="apply→Ready minus transfer (s)", ylabel="adapters",
                 title=f"{len(overheads)} adapters, {args.replicas} replicas")
        axes.legend()

    write(args.results, "apply_to_ready", lines, draw, size=(7, 4))

if __name__ == "__main__":
    main()
