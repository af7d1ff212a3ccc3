"""Sidecar scale: one replica asked to hold many small adapters, then restarted with all of them on disk.

    .venv/bin/python bench/sidecar_scale.py [--adapters 500]

The real `loraplex sidecar` process against the API emulator, moto S3 and a fake vLLM that honours
the LoRA endpoints. Measures the time until every adapter is reported Loaded, the sidecar's peak RSS,
and, after a SIGKILL and restart, the time until the restarted sidecar is ready with every adapter
re-verified from the volume, and how many objects it fetched again (should be none).
Writes bench/results/sidecar_scale.{md,png}.
"""

from __future__ import annotations

import argparse
import re
import shutil
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
from loraplex.api.adapter_set import DesiredAdapter  # noqa: E402
from loraplex.api.types import Runtime  # noqa: E402
from tests.adapters import make_hf_adapter  # noqa: E402
from tests.conftest import load_crds  # noqa: E402
from tests.fakes.runtime import FakeRuntime  # noqa: E402
from tests.integration.harness import wait_for  # noqa: E402
from tests.integration.sidecar_harness import AdapterSetWriter, MotoServer, SidecarProcess  # noqa: E402
from tests.kube_emulator import EmulatorThread  # noqa: E402


def object_gets(moto_log: Path) -> int:
    return len(re.findall(r'"GET /adapters/[^?\s]+ HTTP', moto_log.read_text(errors="replace")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--adapters", type=int, default=500)
    add_results_argument(parser)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="loraplex-bench-"))
    emulator = EmulatorThread(history_limit=200_000).start()
    moto = MotoServer(work / "moto.log")
    runtime = FakeRuntime("vllm", "meta/llama3").start()
    sidecars: list[SidecarProcess] = []
    try:
        make_hf_adapter(work / "adapter", rank=8)
        s3 = moto.client()
        s3.create_bucket(Bucket="adapters")
        names = [f"a{index:04d}" for index in range(args.adapters)]
        files = sorted(p for p in (work / "adapter").iterdir() if p.is_file())
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda job: s3.upload_file(str(job[1]), "adapters", f"many/{job[0]}/{job[1].name}"),
                          [(name, path) for name in names for path in files]))
        kubeconfig = work / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump(emulator.kubeconfig()))
        configuration = kubernetes.client.Configuration()
        configuration.host = emulator.url
        api = kubernetes.client.ApiClient(configuration)
        for crd in load_crds():
            kubernetes.client.ApiextensionsV1Api(api).create_custom_resource_definition(crd)
        writer = AdapterSetWriter(api, Runtime.VLLM)
        custom = kubernetes.client.CustomObjectsApi(api)

        def count_loaded() -> int:
            return emulator.call(lambda: sum(
                1 for obj in emulator.store.objects["loraadapters.loraplex.io"].values()
                if ((obj.get("status") or {}).get("replicaStatus") or {}).get("llama3-0", {}).get("state") == "Loaded"))

        env = {"AWS_ENDPOINT_URL_S3": moto.url, "LORAPLEX_REASSERT_SECONDS": "3600",
               "LORAPLEX_MAX_CONCURRENT_DOWNLOADS": "8"}
        sidecar = SidecarProcess(kubeconfig, work / "volume", Runtime.VLLM, runtime.url, work / "sidecar.log",
                                 env).start()
        sidecars.append(sidecar)
        wait_for(lambda: sidecar.get("/healthz")[0] == 200, 60, "sidecar up", sidecar.log)
        for name in names:  # the LoraAdapter objects exist; the adapter set is published in one write
            custom.create_namespaced_custom_object("loraplex.io", "v1alpha1", "default", "loraadapters", {
                "apiVersion": "loraplex.io/v1alpha1", "kind": "LoraAdapter", "metadata": {"name": name},
                "spec": {"baseModel": "llama3", "source": f"s3://adapters/many/{name}/"}})
            obj = custom.get_namespaced_custom_object("loraplex.io", "v1alpha1", "default", "loraadapters", name)
            writer.adapters[name] = DesiredAdapter(name=name, uid=obj["metadata"]["uid"], generation=1,
                                                   served_name=name, source=f"s3://adapters/many/{name}/")
        first_progress: list[tuple[float, int]] = []
        start = time.perf_counter()
        writer.publish()
        wait_for(lambda: recorded(first_progress, start, count_loaded()) == args.adapters, 600,
                 "every adapter Loaded", sidecar.log)
        first_sync = time.perf_counter() - start
        first_rss = peak_rss_mb(sidecar.process.pid)  # type: ignore[union-attr]
        fetched = object_gets(work / "moto.log")
        assert len(runtime.loaded) == args.adapters

        sidecar.kill()
        restarted = SidecarProcess(kubeconfig, work / "volume", Runtime.VLLM, runtime.url,
                                   work / "sidecar-2.log", env)
        sidecars.append(restarted)
        time.sleep(1.1)  # status timestamps have 1 s resolution: the old life's are now strictly earlier
        restart_stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        start = time.perf_counter()
        restarted.start()

        def count_reported_again() -> int:
            return emulator.call(lambda: sum(
                ((obj.get("status") or {}).get("replicaStatus") or {}).get("llama3-0", {}).get("updated", "")
                >= restart_stamp for obj in emulator.store.objects["loraadapters.loraplex.io"].values()))

        restart_progress: list[tuple[float, int]] = []
        wait_for(lambda: restarted.get("/readyz")[0] == 200
                 and recorded(restart_progress, start, count_reported_again()) == args.adapters, 600,
                 "restarted sidecar ready, every adapter reported again", restarted.log)
        reverified = time.perf_counter() - start
        refetched = object_gets(work / "moto.log") - fetched
    finally:
        for process in sidecars:
            process.stop()
        runtime.stop()
        moto.stop()
        emulator.stop()
        shutil.rmtree(work, ignore_errors=True)

    lines = [
        "# Sidecar scale",
        "",
        f"`python bench/sidecar_scale.py --adapters {args.adapters}` on {machine()}: the real sidecar with the API "
        "emulator, moto S3 and a fake vLLM in the same machine; adapters of about 10 kB (3 objects each), "
        "8 downloads at a time.",
        "",
        *table(["", ""], [
            [f"{args.adapters} adapters published in one adapter-set write → all reported Loaded",
             f"{first_sync:.1f} s"],
            ["sidecar peak RSS", f"{first_rss:.0f} MB"],
            [f"SIGKILL, restart with all {args.adapters} on disk → ready, all re-verified and reported",
             f"{reverified:.1f} s"],
            ["objects fetched again after the restart", str(refetched)],
        ]),
    ]

    def draw(figure) -> None:  # type: ignore[no-untyped-def]
        axes = figure.subplots()
        axes.plot(*zip(*first_progress, strict=True), label="first start: reported Loaded")
        axes.plot(*zip(*restart_progress, strict=True), label="after SIGKILL + restart: re-verified and reported")
        axes.axvline(5, color="grey", linestyle="--", label="restart target 5 s")
        axes.set(xlabel="seconds", ylabel="adapters", title=f"One sidecar, {args.adapters} adapters")
        axes.legend()

    write(args.results, "sidecar_scale", lines, draw, size=(7, 4))


def recorded(samples: list[tuple[float, int]], start: float, count: int) -> int:
    samples.append((time.perf_counter() - start, count))
    return count

if __name__ == "__main__":
    main()
