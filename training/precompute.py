"""``anygpt cache``: fill the feature cache for a stage config before training."""

from __future__ import annotations

import logging

from accelerate import PartialState
from tqdm.auto import tqdm

from training.batching import check_datasets, read_datasets
from training.cache import CaptionEmbeddingCache, MediaFeatureCache
from training.config import TrainConfig
from training.examples import ExampleBuilder
from training.objectives import objective_for
from training.start import load_start

logger = logging.getLogger(__name__)


def precompute(config: TrainConfig, *, start: str | None = None, chunk: int = 64) -> dict:
    """Encode every media item the stage reads and embed every output caption it needs, into ``config.cache_dir``.

    Args:
        config: the stage's config (its datasets, model and cache folder).
        start: the model whose encoder and decoders compute the features (None: ``config.model``).
        chunk: records tokenised and encoded at a time.

    Returns:
        counts: media items and captions seen, how many were computed now, how many were cached already.
    """
    objective = objective_for(config)
    data = read_datasets(config)  # data errors surface before a (possibly large) model loads
    pipe = load_start(config, start if start is not None else config.model, objective.trainable)
    model = pipe.model
    device = PartialState(cpu=config.train.device == "cpu").device  # where the training run would compute them
    model.encoder.to(device)
    builder = ExampleBuilder(
        model, max_length=config.data.max_length, pair_task=objective.pair_task,
        caption_prompts=config.data.caption_prompts,
    )  # fmt: skip
    check_datasets(model, builder, data, config, objective.trainable, objective.pair_task)
    media_cache = MediaFeatureCache(config.cache_dir, model.encoder)
    caption_caches = {}
    need_tokens = any(p.uses_tokens for p in model.input_projectors.values())
    captions_seen = 0
    records = [r for recs in data.records for r in recs]
    for begin in tqdm(range(0, len(records), chunk), desc="caching", unit="chunk"):
        examples = [builder.build(r) for r in records[begin : begin + chunk]]
        items = [m for e in examples for m in e.media]
        if items:
            media_cache.get(items, need_tokens=need_tokens)
        by_modality: dict = {}
        for out in (o for e in examples for o in e.outputs):
            if out.caption_embedding is None:
                by_modality.setdefault(out.modality, []).append(out.caption)
        for modality, captions in by_modality.items():
            if modality not in caption_caches:
                pipe.decoders[modality].to(device=device)
                caption_caches[modality] = CaptionEmbeddingCache(config.cache_dir, pipe.decoders[modality])
            caption_caches[modality].get(list(dict.fromkeys(captions)))
            captions_seen += len(captions)
    media_cache.flush()
    for cache in caption_caches.values():
        cache.flush()
    stats = {
        "media_computed": media_cache.stats.misses,
        "media_cached": media_cache.stats.hits,
        "captions_computed": sum(c.stats.misses for c in caption_caches.values()),
        "captions_cached": sum(c.stats.hits for c in caption_caches.values()),
        "captions_seen": captions_seen,
        "cache_dir": config.cache_dir,
    }
    logger.info("feature cache: %s", stats)
    return stats
