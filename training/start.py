"""The starting model of a run: a preset or a previous stage's ``final/`` folder, with the config's choices applied
(fresh connectors, gated cross-attention blocks, LoRA settings for a model whose adapter never trained)."""

from __future__ import annotations

import logging
from pathlib import Path

from anygpt.base.errors import ConfigError, UnknownModelError
from anygpt.core.config import ProjectorConfig, list_presets
from anygpt.core.fusion import CrossAttentionConfig
from anygpt.core.index import INDEX_FILE, read_weights, resolve_part
from anygpt.core.llm import LoraSettings
from anygpt.core.pipeline import AnyGPTPipeline, find_model
from training.config import TrainConfig
from training.trainables import Trainable

logger = logging.getLogger(__name__)

__all__ = ["adapters_trained", "load_start"]


def load_start(config: TrainConfig, start: str, trainable: Trainable) -> AnyGPTPipeline:
    """The starting pipeline, with the config's LoRA settings when the model has no trained adapter yet.

    Args:
        config: the run's config (its ``lora``, ``input_projector``, ``output_projector``, ``cross_attention``).
        start: a preset name or a folder holding a saved model (``--from``, or the config's ``model``).
        trainable: what the run trains (a fresh connector must be trained).

    Raises:
        ConfigError: an unknown model, or a choice that would leave untrained parts in the model.
    """
    try:
        source, model_config, parts = find_model(start)
    except UnknownModelError:
        raise ConfigError(
            f"--from / model: {start!r} is neither a preset ({', '.join(list_presets())}) nor a folder "
            f"holding {INDEX_FILE} (a stage's final/ folder)"
        ) from None
    if config.lora is not None:
        try:
            wanted = LoraSettings(**config.lora)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{config.source}: lora: {err}") from None
        if parts and parts.get("lora") and model_config.llm.lora != wanted:
            if adapters_trained(source, parts["lora"]):
                raise ConfigError(
                    f"{config.source}: lora: {start} already holds a trained adapter with "
                    f"{model_config.llm.lora}; remove `lora:` to keep training it"
                )
            parts = {k: v for k, v in parts.items() if k != "lora"}  # untrained (B = 0): replaced, not loaded
        model_config.llm.lora = wanted
    fresh = _choose_connectors(config, start, trainable, model_config, parts)
    fresh |= _choose_cross_attention(config, start, trainable, model_config, parts)
    tokenizer_dir = resolve_part(source, parts["tokenizer"], "tokenizer") if parts else None
    pipe = AnyGPTPipeline.from_config(model_config, tokenizer_dir=tokenizer_dir)
    if parts:
        pipe.model.load_trained(source, parts, skip=fresh)
    return pipe


def _choose_connectors(config: TrainConfig, start: str, trainable: Trainable, model_config, parts) -> set[str]:
    """Apply the config's ``input_projector`` / ``output_projector`` choices to ``model_config``.

    Returns:
        the parts (``input_projectors``, ``output_projectors``) that are built fresh instead of loaded.
    """
    fresh = set()
    for key, trains in (
        ("input_projector", trainable.input_projectors),
        ("output_projector", trainable.output_projectors),
    ):
        choice = getattr(config, key)
        if choice is None:
            continue
        wanted = ProjectorConfig(choice.name, choice.options)
        current = getattr(model_config, key)
        if (wanted.name, wanted.options) == (current.name, current.options):
            continue  # the same connector: keep the trained one
        if not trains:
            raise ConfigError(
                f"{config.source}: {key}: {wanted.name!r} would be built untrained ({start} has "
                f"{current.name!r}), but stage {config.stage} does not train the {key}s; set "
                f"trainable.{key}s: true or start from a model that has it"
            )
        if parts:
            logger.warning("%s: %s replaces the trained %s of %s (trained from scratch)", key, wanted.name,
                           current.name, start)  # fmt: skip
            fresh.add(f"{key}s")
        setattr(model_config, key, wanted)
    return fresh


def _choose_cross_attention(config: TrainConfig, start: str, trainable: Trainable, model_config, parts) -> set[str]:
    """Apply the config's ``cross_attention`` (fresh gated cross-attention blocks) to ``model_config``.

    Returns:
        ``{"cross_attention"}`` when the blocks are built fresh instead of loaded, else an empty set.
    """
    source = config.source
    if config.cross_attention is not None:
        wanted = CrossAttentionConfig.from_dict(config.cross_attention)  # validated with the config
        current = model_config.cross_attention
        if wanted != current:
            if trainable.cross_attention is False:
                raise ConfigError(
                    f"{source}: cross_attention: the blocks would be built untrained, but stage "
                    f"{config.stage} does not train them; set trainable.cross_attention: true or start from "
                    "a model that has them"
                )
            if parts and current is not None:
                logger.warning("cross_attention: %s replaces the trained %s of %s (trained from scratch)",
                               wanted, current, start)  # fmt: skip
            model_config.cross_attention = wanted
            if parts:
                return {"cross_attention"}
    if trainable.cross_attention and model_config.cross_attention is None:
        raise ConfigError(
            f"{source}: trainable.cross_attention: true, but {start} has no gated cross-attention blocks; "
            "add them with cross_attention: {every: 4} (--set cross_attention.every=4)"
        )
    return set()


def adapters_trained(folder: Path, entry: str | dict) -> bool:
    """Whether a saved LoRA part changes the model: any ``lora_B`` non-zero (peft starts every B at 0, so the
    adapter that stages 1 and 2 carry along untouched is a no-op and may be replaced by other LoRA settings)."""
    for rel in [entry] if isinstance(entry, str) else list(entry.values()):
        path = resolve_part(folder, rel, "lora") / "adapter_model.safetensors"
        state = read_weights(path, folder=folder, what="lora adapter")  # a damaged file: CheckpointError
        if any("lora_B" in key and bool(tensor.any()) for key, tensor in state.items()):
            return True
    return False
