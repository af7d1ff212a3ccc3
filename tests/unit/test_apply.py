import asyncio
import json

import pytest

from loraplex.api.types import BaseModelDeploymentSpec
from loraplex.operator.apply import TakenByAnother, apply_object, in_sync, is_quantity, is_subset, other_controller
from loraplex.operator.render import render_deployment
from loraplex.operator.settings import OperatorSettings


def test_server_defaults_do_not_count_as_drift():
    desired = {"spec": {"ports": [{"name": "http", "port": 80}], "selector": {"a": "b"}}}
    live = {"spec": {"ports": [{"name": "http", "port": 80, "protocol": "TCP"}], "selector": {"a": "b"},
                     "clusterIP": "10.0.0.1"}}
    assert is_subset(desired, live)


def test_changed_or_removed_fields_are_drift():
    desired = {"spec": {"replicas": 2, "args": ["--a", "--b"]}}
    assert not is_subset(desired, {"spec": {"replicas": 3, "args": ["--a", "--b"]}})
    assert not is_subset(desired, {"spec": {"replicas": 2, "args": ["--a"]}})
    assert not is_subset(desired, {"spec": {"args": ["--a", "--b"]}})
    assert not is_subset(desired, {"spec": {"replicas": 2, "args": ["--a", "--b", "--c"]}})


@pytest.mark.parametrize(("rendered", "stored"), [
    ("1000m", "1"),
    ("1024Mi", "1Gi"),
    ("0.5", "500m"),
    ("1.5Gi", "1536Mi"),
    ("1e3", "1k"),
    ("1E3", "1k"),
    ("2000k", "2M"),
    ("1048576Ki", "1Gi"),
    ("0.001", "1m"),
    ("100u", "100000n"),
    ("1Ei", "1152921504606846976"),
    ("20Gi", "20Gi"),
])
def test_quantities_the_api_server_rewrote_are_not_drift(rendered, stored):
    desired = {"spec": {"template": {"spec": {
        "containers": [{"name": "c", "resources": {"requests": {"cpu": rendered}, "limits": {"memory": rendered}}}],
        "volumes": [{"name": "v", "emptyDir": {"sizeLimit": rendered}}],
    }}}}
    live = {"spec": {"template": {"spec": {
        "containers": [{"name": "c", "resources": {"requests": {"cpu": stored}, "limits": {"memory": stored}}}],
        "volumes": [{"name": "v", "emptyDir": {"sizeLimit": stored}}],
    }}}}
    assert is_subset(desired, live)


@pytest.mark.parametrize(("rendered", "stored"), [
    ("1", "1001m"),
    ("1Gi", "1G"),  # binary and decimal giga differ
    ("1Mi", "1m"),  # mebi, not milli
    ("500m", "0.05"),
])
def test_a_changed_quantity_is_drift(rendered, stored):
    desired = {"resources": {"limits": {"memory": rendered}}, "emptyDir": {"sizeLimit": rendered}}
    assert not is_subset(desired, {"resources": {"limits": {"memory": stored}}, "emptyDir": {"sizeLimit": rendered}})
    assert not is_subset(desired, {"resources": {"limits": {"memory": rendered}}, "emptyDir": {"sizeLimit": stored}})


def test_only_quantity_fields_compare_by_amount():
    # An environment variable or a label that looks like a quantity is text: "1000m" is not "1" there.
    assert not is_subset({"env": [{"name": "LIMIT", "value": "1000m"}]}, {"env": [{"name": "LIMIT", "value": "1"}]})
    assert not is_subset({"labels": {"size": "1Gi"}}, {"labels": {"size": "1024Mi"}})
    assert not is_subset({"resources": {"limits": {"cpu": "2"}}}, {"resources": {"limits": {"cpu": "two"}}})


@pytest.mark.parametrize(("path", "expected"), [
    (("spec", "template", "spec", "containers", "resources", "requests", "cpu"), True),
    (("spec", "template", "spec", "containers", "resources", "limits", "nvidia.com/gpu"), True),
    (("spec", "template", "spec", "volumes", "emptyDir", "sizeLimit"), True),
    (("spec", "template", "spec", "containers", "env", "value"), False),
    (("rules", "resources"), False),
    (("spec", "replicas"), False),
])
def test_which_rendered_fields_are_quantities(path, expected):
    assert is_quantity(path) is expected


def test_a_rendered_deployment_stays_in_sync_after_the_api_server_normalises_its_quantities():
    owner = {"apiVersion": "loraplex.io/v1alpha1", "kind": "BaseModelDeployment",
             "metadata": {"name": "llama3", "namespace": "ns", "uid": "uid-1", "generation": 1}}
    spec = BaseModelDeploymentSpec.model_validate({
        "model": "m", "runtime": "vllm", "image": "img", "gpus": {"count": 1}, "shmSize": "1024Mi",
        "resources": {"requests": {"cpu": "4000m", "memory": "0.5Gi"}},
        "peftSource": {"emptyDir": {"sizeLimit": "2048Mi"}},
        "sidecar": {"resources": {"requests": {"cpu": "0.1"}, "limits": {"memory": "1024Mi"}}}})
    desired = render_deployment(owner, spec, OperatorSettings(sidecar_image="loraplex/loraplex:test"))
    canonical = {"4000m": "4", "0.5Gi": "512Mi", "2048Mi": "2Gi", "1024Mi": "1Gi", "0.1": "100m"}
    live = json.loads(json.dumps(desired), object_hook=lambda obj: {
        key: canonical.get(value, value) if isinstance(value, str) and key not in ("name", "value") else value
        for key, value in obj.items()})
    assert live != desired  # the server did rewrite some
    assert in_sync(desired, live)


def owned_by(kind, name, uid):
    return {"metadata": {"name": "x", "ownerReferences": [
        {"apiVersion": "loraplex.io/v1alpha1", "kind": kind, "name": name, "uid": uid, "controller": True}]}}


def test_an_object_another_owner_controls_is_not_taken_over():
    desired = {"kind": "Service", **owned_by("BaseModelDeployment", "foo", "uid-foo")}
    # "foo-epp", the picker Service of model foo, is also the Service of a model named foo-epp.
    assert other_controller(desired, owned_by("BaseModelDeployment", "foo-epp", "uid-2"))["name"] == "foo-epp"
    # The same owner, or an earlier object of its kind and name (deleted and made again): converged as ours.
    assert other_controller(desired, owned_by("BaseModelDeployment", "foo", "uid-foo")) is None
    assert other_controller(desired, owned_by("BaseModelDeployment", "foo", "uid-old")) is None
    # Nobody controls it (made by hand, say): adopted.
    assert other_controller(desired, {"metadata": {"name": "x"}}) is None


def test_taking_over_refuses_with_a_sentence_naming_both():
    class Client:
        async def get_or_none(self, path):
            return {"apiVersion": "v1", "kind": "Service", **owned_by("BaseModelDeployment", "foo-epp", "uid-2")}

    desired = {"apiVersion": "v1", "kind": "Service",
               "metadata": {**owned_by("BaseModelDeployment", "foo", "uid-foo")["metadata"], "name": "foo-epp",
                            "namespace": "ns"}}
    with pytest.raises(TakenByAnother, match="Service foo-epp exists and is controlled by BaseModelDeployment "
                                             "foo-epp; loraplex does not take it over"):
        asyncio.run(apply_object(Client(), desired))
