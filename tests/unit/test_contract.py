"""The operator-sidecar contract: what render.py puts in the pod is what the sidecar reads back, and replica
status entries cannot carry a key the API server would silently drop."""

from pathlib import Path

import pydantic
import pytest

from loraplex.api.contract import (
    ADAPTERS_SUBPATH,
    SIDECAR_PORT,
    SettingsError,
    SidecarSettings,
    downward_api_env,
)
from loraplex.api.types import BaseModelDeploymentSpec, ReplicaAdapterStatus, ReplicaState, Runtime
from loraplex.operator import render
from loraplex.operator.adapters import ACCEPTED, AdapterView, adapter_status, cleanup_done, replica_reports
from loraplex.operator.settings import OperatorSettings
from loraplex.sidecar.store import VolumeStore

POD = {"POD_NAME": "llama3-0", "POD_NAMESPACE": "team-a", "POD_UID": "0b6c6c62-uid"}
FROM_THE_POD = len(downward_api_env())  # the first entries of the sidecar's environment
MINIMAL = {**POD, "LORAPLEX_BASE_MODEL": "llama3", "LORAPLEX_ADAPTER_SET": "llama3-adapters",
           "LORAPLEX_RUNTIME": "vllm", "LORAPLEX_RUNTIME_URL": "http://127.0.0.1:8000",
           "LORAPLEX_SERVED_MODEL": "meta/llama3", "LORAPLEX_VOLUME_DIR": "/var/lib/loraplex",
           "LORAPLEX_PEFT_DIR": "/loras"}


def rendered_env(spec: dict) -> list[dict]:
    owner = {"metadata": {"name": "llama3", "namespace": "team-a", "uid": "u"}}
    deployment = render.render_deployment(owner, BaseModelDeploymentSpec.model_validate(spec),
                                          OperatorSettings(sidecar_image="loraplex/loraplex:test"))
    sidecar = next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "loraplex-sidecar")
    return sidecar["env"]


@pytest.mark.parametrize("spec", [
    {"model": "meta/llama3", "runtime": "vllm", "image": "vllm/vllm-openai:v0.11.0"},
    {"model": "meta/llama3", "runtime": "nim", "image": "nvcr.io/nim/meta/llama3:1.0.3", "runtimeVersion": "1.0.3",
     "lora": {"refreshIntervalSeconds": 5, "baseModelConfigMap": "llama3-config"},
     "peftSource": {"mountPath": "/peft", "emptyDir": {"sizeLimit": "4Gi"}},
     "sidecar": {"maxConcurrentDownloads": 9, "logLevel": "debug"},
     "storage": {"s3": {"endpoint": "http://minio:9000", "region": "eu-west-1", "forcePathStyle": True},
                 "adapterStore": {"claimName": "store", "mountPath": "/store"}}},
])
def test_what_the_operator_renders_is_what_the_sidecar_reads(spec):
    env = rendered_env(spec)
    assert env[:FROM_THE_POD] == downward_api_env()
    settings = SidecarSettings.from_env({**POD, **{e["name"]: e["value"] for e in env[FROM_THE_POD:]}})
    assert settings.to_env() == env[FROM_THE_POD:]
    assert (settings.pod_name, settings.namespace) == ("llama3-0", "team-a")
    assert settings.http_port == SIDECAR_PORT
    assert settings.volume_dir == Path("/var/lib/loraplex")


def test_every_setting_survives_the_round_trip():
    settings = SidecarSettings(
        pod_name="p", namespace="n", pod_uid="u", base_model="llama3", adapter_set="a", runtime=Runtime.NIM,
        runtime_version=(1, 2, 3), runtime_url="http://127.0.0.1:9", served_model="m", peft_dir="/loras",
        volume_dir=Path("/v"), nim_refresh_seconds=2.5, max_concurrent_downloads=7, log_level="debug", http_port=9191,
        volume_limit="3Gi", s3_endpoint="http://s3", s3_region="r", s3_force_path_style=False,
        store_root=Path("/store"), base_config=Path("/etc/config.json"), log_format="json",
        runtime_poll_seconds=0.3, local_rescan_seconds=3600)
    env = {e["name"]: e["value"] for e in settings.to_env()}
    assert SidecarSettings.from_env({**env, "POD_NAME": "p", "POD_NAMESPACE": "n", "POD_UID": "u"}) == settings
    assert settings.volume_limit_bytes == 3 * 1024**3


def test_tuning_knobs_at_their_defaults_are_not_rendered():
    names = {e["name"] for e in SidecarSettings.from_env(MINIMAL).to_env()}
    assert not names & {"LORAPLEX_RUNTIME_POLL_SECONDS", "LORAPLEX_LOCAL_RESCAN_SECONDS", "POD_NAME", "POD_NAMESPACE",
                        "POD_UID"}


def test_missing_variables_are_all_named():
    env = {k: v for k, v in MINIMAL.items() if k not in ("POD_NAME", "LORAPLEX_SERVED_MODEL")}
    with pytest.raises(SettingsError) as raised:
        SidecarSettings.from_env({**env, "LORAPLEX_RUNTIME_URL": ""})  # empty counts as unset
    assert str(raised.value) == ("missing environment: POD_NAME, LORAPLEX_RUNTIME_URL, LORAPLEX_SERVED_MODEL "
                                 "(the operator sets them in the pod)")


@pytest.mark.parametrize(("name", "value", "expected"), [
    ("LORAPLEX_RUNTIME", "tgi", "vllm or nim"),
    ("LORAPLEX_RUNTIME_VERSION", "latest", "a version such as 0.11.0"),
    ("LORAPLEX_MAX_CONCURRENT_DOWNLOADS", "four", "a whole number"),
    ("LORAPLEX_HTTP_PORT", "90.5", "a whole number"),
    ("LORAPLEX_NIM_REFRESH_SECONDS", "soon", "a number of seconds"),
    ("LORAPLEX_VOLUME_LIMIT", "lots", "a quantity such as 20Gi"),
    ("LORAPLEX_S3_FORCE_PATH_STYLE", "yes", "true or false"),
])
def test_a_malformed_variable_is_named_with_its_value(name, value, expected):
    with pytest.raises(SettingsError) as raised:
        SidecarSettings.from_env({**MINIMAL, name: value})
    assert str(raised.value) == f"{name}={value!r} is not {expected}"


def test_the_runtime_sees_the_folder_the_sidecar_installs_into(tmp_path):
    env = rendered_env({"model": "m", "runtime": "vllm", "image": "vllm/vllm-openai:v0.11.0"})
    settings = SidecarSettings.from_env({**POD, **{e["name"]: e["value"] for e in env[FROM_THE_POD:]}})
    assert VolumeStore(tmp_path).adapters == tmp_path / ADAPTERS_SUBPATH
    owner = {"metadata": {"name": "llama3", "namespace": "team-a", "uid": "u"}}
    deployment = render.render_deployment(owner, BaseModelDeploymentSpec.model_validate(
        {"model": "m", "runtime": "vllm", "image": "vllm/vllm-openai:v0.11.0"}), OperatorSettings())
    inference = deployment["spec"]["template"]["spec"]["containers"][0]
    mount = next(m for m in inference["volumeMounts"] if m["name"] == render.PEFT_VOLUME)
    assert (mount["mountPath"], mount["subPath"]) == (settings.peft_dir, ADAPTERS_SUBPATH)


@pytest.mark.parametrize("entry", [
    {"state": "Loaded", "observedGeneration": 1, "sizebytes": 100},  # a typo the API server would prune
    {"state": "Loaded", "observed_generation": 1, "bytes": 5},
    {"state": "Exploded", "observedGeneration": 1},
])
def test_a_replica_entry_with_a_wrong_key_or_value_cannot_be_built(entry):
    with pytest.raises(pydantic.ValidationError):
        ReplicaAdapterStatus.model_validate(entry)


def test_replica_entries_go_on_the_wire_in_camel_case_without_empty_fields():
    entry = ReplicaAdapterStatus(state=ReplicaState.DOWNLOADING, observed_generation=2, bytes_done=10)
    assert entry.to_wire() == {"state": "Downloading", "observedGeneration": 2, "bytesDone": 10}


def adapter(deleting=False):
    body = {"metadata": {"name": "math", "namespace": "ns", "uid": "u", "generation": 1,
                         "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"baseModel": "llama3", "source": "s3://bucket/math"}}
    if deleting:
        body["metadata"]["deletionTimestamp"] = "2026-01-02T00:00:00Z"
    return AdapterView.from_body(body)


LOADED = {"state": "Loaded", "observedGeneration": 1, "format": "hf", "rank": 8, "sizeBytes": 10}
MALFORMED = [{"state": "Exploded", "observedGeneration": 1}, {"state": "Loaded", "observedGeneration": "one"},
             {"state": "Loaded", "observedGeneration": 1, "fromTheFuture": True}, "Loaded", None]


@pytest.mark.parametrize("bad", MALFORMED)
def test_the_operator_skips_a_malformed_replica_entry(bad):
    entries = {"pod-a": LOADED, "pod-b": bad, "pod-gone": bad}
    assert set(replica_reports(entries)) == {"pod-a"}
    update = adapter_status(adapter(), ACCEPTED, ["pod-a", "pod-b"], entries)
    assert (update.phase, update.status["readyReplicas"], update.status["rank"]) == ("Loading", 1, 8)
    assert list(update.status["replicaStatus"]) == ["pod-a"]  # only what parses, of live pods
    assert cleanup_done(["pod-b"], {"pod-b": bad})
    assert not cleanup_done(["pod-a", "pod-b"], {"pod-a": LOADED, "pod-b": bad})
