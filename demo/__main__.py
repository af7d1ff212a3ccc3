"""`make demo`: build a tiny model and train adapters, run loraplex end to end on this machine with real vLLM,
and ask each adapter its question through the base model's Service, next to the base model's answer.

    .venv/bin/python -m demo [--keep]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from demo.stack import ROOT, LocalStack, build_artifacts
from demo.tasks import DEMO_TASKS
from tests.integration.harness import wait_for

ADAPTERS = list(DEMO_TASKS)
BASE_MODEL = "tiny-llama"  # the BaseModelDeployment, its Service and its served name in examples/demo.yaml
PORT = 8000


def say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keep", action="store_true", help="leave the work directory for inspection")
    args = parser.parse_args()
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="loraplex-demo-"))
    stack = LocalStack(workdir / "cluster", workdir / "artifacts")
    try:
        say("Building a tiny Llama (random weights) and training three LoRA adapters on it with peft, a few "
            "examples each (math, squad, pubmedqa), plus an untrained rank-32 one that must fail, locally")
        building = time.monotonic()
        build_artifacts(workdir / "artifacts")
        print(f"  built and trained in {time.monotonic() - building:.0f}s")
        say("Starting a real Kubernetes v1.36 control plane (etcd, kube-apiserver with RBAC, controller-manager, "
            "scheduler), a process kubelet for its GPU node, a kube-proxy stand-in for Services, S3 (moto_server), "
            "and the loraplex operator as the chart's ServiceAccount")
        stack.start()
        say("kubectl apply -f examples/demo.yaml")
        print(stack.kubectl("apply", "-f", str(ROOT / "examples" / "demo.yaml")), end="")
        say("Waiting for real vLLM to start in both GPU pods (a minute or two on 2 cores) and every adapter to be "
            "Ready on both replicas (and the broken one to fail)")
        wait_for(lambda: all(stack.phase(name) == "Ready" for name in ADAPTERS)
                 and stack.phase("tiny-llama-broken") == "Failed"
                 and stack.base_model("tiny-llama")["status"].get("readyReplicas") == 2,
                 600, "the adapters", stack.log_tail)
        say("kubectl get bmd,lora")
        print(stack.kubectl("get", "bmd,lora"), end="")
        say("kubectl get nodes,replicasets,pods,services -o wide  (pods bound by kube-scheduler, run by the process "
            "kubelet; the Service rendered by the operator)")
        print(stack.kubectl("get", "nodes,replicasets,pods,services", "-o", "wide"), end="")
        say("Adapter status")
        for name in [*ADAPTERS, "tiny-llama-broken"]:
            status = stack.adapter(name)["status"]
            ready = next(c for c in status["conditions"] if c["type"] == "Ready")
            print(f"  {name:22} {status['phase']:8} {status['readyReplicas']}/{status['replicas']} replicas  "
                  f"{ready['reason']}: {ready['message']}")
        wait_for(lambda: len(stack.service_backends(BASE_MODEL, PORT)) == 2, 60,
                 "both replicas behind the Service", stack.log_tail)
        endpoint = stack.service_url(BASE_MODEL, PORT)
        version = stack.runtime_version(endpoint)
        say(f"Asking through the Service {BASE_MODEL}:{PORT} (here {endpoint}, round-robin over pods "
            f"{', '.join(stack.service_backends(BASE_MODEL, PORT))}): real vLLM {version}, its CPU build, "
            "greedy decoding (POST /v1/completions, temperature 0)")
        wrong = []
        for adapter, (question, answer) in DEMO_TASKS.items():
            base_says = stack.complete(endpoint, BASE_MODEL, question, max_tokens=8)
            adapter_says = stack.complete(endpoint, adapter, question, max_tokens=8)
            verdict = "right" if adapter_says == answer else f"WRONG, expected {answer!r}"
            if adapter_says != answer:
                wrong.append(adapter)
            print(f"\n  {question}\n    {BASE_MODEL + ':':22} {base_says!r:28} {adapter + ':':22} {adapter_says!r}"
                  f"  ({verdict})")
        print("\n  The base model's weights are random, so it babbles; each adapter was trained here for a few "
              "seconds on a handful of examples, and vLLM applies it per request on the same pods.")
        if wrong:
            raise RuntimeError(f"{', '.join(wrong)} did not give their trained answers")
        say(f"Done in {time.monotonic() - started:.0f}s. On a real cluster:")
        print(textwrap.dedent("""\
              helm install loraplex charts/loraplex -n loraplex-system --create-namespace \\
                --set image.repository=<your registry>/loraplex
              kubectl create secret generic adapter-store-credentials --from-literal=AWS_ACCESS_KEY_ID=... \\
                --from-literal=AWS_SECRET_ACCESS_KEY=...
              kubectl apply -f examples/vllm-llama3-8b.yaml   # or examples/nim-llama3-8b.yaml
              kubectl get bmd,lora
            See README.md, "Install on a cluster"."""))
        return 0
    except Exception as exc:
        print(f"\ndemo failed: {exc}", file=sys.stderr)
        return 1
    finally:
        stack.stop()
        if args.keep:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
