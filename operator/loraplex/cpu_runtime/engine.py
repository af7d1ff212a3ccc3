"""The model side of the CPU runtime: one base model, many resident adapters, mixed-adapter batches."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


class AdapterError(Exception):
    def __init__(self, status: int, kind: str, message: str):
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


@dataclasses.dataclass
class Generation:
    prompt: str
    adapter: str | None
    max_tokens: int
    temperature: float = 0.0


class Engine:
    def __init__(self, model_path: str, max_adapters: int = 16, seed: int = 0):
        torch.manual_seed(seed)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        self.base.eval()
        self.model: Any = self.base
        self.max_adapters = max_adapters
        self.adapters: dict[str, str] = {}
        self._lock = threading.Lock()  # torch work and adapter changes, one at a time

    def load(self, name: str, path: str) -> None:
        from peft import PeftModel

        with self._lock:
            if name in self.adapters:
                raise AdapterError(400, "InvalidUserInput", f"The lora adapter '{name}' has already been loaded.")
            if not (Path(path) / "adapter_config.json").is_file():
                raise AdapterError(404, "NotFoundError", f"No adapter found for {path}")
            if len(self.adapters) >= self.max_adapters:
                raise AdapterError(400, "BadRequestError", f"cannot load '{name}': {self.max_adapters} adapters are "
                                                           "already resident (--max-cpu-loras)")
            try:
                if not self.adapters:
                    self.model = PeftModel.from_pretrained(self.base, path, adapter_name=name)
                else:
                    self.model.load_adapter(path, adapter_name=name)
            except Exception as exc:  # peft's own words: shape mismatches, unknown modules...
                raise AdapterError(400, "BadRequestError", f"could not load '{name}': {exc}") from None
            self.model.eval()
            self.adapters[name] = path

    def unload(self, name: str) -> None:
        with self._lock:
            if name not in self.adapters:
                raise AdapterError(404, "NotFoundError", f"The lora adapter '{name}' cannot be found.")
            del self.adapters[name]
            if self.adapters:
                self.model.delete_adapter(name)
            else:
                self.model = self.model.unload()  # back to the plain base model
                self.base = self.model

    def generate(self, requests: list[Generation]) -> list[str]:
        """Greedy (or sampled) completions; rows of one prompt length share a forward pass."""
        with self._lock:
            for request in requests:
                if request.adapter is not None and request.adapter not in self.adapters:
                    raise AdapterError(404, "NotFoundError", f"The model `{request.adapter}` does not exist.")
            encoded = [self.tokenizer(r.prompt, return_tensors="pt")["input_ids"][0] for r in requests]
            results: list[str] = [""] * len(requests)
            by_length: dict[int, list[int]] = {}
            for index, ids in enumerate(encoded):
                by_length.setdefault(len(ids), []).append(index)
            for indices in by_length.values():
                batch = torch.stack([encoded[i] for i in indices])
                wanted = max(requests[i].max_tokens for i in indices)
                temperature = max(requests[i].temperature for i in indices)
                options: dict[str, Any] = {"max_new_tokens": wanted, "do_sample": temperature > 0,
                                           "pad_token_id": self.tokenizer.pad_token_id or self.tokenizer.eos_token_id}
                if temperature > 0:
                    options["temperature"] = temperature
                if self.adapters:
                    options["adapter_names"] = [requests[i].adapter or BASE for i in indices]
                with torch.no_grad():
                    output = self.model.generate(input_ids=batch, attention_mask=torch.ones_like(batch), **options)
                for row, index in enumerate(indices):
                    new_tokens = output[row, batch.shape[1]:batch.shape[1] + requests[index].max_tokens]
                    results[index] = self.tokenizer.decode(new_tokens, skip_special_tokens=True)
            return results

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "".join(f"{m.get('role', 'user')}: {m.get('content', '')}\n" for m in messages) + "assistant:"
