"""``AnyGPTPipeline``: text + images / audio / video in, text + images / videos / audio out.

Example:
    >>> from anygpt import AnyGPTPipeline, GenerationRequest
    >>> pipe = AnyGPTPipeline.from_pretrained("tiny")
    >>> out = pipe("draw a red circle", modalities=["image"], seed=0)
    >>> out.images[0].save("circle.png")
    >>> request = GenerationRequest("draw a red circle", modalities=["image"], seed=0)
    >>> pipe.run(request).images[0].size == out.images[0].size  # the keyword call builds this request
    True
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading
from collections.abc import Callable, Container, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import (
    LogitsProcessorList,
)

from anygpt.base.errors import GenerationStopped, UnknownModelError, UsageError
from anygpt.base.logs import is_progress_bar_enabled, quiet_libraries
from anygpt.base.media import Audio, load_media
from anygpt.base.modality import MEDIA_MODALITIES, Modality
from anygpt.base.utils import atomic_directory
from anygpt.core.batch import BatchGenerationMixin, serialized
from anygpt.core.config import PACKAGED_MODELS, AnyGPTConfig, config_from_preset, list_presets
from anygpt.core.conversation import Conversation, MediaRef, get_template
from anygpt.core.index import INDEX_FILE, packaged_model_dir, read_index, resolve_part, write_index
from anygpt.core.lora import check_selection
from anygpt.core.memory import default_runtime
from anygpt.core.model import AnyGPTModel
from anygpt.core.output import AnyGPTOutput
from anygpt.core.placement import PlacementMixin
from anygpt.core.request import DECODER_SETTINGS, GenerationRequest, MediaInput, check_media_item
from anygpt.core.runtime import (
    ModelOffload,
    RuntimeOptions,
)
from anygpt.core.tokens import SignalTokenProcessor, repair_signal_groups, reply_text
from decoders import build_decoder

logger = logging.getLogger(__name__)

__all__ = ["DECODER_SETTINGS", "AnyGPTOutput", "AnyGPTPipeline", "GenerationRequest", "MediaInput", "find_model"]

StepCallback = Callable[[Any, int, Any, dict[str, Any]], dict[str, Any]]
"""diffusers' ``callback_on_step_end(pipe, step, timestep, callback_kwargs) -> callback_kwargs``."""


def find_model(name_or_dir: str | os.PathLike) -> tuple[Path | None, AnyGPTConfig, dict | None]:
    """Where a model comes from: ``(folder, config, trained parts)`` of a ``save_pretrained`` folder or a model
    shipped in the package, or ``(None, config, None)`` for a preset (built untrained).

    Raises:
        UnknownModelError: neither (a folder without an index, or an unknown name).
        ValueError: an invalid index (``read_index``).
    """
    path = Path(name_or_dir).expanduser()
    if not (path / INDEX_FILE).is_file() and str(name_or_dir) in PACKAGED_MODELS:
        path = packaged_model_dir(str(name_or_dir))  # a shipped trained model: its trained parts too
    if (path / INDEX_FILE).is_file():
        config, parts = read_index(path)
        return path, config, parts
    name = str(name_or_dir)
    if name in list_presets():  # a preset's name wins over a folder of that name without an index
        return None, config_from_preset(name), None
    if path.is_dir():
        raise UnknownModelError(f"{path} is a folder but holds no {INDEX_FILE} (not written by save_pretrained)")
    raise UnknownModelError(f"unknown model {name!r}: not a folder, and presets are {', '.join(list_presets())}")


class AnyGPTPipeline(PlacementMixin, BatchGenerationMixin):
    """Any-to-any generation: a frozen encoder, projectors, an LLM and diffusers decoders.

    Args:
        model: the encoder / projectors / LLM system.
        decoders: ``decoders.Decoder`` per output modality. Each loads its diffusers pipeline on first use and
            keeps it.

    Threads: ``__call__``, ``run`` and ``run_batch`` hold the pipeline's lock for the whole call, so calls from
    several threads run one after the other (each as if alone: its seed, its adapters, the shared schedulers);
    batching concurrent requests is the server's work (``run_batch``).
    """

    def __init__(self, model: AnyGPTModel, decoders: dict[Modality, Any]):
        self._call_lock = threading.RLock()  # re-entrant: __call__ -> run_batch -> run
        self.model = model
        self.decoders = {Modality.parse(k): v for k, v in decoders.items()}
        self._runtime: RuntimeOptions | None = None
        self._offload: str | None = None  # the active offload plan (enable_*_offload)
        self._model_offload: ModelOffload | None = None

    @property
    def config(self) -> AnyGPTConfig:
        return self.model.config

    @property
    def tokenizer(self):
        return self.model.tokenizer

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    @quiet_libraries()
    def from_config(
        cls,
        config: AnyGPTConfig,
        *,
        tokenizer_dir: str | os.PathLike | None = None,
        runtime: RuntimeOptions | None = None,
    ) -> AnyGPTPipeline:
        """Build a pipeline from a config (trained parts freshly initialised), placed as ``runtime`` says."""
        pipe = cls._build(config, tokenizer_dir, runtime)
        if runtime is not None:
            pipe.apply_runtime(runtime)
        return pipe

    @classmethod
    def _build(
        cls, config: AnyGPTConfig, tokenizer_dir: str | os.PathLike | None, runtime: RuntimeOptions | None
    ) -> AnyGPTPipeline:
        """Build the components; ``runtime`` decides only how the LLM loads (dtype, quantization, device map)."""
        decoders = {Modality(m): build_decoder(c) for m, c in config.decoders.items()}
        specs = {m: d.spec for m, d in decoders.items()}
        model = AnyGPTModel.build(config, specs, tokenizer_dir=tokenizer_dir, runtime=runtime)
        return cls(model, decoders)

    @classmethod
    @quiet_libraries()
    def from_pretrained(
        cls,
        name_or_dir: str | os.PathLike,
        *,
        runtime: RuntimeOptions | None = None,
        torch_dtype: str | torch.dtype | None = None,
        device_map: str | torch.device | None = None,
    ) -> AnyGPTPipeline:
        """Load a preset (``tiny``, ``nextgpt-7b``) or a folder written by ``save_pretrained``.

        Quiet unless ``anygpt.set_verbosity("info")``: the libraries' loading bars and notices are silenced while it
        loads (``anygpt.base.logs.quiet_libraries``).

        Args:
            runtime: where and how it runs: device, dtype, offload, quantization, compilation
                (``anygpt.core.runtime.RuntimeOptions``); None: on the CPU, each component in its configured dtype.
            torch_dtype: diffusers / transformers style: every component in this dtype (``runtime.dtype``).
            device_map: diffusers / transformers style: one device for everything (``runtime.device``), or
                ``"auto"``: the default plan for this model on the first CUDA device (or the CPU), chosen by its memory
                estimate (``anygpt.core.memory.default_runtime``).

        Raises:
            UsageError: ``runtime`` together with ``torch_dtype`` / ``device_map``; a device map that is not one
                device; a quantization backend that is not installed.
            ValueError: an unknown preset name or an invalid folder.
            FileNotFoundError: a frozen backbone the config refers to is not on this machine.

        Example:
            >>> pipe = AnyGPTPipeline.from_pretrained("nextgpt-7b", device_map="auto")  # doctest: +SKIP
            >>> pipe = AnyGPTPipeline.from_pretrained(  # doctest: +SKIP
            ...     "nextgpt-7b", runtime=RuntimeOptions(device="cuda", dtype="float16", offload="model")
            ... )
        """
        path, config, parts = find_model(name_or_dir)
        if runtime is not None and (torch_dtype is not None or device_map is not None):
            raise UsageError("from_pretrained: give runtime=RuntimeOptions(...) or torch_dtype / device_map, not both")
        if runtime is None and device_map == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
            runtime = default_runtime(config, device)
            if torch_dtype is not None:
                runtime = dataclasses.replace(runtime, dtype=RuntimeOptions.from_loader_arguments(torch_dtype).dtype)
            logger.info("device_map='auto': %s", runtime.describe())
        elif runtime is None and (torch_dtype is not None or device_map is not None):
            runtime = RuntimeOptions.from_loader_arguments(torch_dtype, device_map)
        if path is None:
            if str(name_or_dir) == "tiny":
                logger.warning("the 'tiny' preset is randomly initialised: its text and media are noise")
            return cls.from_config(config, runtime=runtime)
        # the trained parts are loaded before the placement (device, offload hooks, compilation)
        pipe = cls._build(config, resolve_part(path, parts["tokenizer"], "tokenizer"), runtime)
        pipe.model.load_trained(path, parts)
        if runtime is not None:
            pipe.apply_runtime(runtime)
        logger.info("loaded anygpt pipeline from %s", path)
        return pipe

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write the trained parts and one JSON index into ``folder`` (atomically: all or nothing).

        Frozen backbones (encoder, LLM base weights, decoders) are not written: the index refers to them by preset,
        hub id or path, and to a model shipped in the package (``toyworld``) by name (``packaged:toyworld/llm``), never
        by a path into the install, so the folder loads on any machine with anygpt installed.
        """
        folder = Path(folder).expanduser()
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"save_pretrained: {folder} exists and is not a folder")
        if folder.is_dir() and any(folder.iterdir()) and not (folder / INDEX_FILE).is_file():
            raise ValueError(
                f"save_pretrained: {folder} is not empty and holds no {INDEX_FILE}; refusing to replace it "
                "(choose an empty or new folder, or one written by save_pretrained)"
            )
        with atomic_directory(folder) as tmp:
            write_index(tmp, self.config, self.model.save_trained(tmp))
        logger.info("saved anygpt pipeline to %s", folder)

    def check_inputs(self, request: GenerationRequest) -> set[Modality] | None:
        """Check a request against this model; return the forced output modalities (None for ``"auto"``).

        The request's fields are validated again (``GenerationRequest.validate``: it may have been changed since it
        was built); then what depends on the model: the input modalities it reads, the output modalities it has a
        decoder for (``modalities``, ``decoder_overrides``) and the LoRA adapters it holds.

        Raises:
            ValueError: naming the field (``UsageError`` for a field, prefixed with ``request.origin``).
        """
        request.validate()
        where = request.origin
        context = getattr(getattr(self.model.language_model, "config", None), "max_position_embeddings", None)
        if isinstance(context, int) and request.max_new_tokens >= context:
            raise UsageError(
                f"{where}max_new_tokens must be below the LLM's context of {context} tokens "
                f"(max_position_embeddings, the prompt included), got {request.max_new_tokens}"
            )
        for modality in MEDIA_MODALITIES:
            if request.media(modality) and modality.value not in self.config.input_modalities:
                raise UsageError(
                    f"{where}{modality.plural}: this model reads no {modality.value} input "
                    f"(it reads {', '.join(self.config.input_modalities)})"
                )
        for name in request.decoder_overrides:
            if Modality(name) not in self.decoders:
                valid = ", ".join(m.value for m in self.decoders)
                raise UsageError(f"{where}decoder_overrides: this model has no {name} decoder (it has {valid})")
        try:
            forced = self.parse_modalities(request.modalities)
            self.select_adapters(request.adapters, forced)
        except UsageError:
            raise
        except ValueError as error:
            raise UsageError(f"{where}{error}") from None
        return forced

    def parse_modalities(self, modalities: str | list[str] | None) -> set[Modality] | None:
        """``"auto"``/None -> None; a list or comma-separated string -> the set of output modalities (validated)."""
        if modalities is None or (isinstance(modalities, str) and modalities.strip().lower() == "auto"):
            return None
        if isinstance(modalities, str):
            modalities = [m for m in modalities.split(",") if m.strip()]
        names = [m.value if isinstance(m, Modality) else str(m).strip().lower() for m in modalities]
        valid = [m.value for m in self.decoders]
        unknown = [n for n in names if n not in valid]
        if unknown:
            raise ValueError(
                f"modalities: unknown or unavailable output modality {unknown[0]!r}; this model has decoders for "
                f"{', '.join(valid)}; expected 'auto' or a list of them"
            )
        return {Modality(n) for n in names}

    def select_adapters(
        self, adapters: str | list[str] | Mapping[str, float] | None, forced: set[Modality] | None
    ) -> tuple[list[str], list[float] | None] | None:
        """The LoRA adapters (and weights) a call runs with, validated; None: leave the model's as they are.

        ``adapters`` None chooses by default. A model with one adapter (or none) has nothing to choose. With
        per-modality adapters (``lora.adapters``): when the call forces output modalities, the adapters of those
        that have one (trained on replies producing them; several are combined, their mean); otherwise (``"auto"``,
        or no forced modality has an adapter) every adapter combined (their mean), so the LLM may still route the
        reply to any modality (the ``text`` adapter alone learned only replies without media). Pass
        ``adapters="text"`` for a text-only reply.

        Raises:
            ValueError: an unknown or repeated adapter name (listing the model's adapters) or a bad weight.
        """
        available = self.model.lora_adapters
        if adapters is None:
            lora = self.config.llm.lora
            if lora is None or lora.adapters is None:
                return None
            wanted = [name for name in available if forced and Modality(name) in forced]
            if wanted:
                return wanted, None
            return available, None
        if isinstance(adapters, Mapping):
            names = [str(n.value if isinstance(n, Modality) else n) for n in adapters]
            return check_selection(available, names, list(adapters.values()))
        if isinstance(adapters, str):
            adapters = [n for n in adapters.split(",") if n.strip()]
        names = [str(n.value if isinstance(n, Modality) else n).strip() for n in adapters]
        return check_selection(available, names, None)

    def load_inputs(
        self, modality: Modality, items: list[MediaInput], known: Container[str] = (), *, resolution: str | None = None
    ) -> list[tuple[MediaRef, Any]]:
        """Read media (paths or objects) and give each a content key. Raises ``MediaError`` for bad files.

        A file whose key is in ``known`` (features already cached) is hashed but not decoded again: its value is None.
        An image read with AnyRes (``resolution``, or the model's ``image_input.resolution`` when None) has a key of
        its own (``...+anyres``): its features differ from the fixed-resolution ones.
        """
        suffix = ""
        if modality is Modality.IMAGE and items and self.model.resolve_image_resolution(resolution) == "anyres":
            suffix = "+anyres"
        loaded = []
        for item in items:
            if isinstance(item, str | os.PathLike):
                path = Path(item).expanduser()
                try:
                    key = _file_key(modality, path)
                except OSError:
                    key = None  # load_media below reports the problem with the file
                value = None
                if key is None or key not in known:
                    # the encoder samples a few clips: decode only as many frames as it can use
                    max_frames = self.model.encoder.max_video_frames if modality is Modality.VIDEO else None
                    value = load_media(modality, path, max_frames=max_frames)
                    key = key or _file_key(modality, path)
                loaded.append((MediaRef(modality, key + suffix, str(path)), value))
            else:
                check_media_item(modality, item, f"{modality.value} input")
                loaded.append((MediaRef(modality, _object_key(modality, item) + suffix), item))
        return loaded

    @torch.no_grad()
    def encode_media(
        self, conversation: Conversation, items: list[tuple[MediaRef, Any]], *, resolution: str | None = None
    ) -> None:
        """Encode the items the conversation has not seen yet (batched per modality) and cache their features.

        Images are read at ``resolution`` (``"fixed"`` / ``"anyres"``; None: the model's ``image_input.resolution``),
        the one ``load_inputs`` gave their keys for.
        """
        by_modality: dict[Modality, list[tuple[MediaRef, Any]]] = {}
        for ref, value in items:
            if ref.key not in conversation.features:
                by_modality.setdefault(ref.modality, []).append((ref, value))
        for modality, todo in by_modality.items():
            unique = list({ref.key: (ref, value) for ref, value in todo}.values())
            extra = {}
            wanted = self.model.resolve_image_resolution(resolution) if modality is Modality.IMAGE else "fixed"
            if wanted != "fixed" or (modality is Modality.IMAGE and self.config.image_input.resolution != "fixed"):
                extra["resolution"] = wanted  # only with AnyRes about: an encoder without it keeps its plain encode()
            out = self.model.encoder.encode(modality, [value for _, value in unique], **extra)
            for i, (ref, _) in enumerate(unique):
                conversation.features[ref.key] = (out.embeds[i : i + 1], out.tokens[i : i + 1])
            logger.debug("encoded %d %s item(s)", len(unique), modality.value)

    @torch.no_grad()
    def build_inputs(self, conversation: Conversation) -> tuple[torch.Tensor, torch.Tensor]:
        """The conversation as LLM input: ``input_ids`` (1, T) and ``inputs_embeds`` (1, T, H).

        Each media item takes the placeholder tokens its own features need (an image read with AnyRes takes more than
        one read at fixed resolution, ``AnyGPTModel.num_media_tokens``).

        Raises:
            UsageError: the conversation does not fit the LLM's context (``max_position_embeddings``), or it holds
                images read at both resolutions and the model reads its media only through gated cross-attention
                (one context length per modality).
        """
        model = self.model
        counts = {}
        for ref in conversation.media():
            tokens = conversation.features[ref.key][1]
            counts[ref.key] = model.num_media_tokens(ref.modality, views=model.views_in(ref.modality, tokens))
        ids, order = model.tokenize_pieces(conversation.prompt_pieces(self.tokenizer.eos_token_id), counts=counts)
        context = getattr(getattr(model.language_model, "config", None), "max_position_embeddings", None)
        if isinstance(context, int) and len(ids) >= context:  # before any work that grows with its square
            raise UsageError(
                f"prompt: the conversation takes {len(ids)} tokens (its media included), the LLM's context is "
                f"{context} (max_position_embeddings); shorten the prompt or start a new conversation"
            )
        media: dict[Modality, list[torch.Tensor]] = {}
        for ref in order:
            embeds, tokens = conversation.features[ref.key]
            media.setdefault(ref.modality, []).append(
                model.project_media(ref.modality, embeds.to(self.device), tokens.to(self.device))
            )
        input_ids = torch.tensor([ids], device=self.device)
        features = {}
        for modality, items in media.items():
            if len({item.shape[1] for item in items}) == 1:
                features[modality] = torch.cat(items)  # (M, K, H)
            elif model.cross_attention is not None and not model.config.cross_attention.inline:
                raise UsageError(
                    f"image_resolution: this conversation holds {modality.plural} read at both resolutions, and this "
                    "model reads its media through gated cross-attention (one length per modality); keep one "
                    "image_resolution per conversation"
                )
            else:  # spliced position by position: the items' features one after the other
                features[modality] = torch.cat([item.reshape(-1, item.shape[-1]) for item in items])
        return input_ids, model.embed_inputs(input_ids, features)

    @torch.no_grad()
    def generate_tokens(
        self,
        inputs_embeds: torch.Tensor,
        *,
        forced: set[Modality] | None,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        streamer: Any = None,
    ) -> tuple[list[int], Any]:
        """Run the LLM.

        The reply ends at EOS, at the token limit or at the chat template's end of a turn (``end_of_turn``: its stop
        strings and role markers such as ``USER:``), whatever the mode. With ``forced`` None (``"auto"``) the LLM may
        start the signal group of any output modality with a decoder; with a set, only the groups of the forced
        modalities (none for a text-only set), where the LLM places them, and a forced group it did not write is
        appended after the reply (``_complete_reply``).

        Args:
            forced: the forced output modalities (``check_inputs``), or None for ``"auto"``.
            streamer: optional transformers streamer (e.g. ``TextIteratorStreamer``) that receives the new token ids as
                they are generated; signal tokens are special tokens, so ``skip_special_tokens=True`` hides them.
                It sees the raw tokens, the end-of-turn marker that stopped the reply included: a streamer that shows
                text holds ``end_of_turn`` back, as the server's ``DeltaStreamer`` does.

        Returns:
            the produced ids, cut at the end of the turn, with every signal group complete (missing forced groups
            appended), and the key/value cache (``signal_conditioning`` reuses its prompt part; None if the model
            returned none).
        """

        processor = SignalTokenProcessor(self.model.tokens, allowed=self._allowed_signals(forced))
        sample = temperature > 0
        stop = self._end_of_turn()  # e.g. Vicuna's "USER:" / "ASSISTANT:", NExT-GPT's "###", besides EOS
        stopping = {"stop_strings": stop, "tokenizer": self.tokenizer} if stop else {}
        out = self.model.language_model.generate(
            inputs_embeds=inputs_embeds,
            attention_mask=torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device),
            max_new_tokens=max_new_tokens,
            do_sample=sample,
            temperature=temperature if sample else None,
            top_p=top_p if sample else None,
            top_k=None,
            logits_processor=LogitsProcessorList([processor]),
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            return_dict_in_generate=True,
            streamer=streamer,
            **stopping,
        )
        return self._complete_reply(out.sequences[0].tolist(), forced), getattr(out, "past_key_values", None)

    @torch.no_grad()
    def signal_conditioning(
        self,
        input_ids: torch.Tensor,
        inputs_embeds: torch.Tensor,
        generated: list[int],
        past_key_values: Any = None,
    ) -> dict[Modality, torch.Tensor]:
        """Decoder conditioning for every signal group in ``generated``.

        A forward pass over the generated tokens (reusing the prompt's key/value cache when given, else over prompt
        + generated tokens) gives the last-layer hidden states; each group's are read at the positions where its
        signal tokens are the input, exactly as in training.
        """
        present = [m for m in self.decoders if set(self.model.tokens.signal[m]) & set(generated)]
        if not present:
            return {}
        llm = self.model.language_model
        prompt_len = input_ids.shape[1]
        gen = torch.tensor([generated], device=input_ids.device)
        gen_embeds = llm.get_input_embeddings()(gen).to(inputs_embeds.dtype)
        if past_key_values is not None and past_key_values.get_seq_length() >= prompt_len:
            extra = past_key_values.get_seq_length() - prompt_len
            if extra > 0:
                past_key_values.crop(-extra)  # keep the prompt's part only (a negative count removes from the end)
            mask = torch.ones((1, prompt_len + gen.shape[1]), dtype=torch.long, device=gen.device)
            out = llm(
                inputs_embeds=gen_embeds,
                attention_mask=mask,
                past_key_values=past_key_values,
                output_hidden_states=True,
                use_cache=True,
            )
            hidden, ids = out.hidden_states[-1], gen  # (1, T_gen, H)
        else:
            full_embeds = torch.cat([inputs_embeds, gen_embeds], dim=1)
            out = llm(inputs_embeds=full_embeds, output_hidden_states=True, use_cache=False)
            hidden, ids = out.hidden_states[-1][:, prompt_len:], gen  # groups of earlier turns are not re-rendered
        return {m: self.model.signal_conditioning(m, hidden, ids)[0] for m in present}

    @quiet_libraries()  # a decoder loads on first use (diffusers' "Loading pipeline components")
    def decode(
        self,
        modality: Modality,
        conditioning: torch.Tensor,
        *,
        seed: int | None,
        num_inference_steps: int | None,
        guidance_scale: float | None,
        height: int | None,
        width: int | None,
        num_frames: int | None,
        audio_seconds: float | None,
        show_progress: bool,
        should_stop: Callable[[], bool] | None = None,
        callback_on_step_end: StepCallback | None = None,
    ) -> list:
        """Render conditioning with the modality's decoder (loaded on first use, then kept).

        ``should_stop`` goes to ``Decoder.generate``, which checks it between denoising steps and raises
        ``GenerationStopped`` when it returns True; ``callback_on_step_end`` runs after every denoising step.
        """
        decoder = self.decoders[modality]
        generator = None
        if seed is not None:
            generator = torch.Generator(device="cpu").manual_seed(seed)
        extra = {} if should_stop is None else {"should_stop": should_stop}
        if callback_on_step_end is not None:
            extra["callback_on_step_end"] = callback_on_step_end
        return decoder.generate(
            conditioning,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generator,
            height=height,
            width=width,
            num_frames=num_frames,
            audio_seconds=audio_seconds,
            show_progress=show_progress,
            **extra,
        )

    # ------------------------------------------------------------------ the call
    @serialized
    @torch.no_grad()
    @quiet_libraries()
    def __call__(
        self,
        prompt: str | list[str],
        images: MediaInput | list[MediaInput] | None = None,
        audios: MediaInput | list[MediaInput] | None = None,
        videos: MediaInput | list[MediaInput] | None = None,
        *,
        modalities: str | list[str] = "auto",
        adapters: str | list[str] | Mapping[str, float] | None = None,
        conversation: Conversation | None = None,
        seed: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        audio_seconds: float | None = None,
        show_progress: bool | None = None,
        decoder_overrides: Mapping[str | Modality, Mapping[str, Any]] | None = None,
        image_resolution: str | None = None,
        streamer: Any = None,
        on_decode: Callable[[Modality, int, int], bool | None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        callback_on_step_end: StepCallback | None = None,
        batch_size: int = 1,
    ) -> AnyGPTOutput | list[AnyGPTOutput]:
        """Answer ``prompt`` (with optional media) with text and, as the LLM decides or as forced, media.

        The keywords make a ``GenerationRequest`` (validated there, see its fields) that ``run`` answers.

        Args:
            prompt: the user's text (any characters, ``<`` and ``>`` included), or a list of prompts: each is
                answered on its own, with the same media and settings, and a list of outputs comes back, one per
                prompt in order (a reply holds any number of media of each kind, so outputs are not merged).
                With a ``seed``, ``pipe(prompts, seed=s)[i]`` equals ``pipe(prompts[i], seed=s)``.
            images, audios, videos: file paths or ``PIL.Image`` / ``Audio`` / ``Video`` objects (one or a list).
            modalities: ``"auto"`` (the LLM decides by emitting signal tokens) or a list / comma-separated string
                of output modalities: exactly those are produced, each once unless the LLM writes several of its
                groups. The LLM may write a forced modality's signal group where it would, never another's; a forced
                group it has not written when the reply ends is appended after the reply's text. ``["text"]`` or
                ``[]``: a text-only reply. In every mode the reply ends at EOS or the chat template's end of a turn
                (``ChatTemplate.end_of_turn``), so the template's role markers never show in it.
            adapters: the LoRA adapter(s) this call runs the LLM with, chosen without reloading: a name, a list or
                comma-separated string of names (combined: the mean of their updates), or ``{name: weight}`` (the
                weighted sum of their updates); see ``AnyGPTModel.set_lora_adapters``. None: the default of
                ``select_adapters`` (per-modality adapters: the forced output modalities' adapters, else all combined).
                The model keeps the choice after the call.
            conversation: a ``Conversation`` to continue (turn history and cached media features); a new
                one-turn conversation when None. Not with a list of prompts.
            seed: makes sampling and every decoder deterministic.
            generator: a ``torch.Generator`` instead of ``seed``, as in diffusers: the call's seed is drawn from it
                (advancing it), so a freshly seeded generator reproduces a call and reusing one varies the calls.
                With a list of prompts: one generator (a seed drawn per prompt) or a list of one per prompt.
            max_new_tokens, temperature (0 = greedy), top_p: LLM decoding.
            num_inference_steps, guidance_scale, height, width, num_frames, audio_seconds: decoder settings
                (None: each decoder's default).
            show_progress: the decoders' progress bars; None: ``anygpt.logging.is_progress_bar_enabled()`` (off by
                default, on after ``anygpt.set_verbosity("info")`` or ``anygpt.logging.enable_progress_bar()``).
            decoder_overrides: per output modality, decoder settings that replace the shared ones above for that
                decoder only (None keeps the shared value), e.g. ``{"image": {"num_inference_steps": 30}}``.
            image_resolution: ``"fixed"`` or ``"anyres"`` (tiles and a global view) for this call's images; None:
                the model's ``image_input.resolution`` (see ``GenerationRequest.image_resolution``).
            streamer: a transformers streamer (``TextStreamer``, ``TextIteratorStreamer``) that receives the reply's
                token ids as the LLM produces them (see ``generate_tokens``).
            on_decode: called as ``on_decode(modality, index, total)`` before each decoder runs (progress reports).
                Returning False skips that decoder and the remaining ones: the call returns the media rendered so
                far with ``stopped=True``. An exception it raises stops the call.
            should_stop: checked before each decoder and, by the decoders, between denoising steps; when it
                returns True the running decoder is abandoned and the call returns the media rendered so far with
                ``stopped=True``. (It does not stop the LLM: give ``streamer`` a ``put`` that raises for that.)
            callback_on_step_end: diffusers' ``callback(pipe, step, timestep, callback_kwargs) -> callback_kwargs``,
                called after every denoising step of every decoder; ``pipe`` is that decoder's diffusers pipeline
                (``callback_kwargs`` holds ``"latents"``).
            batch_size: with a list of prompts, answer up to this many together (``run_batch``: one LLM loop over
                the batch, each decoder once per batch). 1 (the default) answers them one by one, bit-identical to
                single calls; a batch gives the same tokens and media within the rounding ``run_batch`` documents,
                and takes no ``streamer``, ``on_decode``, ``should_stop`` or ``callback_on_step_end``.

        Returns:
            ``AnyGPTOutput`` (a list of them for a list of prompts). The conversation holds the user's turn and the
            reply (text and every signal group) even when the media were ``stopped``; a caller that wants otherwise
            removes them (``conversation.pop_last_exchange()``).

        Raises:
            ValueError: a bad argument, naming it (``UsageError``); ``MediaError`` for a media file or object.
        """
        fields = dict(
            images=images,
            audios=audios,
            videos=videos,
            modalities=modalities,
            adapters=adapters,
            seed=seed,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            num_frames=num_frames,
            audio_seconds=audio_seconds,
            decoder_overrides=decoder_overrides,
            image_resolution=image_resolution,
        )
        hooks = dict(
            show_progress=is_progress_bar_enabled() if show_progress is None else show_progress,
            streamer=streamer,
            on_decode=on_decode,
            should_stop=should_stop,
            callback_on_step_end=callback_on_step_end,
        )
        if not isinstance(prompt, list | tuple):
            request = GenerationRequest(prompt=prompt, **fields)
            return self.run(request, conversation=conversation, generator=generator, **hooks)
        if conversation is not None:
            raise UsageError("conversation: a conversation goes on one prompt at a time, not with a list of prompts")
        if not prompt:
            raise UsageError("prompt: expected a string or a non-empty list of strings, got an empty list")
        requests = [GenerationRequest(prompt=p, **fields) for p in prompt]
        generators = _generators_per_prompt(generator, len(requests))
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise UsageError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
        if batch_size == 1:
            return [self.run(r, generator=g, **hooks) for r, g in zip(requests, generators, strict=True)]
        if any(hooks[k] is not None for k in ("streamer", "on_decode", "should_stop", "callback_on_step_end")):
            raise UsageError("batch_size > 1 takes no streamer, on_decode, should_stop or callback_on_step_end")
        requests = [
            dataclasses.replace(r, seed=_seed_of_call(r.seed, g)) for r, g in zip(requests, generators, strict=True)
        ]
        outputs: list[AnyGPTOutput] = []
        for start in range(0, len(requests), batch_size):
            chunk = requests[start : start + batch_size]
            outputs.extend(self.run_batch(chunk, show_progress=hooks["show_progress"]))
        return outputs

    @serialized
    @torch.no_grad()
    @quiet_libraries()
    def run(
        self,
        request: GenerationRequest,
        *,
        conversation: Conversation | None = None,
        generator: torch.Generator | None = None,
        show_progress: bool | None = None,
        streamer: Any = None,
        on_decode: Callable[[Modality, int, int], bool | None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        callback_on_step_end: StepCallback | None = None,
    ) -> AnyGPTOutput:
        """Answer one ``GenerationRequest``: the one path of every generation call (``__call__`` builds the
        request from its keywords; the command line, the batch reader and the chat engine build it directly).

        The keyword arguments are what a request cannot carry as data (the conversation, the caller's hooks); see
        ``__call__`` for each. Returns an ``AnyGPTOutput``.
        """
        if show_progress is None:
            show_progress = is_progress_bar_enabled()
        forced = self.check_inputs(request)
        seed = _seed_of_call(request.seed, generator)
        selection = self.select_adapters(request.adapters, forced)
        if selection is not None:
            self.model.set_lora_adapters(*selection)
        conversation = self._add_user_turn(conversation, request)
        try:
            input_ids, inputs_embeds, generated, cache = self._generate_reply(
                conversation, request, forced, seed, streamer
            )
            conditioning = self.signal_conditioning(input_ids, inputs_embeds, generated, cache)
        except BaseException:
            conversation.turns.pop()  # the failed user turn is not kept
            raise
        finally:
            if self.model.cross_attention is not None:  # the call's media features are not kept referenced
                self.model.cross_attention.set_context(None)
        signal_ids = self.model.tokens.all_signal_ids
        text = reply_text(self.tokenizer, generated, signal_ids)
        conversation.add_assistant(text, generated)
        result = AnyGPTOutput(
            text=text, token_ids=generated, conditioning={m.value: c for m, c in conditioning.items()}
        )
        hooks = dict(on_decode=on_decode, should_stop=should_stop, callback_on_step_end=callback_on_step_end)
        self._render(result, conditioning, request, seed, show_progress=show_progress, **hooks)
        return result

    def _add_user_turn(self, conversation: Conversation | None, request: GenerationRequest) -> Conversation:
        """Read and encode the request's media (once per conversation) and add the user's turn."""
        if conversation is None:
            conversation = Conversation()
        if conversation.template is None:
            conversation.template = self.config.llm.template
        resolution = request.image_resolution
        self.model.resolve_image_resolution(resolution, request.origin)  # AnyRes asked of a model that cannot
        loaded = [
            pair
            for m in MEDIA_MODALITIES
            for pair in self.load_inputs(m, request.media(m), conversation.features, resolution=resolution)
        ]
        self.encode_media(conversation, loaded, resolution=resolution)
        conversation.add_user(request.prompt, [ref for ref, _ in loaded])
        return conversation

    def _generate_reply(
        self,
        conversation: Conversation,
        request: GenerationRequest,
        forced: set[Modality] | None,
        seed: int | None,
        streamer: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, list[int], Any]:
        """The LLM's reply to the conversation: ``(input_ids, inputs_embeds, generated ids, key/value cache)``."""
        with torch.random.fork_rng(devices=_rng_devices(self.device)):  # the caller's RNG state is kept
            if seed is not None:
                torch.manual_seed(seed)
            input_ids, inputs_embeds = self.build_inputs(conversation)
            generated, cache = self.generate_tokens(
                inputs_embeds,
                forced=forced,
                max_new_tokens=request.max_new_tokens,
                temperature=request.temperature,
                top_p=request.top_p,
                streamer=streamer,
            )
        return input_ids, inputs_embeds, generated, cache

    def _render(
        self,
        result: AnyGPTOutput,
        conditioning: dict[Modality, torch.Tensor],
        request: GenerationRequest,
        seed: int | None,
        *,
        show_progress: bool,
        on_decode: Callable[[Modality, int, int], bool | None] | None,
        should_stop: Callable[[], bool] | None,
        callback_on_step_end: StepCallback | None,
    ) -> None:
        """Run each output modality's decoder in turn and add its media to ``result`` (``stopped`` when the caller
        ended it early). The decoder of the ``offset``-th modality is seeded with ``seed + offset``."""
        for offset, (modality, cond) in enumerate(conditioning.items()):
            if should_stop is not None and should_stop():
                result.stopped = True
                return
            if on_decode is not None and on_decode(modality, offset, len(conditioning)) is False:
                result.stopped = True
                return
            try:
                outputs = self.decode(
                    modality,
                    cond,
                    seed=None if seed is None else seed + offset,
                    show_progress=show_progress,
                    should_stop=should_stop,
                    callback_on_step_end=callback_on_step_end,
                    **request.decoder_settings(modality),
                )
            except GenerationStopped as stopped:
                if should_stop is None:
                    raise
                logger.info("%s", stopped)
                result.stopped = True
                return
            getattr(result, modality.plural).extend(outputs)

    # ------------------------------------------------------------------ reply ids (single and batched calls)
    def _allowed_signals(self, forced: set[Modality] | None) -> set[Modality]:
        """The output modalities whose signal groups the LLM may start: every one with a decoder in ``"auto"``
        mode (``forced`` None), else the forced ones (none for a text-only reply)."""
        return set(self.decoders) if forced is None else {m for m in self.decoders if m in forced}

    def _end_of_turn(self) -> list[str]:
        """The text that ends a reply besides EOS: the model's chat template's ``end_of_turn`` (its stop strings
        and role markers)."""
        return list(get_template(self.config.llm.template).end_of_turn)

    def _complete_reply(self, ids: list[int], forced: set[Modality] | None) -> list[int]:
        """A reply's raw ids made final: cut at EOS and at the end of the turn (``_end_of_turn``; the marker's
        partial text and the blanks before it removed), padding dropped, signal groups repaired, and, when outputs
        are forced, each forced modality's group that the reply lacks appended after it, in the decoders' order (a
        group the LLM wrote itself is not repeated). Used by ``generate_tokens`` and the batched path."""
        tokens = self.model.tokens
        eos = self.tokenizer.eos_token_id
        if eos in ids:
            ids = ids[: ids.index(eos)]
        stop = self._end_of_turn()
        if stop:
            ids = _cut_at_stop(ids, self.tokenizer, stop)
        ids = [i for i in ids if i != self.tokenizer.pad_token_id]
        ids = repair_signal_groups(ids, tokens)
        if forced is not None:
            present = set(ids)
            for modality in self.decoders:
                group = tokens.signal[modality]
                if modality in forced and not present & set(group):
                    ids.extend(group)
        return ids


def _cut_at_stop(ids: list[int], tokenizer, stop: list[str]) -> list[int]:
    """``ids`` before the first of the ``stop`` strings (end-of-turn markers) their text holds: without the tokens
    that hold any of that marker's text (a marker such as ``ASSISTANT:`` spans several tokens) and without the blank
    tokens before it (the template's separator)."""

    def text(end: int) -> str:
        return tokenizer.decode(ids[:end], skip_special_tokens=False)

    if not any(s in text(len(ids)) for s in stop):
        return ids  # a reply that ended on EOS or the token limit: one decode, not one per prefix
    end = next(e for e in range(1, len(ids) + 1) if any(s in text(e) for s in stop))  # the token completing one
    held = text(end)
    at = min(held.find(s) for s in stop if s in held)  # where that marker begins
    keep = end - 1
    while keep > 0 and len(text(keep)) > at:  # the tokens reaching into the marker go with it
        keep -= 1
    ids = ids[:keep]
    while ids and not tokenizer.decode(ids[-1:], skip_special_tokens=False).strip():
        ids = ids[:-1]
    return ids


def _file_key(modality: Modality, path: Path) -> str:
    digest = hashlib.sha256()
    digest.update(modality.value.encode())
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _object_key(modality: Modality, item: Any) -> str:
    digest = hashlib.sha256()
    digest.update(modality.value.encode())
    if isinstance(item, Image.Image):
        digest.update(f"{item.mode}{item.size}".encode())
        digest.update(item.tobytes())
    elif isinstance(item, Audio):
        digest.update(str(item.sample_rate).encode())
        digest.update(np.ascontiguousarray(item.waveform).tobytes())
    else:
        digest.update(str(item.fps).encode())
        digest.update(np.ascontiguousarray(item.frames).tobytes())
    return digest.hexdigest()


def _rng_devices(device: torch.device) -> list[int]:
    return [device.index or 0] if device.type == "cuda" else []


def _seed_of_call(seed: int | None, generator: torch.Generator | None) -> int | None:
    """The call's seed: ``seed``, or one drawn from ``generator`` (advancing it), or None."""
    if generator is None:
        return seed
    if seed is not None:
        raise UsageError("give seed or generator, not both")
    if not isinstance(generator, torch.Generator):
        raise UsageError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    return int(torch.randint(0, 2**32, (1,), generator=generator, device=generator.device).item())


def _generators_per_prompt(
    generator: torch.Generator | list[torch.Generator] | None, count: int
) -> list[torch.Generator | None]:
    """One generator per prompt of a batch: a list as given (of the right length), one shared generator (each
    prompt draws its seed from it in turn), or None for each."""
    if isinstance(generator, list | tuple):
        if len(generator) != count:
            raise UsageError(f"generator: a list of {len(generator)} generators for {count} prompts")
        return list(generator)
    return [generator] * count
