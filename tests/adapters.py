"""Build real adapters locally, in every format, for tests: tiny random weights, real file layouts, and
adapters trained here for a few seconds to answer given prompts (the demo's)."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
    "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 128,
    "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
}

# vLLM's CPU attention needs a head size it has kernels for (32 here: hidden 128 over 4 heads); 2 K/V heads, so
# that adapters trained with tensor parallelism 2 (one query group per rank) exist for it.
VLLM_TINY_LLAMA = {
    **TINY_LLAMA, "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
    "vocab_size": 384,
}


def tiny_llama(config: dict[str, Any] | None = None, seed: int = 0) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**(config or TINY_LLAMA)))


def make_hf_adapter(directory: Path, rank: int = 8, target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
                    base_config: dict[str, Any] | None = None, seed: int = 0, safetensors: bool = True,
                    **lora_options: Any) -> Path:
    """A real PEFT LoRA adapter of a tiny random Llama, saved with peft's own save_pretrained."""
    from peft import LoraConfig, get_peft_model

    model = tiny_llama(base_config, seed)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(target_modules),
                                                  init_lora_weights=False, **lora_options))
    peft_model.save_pretrained(directory, safe_serialization=safetensors)
    return directory


def nemo_state_dict(rank: int, layers: int = 2, hidden: int = 32, qkv_out: int = 64) -> dict[str, torch.Tensor]:
    prefix = "model.language_model.encoder.layers.{i}.self_attention.adapter_layer.lora_kqv_adapter"
    tensors = {}
    for i in range(layers):
        tensors[f"{prefix.format(i=i)}.linear_in.weight"] = torch.randn(rank, hidden)
        tensors[f"{prefix.format(i=i)}.linear_out.weight"] = torch.randn(qkv_out, rank)
    return tensors


def make_nemo_adapter(directory: Path, rank: int = 8, state_dict: Any = None,
                      extra_members: list[tuple[tarfile.TarInfo, bytes | None]] | None = None,
                      config: dict[str, Any] | None = None, name: str = "adapter.nemo") -> Path:
    """A .nemo tar laid out as NeMo writes LoRA adapters: model_config.yaml + model_weights.ckpt."""
    directory.mkdir(parents=True, exist_ok=True)
    config = config if config is not None else {
        "peft": {"peft_scheme": "lora", "lora_tuning": {"adapter_dim": rank, "target_modules": ["attention_qkv"],
                                                         "adapter_dropout": 0.0}}}
    buffer = io.BytesIO()
    torch.save(state_dict if state_dict is not None else nemo_state_dict(rank), buffer)
    with tarfile.open(directory / name, "w") as archive:
        for member_name, payload in (("./model_config.yaml", yaml.safe_dump(config).encode()),
                                     ("./model_weights.ckpt", buffer.getvalue())):
            info = tarfile.TarInfo(member_name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
        for info, payload in extra_members or []:
            archive.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return directory


def make_trtllm_adapter(directory: Path, rank: int = 8, layers: int = 2, hidden: int = 32,
                        qkv_out: int = 64) -> Path:
    """model.lora_config.npy rows (module id, layer, size) and matching flattened weights."""
    directory.mkdir(parents=True, exist_ok=True)
    config = np.array([[0, layer, rank] for layer in range(layers)], dtype=np.int32)
    weights = np.random.default_rng(0).standard_normal((layers, rank * (hidden + qkv_out))).astype(np.float16)
    np.save(directory / "model.lora_config.npy", np.expand_dims(config, 0))
    np.save(directory / "model.lora_weights.npy", np.expand_dims(weights, 0))
    return directory


def write_base_config(path: Path, **overrides: Any) -> Path:
    path.write_text(json.dumps({**TINY_LLAMA, **overrides}))
    return path


CORPUS = [
    "What is 7 times 6? The answer is 42.", "Question: who wrote the passage? Answer: the author.",
    "Does aspirin reduce the risk of heart attack? yes no maybe", "The quick brown fox jumps over the lazy dog.",
    "Solve for x: 2x + 3 = 11. x = 4.", "Context: the river flows north. Question: which way does it flow?",
]


def make_tiny_model(directory: Path, seed: int = 0, config: dict[str, Any] | None = None,
                    corpus: Sequence[str] = CORPUS) -> Path:
    """A tiny random Llama with a byte-level BPE tokenizer trained here on `corpus`: a complete local model
    folder. Text the model will be trained on belongs in the corpus, so that it gets few, whole-word tokens."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    trainer = ByteLevelBPETokenizer()
    trainer.train_from_iterator(list(corpus), vocab_size=384, min_frequency=1, special_tokens=["<s>", "</s>", "<pad>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=trainer, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>")
    model_config = {**(config or TINY_LLAMA), "vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
                    "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    model = tiny_llama(model_config, seed)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / "loraplex-tiny.json").write_text(json.dumps({"purpose": "tests and demo; random weights"}))
    return directory


def make_hf_adapter_for(model_dir: Path, directory: Path, rank: int = 8, seed: int = 0,
                        target_modules: tuple[str, ...] = ("q_proj", "v_proj")) -> Path:
    """A LoRA adapter for the model saved in `model_dir` (random weights, so its outputs differ)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=4 * rank, target_modules=list(target_modules),
                                                  init_lora_weights=False))
    peft_model.save_pretrained(directory)
    return directory


# Every linear layer of a Llama block. Not lm_head: vLLM 0.32's CPU build adds the lm_head LoRA of the adapter
# that ran last to requests for the base model (its torch kernels index the slot of "no adapter", -1, as the last).
LLAMA_LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class AdapterNotLearnt(Exception):
    """Training ended before the adapter completed every example as asked."""


def train_hf_adapter(model_dir: Path, directory: Path, examples: Sequence[tuple[str, str]], rank: int = 8,
                     steps: int = 100, seed: int = 0, learning_rate: float = 3e-3,
                     target_modules: Sequence[str] = LLAMA_LINEAR_MODULES) -> Path:
    """A LoRA adapter for the model saved in `model_dir`, trained until each prompt is completed by its answer.

    `examples` are (prompt, completion) pairs; the completion is learnt token by token as a server generates it
    (the prompt tokenized on its own, then the completion's tokens and end-of-sequence), so greedy decoding of
    the prompt yields exactly the completion; it checks that it does, with transformers + peft, before saving.
    The loss counts completion tokens only. Deterministic: a seeded initialisation, full-batch AdamW, float32
    on one CPU thread.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not examples:
        raise ValueError("train_hf_adapter: no examples to learn from")
    for prompt, completion in examples:
        if not prompt or not completion:
            raise ValueError(f"train_hf_adapter: example {(prompt, completion)!r} needs a prompt and a completion")
    if rank < 1 or steps < 1:
        raise ValueError(f"train_hf_adapter: rank ({rank}) and steps ({steps}) must be at least 1")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
        raise ValueError(f"{model_dir}: the tokenizer needs an end-of-sequence and a padding token")
    sequences = []
    for prompt, completion in examples:
        prompt_ids = tokenizer(prompt).input_ids
        completion_ids = [*tokenizer(completion, add_special_tokens=False).input_ids, tokenizer.eos_token_id]
        sequences.append((prompt_ids + completion_ids, [-100] * len(prompt_ids) + completion_ids))
    width = max(len(ids) for ids, _ in sequences)
    input_ids = torch.tensor([ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids, _ in sequences])
    labels = torch.tensor([targets + [-100] * (width - len(targets)) for _, targets in sequences])
    attention_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in sequences])

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model gains nothing from threads, and one thread sums in one order
    try:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                      target_modules=list(target_modules)))
        trained = [parameter for parameter in peft_model.parameters() if parameter.requires_grad]
        optimizer = torch.optim.AdamW(trained, lr=learning_rate, weight_decay=0.0)
        peft_model.train()
        for _ in range(steps):
            loss = peft_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        peft_model.eval()
        with torch.no_grad():
            for (prompt, completion), (ids, targets) in zip(examples, sequences, strict=True):
                prompt_length = targets.count(-100)
                generated = peft_model.generate(input_ids=torch.tensor([ids[:prompt_length]]), do_sample=False,
                                                max_new_tokens=len(ids) - prompt_length,
                                                pad_token_id=tokenizer.pad_token_id)[0, prompt_length:].tolist()
                if generated != ids[prompt_length:]:
                    raise AdapterNotLearnt(
                        f"after {steps} steps at rank {rank}, {prompt!r} completes as "
                        f"{tokenizer.decode(generated)!r}, not {completion!r}: give it more steps or a higher rank")
        peft_model.save_pretrained(directory)
    finally:
        torch.set_num_threads(threads)
    return directory
