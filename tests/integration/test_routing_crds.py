"""The Gateway API Inference Extension's own CRDs (vendored unmodified, see the fixture's SOURCE.md) on the
real control plane: they install and become Established, the apiserver accepts minimal routing objects in a
server-side dry run and refuses broken ones with the rule they break. Rendered routing objects will be checked
against exactly these schemas. The CRDs stay installed for the rest of the session (applying is idempotent)."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, tool

pytestmark = pytest.mark.integration
UPSTREAM_CRDS = ROOT / "tests" / "fixtures" / "gateway-api-inference-extension"
POOL_CRD = "inferencepools.inference.networking.k8s.io"
OBJECTIVE_CRD = "inferenceobjectives.inference.networking.x-k8s.io"
REWRITE_CRD = "inferencemodelrewrites.inference.networking.x-k8s.io"

Kubectl = Callable[..., subprocess.CompletedProcess[str]]


def kubectl_with(kubeconfig: Path, cache_dir: Path) -> Kubectl:
    binary, env = tool("kubectl"), {**os.environ, "KUBECONFIG": str(kubeconfig), "KUBECACHEDIR": str(cache_dir)}

    def run(*args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([binary, *args], env=env, input=stdin, capture_output=True, text=True, timeout=90)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr}")
        return result

    return run


@pytest.fixture(scope="module")
def routing_crds(control_plane, tmp_path_factory) -> list[str]:
    admin = kubectl_with(control_plane.kubeconfig, tmp_path_factory.mktemp("kube-cache"))
    admin("apply", "-f", str(UPSTREAM_CRDS))
    names = [POOL_CRD, OBJECTIVE_CRD, REWRITE_CRD]
    admin("wait", "--for=condition=Established", "--timeout=60s", *(f"crd/{name}" for name in names))
    return names


@pytest.fixture
def kubectl(routing_crds, kubeconfig: Path, tmp_path: Path) -> Kubectl:
    """kubectl in the test's namespace, with a discovery cache of its own made after the CRDs were installed."""
    return kubectl_with(kubeconfig, tmp_path / "kube-cache")


def dry_run(kubectl: Kubectl, manifest: str) -> subprocess.CompletedProcess[str]:
    return kubectl("apply", "--dry-run=server", "-o", "json", "-f", "-", stdin=textwrap.dedent(manifest),
                   check=False)


POOL = """
    apiVersion: inference.networking.k8s.io/v1
    kind: InferencePool
    metadata: {name: llama3-8b}
    spec:
      selector: {matchLabels: {loraplex.io/base-model: llama3-8b}}
      targetPorts: [{number: 8000}]
      endpointPickerRef: {name: llama3-8b-epp, port: {number: 9002}}
"""
OBJECTIVE = """
    apiVersion: inference.networking.x-k8s.io/v1alpha2
    kind: InferenceObjective
    metadata: {name: llama3-8b-math}
    spec: {poolRef: {name: llama3-8b}, priority: 10}
"""
REWRITE = """
    apiVersion: inference.networking.x-k8s.io/v1alpha2
    kind: InferenceModelRewrite
    metadata: {name: llama3-8b-math}
    spec:
      poolRef: {name: llama3-8b}
      rules:
      - matches: [{model: {value: math}}]
        targets: [{modelRewrite: llama3-8b-math-v1, weight: 90}, {modelRewrite: llama3-8b-math-v2, weight: 10}]
"""


def test_upstream_crds_are_established_with_the_versions_loraplex_renders(routing_crds, control_plane, tmp_path):
    admin = kubectl_with(control_plane.kubeconfig, tmp_path / "kube-cache")
    served = {}
    for name in routing_crds:
        crd = json.loads(admin("get", "crd", name, "-o", "json").stdout)
        conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
        assert conditions["Established"] == "True" and conditions["NamesAccepted"] == "True", (name, conditions)
        served[name] = [v["name"] for v in crd["spec"]["versions"] if v["served"]]
    assert served == {POOL_CRD: ["v1"], OBJECTIVE_CRD: ["v1alpha2"], REWRITE_CRD: ["v1alpha2"]}


@pytest.mark.parametrize("manifest", [POOL, OBJECTIVE, REWRITE], ids=["pool", "objective", "rewrite"])
def test_minimal_routing_objects_pass_a_server_side_dry_run(kubectl, manifest):
    result = dry_run(kubectl, manifest)
    assert result.returncode == 0, result.stderr
    accepted = json.loads(result.stdout)
    kind, name = accepted["kind"], accepted["metadata"]["name"]
    # The apiserver filled the schema's defaults, so the object went through the upstream schema...
    if kind == "InferencePool":
        assert accepted["spec"]["endpointPickerRef"]["kind"] == "Service"
        assert accepted["spec"]["endpointPickerRef"]["failureMode"] == "FailClose"
        assert accepted["spec"]["appProtocol"] == "http"
    else:
        assert accepted["spec"]["poolRef"] == {"group": "inference.networking.k8s.io", "kind": "InferencePool",
                                               "name": "llama3-8b"}
    # ...and a dry run stores nothing.
    missing = kubectl("get", kind, name, check=False)
    assert missing.returncode != 0 and "NotFound" in missing.stderr


def broken(manifest: str, path: str, value) -> str:
    """`manifest` with the dotted `path` set to `value` (None removes it)."""
    document = yaml.safe_load(textwrap.dedent(manifest))
    *parents, last = path.split(".")
    node = document
    for key in parents:
        node = node[int(key)] if key.isdigit() else node[key]
    if value is None:
        del node[last]
    else:
        node[last] = value
    return yaml.safe_dump(document)


@pytest.mark.parametrize(("manifest", "rule"), [
    (broken(POOL, "spec.targetPorts", [{"number": 8000}, {"number": 8000}]), "port number must be unique"),
    (broken(POOL, "spec.endpointPickerRef", {"name": "llama3-8b-epp"}),
     "port is required when kind is 'Service' or unspecified"),
    (broken(POOL, "spec.endpointPickerRef", None), "spec.endpointPickerRef: Required value"),
    (broken(POOL, "spec.selector", {"matchLabels": {}}), "spec.selector.matchLabels: Invalid value"),
    (broken(OBJECTIVE, "spec.poolRef", None), "spec.poolRef: Required value"),
    (broken(REWRITE, "spec.rules.0.targets.0.weight", 0), "should be greater than or equal to 1"),
    (broken(REWRITE, "spec.rules.0.matches.0.model.type", "Prefix"), 'Unsupported value: "Prefix"'),
], ids=["pool-duplicate-ports", "pool-picker-without-port", "pool-without-picker", "pool-empty-selector",
        "objective-without-pool", "rewrite-zero-weight", "rewrite-prefix-match"])
def test_broken_routing_objects_are_refused_with_the_rule_they_break(kubectl, manifest, rule):
    result = dry_run(kubectl, manifest)
    assert result.returncode != 0, f"the apiserver accepted:\n{manifest}"
    assert rule in result.stderr, result.stderr


def test_what_the_operator_renders_for_routing_passes_a_server_side_dry_run(kubectl, namespace):
    """The InferencePool against the upstream CRD's schema and rules; the picker's Deployment, Service, config
    and RBAC against the apiserver's own validation."""
    from loraplex.api.types import BaseModelDeploymentSpec
    from loraplex.operator.routing import render_routing

    owner = {"apiVersion": "loraplex.io/v1alpha1", "kind": "BaseModelDeployment",
             "metadata": {"name": "llama3-8b", "namespace": namespace, "uid": "5f0b6a55-0000-4000-8000-000000000001"}}
    spec = BaseModelDeploymentSpec.model_validate({"model": "m", "runtime": "vllm", "image": "i", "routing": {}})
    objects = render_routing(owner, spec)
    for obj in objects:
        obj["metadata"].pop("ownerReferences")  # the owner does not exist in a dry run
    result = dry_run(kubectl, yaml.safe_dump_all(objects))
    assert result.returncode == 0, result.stderr
    kinds = [item["kind"] for item in json.loads(result.stdout)["items"]]
    assert sorted(kinds) == sorted(obj["kind"] for obj in objects)
