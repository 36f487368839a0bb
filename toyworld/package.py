"""Package a trained model folder with its frozen components inside it, in fp16: one self-contained folder.

A ``save_pretrained`` folder holds the trained parts and refers to its frozen components (encoder checkpoint, LLM,
decoders) by path. :func:`package_model` copies those components into the folder (``encoder/``, ``llm/``,
``decoders/<modality>/``) with every floating-point tensor stored as fp16, and writes the index with paths relative to
the folder, which :func:`anygpt.core.index.read_index` resolves against the folder wherever it is. The components keep
their own formats (an ImageBind safetensors checkpoint, a transformers folder, diffusers folders) and load in float32
as the config says.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from anygpt.base.utils import atomic_directory, atomic_file
from anygpt.core.index import INDEX_FILE, read_index, write_index
from decoders import build_decoder
from decoders.clip_tokenizer import clip_vocab_and_merges, restrict_clip_tokenizer

logger = logging.getLogger(__name__)

__all__ = ["forget_local_paths", "package_model", "to_fp16"]


def to_fp16(folder: Path) -> None:
    """Rewrite every ``*.safetensors`` under ``folder`` with float32/bfloat16 tensors as fp16 (metadata kept)."""
    for path in sorted(folder.rglob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
        tensors = load_file(path)
        if not any(t.is_floating_point() and t.dtype != torch.float16 for t in tensors.values()):
            continue
        tensors = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
        with atomic_file(path, suffix=".safetensors") as tmp:
            save_file(tensors, tmp, metadata=metadata)


def restrict_text_encoder(pipe, texts: list[str]) -> int:
    """Shrink a diffusers pipeline's CLIP-tokenizer text encoder (CLIP or CLAP) to the tokens ``texts`` use.

    The tokenizer keeps the single-symbol tokens and the merges the texts need
    (:func:`decoders.clip_tokenizer.restrict_clip_tokenizer`); the embedding keeps the matching rows. The pipeline's
    caption encoding of every text is unchanged (checked).

    A tokenizer restricted already (a smaller vocabulary than CLIP's; e.g. a decoder taken from a packaged model)
    is kept as it is.

    Returns:
        the new vocabulary size.
    """
    if len(pipe.tokenizer) < len(clip_vocab_and_merges()[0]):
        return len(pipe.tokenizer)
    encoder = pipe.text_encoder
    with torch.no_grad():
        before = _encode(pipe, texts)
        tokenizer, old_ids = restrict_clip_tokenizer(pipe.tokenizer, texts)
        old = encoder.get_input_embeddings()
        padding = old_ids.index(old.padding_idx) if old.padding_idx in old_ids else None
        new = torch.nn.Embedding(len(old_ids), old.embedding_dim, padding_idx=padding, dtype=old.weight.dtype)
        new.weight.copy_(old.weight[torch.tensor(old_ids)])
        encoder.set_input_embeddings(new)
        config = encoder.config
        text_config = getattr(config, "text_config", config)
        for cfg in {id(config): config, id(text_config): text_config}.values():
            cfg.vocab_size = len(old_ids)
            for name in ("bos_token_id", "eos_token_id"):
                if getattr(cfg, name, None) is not None:
                    setattr(cfg, name, getattr(tokenizer, name))
            if getattr(cfg, "pad_token_id", None) == pipe.tokenizer.pad_token_id:  # CLIP pads with end-of-text
                cfg.pad_token_id = tokenizer.pad_token_id
        pipe.tokenizer = tokenizer
        pipe.register_modules(tokenizer=tokenizer)
        after = _encode(pipe, texts)
    if not torch.equal(before, after):
        raise RuntimeError(
            f"restricting the vocabulary changed caption embeddings (max diff {(before - after).abs().max()})"
        )
    return len(old_ids)


def _encode(pipe, texts: list[str]) -> torch.Tensor:
    if hasattr(pipe, "_encode_prompt") and "AudioLDM" in type(pipe).__name__:
        return pipe._encode_prompt(texts, torch.device("cpu"), 1, False)
    return pipe.encode_prompt(texts, torch.device("cpu"), 1, False)[0]


_ORIGIN_KEYS = ("_name_or_path", "base_model_name_or_path")


def forget_local_paths(folder: str | os.PathLike) -> int:
    """Replace the origin that diffusers, transformers and peft record in each saved config (``_name_or_path``,
    ``base_model_name_or_path``: the absolute folder it was loaded from, on the machine that trained it) by the
    component's own path inside ``folder``. Nothing loads from these keys; a shipped model should not carry the
    paths of the machine that made it. Returns the number of values replaced."""
    folder = Path(folder)
    replaced = 0
    for path in sorted(folder.rglob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            continue
        changed = False
        for key in _ORIGIN_KEYS:
            value = data.get(key)
            if isinstance(value, str) and Path(value).is_absolute():
                component = path.parent if key == "_name_or_path" else folder / "llm"
                data[key] = "./" + component.relative_to(folder).as_posix()
                changed = True
                replaced += 1
        if changed:
            path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return replaced


def package_model(
    src: str | os.PathLike, dst: str | os.PathLike, *, vocabulary_texts: list[str] | None = None
) -> dict[str, Any]:
    """Write ``src`` (a ``save_pretrained`` folder) and its components to ``dst`` as one fp16 folder.

    Args:
        src: the trained model folder.
        dst: the package folder to write (replaced atomically).
        vocabulary_texts: if given, each decoder's text encoder keeps only the tokens these texts use
            (:func:`restrict_text_encoder`), which drops most of CLIP's 49,408-token embedding.

    Returns:
        sizes in bytes per component and in all.
    """
    src, dst = Path(src), Path(dst)
    config, parts = read_index(src)
    with atomic_directory(dst) as tmp:
        for item in src.iterdir():
            if item.name == INDEX_FILE:
                continue
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)

        if config.encoder.checkpoint is None:
            raise ValueError(f"{src}: the encoder has no checkpoint file to package")
        (tmp / "encoder").mkdir()
        shutil.copy2(config.encoder.checkpoint, tmp / "encoder" / "imagebind.safetensors")
        config.encoder.checkpoint = "./encoder/imagebind.safetensors"

        llm = AutoModelForCausalLM.from_pretrained(config.llm.source, dtype=torch.float16)
        llm.save_pretrained(tmp / "llm", safe_serialization=True)
        AutoTokenizer.from_pretrained(config.llm.source).save_pretrained(tmp / "llm")
        config.llm.source = "./llm"

        for modality, decoder_config in config.decoders.items():
            pipe = build_decoder(decoder_config).load()
            if vocabulary_texts is not None:
                vocab = restrict_text_encoder(pipe, vocabulary_texts)
                logger.info("%s decoder: text vocabulary restricted to %d tokens", modality, vocab)
            pipe.to(dtype=torch.float16).save_pretrained(tmp / "decoders" / modality, safe_serialization=True)
            decoder_config.source = f"./decoders/{modality}"
        to_fp16(tmp)
        forget_local_paths(tmp)
        write_index(tmp, config, parts)
    sizes = {}
    for name in ("encoder", "llm", "decoders"):
        sizes[name] = sum(p.stat().st_size for p in (dst / name).rglob("*") if p.is_file())
    sizes["total"] = sum(p.stat().st_size for p in dst.rglob("*") if p.is_file())
    logger.info("packaged %s into %s: %.1f MB", src, dst, sizes["total"] / 1e6)
    return {"bytes": sizes}
