"""The loraplex sidecar: runs beside the inference runtime in every base-model pod.

It watches its base model's adapter set (the ConfigMap the operator renders), syncs adapters into the
PEFT source volume, validates them, has the runtime load them and reports per-replica state into each
LoraAdapter's status.replicaStatus. Entry point: `loraplex sidecar`.
"""
