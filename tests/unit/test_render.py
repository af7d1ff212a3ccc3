"""Rendering a BaseModelDeployment into the objects it owns: pure, no API."""

import copy

import pytest

from loraplex.api.adapter_set import AdapterSet, DesiredAdapter
from loraplex.api.contract import SettingsError, SidecarSettings
from loraplex.api.types import BaseModelDeploymentSpec
from loraplex.operator import naming, render
from loraplex.operator.settings import OperatorSettings

SETTINGS = OperatorSettings(sidecar_image="loraplex/loraplex:test")


def owner(name="llama3", namespace="team-a"):
    return {"apiVersion": "loraplex.io/v1alpha1", "kind": "BaseModelDeployment",
            "metadata": {"name": name, "namespace": namespace, "uid": "uid-1", "generation": 1}}


def spec(**overrides):
    base = {"model": "meta/llama3-8b-instruct", "runtime": "vllm", "image": "vllm/vllm-openai:v0.11.0"}
    return BaseModelDeploymentSpec.model_validate({**base, **overrides})


def containers(deployment):
    return {c["name"]: c for c in deployment["spec"]["template"]["spec"]["containers"]}


def env_of(container):
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_vllm_container_carries_the_documented_lora_flags():
    deployment = render.render_deployment(owner(), spec(
        replicas=3, gpus={"count": 2}, lora={"maxGpuLoras": 4, "maxCpuLoras": 32, "maxRank": 32},
        runtimeArgs=["--max-model-len", "4096"]), SETTINGS)
    inference = containers(deployment)["inference"]
    args = inference["args"]
    assert args[0] == "meta/llama3-8b-instruct"
    assert "--enable-lora" in args
    pairs = dict(zip(args[1::2], args[2::2], strict=False))
    assert args[args.index("--max-loras") + 1] == "4"
    assert args[args.index("--max-cpu-loras") + 1] == "32"
    assert args[args.index("--max-lora-rank") + 1] == "32"
    assert args[args.index("--tensor-parallel-size") + 1] == "2"
    assert args[args.index("--port") + 1] == "8000"
    assert args[args.index("--served-model-name") + 1] == "meta/llama3-8b-instruct"
    assert args[-2:] == ["--max-model-len", "4096"]
    assert pairs  # flags come in pairs after the model
    assert env_of(inference)["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert inference["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert deployment["spec"]["replicas"] == 3


def test_vllm_rank_limit_rounds_up_to_a_value_vllm_accepts():
    inference = containers(render.render_deployment(owner(), spec(lora={"maxRank": 48}), SETTINGS))["inference"]
    assert inference["args"][inference["args"].index("--max-lora-rank") + 1] == "64"


@pytest.mark.parametrize(("overrides", "flag"), [
    ({"image": "vllm/vllm-openai:v0.12.0", "lora": {"maxRank": 1}}, "1"),
    ({"image": "vllm/vllm-openai:latest", "lora": {"maxRank": 1}}, "1"),  # unknown: the newest vLLM known
    ({"image": "vllm/vllm-openai:latest", "runtimeVersion": "0.11.1", "lora": {"maxRank": 1}}, "1"),
    ({"image": "vllm/vllm-openai:v0.11.0", "lora": {"maxRank": 2}}, "8"),
    ({"image": "vllm/vllm-openai:v0.11.0", "lora": {"maxRank": 320}}, "320"),
])
def test_vllm_rank_flag_is_one_the_vllm_version_accepts(overrides, flag):
    inference = containers(render.render_deployment(owner(), spec(**overrides), SETTINGS))["inference"]
    assert inference["args"][inference["args"].index("--max-lora-rank") + 1] == flag


@pytest.mark.parametrize("overrides", [
    {"image": "vllm/vllm-openai:v0.11.0"},
    {"image": "vllm/vllm-openai:latest", "runtimeVersion": "0.11.0"},
    {"image": "vllm/vllm-openai:v0.12.0", "runtimeVersion": "0.11.0"},  # the spec says what the tag does not
])
def test_max_rank_1_is_refused_on_a_vllm_without_max_lora_rank_1(overrides):
    with pytest.raises(render.RenderError) as excinfo:
        render.render_deployment(owner(), spec(**overrides, lora={"maxRank": 1}), SETTINGS)
    assert str(excinfo.value) == ("lora.maxRank 1 needs --max-lora-rank 1, which vLLM 0.11.0 does not accept "
                                  "(0.11.1 and later do); raise lora.maxRank to 8 or run a newer vLLM")


@pytest.mark.parametrize(("overrides", "version"), [
    ({"image": "vllm/vllm-openai:v0.11.0"}, "0.11.0"),
    ({"image": "vllm/vllm-openai:v0.32.0-cpu"}, "0.32.0"),
    ({"image": "vllm/vllm-openai:latest", "runtimeVersion": "0.12.0"}, "0.12.0"),
    ({"image": "vllm/vllm-openai:v0.11.0", "runtimeVersion": "v0.31"}, "0.31.0"),
    ({"image": "vllm/vllm-openai:latest"}, None),
    ({"image": "vllm/vllm-openai@sha256:" + "0" * 64}, None),
    ({"runtime": "nim", "image": "nvcr.io/nim/meta/llama3-8b-instruct:1.0.3"}, "1.0.3"),
    ({"runtime": "nim", "image": "nvcr.io/nim/meta/llama-3.1-8b-instruct:2.0.5"}, "2.0.5"),
    ({"runtime": "nim", "image": "nvcr.io/nim/meta/llama3-8b-instruct:latest", "runtimeVersion": "2.0.5"}, "2.0.5"),
    ({"runtime": "nim", "image": "nvcr.io/nim/meta/llama3-8b-instruct:latest"}, None),
])
def test_sidecar_learns_the_runtime_version(overrides, version):
    sidecar = containers(render.render_deployment(owner(), spec(**overrides), SETTINGS))["loraplex-sidecar"]
    assert env_of(sidecar).get("LORAPLEX_RUNTIME_VERSION") == version
    settings = SidecarSettings.from_env({e["name"]: e.get("value") or "from-the-pod" for e in sidecar["env"]})
    assert settings.runtime_version == (tuple(map(int, version.split("."))) if version else None)


def test_sidecar_refuses_a_runtime_version_it_cannot_read():
    sidecar = containers(render.render_deployment(owner(), spec(), SETTINGS))["loraplex-sidecar"]
    env = {e["name"]: e.get("value") or "from-the-pod" for e in sidecar["env"]}
    with pytest.raises(SettingsError, match=r"LORAPLEX_RUNTIME_VERSION='latest' is not a version such as 0\.11\.0"):
        SidecarSettings.from_env({**env, "LORAPLEX_RUNTIME_VERSION": "latest"})


def test_model_source_is_what_vllm_loads_and_model_is_what_it_serves():
    inference = containers(render.render_deployment(
        owner(), spec(modelSource="/models/llama3"), SETTINGS))["inference"]
    assert inference["args"][0] == "/models/llama3"


def test_nim_container_carries_the_documented_peft_env():
    deployment = render.render_deployment(owner(), spec(
        runtime="nim", image="nvcr.io/nim/meta/llama3-8b-instruct:1.0.0", envFromSecrets=["ngc-api"],
        lora={"maxGpuLoras": 8, "maxCpuLoras": 16, "maxRank": 32, "refreshIntervalSeconds": 5},
        peftSource={"mountPath": "/loras"}, shmSize="8Gi"), SETTINGS)
    inference = containers(deployment)["inference"]
    env = env_of(inference)
    assert env["NIM_PEFT_SOURCE"] == "/loras"
    assert env["NIM_PEFT_REFRESH_INTERVAL"] == "5"
    assert env["NIM_MAX_GPU_LORAS"] == "8"
    assert env["NIM_MAX_CPU_LORAS"] == "16"
    assert env["NIM_MAX_LORA_RANK"] == "32"
    assert env["NIM_CACHE_PATH"] == "/opt/nim/.cache"
    assert inference["envFrom"] == [{"secretRef": {"name": "ngc-api"}}]
    mounts = {m["name"]: m["mountPath"] for m in inference["volumeMounts"]}
    assert mounts == {"peft-source": "/loras", "model-cache": "/opt/nim/.cache", "dshm": "/dev/shm"}
    sidecar_env = env_of(containers(deployment)["loraplex-sidecar"])
    assert sidecar_env["LORAPLEX_VOLUME_LIMIT"] == "20Gi"  # stays under the emptyDir limit, never evicted
    assert sidecar_env["LORAPLEX_NIM_REFRESH_SECONDS"] == "5"
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    assert inference["readinessProbe"]["httpGet"]["path"] == "/v1/health/ready"
    assert "command" not in inference  # NIM's own entrypoint


def test_sidecar_shares_the_peft_volume_and_learns_its_adapter_set():
    deployment = render.render_deployment(owner(), spec(
        peftSource={"mountPath": "/peft", "persistentVolumeClaim": {"claimName": "peft-store"}},
        storage={"credentialsSecret": "s3-creds", "s3": {"endpoint": "http://minio:9000", "forcePathStyle": True},
                 "adapterStore": {"claimName": "adapters"}}), SETTINGS)
    sidecar = containers(deployment)["loraplex-sidecar"]
    env = env_of(sidecar)
    assert sidecar["image"] == "loraplex/loraplex:test"
    assert sidecar["command"] == ["loraplex", "sidecar"]
    assert env["LORAPLEX_ADAPTER_SET"] == "llama3-adapters"
    assert env["LORAPLEX_PEFT_DIR"] == "/peft"
    assert env["LORAPLEX_RUNTIME_URL"] == "http://127.0.0.1:8000"
    assert env["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["AWS_ENDPOINT_URL_S3"] == "http://minio:9000"
    assert env["LORAPLEX_S3_FORCE_PATH_STYLE"] == "true"
    assert sidecar["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    assert sidecar["securityContext"]["readOnlyRootFilesystem"] is True
    assert sidecar["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    mounts = {m["name"]: m for m in sidecar["volumeMounts"]}
    assert mounts["peft-source"]["mountPath"] == "/var/lib/loraplex"  # the whole volume, staging included
    assert env["LORAPLEX_VOLUME_DIR"] == "/var/lib/loraplex"
    assert "LORAPLEX_VOLUME_LIMIT" not in env  # a PVC has no emptyDir sizeLimit to stay under
    inference_mounts = {m["name"]: m for m in containers(deployment)["inference"]["volumeMounts"]}
    assert inference_mounts["peft-source"] == {"name": "peft-source", "mountPath": "/peft", "subPath": "adapters",
                                               "readOnly": True}  # the runtime never sees staging
    assert mounts["adapter-store"]["readOnly"] is True
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["peft-source"] == {"name": "peft-source", "persistentVolumeClaim": {"claimName": "peft-store"}}
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "llama3-loraplex"


def test_scheduling_settings_reach_the_pod():
    pod = render.render_deployment(owner(), spec(
        nodeSelector={"gpu": "h100"}, tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists"}],
        affinity={"nodeAffinity": {}}, imagePullSecrets=["ngc"], gpus={"count": 1, "resourceName": "amd.com/gpu"}),
        SETTINGS)["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"gpu": "h100"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists"}]
    assert pod["affinity"] == {"nodeAffinity": {}}
    assert pod["imagePullSecrets"] == [{"name": "ngc"}]
    assert containers({"spec": {"template": {"spec": pod}}})["inference"]["resources"]["limits"] == {"amd.com/gpu": "1"}


def test_every_owned_object_is_owned_and_labelled():
    for obj in render.render_children(owner(), spec(), SETTINGS):
        meta = obj["metadata"]
        assert meta["namespace"] == "team-a"
        assert meta["ownerReferences"] == [{
            "apiVersion": "loraplex.io/v1alpha1", "kind": "BaseModelDeployment", "name": "llama3",
            "uid": "uid-1", "controller": True, "blockOwnerDeletion": True}]
        assert meta["labels"]["loraplex.io/base-model"] == "llama3"
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "loraplex"


def test_sidecar_role_is_least_privilege():
    role = render.render_sidecar_role(owner())
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["llama3-adapters"],
         "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["loraplex.io"], "resources": ["lorareplicas"], "verbs": ["get", "list", "watch", "create"]},
        {"apiGroups": ["loraplex.io"], "resources": ["lorareplicas/status"], "verbs": ["get", "patch"]},
    ]  # nothing on LoraAdapters: the operator writes their status from the LoraReplicas
    binding = render.render_sidecar_role_binding(owner())
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "llama3-loraplex", "namespace": "team-a"}]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]


def test_service_selects_the_pods_and_exposes_the_openai_port():
    service = render.render_service(owner(), spec(port=8080))
    deployment = render.render_deployment(owner(), spec(port=8080), SETTINGS)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert all(labels[k] == v for k, v in service["spec"]["selector"].items())
    assert service["spec"]["ports"][0] == {"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}
    assert naming.endpoint("llama3", "team-a", 8080) == "http://llama3.team-a.svc.cluster.local:8080/v1"


def test_adapters_never_touch_the_pod_template():
    adapters = [DesiredAdapter(name="math", uid="u", generation=1, served_name="math", source="s3://b/math")]
    before = render.render_deployment(owner(), spec(), SETTINGS)
    adapter_set = render.render_adapter_set(owner(), spec(), adapters)
    after = render.render_deployment(owner(), spec(), SETTINGS)
    assert before == after
    parsed = AdapterSet.from_configmap_data(adapter_set["data"])
    assert [a.served_name for a in parsed.adapters] == ["math"]
    assert parsed.limits.max_rank == 64
    # vLLM loads hf; loraplex converts the others to hf for it.
    assert [f.value for f in parsed.limits.allowed_formats] == ["hf", "nemo", "nxd", "trtllm"]


def test_adapter_set_is_deterministic():
    a = DesiredAdapter(name="a", uid="1", generation=1, served_name="zeta", source="s3://b/a")
    b = DesiredAdapter(name="b", uid="2", generation=3, served_name="alpha", source="s3://b/b")
    first = render.render_adapter_set(owner(), spec(), [a, b])
    second = render.render_adapter_set(owner(), spec(), [b, a])
    assert first == second


def test_adapter_set_keeps_the_first_adapters_that_fit():
    adapters = [DesiredAdapter(name=f"a{i}", uid=f"uid-{i}", generation=1, served_name=f"z{9 - i}",
                               source=f"s3://b/a{i}") for i in range(10)]
    whole = len(render.render_adapter_set(owner(), spec(), adapters)["data"]["adapters.json"])
    assert render.fit_adapter_set(owner(), spec(), adapters, whole) == (adapters, [])
    kept, left_out = render.fit_adapter_set(owner(), spec(), adapters, whole - 1)
    assert kept == adapters[:9] and left_out == adapters[9:]
    for limit in (300, 500, 1000):
        kept, left_out = render.fit_adapter_set(owner(), spec(), adapters, limit)
        assert kept + left_out == adapters
        assert len(render.render_adapter_set(owner(), spec(), kept)["data"]["adapters.json"]) <= limit
        one_more = render.render_adapter_set(owner(), spec(), adapters[:len(kept) + 1])
        assert len(one_more["data"]["adapters.json"]) > limit  # the prefix is the longest that fits


def test_spec_changes_change_the_pod_template():
    before = render.render_deployment(owner(), spec(), SETTINGS)["spec"]["template"]
    after = render.render_deployment(owner(), spec(lora={"maxGpuLoras": 16, "maxCpuLoras": 16}),
                                     SETTINGS)["spec"]["template"]
    assert before != after
    scaled = render.render_deployment(owner(), spec(replicas=5), SETTINGS)
    assert scaled["spec"]["template"] == before  # scaling alone does not roll pods


@pytest.mark.parametrize(("overrides", "complaint"), [
    ({"lora": {"maxRank": 1024}}, "exceeds vLLM's largest --max-lora-rank 512"),
    ({"lora": {"maxGpuLoras": 8, "maxCpuLoras": 4}}, "maxCpuLoras 4 is below lora.maxGpuLoras 8"),
    ({"peftSource": {"emptyDir": {}, "persistentVolumeClaim": {"claimName": "x"}}},
     "peftSource sets both emptyDir and persistentVolumeClaim"),
])
def test_unrunnable_specs_are_refused_with_a_reason(overrides, complaint):
    with pytest.raises(render.RenderError, match=complaint):
        render.render_deployment(owner(), spec(**overrides), SETTINGS)


def test_rendering_does_not_mutate_its_inputs():
    body = owner()
    snapshot = copy.deepcopy(body)
    the_spec = spec(env=[{"name": "A", "value": "1"}])
    dumped = the_spec.model_dump()
    render.render_children(body, the_spec, SETTINGS)
    assert body == snapshot and the_spec.model_dump() == dumped


def test_base_model_config_reaches_the_sidecar_for_shape_checks():
    deployment = render.render_deployment(owner(), spec(lora={"baseModelConfigMap": "llama3-config"}), SETTINGS)
    sidecar = containers(deployment)["loraplex-sidecar"]
    assert env_of(sidecar)["LORAPLEX_BASE_CONFIG"] == "/etc/loraplex/base-model/config.json"
    assert {"name": "base-model-config", "mountPath": "/etc/loraplex/base-model", "readOnly": True} \
        in sidecar["volumeMounts"]
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["base-model-config"]["configMap"]["name"] == "llama3-config"
