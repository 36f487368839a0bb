"""``anygpt convert nextgpt``: NExT-GPT's released checkpoint as an anygpt model folder.

NExT-GPT's only released weights (``ChocoWu/nextgpt_7b_tiva_v0``, for its legacy code) are a folder holding
``pytorch_model.pt`` (a pickled dict of fp16 tensors: the LoRA matrices, the whole embedding and LM-head tables,
``llama_proj`` and three ``TextFcLayer`` output projectors), the tokenizer files and the LLaMA ``config.json``. The
frozen parts are not in it: the base LLM (Vicuna-7B v0) comes from ``--llm``, the encoder and the decoders from
``--components`` (a preset or a model folder; ``nextgpt-7b`` by default). The result is a ``save_pretrained`` folder
that ``AnyGPTPipeline.from_pretrained`` and every command load.

What goes where:

- ``llama_model.base_model.model.model.embed_tokens.weight`` and ``llama_model.base_model.model.lm_head.weight``
  (stage 1/2 checkpoints: ``llama_model.model.embed_tokens.weight``, ``llama_model.lm_head.weight``): every row, into
  ``token_embeddings.safetensors`` (NExT-GPT trained all of them, not only the added ones).
- ``llama_model.base_model.model.model.layers.{i}.self_attn.{q,k,v,o}_proj.lora_{A,B}[.default].weight``: the peft
  adapter in ``lora/`` (alpha 32 as NExT-GPT's stage 3; the rank is read from the shapes).
- ``llama_proj.{weight,bias}``: the linear input projector of every input modality (it is shared).
- ``gen_text_hidden_fcs{,_video,_audio}.0.{fc,tfm,model,query_embs}``: the transformer output projector of image,
  video and audio (``in_fc``, ``transformer``, ``out_fc``, ``queries``): the same function, ``TextFcLayer``'s
  ``model(tfm(fc(hidden + embeds), query_embs))``; audio's one query is the (B, 512) vector AudioLDM takes.

Tokens and prompt, as the released model was trained:

- ids: the base vocabulary (32,000 for Vicuna v0), then NExT-GPT's 38 tokens in its order, ``<Img>`` ``</Img>``
  ``[IMG0..3]`` ``[VID0..23]`` ``[AUD0..7]``, then anygpt's three media placeholders (input-only, never generated;
  their rows are zero).
- Its ``added_tokens.json`` names the first two ``{'<Img>'}`` and ``{'</Img>'}``: transformers 4.29 turned the Python
  set passed to ``add_tokens`` into that string (NExT-GPT fixed it in November 2023, after the release). So when the
  released model was trained, ``<Img>`` and ``</Img>`` in its prompts were plain text (SentencePiece pieces), and
  rows 32000 and 32001 were never an input. The converted tokenizer keeps the names its files give, and the
  ``nextgpt_v0`` template writes ``<Img>`` / ``</Img>`` as text around every media item: with the released files
  the prompt tokenises as in its training (the later legacy code feeds ids 32000/32001 instead, rows it never read).
- prompt: ``<s>### Human: <Img>{media}</Img> {text}\\n### Assistant:`` (template ``nextgpt_v0``); each media item is
  one LLM token.
- signal tokens: their last-layer hidden states at the positions where they are the input, as in its training (its
  inference code reads one position earlier).

Anything that does not fit (another base vocabulary, e.g. a Llama-2 base or an early 32,042-row checkpoint, NExT-GPT
issue #47; a missing, unexpected or misshapen key; a base LLM whose config differs from the checkpoint's
``config.json``) is one ``CheckpointError`` naming the key, the expected and the found shape; nothing is written.
The checkpoint is read with ``torch.load(weights_only=True)``: a file holding other Python objects is refused.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import pickle
import re
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

from anygpt.base.errors import CheckpointError, ConfigError, UsageError
from anygpt.base.modality import MEDIA_MODALITIES, Modality
from anygpt.base.utils import atomic_directory, file_sha256, resolve_local_model
from anygpt.core.config import AnyGPTConfig, ProjectorConfig
from anygpt.core.index import INDEX_FILE, write_index
from anygpt.core.llm import TINY, LanguageModelConfig, LoraSettings, tokenizer_dir_of
from anygpt.core.lora import ADAPTER_WEIGHTS_FILE
from anygpt.core.model import TOKEN_ROWS_FILE
from anygpt.core.pipeline import find_model
from anygpt.core.tokens import SignalTokenConfig, add_modality_tokens, signal_token_strings
from decoders import build_decoder
from encoders import ImageBindEncoder
from projectors import build_input_projector, build_output_projector

logger = logging.getLogger(__name__)

COMMANDS = {"convert": "import a foreign checkpoint (NExT-GPT's released model) into a save_pretrained folder"}

CHECKPOINT_FILE = "pytorch_model.pt"
CONVERSION_FILE = "conversion.json"  # where the folder came from (file, sha256, base LLM, components)
TEMPLATE = "nextgpt_v0"

# NExT-GPT's stage-3 LoRA (config/stage_3.yaml); alpha is not in the checkpoint, the rank is (the shapes).
LORA_ALPHA = 32
LORA_DROPOUT = 0.1
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]

SIGNAL_COUNTS = {"image": 4, "video": 24, "audio": 8}
IMG_OPEN, IMG_CLOSE = "{'<Img>'}", "{'</Img>'}"  # as the released added_tokens.json writes them
ADDED_TOKENS = [
    IMG_OPEN,
    IMG_CLOSE,
    *(s for name, n in SIGNAL_COUNTS.items() for s in signal_token_strings(Modality(name), n)),
]
SAME_TOKEN = {IMG_OPEN: "<Img>", IMG_CLOSE: "</Img>"}  # the names a checkpoint saved after NExT-GPT's fix has

TABLES = {  # ours -> (stage-3 name, stage-1/2 name)
    "input_embeddings": (
        "llama_model.base_model.model.model.embed_tokens.weight",
        "llama_model.model.embed_tokens.weight",
    ),
    "output_embeddings": ("llama_model.base_model.model.lm_head.weight", "llama_model.lm_head.weight"),
}
LORA_KEY = re.compile(r"llama_model\.(base_model\.model\..+\.lora_[AB])(\.default)?\.weight")
INPUT_PROJECTOR = "llama_proj"
OUTPUT_PROJECTORS = {
    Modality.IMAGE: "gen_text_hidden_fcs",
    Modality.VIDEO: "gen_text_hidden_fcs_video",
    Modality.AUDIO: "gen_text_hidden_fcs_audio",
}
TEXT_FC_NAMES = (("fc.", "in_fc."), ("tfm.", "transformer."), ("model.", "out_fc."), ("query_embs", "queries"))
# Fields of the LLaMA config.json saved beside the checkpoint that the base LLM must share (a Llama-2 or Vicuna v1.5
# base has NExT-GPT's shapes but another max_position_embeddings and rms_norm_eps).
BASE_CONFIG_FIELDS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "hidden_act",
)
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "added_tokens.json")


# ---------------------------------------------------------------------------------------------- the conversion
def convert_nextgpt(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    llm: str | os.PathLike | None = None,
    components: str | os.PathLike | AnyGPTConfig = "nextgpt-7b",
    lora_alpha: int = LORA_ALPHA,
) -> Path:
    """Convert NExT-GPT's released checkpoint into a ``save_pretrained`` folder.

    Args:
        checkpoint: the released folder (``pytorch_model.pt`` beside its tokenizer files and ``config.json``) or the
            ``.pt`` file (its folder's tokenizer files are used when there; otherwise the tokenizer is the base
            LLM's plus NExT-GPT's 38 tokens).
        out: the folder to write (atomically; an existing model folder is replaced, any other non-empty folder is
            refused).
        llm: the base LLM NExT-GPT was trained on (Vicuna-7B v0): a local folder or a Hugging Face id in the local
            cache. None: the LLM of ``components``.
        components: where the frozen encoder and decoders (and the output projector's sizes) come from: a preset
            name, a model folder or an ``AnyGPTConfig``. Its sizes must fit the checkpoint's.
        lora_alpha: LoRA alpha (not stored in the checkpoint; NExT-GPT's is 32).

    Returns:
        ``out``.

    Raises:
        CheckpointError: the checkpoint does not fit the base LLM and the components (one error naming the key,
            the expected and the found shape), or is not a dict of tensors.
        FileNotFoundError: the checkpoint or the base LLM is not on this machine.
        ConfigError: the components lack a decoder NExT-GPT's checkpoint has a projector for.

    Example:
        >>> convert_nextgpt("nextgpt_7b_tiva_v0", "nextgpt-anygpt", llm="vicuna-7b-v0")  # doctest: +SKIP
        >>> pipe = AnyGPTPipeline.from_pretrained("nextgpt-anygpt")  # doctest: +SKIP
    """
    pt, released = locate_checkpoint(checkpoint)
    out = Path(out).expanduser()
    _check_out(out)
    state = read_checkpoint(pt)
    base = components_config(components)
    source = str(llm) if llm is not None else base.llm.source
    if source == TINY:
        raise UsageError("--llm: NExT-GPT's checkpoint needs the base LLM it was trained on (Vicuna-7B v0), not 'tiny'")
    try:
        base_dir = Path(resolve_local_model(source, what="base LLM (--llm)"))
    except FileNotFoundError as err:
        if llm is not None:
            raise
        raise FileNotFoundError(f"{err}; pass the base NExT-GPT was trained on, Vicuna-7B v0, with --llm") from None
    if Path(source).expanduser().is_dir():
        source = str(Path(source).expanduser().resolve())  # an index names local folders absolutely
    llm_config, base_tokenizer = _read_base_llm(base_dir, source)
    vocab = len(base_tokenizer)
    if released is not None and (released / "config.json").is_file():
        _check_base_config(released / "config.json", base_dir / "config.json", source)
    else:
        logger.warning(
            "no config.json beside %s: the base LLM %s is checked on its shapes only (a Llama-2 or Vicuna v1.5 "
            "base has NExT-GPT's shapes but is another model; NExT-GPT used Vicuna-7B v0)",
            pt,
            source,
        )

    problems = _Problems(pt)
    tables, stage3 = _take_tables(state, vocab, llm_config.hidden_size, source, problems)
    lora_state, lora = _take_lora(state, llm_config, lora_alpha, problems)
    if stage3 and lora is None:  # stage-3 names: the LLM was peft-wrapped, so its LoRA matrices were saved too
        problems.add(
            "llama_model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
            "missing: the tables have stage-3 (peft) names but no LoRA matrix is there",
        )
    config = _converted_config(base, source, lora, components)
    inputs = _take_input_projectors(state, config, llm_config.hidden_size, problems)
    outputs = _take_output_projectors(state, config, llm_config.hidden_size, problems)
    for key in sorted(state):
        problems.add(key, f"unexpected key (shape {_shape(state[key])}): not in NExT-GPT's checkpoint")
    problems.raise_if_any()

    tokenizer = _nextgpt_tokenizer(released, base_tokenizer, vocab, pt)
    tokens = add_modality_tokens(tokenizer, config.signal_tokens)  # anygpt's placeholders after NExT-GPT's tokens
    signal = [i for m in config.output_modalities for i in tokens.signal[m]]
    if signal != list(range(vocab + 2, vocab + len(ADDED_TOKENS))):
        raise CheckpointError(f"{pt}: the signal tokens have ids {signal[:3]}..., NExT-GPT's are {vocab + 2}...")
    rows = {name: _with_zero_rows(table, len(tokenizer)) for name, table in tables.items()}
    provenance = {
        "converted_from": "NExT-GPT (legacy code) checkpoint",
        "checkpoint": pt.name,
        "sha256": file_sha256(pt),
        "tables": "stage 3" if stage3 else "stage 1/2",
        "lora": None if lora is None else {"r": lora.r, "alpha": lora.alpha},
        "llm": source,
        "components": "a config" if isinstance(components, AnyGPTConfig) else str(components),
    }
    with atomic_directory(out) as tmp:
        parts = _write_parts(tmp, inputs, outputs, lora_state, lora, rows, tokenizer)
        (tmp / CONVERSION_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        write_index(tmp, config, parts)
    logger.info("converted %s into %s (%d token rows, LoRA r %s)", pt, out, len(tokenizer), lora.r if lora else None)
    return out


def locate_checkpoint(checkpoint: str | os.PathLike) -> tuple[Path, Path | None]:
    """``(the .pt file, the folder of its tokenizer files and config.json or None)``.

    Raises:
        FileNotFoundError: naming what is missing.
    """
    path = Path(checkpoint).expanduser()
    if path.is_dir():
        pt = path / CHECKPOINT_FILE
        if not pt.is_file():
            raise FileNotFoundError(f"{path}: no {CHECKPOINT_FILE} in this folder (NExT-GPT's released checkpoint)")
        return pt, path
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file or folder")
    beside = path.parent
    has_files = any((beside / name).is_file() for name in (*TOKENIZER_FILES, "config.json"))
    return path, beside if has_files else None


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a ``torch.save``d dict, read with ``weights_only=True`` onto the CPU (NExT-GPT saved them with
    GPU storage).

    Raises:
        CheckpointError: the file holds other Python objects (never unpickled), is unreadable, or is not a dict of
            tensors.
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        lines = [
            line.split("WeightsUnpickler error:", 1)[1]
            for line in str(err).splitlines()
            if "WeightsUnpickler error:" in line
        ]
        reason = lines[0].split(". Please")[0].strip() if lines else type(err).__name__
        raise CheckpointError(
            f"{path}: refused: it holds Python objects besides tensors, which are never unpickled "
            f"(torch.load weights_only=True: {reason})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({str(err).splitlines()[0]})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors (NExT-GPT's {CHECKPOINT_FILE}), found a "
                              f"{type(state).__name__}")  # fmt: skip
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {key!r} is a {type(value).__name__}, expected a tensor")
    return {key: value.detach() for key, value in state.items()}


def components_config(components: str | os.PathLike | AnyGPTConfig) -> AnyGPTConfig:
    """The config of a preset, a model folder or a config (a copy)."""
    if isinstance(components, AnyGPTConfig):
        return copy.deepcopy(components)
    return find_model(components)[1]


# ---------------------------------------------------------------------------------------------- checks and pieces
class _Problems:
    """Every key that does not fit, reported as one error (the first ones in full)."""

    def __init__(self, source: Path):
        self.source = source
        self.items: list[str] = []

    def add(self, key: str, what: str) -> None:
        self.items.append(f"{key!r}: {what}")

    def shape(self, key: str, expected: Iterable[int], found: torch.Tensor | None, hint: str = "") -> bool:
        """Record a missing or misshapen key; True when it fits."""
        expected = tuple(expected)
        if found is None:
            self.add(key, f"missing (expected shape {_shape(expected)})")
            return False
        if tuple(found.shape) != expected:
            self.add(key, f"expected shape {_shape(expected)}, found {_shape(found)}{hint}")
            return False
        return True

    def raise_if_any(self) -> None:
        if not self.items:
            return
        more = f" (and {len(self.items) - 3} more)" if len(self.items) > 3 else ""
        raise CheckpointError(
            f"{self.source}: does not fit NExT-GPT's layout for this base LLM and these components: "
            + "; ".join(self.items[:3])
            + more
        )


def _shape(value: torch.Tensor | Iterable[int]) -> str:
    dims = tuple(value.shape) if isinstance(value, torch.Tensor) else tuple(value)
    return "(" + ", ".join(str(d) for d in dims) + ")"


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / INDEX_FILE).is_file():
        raise UsageError(
            f"{out}: not empty and holds no {INDEX_FILE}; refusing to replace it (choose an empty or new folder, or "
            "a model folder)"
        )


def _read_base_llm(base_dir: Path, source: str):
    from transformers import AutoConfig, AutoTokenizer  # heavy: only when converting

    llm_config = AutoConfig.from_pretrained(base_dir)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if llm_config.vocab_size != len(tokenizer):
        raise CheckpointError(
            f"--llm {source}: its config.json has vocab_size {llm_config.vocab_size}, its tokenizer {len(tokenizer)} "
            f"tokens: not a base LLM (NExT-GPT's is Vicuna-7B v0, 32000 tokens, no added ones)"
        )
    return llm_config, tokenizer


def _check_base_config(theirs_path: Path, ours_path: Path, source: str) -> None:
    """The base LLM's config.json must match the LLaMA config.json saved with the checkpoint (its vocabulary is
    checked on the tables)."""
    theirs = json.loads(theirs_path.read_text())
    ours = json.loads(ours_path.read_text()) if ours_path.is_file() else {}
    for name in BASE_CONFIG_FIELDS:
        if name in theirs and name in ours and theirs[name] != ours[name]:
            raise CheckpointError(
                f"--llm {source}: {name} is {ours[name]!r}, the checkpoint's base LLM had {theirs[name]!r} "
                f"({theirs_path}): not the LLM it was trained on (NExT-GPT used Vicuna-7B v0; a Llama-2 or Vicuna "
                f"v1.5 base has the same shapes but is another model)"
            )


def _take_tables(
    state: dict[str, torch.Tensor], vocab: int, hidden: int, source: str, problems: _Problems
) -> tuple[dict[str, torch.Tensor], bool]:
    """Pop the embedding and LM-head tables; returns them and whether they had stage-3 (peft) names."""
    rows = vocab + len(ADDED_TOKENS)
    tables: dict[str, torch.Tensor] = {}
    stage3 = False
    for ours, names in TABLES.items():
        present = [name for name in names if name in state]
        if len(present) == 2:
            problems.add(names[1], f"the same table as {names[0]!r}, under its stage-1/2 name: keep one")
        if not present:
            problems.shape(f"{names[0]} (or {names[1]})", (rows, hidden), None)
            continue
        tensor = state.pop(present[0])
        for name in present[1:]:
            state.pop(name)
        stage3 = stage3 or present[0] == names[0]
        hint = ""
        if tensor.ndim == 2 and tensor.shape[0] != rows:
            added = tensor.shape[0] - vocab
            hint = (
                f"; NExT-GPT adds {len(ADDED_TOKENS)} tokens to its base LLM's vocabulary (--llm {source}: {vocab}), "
                + (
                    "this table has 42: an early NExT-GPT version that also added <Vid></Vid><Aud></Aud> "
                    "(NExT-GPT issue #47), whose weights do not go with the released code"
                    if added == 42
                    else "so --llm is not the base it was trained on (NExT-GPT used Vicuna-7B v0, 32000 tokens)"
                )
            )
        if problems.shape(present[0], (rows, hidden), tensor, hint):
            tables[ours] = tensor
    return tables, stage3


def _take_lora(
    state: dict[str, torch.Tensor], llm_config, alpha: int, problems: _Problems
) -> tuple[dict[str, torch.Tensor], LoraSettings | None]:
    """Pop the LoRA matrices (with or without peft's ``.default`` adapter name) as peft's saved keys, checked against
    the keys and shapes peft gives the base LLM (built on the meta device, no weights)."""
    found: dict[str, tuple[str, torch.Tensor]] = {}  # peft's key -> (our key, tensor)
    for key in [k for k in state if LORA_KEY.fullmatch(k)]:
        peft_key = LORA_KEY.fullmatch(key).group(1) + ".weight"
        if peft_key in found:
            problems.add(key, f"the same matrix as {found[peft_key][0]!r}, with and without '.default'")
        found[peft_key] = (key, state.pop(key))
    if not found:
        return {}, None
    first_a = next((t for k, (_, t) in sorted(found.items()) if ".lora_A." in k), None)
    rank = int(first_a.shape[0]) if first_a is not None and first_a.ndim == 2 else 32
    settings = LoraSettings(r=rank, alpha=alpha, dropout=LORA_DROPOUT, target_modules=list(LORA_TARGETS))
    expected = _peft_lora_shapes(llm_config, settings)
    lora_state = {}
    for peft_key, shape in expected.items():
        key, tensor = found.pop(peft_key, (f"llama_model.{peft_key[: -len('.weight')]}.default.weight", None))
        if problems.shape(key, shape, tensor):
            lora_state[peft_key] = tensor.contiguous()
    for key, tensor in found.values():
        problems.add(key, f"unexpected LoRA matrix (shape {_shape(tensor)}): the base LLM has no such layer")
    return lora_state, settings


def _peft_lora_shapes(llm_config, settings: LoraSettings) -> dict[str, tuple[int, ...]]:
    """The keys and shapes of peft's saved adapter for this LLM architecture, without weights (meta device)."""
    from peft import get_peft_model, get_peft_model_state_dict  # heavy: only when converting
    from transformers import AutoModelForCausalLM

    with torch.device("meta"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        model = get_peft_model(AutoModelForCausalLM.from_config(llm_config), settings.to_peft())
    state = get_peft_model_state_dict(model, save_embedding_layers=False)
    return {key: tuple(value.shape) for key, value in state.items()}


def _converted_config(base: AnyGPTConfig, source: str, lora: LoraSettings | None, components) -> AnyGPTConfig:
    """The components' encoder and decoders around NExT-GPT's LLM, tokens, template and projectors."""
    missing = [name for name in SIGNAL_COUNTS if name not in base.decoders]
    if missing:
        where = "the components config" if isinstance(components, AnyGPTConfig) else f"--components {components}"
        raise ConfigError(
            f"{where}: no {', '.join(missing)} "
            f"decoder; NExT-GPT's checkpoint has an output projector for each of image, video and audio"
        )
    transformer = base.output_projector.name == "transformer"  # otherwise NExT-GPT's own sizes (the defaults)
    return AnyGPTConfig(
        encoder=base.encoder,
        llm=LanguageModelConfig(source=source, torch_dtype=base.llm.torch_dtype, template=TEMPLATE, lora=lora),
        decoders={name: base.decoders[name] for name in SIGNAL_COUNTS},
        signal_tokens=SignalTokenConfig(dict(SIGNAL_COUNTS)),
        input_projector=ProjectorConfig("linear"),
        output_projector=ProjectorConfig("transformer", base.output_projector.options if transformer else {}),
        output_projector_overrides=base.output_projector_overrides if transformer else {},
        input_modalities=[m.value for m in MEDIA_MODALITIES],
        seed=base.seed,
    )


def _take_input_projectors(
    state: dict[str, torch.Tensor], config: AnyGPTConfig, hidden: int, problems: _Problems
) -> dict[str, torch.nn.Module]:
    """``llama_proj`` as the linear input projector of every input modality, built as ``AnyGPTModel.build`` does."""
    with torch.device("meta"):  # only its sizes and token layout: no weights
        encoder = ImageBindEncoder(config.encoder)
    weights = {name: state.pop(f"{INPUT_PROJECTOR}.{name}", None) for name in ("weight", "bias")}
    fits = problems.shape(f"{INPUT_PROJECTOR}.weight", (hidden, encoder.embed_dim), weights["weight"])
    fits = problems.shape(f"{INPUT_PROJECTOR}.bias", (hidden,), weights["bias"]) and fits
    if not fits:
        return {}
    modules = {}
    for name in config.input_modalities:
        module = build_input_projector(
            "linear",
            in_dim=encoder.embed_dim,
            token_dim=encoder.token_dim(name),
            out_dim=hidden,
            grid=list(encoder.token_grid(name)),
        )
        module.load_state_dict({f"proj.{k}": v for k, v in weights.items()})  # fp16 -> fp32: exact
        modules[name] = module
    return modules


def _take_output_projectors(
    state: dict[str, torch.Tensor], config: AnyGPTConfig, hidden: int, problems: _Problems
) -> dict[str, torch.nn.Module]:
    """Each ``TextFcLayer`` as the transformer output projector of its modality (renamed, same function)."""
    modules = {}
    for modality in config.output_modalities:
        spec = build_decoder(config.decoders[modality.value]).spec  # nothing is loaded
        options = config.output_projector_options(modality)
        module = build_output_projector(
            "transformer",
            in_dim=hidden,
            out_dim=spec.cond_dim,
            num_queries=options.pop("num_queries", spec.cond_len),
            num_signal_tokens=config.signal_tokens.count(modality),
            **options,
        )
        prefix = f"{OUTPUT_PROJECTORS[modality]}.0."
        theirs = {key[len(prefix) :]: state.pop(key) for key in [k for k in state if k.startswith(prefix)]}
        ours: dict[str, torch.Tensor] = {}
        for key, tensor in theirs.items():
            name = _rename(key, TEXT_FC_NAMES)
            if name is None:
                problems.add(prefix + key, f"unexpected key (shape {_shape(tensor)}) in a TextFcLayer")
            else:
                ours[name] = tensor
        expected = module.state_dict()
        fits = True
        for name, value in expected.items():
            key = prefix + _rename(name, [(b, a) for a, b in TEXT_FC_NAMES])
            fits = problems.shape(key, value.shape, ours.pop(name, None)) and fits
        for name, tensor in ours.items():
            key = prefix + _rename(name, [(b, a) for a, b in TEXT_FC_NAMES])
            problems.add(key, f"unexpected key (shape {_shape(tensor)}): the output projector has no such weight")
            fits = False
        if fits:
            module.load_state_dict({_rename(k, TEXT_FC_NAMES): v for k, v in theirs.items()})  # fp16 -> fp32: exact
            modules[modality.value] = module
    return modules


def _rename(key: str, rules: Iterable[tuple[str, str]]) -> str | None:
    for old, new in rules:
        if key == old or (old.endswith(".") and key.startswith(old)):
            return new + key[len(old) :]
    return None


def _nextgpt_tokenizer(released: Path | None, base_tokenizer, vocab: int, pt: Path):
    """Its tokenizer (the released files when they are there, else the base LLM's plus NExT-GPT's 38 tokens in its
    order), checked: the base vocabulary, then exactly NExT-GPT's tokens at NExT-GPT's ids."""
    from transformers import AutoTokenizer  # heavy: only when converting

    if released is not None and any((released / name).is_file() for name in TOKENIZER_FILES):
        tokenizer, where = AutoTokenizer.from_pretrained(released), released
    else:
        tokenizer, where = base_tokenizer, pt
        tokenizer.add_tokens(list(ADDED_TOKENS))  # one at a time in NExT-GPT's order: the same ids
    found = tokenizer.convert_ids_to_tokens(list(range(vocab, len(tokenizer))))
    for offset, expected in enumerate(ADDED_TOKENS):
        token = found[offset] if offset < len(found) else None
        if token not in (expected, SAME_TOKEN.get(expected)):
            raise CheckpointError(
                f"{where}: token {vocab + offset} is {token!r}, NExT-GPT's is {expected!r} (its {len(ADDED_TOKENS)} "
                f"tokens follow the base LLM's {vocab})"
            )
    if len(found) != len(ADDED_TOKENS):
        raise CheckpointError(
            f"{where}: {len(found)} tokens after the base LLM's {vocab}, NExT-GPT added {len(ADDED_TOKENS)} "
            f"(first extra: {found[len(ADDED_TOKENS)]!r})"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # as NExT-GPT: pad = eos
    return tokenizer


def _write_parts(
    folder: Path,
    inputs: dict[str, torch.nn.Module],
    outputs: dict[str, torch.nn.Module],
    lora_state: dict[str, torch.Tensor],
    lora: LoraSettings | None,
    rows: dict[str, torch.Tensor],
    tokenizer,
) -> dict:
    """The files of a ``save_pretrained`` folder (``AnyGPTModel.save_trained``'s layout, every token row); returns
    the index's ``parts``."""
    parts: dict = {"input_projectors": {}, "output_projectors": {}}
    for side, modules in (("input_projectors", inputs), ("output_projectors", outputs)):
        for name, module in modules.items():
            module.save_pretrained(folder / side / name)
            parts[side][name] = f"{side}/{name}"
    if lora is not None:  # peft's single-adapter layout
        (folder / "lora").mkdir()
        save_file(lora_state, folder / "lora" / ADAPTER_WEIGHTS_FILE)
        lora.to_peft().save_pretrained(folder / "lora")
        parts["lora"] = "lora"
    save_file({"token_ids": torch.arange(len(tokenizer)), **rows}, folder / TOKEN_ROWS_FILE)
    parts["token_embeddings"] = TOKEN_ROWS_FILE
    tokenizer.save_pretrained(tokenizer_dir_of(folder))
    parts["tokenizer"] = "tokenizer"
    return parts


def _with_zero_rows(table: torch.Tensor, rows: int) -> torch.Tensor:
    """The table with zero rows appended up to ``rows`` (anygpt's placeholders: input-only, never generated)."""
    extra = table.new_zeros((rows - table.shape[0], table.shape[1]))
    return torch.cat([table, extra]).contiguous()


# ---------------------------------------------------------------------------------------------- command line
def add_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    """``anygpt convert nextgpt CHECKPOINT --out DIR [--llm DIR|ID] [--components PRESET|DIR]``."""
    sub = parser.add_subparsers(dest="source", required=True, metavar="SOURCE")
    nextgpt = sub.add_parser(
        "nextgpt",
        help="NExT-GPT's released checkpoint (ChocoWu/nextgpt_7b_tiva_v0)",
        description="Convert NExT-GPT's released checkpoint (its folder, or pytorch_model.pt alone) into a model "
        "folder that `anygpt generate --model DIR` loads.",
    )
    nextgpt.add_argument("checkpoint", help="the released folder (pytorch_model.pt + tokenizer files) or the .pt")
    nextgpt.add_argument("--out", required=True, help="the model folder to write")
    nextgpt.add_argument(
        "--llm", default=None, help="the base LLM it was trained on, Vicuna-7B v0 (folder or cached hub id)"
    )
    nextgpt.add_argument(
        "--components",
        default="nextgpt-7b",
        help="preset or model folder giving the encoder and decoders (default: nextgpt-7b)",
    )
    nextgpt.add_argument(
        "--lora-alpha", type=int, default=LORA_ALPHA, help=f"LoRA alpha (default {LORA_ALPHA}, NExT-GPT's)"
    )


def run(args: argparse.Namespace) -> int:
    out = convert_nextgpt(
        args.checkpoint, args.out, llm=args.llm, components=args.components, lora_alpha=args.lora_alpha
    )
    print(f"wrote {out}: load it with `anygpt generate --model {out}`")
    return 0
