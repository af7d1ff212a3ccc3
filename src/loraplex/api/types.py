"""The loraplex API: spec and status of BaseModelDeployment, LoraAdapter and LoraReplica.

These pydantic models are the single source of truth: `loraplex.api.crds` turns them into the
CustomResourceDefinitions in `crds/`, the operator parses custom resources with them, and the
sidecar reads the desired adapter set the operator renders from them. Every kind stays in this one file,
longer than the others, because it is read as the schema: top to bottom, it is what `crds/` says.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

GROUP = "loraplex.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
# On every inference pod and every LoraReplica: which BaseModelDeployment they belong to.
BASE_MODEL_LABEL = f"{GROUP}/base-model"

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# A served name is both the model name clients send and, for NIM, a folder name under the PEFT source.
SERVED_NAME = r"^[A-Za-z0-9][A-Za-z0-9._:-]*$"
# The sidecar names files after it (plus a suffix of up to 9 characters) under a 255-byte file-name limit.
MAX_SERVED_NAME = 128
SOURCE_URI = r"^(s3|gs|https|hf|file)://.+$"
QUANTITY = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E|m)?$"
RUNTIME_VERSION = r"^v?([0-9]+)\.([0-9]+)(?:\.([0-9]+))?$"
MAX_LORA_RANK = 1024


class Model(BaseModel):
    """Base for every API type: camelCase on the wire, unknown fields refused."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")

    def to_patch(self) -> dict[str, Any]:
        """The wire form for a merge patch: every field given, a field given as None kept as null, which
        removes it from the object; fields never given are left out and so left alone."""
        return self.model_dump(by_alias=True, exclude_unset=True, mode="json")


def nested(model: type[Model], description: str) -> Any:
    """A sub-object that is always present, so the API server fills in its own defaults."""
    return Field(default_factory=model, description=description, json_schema_extra={"default": {}})


class Runtime(enum.StrEnum):
    VLLM = "vllm"
    NIM = "nim"


class AdapterFormat(enum.StrEnum):
    AUTO = "auto"
    HF = "hf"
    NEMO = "nemo"
    TRTLLM = "trtllm"
    NXD = "nxd"  # AWS Neuron NeuronX Distributed adapter checkpoints


# ---------------------------------------------------------------------------------------------
# Conditions (Kubernetes API conventions)


class ConditionStatus(enum.StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(Model):
    """The latest observation of one aspect of the object's state."""

    type: str = Field(description="Type of condition in CamelCase, e.g. Ready.")
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(description="CamelCase reason for the last transition.")
    message: str = Field(default="", description="A human-readable sentence about the transition.")
    observed_generation: int | None = Field(
        default=None, description="The .metadata.generation this condition was computed from."
    )
    last_transition_time: str | None = Field(
        default=None, description="When the status last changed (RFC 3339)."
    )


# ---------------------------------------------------------------------------------------------
# BaseModelDeployment


class GpuSpec(Model):
    count: int = Field(default=1, ge=0, le=64, description="GPUs per replica.")
    resource_name: str = Field(
        default="nvidia.com/gpu", description="Extended resource name the GPUs are requested under."
    )


class ComputeResources(Model):
    """CPU, memory and ephemeral storage for the inference container (GPUs are set in `gpus`)."""

    requests: dict[str, Annotated[str, Field(pattern=QUANTITY)]] | None = Field(
        default=None, description="Resource requests, e.g. {cpu: '4', memory: 32Gi}."
    )
    limits: dict[str, Annotated[str, Field(pattern=QUANTITY)]] | None = Field(
        default=None, description="Resource limits, e.g. {memory: 48Gi}."
    )


class EnvVar(Model):
    name: str = Field(min_length=1, description="Environment variable name.")
    value: str | None = Field(default=None, description="Literal value.")
    value_from: dict[str, Any] | None = Field(
        default=None, description="A Kubernetes EnvVarSource (secretKeyRef, configMapKeyRef, fieldRef...)."
    )


class EmptyDirVolume(Model):
    size_limit: str = Field(default="20Gi", pattern=QUANTITY, description="Size limit of the emptyDir.")
    medium: Literal["", "Memory"] = Field(default="", description="'' for node disk, Memory for tmpfs.")


class ClaimVolume(Model):
    claim_name: str = Field(pattern=DNS_LABEL, description="Name of an existing PersistentVolumeClaim.")


class PeftSourceSpec(Model):
    """Where adapters live inside the pod: the sidecar writes them, the runtime reads them."""

    mount_path: str = Field(
        default="/loras", pattern=r"^/.*", description="Mount path in both containers (NIM_PEFT_SOURCE)."
    )
    empty_dir: EmptyDirVolume | None = Field(
        default=None, description="Per-pod scratch volume (the default when no claim is given)."
    )
    persistent_volume_claim: ClaimVolume | None = Field(
        default=None, description="Existing PVC to keep adapters across pod restarts."
    )


class CacheVolumeSpec(Model):
    """Model weights cache (NIM: /opt/nim/.cache; vLLM: the Hugging Face cache)."""

    empty_dir: EmptyDirVolume | None = Field(default=None, description="Scratch cache per pod.")
    persistent_volume_claim: ClaimVolume | None = Field(
        default=None, description="Existing PVC so weights are downloaded once."
    )


class LoraLimits(Model):
    max_gpu_loras: int = Field(
        default=8, ge=1, le=1024, description="Adapters resident on the GPU at once (--max-loras)."
    )
    max_cpu_loras: int = Field(
        default=16, ge=1, le=100000, description="Adapters cached in host memory (--max-cpu-loras)."
    )
    max_rank: int = Field(
        default=64, ge=1, le=MAX_LORA_RANK, description="Largest LoRA rank accepted (--max-lora-rank)."
    )
    allowed_formats: list[AdapterFormat] | None = Field(
        default=None,
        description="Adapter formats accepted; defaults to every format the runtime can load.",
    )
    allowed_target_modules: list[str] | None = Field(
        default=None, description="If set, adapters may only target these modules."
    )
    refresh_interval_seconds: int = Field(
        default=10, ge=1, le=3600, description="How often NIM rescans its PEFT source."
    )
    adapters_per_replica: int | None = Field(
        default=None, ge=1, le=100000,
        description="Adapters one replica holds at most (placement); no limit when unset. May be below "
        "maxGpuLoras.",
    )
    bytes_per_replica: str | None = Field(
        default=None, pattern=QUANTITY,
        description="Adapter bytes one replica holds at most (placement); defaults to the PEFT volume's emptyDir "
        "sizeLimit, and to no limit on a PersistentVolumeClaim.",
    )
    base_model_config_map: str | None = Field(
        default=None,
        pattern=DNS_LABEL,
        description=(
            "ConfigMap holding the base model's config.json; when set, every adapter's tensor shapes and "
            "layer count are checked against it, catching adapters trained for another base model."
        ),
    )


class S3Settings(Model):
    endpoint: str | None = Field(
        default=None, pattern=r"^https?://.+", description="S3-compatible endpoint; AWS when unset."
    )
    region: str | None = Field(default=None, description="S3 region.")
    force_path_style: bool = Field(default=False, description="Use path-style bucket addressing.")


class AdapterStoreVolume(Model):
    """A shared volume of adapters read through file:// URIs."""

    claim_name: str = Field(pattern=DNS_LABEL, description="PersistentVolumeClaim holding adapters.")
    mount_path: str = Field(default="/adapter-store", pattern=r"^/.*", description="Where it is mounted.")


class StorageSpec(Model):
    """How the sidecar reaches adapter sources."""

    credentials_secret: str | None = Field(
        default=None,
        pattern=DNS_LABEL,
        description=(
            "Secret whose keys become the sidecar's environment (AWS_ACCESS_KEY_ID, "
            "AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS_JSON, HF_TOKEN, HTTP_BEARER_TOKEN)."
        ),
    )
    s3: S3Settings | None = Field(default=None, description="S3 endpoint settings.")
    adapter_store: AdapterStoreVolume | None = Field(
        default=None, description="PVC mounted read-only in the sidecar for file:// sources."
    )
    service_account_annotations: dict[str, str] | None = Field(
        default=None, description="Annotations for the pod's ServiceAccount (workload identity)."
    )


class SidecarSpec(Model):
    image: str | None = Field(default=None, description="Sidecar image; the operator's default when unset.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(
        default=None, description="Pull policy of the sidecar image."
    )
    resources: ComputeResources | None = Field(default=None, description="Sidecar resources.")
    max_concurrent_downloads: int = Field(default=4, ge=1, le=64, description="Parallel adapter downloads.")
    log_level: Literal["debug", "info", "warning", "error"] = Field(default="info", description="Log level.")


ENDPOINT_PICKER_IMAGE = "ghcr.io/llm-d/llm-d-router-endpoint-picker:v0.10.0"


class EndpointPickerSpec(Model):
    image: str = Field(default=ENDPOINT_PICKER_IMAGE, min_length=1, description="The endpoint picker's image.")
    failure_mode: Literal["FailOpen", "FailClose"] = Field(
        default="FailOpen",
        description="What the gateway does when the picker does not answer: FailOpen sends the request to any "
        "pod of the pool, FailClose refuses it.",
    )
    resources: ComputeResources | None = Field(default=None, description="The endpoint picker's resources.")


class RoutingSpec(Model):
    """Adapter-aware routing through the Gateway API Inference Extension: an InferencePool of the base model's
    pods and an endpoint picker that scores them by the adapters they hold (docs/routing/upstream.md)."""

    endpoint_picker: EndpointPickerSpec = Field(
        default_factory=EndpointPickerSpec, description="The endpoint picker the InferencePool calls.")


class BaseModelDeploymentSpec(Model):
    model: str = Field(min_length=1, description="Model name the runtime serves (also clients' base model).")
    model_source: str | None = Field(
        default=None,
        description="What vLLM loads (a path or a Hugging Face id); defaults to `model`. Ignored by NIM.",
    )
    runtime: Runtime = Field(description="Inference runtime: vllm or nim.")
    image: str = Field(min_length=1, description="Inference runtime image.")
    runtime_version: str | None = Field(
        default=None,
        pattern=RUNTIME_VERSION,
        description="Which runtime version the image runs, e.g. 0.11.0, when its tag does not say (latest, a "
        "digest); adapters are checked against what that version loads. Defaults to the version in a vLLM "
        "image's tag, else the newest vLLM loraplex knows.",
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(
        default=None, description="Pull policy of the runtime image."
    )
    image_pull_secrets: list[str] | None = Field(default=None, description="Secrets used to pull images.")
    replicas: int = Field(default=1, ge=0, le=1000, description="Inference pods.")
    port: int = Field(default=8000, ge=1, le=65535, description="OpenAI-compatible HTTP port.")
    gpus: GpuSpec = nested(GpuSpec, "GPUs per replica.")
    resources: ComputeResources | None = Field(default=None, description="Other inference resources.")
    node_selector: dict[str, str] | None = Field(default=None, description="Pod node selector.")
    tolerations: list[dict[str, Any]] | None = Field(default=None, description="Pod tolerations.")
    affinity: dict[str, Any] | None = Field(default=None, description="Pod affinity (a Kubernetes Affinity).")
    env: list[EnvVar] | None = Field(default=None, description="Extra environment of the runtime.")
    env_from_secrets: list[str] | None = Field(
        default=None, description="Secrets exposed whole as runtime environment, e.g. one holding NGC_API_KEY."
    )
    runtime_args: list[str] | None = Field(default=None, description="Extra runtime arguments (vLLM).")
    shm_size: str = Field(default="16Gi", pattern=QUANTITY, description="Size of /dev/shm.")
    peft_source: PeftSourceSpec = nested(PeftSourceSpec, "PEFT source volume shared by runtime and sidecar.")
    cache: CacheVolumeSpec | None = Field(default=None, description="Model cache volume.")
    lora: LoraLimits = nested(LoraLimits, "LoRA limits, enforced by the operator and the sidecar.")
    storage: StorageSpec | None = Field(default=None, description="Adapter storage access.")
    sidecar: SidecarSpec = nested(SidecarSpec, "loraplex sidecar settings.")
    routing: RoutingSpec | None = Field(
        default=None, description="Adapter-aware routing (an InferencePool and its endpoint picker); off when unset.")


class TrafficTarget(Model):
    adapter: str = Field(description="The LoraAdapter.")
    served_name: str = Field(description="The name requests are rewritten to.")
    weight: int = Field(description="Its relative share of the requests.")


class WithheldTarget(Model):
    adapter: str = Field(description="The LoraAdapter.")
    reason: str = Field(description="Why it gets no requests for the model now.")


class ModelTraffic(Model):
    """How requests for one model name are shared among the adapters whose spec.traffic names it."""

    model: str = Field(description="The model name clients request.")
    targets: list[TrafficTarget] | None = Field(default=None, description="The adapters that get its requests.")
    withheld: list[WithheldTarget] | None = Field(
        default=None, description="Adapters that name it but get none of its requests now, and why.")
    problem: str | None = Field(default=None, description="Why no request for it is rewritten at all.")


class BaseModelDeploymentStatus(Model):
    observed_generation: int | None = Field(default=None, description="Generation last reconciled.")
    replicas: int | None = Field(default=None, description="Pods of the current Deployment.")
    ready_replicas: int | None = Field(default=None, description="Pods ready to serve.")
    adapters: int | None = Field(default=None, description="Adapters that target this base model.")
    adapters_ready: int | None = Field(default=None, description="Adapters Ready on every replica.")
    endpoint: str | None = Field(default=None, description="OpenAI-compatible endpoint (Service DNS).")
    conditions: list[Condition] | None = Field(default=None, description="Observations of the state.")
    traffic: list[ModelTraffic] | None = Field(
        default=None, description="Model names shared among adapters (their spec.traffic), by routing.")


# ---------------------------------------------------------------------------------------------
# LoraAdapter


MAX_REPLICAS_RULE = "spec.maxReplicas needs spec.replicas (the fewest replicas) and must be at least it"


class TrafficSpec(Model):
    model: str = Field(
        pattern=SERVED_NAME, max_length=MAX_SERVED_NAME,
        description="A model name clients request that this adapter serves a share of: the endpoint picker rewrites "
                    "it to this adapter's served name for weight parts of its requests. The adapters naming the "
                    "same model share it while they serve; one that fails or is not loaded anywhere gets none. "
                    "Needs spec.routing on the base model.")
    weight: int = Field(default=1, ge=1, le=1_000_000, description="This adapter's relative share of the requests.")


class LoraAdapterSpec(Model):
    base_model: str = Field(pattern=DNS_LABEL, description="BaseModelDeployment (same namespace) to serve on.")
    served_name: str | None = Field(
        default=None,
        pattern=SERVED_NAME,
        max_length=MAX_SERVED_NAME,
        description="Model name clients request; defaults to metadata.name.",
    )
    source: str = Field(
        pattern=SOURCE_URI,
        description="Where the adapter is: s3://, gs://, https://, hf://org/repo@revision or file:// URI.",
    )
    format: AdapterFormat = Field(default=AdapterFormat.AUTO, description="auto, hf, nemo, trtllm or nxd.")
    expected_rank: int | None = Field(
        default=None, ge=1, le=MAX_LORA_RANK, description="Rank the adapter must have, if known."
    )
    sha256: str | None = Field(
        default=None, pattern=r"^[a-f0-9]{64}$", description="SHA-256 of the single adapter file or archive."
    )
    replicas: int | None = Field(
        default=None, ge=1, le=1000,
        description="How many of the base model's replicas hold this adapter; every replica when unset. With "
                    "maxReplicas, the fewest.",
    )
    max_replicas: int | None = Field(
        default=None, ge=1, le=1000,
        description="The most replicas the operator may grow this adapter to while its requests queue on every "
                    "replica holding it; it shrinks back towards replicas when they go idle.",
    )
    traffic: TrafficSpec | None = Field(
        default=None, description="Serve a share of another model name's requests (canaries, versions).")

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        {"rule": "!has(self.maxReplicas) || (has(self.replicas) && self.maxReplicas >= self.replicas)",
         "message": MAX_REPLICAS_RULE}]})

    @model_validator(mode="after")
    def _replica_range(self) -> LoraAdapterSpec:
        if self.max_replicas is not None and (self.replicas is None or self.max_replicas < self.replicas):
            raise ValueError(MAX_REPLICAS_RULE)
        return self


class DemandLevel(enum.StrEnum):
    """What one replica sees of an adapter's requests (sidecar/demand.py says how it is read)."""

    IDLE = "Idle"
    SERVING = "Serving"
    QUEUED = "Queued"


class ReplicaState(enum.StrEnum):
    PENDING = "Pending"
    DOWNLOADING = "Downloading"
    VALIDATING = "Validating"
    LOADED = "Loaded"
    FAILED = "Failed"
    UNLOADING = "Unloading"


class FailureReason(enum.StrEnum):
    """Why a replica could not serve an adapter; decides which condition turns False."""

    VALIDATION_FAILED = "ValidationFailed"
    CHECKSUM_MISMATCH = "ChecksumMismatch"
    SOURCE_NOT_FOUND = "SourceNotFound"
    ACCESS_DENIED = "AccessDenied"
    DOWNLOAD_FAILED = "DownloadFailed"
    DISK_FULL = "DiskFull"
    LOAD_FAILED = "LoadFailed"
    RUNTIME_UNAVAILABLE = "RuntimeUnavailable"


class ReplicaAdapterStatus(Model):
    """One replica's view of one adapter: written by that replica's sidecar into its LoraReplica, and copied
    by the operator into the LoraAdapter's status.replicaStatus."""

    state: ReplicaState = Field(description="Pending, Downloading, Validating, Loaded, Failed or Unloading.")
    reason: str | None = Field(default=None, description="CamelCase reason when Failed.")
    message: str | None = Field(default=None, description="A sentence on the failure or progress.")
    observed_generation: int | None = Field(
        default=None, description="Adapter generation this replica acted on."
    )
    bytes_done: int | None = Field(default=None, ge=0, description="Bytes downloaded so far.")
    bytes_total: int | None = Field(default=None, ge=0, description="Total bytes to download.")
    format: AdapterFormat | None = Field(default=None, description="Format of the files the runtime reads.")
    converted_from: AdapterFormat | None = Field(
        default=None, description="Format the adapter came in, when loraplex converted it for the runtime.")
    rank: int | None = Field(default=None, description="Detected LoRA rank.")
    target_modules: list[str] | None = Field(default=None, description="Detected target modules.")
    size_bytes: int | None = Field(default=None, ge=0, description="Adapter size on disk.")
    demand: DemandLevel | None = Field(
        default=None, description="While Loaded, where the runtime publishes it: Idle, Serving or Queued.")
    updated: str | None = Field(default=None, description="When this entry was written (RFC 3339).")


class AdapterPhase(enum.StrEnum):
    PENDING = "Pending"
    LOADING = "Loading"
    READY = "Ready"
    FAILED = "Failed"
    TERMINATING = "Terminating"


class LoraAdapterStatus(Model):
    observed_generation: int | None = Field(default=None, description="Generation last reconciled.")
    phase: AdapterPhase | None = Field(default=None, description="Pending, Loading, Ready, Failed, Terminating.")
    served_name: str | None = Field(default=None, description="Model name clients request.")
    format: AdapterFormat | None = Field(default=None, description="Format of the files the runtime reads.")
    converted_from: AdapterFormat | None = Field(
        default=None, description="Format the adapter came in, when loraplex converted it for the runtime.")
    rank: int | None = Field(default=None, description="Detected LoRA rank.")
    target_modules: list[str] | None = Field(default=None, description="Detected target modules.")
    size_bytes: int | None = Field(default=None, description="Adapter size in bytes.")
    replicas: int | None = Field(default=None, description="Replicas of the base model.")
    wanted_replicas: int | None = Field(
        default=None, description="Replicas that should hold this adapter: spec.replicas, or within "
        "[spec.replicas, spec.maxReplicas] what its demand asks for; at most the running ones.")
    ready_replicas: int | None = Field(default=None, description="Replicas serving this adapter.")
    ready: str | None = Field(default=None, description="readyReplicas/wantedReplicas, for kubectl get.")
    placed_on: list[str] | None = Field(
        default=None, description="The pods the operator placed this adapter on, best-ranked first.")
    replica_status: dict[str, ReplicaAdapterStatus] | None = Field(
        default=None, description="Per-replica state keyed by pod name, as each pod's LoraReplica reports it."
    )
    conditions: list[Condition] | None = Field(default=None, description="Validated, Synced and Ready.")


# ---------------------------------------------------------------------------------------------
# LoraReplica: one per inference pod, written by that pod's sidecar only


class LoraReplicaSpec(Model):
    base_model: str = Field(pattern=DNS_LABEL, description="BaseModelDeployment (same namespace) the pod serves.")


class LoraReplicaStatus(Model):
    adapters: dict[str, ReplicaAdapterStatus] | None = Field(
        default=None, description="This pod's state of each adapter, keyed by LoraAdapter name.")
    loaded: int | None = Field(default=None, description="Adapters Loaded on this pod.")
    failed: int | None = Field(default=None, description="Adapters that Failed on this pod.")


# ---------------------------------------------------------------------------------------------
# Whole resources: what the CRDs describe.


class ResourceDefinition(BaseModel):
    """How one kind is published: names, printer columns, the spec and status models."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    kind: str
    plural: str
    singular: str
    short_names: list[str]
    description: str
    spec: type[Model]
    status: type[Model]
    printer_columns: list[dict[str, Any]]


BASE_MODEL_DEPLOYMENT = ResourceDefinition(
    kind="BaseModelDeployment",
    plural="basemodeldeployments",
    singular="basemodeldeployment",
    short_names=["bmd"],
    description=(
        "A base model served by a multi-LoRA inference runtime (vLLM or NIM) on GPUs, with the loraplex "
        "sidecar in every pod to sync and load the LoraAdapters that target it."
    ),
    spec=BaseModelDeploymentSpec,
    status=BaseModelDeploymentStatus,
    printer_columns=[
        {"name": "Runtime", "type": "string", "jsonPath": ".spec.runtime"},
        {"name": "Model", "type": "string", "jsonPath": ".spec.model"},
        {"name": "Replicas", "type": "integer", "jsonPath": ".spec.replicas"},
        {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"},
        {"name": "Adapters", "type": "integer", "jsonPath": ".status.adapters"},
        {"name": "Adapters-Ready", "type": "integer", "jsonPath": ".status.adaptersReady"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ],
)

LORA_ADAPTER = ResourceDefinition(
    kind="LoraAdapter",
    plural="loraadapters",
    singular="loraadapter",
    short_names=["lora"],
    description=(
        "A LoRA adapter served by name on a BaseModelDeployment: synced from its source into every "
        "replica it is placed on (all, or spec.replicas of them), validated, and loaded into the runtime."
    ),
    spec=LoraAdapterSpec,
    status=LoraAdapterStatus,
    printer_columns=[
        {"name": "Base-Model", "type": "string", "jsonPath": ".spec.baseModel"},
        {"name": "Served-Name", "type": "string", "jsonPath": ".status.servedName"},
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Ready", "type": "string", "jsonPath": ".status.ready"},
        {"name": "Replicas", "type": "integer", "jsonPath": ".status.replicas", "priority": 1},
        {"name": "Placed-On", "type": "string", "jsonPath": ".status.placedOn", "priority": 1},
        {"name": "Format", "type": "string", "jsonPath": ".status.format", "priority": 1},
        {"name": "Converted-From", "type": "string", "jsonPath": ".status.convertedFrom", "priority": 1},
        {"name": "Rank", "type": "integer", "jsonPath": ".status.rank", "priority": 1},
        {"name": "Source", "type": "string", "jsonPath": ".spec.source", "priority": 1},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ],
)

LORA_REPLICA = ResourceDefinition(
    kind="LoraReplica",
    plural="lorareplicas",
    singular="lorareplica",
    short_names=["lorarep"],
    description=(
        "What one inference pod holds: its sidecar's state of every adapter of its base model, named after the "
        "pod and deleted with it. The operator aggregates these reports into each LoraAdapter's status."
    ),
    spec=LoraReplicaSpec,
    status=LoraReplicaStatus,
    printer_columns=[
        {"name": "Base-Model", "type": "string", "jsonPath": ".spec.baseModel"},
        {"name": "Loaded", "type": "integer", "jsonPath": ".status.loaded"},
        {"name": "Failed", "type": "integer", "jsonPath": ".status.failed"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ],
)

RESOURCES = [BASE_MODEL_DEPLOYMENT, LORA_ADAPTER, LORA_REPLICA]
