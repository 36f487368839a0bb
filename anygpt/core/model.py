"""``AnyGPTModel``: the trainable heart of the system (encoder, input projectors, LLM with LoRA, output projectors).

The decoders are not part of it: they are frozen, heavy and needed only to render outputs (the pipeline owns
them) or to give caption embeddings (training asks them). Training recipes and the pipeline use this one class.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from anygpt.base.errors import CheckpointError, ConfigError, UsageError
from anygpt.base.modality import Modality
from anygpt.core.config import AnyGPTConfig
from anygpt.core.conversation import MediaRef, Piece
from anygpt.core.fusion import GatedCrossAttentionLayers, find_decoder_layers, media_context
from anygpt.core.index import check_tokenizer_folder, read_json, read_weights, resolve_part
from anygpt.core.llm import build_language_model, tokenizer_dir_of
from anygpt.core.lora import (
    activate_adapters,
    active_adapters,
    adapter_names,
    apply_lora,
    check_selection,
    combine_adapters,
    drop_combined,
    load_adapters,
    save_adapters,
)
from anygpt.core.runtime import RuntimeOptions
from anygpt.core.tokens import (
    ModalityTokens,
    add_modality_tokens,
    gather_signal_hidden_states,
    init_added_token_rows,
    splice_features,
)
from encoders import build_imagebind_encoder
from encoders.anyres import max_tiles
from projectors import build_input_projector, build_output_projector, get_input_projector_class
from projectors.token_merge import parse_token_merge

logger = logging.getLogger(__name__)

TOKEN_ROWS_FILE = "token_embeddings.safetensors"
CROSS_ATTENTION_FILE = "cross_attention.safetensors"


class AnyGPTModel(nn.Module):
    """Encoder -> input projectors -> LLM -> output projectors.

    Build it with ``AnyGPTModel.build(config, decoder_specs)``. Every part is frozen after building; training
    recipes choose what to unfreeze.
    """

    def __init__(
        self,
        config: AnyGPTConfig,
        *,
        encoder: nn.Module,
        language_model: nn.Module,
        tokenizer,
        tokens: ModalityTokens,
        input_projectors: nn.ModuleDict,
        output_projectors: nn.ModuleDict,
        decoder_specs: dict,
        cross_attention: GatedCrossAttentionLayers | None = None,
    ):
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.language_model = language_model
        self.tokenizer = tokenizer
        self.tokens = tokens
        self.input_projectors = input_projectors
        self.output_projectors = output_projectors
        self.decoder_specs = dict(decoder_specs)
        self.cross_attention = cross_attention  # gated cross-attention blocks (installed on the LLM), or None
        self._combined_adapters: dict[tuple, str] = {}  # (names, weights) -> peft adapter (set_lora_adapters)
        # Where the computation runs when the weights wait elsewhere (offloading, anygpt.core.runtime); None: where the
        # LLM's input embeddings are.
        self.execution_device: torch.device | None = None
        # Base-vocabulary rows loaded with trained values (an imported model's whole tables, anygpt.apps.convert):
        # save_trained writes them again beside the added rows.
        self.trained_base_rows: list[int] = []
        self._setup_image_input()

    def _setup_image_input(self) -> None:
        """Token merging and the image resolution (``config.image_input``): what the connectors allow, the AnyRes
        grids within the token budget, and the encoder's default.

        Raises:
            ConfigError: ``token_merge`` on a connector giving one token per item; ``resolution: anyres`` on a connector
                that reads no token sequence, or with no grid within ``max_image_tokens``; a fixed image over it.
        """
        config = self.config
        where = "input_projector.options.token_merge"
        self.token_merge = parse_token_merge(config.input_projector.options.get("token_merge"), where)
        if self.token_merge is not None:
            for name, projector in self.input_projectors.items():
                if projector.num_output_tokens < 2:
                    raise ConfigError(
                        f"{where}: the {config.input_projector.name} connector gives one token per {name} item: "
                        "nothing to merge (use a connector that gives a token sequence, e.g. perceiver, or "
                        "source: tokens)"
                    )
        image = self.config.image_input
        # grids AnyRes may use (within the budget); empty with the reason when this model cannot read images so
        self.anyres_grids: tuple[tuple[int, int], ...] = ()
        self.anyres_unavailable: str | None = None
        self._image_view_tokens = 0  # N, the encoder's tokens per image view
        key = Modality.IMAGE.value
        projector = self.input_projectors[key] if key in self.input_projectors else None
        if projector is None:
            self.anyres_unavailable = "this model reads no image input"
        elif not projector.uses_tokens:
            self.anyres_unavailable = (
                f"the {config.input_projector.name} connector reads one pooled embedding per image, not the token "
                "sequence AnyRes tiles (use group, qformer, perceiver, cabstractor, or linear / mlp with source: "
                "tokens)"
            )
        else:
            budget = image.max_image_tokens
            fixed = self.num_media_features(Modality.IMAGE, views=1)
            if budget is not None and fixed > budget:
                raise ConfigError(
                    f"image_input.max_image_tokens: an image takes {fixed} tokens with the "
                    f"{config.input_projector.name} connector at fixed resolution, over the budget of {budget}"
                )
            fits = [
                (rows, cols)
                for rows, cols in image.anyres_grids
                if budget is None or self.num_media_features(Modality.IMAGE, views=1 + rows * cols) <= budget
            ]
            self.anyres_grids = tuple(fits)
            if not fits:
                smallest = min(rows * cols for rows, cols in image.anyres_grids)
                need = self.num_media_features(Modality.IMAGE, views=1 + smallest)
                self.anyres_unavailable = (
                    f"no grid of image_input.anyres_grids fits image_input.max_image_tokens {budget} (the smallest, "
                    f"{smallest} tile(s), takes {need} tokens)"
                )
            prefix, height, width = self.encoder.token_grid(Modality.IMAGE)
            self._image_view_tokens = prefix + height * width
        if image.resolution == "anyres" and self.anyres_unavailable:
            raise ConfigError(f"image_input.resolution: 'anyres' is not possible: {self.anyres_unavailable}")
        if hasattr(self.encoder, "set_image_input"):
            self.encoder.set_image_input(image.resolution, self.anyres_grids or image.anyres_grids)

    # ------------------------------------------------------------------ building
    @classmethod
    def build(
        cls,
        config: AnyGPTConfig,
        decoder_specs: dict,
        *,
        tokenizer_dir: str | os.PathLike | None = None,
        runtime: RuntimeOptions | None = None,
        empty_weights: bool = False,
    ) -> AnyGPTModel:
        """Build every component from ``config``.

        Works under ``with torch.device("meta")`` too (tiny components; nothing is allocated).

        Args:
            config: the system config.
            decoder_specs: ``DecoderSpec`` per output modality (sets each output projector's query count and size).
            tokenizer_dir: a saved tokenizer (with the added tokens) to use instead of the LLM's own; its files are
                checked first (``anygpt.core.index.check_tokenizer_folder``: a damaged one is a ``CheckpointError``).
            runtime: how the LLM is loaded (dtype, quantization, device map; see ``build_language_model``). Other
                placement is the pipeline's (``AnyGPTPipeline.from_pretrained(runtime=...)``).
            empty_weights: build every component on the meta device and read no weights, for sizes and memory
                estimates (``anygpt.core.memory``): real backbones need only their configs (or known architectures).
        """
        if empty_weights and torch.get_default_device().type != "meta":
            with torch.device("meta"):
                return cls.build(
                    config, decoder_specs, tokenizer_dir=tokenizer_dir, runtime=runtime, empty_weights=True
                )
        if tokenizer_dir is not None:
            check_tokenizer_folder(tokenizer_dir)  # a damaged file named in one line, not deep in transformers
        encoder = build_imagebind_encoder(config.encoder, seed=config.seed, empty_weights=empty_weights)
        llm, tokenizer = build_language_model(
            config.llm, tokenizer_dir=tokenizer_dir, runtime=runtime, empty_weights=empty_weights
        )
        num_old = llm.get_input_embeddings().weight.shape[0]
        tokens = add_modality_tokens(tokenizer, config.signal_tokens)
        init_added_token_rows(llm, tokenizer, tokens, num_old=num_old, seed=config.seed)
        if config.llm.lora is not None:
            llm = apply_lora(llm, config.llm.lora, seed=config.seed)  # every adapter, A drawn from the seed
        hidden = llm.get_input_embeddings().weight.shape[1]

        inputs = nn.ModuleDict()
        outputs = nn.ModuleDict()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            for name in config.input_modalities:
                m = Modality(name)
                options = dict(config.input_projector.options)
                options.pop("token_merge", None)  # the model's option, applied to the connector's output
                if get_input_projector_class(config.input_projector.name).uses_grid:
                    options.setdefault("grid", list(encoder.token_grid(m)))  # this modality's patch layout
                inputs[name] = build_input_projector(
                    config.input_projector.name,
                    in_dim=encoder.embed_dim,
                    token_dim=encoder.token_dim(m),
                    out_dim=hidden,
                    **options,
                )
            for m in config.output_modalities:
                spec = decoder_specs[m]
                options = config.output_projector_options(m)
                num_queries = options.pop("num_queries", spec.cond_len)
                if not spec.pooled and num_queries != spec.cond_len:
                    raise ValueError(
                        f"output projector for {m.value}: num_queries {num_queries} differs from the decoder's "
                        f"conditioning length {spec.cond_len}; set decoders.{m.value}.cond_len instead"
                    )
                outputs[m.value] = build_output_projector(
                    config.output_projector.name,
                    in_dim=hidden,
                    out_dim=spec.cond_dim,
                    num_queries=num_queries,
                    num_signal_tokens=config.signal_tokens.count(m),
                    **options,
                )
        cross_attention = None
        if config.cross_attention is not None:  # built last, from its own seed: every other weight is as without
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)
                cross_attention = GatedCrossAttentionLayers(
                    config.cross_attention, hidden_size=hidden, num_layers=len(find_decoder_layers(llm))
                )
            cross_attention.install(llm)
        model = cls(
            config,
            encoder=encoder,
            language_model=llm,
            tokenizer=tokenizer,
            tokens=tokens,
            input_projectors=inputs,
            output_projectors=outputs,
            decoder_specs=decoder_specs,
            cross_attention=cross_attention,
        )
        model.requires_grad_(False)
        model.eval()
        return model

    # ------------------------------------------------------------------ properties
    @property
    def hidden_size(self) -> int:
        return self.language_model.get_input_embeddings().weight.shape[1]

    @property
    def device(self) -> torch.device:
        """Where inputs go: :attr:`execution_device` when offloading, else where the LLM's input embeddings are."""
        if self.execution_device is not None:
            return self.execution_device
        return self.language_model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.get_input_embeddings().weight.dtype

    def num_media_tokens(self, modality: Modality, *, views: int | None = None) -> int:
        """How many LLM tokens one media item of ``modality`` becomes: its features (:meth:`num_media_features`), or 1
        when the model reads its media only through gated cross-attention (``cross_attention.inline`` false: one
        placeholder marks the item).

        Args:
            views: image views of the item (1: fixed resolution; ``1 + tiles`` with AnyRes); None: the model's
                default (``image_input.resolution``).
        """
        if self.config.cross_attention is not None and not self.config.cross_attention.inline:
            return 1
        return self.num_media_features(modality, views=views)

    def num_media_features(self, modality: Modality, *, views: int | None = None) -> int:
        """How many projected features one media item of ``modality`` gives: ``V * K' + (V - 1)`` for ``V`` views
        (``K'`` the connector's tokens per view after ``token_merge``; a separator between consecutive views), K' for
        one view (video, audio, fixed-resolution images)."""
        modality = Modality.parse(modality)
        if views is None:
            views = self.image_views() if modality is Modality.IMAGE else 1
        count = self.input_projectors[modality.value].num_output_tokens
        if self.token_merge is not None:
            count = self.token_merge.count(count)
        return views * count + views - 1

    def resolve_image_resolution(self, requested: str | None = None, where: str = "") -> str:
        """The resolution a call reads its images at: ``requested`` (``"fixed"`` / ``"anyres"``) or, when None, the
        config's ``image_input.resolution``.

        Raises:
            UsageError: naming ``image_resolution`` (after ``where``): an unknown value, or AnyRes on a model that
                cannot read it (its connector reads no token sequence, or no grid fits its token budget).
        """
        resolution = self.config.image_input.resolution if requested is None else requested
        if resolution not in ("fixed", "anyres"):
            raise UsageError(f"{where}image_resolution must be 'fixed', 'anyres' or None, got {requested!r}")
        if resolution == "anyres" and self.anyres_unavailable:
            raise UsageError(f"{where}image_resolution: 'anyres' is not possible with this model: "
                             f"{self.anyres_unavailable}")  # fmt: skip
        return resolution

    def image_views(self, resolution: str | None = None) -> int:
        """Views per image at ``resolution`` (None: the config's): 1 fixed, ``1 + max tiles`` of the usable grids
        with AnyRes."""
        if self.resolve_image_resolution(resolution) == "fixed":
            return 1
        return 1 + max_tiles(self.anyres_grids)

    def views_in(self, modality: Modality, tokens: torch.Tensor | None) -> int:
        """How many image views an encoder token sequence (M, V * N, D_tok) holds: 1 unless it is an AnyRes image's
        (``encoders.anyres``: the views' N-token sequences one after the other)."""
        n = self._image_view_tokens
        projector = self.input_projectors[modality.value] if modality.value in self.input_projectors else None
        if modality is not Modality.IMAGE or tokens is None or not n or projector is None or not projector.uses_tokens:
            return 1
        length = tokens.shape[1]
        return length // n if length > n and length % n == 0 else 1

    # ------------------------------------------------------------------ LoRA adapters
    @property
    def lora_adapters(self) -> list[str]:
        """The LLM's LoRA adapters: ``[]`` (none), ``["default"]`` (one) or per-modality names (``lora.adapters``)."""
        return adapter_names(self.config.llm.lora)

    @property
    def active_lora_adapters(self) -> list[str]:
        """The adapters the LLM runs with now (a combination shows as its peft name, ``combined_N``)."""
        return active_adapters(self.language_model) if self.lora_adapters else []

    def set_lora_adapters(self, names: str | list[str], weights: list[float] | None = None) -> None:
        """Choose the LoRA adapter(s) the LLM runs with, at run time and without reloading.

        One name (weight None or 1) activates that adapter. Several names (or one with another weight) run with one
        adapter whose update is the weighted sum of theirs, ``sum_i weights[i] * delta_W(names[i])`` (weights None:
        equal weights summing to 1, their mean), which peft's ``add_weighted_adapter(combination_type="cat")``
        builds exactly on first use and the model keeps for the next (see ``anygpt.core.lora``). Switching back to an
        adapter gives exactly its outputs again. ``requires_grad`` flags are left as they are.

        Args:
            names: adapter names (``lora_adapters``).
            weights: one finite weight >= 0 per name.

        Raises:
            ValueError: an unknown or repeated name (the message lists the model's adapters), bad weights, or a
                model without LoRA.

        Example:
            >>> model.set_lora_adapters("image")  # doctest: +SKIP
            >>> model.set_lora_adapters(["text", "image"], [0.5, 0.5])  # doctest: +SKIP
        """
        names, weights = check_selection(self.lora_adapters, names, weights)
        if len(names) == 1 and weights in (None, [1.0]):
            activate_adapters(self.language_model, names)
            return
        if weights is None:
            weights = [1.0 / len(names)] * len(names)
        combined = combine_adapters(self.language_model, names, weights, self._combined_adapters)
        activate_adapters(self.language_model, [combined])

    def _drop_combined_adapters(self) -> None:
        drop_combined(self.language_model, self._combined_adapters, self.lora_adapters[:1])

    # ------------------------------------------------------------------ inputs
    def project_media(self, modality: Modality, embeds: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
        """Encoder features -> LLM input embeddings.

        An AnyRes image (tokens of ``V`` views, :meth:`views_in`) is projected view by view, as ``V`` images; the
        views' outputs follow each other, global view first, with the image placeholder's embedding row between
        consecutive views (:meth:`view_separator`). ``token_merge`` (the input projector's option) merges each
        view's K output tokens down to K' (``projectors.token_merge``).

        Args:
            embeds: (M, D) pooled encoder embeddings. tokens: (M, N, D_tok) encoder token sequences (M, V * N, D_tok)
                for AnyRes images.

        Returns:
            (M, K', H), or (M, V * K' + V - 1, H) for AnyRes images.
        """
        if modality.value not in self.input_projectors:
            raise ValueError(
                f"this model reads no {modality.value} input (input modalities: {self.config.input_modalities})"
            )
        projector = self.input_projectors[modality.value]
        dtype = next(projector.parameters()).dtype
        tokens = tokens.to(dtype) if (tokens is not None and projector.uses_tokens) else None
        views = self.views_in(modality, tokens)
        embeds = embeds.to(dtype)
        if views > 1:  # each view as an image of its own: (M * V, N, D_tok)
            tokens = tokens.reshape(tokens.shape[0] * views, tokens.shape[1] // views, tokens.shape[2])
            embeds = embeds.repeat_interleave(views, dim=0)
        out = projector(embeds, tokens)  # (M * V, K, H)
        if self.token_merge is not None:
            out = self.token_merge(out)
        if views == 1:
            return out
        items, count, hidden = out.shape[0] // views, out.shape[1], out.shape[2]
        separator = self.view_separator(modality).to(device=out.device, dtype=out.dtype)
        out = torch.cat([out.reshape(items, views, count, hidden), separator.expand(items, views, 1, hidden)], dim=2)
        return out.reshape(items, views * (count + 1), hidden)[:, :-1]  # no separator after the last view

    def view_separator(self, modality: Modality) -> torch.Tensor:
        """(H,) the marker between an AnyRes image's views: the modality's placeholder row of the LLM's input
        embeddings (never seen otherwise: placeholder positions hold the features), so it needs no new weight and
        trains with the added rows when a stage trains them."""
        ids = torch.tensor([[self.tokens.placeholder[modality]]], device=self.device)
        return self.language_model.get_input_embeddings()(ids)[0, 0]

    def tokenize_pieces(
        self, pieces: list[Piece], *, add_bos: bool = True, counts: dict[str, int] | None = None
    ) -> tuple[list[int], list[MediaRef]]:
        """Prompt pieces -> token ids, and the media items in the order their placeholders appear.

        Neighbouring text pieces are joined and tokenised together (so a SentencePiece tokenizer sees the text as
        one string), with special tokens split: user text can never produce a placeholder or signal token (prompts
        may contain ``<``, ``>``, ``<image>`` or ``[IMG0]`` freely). The tokenizer's BOS token starts the sequence.

        Args:
            counts: placeholder tokens per media key (an image read at another resolution than the model's default);
                an item not in it takes :meth:`num_media_tokens`.
        """
        ids: list[int] = []
        if add_bos and self.tokenizer.bos_token_id is not None:
            ids.append(self.tokenizer.bos_token_id)
        order: list[MediaRef] = []
        text: list[str] = []

        def flush() -> None:
            if text:
                joined = "".join(text)
                ids.extend(self.tokenizer(joined, add_special_tokens=False, split_special_tokens=True).input_ids)
                text.clear()

        for piece in pieces:
            if isinstance(piece, str):
                text.append(piece)
                continue
            flush()
            if isinstance(piece, MediaRef):
                count = (counts or {}).get(piece.key)
                count = self.num_media_tokens(piece.modality) if count is None else count
                ids.extend([self.tokens.placeholder[piece.modality]] * count)
                order.append(piece)
            else:
                ids.extend(int(i) for i in piece)
        flush()
        return ids, order

    def embed_inputs(self, input_ids: torch.Tensor, media: dict[Modality, torch.Tensor]) -> torch.Tensor:
        """Token embeddings with every modality's projected features spliced in at its placeholders.

        With gated cross-attention this also sets the blocks' media context (each row's features, in placeholder
        order) for the LLM forwards that follow, generation steps included; when ``cross_attention.inline`` is
        false nothing is spliced: each item's one placeholder keeps its token embedding.

        Args:
            input_ids: (B, T).
            media: per modality, (M, K, H) projected features in placeholder order. A modality that has
                placeholders in ``input_ids`` but no entry raises ``ValueError``.

        Returns:
            (B, T, H).
        """
        embeds = self.language_model.get_input_embeddings()(input_ids)
        inline = self.cross_attention is None or self.config.cross_attention.inline
        given = {}
        for modality, placeholder in self.tokens.placeholder.items():
            features = media.get(modality)
            if features is None:
                features = embeds.new_zeros((0, 1, embeds.shape[-1]))
            given[placeholder] = features
            if inline:
                embeds = splice_features(embeds, input_ids, placeholder, features)
        if self.cross_attention is not None:
            self.cross_attention.set_context(*media_context(input_ids, given, inline=inline))
        return embeds

    # ------------------------------------------------------------------ outputs
    def signal_conditioning(
        self, modality: Modality, hidden_states: torch.Tensor, input_ids: torch.Tensor
    ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Decoder conditioning for every complete signal group of ``modality`` in ``input_ids``.

        Args:
            hidden_states: (B, T, H) last-layer hidden states. input_ids: (B, T).

        Returns:
            (G, L, D) conditioning (``(G, D)`` for a pooled decoder), and where each group was found.
        """
        group = self.tokens.signal[modality]
        hidden, where = gather_signal_hidden_states(hidden_states, input_ids, group)
        spec = self.decoder_specs[modality]
        projector = self.output_projectors[modality.value]
        if not where:
            shape = (0, spec.cond_dim) if spec.pooled else (0, spec.cond_len, spec.cond_dim)
            return hidden_states.new_zeros(shape), where
        ids = torch.tensor(group, device=input_ids.device).expand(len(where), -1)
        input_embeds = self.language_model.get_input_embeddings()(ids)
        dtype = next(projector.parameters()).dtype
        cond = projector(hidden.to(dtype), input_embeds.to(dtype))  # (G, L, D)
        if spec.pooled:
            cond = cond.mean(dim=1)  # (G, D): a pooled decoder takes the mean of the queries (one query: itself)
        return cond, where

    # ------------------------------------------------------------------ persistence of trained parts
    def save_trained(self, folder: str | os.PathLike) -> dict:
        """Write the trained parts (projectors, LoRA adapter, added-token rows, tokenizer) into ``folder``.

        Returns:
            the relative paths written, for the pipeline's index.
        """
        folder = Path(folder)
        parts: dict = {"input_projectors": {}, "output_projectors": {}}
        for side, modules in (
            ("input_projectors", self.input_projectors),
            ("output_projectors", self.output_projectors),
        ):
            for name, module in modules.items():
                rel = f"{side}/{name}"
                module.save_pretrained(folder / rel)
                parts[side][name] = rel
        if self.cross_attention is not None:  # its config is in the index (config.cross_attention)
            state = {k: v.detach().cpu().contiguous() for k, v in self.cross_attention.state_dict().items()}
            save_file(state, folder / CROSS_ATTENTION_FILE)
            parts["cross_attention"] = CROSS_ATTENTION_FILE
        if self.config.llm.lora is not None:  # "lora" (one adapter) or {name: "lora/<name>"} (per-modality)
            parts["lora"] = save_adapters(self.language_model, self.config.llm.lora, folder)
        ids = torch.tensor(sorted({*self.tokens.all_added_ids, *self.trained_base_rows}))
        rows = {"token_ids": ids, "input_embeddings": self.language_model.get_input_embeddings().weight[ids]}
        out = self.language_model.get_output_embeddings()
        if out is not None:
            rows["output_embeddings"] = out.weight[ids]
        save_file({k: v.detach().cpu().contiguous() for k, v in rows.items()}, folder / TOKEN_ROWS_FILE)
        parts["token_embeddings"] = TOKEN_ROWS_FILE
        self.tokenizer.save_pretrained(tokenizer_dir_of(folder))
        parts["tokenizer"] = "tokenizer"
        return parts

    @torch.no_grad()
    def load_trained(self, folder: str | os.PathLike, parts: dict, *, skip: set[str] | frozenset = frozenset()) -> None:
        """Load what ``save_trained`` wrote (the model must have been built from the same config).

        Every file is checked before a tensor is copied into the model: it resolves inside ``folder``, it is a
        readable safetensors file holding exactly the model's keys with the model's shapes, and finite values.

        Args:
            skip: parts left as built (e.g. ``{"input_projectors"}`` when a run swaps in another connector).

        Raises:
            CheckpointError: one line naming the file (and the key, the expected and the found shape) of a damaged,
                foreign or missing part.
        """
        from diffusers.utils import SAFETENSORS_WEIGHTS_NAME

        sides = (("input_projectors", self.input_projectors), ("output_projectors", self.output_projectors))
        for side, modules in sides:
            if side in skip:
                continue
            saved = parts.get(side, {})
            if set(saved) != set(modules):
                raise CheckpointError(f"{folder}: {side} holds {sorted(saved)}, the config declares {sorted(modules)}")
            for name, rel in saved.items():
                where = resolve_part(folder, rel, f"{side}.{name}")
                saved_config = read_json(where / "config.json", folder=folder, what=f"{side}.{name} config")
                ours = json.loads(json.dumps(dict(modules[name].config)))  # as JSON sees it (tuples -> lists)
                differ = {k for k, v in ours.items() if not k.startswith("_") and saved_config.get(k, v) != v}
                if differ:
                    raise CheckpointError(f"{where}/config.json: {sorted(differ)} differ from the model's config")
                path = where / SAFETENSORS_WEIGHTS_NAME
                state = read_weights(path, folder=folder, expected=modules[name].state_dict(), what=f"{side}.{name}")
                _load_state(modules[name], state, path)
        if "cross_attention" not in skip and (self.cross_attention is not None or parts.get("cross_attention")):
            if self.cross_attention is None or not parts.get("cross_attention"):
                has = "has no" if self.cross_attention is None else "has"
                holds = "holds" if parts.get("cross_attention") else "holds no"
                raise CheckpointError(f"{folder}: {holds} cross-attention blocks, the config {has} cross_attention")
            where = resolve_part(folder, parts["cross_attention"], "cross_attention")
            expected = self.cross_attention.state_dict()
            state = read_weights(where, folder=folder, expected=expected, what="cross_attention")
            _load_state(self.cross_attention, state, where)
        if parts.get("lora"):
            self._drop_combined_adapters()  # combinations of the old weights
            load_adapters(self.language_model, self.config.llm.lora, folder, parts["lora"])
        self._load_token_rows(folder, parts["token_embeddings"])

    def _load_token_rows(self, folder: str | os.PathLike, rel: str) -> None:
        """Load the token rows ``save_trained`` wrote (the added tokens', and trained base rows)."""
        path = resolve_part(folder, rel, "token_embeddings")
        emb = self.language_model.get_input_embeddings().weight
        out = self.language_model.get_output_embeddings()
        rows = read_weights(path, folder=folder, what="token_embeddings")
        expected = ["token_ids", "input_embeddings"] + (["output_embeddings"] if out is not None else [])
        for key in expected:
            if key not in rows:
                raise CheckpointError(f"{path}: key {key!r} is missing")
        extra = sorted(set(rows) - set(expected))
        if extra:
            raise CheckpointError(f"{path}: key {extra[0]!r} is not in the model")
        token_ids = rows["token_ids"]
        if token_ids.ndim != 1 or token_ids.is_floating_point() or token_ids.dtype == torch.bool:
            raise CheckpointError(
                f"{path}: key 'token_ids' holds {token_ids.dtype} of shape {tuple(token_ids.shape)}, "
                "expected one integer per row"
            )
        for key, table in (("input_embeddings", emb), ("output_embeddings", out.weight if out is not None else None)):
            if table is None:
                continue
            want = (len(token_ids), table.shape[1])
            if tuple(rows[key].shape) != want:
                raise CheckpointError(f"{path}: key {key!r} has shape {tuple(rows[key].shape)}, expected {want}")
            if not rows[key].is_floating_point():
                raise CheckpointError(f"{path}: key {key!r} holds {rows[key].dtype} values, expected floating-point")
        ids = token_ids.tolist()
        added = self.tokens.all_added_ids
        # the added rows, and possibly base rows too (all of them for an imported model), each once and in order
        if not ids or not set(added) <= set(ids) or ids != sorted(set(ids)) or ids[0] < 0 or ids[-1] >= emb.shape[0]:
            raise CheckpointError(
                f"{path}: token ids {ids[:4]}... do not hold the tokenizer's added ids {added[:4]}... once each "
                f"within its {emb.shape[0]} rows"
            )
        self.trained_base_rows = sorted(set(ids) - set(added))
        emb[ids] = rows["input_embeddings"].to(emb)
        if out is not None:
            out.weight[ids] = rows["output_embeddings"].to(out.weight)


def _load_state(module: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """``module.load_state_dict(state)`` (keys and shapes checked by ``read_weights``), naming ``path`` on failure."""
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: does not fit the model ({str(err).strip().splitlines()[-1].strip()})") from None
