"""loraplex: serve many LoRA adapters on shared base-model deployments in Kubernetes."""

__version__ = "0.1.0"
