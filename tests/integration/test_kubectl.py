"""The real kubectl as a user would drive it: apply the CRDs and examples, read printer columns."""

from __future__ import annotations

import os
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, tool
from tests.integration.harness import OperatorProcess, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def kubectl(kubeconfig: Path, tmp_path: Path):
    binary = tool("kubectl")
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "KUBECACHEDIR": str(tmp_path / "kube-cache")}

    def run(*args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([binary, *args], env=env, input=stdin, capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr}")
        return result

    return run


@pytest.fixture
def operator(kubeconfig: Path, tmp_path: Path) -> Iterator[OperatorProcess]:
    process = OperatorProcess(kubeconfig, tmp_path / "operator.log", resync_seconds=3)  # no drift across resyncs
    yield process
    process.stop()


def test_apply_crds_and_examples_then_read_status_columns(kubectl, operator):
    applied = kubectl("apply", "-f", str(ROOT / "crds"))
    assert "customresourcedefinition.apiextensions.k8s.io/loraadapters.loraplex.io created" in applied.stdout
    operator.start()
    kubectl("apply", "-f", str(ROOT / "examples" / "quickstart.yaml"))

    def adapters_listed() -> str | None:
        out = kubectl("get", "lora").stdout
        return out if "Pending" in out and out.count("\n") == 3 else None

    table = wait_for(adapters_listed, what="kubectl get lora to show phases", log=operator.log)
    header = table.splitlines()[0].split()
    assert header == ["NAME", "BASE-MODEL", "SERVED-NAME", "PHASE", "READY", "REPLICAS", "AGE"]
    rows = {line.split()[0]: line.split() for line in table.splitlines()[1:]}
    assert rows["llama3-math"][1:4] == ["llama3-8b", "llama3-8b-math", "Pending"]
    wide = kubectl("get", "lora", "-o", "wide").stdout.splitlines()[0].split()
    assert {"FORMAT", "RANK", "SOURCE"} <= set(wide)
    models = kubectl("get", "bmd").stdout
    assert "vllm" in models and "meta-llama/Meta-Llama-3-8B-Instruct" in models
    everything = kubectl("get", "loraplex").stdout
    assert "basemodeldeployment.loraplex.io/llama3-8b" in everything
    assert "loraadapter.loraplex.io/llama3-squad" in everything

    # Re-applying the unchanged manifest changes nothing: no drift for GitOps tools.
    wait_for(lambda: "NoReplicas" in kubectl("get", "lora", "llama3-squad", "-o",
                                             "jsonpath={.status.conditions[2].reason}").stdout,
             what="status settled", log=operator.log)
    before = kubectl("get", "bmd,lora", "-o", "jsonpath={.items[*].metadata.resourceVersion}").stdout
    again = kubectl("apply", "-f", str(ROOT / "examples" / "quickstart.yaml")).stdout
    # kubectl re-sends a Secret's write-only stringData and says "configured"; the server stores nothing new.
    assert all(line.endswith("unchanged") for line in again.splitlines() if "loraplex.io" in line), again
    assert again.count("unchanged") == 3, again
    time.sleep(4)  # longer than one full operator resync pass in tests
    assert kubectl("get", "bmd,lora", "-o", "jsonpath={.items[*].metadata.resourceVersion}").stdout == before


def test_schema_rejects_bad_specs_with_the_field_named(kubectl):
    kubectl("apply", "-f", str(ROOT / "crds"))
    bad = textwrap.dedent("""
        apiVersion: loraplex.io/v1alpha1
        kind: BaseModelDeployment
        metadata: {name: broken}
        spec: {model: m, runtime: tgi, image: i, lora: {maxRank: 0}}
        ---
        apiVersion: loraplex.io/v1alpha1
        kind: LoraAdapter
        metadata: {name: broken}
        spec: {baseModel: m, source: "ftp://x/y", typo: 1}
    """)
    result = kubectl("apply", "-f", "-", stdin=bad, check=False)
    assert result.returncode != 0
    assert 'spec.runtime: Unsupported value: "tgi": supported values: "vllm", "nim", "cpu"' in result.stderr
    assert "spec.lora.maxRank" in result.stderr
    assert 'unknown field "spec.typo"' in result.stderr


def test_explain_describes_the_fields(kubectl):
    kubectl("apply", "-f", str(ROOT / "crds"))
    explained = kubectl("explain", "loraadapters.spec.source").stdout
    assert "s3://, gs://, https://, hf://org/repo@revision or" in explained
