"""Operator scale: B base models x A adapters each, until every adapter is Ready.

    .venv/bin/python bench/operator_scale.py [--base-models 10] [--adapters 10 100 500]

Runs the real operator against the API emulator. Each base model gets one replica whose kubelet and
sidecar are simulated by bench/simulated_replicas.py: a Pod object, and a "sidecar" that follows the
adapter-set ConfigMap and reports each adapter Loaded by merge patch, as the real sidecar does (its own
cost is measured in the sidecar benchmarks). What is measured is the operator: time until every adapter is
Ready, its peak RSS, and the API requests it made per adapter (the emulator counts requests by
client, so the simulation's and this script's own requests are not included).
Writes bench/results/operator_scale.{md,png}.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import kubernetes
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import add_results_argument, machine, peak_rss_mb, table, write  # noqa: E402
from tests.conftest import load_crds  # noqa: E402
from tests.kube_emulator import EmulatorThread  # noqa: E402

GROUP, VERSION = "loraplex.io", "v1alpha1"


def run(base_model_count: int, adapters_per_model: int, work: Path) -> dict[str, float]:
    emulator = EmulatorThread(history_limit=200_000).start()
    kubeconfig = work / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(emulator.kubeconfig()))
    configuration = kubernetes.client.Configuration()
    configuration.host = emulator.url
    api = kubernetes.client.ApiClient(configuration, pool_threads=8)
    api.rest_client.pool_manager.connection_pool_kw["maxsize"] = 16
    for crd in load_crds():
        kubernetes.client.ApiextensionsV1Api(api).create_custom_resource_definition(crd)
    custom = kubernetes.client.CustomObjectsApi(api)
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "LORAPLEX_METRICS_PORT": "0",
           "LORAPLEX_RESYNC_SECONDS": "600"}
    replicas: subprocess.Popen[bytes] | None = None

    def launch_operator(log: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "loraplex.cli", "operator", "-n", "default", "--standalone"],
                                env=env, stdout=(work / log).open("wb"), stderr=subprocess.STDOUT)

    def operator_counts() -> tuple[int, int]:
        counts = emulator.call(lambda: dict(emulator.store.client_counts))
        return (sum(n for (client, _, _), n in counts.items() if client == "aiohttp"),
                sum(n for (client, verb, _), n in counts.items()
                    if client == "aiohttp" and verb in ("create", "update", "patch", "delete")))

    def count_ready() -> int:
        return emulator.call(lambda: sum(1 for obj in emulator.store.objects["loraadapters.loraplex.io"].values()
                                         if (obj.get("status") or {}).get("phase") == "Ready"))

    def cpu_seconds(process: subprocess.Popen[bytes]) -> float:
        fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    def wait_until_settled(process: subprocess.Popen[bytes], since: float) -> tuple[float, float]:
        """When the operator last made a request or used the CPU (under 0.1 s in 3 s counts as idle), and
        its CPU seconds by then."""
        last = (operator_counts()[0], cpu_seconds(process))
        last_change, busy_cpu = since, last[1]
        while time.perf_counter() - last_change < 3 or last[0] == 0:
            time.sleep(0.5)
            requests, cpu = operator_counts()[0], cpu_seconds(process)
            if requests != last[0] or cpu - last[1] >= 0.1 * 0.5 / 3:
                last_change, busy_cpu = time.perf_counter(), cpu
            last = (requests, cpu)
            if time.perf_counter() - since > 600:
                raise TimeoutError("the operator never settled")
        return last_change, busy_cpu

    operator = launch_operator("operator.log")
    try:
        names = [f"model-{index}" for index in range(base_model_count)]
        for name in names:
            custom.create_namespaced_custom_object(GROUP, VERSION, "default", "basemodeldeployments", {
                "apiVersion": f"{GROUP}/{VERSION}", "kind": "BaseModelDeployment", "metadata": {"name": name},
                "spec": {"model": name, "runtime": "vllm", "image": "vllm/vllm-openai:v0.11.0",
                         "lora": {"maxCpuLoras": 10000}}})
        replicas = subprocess.Popen([sys.executable, str(ROOT / "bench" / "simulated_replicas.py"), emulator.url,
                                     *names], stdout=(work / "replicas.log").open("wb"), stderr=subprocess.STDOUT)
        time.sleep(3)  # the operator has started and reconciled the base models
        emulator.call(emulator.store.client_counts.clear)
        total = base_model_count * adapters_per_model
        start = time.perf_counter()

        def create(index: int) -> None:
            model = names[index % base_model_count]
            custom.create_namespaced_custom_object(GROUP, VERSION, "default", "loraadapters", {
                "apiVersion": f"{GROUP}/{VERSION}", "kind": "LoraAdapter", "metadata": {"name": f"{model}-a{index}"},
                "spec": {"baseModel": model, "source": f"s3://adapters/{model}/a{index}/"}})

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(create, range(total)))
        created = time.perf_counter() - start
        progress: list[tuple[float, int]] = []
        while True:
            ready = count_ready()
            progress.append((time.perf_counter() - start, ready))
            if ready == total:
                break
            if time.perf_counter() - start > 900:
                raise TimeoutError(f"{ready} of {total} Ready after 900 s")
            time.sleep(0.2)
        elapsed = time.perf_counter() - start
        peak_rss = peak_rss_mb(operator.pid)
        counts = emulator.call(lambda: dict(emulator.store.client_counts))
        operator_requests, writes = operator_counts()
        breakdown = {f"{verb} {resource}": round(n / total, 2)
                     for (client, verb, resource), n in sorted(counts.items(), key=lambda item: -item[1])
                     if client == "aiohttp"}

        # A restarted operator must find everything converged: it reads, and writes nothing.
        wait_until_settled(operator, time.perf_counter())  # its last batched status writes are out
        operator.kill()
        operator.wait(timeout=30)
        emulator.call(emulator.store.client_counts.clear)
        restarted = time.perf_counter()
        operator = launch_operator("operator-restarted.log")
        settled, restart_cpu = wait_until_settled(operator, restarted)
        restart_requests, restart_writes = operator_counts()
        restart_breakdown = {f"{verb} {resource}": n for (client, verb, resource), n
                             in emulator.call(lambda: dict(emulator.store.client_counts)).items()
                             if client == "aiohttp"}
        if count_ready() != total:
            raise AssertionError(f"only {count_ready()} of {total} adapters Ready after the operator restart")
        return {"adapters": total, "created_s": created, "ready_s": elapsed, "peak_rss_mb": peak_rss,
                "requests_per_adapter": operator_requests / total, "writes_per_adapter": writes / total,
                "restart_s": settled - restarted, "restart_cpu_s": restart_cpu, "restart_requests": restart_requests,
                "restart_writes": restart_writes, "restart_breakdown": restart_breakdown,
                "breakdown": breakdown, "progress": progress}
    finally:
        for process in (replicas, operator):
            if process is not None:
                process.terminate()
                process.wait(timeout=30)
        emulator.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base-models", type=int, default=10)
    parser.add_argument("--adapters", type=int, nargs="+", default=[10, 100, 500],
                        help="adapters per base model, one run each")
    add_results_argument(parser)
    args = parser.parse_args()
    rows = []
    for per_model in args.adapters:
        with tempfile.TemporaryDirectory(prefix="loraplex-scale-") as scratch:
            row = run(args.base_models, per_model, Path(scratch))
        rows.append(row)
        print(json.dumps({key: value for key, value in row.items() if key != "progress"}), flush=True)
    lines = [
        "# Operator scale",
        "",
        f"`python bench/operator_scale.py --base-models {args.base_models} --adapters "
        f"{' '.join(map(str, args.adapters))}` on {machine()}: the real operator against the API emulator (which "
        "shares the cores), one simulated replica per base model reporting every adapter Loaded. Requests are "
        "the operator's own, counted at the emulator.",
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
