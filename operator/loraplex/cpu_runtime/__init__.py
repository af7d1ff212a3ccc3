"""A small OpenAI-compatible multi-LoRA server for CPUs, built on transformers + peft.

It speaks the API loraplex drives on vLLM (/v1/models, /v1/completions, /v1/chat/completions,
/health, /v1/load_lora_adapter, /v1/unload_lora_adapter with vLLM's status codes and error bodies), so
it stands in for vLLM on machines without GPUs: the demo, CI, and CPU-only dev clusters. It is not a
production server: no paged attention, no continuous batching, no streaming, no quantization, and it
is as slow as a CPU is. Requests that arrive together are answered in one forward pass per prompt
length, each row through its own adapter (peft's mixed-adapter batches).
"""
