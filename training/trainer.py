"""The training loop: plain accelerate, one loop for every stage.

A run: load the starting model (a preset or a previous stage's ``final/``), apply the stage's recipe (what
trains), read the datasets, validate everything against the model, then train with a deterministic batch plan,
writing ``metrics.jsonl``, TensorBoard scalars, resumable ``checkpoint-STEP/`` folders and ``final/`` (a folder
``AnyGPTPipeline.from_pretrained`` loads).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from anygpt.base.errors import TrainingError
from anygpt.base.modality import Modality
from anygpt.core.lora import checkpoint_context_fn, forward_per_adapter
from training.blip2 import Blip2StageModule, blip2_terms, check_stage0
from training.cache import CaptionEmbeddingCache, MediaFeatureCache
from training.checkpoint import clean_partial, list_checkpoints, read_checkpoint, restore_checkpoint, save_checkpoint
from training.config import ConfigError, TrainConfig
from training.data.records import OutputMedia, Pair, Record
from training.examples import Example, ExampleBuilder, collate, pair_to_sample, reply_modality
from training.losses import caption_distance_sum, token_cross_entropy_sum
from training.recipes import PAIR_TASK, Trainable, apply_trainable, resolve_trainable
from training.sampling import BatchPlan

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
FINAL_DIR = "final"


# ---------------------------------------------------------------------------------------------- the module
class StageModule(nn.Module):
    """What the optimizer sees: the model plus the trainable token rows; ``forward`` returns loss sums."""

    def __init__(self, model, token_rows, *, distance: str, diffusion=None):
        super().__init__()
        self.model = model
        self.token_rows = token_rows
        self.distance = distance
        self.__dict__["diffusion"] = diffusion  # frozen decoders: not submodules (not wrapped, not moved)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor,
        media: dict[str, tuple[torch.Tensor, torch.Tensor | None]],
        targets: dict[str, torch.Tensor],
        diffusion: dict | None = None,
        adapters: list[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Loss sums of one micro-batch.

        Args:
            adapters: per row, the LoRA adapter it runs with and trains (per-modality adapters; see
                ``StageTrainer.tensors``), one LLM forward per adapter; None: one forward with the active adapter.
        """
        model = self.model
        diffusion = diffusion or {}
        features = {}
        for name, (embeds, tokens) in media.items():
            features[Modality(name)] = model.project_media(Modality(name), embeds, tokens)
        inputs_embeds = model.embed_inputs(input_ids, features)
        wanted = list(dict.fromkeys([*targets, *diffusion]))
        if adapters is None:
            out = model.language_model(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                output_hidden_states=bool(wanted),
                use_cache=False,
            )
            logits, hidden = out.logits, (out.hidden_states[-1] if wanted else None)
        else:  # per-modality LoRA: each row runs with (and so trains) only its own adapter
            logits, hidden = forward_per_adapter(
                model.language_model,
                adapters,
                inputs_embeds,
                attention_mask,
                output_hidden_states=bool(wanted),
                rows=model.cross_attention.rows if model.cross_attention is not None else None,
            )
        ce, _ = token_cross_entropy_sum(logits, labels)
        sums = {"ce": ce}
        for name in wanted:
            cond, where = model.signal_conditioning(Modality(name), hidden, input_ids)
            if name in targets:
                target = targets[name]
                if len(where) != target.shape[0]:
                    raise RuntimeError(f"{name}: {len(where)} signal groups in the batch, {target.shape[0]} targets")
                sums[f"caption_{name}"] = caption_distance_sum(cond, target, self.distance)
            if name in diffusion:
                sums[f"diffusion_{name}"] = self.diffusion.loss_sum(Modality(name), cond, diffusion[name])
        return sums


@dataclass
class Loaded:
    records: list[list[Record]]
    names: list[str]
    weights: list[float]


# ---------------------------------------------------------------------------------------------- the trainer
class StageTrainer:
    """Runs one stage.

    Args:
        config: the validated ``TrainConfig``.
        start: preset name or folder to start from (None: ``config.model``).
        output_dir: overrides ``config.output_dir``.
        max_steps: overrides ``config.train.max_steps``.
        resume: None (a fresh run; refuses a folder holding a previous run), ``"auto"`` (continue from the newest
            complete checkpoint in the output folder, if any) or a checkpoint folder.
        accelerator: an ``accelerate.Accelerator`` (built from the config when None).
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        start: str | None = None,
        output_dir: str | os.PathLike | None = None,
        max_steps: int | None = None,
        resume: str | None = None,
        accelerator=None,
    ):
        self.config = config
        self.start = str(start) if start is not None else config.model
        self.output_dir = Path(output_dir).expanduser().resolve() if output_dir else Path(config.output_dir)
        if max_steps is not None:
            if max_steps < 1:
                raise ConfigError(f"--max-steps must be >= 1, got {max_steps}")
            config.train.max_steps = max_steps
        self.resume = resume
        self.accelerator = accelerator or self._make_accelerator()
        self.trainable: Trainable = resolve_trainable(config.stage, config.trainable)
        self.pair_task = config.data.pair_task or PAIR_TASK[config.stage]

    # ------------------------------------------------------------------ setup
    def _make_accelerator(self):
        from accelerate import Accelerator, DistributedDataParallelKwargs

        run = self.config.train
        if run.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise ConfigError(f"{self.config.source}: train.mixed_precision: fp16 needs a GPU; use bf16 or no")
        return Accelerator(
            mixed_precision=run.mixed_precision,
            cpu=run.device == "cpu",
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )

    def _resume_folder(self) -> Path | None:
        existing = list_checkpoints(self.output_dir)
        if self.resume is None:
            if existing or (self.output_dir / FINAL_DIR).exists():
                raise ConfigError(
                    f"{self.output_dir} holds a previous run; pass --resume auto to continue it, or choose another "
                    "--output-dir"
                )
            return None
        if self.resume == "auto":
            return existing[-1] if existing else None
        folder = Path(self.resume).expanduser().resolve()
        if not (folder / "trainer_state.json").is_file():
            raise ConfigError(f"--resume {self.resume}: not a complete checkpoint folder (no trainer_state.json)")
        newer = [p for p in existing if folder.parent == self.output_dir and _step_of(p) > _step_of(folder)]
        if newer:
            raise ConfigError(
                f"--resume {folder}: newer checkpoints of the same run exist ({', '.join(p.name for p in newer)}); "
                "resuming from an older one would mix two runs: remove the newer ones first, or resume from the newest"
            )
        return folder

    def load_pipeline(self):
        """The starting pipeline, with the config's LoRA settings when the model has no trained adapter yet."""
        from anygpt.core.config import list_presets
        from anygpt.core.llm import LoraSettings
        from anygpt.core.index import INDEX_FILE, resolve_part
        from anygpt.core.pipeline import AnyGPTPipeline, UnknownModelError, find_model

        try:
            source, model_config, parts = find_model(self.start)
        except UnknownModelError:
            raise ConfigError(
                f"--from / model: {self.start!r} is neither a preset ({', '.join(list_presets())}) nor a folder "
                f"holding {INDEX_FILE} (a stage's final/ folder)"
            ) from None
        if self.config.lora is not None:
            try:
                wanted = LoraSettings(**self.config.lora)
            except (TypeError, ValueError) as err:
                raise ConfigError(f"{self.config.source}: lora: {err}") from None
            if parts and parts.get("lora") and model_config.llm.lora != wanted:
                if _adapters_trained(source, parts["lora"]):
                    raise ConfigError(
                        f"{self.config.source}: lora: {self.start} already holds a trained adapter with "
                        f"{model_config.llm.lora}; remove `lora:` to keep training it"
                    )
                parts = {k: v for k, v in parts.items() if k != "lora"}  # untrained (B = 0): replaced, not loaded
            model_config.llm.lora = wanted
        fresh = self._choose_connectors(model_config, parts)
        tokenizer_dir = resolve_part(source, parts["tokenizer"], "tokenizer") if parts else None
        pipe = AnyGPTPipeline.from_config(model_config, tokenizer_dir=tokenizer_dir)
        if parts:
            pipe.model.load_trained(source, parts, skip=fresh)
        return pipe

    def _choose_connectors(self, model_config, parts: dict | None) -> set[str]:
        """Apply the config's ``input_projector`` / ``output_projector`` / ``cross_attention`` choices to
        ``model_config``.

        Returns:
            the parts (``input_projectors``, ``output_projectors``, ``cross_attention``) that are built fresh instead
            of loaded.
        """
        from anygpt.core.config import ProjectorConfig

        fresh = set()
        for key, trains in (
            ("input_projector", self.trainable.input_projectors),
            ("output_projector", self.trainable.output_projectors),
        ):
            choice = getattr(self.config, key)
            if choice is None:
                continue
            wanted = ProjectorConfig(choice.name, choice.options)
            current = getattr(model_config, key)
            if (wanted.name, wanted.options) == (current.name, current.options):
                continue  # the same connector: keep the trained one
            if not trains:
                raise ConfigError(
                    f"{self.config.source}: {key}: {wanted.name!r} would be built untrained ({self.start} has "
                    f"{current.name!r}), but stage {self.config.stage} does not train the {key}s; set "
                    f"trainable.{key}s: true or start from a model that has it"
                )
            if parts:
                logger.warning("%s: %s replaces the trained %s of %s (trained from scratch)", key, wanted.name,
                               current.name, self.start)  # fmt: skip
                fresh.add(f"{key}s")
            setattr(model_config, key, wanted)
        fresh |= self._choose_cross_attention(model_config, parts)
        return fresh

    def _choose_cross_attention(self, model_config, parts: dict | None) -> set[str]:
        """Apply the config's ``cross_attention`` (fresh gated cross-attention blocks) to ``model_config``."""
        from anygpt.core.fusion import CrossAttentionConfig

        source = self.config.source
        if self.config.cross_attention is not None:
            wanted = CrossAttentionConfig.from_dict(self.config.cross_attention)  # validated with the config
            current = model_config.cross_attention
            if wanted != current:
                if self.trainable.cross_attention is False:
                    raise ConfigError(
                        f"{source}: cross_attention: the blocks would be built untrained, but stage "
                        f"{self.config.stage} does not train them; set trainable.cross_attention: true or start from "
                        "a model that has them"
                    )
                if parts and current is not None:
                    logger.warning("cross_attention: %s replaces the trained %s of %s (trained from scratch)",
                                   wanted, current, self.start)  # fmt: skip
                model_config.cross_attention = wanted
                if parts:
                    return {"cross_attention"}
        if self.trainable.cross_attention and model_config.cross_attention is None:
            raise ConfigError(
                f"{source}: trainable.cross_attention: true, but {self.start} has no gated cross-attention blocks; "
                "add them with cross_attention: {every: 4} (--set cross_attention.every=4)"
            )
        return set()

    def example_builder(self, model) -> ExampleBuilder:
        """The stage's ``ExampleBuilder`` for ``model`` (length, pair task and prompts from the config)."""
        data = self.config.data
        return ExampleBuilder(
            model, max_length=data.max_length, pair_task=self.pair_task, caption_prompts=data.caption_prompts
        )

    def read_data(self) -> Loaded:
        from training.data.readers import DatasetError, read_dataset

        records, names, weights = [], [], []
        for spec in self.config.dataset_specs():
            try:
                recs = read_dataset(spec)
            except DatasetError as err:
                raise ConfigError(f"{self.config.source}: dataset {spec.name}: {err}") from None
            if not recs:
                raise ConfigError(f"{self.config.source}: dataset {spec.name} ({spec.path}) holds no records")
            records.append(recs)
            names.append(spec.name)
            weights.append(spec.weight)
            logger.info("dataset %s: %d records from %s", spec.name, len(recs), spec.path)
        return Loaded(records, names, weights)

    def check_compatible(self, data: Loaded) -> None:
        """Every dataset fits the model and the stage: modalities, caption-embedding shapes, something to learn."""
        model = self.model
        source = self.config.source
        produces = target_media = False
        adapters = model.config.llm.lora.adapters if self.per_modality_lora else None
        for name, recs in zip(data.names, data.records, strict=True):
            for rec in recs:
                sample = pair_to_sample(rec, self.pair_task, ["x"]) if isinstance(rec, Pair) else rec
                inputs = {m.modality.value for t in sample.turns for m in t.inputs}
                outputs = {o.modality.value for t in sample.turns for o in t.outputs}
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
                if adapters is not None and reply_modality(sample).value not in adapters:
                    raise ConfigError(
                        f"{source}: dataset {name} has replies producing {reply_modality(sample).value}, but the "
                        f"model has no such LoRA adapter (lora.adapters: {adapters})"
                    )
            examples = [self.builder.build(rec) for rec in recs[:64]]  # tokenised once, for every check below
            for ex in examples:
                for out in ex.outputs:
                    if out.caption_embedding is not None:
                        self._check_embedding_file(name, out)
                    target_media = target_media or (out.media is not None and out.media.path.is_file())
                produces = produces or bool(ex.outputs)
            if all(label == -100 for label in examples[0].labels):
                raise ConfigError(
                    f"{source}: dataset {name}: its first example has no supervised token after cutting to "
                    f"data.max_length {self.config.data.max_length}; raise max_length"
                )
        loss = self.config.loss
        if self.trainable.output_projectors and not produces:
            raise ConfigError(
                f"{source}: this stage trains the output projectors, but no dataset produces media (for caption "
                "pairs set data.pair_task: generate)"
            )
        if self.trainable.output_projectors and loss.caption_embedding_weight == 0 and not loss.diffusion.enabled:
            raise ConfigError(
                f"{source}: loss.caption_embedding_weight is 0 and loss.diffusion is off: nothing would train the "
                "output projectors"
            )
        if loss.diffusion.enabled and not target_media:
            raise ConfigError(
                f"{source}: loss.diffusion.enabled needs the target media files of generated items, and the "
                "datasets name none that exist"
            )

    def _check_embedding_file(self, dataset: str, out: OutputMedia) -> None:
        spec = self.model.decoder_specs[out.modality]
        try:
            shape = np.load(out.caption_embedding, mmap_mode="r", allow_pickle=False).shape
        except (OSError, ValueError) as err:
            raise ConfigError(
                f"dataset {dataset}: cannot read caption embedding {out.caption_embedding}: {err}"
            ) from None
        if tuple(shape) != tuple(spec.cond_shape):
            raise ConfigError(
                f"dataset {dataset}: caption embedding {out.caption_embedding} has shape {tuple(shape)}, the model's "
                f"{out.modality.value} decoder is conditioned on {tuple(spec.cond_shape)} (embeddings of another "
                "decoder?); drop embedding_root to compute them with this decoder's own text encoder"
            )

    def setup(self) -> None:
        """Everything before the first step; every error here is a clear ``ConfigError``."""
        config = self.config
        self.resume_from = self._resume_folder()
        self.data = self.read_data()  # data errors surface before a (possibly large) model loads
        self.pipe = self.load_pipeline()
        self.model = self.pipe.model
        self.decoders = self.pipe.decoders
        self.token_rows = apply_trainable(self.model, self.trainable)
        self.builder = self.example_builder(self.model)
        self.check_compatible(self.data)
        if config.stage == 0:  # BLIP-2 pre-training of Q-Former connectors (training.blip2)
            check_stage0(self.model, self.data, config, self.pair_task)

        acc = self.accelerator
        run = config.train
        self.global_batch = run.batch_size * acc.num_processes * run.gradient_accumulation_steps
        self.plan = BatchPlan(
            [len(r) for r in self.data.records], self.data.weights, self.global_batch, config.data.sampling, run.seed
        )
        self.max_steps = run.max_steps or max(1, math.ceil(run.epochs * self.plan.steps_per_epoch()))

        torch.manual_seed(run.seed + acc.process_index)  # dropout differs per process, as in one big batch
        self.diffusion = None
        if config.loss.diffusion.enabled:
            from training.diffusion import DiffusionLoss

            self.diffusion = DiffusionLoss(self.decoders, gamma=config.loss.diffusion.min_snr_gamma)
        # the frozen encoder runs outside the optimised module (feature cache): keep it out of DDP / FSDP / ZeRO
        self.encoder = self.model._modules.pop("encoder")
        self.model.__dict__["encoder"] = self.encoder
        if config.stage == 0:  # the model and BLIP-2's objectives, whose heads train and are checkpointed too
            self.module = Blip2StageModule.for_model(self.model, config.loss.blip2, seed=run.seed)
        else:
            self.module = StageModule(
                self.model, self.token_rows, distance=config.loss.distance, diffusion=self.diffusion
            )
        if run.gradient_checkpointing:
            llm = self.model.language_model
            kwargs = {"use_reentrant": False}
            if self.per_modality_lora:  # recompute each layer with the adapter its forward ran with
                kwargs["context_fn"] = checkpoint_context_fn(llm, self.model.cross_attention)
            if hasattr(llm, "activation_checkpointing_enable"):  # transformers >= 5.x name
                llm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            if hasattr(llm, "enable_input_require_grads"):
                llm.enable_input_require_grads()
        self.params = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        if not self.params:
            raise ConfigError(f"{config.source}: nothing to train: the recipe and `trainable:` leave every part frozen")
        decay = [p for n, p in self.params if p.ndim >= 2 and not n.startswith("token_rows.")]
        no_decay = [p for n, p in self.params if not (p.ndim >= 2 and not n.startswith("token_rows."))]
        optim = config.optim
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=optim.lr,
            betas=tuple(optim.betas),
            eps=optim.eps,
        )
        from transformers import get_scheduler

        warmup = optim.warmup_steps if optim.warmup_steps is not None else int(optim.warmup_ratio * self.max_steps)
        name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[optim.schedule]
        self.scheduler = get_scheduler(name, self.optimizer, num_warmup_steps=warmup, num_training_steps=self.max_steps)
        if acc.distributed_type.value == "DEEPSPEED":
            ds_config = acc.state.deepspeed_plugin.deepspeed_config
            if ds_config.get("gradient_accumulation_steps") not in (None, "auto", run.gradient_accumulation_steps):
                raise ConfigError(
                    f"{config.source}: train.gradient_accumulation_steps {run.gradient_accumulation_steps} differs "
                    f"from the DeepSpeed config's {ds_config['gradient_accumulation_steps']}; make them equal"
                )
            ds_config["gradient_accumulation_steps"] = run.gradient_accumulation_steps
            ds_config["train_micro_batch_size_per_gpu"] = run.batch_size
            acc.gradient_accumulation_steps = run.gradient_accumulation_steps
        self.module, self.optimizer = acc.prepare(self.module, self.optimizer)
        self.encoder.to(acc.device)
        for decoder in self.decoders.values():
            decoder.to(device=acc.device)
        self.media_cache = MediaFeatureCache(config.cache_dir, self.encoder)
        self.caption_caches = {m: CaptionEmbeddingCache(config.cache_dir, d) for m, d in self.decoders.items()}
        self.need_tokens = {m: p.uses_tokens for m, p in self.model.input_projectors.items()}
        n_trainable = sum(p.numel() for _, p in self.params)
        n_total = sum(p.numel() for p in self.model.parameters())
        logger.info(
            "stage %d: %d trainable tensors, %s parameters (%.3f%% of %s); global batch %d; %d steps",
            config.stage,
            len(self.params),
            f"{n_trainable:,}",
            100 * n_trainable / max(1, n_total),
            f"{n_total:,}",
            self.global_batch,
            self.max_steps,
        )

    # ------------------------------------------------------------------ batches
    @property
    def per_modality_lora(self) -> bool:
        """The model has per-modality LoRA adapters (``lora.adapters``): batches route rows to them."""
        lora = self.model.config.llm.lora
        return lora is not None and lora.adapters is not None

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trained tensors (this process's own parameters; not gathered)."""
        module = self.accelerator.unwrap_model(self.module)
        return {n: p for n, p in module.named_parameters() if p.requires_grad}

    @property
    def sharded(self) -> bool:
        """FSDP or DeepSpeed: parameters (ZeRO-3, FSDP) or optimizer state (ZeRO-2) live in shards."""
        return self.accelerator.distributed_type.value in ("DEEPSPEED", "FSDP")

    def gathered_trainable(self) -> dict[str, torch.Tensor]:
        """The full trained tensors on the main process (all processes must call this; others get {})."""
        if not self.sharded:
            return self.trainable_state()
        full = self.accelerator.get_state_dict(self.module)  # a collective: gathers shards to the main process
        names = {n for n, _ in self.params}
        return {n: t for n, t in (full or {}).items() if n in names}

    def micro_batches(self, step: int) -> list[tuple[list[Example], list[int]]]:
        """This process's micro-batches of ``step``: examples and their positions in the global batch."""
        acc = self.accelerator
        accumulation = self.config.train.gradient_accumulation_steps
        per = self.config.train.batch_size
        batches = []
        for micro in range(accumulation):
            items = self.plan.shard(step, acc.process_index, acc.num_processes, micro, accumulation)
            start = (micro * acc.num_processes + acc.process_index) * per
            examples = [self.builder.build(self.data.records[d][i]) for d, i in items]
            batches.append((examples, list(range(start, start + len(examples)))))
        return batches

    def tensors(self, examples: list[Example], positions: list[int] | None = None, step: int = 0) -> dict:
        device = self.accelerator.device
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

    # ------------------------------------------------------------------ the loop
    def train(self) -> Path:
        """Run the stage; returns the ``final/`` folder."""
        self.setup()
        acc = self.accelerator
        config = self.config
        run = config.train
        start_step = 0
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            clean_partial(self.output_dir)
        acc.wait_for_everyone()
        if self.resume_from is not None:
            start_step = self._restore(self.resume_from)
        if acc.is_main_process:
            self._write_run_files(start_step)
        writer = self._tensorboard(start_step)
        bar = tqdm(
            total=self.max_steps,
            initial=start_step,
            disable=not acc.is_local_main_process,
            desc=f"stage {config.stage}",
            dynamic_ncols=True,
        )
        self._train_mode()
        self._stop = False
        previous = _install_sigint(self)
        try:
            for step in range(start_step, self.max_steps):
                t0 = time.perf_counter()
                metrics = self._step(step)
                metrics["samples_per_s"] = self.global_batch / max(time.perf_counter() - t0, 1e-9)
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", sps=f"{metrics['samples_per_s']:.1f}")
                done = step + 1
                if done % run.log_every == 0 or done == self.max_steps:
                    self._log(done, metrics, writer)
                if self._should_stop():
                    logger.warning("interrupted after step %d: writing checkpoint-%d to resume from", done, done)
                    self._save(done)
                    raise KeyboardInterrupt
                if run.save_every and done % run.save_every == 0 and done < self.max_steps:
                    self._save(done)
        finally:
            _restore_sigint(previous)
            self.model.__dict__.pop("encoder", None)
            self.model._modules["encoder"] = self.encoder
            bar.close()
            if writer is not None:
                writer.close()
            self.media_cache.flush()
            for cache in self.caption_caches.values():
                cache.flush()
        self._save(self.max_steps)
        return self._save_final()

    def _train_mode(self) -> None:
        """Train mode for the parts that train only: frozen parts keep their dropout off."""
        self.module.train()
        self.model.eval()
        if self.trainable.input_projectors:
            self.model.input_projectors.train()
        if self.trainable.output_projectors:
            self.model.output_projectors.train()
        if self.trainable.lora:
            self.model.language_model.train()

    def _should_stop(self) -> bool:
        """Ctrl-C (SIGINT) was pressed; all processes agree, so they stop after the same step."""
        flag = torch.tensor([1.0 if self._stop else 0.0], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.reduce(flag, reduction="sum")
        return bool(flag.item() > 0)

    def _step(self, step: int) -> dict:
        acc = self.accelerator
        config = self.config
        error: BaseException | None = None
        batches: list[dict] = []
        try:
            batches = [self.tensors(ex, pos, step) for ex, pos in self.micro_batches(step)]
        except Exception as err:  # noqa: BLE001 - reported below, on every process at once
            error = err
        # global normalisers: every process and every micro-batch divides by the same counts; the last slot says
        # whether a process failed to build its batch (so no process waits forever for the others)
        outs = [m.value for m in self.model.decoder_specs]
        names = ["ce"] + [f"caption_{m}" for m in outs] + [f"diffusion_{m}" for m in outs]
        if config.stage == 0:  # BLIP-2's terms (training.blip2), each a sum over the media-caption pairs
            names = list(blip2_terms(config.loss.blip2))
        local = torch.zeros(len(names) + 1, device=acc.device)
        local[-1] = 1.0 if error is not None else 0.0
        for b in batches:
            if config.stage == 0:
                local[: len(names)] += b["labels"].shape[0]
                continue
            local[0] += int((b["labels"][:, 1:] != -100).sum())
            for j, name in enumerate(names[1:], start=1):
                kind, modality = name.split("_", 1)
                if kind == "caption":
                    target = b["targets"].get(modality)
                    local[j] += 0 if target is None else target.shape[0]
                else:
                    inputs = b["diffusion"].get(modality)
                    local[j] += 0 if inputs is None else inputs.index.shape[0]
        reduced = acc.reduce(local, reduction="sum") if acc.num_processes > 1 else local
        if reduced[-1] > 0:
            if error is not None and acc.num_processes == 1:
                raise error
            where = f"this process: {error}" if error is not None else "another process failed (see its message)"
            raise TrainingError(f"step {step + 1}: could not build the batch ({where})")
        counts = reduced[:-1]
        if config.stage == 0:
            weights = {name: getattr(config.loss.blip2, name) for name in names}
        else:
            weights = {"ce": 1.0}
            for name in names[1:]:
                kind, modality = name.split("_", 1)
                factor = config.loss.modality_weights.get(modality, 1.0)
                if kind == "caption":
                    weights[name] = config.loss.caption_embedding_weight * factor
                else:
                    weights[name] = config.loss.diffusion.weight * factor
        deepspeed = acc.distributed_type.value == "DEEPSPEED"
        # DDP averages gradients over processes and DeepSpeed also divides by its accumulation steps: undo both, the
        # loss is already normalised over the global batch
        scale = acc.num_processes * (len(batches) if deepspeed else 1)
        sums = torch.zeros(len(names), device=acc.device)
        for i, b in enumerate(batches):
            last = i == len(batches) - 1
            if deepspeed:
                context = acc.accumulate(self.module)
            elif not last and acc.num_processes > 1:
                context = acc.no_sync(self.module)
            else:
                context = contextlib.nullcontext()
            with context:
                parts = self.module(
                    b["input_ids"],
                    b["labels"],
                    b["attention_mask"],
                    b["media"],
                    b["targets"],
                    b["diffusion"],
                    adapters=b.get("adapters"),
                )
                loss = parts[names[0]] * 0.0  # always a tensor: every process runs backward (DDP)
                for j, name in enumerate(names):
                    if name in parts and counts[j] > 0:
                        loss = loss + weights[name] * parts[name] / counts[j]
                        sums[j] += parts[name].detach().float()
                acc.backward(loss * scale)
        totals = acc.reduce(sums, reduction="sum") if acc.num_processes > 1 else sums
        means = {n: (totals[j] / counts[j]).item() for j, n in enumerate(names) if counts[j] > 0}
        loss_value = sum(weights[n] * v for n, v in means.items())
        if not math.isfinite(loss_value):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingError(
                f"non-finite loss at step {step + 1} ({means}); the weights were not updated and the last checkpoint "
                f"in {self.output_dir} is intact. Lower optim.lr, use bf16 instead of fp16, or check this step's data"
            )
        params = [p for _, p in self.params]
        max_norm = config.optim.max_grad_norm if config.optim.max_grad_norm is not None else float("inf")
        grad_norm = acc.clip_grad_norm_(params, max_norm)  # also the norm when clipping is off (max inf)
        if grad_norm is not None and not math.isfinite(float(grad_norm)) and acc.scaler is None:
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingError(
                f"non-finite gradient norm at step {step + 1} (loss {loss_value:.4g}); the weights were not updated "
                f"and the last checkpoint in {self.output_dir} is intact. Lower optim.lr or check this step's data"
            )
        self.optimizer.step()  # fp16: the gradient scaler skips a step with inf/NaN gradients by itself
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        metrics = {"loss": loss_value, **{f"loss_{n}": v for n, v in means.items()}}
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        metrics["pairs" if config.stage == 0 else "tokens"] = int(counts[0].item())
        return metrics

    # ------------------------------------------------------------------ files
    def _state(self) -> dict:
        return {
            "stage": self.config.stage,
            "start": self.start,
            "world_size": self.accelerator.num_processes,
            "global_batch": self.global_batch,
            "max_steps": self.max_steps,
            "config": self.config.to_dict(),
        }

    def _save(self, step: int) -> None:
        save_checkpoint(
            self.accelerator,
            self.output_dir,
            step,
            trainable=self.gathered_trainable(),
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            state=self._state(),
            keep=self.config.train.keep_checkpoints,
        )

    def _restore(self, folder: Path) -> int:
        """Validate a checkpoint against this run, then load it; returns its step."""
        try:
            state, trainable = read_checkpoint(folder)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        mine = self.trainable_state()
        checks = [
            ("stage", state.get("stage"), self.config.stage, "another stage"),
            ("start", state.get("start"), self.start, "another starting model (--from)"),
            ("global_batch", state.get("global_batch"), self.global_batch, "batch_size x processes x accumulation"),
            ("max_steps", state.get("max_steps"), self.max_steps, "the learning-rate schedule would change"),
        ]
        for key, theirs, ours, why in checks:
            if theirs != ours:
                raise ConfigError(f"{folder}: written with {key} {theirs!r}, this run has {ours!r} ({why})")
        if set(trainable) != set(mine):
            diff = sorted(set(trainable) ^ set(mine))
            raise ConfigError(f"{folder}: its trained tensors differ from this run's ({diff[:3]}...): another recipe?")
        for name, param in mine.items():
            if tuple(trainable[name].shape) != tuple(param.shape):
                raise ConfigError(
                    f"{folder}: {name} has shape {tuple(trainable[name].shape)}, expected {tuple(param.shape)}"
                )
        with torch.no_grad():
            for name, param in mine.items():
                param.copy_(trainable[name].to(param))
        restore_checkpoint(self.accelerator, folder, state, optimizer=self.optimizer, scheduler=self.scheduler)
        step = int(state["step"])
        logger.info("resumed from %s at step %d", folder, step)
        return step

    def _write_run_files(self, start_step: int) -> None:
        import yaml

        (self.output_dir / "train_config.yaml").write_text(yaml.safe_dump(self.config.to_dict(), sort_keys=False))
        metrics = self.output_dir / METRICS_FILE
        if metrics.exists():  # keep the lines up to the step we resume from (a straight run's file, exactly)
            kept = []
            for number, line in enumerate(metrics.read_text().splitlines(), start=1):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    logger.warning("%s line %d is not valid JSON (a killed write?): dropped", metrics, number)
                    continue
                if isinstance(record, dict) and record.get("step", 0) <= start_step:
                    kept.append(line)
            tmp = metrics.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(metrics)

    def _tensorboard(self, start_step: int):
        if not self.accelerator.is_main_process:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard not installed: metrics.jsonl still has everything
            logger.warning("tensorboard is not installed: writing metrics.jsonl only")
            return None
        return SummaryWriter(str(self.output_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def _log(self, step: int, metrics: dict, writer) -> None:
        if not self.accelerator.is_main_process:
            return
        record = {"step": step, **{k: (round(v, 8) if isinstance(v, float) else v) for k, v in metrics.items()}}
        with open(self.output_dir / METRICS_FILE, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if writer is not None:
            for key, value in metrics.items():
                writer.add_scalar(f"train/{key}", value, step)

    def _save_final(self) -> Path:
        from anygpt.core.pipeline import AnyGPTPipeline

        acc = self.accelerator
        acc.wait_for_everyone()
        folder = self.output_dir / FINAL_DIR
        if self.sharded:
            # the live parameters are shards: write the gathered tensors into a fresh copy of the model
            state = self.gathered_trainable()
            if acc.is_main_process:
                pipe = self.load_pipeline()
                rows = apply_trainable(pipe.model, self.trainable)
                copy = StageModule(pipe.model, rows, distance=self.config.loss.distance)
                with torch.no_grad():
                    for name, param in copy.named_parameters():
                        if name in state:
                            param.copy_(state[name].to(param))
                if rows is not None:
                    rows.remove()
                pipe.save_pretrained(folder)
        else:
            if self.token_rows is not None:
                self.token_rows.merge()
            if acc.is_main_process:
                AnyGPTPipeline(self.model, self.decoders).save_pretrained(folder)
        if acc.is_main_process:
            logger.info("stage %d done: %s", self.config.stage, folder)
        acc.wait_for_everyone()
        return folder


def _adapters_trained(folder: Path, entry: str | dict) -> bool:
    """Whether a saved LoRA part changes the model: any ``lora_B`` non-zero (peft starts every B at 0, so the
    adapter that stages 1 and 2 carry along untouched is a no-op and may be replaced by other LoRA settings)."""
    from safetensors import safe_open

    from anygpt.core.index import resolve_part

    for rel in [entry] if isinstance(entry, str) else list(entry.values()):
        with safe_open(resolve_part(folder, rel, "lora") / "adapter_model.safetensors", framework="pt") as f:
            if any("lora_B" in key and bool(f.get_tensor(key).any()) for key in f.keys()):
                return True
    return False


def _step_of(folder: Path) -> int:
    return int(folder.name.rsplit("-", 1)[-1])


def _install_sigint(trainer: StageTrainer):
    """First Ctrl-C: finish the step, write a checkpoint, stop. Second Ctrl-C: stop at once (no checkpoint)."""

    def handler(signum, frame):
        if trainer._stop:
            raise KeyboardInterrupt
        trainer._stop = True
        logger.warning("Ctrl-C: stopping after this step with a checkpoint (press again to stop at once)")

    try:
        return signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: no handler, Ctrl-C stops at once
        return None


def _restore_sigint(previous) -> None:
    if previous is not None:
        try:
            signal.signal(signal.SIGINT, previous)
        except ValueError:
            pass


def train_stage(config: TrainConfig, **kwargs) -> Path:
    """Run one stage (see ``StageTrainer``); returns the ``final/`` folder."""
    return StageTrainer(config, **kwargs).train()
