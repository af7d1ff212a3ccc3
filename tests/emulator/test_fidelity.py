"""The emulator behaves like a kube-apiserver where loraplex's correctness depends on it.

These tests use the official `kubernetes` client, not loraplex's own, so both sides are checked.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import kubernetes
import pytest
from kubernetes.client.rest import ApiException

from tests.kube_emulator import EmulatorThread

GROUP, VERSION = "loraplex.io", "v1alpha1"


def adapter(name="math", **spec):
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "LoraAdapter", "metadata": {"name": name},
            "spec": {"baseModel": "llama3", "source": "s3://bucket/math", **spec}}


@pytest.fixture
def custom(api_client, crds_installed):
    return kubernetes.client.CustomObjectsApi(api_client)


@pytest.fixture
def core(api_client):
    return kubernetes.client.CoreV1Api(api_client)


def create(custom, body, namespace="default"):
    return custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "loraadapters", body)


def get(custom, name, namespace="default"):
    return custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "loraadapters", name)


def test_create_sets_server_fields_and_defaults(custom):
    obj = create(custom, adapter(unknownField="dropped"))
    meta = obj["metadata"]
    assert meta["uid"] and meta["resourceVersion"] and meta["creationTimestamp"]
    assert meta["generation"] == 1
    assert obj["spec"]["format"] == "auto"  # CRD default applied
    assert "unknownField" not in obj["spec"]  # pruned, as the API server does
    with pytest.raises(ApiException) as excinfo:
        create(custom, adapter())
    assert excinfo.value.status == 409 and json.loads(excinfo.value.body)["reason"] == "AlreadyExists"


def test_schema_violations_are_rejected_with_the_field_named(custom):
    with pytest.raises(ApiException) as excinfo:
        create(custom, adapter(source="ftp://nope", expectedRank=0))
    body = json.loads(excinfo.value.body)
    assert excinfo.value.status == 422 and body["reason"] == "Invalid"
    assert "spec.source" in body["message"] and "spec.expectedRank" in body["message"]
    with pytest.raises(ApiException) as excinfo:
        create(custom, {**adapter(), "spec": {"source": "s3://bucket/x"}})
    assert "spec.baseModel: Required value" in json.loads(excinfo.value.body)["message"]


def test_stale_update_conflicts_and_fresh_update_wins(custom):
    first = create(custom, adapter())
    fresh = get(custom, "math")
    fresh["spec"]["expectedRank"] = 8
    updated = custom.replace_namespaced_custom_object(GROUP, VERSION, "default", "loraadapters", "math", fresh)
    assert int(updated["metadata"]["resourceVersion"]) > int(first["metadata"]["resourceVersion"])
    assert updated["metadata"]["generation"] == 2
    first["spec"]["expectedRank"] = 16
    with pytest.raises(ApiException) as excinfo:
        custom.replace_namespaced_custom_object(GROUP, VERSION, "default", "loraadapters", "math", first)
    assert excinfo.value.status == 409 and json.loads(excinfo.value.body)["reason"] == "Conflict"
    del fresh["metadata"]["resourceVersion"]
    with pytest.raises(ApiException) as excinfo:
        custom.replace_namespaced_custom_object(GROUP, VERSION, "default", "loraadapters", "math", fresh)
    assert excinfo.value.status == 422  # custom resources need a resourceVersion to update


def test_merge_patch_deletes_keys_with_null_and_checks_named_versions(custom):
    created = create(custom, adapter(expectedRank=8, sha256="a" * 64))
    patched = custom.patch_namespaced_custom_object(GROUP, VERSION, "default", "loraadapters", "math",
                                                    {"spec": {"sha256": None, "expectedRank": 16}})
    assert "sha256" not in patched["spec"] and patched["spec"]["expectedRank"] == 16
    stale = {"metadata": {"resourceVersion": created["metadata"]["resourceVersion"]}, "spec": {"expectedRank": 32}}
    with pytest.raises(ApiException) as excinfo:
        custom.patch_namespaced_custom_object(GROUP, VERSION, "default", "loraadapters", "math", stale)
    assert excinfo.value.status == 409


def test_noop_write_keeps_the_resource_version(custom):
    created = create(custom, adapter())
    again = custom.patch_namespaced_custom_object(GROUP, VERSION, "default", "loraadapters", "math",
                                                  {"spec": {"baseModel": "llama3"}})
    assert again["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]


def _json_patch(emulator: EmulatorThread, path: str, operations: list[dict]) -> tuple[int, dict]:
    request = urllib.request.Request(f"{emulator.url}{path}", data=json.dumps(operations).encode(), method="PATCH",
                                     headers={"Content-Type": "application/json-patch+json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_json_patch_applies_in_order_and_test_failures_reject(emulator, custom):
    create(custom, adapter())
    path = f"/apis/{GROUP}/{VERSION}/namespaces/default/loraadapters/math"
    code, patched = _json_patch(emulator, path, [
        {"op": "add", "path": "/metadata/labels", "value": {"team": "a"}},
        {"op": "replace", "path": "/spec/source", "value": "s3://bucket/v2"},
        {"op": "test", "path": "/spec/source", "value": "s3://bucket/v2"},
    ])
    assert code == 200
    assert patched["metadata"]["labels"] == {"team": "a"} and patched["spec"]["source"] == "s3://bucket/v2"
    code, status = _json_patch(emulator, path, [{"op": "test", "path": "/spec/source", "value": "other"},
                                                {"op": "remove", "path": "/metadata/labels"}])
    assert code == 422 and "test operation failed" in status["message"]
    assert get(custom, "math")["metadata"]["labels"] == {"team": "a"}


def test_status_subresource_is_separate_from_the_main_resource(custom):
    create(custom, {**adapter(), "status": {"phase": "Ready"}})
    assert "status" not in get(custom, "math")  # status cannot be set on create
    custom.patch_namespaced_custom_object(GROUP, VERSION, "default", "loraadapters", "math",
                                          {"status": {"phase": "Ready"}})
    assert "status" not in get(custom, "math")  # nor through the main resource
    after = custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, "default", "loraadapters", "math",
        {"status": {"phase": "Loading", "replicaStatus": {"pod-a": {"state": "Loaded"}}}, "spec": {"source": "x"}})
    assert after["status"]["phase"] == "Loading"
    assert after["spec"]["source"] == "s3://bucket/math"  # spec ignored on /status
    assert after["metadata"]["generation"] == 1  # status writes never bump generation
    two = custom.patch_namespaced_custom_object_status(GROUP, VERSION, "default", "loraadapters", "math", {
        "status": {"replicaStatus": {"pod-b": {"state": "Pending"}}}})
    assert set(two["status"]["replicaStatus"]) == {"pod-a", "pod-b"}  # replicas never clobber each other
    with pytest.raises(ApiException) as excinfo:
        custom.patch_namespaced_custom_object_status(GROUP, VERSION, "default", "loraadapters", "math",
                                                     {"status": {"phase": "Bogus"}})
    assert excinfo.value.status == 422  # status is validated against the schema too


def test_finalizers_hold_deletion_until_released(custom):
    create(custom, {**adapter(), "metadata": {"name": "math", "finalizers": ["loraplex.io/adapter-cleanup"]}})
    custom.delete_namespaced_custom_object(GROUP, VERSION, "default", "loraadapters", "math")
    held = get(custom, "math")
    assert held["metadata"]["deletionTimestamp"]
    with pytest.raises(ApiException) as excinfo:
        custom.patch_namespaced_custom_object(GROUP, VERSION, "default", "loraadapters", "math",
                                              {"metadata": {"finalizers": ["loraplex.io/adapter-cleanup", "x/y"]}})
    assert excinfo.value.status == 422 and "no new finalizers" in json.loads(excinfo.value.body)["message"]
    custom.patch_namespaced_custom_object(GROUP, VERSION, "default", "loraadapters", "math",
                                          {"metadata": {"finalizers": None}})
    with pytest.raises(ApiException) as excinfo:
        get(custom, "math")
    assert excinfo.value.status == 404


def test_owner_references_cascade_and_orphan(custom, core):
    owner = create(custom, adapter("owner"))
    ref = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "LoraAdapter", "name": "owner",
           "uid": owner["metadata"]["uid"], "controller": True}
    core.create_namespaced_config_map("default", {"metadata": {"name": "child", "ownerReferences": [ref]}})
    custom.delete_namespaced_custom_object(GROUP, VERSION, "default", "loraadapters", "owner")
    with pytest.raises(ApiException):
        core.read_namespaced_config_map("child", "default")

    owner = create(custom, adapter("owner2"))
    ref = {**ref, "name": "owner2", "uid": owner["metadata"]["uid"]}
    core.create_namespaced_config_map("default", {"metadata": {"name": "kept", "ownerReferences": [ref]}})
    custom.delete_namespaced_custom_object(GROUP, VERSION, "default", "loraadapters", "owner2",
                                           propagation_policy="Orphan")
    assert not core.read_namespaced_config_map("kept", "default").metadata.owner_references

    late = core.create_namespaced_config_map("default", {"metadata": {"name": "late", "ownerReferences": [ref]}})
    assert late.metadata.name == "late"  # created for an owner that is gone: accepted, then collected
    with pytest.raises(ApiException) as excinfo:
        core.read_namespaced_config_map("late", "default")
    assert excinfo.value.status == 404


def test_configmaps_over_one_mebibyte_are_refused(core):
    core.create_namespaced_config_map("default", {"metadata": {"name": "full"}, "data": {"k": "x" * (1 << 20)}})
    with pytest.raises(ApiException) as excinfo:
        core.create_namespaced_config_map("default", {"metadata": {"name": "over"},
                                                      "data": {"k": "x" * (1 << 20), "j": "y"}})
    assert excinfo.value.status == 422 and "must have at most 1048576 bytes" in excinfo.value.body
    with pytest.raises(ApiException):
        core.patch_namespaced_config_map("full", "default", {"data": {"j": "y"}})


def test_label_and_field_selectors(core):
    for name, labels in [("a", {"tier": "gpu", "team": "x"}), ("b", {"tier": "cpu"}), ("c", {"tier": "gpu"})]:
        core.create_namespaced_config_map("default", {"metadata": {"name": name, "labels": labels}})

    def names(**kwargs):
        return sorted(i.metadata.name for i in core.list_namespaced_config_map("default", **kwargs).items)

    assert names(label_selector="tier=gpu") == ["a", "c"]
    assert names(label_selector="tier!=gpu") == ["b"]
    assert names(label_selector="tier in (gpu,cpu),!team") == ["b", "c"]
    assert names(label_selector="team") == ["a"]
    assert names(field_selector="metadata.name=b") == ["b"]
    with pytest.raises(ApiException) as excinfo:
        names(label_selector="tier in gpu")
    assert excinfo.value.status == 400


def test_namespaces_scope_objects(core):
    with pytest.raises(ApiException) as excinfo:
        core.create_namespaced_config_map("nowhere", {"metadata": {"name": "x"}})
    assert excinfo.value.status == 404 and "nowhere" in json.loads(excinfo.value.body)["message"]
    core.create_namespace({"metadata": {"name": "team-a"}})
    core.create_namespaced_config_map("team-a", {"metadata": {"name": "x"}})
    core.create_namespaced_config_map("default", {"metadata": {"name": "x"}})
    assert len(core.list_config_map_for_all_namespaces().items) == 2
    assert len(core.list_namespaced_config_map("team-a").items) == 1


def _watch(emulator: EmulatorThread, path: str, **params: str) -> list[dict]:
    query = "&".join(f"{k}={v}" for k, v in {"watch": "true", "timeoutSeconds": "1", **params}.items())
    with urllib.request.urlopen(f"{emulator.url}{path}?{query}", timeout=10) as response:
        return [json.loads(line) for line in response.read().splitlines() if line.strip()]


def test_watch_resumes_from_a_resource_version(emulator, core):
    core.create_namespaced_config_map("default", {"metadata": {"name": "before"}})
    listed = core.list_namespaced_config_map("default")
    since = listed.metadata.resource_version
    core.create_namespaced_config_map("default", {"metadata": {"name": "after", "labels": {"k": "v"}}})
    core.patch_namespaced_config_map("after", "default", {"data": {"x": "1"}})
    core.delete_namespaced_config_map("after", "default")
    events = _watch(emulator, "/api/v1/namespaces/default/configmaps", resourceVersion=since)
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("ADDED", "after"), ("MODIFIED", "after"), ("DELETED", "after")]
    versions = [int(e["object"]["metadata"]["resourceVersion"]) for e in events]
    assert versions == sorted(versions) and versions[0] > int(since)
    initial = _watch(emulator, "/api/v1/namespaces/default/configmaps")
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in initial] == [("ADDED", "before")]


def test_selector_watch_sees_objects_enter_and_leave(emulator, core):
    since = core.list_namespaced_config_map("default").metadata.resource_version
    core.create_namespaced_config_map("default", {"metadata": {"name": "m", "labels": {"sel": "no"}}})
    core.patch_namespaced_config_map("m", "default", {"metadata": {"labels": {"sel": "yes"}}})
    core.patch_namespaced_config_map("m", "default", {"metadata": {"labels": {"sel": "no"}}})
    events = _watch(emulator, "/api/v1/namespaces/default/configmaps", resourceVersion=since,
                    labelSelector="sel%3Dyes")
    assert [e["type"] for e in events] == ["ADDED", "DELETED"]


def test_too_old_resource_version_is_gone():
    emu = EmulatorThread(history_limit=3).start()
    try:
        configuration = kubernetes.client.Configuration()
        configuration.host = emu.url
        core = kubernetes.client.CoreV1Api(kubernetes.client.ApiClient(configuration))
        since = core.list_namespaced_config_map("default").metadata.resource_version
        for index in range(6):
            core.create_namespaced_config_map("default", {"metadata": {"name": f"c{index}"}})
        events = _watch(emu, "/api/v1/namespaces/default/configmaps", resourceVersion=since)
        assert events[0]["type"] == "ERROR" and events[0]["object"]["code"] == 410
    finally:
        emu.stop()


def test_deleting_a_crd_removes_its_api_and_objects(api_client, custom):
    create(custom, adapter())
    kubernetes.client.ApiextensionsV1Api(api_client).delete_custom_resource_definition("loraadapters.loraplex.io")
    with pytest.raises(ApiException) as excinfo:
        custom.list_namespaced_custom_object(GROUP, VERSION, "default", "loraadapters")
    assert excinfo.value.status == 404


def test_secret_string_data_is_stored_as_base64_data(core):
    core.create_namespaced_secret("default", {"metadata": {"name": "creds"}, "stringData": {"KEY": "value"},
                                              "data": {"OTHER": "b3RoZXI="}})
    secret = core.read_namespaced_secret("creds", "default")
    assert secret.data == {"KEY": "dmFsdWU=", "OTHER": "b3RoZXI="}
    assert secret.string_data is None
