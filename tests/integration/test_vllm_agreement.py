"""`loraplex validate --runtime vllm` against real vLLM (the CPU build of 0.32, from `make vllm`): for every
adapter of a corpus built here, the validator accepts exactly what vLLM loads and serves, except adapters
made for another base model, which vLLM serves silently with wrong output and loraplex must refuse."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.adapters import VLLM_TINY_LLAMA, make_hf_adapter
from tests.vllm_server import MAX_LORA_RANK as MAX_RANK
from tests.vllm_server import VllmServer

# The session's vLLM (tests/integration/conftest.py) takes a minute or more to start on 2 cores, inside the
# fixtures of the first test that asks for it.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


# ---- the corpus: each builder writes one adapter folder ----------------------------------------------------

def rewrite_config(directory: Path, **changes: Any) -> Path:
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
    return directory


def rename_tensors(directory: Path, rename: Callable[[str], str]) -> Path:
    """Rewrite the safetensors header's names only (the data is untouched)."""
    path = directory / "adapter_model.safetensors"
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    renamed = {(key if key == "__metadata__" else rename(key)): value for key, value in header.items()}
    encoded = json.dumps(renamed).encode()
    encoded += b" " * ((8 - len(encoded) % 8) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + length:])
    return directory


def fused_qkv(directory: Path) -> Path:
    """An adapter whose keys name vLLM's fused qkv_proj, as some exporters write them."""
    make_hf_adapter(directory, target_modules=("q_proj",), base_config=VLLM_TINY_LLAMA)
    rewrite_config(directory, target_modules=["qkv_proj"])
    return rename_tensors(directory, lambda key: key.replace("q_proj", "qkv_proj"))


def other_base(**config: Any) -> Callable[[Path], Path]:
    return lambda directory: make_hf_adapter(directory, base_config={**VLLM_TINY_LLAMA, **config})


def truncated(directory: Path) -> Path:
    make_hf_adapter(directory, base_config=VLLM_TINY_LLAMA)
    path = directory / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    return directory


def plain(**options: Any) -> Callable[[Path], Path]:
    def build(directory: Path) -> Path:
        return make_hf_adapter(directory, base_config=VLLM_TINY_LLAMA, **options)
    return build


def with_config(builder: Callable[[Path], Path], **changes: Any) -> Callable[[Path], Path]:
    return lambda directory: rewrite_config(builder(directory), **changes)


def narrow_lora_b(directory: Path, module: str, rank: int) -> Path:
    """lora_B of `module` cut to fewer rank columns than its lora_A has rows."""
    from safetensors.torch import load_file, save_file

    path = directory / "adapter_model.safetensors"
    tensors = load_file(path)
    for key in [k for k in tensors if f"{module}.lora_B" in k]:
        tensors[key] = tensors[key][:, :rank].contiguous()
    save_file(tensors, path)
    return directory


def no_weights(directory: Path) -> Path:
    make_hf_adapter(directory, base_config=VLLM_TINY_LLAMA)
    (directory / "adapter_model.safetensors").unlink()
    return directory


ALL_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# name -> (builder, the reason loraplex must give for an adapter vLLM serves silently with wrong output)
CORPUS: dict[str, tuple[Callable[[Path], Path], str | None]] = {
    "plain-r8": (plain(), None),
    "every-projection": (plain(target_modules=ALL_MODULES), None),
    "rank-at-the-limit": (plain(rank=MAX_RANK), None),
    "rank-above-the-limit": (plain(rank=2 * MAX_RANK), None),
    "rslora": (plain(use_rslora=True), None),
    "rank-pattern": (plain(target_modules=("q_proj", "v_proj"), rank_pattern={"v_proj": 4}), None),
    "rank-pattern-above-the-limit": (plain(rank_pattern={"v_proj": 2 * MAX_RANK}), None),
    "lm-head-and-embeddings": (plain(target_modules=("q_proj", "lm_head", "embed_tokens")), None),
    "dora": (plain(use_dora=True), None),
    "bias-all": (plain(bias="all"), None),
    "lora-bias": (plain(lora_bias=True), None),
    "modules-to-save": (plain(modules_to_save=["lm_head"]), None),
    "init-pissa": (with_config(plain(), init_lora_weights="pissa"), None),
    "init-olora": (with_config(plain(), init_lora_weights="olora"), None),
    "init-gaussian": (with_config(plain(), init_lora_weights="gaussian"), None),
    "layer-replication": (with_config(plain(), layer_replication=[[0, 2], [1, 2]]), None),
    "fused-qkv": (fused_qkv, None),
    "unknown-module": (lambda d: rename_tensors(plain()(d), lambda k: k.replace("q_proj", "foo_proj")), None),
    "truncated-weights": (truncated, None),
    "no-weights-file": (no_weights, None),
    "hidden-64-on-128": (other_base(hidden_size=64, intermediate_size=128), "trained for another base model"),
    "three-layers-on-two": (other_base(num_hidden_layers=3), "trained for another base model"),
    "rank-a-differs-from-b": (lambda d: narrow_lora_b(plain(rank=8)(d), "q_proj", 4), "lora_B rank 4"),
}


def loraplex_verdict(directory: Path, base_config: Path) -> dict[str, Any]:
    result = subprocess.run([sys.executable, "-m", "loraplex.cli", "validate", str(directory), "--runtime", "vllm",
                             "--runtime-version", "0.32.0", "--max-rank", str(MAX_RANK), "--base-config",
                             str(base_config), "--json"], capture_output=True, text=True, timeout=120)
    assert result.returncode in (0, 1), result.stderr
    return dict(json.loads(result.stdout))


def vllm_verdict(server: VllmServer, name: str, directory: Path) -> tuple[bool, str]:
    """Loaded and served (one completion) by real vLLM, or its words for why not."""
    status, text = server.post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(directory)})
    if status != 200:
        return False, f"{status} {text}"
    status, text = server.post("/v1/completions", {"model": name, "prompt": "What is 7 times 6?", "max_tokens": 4,
                                                   "temperature": 0})
    server.post("/v1/unload_lora_adapter", {"lora_name": name})
    return status == 200, f"{status} {text[:300]}"


@pytest.mark.parametrize("case", list(CORPUS))
def test_validator_and_real_vllm_agree(case: str, real_vllm: VllmServer, vllm_model_dir: Path, tmp_path: Path):
    builder, silent_wrong_output_reason = CORPUS[case]
    directory = builder(tmp_path / case)
    verdict = loraplex_verdict(directory, vllm_model_dir / "config.json")
    served, words = vllm_verdict(real_vllm, case, directory)
    assert real_vllm.healthy(), "the vLLM engine died:\n" + real_vllm.log_tail(3000)
    if silent_wrong_output_reason is not None:
        assert served, f"vLLM was expected to serve {case} silently, but: {words}"
        assert not verdict["accepted"], f"loraplex accepted {case}, which vLLM serves with wrong output"
        assert silent_wrong_output_reason in verdict["reason"], verdict["reason"]
    else:
        assert verdict["accepted"] == served, (
            f"{case}: loraplex {'accepted' if verdict['accepted'] else 'rejected: ' + str(verdict['reason'])}; "
            f"vLLM {'served it' if served else 'refused: ' + words}")
    shutil.rmtree(directory, ignore_errors=True)
