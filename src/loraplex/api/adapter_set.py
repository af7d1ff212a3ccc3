"""The desired adapter set: what the operator tells every sidecar of a base model to serve.

The operator writes it into one ConfigMap per BaseModelDeployment; sidecars watch that object, so a
change reaches every replica within a watch round-trip and never restarts a pod. It also carries the
placement: each pod's slot, and for each adapter not on every replica the slots that hold it.
"""

from __future__ import annotations

import json

from pydantic import Field

from loraplex.api.runtime_capabilities import capabilities, deployed_version
from loraplex.api.types import AdapterFormat, BaseModelDeploymentSpec, Model, Runtime

DATA_KEY = "adapters.json"


class DesiredAdapter(Model):
    name: str = Field(description="LoraAdapter metadata.name, where the sidecar reports status.")
    uid: str
    generation: int = Field(description="The LoraAdapter generation at which what replicas load last changed (its "
                                        "served name, source, format, expected rank or checksum). Other edits, "
                                        "such as replicas or traffic, keep it, so they reload nothing.")
    served_name: str
    source: str
    format: AdapterFormat = AdapterFormat.AUTO
    expected_rank: int | None = None
    sha256: str | None = None
    slots: list[int] | None = Field(default=None, description="The replica slots that hold it; None: every one.")
    follows_demand: bool | None = Field(
        default=None, description="True when its replica count follows demand: its holders report their level.")

    def assigned_to(self, slot: int | None) -> bool:
        """Whether the pod holding `slot` (None: a pod the operator has not given one yet) should serve it."""
        return self.slots is None or (slot is not None and slot in self.slots)


class AdapterLimits(Model):
    max_rank: int
    allowed_formats: list[AdapterFormat]
    allowed_target_modules: list[str] | None = None

    @classmethod
    def of(cls, spec: BaseModelDeploymentSpec) -> AdapterLimits:
        """The base model's limits: the user's allowed formats narrowed to what its runtime loads or loraplex
        converts for it."""
        loadable = capabilities(spec.runtime, deployed_version(spec.runtime, spec.image, spec.runtime_version)
                                ).accepted_formats
        allowed = [f for f in spec.lora.allowed_formats or sorted(loadable) if f in loadable]
        return cls(max_rank=spec.lora.max_rank, allowed_formats=allowed,
                   allowed_target_modules=spec.lora.allowed_target_modules)


class AdapterSet(Model):
    base_model: str
    runtime: Runtime
    limits: AdapterLimits
    adapters: list[DesiredAdapter]
    # Kept here so that an operator restart gives every pod the slot, and so the adapters, it had.
    replica_slots: dict[str, int] | None = Field(default=None, description="Pod name -> its replica slot.")

    def assigned_to(self, pod: str) -> list[DesiredAdapter]:
        """The adapters the sidecar of `pod` should hold."""
        slot = (self.replica_slots or {}).get(pod)
        return [adapter for adapter in self.adapters if adapter.assigned_to(slot)]

    def to_configmap_data(self) -> dict[str, str]:
        return {DATA_KEY: json.dumps(self.to_wire(), sort_keys=True, separators=(",", ":"))}

    @classmethod
    def from_configmap_data(cls, data: dict[str, str]) -> AdapterSet:
        if DATA_KEY not in data:
            raise ValueError(f"ConfigMap has no {DATA_KEY} key")
        return cls.model_validate_json(data[DATA_KEY])
