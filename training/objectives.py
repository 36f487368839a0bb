"""What differs between training stages, as objects: what a stage trains, how it reads caption pairs, the module the
optimizer sees and its loss terms. The trainer's loop is the same for every stage; it picks one objective from the
config (:func:`objective_for`) and asks it.

======================  =====  ============================  ======================================  ================
objective               stage  trains (default)              data                                    loss terms
======================  =====  ============================  ======================================  ================
Q-Former pretraining    0      Q-Former input projectors     X-caption pairs, one media item each    BLIP-2's itc,
                               (+ the BLIP-2 objectives'     (optional, before stage 1)              itm, itg
                               heads)                                                                (training.blip2)
encoder-side alignment  1      input projectors, added       X-caption pairs (media in, caption      ce
                               token rows, cross-attention   out)
                               blocks (when the model has
                               them)
decoder-side alignment  2      output projectors, signal     caption pairs (caption in, caption +    ce, caption_<m>
                               token rows                    signal tokens out)                      (diffusion_<m>)
instruction tuning      3      LoRA, signal token rows       instruction conversations               ce, caption_<m>
                               (projectors: by option)                                               (diffusion_<m>)
======================  =====  ============================  ======================================  ================

Every loss term is a sum over its units (supervised tokens, caption targets, diffusion items, media-caption pairs);
the objective says how many units each micro-batch holds, and :class:`training.losses.LossBook` divides by the count
over the whole global batch. The model itself has no notion of a stage.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn

from anygpt.base.errors import ConfigError
from anygpt.base.modality import Modality
from anygpt.core.lora import forward_per_adapter
from projectors.qformer import QFormerInputProjector
from training.blip2 import QFormerPretrainingModule, blip2_terms
from training.config import TrainConfig
from training.data.records import Pair
from training.examples import IGNORE_INDEX
from training.losses import caption_distance_sum, token_cross_entropy_sum
from training.trainables import TokenRows, Trainable, resolve_trainable

__all__ = [
    "OBJECTIVES",
    "DecoderAlignment",
    "EncoderAlignment",
    "InstructionTuning",
    "QFormerPretraining",
    "StageModule",
    "StageObjective",
    "objective_for",
]


# ---------------------------------------------------------------------------------------------- the LLM module
class StageModule(nn.Module):
    """What the optimizer sees in stages 1 to 3: the model plus the trainable token rows; ``forward`` returns loss
    sums (``ce``, ``caption_<modality>``, ``diffusion_<modality>``)."""

    def __init__(self, model, token_rows: TokenRows | None, *, distance: str, diffusion=None):
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
            input_ids, labels, attention_mask: (B, T).
            media: per input modality, the encoder's embeddings (B_m, D) and token sequences (B_m, N, D_tok) or None.
            targets: per output modality, the caption embeddings of its signal groups (G_m, L, D).
            diffusion: per output modality, the ``training.diffusion.DiffusionInputs`` of its items with a target file.
            adapters: per row, the LoRA adapter it runs with and trains (per-modality adapters; see
                ``training.batching.Batcher.tensors``), one LLM forward per adapter; None: one forward with the
                active adapter.
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


# ---------------------------------------------------------------------------------------------- objectives
class StageObjective:
    """One stage's objective, chosen once from the config.

    Class attributes:
        stage: its number on the command line (``--stage``) and in configs.
        title: its name in logs and messages.
        trains: what trains unless the config's ``trainable:`` says otherwise.
        default_pair_task: how caption pairs are read unless ``data.pair_task`` says otherwise (``caption``: media in,
            caption out; ``generate``: caption in, caption + signal tokens out).
        unit: what the first loss term sums over, logged as a count per step (``tokens`` or ``pairs``).
    """

    stage: ClassVar[int]
    title: ClassVar[str]
    trains: ClassVar[Trainable]
    default_pair_task: ClassVar[str]
    unit: ClassVar[str] = "tokens"

    def __init__(self, config: TrainConfig):
        self.config = config
        self.trainable: Trainable = resolve_trainable(self.trains, config.trainable)
        self.pair_task: str = config.data.pair_task or self.default_pair_task

    def check(self, model, data) -> None:
        """Checks beyond the ones every stage makes (``training.batching.check_datasets``); raises ``ConfigError``."""

    def build_module(self, model, token_rows: TokenRows | None, diffusion=None) -> nn.Module:
        """The module the optimizer sees; ``forward`` takes a micro-batch and returns the loss terms' sums."""
        raise NotImplementedError

    def terms(self, model) -> list[str]:
        """The loss terms, in the order they are logged; the first is always present in ``forward``'s sums."""
        raise NotImplementedError

    def weights(self, terms: list[str]) -> dict[str, float]:
        """Each term's weight in the loss."""
        raise NotImplementedError

    def counts(self, batch: dict, terms: list[str]) -> list[int]:
        """How many units each term sums over in one micro-batch (``training.batching.Batcher.tensors``)."""
        raise NotImplementedError


class _LanguageModelObjective(StageObjective):
    """Stages 1 to 3: the LLM reads the (projected) media and the text; next-token cross-entropy of the supervised
    tokens, and, for the output side, the distance of each signal group's conditioning to its caption embedding
    (and the optional diffusion loss through the frozen decoder)."""

    def build_module(self, model, token_rows: TokenRows | None, diffusion=None) -> nn.Module:
        return StageModule(model, token_rows, distance=self.config.loss.distance, diffusion=diffusion)

    def terms(self, model) -> list[str]:
        outputs = [m.value for m in model.decoder_specs]
        return ["ce"] + [f"caption_{m}" for m in outputs] + [f"diffusion_{m}" for m in outputs]

    def weights(self, terms: list[str]) -> dict[str, float]:
        loss = self.config.loss
        weights = {"ce": 1.0}
        for name in terms[1:]:
            kind, modality = name.split("_", 1)
            factor = loss.modality_weights.get(modality, 1.0)
            if kind == "caption":
                weights[name] = loss.caption_embedding_weight * factor
            else:
                weights[name] = loss.diffusion.weight * factor
        return weights

    def counts(self, batch: dict, terms: list[str]) -> list[int]:
        counts = [int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())]  # supervised next-token positions
        for name in terms[1:]:
            kind, modality = name.split("_", 1)
            if kind == "caption":
                target = batch["targets"].get(modality)
                counts.append(0 if target is None else target.shape[0])
            else:
                inputs = batch["diffusion"].get(modality)
                counts.append(0 if inputs is None else inputs.index.shape[0])
        return counts


class EncoderAlignment(_LanguageModelObjective):
    stage = 1
    title = "encoder-side alignment"
    trains = Trainable(input_projectors=True, output_projectors=False, lora=False, token_rows="all",
                       cross_attention=None)  # fmt: skip
    default_pair_task = "caption"


class DecoderAlignment(_LanguageModelObjective):
    stage = 2
    title = "decoder-side alignment"
    trains = Trainable(input_projectors=False, output_projectors=True, lora=False, token_rows="signal")
    default_pair_task = "generate"


class InstructionTuning(_LanguageModelObjective):
    stage = 3
    title = "instruction tuning"
    trains = Trainable(input_projectors=False, output_projectors=False, lora=True, token_rows="signal")
    default_pair_task = "generate"


class QFormerPretraining(StageObjective):
    """BLIP-2's representation learning of Q-Former input projectors, before they meet the LLM (``--stage 0``,
    optional): ITC, ITM and ITG on media-caption pairs (:mod:`training.blip2`). The objectives' heads train and are
    checkpointed with the projectors; ``final/`` holds the model with its pretrained Q-Formers only."""

    stage = 0
    title = "Q-Former pretraining"
    trains = Trainable(input_projectors=True, output_projectors=False, lora=False, token_rows="none")
    default_pair_task = "caption"
    unit = "pairs"

    def check(self, model, data) -> None:
        """Q-Former input projectors, caption pairs with one media item each and room for in-batch negatives."""
        config = self.config
        source = config.source
        for name, projector in model.input_projectors.items():
            if not isinstance(projector, QFormerInputProjector):
                raise ConfigError(
                    f"{source}: input_projector: Q-Former pretraining (stage 0) trains Q-Former input projectors, "
                    f"but the model's {name} projector is {model.config.input_projector.name!r}; set "
                    "`input_projector: {name: qformer}` in the config or pass --set input_projector=qformer"
                )
        if self.pair_task != "caption":
            raise ConfigError(
                f"{source}: data.pair_task: Q-Former pretraining reads pairs as 'caption' (media in), got "
                f"{self.pair_task!r}"
            )
        if config.train.batch_size < 2:
            raise ConfigError(
                f"{source}: train.batch_size: Q-Former pretraining contrasts each pair with the rest of its "
                f"micro-batch (ITC, ITM negatives); needs >= 2, got {config.train.batch_size}"
            )
        for dataset, records in zip(data.names, data.records, strict=True):
            for record in records:
                count = 1 if isinstance(record, Pair) else sum(len(t.inputs) for t in record.turns)
                outputs = 0 if isinstance(record, Pair) else sum(len(t.outputs) for t in record.turns)
                if count != 1 or outputs:
                    raise ConfigError(
                        f"{source}: dataset {dataset}: record {record.index} has {count} media inputs and {outputs} "
                        "media outputs; Q-Former pretraining needs exactly one media input per example "
                        "(media-caption pairs)"
                    )

    def build_module(self, model, token_rows: TokenRows | None, diffusion=None) -> nn.Module:
        config = self.config
        return QFormerPretrainingModule.for_model(model, config.loss.blip2, seed=config.train.seed)

    def terms(self, model) -> list[str]:
        return list(blip2_terms(self.config.loss.blip2))

    def weights(self, terms: list[str]) -> dict[str, float]:
        return {name: getattr(self.config.loss.blip2, name) for name in terms}

    def counts(self, batch: dict, terms: list[str]) -> list[int]:
        return [batch["labels"].shape[0]] * len(terms)  # each term sums over the micro-batch's pairs


OBJECTIVES: dict[int, type[StageObjective]] = {
    cls.stage: cls for cls in (QFormerPretraining, EncoderAlignment, DecoderAlignment, InstructionTuning)
}


def objective_for(config: TrainConfig) -> StageObjective:
    """The objective of ``config.stage`` (validated by the config: 0, 1, 2 or 3)."""
    return OBJECTIVES[config.stage](config)
