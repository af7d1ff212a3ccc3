"""Sidecar scale: one replica asked to hold many small adapters, then restarted with all of them on disk.

    .venv/bin/python bench/sidecar_scale.py [--adapters 500]

The real `loraplex sidecar` process against a real Kubernetes control plane (loraplex.local), signed in
as the ServiceAccount the operator renders for a base model's pods with the sidecar's Role, moto S3 and real
vLLM (the CPU build from `make vllm`, on a tiny model, with 2 CPU LoRA slots: it keeps every adapter listed
and reads evicted ones from the volume again). Measures the time until every adapter is loaded by vLLM and
reported Loaded, the sidecar's peak RSS, and, after a SIGKILL and restart, the time until the restarted
sidecar is ready with every adapter re-verified from the volume and found still served by vLLM, and how
many objects it fetched again (should be none).
Writes bench/results/sidecar_scale.{md,png}.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

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
)
from bench.report import add_results_argument, cpu_seconds, machine, peak_rss_mb, table, write  # noqa: E402
from loraplex.api.adapter_set import DesiredAdapter  # noqa: E402
from loraplex.api.types import Runtime  # noqa: E402
from loraplex.local.controlplane import ControlPlane  # noqa: E402
from loraplex.local.install import install_crds  # noqa: E402
from tests.adapters import VLLM_TINY_LLAMA, make_hf_adapter_for, make_tiny_model  # noqa: E402
from tests.integration.harness import wait_for  # noqa: E402
from tests.integration.sidecar_harness import (  # noqa: E402
    POD,
    AdapterSetWriter,
    MotoServer,
    SidecarProcess,
    install_sidecar_identity,
)
from tests.vllm_server import VllmServer  # noqa: E402

NAMESPACE = "default"


def object_gets(moto_log: Path) -> int:
    return len(re.findall(r'"GET /adapters/[^?\s]+ HTTP', moto_log.read_text(errors="replace")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--adapters", type=int, default=500)
    add_results_argument(parser)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="loraplex-bench-"))
    moto = MotoServer(work / "moto.log")
    runtime = VllmServer(make_tiny_model(work / "model", config=VLLM_TINY_LLAMA), work / "vllm.log")
    plane = ControlPlane(work / "control-plane")
    admin: kubernetes.client.ApiClient | None = None
    sidecars: list[SidecarProcess] = []
    adapters: LoraAdapterWatch | None = None
    starting = ThreadPoolExecutor(1)
    try:
        vllm_started: Future[VllmServer] = starting.submit(runtime.start)  # a minute or more: meanwhile, the rest
        plane.start()
        admin = admin_client(plane)
        make_hf_adapter_for(work / "model", work / "adapter")
        s3 = moto.client()
        s3.create_bucket(Bucket="adapters")
        names = [f"a{index:04d}" for index in range(args.adapters)]
        files = sorted(p for p in (work / "adapter").iterdir() if p.is_file())
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda job: s3.upload_file(str(job[1]), "adapters", f"many/{job[0]}/{job[1].name}"),
                          [(name, path) for name in names for path in files]))
        install_crds(admin, ROOT)
        identity = install_sidecar_identity(admin, plane, NAMESPACE, work / "sidecar.kubeconfig")
        writer = AdapterSetWriter(admin, NAMESPACE, Runtime.VLLM)
        custom = kubernetes.client.CustomObjectsApi(admin)

        def create(name: str) -> None:
            obj = custom.create_namespaced_custom_object("loraplex.io", "v1alpha1", NAMESPACE, "loraadapters", {
                "apiVersion": "loraplex.io/v1alpha1", "kind": "LoraAdapter", "metadata": {"name": name},
                "spec": {"baseModel": "llama3", "source": f"s3://adapters/many/{name}/"}})
            writer.adapters[name] = DesiredAdapter(name=name, uid=obj["metadata"]["uid"], generation=1,
                                                   served_name=name, source=f"s3://adapters/many/{name}/")

        with ThreadPoolExecutor(8) as pool:  # the LoraAdapter objects exist; the adapter set comes in one write
            list(pool.map(create, names))
        writer.adapters = {name: writer.adapters[name] for name in names}
        adapters = LoraAdapterWatch(admin, NAMESPACE, "lorareplicas").start()  # the sidecar's report

        def count_loaded() -> int:
            report = ((adapters.objects.get(POD) or {}).get("status") or {}).get("adapters") or {}
            return sum(1 for entry in report.values() if entry.get("state") == "Loaded")

        env = {"AWS_ENDPOINT_URL_S3": moto.url, "LORAPLEX_MAX_CONCURRENT_DOWNLOADS": "8"}
        vllm_started.result()
        sidecar = SidecarProcess(identity.kubeconfig, NAMESPACE, work / "volume", Runtime.VLLM, runtime.url,
                                 work / "sidecar.log", env, identity.pod_uid).start()
        sidecars.append(sidecar)
        wait_for(lambda: sidecar.get("/healthz")[0] == 200, 60, "sidecar up", sidecar.log)
        first_progress: list[tuple[float, int]] = []
        before = read_apiserver(plane), processes_cpu(sidecar, moto, runtime)
        start = time.perf_counter()
        writer.publish()
        wait_for(lambda: recorded(first_progress, start, count_loaded()) == args.adapters, 600,
                 "every adapter Loaded", sidecar.log)
        first_sync = time.perf_counter() - start
        first_api = read_apiserver(plane) - before[0]
        first_cpu = since(before[1], processes_cpu(sidecar, moto, runtime))
        first_rss = peak_rss_mb(sidecar.process.pid)  # type: ignore[union-attr]
        fetched = object_gets(work / "moto.log")
        listed = runtime.adapters()
        assert len(listed) == args.adapters, f"vLLM lists {len(listed)} adapters"

        sidecar.kill()
        restarted = SidecarProcess(identity.kubeconfig, NAMESPACE, work / "volume", Runtime.VLLM, runtime.url,
                                   work / "sidecar-2.log", env, identity.pod_uid)
        sidecars.append(restarted)
        before = read_apiserver(plane), processes_cpu(None, moto, runtime)
        start = time.perf_counter()
        restarted.start()

        # The restarted sidecar adopts its LoraReplica: entries it verifies unchanged are not written again,
        # so it is done when it is ready (its initial sync re-verified every adapter) and all are still Loaded.
        restart_progress: list[tuple[float, int]] = []
        wait_for(lambda: restarted.get("/readyz")[0] == 200
                 and recorded(restart_progress, start, count_loaded()) == args.adapters, 600,
                 "restarted sidecar ready, every adapter still reported Loaded", restarted.log)
        reverified = time.perf_counter() - start
        restart_api = read_apiserver(plane) - before[0]
        restart_cpu = since(before[1], processes_cpu(restarted, moto, runtime))
        refetched = object_gets(work / "moto.log") - fetched
        assert runtime.adapters() == listed, "the restarted sidecar left vLLM serving what it served"
        refusals = [line for process in sidecars for line in process.refusals()]
    finally:
        if adapters is not None:
            adapters.stop()
        for process in sidecars:
            process.stop()
        runtime.stop()
        starting.shutdown()
        moto.stop()
        if admin is not None:
            admin.close()
        plane.stop()
        shutil.rmtree(work, ignore_errors=True)

    lines = [
        "# Sidecar scale",
        "",
        f"`python bench/sidecar_scale.py --adapters {args.adapters}` on {machine()}: the real sidecar, as its own "
        "ServiceAccount with the Role the operator renders for it, against a real Kubernetes v1.36 control plane, "
        "with moto S3 and real vLLM 0.32 (CPU build, tiny model, `--max-loras 2 --max-cpu-loras 2`) on the same "
        "machine; adapters of about 30 kB (3 objects each), 8 downloads at a time; Loaded means vLLM loaded it.",
        "",
        *table(["", ""], [
            [f"{args.adapters} adapters published in one adapter-set write → all reported Loaded",
             f"{first_sync:.1f} s"],
            ["sidecar peak RSS", f"{first_rss:.0f} MB"],
            [f"SIGKILL, restart with all {args.adapters} on disk → ready, all re-verified and reported",
             f"{reverified:.1f} s"],
            ["objects fetched again after the restart", str(refetched)],
            ["API requests the apiserver refused the sidecar (its log)", str(len(refusals))],
        ]),
        "",
        served("First start", first_api, first_cpu),
        "",
        served("Restart", restart_api, restart_cpu),
    ]

    def draw(figure) -> None:  # type: ignore[no-untyped-def]
        axes = figure.subplots()
        axes.plot(*zip(*first_progress, strict=True), label="first start: reported Loaded")
        axes.plot(*zip(*restart_progress, strict=True), label="after SIGKILL + restart: re-verified and reported")
        axes.axvline(5, color="grey", linestyle="--", label="restart target 5 s")
        axes.set(xlabel="seconds", ylabel="adapters", title=f"One sidecar, {args.adapters} adapters")
        axes.legend()

    write(args.results, "sidecar_scale", lines, draw, size=(7, 4))


def served(phase: str, api: ApiserverReading, cpu: dict[str, float]) -> str:
    """What kube-apiserver served in one phase, and the CPU each process used meanwhile."""
    requests = ", ".join(f"{verb} {resource} {n} ({seconds * 1000:.1f} ms mean)"
                         for verb, resource, n, seconds in api.requests()[:6])
    used = {**cpu, **{name: api.cpu[name] for name in ("kube-apiserver", "etcd")}}
    busy = api.cpu[MACHINE_BUSY] / api.cpu[MACHINE_TOTAL]
    return (f"{phase}: kube-apiserver served {requests}; CPU used: "
            + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in sorted(used.items(), key=lambda i: -i[1]))
            + f"; the machine's cores were {busy:.0%} busy.")


def since(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {name: seconds - before.get(name, 0.0) for name, seconds in after.items()}


def processes_cpu(sidecar: SidecarProcess | None, moto: MotoServer, vllm: VllmServer) -> dict[str, float]:
    """CPU seconds of the sidecar, moto, vLLM (API server and engine) and this script (the status watch)."""
    cpu = {"moto": cpu_seconds(moto.process.pid), "this script (watch)": cpu_seconds(os.getpid()),
           "vLLM": sum(cpu_seconds(pid) for pid in process_group(vllm.process.pid))}  # type: ignore[union-attr]
    if sidecar is not None and sidecar.process is not None:
        cpu["sidecar"] = cpu_seconds(sidecar.process.pid)
    return cpu


def process_group(group: int) -> list[int]:
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[2]) == group:
                members.append(int(stat.parent.name))
        except (OSError, ValueError):
            continue
    return members


def recorded(samples: list[tuple[float, int]], start: float, count: int) -> int:
    samples.append((time.perf_counter() - start, count))
    return count

if __name__ == "__main__":
    main()
