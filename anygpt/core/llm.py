"""The language model: any Hugging Face causal LM and its tokenizer, with LoRA through peft.

Presets: ``tiny-llama`` (a randomly initialised two-layer Llama with a byte-level tokenizer, built locally and
deterministic for a seed) and ``vicuna-7b-v1.5`` (``lmsys/vicuna-7b-v1.5`` from a local folder or the Hugging Face
cache).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from anygpt.base.errors import ConfigError
from anygpt.base.modality import Modality
from anygpt.base.utils import resolve_dtype, resolve_local_model
from anygpt.core.conversation import get_template
from anygpt.core.runtime import RuntimeOptions, llm_quantization_config

logger = logging.getLogger(__name__)

TINY = "tiny"


@dataclass
class LoraSettings:
    """LoRA on the LLM (peft). Defaults follow NExT-GPT's stage 3: r 32, alpha 32, dropout 0.1 on q/k/v/o.

    Attributes:
        adapters: None for one adapter (named ``"default"``), or per-modality adapters named after the output
            modality each serves, e.g. ``["text", "image", "video", "audio"]``: all share these settings; stage 3
            trains each on the examples that output its modality, and the pipeline selects or combines them at run
            time (see ``anygpt.core.lora``).
    """

    r: int = 32
    alpha: int = 32
    dropout: float = 0.1
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    adapters: list[str] | None = None

    def __post_init__(self):
        if self.adapters is not None:
            if isinstance(self.adapters, str) or not self.adapters:
                raise ValueError(
                    f"lora.adapters must be null (one adapter) or a non-empty list of modality names, got "
                    f"{self.adapters!r}"
                )
            names = []
            for name in self.adapters:
                try:
                    names.append(Modality.parse(name).value)
                except ValueError as err:
                    raise ValueError(f"lora.adapters: {err} (an adapter is named after its output modality)") from None
            if len(set(names)) != len(names):
                raise ValueError(f"lora.adapters: names must be unique, got {names}")
            self.adapters = names
        if self.r <= 0:
            raise ValueError(f"lora.r must be positive, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("lora.target_modules must name at least one module")
        self.target_modules = list(self.target_modules)

    def to_peft(self):
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            task_type="CAUSAL_LM",
        )


SIZE_LIMITS = {
    "seed": 2**63 - 1, "hidden_size": 65536, "num_layers": 1024, "num_heads": 1024, "intermediate_size": 262144,
    "max_position_embeddings": 2**20,
}  # fmt: skip
"""The upper ends of ``LanguageModelConfig``'s integer fields, checked before anything is built (each from 1, the
seed from 0): wide enough for any real LLM's sizes (Llama 3 405B: 16384, 126, 128, 53248, 131072)."""
MAX_BUILT_PARAMETERS = 10**10
"""The largest random (``"tiny"``) LLM built locally: beyond it the allocation alone would take tens of GB."""


@dataclass
class LanguageModelConfig:
    """Which causal LM to use and how.

    Args:
        source: ``"tiny"`` (random tiny Llama built locally), a Hugging Face model id, or a local folder.
        torch_dtype: weights dtype when loading a real model.
        seed: initialisation seed of the tiny model.
        hidden_size, num_layers, num_heads, intermediate_size, max_position_embeddings: tiny model sizes.
        template: chat template name (see ``anygpt.core.conversation.TEMPLATES``).
        lora: LoRA settings, or None for no adapter.
    """

    source: str = TINY
    torch_dtype: str = "float32"
    seed: int = 0
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 128
    max_position_embeddings: int = 2048
    template: str = "vicuna_v1"
    lora: LoraSettings | None = field(default_factory=LoraSettings)

    def __post_init__(self):
        if isinstance(self.lora, dict):
            self.lora = LoraSettings(**self.lora)
        resolve_dtype(self.torch_dtype)
        get_template(self.template)
        for name, high in SIZE_LIMITS.items():
            value = getattr(self, name)
            low = 0 if name == "seed" else 1
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                big = isinstance(value, int) and value.bit_length() > 64  # repr of a huge int is slow, or refused
                shown = f"an integer of {value.bit_length()} bits" if big else repr(value)[:40]
                raise ValueError(f"llm.{name} must be an integer in [{low}, {high}], got {shown}")
        if self.source == TINY and (params := self.built_parameters()) > MAX_BUILT_PARAMETERS:
            raise ValueError(
                f"llm: a locally built ({TINY!r}) LLM of hidden_size {self.hidden_size}, num_layers {self.num_layers} "
                f"and intermediate_size {self.intermediate_size} has about {params / 1e9:.1f} billion parameters, "
                f"over the {MAX_BUILT_PARAMETERS / 1e9:.0f} billion a random model is built with; "
                "load a real model from llm.source instead"
            )
        if self.source == TINY and self.hidden_size % self.num_heads:
            raise ValueError(f"llm.hidden_size {self.hidden_size} is not divisible by llm.num_heads {self.num_heads}")

    def built_parameters(self) -> int:
        """About how many parameters the locally built model of these sizes has (attention and MLP weights)."""
        return self.num_layers * (4 * self.hidden_size**2 + 3 * self.hidden_size * self.intermediate_size)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LanguageModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"llm config: unknown keys {sorted(unknown)}; valid keys are {sorted(known)}")
        return cls(**data)


LLM_PRESETS: dict[str, dict] = {
    "tiny-llama": {"source": TINY, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
    "vicuna-7b-v1.5": {"source": "lmsys/vicuna-7b-v1.5", "torch_dtype": "float16"},
}


def llm_config_from_preset(name: str) -> LanguageModelConfig:
    if name not in LLM_PRESETS:
        raise ValueError(f"unknown LLM preset {name!r}: expected one of {', '.join(sorted(LLM_PRESETS))}")
    return LanguageModelConfig(**LLM_PRESETS[name])


def build_byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens + ``<unk> <s> </s> <pad>``): any text round-trips, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {s: i for i, s in enumerate(["<unk>", "<s>", "</s>", "<pad>"])}
    for _, char in sorted(bytes_to_unicode().items()):
        vocab[char] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def _build_tiny(config: LanguageModelConfig, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    llama_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=config.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = LlamaForCausalLM(llama_config)
    return model


# HAND-WRITTEN CONFIGS of released LLMs (their config.json on the hub, transcribed), used only to build them on the
# meta device for sizes and memory estimates when their files are not on this machine (anygpt.core.memory) and for
# random-weight benchmarks. Loading a real model always reads its own config.json.
KNOWN_ARCHITECTURES: dict[str, dict] = {
    # Vicuna-7B v1.5 (Llama-2-7B): 6.74 B parameters
    "lmsys/vicuna-7b-v1.5": {
        "model_type": "llama",
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    },
}
KNOWN_ARCHITECTURES["lmsys/vicuna-7b-v0"] = {  # NExT-GPT's base (LLaMA-1 7B + the v0 delta): 2048 positions
    **KNOWN_ARCHITECTURES["lmsys/vicuna-7b-v1.5"],
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
}


def architecture_config(source: str, *, layers: int | None = None):
    """The transformers config of a real LLM: its folder's ``config.json`` when the model is on this machine,
    otherwise :data:`KNOWN_ARCHITECTURES`. Nothing is downloaded.

    Args:
        source: a hub id or a local folder.
        layers: build at most this many decoder layers (same widths), for CPU benchmarks.

    Raises:
        ConfigError: neither on this machine nor a known architecture.
    """
    from transformers import AutoConfig, LlamaConfig

    try:
        config = AutoConfig.from_pretrained(resolve_local_model(source, what="language model"))
    except FileNotFoundError:
        if source not in KNOWN_ARCHITECTURES:
            raise ConfigError(
                f"language model {source!r} is not on this machine and its architecture is not one of "
                f"{', '.join(sorted(KNOWN_ARCHITECTURES))}: download it (or its config.json) to size it"
            ) from None
        values = dict(KNOWN_ARCHITECTURES[source])
        values.pop("model_type")
        config = LlamaConfig(**values)
    if layers is not None:
        config.num_hidden_layers = max(1, min(int(layers), config.num_hidden_layers))
    return config


def build_stand_in_tokenizer(vocab_size: int):
    """A word-level tokenizer of ``vocab_size`` entries (``<unk> <s> </s>`` first): stands in for a real LLM's
    tokenizer when only its size matters (meta builds, random-weight benchmarks), so that added tokens get the ids they
    get with the real one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i in range(len(vocab), vocab_size):
        vocab[f"tok{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>"
    )


def _check_tokenizer_backend(folder: str | os.PathLike) -> None:
    """A folder with only a SentencePiece ``tokenizer.model`` (LLaMA, Vicuna) needs ``sentencepiece``; say so rather
    than let transformers' converter report a misleading missing package."""
    folder = Path(folder)
    if (folder / "tokenizer.model").is_file() and not (folder / "tokenizer.json").is_file():
        if importlib.util.find_spec("sentencepiece") is None:
            raise ConfigError(
                f"{folder}: the tokenizer is a SentencePiece model (tokenizer.model) and needs the sentencepiece "
                "package: pip install sentencepiece (anygpt's dependencies include it)"
            )


def _load_tokenizer(folder: str | os.PathLike):
    from transformers import AutoTokenizer

    _check_tokenizer_backend(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder, use_fast=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def build_language_model(
    config: LanguageModelConfig,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    runtime: RuntimeOptions | None = None,
    empty_weights: bool = False,
):
    """Build (model, tokenizer) without LoRA. LoRA and added tokens are applied by ``AnyGPTModel``.

    Args:
        config: the language-model config.
        tokenizer_dir: a folder holding a saved tokenizer to use instead of the source's own
            (``save_pretrained`` writes the tokenizer with its added tokens).
        runtime: the dtype (``runtime.dtype``, else ``config.torch_dtype``) and quantization to load with. A quantized
            LLM is loaded with ``device_map`` onto ``runtime.device`` (never moved afterwards); a tiny LLM is saved
            and loaded back through the same ``from_pretrained`` path. Without quantization and with no offload, a real
            LLM is loaded straight onto ``runtime.device``.
        empty_weights: build the architecture on the meta device without reading weights (sizes only): a real
            model's ``config.json`` if it is on this machine, else :data:`KNOWN_ARCHITECTURES`; its tokenizer if
            present, else :func:`build_stand_in_tokenizer` of its vocabulary size.

    Raises:
        FileNotFoundError: a real model that is neither a local folder nor in the Hugging Face cache.
        ConfigError: a SentencePiece tokenizer without the sentencepiece package; an unknown architecture to size.
    """
    from transformers import AutoTokenizer

    runtime = runtime or RuntimeOptions()
    dtype = runtime.torch_dtype or resolve_dtype(config.torch_dtype)
    if empty_weights:
        return _build_empty(config, tokenizer_dir, dtype)
    if config.source == TINY:
        tokenizer = (
            AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir is not None else build_byte_tokenizer()
        )
        base_tokenizer = build_byte_tokenizer()
        model = _build_tiny(config, base_tokenizer)
        logger.info("built tiny Llama LLM (hidden %d, %d layers)", config.hidden_size, config.num_layers)
        if runtime.quantize is None:
            return model.to(dtype), tokenizer
        with tempfile.TemporaryDirectory(prefix="anygpt-llm-") as folder:
            model.save_pretrained(folder)  # quantized through from_pretrained, exactly as a real model
            return _from_pretrained(folder, dtype, runtime), tokenizer

    path = resolve_local_model(config.source, what="language model")
    tokenizer = _load_tokenizer(tokenizer_dir or path)
    logger.info("loading language model from %s (%s)", path, runtime.describe())
    return _from_pretrained(path, dtype, runtime), tokenizer


def _from_pretrained(path: str | os.PathLike, dtype: torch.dtype, runtime: RuntimeOptions):
    from transformers import AutoModelForCausalLM

    kwargs = {}
    quantization = llm_quantization_config(runtime, dtype)
    if quantization is not None:
        kwargs = {"quantization_config": quantization, "device_map": {"": str(runtime.execution_device)}}
    elif runtime.device is not None and runtime.offload == "none":
        kwargs = {"device_map": {"": str(runtime.execution_device)}}
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)


def _build_empty(config: LanguageModelConfig, tokenizer_dir: str | os.PathLike | None, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if config.source == TINY:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir else build_byte_tokenizer()
        with torch.device("meta"):
            return _build_tiny(config, build_byte_tokenizer()).to(dtype), tokenizer
    arch = architecture_config(config.source)
    tokenizer = None
    with contextlib.suppress(FileNotFoundError):
        tokenizer = _load_tokenizer(tokenizer_dir or resolve_local_model(config.source, what="language model"))
    if tokenizer is None:
        tokenizer = build_stand_in_tokenizer(arch.vocab_size)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(arch, dtype=dtype)
    return model, tokenizer


def tokenizer_dir_of(folder: str | os.PathLike) -> Path:
    return Path(folder) / "tokenizer"
