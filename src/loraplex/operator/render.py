"""Pure rendering: a BaseModelDeployment's spec in, the Kubernetes objects it owns out.

Nothing here talks to the API. The pod template depends only on the BaseModelDeployment spec, so
adapter changes (which live in the adapter-set ConfigMap) never roll the pods.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loraplex.api.adapter_set import DATA_KEY, AdapterLimits, AdapterSet, DesiredAdapter
from loraplex.api.contract import (
    ADAPTERS_SUBPATH,
    BASE_CONFIG_DIR,
    BASE_CONFIG_FILE,
    SIDECAR_PORT,
    SIDECAR_VOLUME_DIR,
    SidecarSettings,
    downward_api_env,
    parse_quantity,
)
from loraplex.api.runtime_capabilities import capabilities, deployed_version
from loraplex.api.types import (
    GROUP,
    LORA_REPLICA,
    AdapterFormat,
    BaseModelDeploymentSpec,
    ComputeResources,
    EmptyDirVolume,
    Runtime,
)
from loraplex.operator.naming import ChildNames, common_labels, object_metadata, selector_labels
from loraplex.operator.runtimes import profile_for
from loraplex.operator.settings import OperatorSettings

PEFT_VOLUME, CACHE_VOLUME, SHM_VOLUME = "peft-source", "model-cache", "dshm"
STORE_VOLUME, SIDECAR_TMP_VOLUME, BASE_CONFIG_VOLUME = "adapter-store", "sidecar-tmp", "base-model-config"


DEFAULT_PEFT_SIZE = "20Gi"


class RenderError(ValueError):
    """The spec cannot be turned into a working deployment; the message says why."""


def _resources(resources: ComputeResources | None, gpus: dict[str, str] | None = None) -> dict[str, Any]:
    rendered: dict[str, Any] = {}
    requests = dict(resources.requests or {}) if resources else {}
    limits = dict(resources.limits or {}) if resources else {}
    if gpus:
        limits.update(gpus)
        requests.update(gpus)
    if requests:
        rendered["requests"] = requests
    if limits:
        rendered["limits"] = limits
    return rendered


def _volume(name: str, empty_dir: EmptyDirVolume | None, claim: Any, default_size: str | None) -> dict[str, Any]:
    if claim is not None:
        return {"name": name, "persistentVolumeClaim": {"claimName": claim.claim_name}}
    source: dict[str, Any] = {}
    if empty_dir is not None:
        if empty_dir.medium:
            source["medium"] = empty_dir.medium
        source["sizeLimit"] = empty_dir.size_limit
    elif default_size:
        source["sizeLimit"] = default_size
    return {"name": name, "emptyDir": source}


def _restricted_security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def sidecar_settings(name: str, spec: BaseModelDeploymentSpec) -> SidecarSettings:
    """What the sidecar of a BaseModelDeployment's pods is told, less what each pod fills in itself."""
    peft, storage, s3 = spec.peft_source, spec.storage, spec.storage.s3 if spec.storage else None
    store = storage.adapter_store if storage else None
    return SidecarSettings(
        base_model=name, adapter_set=ChildNames(name).adapter_set, runtime=spec.runtime,
        # Without a version the sidecar judges adapters as the newest runtime loraplex knows would.
        runtime_version=deployed_version(spec.runtime, spec.image, spec.runtime_version),
        runtime_url=f"http://127.0.0.1:{spec.port}", served_model=spec.model, peft_dir=peft.mount_path,
        volume_dir=Path(SIDECAR_VOLUME_DIR), nim_refresh_seconds=spec.lora.refresh_interval_seconds,
        max_concurrent_downloads=spec.sidecar.max_concurrent_downloads, log_level=spec.sidecar.log_level,
        http_port=SIDECAR_PORT,
        # Stay under the emptyDir's sizeLimit ourselves: exceeding it gets the whole pod evicted.
        volume_limit=peft_volume_limit(spec),
        s3_endpoint=s3.endpoint or None if s3 else None, s3_region=s3.region or None if s3 else None,
        s3_force_path_style=s3.force_path_style if s3 else None,
        store_root=Path(store.mount_path) if store else None,
        base_config=Path(BASE_CONFIG_DIR, BASE_CONFIG_FILE) if spec.lora.base_model_config_map else None,
        log_format="json",
    )


def render_sidecar_container(name: str, spec: BaseModelDeploymentSpec, settings: OperatorSettings
                             ) -> dict[str, Any]:
    sidecar = spec.sidecar
    env: list[dict[str, Any]] = [*downward_api_env(), *sidecar_settings(name, spec).to_env()]
    mounts = [
        {"name": PEFT_VOLUME, "mountPath": SIDECAR_VOLUME_DIR},
        {"name": SIDECAR_TMP_VOLUME, "mountPath": "/tmp"},
    ]
    env_from = []
    storage = spec.storage
    if storage is not None:
        if storage.credentials_secret:
            env_from.append({"secretRef": {"name": storage.credentials_secret}})
        if storage.adapter_store is not None:
            mounts.append({"name": STORE_VOLUME, "mountPath": storage.adapter_store.mount_path, "readOnly": True})
    if spec.lora.base_model_config_map:
        mounts.append({"name": BASE_CONFIG_VOLUME, "mountPath": BASE_CONFIG_DIR, "readOnly": True})
    container: dict[str, Any] = {
        "name": "loraplex-sidecar",
        "image": sidecar.image or settings.sidecar_image,
        "imagePullPolicy": sidecar.image_pull_policy or settings.sidecar_image_pull_policy,
        "command": ["loraplex", "sidecar"],
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "env": env,
        "ports": [{"name": "sidecar-http", "containerPort": SIDECAR_PORT, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "sidecar-http"}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "sidecar-http"}, "periodSeconds": 15,
                          "failureThreshold": 4},
        "resources": _resources(sidecar.resources) or {
            "requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
        "securityContext": _restricted_security_context(),
        "volumeMounts": mounts,
    }
    if env_from:
        container["envFrom"] = env_from
    return container


def spec_problems(spec: BaseModelDeploymentSpec) -> list[str]:
    """What makes a spec unrunnable beyond what the CRD schema can say, one sentence each."""
    profile = profile_for(spec.runtime)
    problems = list(profile.problems(spec))
    runtime = capabilities(spec.runtime, deployed_version(spec.runtime, spec.image, spec.runtime_version))
    unloadable = [f.value for f in spec.lora.allowed_formats or []
                  if f != AdapterFormat.AUTO and f not in runtime.accepted_formats]
    if unloadable:
        # NIM's generations differ in what they load: say which one refuses.
        which = f" ({runtime.name})" if spec.runtime == Runtime.NIM else ""
        problems.append(f"lora.allowedFormats {', '.join(unloadable)} cannot be loaded by runtime "
                        f"{spec.runtime.value}{which}, nor converted for it")
    for field, volume in (("peftSource", spec.peft_source), ("cache", spec.cache)):
        if volume is not None and volume.empty_dir is not None and volume.persistent_volume_claim is not None:
            problems.append(f"{field} sets both emptyDir and persistentVolumeClaim; choose one")
    if (budget := spec.lora.bytes_per_replica) is not None:
        volume_limit = peft_volume_limit(spec)
        if parse_quantity(budget) <= 0:
            problems.append(f"lora.bytesPerReplica {budget} leaves no room for any adapter")
        elif volume_limit is not None and parse_quantity(budget) > parse_quantity(volume_limit):
            problems.append(f"lora.bytesPerReplica {budget} exceeds the PEFT volume's emptyDir sizeLimit "
                            f"{volume_limit}: the adapters placed on a replica would not fit on its disk")
    return problems


def peft_volume_limit(spec: BaseModelDeploymentSpec) -> str | None:
    """The size limit of the PEFT volume, None on a PersistentVolumeClaim (whose size the pod cannot see)."""
    peft = spec.peft_source
    if peft.persistent_volume_claim is not None:
        return None
    return peft.empty_dir.size_limit if peft.empty_dir else DEFAULT_PEFT_SIZE


def render_deployment(owner: dict[str, Any], spec: BaseModelDeploymentSpec, settings: OperatorSettings
                      ) -> dict[str, Any]:
    name = owner["metadata"]["name"]
    names = ChildNames(name)
    profile = profile_for(spec.runtime)
    problems = spec_problems(spec)
    if problems:
        raise RenderError("; ".join(problems))

    inference = profile.container(spec)
    inference["env"] = inference["env"] + [e.to_wire() for e in spec.env or []]
    if spec.env_from_secrets:
        inference["envFrom"] = [{"secretRef": {"name": secret}} for secret in spec.env_from_secrets]
    if spec.image_pull_policy:
        inference["imagePullPolicy"] = spec.image_pull_policy
    gpus = {spec.gpus.resource_name: str(spec.gpus.count)} if spec.gpus.count else None
    resources = _resources(spec.resources, gpus)
    if resources:
        inference["resources"] = resources
    # A runtime that dies at start-up (a bad flag, a model it cannot load) says why in its log's last lines;
    # the pod status then carries them, and the base model's Ready condition quotes them.
    inference["terminationMessagePolicy"] = "FallbackToLogsOnError"
    inference["volumeMounts"] = [
        {"name": PEFT_VOLUME, "mountPath": spec.peft_source.mount_path, "subPath": ADAPTERS_SUBPATH,
         "readOnly": True},
        {"name": CACHE_VOLUME, "mountPath": profile.cache_mount_path},
        {"name": SHM_VOLUME, "mountPath": "/dev/shm"},
    ]

    peft, cache = spec.peft_source, spec.cache
    volumes = [
        _volume(PEFT_VOLUME, peft.empty_dir, peft.persistent_volume_claim, default_size=DEFAULT_PEFT_SIZE),
        _volume(CACHE_VOLUME, cache.empty_dir if cache else None,
                cache.persistent_volume_claim if cache else None, default_size=None),
        {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": spec.shm_size}},
        {"name": SIDECAR_TMP_VOLUME, "emptyDir": {"sizeLimit": "1Gi"}},
    ]
    if spec.lora.base_model_config_map:
        volumes.append({"name": BASE_CONFIG_VOLUME, "configMap": {
            "name": spec.lora.base_model_config_map, "items": [{"key": BASE_CONFIG_FILE, "path": BASE_CONFIG_FILE}]}})
    if spec.storage is not None and spec.storage.adapter_store is not None:
        volumes.append({"name": STORE_VOLUME, "persistentVolumeClaim": {
            "claimName": spec.storage.adapter_store.claim_name, "readOnly": True}})

    pod_spec: dict[str, Any] = {
        "serviceAccountName": names.service_account,
        # The sidecar writes adapters that the runtime (often non-root) must read: share a group.
        "securityContext": {"fsGroup": 1000, "fsGroupChangePolicy": "OnRootMismatch"},
        "containers": [inference, render_sidecar_container(name, spec, settings)],
        "volumes": volumes,
    }
    if spec.node_selector:
        pod_spec["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod_spec["tolerations"] = list(spec.tolerations)
    if spec.affinity:
        pod_spec["affinity"] = dict(spec.affinity)
    if spec.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": secret} for secret in spec.image_pull_secrets]

    pod_labels = {**common_labels(name), "app.kubernetes.io/component": "inference"}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": object_metadata(owner, names.deployment, "inference"),
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": selector_labels(name)},
            # GPUs are scarce: never ask for more than the replica count while rolling.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
            "template": {"metadata": {"labels": pod_labels}, "spec": pod_spec},
        },
    }


def render_service(owner: dict[str, Any], spec: BaseModelDeploymentSpec) -> dict[str, Any]:
    name = owner["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": object_metadata(owner, ChildNames(name).service, "inference"),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(name),
            "ports": [
                {"name": "http", "port": spec.port, "targetPort": "http", "protocol": "TCP"},
                {"name": "sidecar-http", "port": SIDECAR_PORT, "targetPort": "sidecar-http", "protocol": "TCP"},
            ],
        },
    }


def render_service_account(owner: dict[str, Any], spec: BaseModelDeploymentSpec) -> dict[str, Any]:
    name = owner["metadata"]["name"]
    metadata = object_metadata(owner, ChildNames(name).service_account, "sidecar")
    if spec.storage is not None and spec.storage.service_account_annotations:
        metadata["annotations"] = dict(spec.storage.service_account_annotations)
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": metadata}


def render_sidecar_role(owner: dict[str, Any]) -> dict[str, Any]:
    """Least privilege: read its own adapter set, and create and report in its own pod's LoraReplica. Nothing else."""
    names = ChildNames(owner["metadata"]["name"])
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": object_metadata(owner, names.sidecar_role, "sidecar"),
        "rules": [
            {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": [names.adapter_set],
             "verbs": ["get", "list", "watch"]},
            # Its own LoraReplica: created when missing, watched by name, its status patched. A pod's name is
            # known only once it exists, so the rules cannot name it.
            {"apiGroups": [GROUP], "resources": [LORA_REPLICA.plural], "verbs": ["get", "list", "watch", "create"]},
            {"apiGroups": [GROUP], "resources": [f"{LORA_REPLICA.plural}/status"], "verbs": ["get", "patch"]},
        ],
    }


def render_sidecar_role_binding(owner: dict[str, Any]) -> dict[str, Any]:
    names = ChildNames(owner["metadata"]["name"])
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": object_metadata(owner, names.sidecar_role, "sidecar"),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": names.sidecar_role},
        "subjects": [{"kind": "ServiceAccount", "name": names.service_account,
                      "namespace": owner["metadata"]["namespace"]}],
    }


def render_adapter_set(owner: dict[str, Any], spec: BaseModelDeploymentSpec,
                       adapters: list[DesiredAdapter], replica_slots: dict[str, int] | None = None
                       ) -> dict[str, Any]:
    name = owner["metadata"]["name"]
    adapter_set = AdapterSet(
        base_model=name, runtime=spec.runtime, limits=AdapterLimits.of(spec),
        adapters=sorted(adapters, key=lambda a: a.served_name), replica_slots=replica_slots or None,
    )
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": object_metadata(owner, ChildNames(name).adapter_set, "adapter-set"),
        "data": adapter_set.to_configmap_data(),
    }


def fit_adapter_set(owner: dict[str, Any], spec: BaseModelDeploymentSpec, adapters: list[DesiredAdapter],
                    max_bytes: int, replica_slots: dict[str, int] | None = None
                    ) -> tuple[list[DesiredAdapter], list[DesiredAdapter]]:
    """Split `adapters` (in priority order) into the longest prefix whose adapter set fits in `max_bytes`
    of ConfigMap data, and the rest."""
    used = len(render_adapter_set(owner, spec, [], replica_slots)["data"][DATA_KEY])
    for index, adapter in enumerate(adapters):
        used += len(json.dumps(adapter.to_wire(), sort_keys=True, separators=(",", ":"))) + (1 if index else 0)
        if used > max_bytes:
            return adapters[:index], adapters[index:]
    return adapters, []


def render_children(owner: dict[str, Any], spec: BaseModelDeploymentSpec, settings: OperatorSettings
                    ) -> list[dict[str, Any]]:
    """Everything a BaseModelDeployment owns except its adapter set, in creation order."""
    return [
        render_service_account(owner, spec),
        render_sidecar_role(owner),
        render_sidecar_role_binding(owner),
        render_service(owner, spec),
        render_deployment(owner, spec, settings),
    ]
