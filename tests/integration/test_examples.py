"""Each walkthrough in examples/<folder>/, applied as a user would apply it. The real API server must take every
object as written: strict field validation, and nothing pruned or changed. The operator's own pure checks must
accept it: the spec renders, every adapter passes check_adapter, and an adapter loraplex converts has the base
model's config.json. Every object the folder references must be in the folder. The API server must accept
what the operator renders for it, and the real vLLM must parse the inference container's arguments.

A new folder is covered without changes here: the tests are parametrized by the folders that exist."""

from __future__ import annotations

import base64
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from loraplex.api.contract import BASE_CONFIG_FILE
from loraplex.api.runtime_capabilities import capabilities, deployed_version
from loraplex.api.types import AdapterFormat, BaseModelDeploymentSpec
from loraplex.formats.rules import module_shapes
from loraplex.operator import naming, render
from loraplex.operator.adapters import AdapterView, check_adapter, desired_adapters, served_name_owners
from loraplex.operator.cluster_view import ClusterView
from loraplex.operator.settings import OperatorSettings
from tests.conftest import ROOT, tool
from tests.vllm_server import VLLM_PYTHON

pytestmark = pytest.mark.integration
EXAMPLES = ROOT / "examples"
FOLDERS = sorted(path.name for path in EXAMPLES.iterdir() if path.is_dir())
BASE_MODEL, ADAPTER = "BaseModelDeployment", "LoraAdapter"
# Stands in for what the API server fills in, for checks that run without it.
# Parsed beside the examples' arguments, to show the parser refuses what vLLM does not know.
MISSPELT = ["meta-llama/Meta-Llama-3-8B", "--max-model-lenn", "8192"]
PLACEHOLDER_METADATA = {"namespace": "examples", "uid": "00000000-0000-0000-0000-000000000000",
                        "creationTimestamp": "2026-01-01T00:00:00Z", "generation": 1}
# Parses argument lists with the real vLLM's own `vllm serve` parser; prints one verdict per list.
VLLM_PARSE = """
import contextlib, io, json, sys
try:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
except ImportError:  # vLLM releases before the launchers package
    from vllm.entrypoints.openai.cli_args import make_arg_parser
try:
    from vllm.utils.argparse_utils import FlexibleArgumentParser
except ImportError:
    from vllm.utils import FlexibleArgumentParser
verdicts = []
for arguments in json.load(sys.stdin):
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            make_arg_parser(FlexibleArgumentParser(prog="vllm serve")).parse_args(arguments)
        verdicts.append(None)
    except SystemExit:
        verdicts.append(errors.getvalue().strip().splitlines()[-1])
print("VERDICTS " + json.dumps(verdicts))
"""


def manifests(folder: Path) -> list[dict[str, Any]]:
    return [doc for path in sorted(folder.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


def with_metadata(doc: dict[str, Any]) -> dict[str, Any]:
    return {**doc, "metadata": {**PLACEHOLDER_METADATA, **doc["metadata"]}}


def as_stored(doc: dict[str, Any]) -> dict[str, Any]:
    """What the API server keeps of `doc`: a Secret's stringData becomes base64 data."""
    if doc["kind"] != "Secret" or "stringData" not in doc:
        return doc
    encoded = {key: base64.b64encode(value.encode()).decode() for key, value in doc["stringData"].items()}
    return {**{k: v for k, v in doc.items() if k != "stringData"}, "data": {**doc.get("data", {}), **encoded}}


def changed_fields(sent: Any, stored: Any, path: str = "") -> list[str]:
    """Paths of what `sent` says and `stored` lacks or holds otherwise: what the server pruned or rewrote."""
    if isinstance(sent, dict):
        if not isinstance(stored, dict):
            return [path or "."]
        return [found for key, value in sent.items()
                for found in ([f"{path}.{key}"] if key not in stored else changed_fields(value, stored[key],
                                                                                            f"{path}.{key}"))]
    if isinstance(sent, list):
        if not isinstance(stored, list) or len(stored) != len(sent):
            return [path]
        return [found for index, (a, b) in enumerate(zip(sent, stored, strict=True))
                for found in changed_fields(a, b, f"{path}[{index}]")]
    return [] if sent == stored else [path]


def base_models(objects: list[dict[str, Any]]) -> dict[str, tuple[dict[str, Any], BaseModelDeploymentSpec | None,
                                                                   str | None]]:
    return {doc["metadata"]["name"]: (doc, *ClusterView.parse_spec(doc)) for doc in objects
            if doc["kind"] == BASE_MODEL}


def references(spec: BaseModelDeploymentSpec) -> set[tuple[str, str]]:
    """The (kind, name) of every object a base model's pods need to start."""
    secrets = {*(spec.env_from_secrets or []), *(spec.image_pull_secrets or [])}
    if spec.storage and spec.storage.credentials_secret:
        secrets.add(spec.storage.credentials_secret)
    claims = {volume.persistent_volume_claim.claim_name for volume in (spec.peft_source, spec.cache)
              if volume is not None and volume.persistent_volume_claim is not None}
    if spec.storage and spec.storage.adapter_store:
        claims.add(spec.storage.adapter_store.claim_name)
    config_maps = {spec.lora.base_model_config_map} if spec.lora.base_model_config_map else set()
    return ({("Secret", name) for name in secrets} | {("PersistentVolumeClaim", name) for name in claims}
            | {("ConfigMap", name) for name in config_maps})


def base_config_problem(objects: list[dict[str, Any]], name: str) -> str | None:
    config_map = next((doc for doc in objects if doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == name), None)
    text = ((config_map or {}).get("data") or {}).get(BASE_CONFIG_FILE)
    if text is None:
        return f"ConfigMap {name} has no {BASE_CONFIG_FILE} key"
    try:
        config = json.loads(text)
        module_shapes(config)
        int(config["num_hidden_layers"])
    except (ValueError, KeyError, TypeError) as exc:
        return f"ConfigMap {name}: {BASE_CONFIG_FILE} is not a usable config.json ({exc!r})"
    return None


def operator_problems(objects: list[dict[str, Any]]) -> list[str]:
    """Everything the operator, or a sidecar before any download, would refuse in these objects; one sentence
    each. `objects` carry their metadata as the API server returns them."""
    problems = []
    models = base_models(objects)
    present = {(doc["kind"], doc["metadata"]["name"]) for doc in objects}
    for name, (body, spec, error) in models.items():
        if spec is None:
            problems.append(f"{BASE_MODEL} {name}: {error}")
            continue
        problems += [f"{BASE_MODEL} {name}: {problem}" for problem in naming.name_problems(name)]
        try:
            render.render_children(body, spec, OperatorSettings())
        except render.RenderError as exc:
            problems.append(f"{BASE_MODEL} {name}: {exc}")
        for kind, missing in sorted(references(spec) - present):
            problems.append(f"{BASE_MODEL} {name} needs {kind} {missing}, which the example does not hold")
        config_map = spec.lora.base_model_config_map
        if config_map and ("ConfigMap", config_map) in present and (problem := base_config_problem(objects,
                                                                                                 config_map)):
            problems.append(problem)
    views = [AdapterView.from_body(doc) for doc in objects if doc["kind"] == ADAPTER]
    for view in views:
        spec = models.get(view.base_model or "", (None, None, None))[1]
        siblings = [other for other in views if other.base_model == view.base_model]
        verdict = check_adapter(view, spec, siblings, served_name_owners(siblings))
        if not verdict.accepted:
            problems.append(f"{ADAPTER} {view.name}: {verdict.reason}: {verdict.message}")
            continue
        assert spec is not None and view.spec is not None
        runtime = capabilities(spec.runtime, deployed_version(spec.runtime, spec.image, spec.runtime_version))
        if view.spec.format not in (AdapterFormat.AUTO, *runtime.formats) and not spec.lora.base_model_config_map:
            problems.append(f"{ADAPTER} {view.name}: {runtime.name} gets format {view.spec.format.value} converted, "
                            f"which needs lora.baseModelConfigMap on {BASE_MODEL} {view.base_model}")
    return problems


def rendered_children(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What the operator writes for each base model: its owned objects and its adapter set."""
    adapters = [AdapterView.from_body(doc) for doc in objects if doc["kind"] == ADAPTER]
    rendered = []
    for name, (body, spec, _) in base_models(objects).items():
        assert spec is not None
        mine = [view for view in adapters if view.base_model == name]
        rendered += render.render_children(body, spec, OperatorSettings())
        rendered.append(render.render_adapter_set(body, spec, desired_adapters(spec, mine)))
    return rendered


def vllm_arguments(objects: list[dict[str, Any]]) -> list[list[str]]:
    return [container["args"] for child in rendered_children(objects) if child["kind"] == "Deployment"
            for container in child["spec"]["template"]["spec"]["containers"]
            if container.get("command") == ["vllm", "serve"]]


@pytest.fixture
def kubectl(kubeconfig: Path, tmp_path: Path):
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "KUBECACHEDIR": str(tmp_path / "kube-cache")}

    def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([tool("kubectl"), *args], env=env, input=stdin, capture_output=True, text=True,
                              timeout=120)

    return run


def dry_run(kubectl, *sources: str, stdin: str | None = None) -> list[dict[str, Any]]:
    """`kubectl apply --dry-run=server` with strict field validation: the objects as the server would store them."""
    result = kubectl("apply", "--dry-run=server", "--validate=strict", "-o", "json",
                     *(arg for source in sources for arg in ("-f", source)), stdin=stdin)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    return out["items"] if out.get("kind") == "List" else [out]


@pytest.fixture(scope="module")
def vllm_verdicts() -> dict[str, list[str | None]]:
    """The real vLLM's verdict on every vLLM container of every example (and on MISSPELT, under the key
    "misspelt"), in one start of its Python."""
    if not VLLM_PYTHON.exists():
        raise AssertionError("real vLLM is not installed: run `make vllm` (make test does it for you)")
    per_folder = {folder: vllm_arguments([with_metadata(doc) for doc in manifests(EXAMPLES / folder)])
                  for folder in FOLDERS}
    per_folder["misspelt"] = [MISSPELT]
    every = [arguments for lists in per_folder.values() for arguments in lists]
    result = subprocess.run([str(VLLM_PYTHON), "-c", VLLM_PARSE], input=json.dumps(every), capture_output=True,
                            text=True, timeout=300, env={**os.environ, "VLLM_LOGGING_LEVEL": "ERROR"})
    line = next((line for line in reversed(result.stdout.splitlines()) if line.startswith("VERDICTS ")), None)
    assert result.returncode == 0 and line, result.stderr[-3000:]
    verdicts = iter(json.loads(line.removeprefix("VERDICTS ")))
    return {key: [next(verdicts) for _ in lists] for key, lists in per_folder.items()}


@pytest.mark.parametrize("folder", FOLDERS)
def test_the_api_server_keeps_every_field_as_written(kubectl, folder):
    sent = manifests(EXAMPLES / folder)
    stored = dry_run(kubectl, str(EXAMPLES / folder))
    assert [(doc["kind"], doc["metadata"]["name"]) for doc in stored] == \
           [(doc["kind"], doc["metadata"]["name"]) for doc in sent]
    for doc, kept in zip(sent, stored, strict=True):
        assert changed_fields(as_stored(doc), kept) == [], f"{doc['kind']} {doc['metadata']['name']}"


@pytest.mark.parametrize("folder", FOLDERS)
def test_the_operator_accepts_every_object_and_the_server_what_it_renders(kubectl, folder):
    stored = dry_run(kubectl, str(EXAMPLES / folder))
    assert any(doc["kind"] == BASE_MODEL for doc in stored), "an example serves at least one base model"
    assert operator_problems(stored) == []
    children = rendered_children(stored)
    applied = dry_run(kubectl, "-", stdin=yaml.safe_dump_all(children))
    assert {doc["kind"] for doc in applied} >= {"Deployment", "Service", "ConfigMap", "Role"}


@pytest.mark.parametrize("folder", FOLDERS)
def test_vllm_parses_the_arguments_rendered_for_it(vllm_verdicts, folder):
    assert vllm_verdicts[folder] == [None] * len(vllm_verdicts[folder])


def test_each_example_has_a_readme_and_a_place_in_the_project_readme():
    readme = (ROOT / "README.md").read_text()
    for folder in FOLDERS:
        assert (EXAMPLES / folder / "README.md").is_file(), folder
        assert f"](examples/{folder}/)" in readme, f"README.md does not link examples/{folder}/"


def test_the_checks_catch_what_the_server_or_the_operator_would_refuse(kubectl, vllm_verdicts):
    objects = [with_metadata(doc) for doc in manifests(EXAMPLES / "vllm-nxd")]
    typo = yaml.safe_dump_all([{**doc, "spec": {**doc["spec"], "sourse": "s3://x/y"}} if doc["kind"] == ADAPTER
                               else doc for doc in manifests(EXAMPLES / "vllm-nxd")])
    refused = kubectl("apply", "--dry-run=server", "--validate=strict", "-f", "-", stdin=typo)
    assert refused.returncode != 0 and 'unknown field "spec.sourse"' in refused.stderr
    assert changed_fields({"spec": {"lora": {"maxRank": 16, "maxRanks": 8}}},
                          {"spec": {"lora": {"maxRank": 16}}}) == [".spec.lora.maxRanks"]

    def broken(kind: str, **spec: Any) -> list[str]:
        return operator_problems([{**doc, "spec": {**doc["spec"], **spec}} if doc["kind"] == kind else doc
                                  for doc in objects])

    lora = next(doc for doc in objects if doc["kind"] == BASE_MODEL)["spec"]["lora"]
    assert "maxCpuLoras 2 is below lora.maxGpuLoras 4" in " ".join(broken(BASE_MODEL, lora={**lora, "maxCpuLoras": 2}))
    assert "RankTooHigh" in " ".join(broken(ADAPTER, expectedRank=32))
    unconfigured = {key: value for key, value in lora.items() if key != "baseModelConfigMap"}
    assert "format nxd converted, which needs lora.baseModelConfigMap" in " ".join(
        broken(BASE_MODEL, lora=unconfigured))
    assert "needs Secret hf-token" in " ".join(operator_problems([doc for doc in objects
                                                                   if doc["metadata"]["name"] != "hf-token"]))
    assert "FormatNotAllowed" in " ".join(broken(BASE_MODEL, lora={**lora, "allowedFormats": ["hf"]}))
    assert vllm_verdicts["misspelt"] == ["vllm serve: error: unrecognized arguments: --max-model-lenn 8192"]
