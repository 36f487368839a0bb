"""A run's data: the datasets read and checked against the model, and the tensors of each micro-batch.

``read_datasets`` reads every dataset of a config; ``check_datasets`` checks them against the model and what the
stage trains before the first step (modalities, caption-embedding shapes, something to learn); a ``Batcher`` turns
the batch plan (``training.sampling.BatchPlan``) into each process's micro-batches and their tensors: token ids,
encoder features (through the feature cache), caption-embedding targets, diffusion inputs and per-row LoRA adapters.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from anygpt.base.errors import ConfigError, DatasetError, TrainingError
from anygpt.base.modality import Modality
from training.cache import CaptionEmbeddingCache, MediaFeatureCache
from training.config import TrainConfig
from training.data.readers import read_dataset
from training.data.records import OutputMedia, Pair, Record
from training.examples import Example, ExampleBuilder, collate, pair_to_dialogue, reply_modality
from training.sampling import BatchPlan
from training.trainables import Trainable

logger = logging.getLogger(__name__)

__all__ = ["Batcher", "Datasets", "check_datasets", "per_modality_lora", "read_datasets"]


@dataclass
class Datasets:
    """A run's datasets: their records, names and sampling weights (in the config's order)."""

    records: list[list[Record]]
    names: list[str]
    weights: list[float]


def read_datasets(config: TrainConfig) -> Datasets:
    """Read every dataset of ``config``; a dataset that fails to read or holds nothing is a ``ConfigError``."""
    records, names, weights = [], [], []
    for spec in config.dataset_specs():
        try:
            recs = read_dataset(spec)
        except DatasetError as err:
            raise ConfigError(f"{config.source}: dataset {spec.name}: {err}") from None
        if not recs:
            raise ConfigError(f"{config.source}: dataset {spec.name} ({spec.path}) holds no records")
        records.append(recs)
        names.append(spec.name)
        weights.append(spec.weight)
        logger.info("dataset %s: %d records from %s", spec.name, len(recs), spec.path)
    return Datasets(records, names, weights)


def per_modality_lora(model) -> bool:
    """The model has per-modality LoRA adapters (``lora.adapters``): batches route rows to them."""
    lora = model.config.llm.lora
    return lora is not None and lora.adapters is not None


def check_datasets(
    model, builder: ExampleBuilder, data: Datasets, config: TrainConfig, trainable: Trainable, pair_task: str
) -> None:
    """Every dataset fits the model and the stage: modalities, caption-embedding shapes, something to learn.

    Raises:
        ConfigError: naming the config file, the dataset and what to change.
    """
    source = config.source
    produces = target_media = False
    adapters = model.config.llm.lora.adapters if per_modality_lora(model) else None
    for name, recs in zip(data.names, data.records, strict=True):
        for rec in recs:
            dialogue = pair_to_dialogue(rec, pair_task, ["x"]) if isinstance(rec, Pair) else rec
            inputs = {m.modality.value for t in dialogue.turns for m in t.inputs}
            outputs = {o.modality.value for t in dialogue.turns for o in t.outputs}
            if inputs - set(model.input_projectors):
                raise ConfigError(
                    f"{source}: dataset {name} has {sorted(inputs - set(model.input_projectors))[0]} inputs, but "
                    f"the model reads only {list(model.input_projectors)}"
                )
            if outputs - set(model.output_projectors):
                raise ConfigError(
                    f"{source}: dataset {name} asks for {sorted(outputs - set(model.output_projectors))[0]} "
                    f"outputs, but the model produces only {list(model.output_projectors)}"
                )
            if adapters is not None and reply_modality(dialogue).value not in adapters:
                raise ConfigError(
                    f"{source}: dataset {name} has replies producing {reply_modality(dialogue).value}, but the "
                    f"model has no such LoRA adapter (lora.adapters: {adapters})"
                )
        examples = [builder.build(rec) for rec in recs[:64]]  # tokenised once, for every check below
        for ex in examples:
            for out in ex.outputs:
                if out.caption_embedding is not None:
                    _check_embedding_file(model, name, out)
                target_media = target_media or (out.media is not None and out.media.path.is_file())
            produces = produces or bool(ex.outputs)
        if all(label == -100 for label in examples[0].labels):
            raise ConfigError(
                f"{source}: dataset {name}: its first example has no supervised token after cutting to "
                f"data.max_length {config.data.max_length}; raise max_length"
            )
    loss = config.loss
    if trainable.output_projectors and not produces:
        raise ConfigError(
            f"{source}: this stage trains the output projectors, but no dataset produces media (for caption "
            "pairs set data.pair_task: generate)"
        )
    if trainable.output_projectors and loss.caption_embedding_weight == 0 and not loss.diffusion.enabled:
        raise ConfigError(
            f"{source}: loss.caption_embedding_weight is 0 and loss.diffusion is off: nothing would train the "
            "output projectors"
        )
    if loss.diffusion.enabled and not target_media:
        raise ConfigError(
            f"{source}: loss.diffusion.enabled needs the target media files of generated items, and the "
            "datasets name none that exist"
        )


def _check_embedding_file(model, dataset: str, out: OutputMedia) -> None:
    spec = model.decoder_specs[out.modality]
    try:
        shape = np.load(out.caption_embedding, mmap_mode="r", allow_pickle=False).shape
    except (OSError, ValueError) as err:
        raise ConfigError(f"dataset {dataset}: cannot read caption embedding {out.caption_embedding}: {err}") from None
    if tuple(shape) != tuple(spec.cond_shape):
        raise ConfigError(
            f"dataset {dataset}: caption embedding {out.caption_embedding} has shape {tuple(shape)}, the model's "
            f"{out.modality.value} decoder is conditioned on {tuple(spec.cond_shape)} (embeddings of another "
            "decoder?); drop embedding_root to compute them with this decoder's own text encoder"
        )


class Batcher:
    """This process's micro-batches of each step, as tensors on ``device``.

    Args:
        config: the run's config (batch size, accumulation, caption-embedding weight, seed, cache folder).
        model: the ``AnyGPTModel`` (its tokenizer, input projectors, decoder specs, LoRA adapters).
        builder: turns records into tokenised examples.
        data: the datasets the plan's items index.
        plan: the run's batch plan (global batches of (dataset, record) items).
        encoder: the frozen encoder (run outside the optimised module, through the feature cache).
        decoders: the frozen decoders (their text encoders embed captions for the targets).
        diffusion: the ``training.diffusion.DiffusionLoss`` when the diffusion loss is on, else None.
        device: where the tensors go.
        process_index, num_processes: this process's place among the run's processes.
    """

    def __init__(
        self,
        config: TrainConfig,
        model,
        builder: ExampleBuilder,
        data: Datasets,
        plan: BatchPlan,
        *,
        encoder,
        decoders: dict,
        diffusion=None,
        device: torch.device | str = "cpu",
        process_index: int = 0,
        num_processes: int = 1,
    ):
        self.config = config
        self.model = model
        self.builder = builder
        self.data = data
        self.plan = plan
        self.diffusion = diffusion
        self.device = device
        self.process_index, self.num_processes = process_index, num_processes
        self.media_cache = MediaFeatureCache(config.cache_dir, encoder)
        self.caption_caches = {m: CaptionEmbeddingCache(config.cache_dir, d) for m, d in decoders.items()}
        self.need_tokens = {m: p.uses_tokens for m, p in model.input_projectors.items()}
        self.per_modality_lora = per_modality_lora(model)

    def micro_batches(self, step: int) -> list[tuple[list[Example], list[int]]]:
        """This process's micro-batches of ``step``: examples and their positions in the global batch."""
        accumulation = self.config.train.gradient_accumulation_steps
        per = self.config.train.batch_size
        rank, world = self.process_index, self.num_processes
        batches = []
        for micro in range(accumulation):
            items = self.plan.shard(step, rank, world, micro, accumulation)
            start = (micro * world + rank) * per
            examples = [self.builder.build(self.data.records[d][i]) for d, i in items]
            batches.append((examples, list(range(start, start + len(examples)))))
        return batches

    def tensors(self, examples: list[Example], positions: list[int] | None = None, step: int = 0) -> dict:
        """The tensors of one micro-batch.

        Args:
            examples: the micro-batch's examples.
            positions: their places in the global batch (default 0, 1, ...): with the run seed and ``step`` they
                seed each item's diffusion noise and timestep, so any split over processes draws the same ones.
            step: the optimizer step (0-based).

        Returns:
            ``input_ids``, ``labels``, ``attention_mask`` (B, T); ``media`` {modality: (embeds, tokens or None)};
            ``targets`` {modality: caption embeddings (G, ...)}; ``diffusion`` {modality: DiffusionInputs};
            ``adapters``: per row, the LoRA adapter it runs with (per-modality adapters), else None.
        """
        device = self.device
        batch = {k: v.to(device) for k, v in collate(examples, self.model.tokenizer.pad_token_id).items()}
        items = [m for e in examples for m in e.media]
        media: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        if items:
            need = any(self.need_tokens.get(m.modality.value, False) for m in items)
            feats = self.media_cache.get(items, need_tokens=need)
            for modality in {m.modality for m in items}:
                rows = [f for m, f in zip(items, feats, strict=True) if m.modality == modality]
                embeds = torch.stack([r[0] for r in rows]).to(device)
                tokens = torch.stack([r[1] for r in rows]).to(device) if rows[0][1] is not None else None
                media[modality.value] = (embeds, tokens)
        targets: dict[str, torch.Tensor] = {}
        if self.config.loss.caption_embedding_weight > 0:
            outputs = [o for e in examples for o in e.outputs]
            for modality in dict.fromkeys(o.modality for o in outputs):
                mine = [o for o in outputs if o.modality == modality]
                targets[modality.value] = torch.stack(self._caption_targets(modality, mine)).to(device)
        batch["media"] = media
        batch["targets"] = targets
        batch["diffusion"] = {}
        # per-modality LoRA adapters: each example runs with (and trains) the adapter of what its reply produces
        batch["adapters"] = [e.reply_modality.value for e in examples] if self.per_modality_lora else None
        if self.diffusion is not None:
            positions = positions if positions is not None else list(range(len(examples)))
            # each item's noise and timestep come from its own seed (run seed, step, place in the global batch), so
            # any split over processes and micro-batches draws the same ones
            outputs = [
                (o, pos * 64 + k) for e, pos in zip(examples, positions, strict=True) for k, o in enumerate(e.outputs)
            ]
            seed = self.config.train.seed
            for modality in dict.fromkeys(o.modality for o, _ in outputs):
                mine = [(o, tag) for o, tag in outputs if o.modality == modality]
                index = [i for i, (o, _) in enumerate(mine) if o.media is not None and o.media.path.is_file()]
                if index:
                    paths = [mine[i][0].media.path for i in index]
                    seeds = [hash((seed, step, mine[i][1])) % (2**63) for i in index]
                    batch["diffusion"][modality.value] = self.diffusion.prepare(modality, index, paths, seeds)
        return batch

    def _caption_targets(self, modality: Modality, outputs: list[OutputMedia]) -> list[torch.Tensor]:
        result: list[torch.Tensor | None] = [None] * len(outputs)
        todo = []
        for i, out in enumerate(outputs):
            if out.caption_embedding is not None:
                array = np.load(out.caption_embedding, allow_pickle=False)
                spec = self.model.decoder_specs[modality]
                if tuple(array.shape) != tuple(spec.cond_shape):
                    raise TrainingError(
                        f"caption embedding {out.caption_embedding} has shape {array.shape}, expected {spec.cond_shape}"
                    )
                result[i] = torch.from_numpy(array.astype(np.float32))
            else:
                todo.append(i)
        if todo:
            embeds = self.caption_caches[modality].get([outputs[i].caption for i in todo])
            for i, e in zip(todo, embeds, strict=True):
                result[i] = e.float()
        return result

    def flush(self) -> None:
        """Write what the feature caches computed since their last write."""
        self.media_cache.flush()
        for cache in self.caption_caches.values():
            cache.flush()
