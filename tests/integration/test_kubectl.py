"""The real kubectl as a user would drive it, against the real API server: apply the examples, read printer
columns, find the kinds by short name and category, wait for Ready, delete and wait for it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, tool
from tests.integration.harness import Cluster, OperatorProcess, wait_for

pytestmark = pytest.mark.integration
QUICKSTART = ROOT / "examples" / "quickstart.yaml"


@pytest.fixture
def kubectl(kubeconfig: Path, tmp_path: Path):
    binary = tool("kubectl")
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "KUBECACHEDIR": str(tmp_path / "kube-cache")}

    def run(*args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([binary, *args], env=env, input=stdin, capture_output=True, text=True, timeout=90)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr}")
        return result

    run.env = env  # type: ignore[attr-defined]
    return run


@pytest.fixture
def operator(operator_kubeconfig: Path, namespace: str, tmp_path: Path) -> Iterator[OperatorProcess]:
    """The operator with the chart's RBAC, resyncing every 2 s so drift across resyncs would show."""
    process = OperatorProcess(operator_kubeconfig, namespace, tmp_path / "operator.log", resync_seconds=2)
    yield process
    process.stop()


@pytest.fixture
def cluster(api_client, namespace) -> Cluster:
    return Cluster(api_client, namespace)


def resyncs(operator: OperatorProcess) -> float:
    """Base-model reconciles so far; with no events arriving, each one is a periodic resync."""
    found = re.search(r'^loraplex_operator_reconciles_total\{kind="base-model",result="ok"\} (\S+)$',
                      operator.metrics(), flags=re.M)
    return float(found.group(1)) if found else 0.0


def test_apply_examples_then_read_status_columns(kubectl, operator, cluster):
    operator.start()
    kubectl("apply", "-f", str(QUICKSTART))
    replicas = wait_for(lambda: len(cluster.replicas("llama3-8b")) == 2 and cluster.replicas("llama3-8b"),
                        what="the Deployment's two pods", log=operator.log)

    def adapters_listed() -> str | None:
        out = kubectl("get", "lora").stdout
        return out if out.count("Loading") == 2 and " 0/2 " in out else None

    table = wait_for(adapters_listed, what="kubectl get lora to show phases", log=operator.log)
    header = table.splitlines()[0].split()
    assert header == ["NAME", "BASE-MODEL", "SERVED-NAME", "PHASE", "READY", "AGE"]
    rows = {line.split()[0]: line.split() for line in table.splitlines()[1:]}
    assert rows["llama3-math"][1:5] == ["llama3-8b", "llama3-8b-math", "Loading", "0/2"]  # ready/wanted
    wide = kubectl("get", "lora", "-o", "wide").stdout.splitlines()[0].split()
    assert {"REPLICAS", "PLACED-ON", "FORMAT", "RANK", "SOURCE"} <= set(wide)
    models = kubectl("get", "bmd").stdout
    assert "vllm" in models and "meta-llama/Meta-Llama-3-8B-Instruct" in models
    everything = kubectl("get", "loraplex").stdout
    assert "basemodeldeployment.loraplex.io/llama3-8b" in everything
    assert "loraadapter.loraplex.io/llama3-squad" in everything

    for pod in replicas:  # each replica's sidecar reports the adapter loaded
        cluster.report("llama3-math", pod, "Loaded", format="hf", rank=16)
    wait_for(lambda: kubectl("get", "lora", "llama3-math", "-o", "jsonpath={.status.phase}").stdout == "Ready",
             what="llama3-math Ready", log=operator.log)
    wide_table = kubectl("get", "lora", "-o", "wide").stdout.splitlines()
    # Cells kubectl leaves empty make whitespace splitting unreliable: cut at the header's column starts.
    starts = [m.start() for m in re.finditer(r"\S+", wide_table[0])]
    columns = wide_table[0].split()
    rows = {line.split()[0]: {column: line[start:end].strip() for column, start, end
                              in zip(columns, starts, [*starts[1:], None], strict=True)} for line in wide_table[1:]}
    math = rows["llama3-math"]
    assert [math[c] for c in ("PHASE", "READY", "REPLICAS", "FORMAT", "RANK")] == ["Ready", "2/2", "2", "hf", "16"]
    assert sorted(json.loads(math["PLACED-ON"])) == sorted(replicas)

    wait_for(lambda: kubectl("get", "bmd", "llama3-8b", "-o", "jsonpath={.status.replicas}/{.status.adaptersReady}"
                             ).stdout == "2/1", what="the base model's status to count the Ready adapter",
             log=operator.log)

    # Re-applying the unchanged manifest changes nothing: no drift for GitOps tools.
    before = kubectl("get", "bmd,lora", "-o", "jsonpath={.items[*].metadata.resourceVersion}").stdout
    again = kubectl("apply", "-f", str(QUICKSTART)).stdout
    # kubectl re-sends a Secret's write-only stringData and says "configured"; the server stores nothing new.
    assert all(line.endswith("unchanged") for line in again.splitlines() if "loraplex.io" in line), again
    assert again.count("unchanged") == 3, again
    passes = resyncs(operator)
    wait_for(lambda: resyncs(operator) >= passes + 2, what="a full resync pass", log=operator.log)
    assert kubectl("get", "bmd,lora", "-o", "jsonpath={.items[*].metadata.resourceVersion}").stdout == before


def test_wait_for_ready_and_delete_that_waits_for_every_replica(kubectl, operator, cluster):
    operator.start()
    kubectl("apply", "-f", str(QUICKSTART))
    replicas = wait_for(lambda: len(cluster.replicas("llama3-8b")) == 2 and cluster.replicas("llama3-8b"),
                        what="the Deployment's two pods", log=operator.log)
    wait_for(lambda: cluster.adapter("llama3-math").get("status", {}).get("replicas") == 2,
             what="the operator counted both replicas", log=operator.log)
    not_yet = kubectl("wait", "--for=condition=Ready", "lora/llama3-math", "--timeout=1s", check=False)
    assert not_yet.returncode != 0 and "timed out" in not_yet.stderr

    for pod in replicas:
        cluster.report("llama3-math", pod, "Loaded")
    waited = kubectl("wait", "--for=condition=Ready", "lora/llama3-math", "--timeout=60s")
    assert waited.stdout.strip() == "loraadapter.loraplex.io/llama3-math condition met"

    # kubectl delete waits until the object is gone, which is when every replica has unloaded it.
    deleting = subprocess.Popen([tool("kubectl"), "delete", "lora", "llama3-math", "--timeout=60s"],
                                env=kubectl.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: cluster.adapter("llama3-math")["metadata"].get("deletionTimestamp"),
                 what="deletion to begin", log=operator.log)
        cluster.report("llama3-math", replicas[0], None)  # one replica unloaded it
        ready_message = ("get", "lora", "llama3-math", "-o",
                         'jsonpath={.status.conditions[?(@.type=="Ready")].message}')
        wait_for(lambda: kubectl(*ready_message).stdout == f"Unloading from 1 replica(s): {replicas[1]}.",
                 what="the operator to see the first replica let go", log=operator.log)
        assert deleting.poll() is None, "kubectl delete returned while a replica still serves the adapter"
        cluster.report("llama3-math", replicas[1], None)
        out, err = deleting.communicate(timeout=60)
    finally:
        if deleting.poll() is None:
            deleting.kill()
    assert deleting.returncode == 0, err
    assert out.startswith('loraadapter.loraplex.io "llama3-math" deleted'), out
    assert not cluster.exists("loraadapters", "llama3-math")


@pytest.mark.parametrize("mode", [[], ["--dry-run=server"]], ids=["apply", "dry-run"])
def test_schema_rejects_bad_specs_with_the_field_named(kubectl, mode):
    bad = textwrap.dedent("""
        apiVersion: loraplex.io/v1alpha1
        kind: BaseModelDeployment
        metadata: {name: broken}
        spec: {model: m, runtime: tgi, image: i, lora: {maxRank: 0}}
        ---
        apiVersion: loraplex.io/v1alpha1
        kind: LoraAdapter
        metadata: {name: broken}
        spec: {baseModel: m, source: s3://x/y, typo: 1}
        ---
        apiVersion: loraplex.io/v1alpha1
        kind: LoraAdapter
        metadata: {name: broken-source}
        spec: {baseModel: m, source: "ftp://x/y"}
    """)
    result = kubectl("apply", *mode, "-f", "-", stdin=bad, check=False)
    assert result.returncode != 0
    assert 'spec.runtime: Unsupported value: "tgi": supported values: "vllm", "nim"' in result.stderr
    assert "spec.lora.maxRank" in result.stderr
    assert 'unknown field "spec.typo"' in result.stderr
    assert 'spec.source: Invalid value: "ftp://x/y"' in result.stderr
    assert "No resources found" in kubectl("get", "loraplex").stderr


def test_every_example_applies_server_side(kubectl):
    """Into an empty namespace: the Secrets and claims they name need not exist for them to be accepted."""
    expected = set()
    for example in sorted((ROOT / "examples").glob("*.yaml")):
        result = kubectl("apply", "--server-side", "-f", str(example), check=False)
        assert result.returncode == 0, f"{example.name}: {result.stderr}"
        for doc in yaml.safe_load_all(example.read_text()):
            if doc and doc["apiVersion"].startswith("loraplex.io/"):
                expected.add(f"{doc['kind'].lower()}.loraplex.io/{doc['metadata']['name']}")
    listed = set(kubectl("get", "loraplex", "-o", "name").stdout.split())
    assert listed == expected


def test_short_names_and_category_come_from_discovery(kubectl):
    resources = kubectl("api-resources", "--api-group=loraplex.io", "-o", "wide").stdout.splitlines()
    header = resources[0].split()
    rows = {line.split()[0]: dict(zip(header, line.split(), strict=True)) for line in resources[1:]}
    assert rows["loraadapters"]["SHORTNAMES"] == "lora" and rows["loraadapters"]["CATEGORIES"] == "loraplex"
    assert rows["basemodeldeployments"]["SHORTNAMES"] == "bmd"
    assert rows["basemodeldeployments"]["CATEGORIES"] == "loraplex"
    assert rows["loraadapters"]["KIND"] == "LoraAdapter" and rows["loraadapters"]["NAMESPACED"] == "true"
    assert rows["lorareplicas"]["SHORTNAMES"] == "lorarep" and rows["lorareplicas"]["CATEGORIES"] == "loraplex"

    kubectl("apply", "-f", str(QUICKSTART))
    assert kubectl("get", "bmd", "-o", "name").stdout.split() == ["basemodeldeployment.loraplex.io/llama3-8b"]
    assert kubectl("get", "lora", "-o", "name").stdout.split() == ["loraadapter.loraplex.io/llama3-math",
                                                                  "loraadapter.loraplex.io/llama3-squad"]
    assert len(kubectl("get", "loraplex", "-o", "name").stdout.split()) == 3


def test_explain_describes_the_fields(kubectl):
    explained = kubectl("explain", "loraadapters.spec.source").stdout
    assert "s3://, gs://, https://, hf://org/repo@revision or" in explained
