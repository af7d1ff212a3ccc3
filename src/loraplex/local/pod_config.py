"""From a pod's manifest and the cluster, what each of its containers runs with: its command and environment
(values, fieldRefs, Secrets, ConfigMaps, container ports rewritten to host ports), its probes, and the
directories behind its volumes. Whatever is missing raises ConfigError, whose message the pod shows as
CreateContainerConfigError until it can start.
"""

from __future__ import annotations

import base64
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes
from kubernetes.client.rest import ApiException

from loraplex.local.containers import LocalContainer, Probe

# Commands a runtime image would provide, for the programs installed on this machine (`vllm serve`).
LAUNCHERS = Path(__file__).parent / "launchers"


class ConfigError(Exception):
    """What keeps a container from starting (a missing Secret, say): its waiting message."""


class PodConfig:
    def __init__(self, core: kubernetes.client.CoreV1Api, api_host: str, extra_env: dict[str, str],
                 restart_backoff_seconds: float):
        self.core, self.api_host, self.extra_env = core, api_host, extra_env
        self.restart_backoff_seconds = restart_backoff_seconds

    # ---- containers -----------------------------------------------------------------------------------------

    def container(self, manifest: dict[str, Any], container: dict[str, Any], volumes: dict[str, Path], root: Path,
                  ports: dict[int, int]) -> LocalContainer:
        """The process a container spec runs as, its pod's container ports mapped to host `ports`."""

        def port_of(port: int | str) -> int:
            if isinstance(port, str):
                port = next(p["containerPort"] for p in container.get("ports", []) if p.get("name") == port)
            return ports.get(int(port), int(port))

        rewrite = _PortRewriter(ports)
        env = {"PATH": f"{Path(sys.executable).parent}:{LAUNCHERS}:/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp",
               "LANG": "C.UTF-8", "HOSTNAME": manifest["metadata"]["name"], **self._service_environment(),
               **self.extra_env}
        for source in container.get("envFrom", []):
            env.update(self._env_from(manifest["metadata"]["namespace"], source))
        for item in container.get("env", []):
            env[item["name"]] = rewrite(self._env_value(manifest, item))
        argv = [rewrite(part) for part in [*container.get("command", []), *container.get("args", [])]]
        if not argv:
            raise ConfigError(f"container {container['name']} has no command: images are not run here, "
                              f"only commands")
        mounts = []
        for mount in container.get("volumeMounts", []):
            if mount["name"] not in volumes:
                raise ConfigError(f"volume {mount['name']} of container {container['name']} is not defined")
            source = volumes[mount["name"]] / mount.get("subPath", "")
            if mount.get("subPath") and not source.exists():
                source.mkdir(parents=True)
            mounts.append({"source": str(source), "target": mount["mountPath"],
                           "readOnly": bool(mount.get("readOnly"))})
        return LocalContainer(
            container["name"], container.get("image", ""), argv, env, mounts,
            root / f"{container['name']}.log",
            readiness=Probe.from_spec(container.get("readinessProbe"), port_of),
            liveness=Probe.from_spec(container.get("livenessProbe"), port_of),
            startup=Probe.from_spec(container.get("startupProbe"), port_of),
            initial_backoff=self.restart_backoff_seconds,
            termination_message_policy=container.get("terminationMessagePolicy", "File"))

    def _service_environment(self) -> dict[str, str]:
        """What in-cluster clients look for: the `kubernetes` Service, here the apiserver on loopback."""
        host, _, port = self.api_host.removeprefix("https://").partition(":")
        return {"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port or "443",
                "KUBERNETES_SERVICE_PORT_HTTPS": port or "443", "KUBERNETES_PORT": f"tcp://{host}:{port}"}

    # ---- environment -----------------------------------------------------------------------------------------

    def _secret(self, namespace: str, name: str, optional: bool) -> dict[str, str] | None:
        data = _read_data(lambda: self.core.read_namespaced_secret(name, namespace), "secret", name, optional)
        return None if data is None else {k: base64.b64decode(v).decode() for k, v in data.items()}

    def _config_map(self, namespace: str, name: str, optional: bool) -> dict[str, str] | None:
        return _read_data(lambda: self.core.read_namespaced_config_map(name, namespace), "configmap", name, optional)

    def _env_from(self, namespace: str, source: dict[str, Any]) -> dict[str, str]:
        prefix = source.get("prefix", "")
        if "secretRef" in source:
            ref = source["secretRef"]
            data = self._secret(namespace, ref["name"], bool(ref.get("optional")))
        elif "configMapRef" in source:
            ref = source["configMapRef"]
            data = self._config_map(namespace, ref["name"], bool(ref.get("optional")))
        else:
            data = None
        return {f"{prefix}{key}": value for key, value in (data or {}).items()}

    def _env_value(self, manifest: dict[str, Any], item: dict[str, Any]) -> str:
        if "valueFrom" not in item:
            return str(item.get("value", ""))
        source, namespace = item["valueFrom"], manifest["metadata"]["namespace"]
        if "fieldRef" in source:
            return field_value(manifest, source["fieldRef"]["fieldPath"])
        for kind, read in (("secretKeyRef", self._secret), ("configMapKeyRef", self._config_map)):
            if kind in source:
                ref = source[kind]
                data = read(namespace, ref["name"], bool(ref.get("optional")))
                if data is None or ref["key"] not in data:
                    if ref.get("optional"):
                        return ""
                    raise ConfigError(f"couldn't find key {ref['key']} in {kind[:-6]} {namespace}/{ref['name']}")
                return data[ref["key"]]
        return ""

    # ---- volumes ---------------------------------------------------------------------------------------------

    def volumes(self, manifest: dict[str, Any], root: Path) -> dict[str, Path]:
        """The directory behind each of the pod's volumes, by name; those the kubelet fills go under `root`."""
        namespace = manifest["metadata"]["namespace"]
        paths = {}
        for volume in manifest["spec"].get("volumes", []):
            path = root / "volumes" / volume["name"]
            if "persistentVolumeClaim" in volume:
                path = self._claimed_path(namespace, volume["persistentVolumeClaim"]["claimName"])
            elif "hostPath" in volume:
                path = Path(volume["hostPath"]["path"])
            elif "configMap" in volume or "secret" in volume:
                path.mkdir(parents=True, exist_ok=True)
                self._write_keys(namespace, volume, path)
            elif "projected" in volume:
                path.mkdir(parents=True, exist_ok=True)
                for source in volume["projected"].get("sources", []):
                    self._project(manifest, source, path)
            else:  # emptyDir, and anything else a directory can stand in for
                path.mkdir(parents=True, exist_ok=True)
            paths[volume["name"]] = path
        return paths

    def _claimed_path(self, namespace: str, claim_name: str) -> Path:
        """The directory behind a claim: its bound PersistentVolume's hostPath or local path."""
        try:
            claim = self.core.read_namespaced_persistent_volume_claim(claim_name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                raise ConfigError(f'persistentvolumeclaim "{claim_name}" not found') from None
            raise
        if not claim.spec.volume_name:
            raise ConfigError(f'persistentvolumeclaim "{claim_name}" is not bound')
        volume = self.core.read_persistent_volume(claim.spec.volume_name)
        source = volume.spec.host_path or volume.spec.local
        if source is None:
            raise ConfigError(f"persistentvolume {claim.spec.volume_name} is neither hostPath nor local")
        return Path(source.path)

    def _write_keys(self, namespace: str, volume: dict[str, Any], path: Path) -> None:
        if "configMap" in volume:
            ref = volume["configMap"]
            data = self._config_map(namespace, ref["name"], bool(ref.get("optional")))
        else:
            ref = volume["secret"]
            data = self._secret(namespace, ref["secretName"], bool(ref.get("optional")))
        _write_items(path, data or {}, ref.get("items"))

    def _project(self, manifest: dict[str, Any], source: dict[str, Any], path: Path) -> None:
        meta, namespace = manifest["metadata"], manifest["metadata"]["namespace"]
        if "serviceAccountToken" in source:
            token = source["serviceAccountToken"]
            request = {"spec": {"audiences": [token["audience"]] if token.get("audience") else None,
                                "expirationSeconds": int(token.get("expirationSeconds", 3607)),
                                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"],
                                                   "uid": meta["uid"]}}}
            response = self.core.create_namespaced_service_account_token(
                manifest["spec"].get("serviceAccountName", "default"), namespace, request)
            (path / token["path"]).write_text(response.status.token)
        elif "configMap" in source:
            ref = source["configMap"]
            _write_items(path, self._config_map(namespace, ref["name"], bool(ref.get("optional"))) or {},
                         ref.get("items"))
        elif "secret" in source:
            ref = source["secret"]
            _write_items(path, self._secret(namespace, ref["name"], bool(ref.get("optional"))) or {},
                         ref.get("items"))
        elif "downwardAPI" in source:
            for item in source["downwardAPI"].get("items", []):
                if "fieldRef" in item:
                    (path / item["path"]).write_text(field_value(manifest, item["fieldRef"]["fieldPath"]))


def field_value(manifest: dict[str, Any], path: str) -> str:
    """A fieldRef's value, as the downward API gives it."""
    meta, spec = manifest["metadata"], manifest["spec"]
    simple = {"metadata.name": meta["name"], "metadata.namespace": meta["namespace"], "metadata.uid": meta["uid"],
              "spec.nodeName": spec.get("nodeName", ""), "spec.serviceAccountName": spec.get("serviceAccountName", ""),
              "status.podIP": "127.0.0.1", "status.hostIP": "127.0.0.1"}
    if path in simple:
        return str(simple[path])
    for prefix, values in (("metadata.labels", meta.get("labels") or {}),
                           ("metadata.annotations", meta.get("annotations") or {})):
        if path.startswith(f"{prefix}['") and path.endswith("']"):
            return str(values.get(path[len(prefix) + 2:-2], ""))
    raise ConfigError(f"fieldPath {path} is not supported by the local kubelet")


def _read_data(read: Callable[[], Any], kind: str, name: str, optional: bool) -> dict[str, str] | None:
    """The data of a Secret or ConfigMap; None if it is missing and optional."""
    try:
        return dict(read().data or {})
    except ApiException as exc:
        if exc.status == 404 and optional:
            return None
        if exc.status == 404:
            raise ConfigError(f'{kind} "{name}" not found') from None
        raise


def _write_items(path: Path, data: dict[str, str], items: list[dict[str, Any]] | None) -> None:
    chosen = {item["key"]: item["path"] for item in items} if items else {key: key for key in data}
    for key, relative in chosen.items():
        if key in data:
            target = path / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(data[key])


class _PortRewriter:
    """Container ports in a value, as the host sees them (pods share the host's loopback here)."""

    def __init__(self, ports: dict[int, int]):
        self.ports = ports

    def __call__(self, value: str) -> str:
        if value.isdigit() and int(value) in self.ports:
            return str(self.ports[int(value)])
        for container_port, host_port in self.ports.items():
            for host in ("127.0.0.1", "localhost", "0.0.0.0"):
                value = value.replace(f"{host}:{container_port}", f"127.0.0.1:{host_port}")
        return value
