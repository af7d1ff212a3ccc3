"""The loraplex sidecar: runs beside the inference runtime in every base-model pod.

It watches its base model's adapter set (the ConfigMap the operator renders), syncs adapters into the
PEFT source volume, validates them, has the runtime load them and reports their state into its pod's
LoraReplica. Entry point: `loraplex sidecar`.
"""
