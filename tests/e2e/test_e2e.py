"""End to end on one machine, on real vLLM: the real control plane (scheduler, ReplicaSets, garbage collection),
the real operator under the chart's RBAC, pods bound to a GPU node for their nvidia.com/gpu request and run by the
process kubelet (`vllm serve` of vLLM's CPU build + the sidecar, each sidecar with its own ServiceAccount token),
adapters from moto S3, loaded by vLLM itself and answering as transformers + peft compute them. The scenarios run
in order on one stack, as a user's day would."""

from __future__ import annotations

import json
import textwrap
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from demo.stack import LocalStack, build_artifacts
from demo.tasks import TASKS
from loraplex.local.controlplane import free_port
from tests.integration.harness import wait_for
from tests.vllm_server import BLOCK_SIZE, LONG_PROMPT, VLLM_PYTHON

# vLLM takes most of a minute to start on 2 cores, and the scenarios start it four times.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]
PROMPT = "What is 7 times 6?"
# Small KV blocks, so LONG_PROMPT fills some and vLLM's prefix cache holds blocks computed with an adapter's
# weights: an update served from those cached blocks would answer with the old weights.
RUNTIME_ARGS = ["--dtype", "float32", "--max-model-len", "128", "--block-size", str(BLOCK_SIZE)]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    return build_artifacts(tmp_path_factory.mktemp("artifacts"))


@pytest.fixture(scope="module")
def stack(tmp_path_factory, artifacts, control_plane) -> Iterator[LocalStack]:
    if not VLLM_PYTHON.exists():
        raise AssertionError("real vLLM is not installed: run `make vllm` (make test does it for you)")
    local = LocalStack(tmp_path_factory.mktemp("cluster"), artifacts, s3_port=free_port(),
                       resync_seconds=600,  # no periodic resync: events alone must get every scenario there
                       control_plane=control_plane, namespace="e2e")
    local.start()
    yield local
    local.stop()


def manifest(stack: LocalStack, replicas: int = 2, adapters: dict[str, str] | None = None,
             placed: dict[str, int] | None = None) -> str:
    """The base model and its adapters (name -> folder); `placed` gives some of them a replica count."""
    docs = [
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3"},
         "stringData": {"AWS_ACCESS_KEY_ID": "demo", "AWS_SECRET_ACCESS_KEY": "demo-secret"}},
        {"apiVersion": "loraplex.io/v1alpha1", "kind": "BaseModelDeployment", "metadata": {"name": "tiny-llama"},
         "spec": {"model": "tiny-llama", "modelSource": "/root/.cache/huggingface/tiny-llama", "runtime": "vllm",
                  "image": "vllm/vllm-openai:v0.32.0", "replicas": replicas, "gpus": {"count": 1},
                  "cache": {"persistentVolumeClaim": {"claimName": "demo-models"}},
                  "env": [{"name": "VLLM_CPU_KVCACHE_SPACE", "value": "1"},
                          {"name": "VLLM_ENABLE_V1_MULTIPROCESSING", "value": "0"}],
                  "runtimeArgs": RUNTIME_ARGS,
                  "lora": {"maxRank": 16, "maxCpuLoras": 4, "maxGpuLoras": 2},
                  "storage": {"credentialsSecret": "s3", "s3": {"endpoint": f"http://127.0.0.1:{stack.s3_port}",
                                                                 "region": "us-east-1", "forcePathStyle": True}}}},
    ]
    for name, folder in (adapters or {}).items():
        docs.append({"apiVersion": "loraplex.io/v1alpha1", "kind": "LoraAdapter", "metadata": {"name": name},
                     "spec": {"baseModel": "tiny-llama", "source": f"s3://demo-adapters/tiny-llama/{folder}/",
                              "format": "hf", **({"replicas": placed[name]} if name in (placed or {}) else {})}})
    return yaml.safe_dump_all(docs)


def apply(stack: LocalStack, text: str) -> None:
    path = stack.workdir / "applied.yaml"
    path.write_text(text)
    stack.kubectl("apply", "-f", str(path))


def direct(artifacts: Path, adapter: str | None, prompt: str = PROMPT, max_tokens: int = 8) -> list[int]:
    """Greedy token ids from transformers (+ peft): what vLLM must reproduce. Like vLLM's ignore_eos, the end of
    sequence ends nothing but is not suppressed either (min_new_tokens would pick the next best token instead)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(artifacts / "model")
    model = AutoModelForCausalLM.from_pretrained(artifacts / "model")
    if adapter:
        model = PeftModel.from_pretrained(model, artifacts / "adapters" / adapter)
    ids = tokenizer(prompt, return_tensors="pt")
    model.generation_config.eos_token_id = None
    output = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return output[0, ids["input_ids"].shape[1]:].tolist()


def vllm_tokens(stack: LocalStack, pod: str, model: str, prompt: str = PROMPT, max_tokens: int = 8) -> list[int]:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "return_token_ids": True,
            "ignore_eos": True}
    request = urllib.request.Request(stack.url(pod) + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=120) as response:
        return [int(token) for token in json.loads(response.read())["choices"][0]["token_ids"]]


def ready_everywhere(stack: LocalStack, names: list[str], replicas: int) -> bool:
    for name in names:
        status = stack.adapter(name).get("status") or {}
        if status.get("phase") != "Ready" or status.get("readyReplicas") != replicas:
            return False
    return True


def pods(stack: LocalStack) -> list[str]:
    return stack.pod_names("tiny-llama")


ADAPTERS = {"math": "math", "squad": "squad", "broken": "broken"}


def test_apply_then_ready_on_every_replica_with_the_broken_one_failed(stack):
    apply(stack, manifest(stack, adapters=ADAPTERS))
    wait_for(lambda: ready_everywhere(stack, ["math", "squad"], 2), 600, "math and squad Ready on 2 real vLLMs",
             stack.log_tail)
    wait_for(lambda: stack.phase("broken") == "Failed", 60, "the broken adapter Failed", stack.log_tail)
    ready = next(c for c in stack.adapter("broken")["status"]["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "ValidationFailed"
    assert "adapter_config.json: r=32 exceeds this base model's maxLoraRank 16" in ready["message"]
    wait_for(lambda: stack.base_model("tiny-llama")["status"].get("readyReplicas") == 2,
             60, "pods ready", stack.log_tail)
    table = stack.kubectl("get", "lora")
    assert "math" in table and "Ready" in table and "Failed" in table
    stack.kubectl("wait", "--for=condition=Ready", "lora/math", "lora/squad", "--timeout=10s")
    for pod in pods(stack):
        assert sorted(stack.served(pod)) == ["math", "squad", "tiny-llama"]


def test_pods_are_scheduled_by_the_real_scheduler_through_a_replicaset(stack):
    api = stack.api()
    import kubernetes

    replica_sets = kubernetes.client.AppsV1Api(api).list_namespaced_replica_set(stack.namespace).items
    assert [rs.metadata.owner_references[0].name for rs in replica_sets] == ["tiny-llama"]
    for pod in stack.pods("tiny-llama"):
        assert pod["spec"]["nodeName"] == f"gpu-node-{stack.namespace}"
        assert pod["metadata"]["ownerReferences"][0]["kind"] == "ReplicaSet"
        inference = pod["spec"]["containers"][0]
        assert inference["resources"]["limits"]["nvidia.com/gpu"] == "1"
        scheduled = next(c for c in pod["status"]["conditions"] if c["type"] == "PodScheduled")
        assert scheduled["status"] == "True"
    events = kubernetes.client.CoreV1Api(api).list_namespaced_event(stack.namespace).items
    assert any(e.reason == "Scheduled" and e.source.component == "default-scheduler" for e in events) or any(
        e.reason == "Scheduled" and (e.reporting_component or "") == "default-scheduler" for e in events)


def test_each_sidecar_talks_to_the_api_as_its_own_service_account(stack):
    for pod in stack.pods("tiny-llama"):
        assert pod["spec"]["serviceAccountName"] == "tiny-llama-loraplex"
        token_volume = next(v for v in pod["spec"]["volumes"] if v["name"].startswith("kube-api-access-"))
        assert any("serviceAccountToken" in source for source in token_volume["projected"]["sources"])
    uids = {pod["metadata"]["name"]: pod["metadata"]["uid"] for pod in stack.pods("tiny-llama")}
    for pod, uid in uids.items():  # each replica wrote its own report, with its own token, owned by its pod
        report = stack.replica_report(pod)
        assert [owner["uid"] for owner in report["metadata"]["ownerReferences"]] == [uid]
        assert report["status"]["adapters"]["math"]["state"] == "Loaded"
    # The operator aggregates the reports into the adapter's status.
    assert set(stack.adapter("math")["status"]["replicaStatus"]) == set(pods(stack))


def test_each_adapter_serves_its_own_weights(stack, artifacts):
    first, second = pods(stack)
    outputs = {model: vllm_tokens(stack, first, model) for model in ("tiny-llama", "math", "squad")}
    assert outputs["tiny-llama"] == direct(artifacts, None)
    assert outputs["math"] == direct(artifacts, "math")
    assert outputs["squad"] == direct(artifacts, "squad")
    assert len({tuple(tokens) for tokens in outputs.values()}) == 3
    assert vllm_tokens(stack, second, "math") == outputs["math"]


def test_trained_adapters_answer_their_questions_through_the_service_and_the_base_model_does_not(stack):
    url = stack.service_url("tiny-llama")
    for name in ("math", "squad"):
        question, answer = TASKS[name].question, TASKS[name].answer
        assert stack.complete(url, name, question) == answer
        assert stack.complete(url, "tiny-llama", question) != answer


def test_updating_an_adapter_serves_the_new_weights_not_cached_old_ones(stack, artifacts):
    before = pods(stack)
    restarts = stack.restarts("tiny-llama")
    old = direct(artifacts, "math", LONG_PROMPT)
    for pod in before:  # fills vLLM's prefix cache with blocks computed by the old weights
        assert vllm_tokens(stack, pod, "math", LONG_PROMPT) == old
    apply(stack, manifest(stack, adapters={**ADAPTERS, "math": "pubmedqa"}))
    wait_for(lambda: stack.adapter("math")["status"].get("observedGeneration") == 2
             and ready_everywhere(stack, ["math"], 2), 120, "math generation 2 Ready", stack.log_tail)
    new = direct(artifacts, "pubmedqa", LONG_PROMPT)
    assert new != old
    for pod in pods(stack):
        assert vllm_tokens(stack, pod, "math", LONG_PROMPT) == new
        assert vllm_tokens(stack, pod, "math") == direct(artifacts, "pubmedqa")
    assert set(pods(stack)) == set(before)  # same pods, same vLLM processes
    assert stack.restarts("tiny-llama") == restarts


def test_runtime_killed_then_adapters_restored(stack, artifacts):
    pod = pods(stack)[0]
    assert stack.kubelet is not None
    stack.kubelet.kill_container(stack.namespace, pod, "inference")
    wait_for(lambda: stack.restarts("tiny-llama")[pod]["inference"] >= 1, 30, "vLLM restarted", stack.log_tail)
    wait_for(lambda: not ready_everywhere(stack, ["math", "squad"], 2), 30,
             "the killed replica's adapters no longer reported Ready", stack.log_tail)
    wait_for(lambda: ready_everywhere(stack, ["math", "squad"], 2)
             and stack.base_model("tiny-llama")["status"].get("readyReplicas") == 2, 300,
             "Ready again on the restarted vLLM", stack.log_tail)
    assert sorted(stack.served(pod)) == ["math", "squad", "tiny-llama"]
    assert vllm_tokens(stack, pod, "math") == direct(artifacts, "pubmedqa")


def test_operator_killed_then_restart_converges_without_duplicates(stack):
    stack.stop_operator(kill=True)
    apply(stack, manifest(stack, adapters={**ADAPTERS, "math": "pubmedqa", "pubmedqa": "pubmedqa"}))
    stack.start_operator()
    wait_for(lambda: ready_everywhere(stack, ["math", "squad", "pubmedqa"], 2), 120, "converged after restart",
             stack.log_tail)
    api = stack.api()
    import kubernetes

    assert len(kubernetes.client.AppsV1Api(api).list_namespaced_deployment(stack.namespace).items) == 1
    config_maps = kubernetes.client.CoreV1Api(api).list_namespaced_config_map(stack.namespace).items
    owned = [cm.metadata.name for cm in config_maps if cm.metadata.owner_references]
    assert owned == ["tiny-llama-adapters"]
    assert stack.adapter("pubmedqa")["metadata"]["finalizers"] == ["loraplex.io/adapter-cleanup"]


def test_scaling_up_gives_the_new_replica_every_adapter(stack, artifacts):
    apply(stack, manifest(stack, replicas=3, adapters={**ADAPTERS, "math": "pubmedqa", "pubmedqa": "pubmedqa"}))
    wait_for(lambda: len(pods(stack)) == 3, 30, "a third pod", stack.log_tail)
    wait_for(lambda: ready_everywhere(stack, ["math", "squad", "pubmedqa"], 3),
             300, "Ready on 3 replicas", stack.log_tail)
    for pod in pods(stack):
        assert sorted(stack.served(pod)) == ["math", "pubmedqa", "squad", "tiny-llama"]
    assert vllm_tokens(stack, pods(stack)[-1], "squad") == direct(artifacts, "squad")


def holders(stack: LocalStack, adapter: str) -> list[str]:
    """The running pods whose LoraReplica reports `adapter` Loaded."""
    return [pod for pod in pods(stack) if ((stack.replica_report(pod).get("status") or {}).get("adapters") or {})
            .get(adapter, {}).get("state") == "Loaded"]


def test_an_adapter_on_one_replica_is_on_exactly_one_pod_and_moves_when_that_pod_is_deleted(stack, artifacts):
    everything = {**ADAPTERS, "math": "pubmedqa", "pubmedqa": "pubmedqa", "solo": "math"}
    apply(stack, manifest(stack, replicas=3, adapters=everything, placed={"solo": 1}))
    wait_for(lambda: stack.phase("solo") == "Ready", 300, "solo Ready", stack.log_tail)
    status = stack.adapter("solo")["status"]
    [holder] = status["placedOn"]
    assert (status["ready"], status["wantedReplicas"]) == ("1/1", 1)
    assert holders(stack, "solo") == [holder]
    for pod in pods(stack):  # only its pod serves it; the others neither hold nor report it
        assert ("solo" in stack.served(pod)) == (pod == holder)
        assert ("solo" in (stack.replica_report(pod).get("status") or {}).get("adapters", {})) == (pod == holder)
    assert "1/1" in stack.kubectl("get", "lora", "solo")
    assert vllm_tokens(stack, holder, "solo") == direct(artifacts, "math")

    before = pods(stack)
    stack.kubectl("delete", "pod", holder, "--wait=false")
    wait_for(lambda: holder not in pods(stack) and len(pods(stack)) == 3, 120, "a replacement pod", stack.log_tail)
    wait_for(lambda: stack.phase("solo") == "Ready" and stack.adapter("solo")["status"]["placedOn"] != [holder],
             300, "solo Ready again on another pod", stack.log_tail)
    [moved_to] = stack.adapter("solo")["status"]["placedOn"]
    # It waited for the replacement, which took its pod's slot, rather than move to a running pod and back.
    assert moved_to in pods(stack) and moved_to not in before
    # A just-started vLLM may miss a health check, and its sidecar then reports nothing Loaded for a moment.
    wait_for(lambda: holders(stack, "solo") == [moved_to], 120, "solo reported Loaded by its new pod alone",
             stack.log_tail)
    assert vllm_tokens(stack, moved_to, "solo") == direct(artifacts, "math")
    wait_for(lambda: ready_everywhere(stack, ["math", "squad", "pubmedqa"], 3), 300,
             "every-replica adapters Ready on the replacement too", stack.log_tail)


def test_deleting_an_adapter_unloads_it_everywhere_and_releases_the_finalizer(stack):
    stack.kubectl("delete", "lora", "squad", "--timeout=60s")  # waits until every replica released it
    assert "squad" not in stack.kubectl("get", "lora", "-o", "name")
    assert stack.kubelet is not None
    for pod in pods(stack):
        assert "squad" not in stack.served(pod)
        adapters = stack.kubelet.volume_path(stack.namespace, pod, "peft-source") / "adapters"
        assert adapters.is_dir() and not [path for path in adapters.iterdir() if path.name.startswith("squad")]
    assert ready_everywhere(stack, ["math", "pubmedqa"], 3)
    assert "squad" not in textwrap.dedent(stack.kubectl("get", "configmap", "tiny-llama-adapters", "-o",
                                                        "jsonpath={.data}"))


def test_deleting_the_base_model_collects_everything_it_owns(stack):
    stack.kubectl("delete", "bmd", "tiny-llama", "--timeout=60s")
    wait_for(lambda: not stack.pods("tiny-llama") and not stack.kubectl("get", "deployment,replicaset,service",
                                                                         "-o", "name"),
             60, "the garbage collector removed the Deployment, ReplicaSet, Service and pods", stack.log_tail)
    assert stack.kubelet is not None
    wait_for(lambda: not stack.kubelet.running_pods(stack.namespace), 30, "the pods' processes stopped")
