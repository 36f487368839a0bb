"""``anygpt cache``: fill the feature cache for a stage config before training."""

from __future__ import annotations

import logging

from tqdm.auto import tqdm

from training.cache import CaptionEmbeddingCache, MediaFeatureCache
from training.config import TrainConfig

logger = logging.getLogger(__name__)


def precompute(config: TrainConfig, *, start: str | None = None, chunk: int = 64) -> dict:
    """Encode every media item the stage reads and embed every output caption it needs, into ``config.cache_dir``.

    Returns:
        counts: media items and captions seen, how many were computed now, how many were cached already.
    """
    from training.trainer import StageTrainer

    trainer = StageTrainer(config, start=start, resume="auto")
    data = trainer.read_data()  # data errors surface before a (possibly large) model loads
    pipe = trainer.load_pipeline()
    model = pipe.model
    device = trainer.accelerator.device
    model.encoder.to(device)
    builder = trainer.example_builder(model)
    trainer.model, trainer.builder = model, builder
    trainer.check_compatible(data)
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
