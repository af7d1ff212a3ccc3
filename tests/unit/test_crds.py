"""The CRDs are generated from the API types, structural, and committed up to date."""

import re
from pathlib import Path

import pydantic
import pytest
import yaml

from loraplex.api.crds import crd_files, render_crd
from loraplex.api.types import RESOURCES, BaseModelDeploymentSpec, LoraAdapterSpec

CRDS = Path(__file__).resolve().parents[2] / "crds"


def test_committed_crds_match_the_api_types():
    for name, text in crd_files().items():
        assert (CRDS / name).read_text() == text, f"crds/{name} is stale: run `make crds`"


def _walk(schema, path="<root>"):
    yield path, schema
    for name, sub in (schema.get("properties") or {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _walk(schema["additionalProperties"], f"{path}.*")
    if isinstance(schema.get("items"), dict):
        yield from _walk(schema["items"], f"{path}[]")


@pytest.mark.parametrize("resource", RESOURCES, ids=lambda r: r.kind)
def test_schema_is_structural_and_described(resource):
    schema = render_crd(resource)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        assert "type" in node, f"{path} has no type"
        for keyword in ("$ref", "anyOf", "oneOf", "allOf", "title"):
            assert keyword not in node, f"{path} uses {keyword}, which is not structural"
        if node["type"] == "object" and path.count(".") >= 1 and not path.endswith("metadata"):
            assert ("properties" in node or "additionalProperties" in node
                    or node.get("x-kubernetes-preserve-unknown-fields")), f"{path} is an untyped object"
    for path, node in _walk(schema["properties"]["spec"]):
        if path != "<root>" and not path.endswith("[]") and not path.endswith(".*"):
            assert node.get("description"), f"spec{path[6:]} has no description for kubectl explain"


def test_crd_publishes_names_status_and_printer_columns():
    crd = render_crd(RESOURCES[1])
    assert crd["metadata"]["name"] == "loraadapters.loraplex.io"
    assert crd["spec"]["names"]["shortNames"] == ["lora"]
    assert crd["spec"]["names"]["categories"] == ["loraplex"]
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert {c["name"] for c in version["additionalPrinterColumns"]} >= {"Base-Model", "Phase", "Ready", "Age"}
    bmd = render_crd(RESOURCES[0])
    assert bmd["spec"]["names"]["shortNames"] == ["bmd"]


def test_schema_encodes_enums_ranges_patterns_and_defaults():
    bmd_spec = render_crd(RESOURCES[0])["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert bmd_spec["properties"]["runtime"]["enum"] == ["vllm", "nim"]
    assert set(bmd_spec["required"]) == {"image", "model", "runtime"}
    lora = bmd_spec["properties"]["lora"]
    assert lora["default"] == {}
    assert lora["properties"]["maxRank"]["default"] == 64
    assert lora["properties"]["maxRank"]["maximum"] == 1024
    adapter_spec = render_crd(RESOURCES[1])["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert adapter_spec["properties"]["source"]["pattern"].startswith("^(s3|gs|https|hf|file)://")
    assert adapter_spec["properties"]["expectedRank"]["minimum"] == 1
    assert adapter_spec["properties"]["format"]["default"] == "auto"


def test_crd_defaults_agree_with_the_pydantic_defaults():
    """The API server's defaulting and the operator's parsing must see the same spec."""
    spec = BaseModelDeploymentSpec.model_validate({"model": "m", "runtime": "nim", "image": "i"})
    schema = yaml.safe_load(crd_files()["basemodeldeployments.yaml"])
    props = schema["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert props["replicas"]["default"] == spec.replicas
    assert props["lora"]["properties"]["maxGpuLoras"]["default"] == spec.lora.max_gpu_loras
    assert props["peftSource"]["properties"]["mountPath"]["default"] == spec.peft_source.mount_path
    assert LoraAdapterSpec.model_validate({"baseModel": "b", "source": "s3://bucket/x"}).format.value == "auto"


@pytest.mark.parametrize(("value", "valid"), [
    ("0.11.0", True), ("v0.32.0", True), ("0.12", True), ("latest", False), ("0.11.0-cpu", False), ("11", False),
])
def test_runtime_version_is_an_optional_version(value, valid):
    schema = yaml.safe_load(crd_files()["basemodeldeployments.yaml"])
    field = schema["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"][
        "runtimeVersion"]
    assert field["type"] == "string" and "when its tag does not say" in field["description"]
    assert bool(re.fullmatch(field["pattern"], value)) is valid
    base = {"model": "m", "runtime": "vllm", "image": "vllm/vllm-openai:latest"}
    assert BaseModelDeploymentSpec.model_validate(base).runtime_version is None
    if valid:
        assert BaseModelDeploymentSpec.model_validate({**base, "runtimeVersion": value}).runtime_version == value
    else:
        with pytest.raises(pydantic.ValidationError):
            BaseModelDeploymentSpec.model_validate({**base, "runtimeVersion": value})
