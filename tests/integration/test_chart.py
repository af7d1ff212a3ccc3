"""The Helm chart, the image recipe and the examples, checked with the real helm, kubectl and hadolint, and
against a real API server: everything the chart renders must be accepted by server-side dry run."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import kubernetes
import pytest
import yaml

from loraplex.api.crds import crd_files
from loraplex.cli import build_parser
from tests.conftest import ROOT, admin_client, tool

pytestmark = pytest.mark.integration
CHART = ROOT / "charts" / "loraplex"
RELEASE_NAMESPACE = "loraplex-system"
THIRD_PARTY_KINDS = {"ServiceMonitor"}  # its CRD (Prometheus Operator) is not in the test cluster
DryRun = Callable[[list[dict]], list[str]]


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([tool("helm"), *args], capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed: {result.stderr}")
    return result


def render(*args: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(helm("template", "loraplex", str(CHART), "--namespace",
                                                   RELEASE_NAMESPACE, *args).stdout) if doc]


def kubectl_as(kubeconfig: Path, cache: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "KUBECACHEDIR": str(cache)}

    def kubectl(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([tool("kubectl"), *args], env=env, input=stdin, capture_output=True, text=True,
                              timeout=60)

    return kubectl


@pytest.fixture(scope="module")
def chart_namespaces(control_plane) -> Iterator[None]:
    """The namespaces the renders below put objects in; a dry run into a missing namespace is refused."""
    with admin_client(control_plane) as client:
        core = kubernetes.client.CoreV1Api(client)
        created = []
        for name in (RELEASE_NAMESPACE, "team-a", "team-b"):
            try:
                core.create_namespace({"metadata": {"name": name}})
                created.append(name)
            except kubernetes.client.ApiException as exc:
                if exc.status != 409:
                    raise
        yield
        for name in created:
            if name != RELEASE_NAMESPACE:  # the operator's identity may live there for the rest of the session
                core.delete_namespace(name)


@pytest.fixture
def server_dry_run(kubeconfig, tmp_path, chart_namespaces) -> DryRun:
    """`kubectl apply --server-side --dry-run=server` of rendered objects: the API server's own schema, with
    unknown fields refused (kubectl validates strictly by default), admission included, nothing stored.
    Returns kubectl's line per object."""
    kubectl = kubectl_as(kubeconfig, tmp_path / "kube-cache")

    def dry_run(docs: list[dict]) -> list[str]:
        checkable = [doc for doc in docs if doc["kind"] not in THIRD_PARTY_KINDS]
        for doc in docs:
            if doc["kind"] in THIRD_PARTY_KINDS:
                assert doc["spec"]["endpoints"] and doc["spec"]["selector"]["matchLabels"]
        # --force-conflicts: the session's operator identity already applied some of these, as another manager.
        result = kubectl("apply", "--server-side", "--force-conflicts", "--dry-run=server", "-f", "-",
                         stdin=yaml.safe_dump_all(checkable))
        assert result.returncode == 0, result.stderr
        applied = result.stdout.splitlines()
        assert len(applied) == len(checkable) and all(line.endswith("(server dry run)") for line in applied), \
            result.stdout
        return applied

    return dry_run


def test_helm_lint_strict_is_clean():
    result = helm("lint", "--strict", str(CHART))
    assert "0 chart(s) failed" in result.stdout


def test_default_values_render_valid_least_privilege_manifests(server_dry_run):
    docs = render()
    applied = server_dry_run(docs)
    assert "deployment.apps/loraplex serverside-applied (server dry run)" in applied
    assert "clusterrole.rbac.authorization.k8s.io/loraplex serverside-applied (server dry run)" in applied
    kinds = sorted(doc["kind"] for doc in docs)
    assert kinds == ["ClusterKopfPeering", "ClusterRole", "ClusterRole", "ClusterRoleBinding", "ClusterRoleBinding",
                     "Deployment", "Service", "ServiceAccount"]
    deployment = next(doc for doc in docs if doc["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["args"][:3] == ["operator", "--all-namespaces", "--peering=loraplex"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["resources"]["limits"]["memory"] and container["resources"]["requests"]["cpu"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["LORAPLEX_SIDECAR_IMAGE"] == "loraplex/loraplex:0.1.0"
    rules = next(doc for doc in docs if doc["kind"] == "ClusterRole" and not doc["metadata"]["name"].endswith(
        "discovery"))["rules"]
    pods = next(rule for rule in rules if rule["resources"] == ["pods"])
    assert pods["verbs"] == ["get", "list", "watch"]  # read-only where reading is all it needs
    assert not any("*" in rule["verbs"] or "*" in rule["resources"] for rule in rules)
    assert not any("secrets" in rule["resources"] for rule in rules)  # never reads your Secrets


def test_every_option_renders_valid_manifests(server_dry_run):
    docs = render("--values", str(ROOT / "tests" / "chart" / "values-everything.yaml"))
    server_dry_run(docs)
    kinds = sorted(doc["kind"] for doc in docs)
    assert kinds.count("Role") == 2 and kinds.count("RoleBinding") == 2 and kinds.count("KopfPeering") == 2
    assert {"PodDisruptionBudget", "ServiceMonitor"} <= set(kinds)
    assert "ClusterRoleBinding" in kinds  # discovery reads only
    deployment = next(doc for doc in docs if doc["kind"] == "Deployment")
    assert deployment["metadata"]["name"] == "loraplex-ops"
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][:4] == ["operator", "--namespace=team-a", "--namespace=team-b", "--peering=loraplex-ha"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["LORAPLEX_SIDECAR_IMAGE"] == "registry.example.com/loraplex/sidecar:0.1.0-sidecar"
    assert env["LORAPLEX_METRICS_PORT"] == "9191"
    roles = {doc["metadata"]["namespace"] for doc in docs if doc["kind"] == "Role"}
    assert roles == {"team-a", "team-b"}


def test_values_schema_rejects_a_misspelled_key(tmp_path):
    typo = tmp_path / "typo.yaml"
    typo.write_text("replicaCont: 3\n")
    result = helm("template", "loraplex", str(CHART), "--values", str(typo), check=False)
    assert result.returncode != 0
    assert "replicaCont" in result.stderr
    wrong_type = helm("template", "loraplex", str(CHART), "--set", "metrics.port=abc", check=False)
    assert wrong_type.returncode != 0 and "port" in wrong_type.stderr


def test_chart_crds_are_the_generated_crds():
    for name, text in crd_files().items():
        assert (CHART / "crds" / name).read_text() == text, f"charts/loraplex/crds/{name} is stale: run make crds"


def test_values_file_documents_every_key():
    """Every key of the top two levels has a comment right above it (deeper levels are data)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    for index, line in enumerate(lines):
        if re.match(r"^( {2})?[A-Za-z][A-Za-z0-9]*:", line):
            assert lines[index - 1].strip().startswith("# --"), \
                f"values.yaml:{index + 1} {line.strip()!r} has no comment"


def test_examples_are_valid_against_the_crd_schemas(kubeconfig, tmp_path):
    kubectl = kubectl_as(kubeconfig, tmp_path / "kube-cache")
    applied = []
    for example in sorted((ROOT / "examples").glob("*.yaml")):
        result = kubectl("apply", "--server-side", "--dry-run=server", "-f", str(example))
        assert result.returncode == 0, f"{example.name}: {result.stderr}"
        applied += result.stdout.splitlines()
    assert "loraadapter.loraplex.io/llama3-8b-instruct-lora-pubmedqa serverside-applied (server dry run)" in applied
    assert "basemodeldeployment.loraplex.io/llama3-8b serverside-applied (server dry run)" in applied


def test_server_dry_run_refuses_what_the_schema_forbids(server_dry_run):
    """The check above can fail: the API server refuses a rendered object the CRD schema forbids."""
    example = next(doc for doc in yaml.safe_load_all((ROOT / "examples" / "quickstart.yaml").read_text())
                   if doc and doc["kind"] == "LoraAdapter")
    typo = {**example, "spec": {**example["spec"], "sourse": "s3://x/y"}}
    with pytest.raises(AssertionError, match=r"\.spec\.sourse: field not declared in schema"):
        server_dry_run([typo])


def test_dockerfile_passes_hadolint_and_keeps_its_promises():
    result = subprocess.run([tool("hadolint"), str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert len(stages) >= 2, "multi-stage build"
    assert all(re.search(r":\d+\.\d+", image) and "latest" not in image for image in stages), "pinned bases"
    final = text[text.rindex("\nFROM"):]
    assert re.search(r"^USER\s+\d+", final, flags=re.M) and not re.search(r"^USER\s+(root|0)\b", final, flags=re.M)
    assert not re.search(r"apt-get install|gcc|build-essential|pip install", final), "no build tools in the image"
    entrypoint = re.search(r'^ENTRYPOINT \["([^"]+)"\]', text, flags=re.M).group(1)
    scripts = __import__("tomllib").loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entrypoint in scripts
    command = re.search(r'^CMD \["([^"]+)"', text, flags=re.M).group(1)
    subcommands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert command in subcommands and "sidecar" in subcommands
