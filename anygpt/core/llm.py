"""The language model: any Hugging Face causal LM and its tokenizer, with LoRA through peft.

Presets: ``tiny-llama`` (a randomly initialised two-layer Llama with a byte-level tokenizer, built locally and
deterministic for a seed) and ``vicuna-7b-v1.5`` (``lmsys/vicuna-7b-v1.5`` from a local folder or the Hugging Face
cache).
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from anygpt.base.modality import Modality
from anygpt.base.utils import resolve_dtype, resolve_local_model
from anygpt.core.conversation import get_template

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
        if self.source == TINY and self.hidden_size % self.num_heads:
            raise ValueError(f"llm.hidden_size {self.hidden_size} is not divisible by llm.num_heads {self.num_heads}")

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


def build_language_model(config: LanguageModelConfig, *, tokenizer_dir: str | os.PathLike | None = None):
    """Build (model, tokenizer) without LoRA. LoRA and added tokens are applied by ``AnyGPTModel``.

    Args:
        config: the language-model config.
        tokenizer_dir: a folder holding a saved tokenizer to use instead of the source's own
            (``save_pretrained`` writes the tokenizer with its added tokens).

    Raises:
        FileNotFoundError: a real model that is neither a local folder nor in the Hugging Face cache.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if config.source == TINY:
        tokenizer = (
            AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir is not None else build_byte_tokenizer()
        )
        base_tokenizer = build_byte_tokenizer()
        model = _build_tiny(config, base_tokenizer)
        logger.info("built tiny Llama LLM (hidden %d, %d layers)", config.hidden_size, config.num_layers)
        return model, tokenizer

    path = resolve_local_model(config.source, what="language model")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or path, use_fast=True)
    logger.info("loading language model from %s", path)
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=resolve_dtype(config.torch_dtype))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return model, tokenizer


def tokenizer_dir_of(folder: str | os.PathLike) -> Path:
    return Path(folder) / "tokenizer"
