"""`make demo`: build a tiny model and adapters, run loraplex end to end on this machine, show the result.

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
from tests.integration.harness import wait_for

ADAPTERS = ["tiny-llama-math", "tiny-llama-squad", "tiny-llama-pubmedqa"]


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
        say("Building a tiny Llama and three LoRA adapters (math, squad, pubmedqa) plus a broken one, locally")
        build_artifacts(workdir / "artifacts")
        say("Starting a real Kubernetes v1.36 control plane (etcd, kube-apiserver with RBAC, controller-manager, "
            "scheduler), a process kubelet for its GPU node, S3 (moto_server), and the loraplex operator as the "
            "chart's ServiceAccount")
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
        say("kubectl get nodes,replicasets,pods -o wide  (bound by kube-scheduler, run by the process kubelet)")
        print(stack.kubectl("get", "nodes,replicasets,pods", "-o", "wide"), end="")
        say("Adapter status")
        for name in [*ADAPTERS, "tiny-llama-broken"]:
            status = stack.adapter(name)["status"]
            ready = next(c for c in status["conditions"] if c["type"] == "Ready")
            print(f"  {name:22} {status['phase']:8} {status['readyReplicas']}/{status['replicas']} replicas  "
                  f"{ready['reason']}: {ready['message']}")
        pod = stack.pod_names("tiny-llama")[0]
        say(f"One completion per model from real vLLM in pod {pod} (POST /v1/completions, prompt "
            "'What is 7 times 6?')")
        for model in ["tiny-llama", *[name for name in ADAPTERS]]:
            print(f"  {model:22} -> {stack.completion(pod, model)!r}")
        print("  (random tiny weights: the text is noise, but each adapter's differs from the base model's)")
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
