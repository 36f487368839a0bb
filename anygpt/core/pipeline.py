"""``AnyGPTPipeline``: text + images / audio / video in, text + images / videos / audio out.

Example:
    >>> from anygpt import AnyGPTPipeline
    >>> pipe = AnyGPTPipeline.from_pretrained("tiny")
    >>> out = pipe("draw a red circle", modalities=["image"], seed=0)
    >>> out.images[0].save("circle.png")
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from anygpt.base.errors import UnknownModelError
from anygpt.base.media import Audio, MediaError, Video, load_media
from anygpt.base.modality import MEDIA_MODALITIES, Modality
from anygpt.base.utils import atomic_directory
from anygpt.core.config import PACKAGED_MODELS, AnyGPTConfig, config_from_preset, list_presets
from anygpt.core.conversation import Conversation, MediaRef
from anygpt.core.index import INDEX_FILE, packaged_model_dir, read_index, resolve_part, write_index
from anygpt.core.lora import check_selection
from anygpt.core.model import AnyGPTModel
from anygpt.core.tokens import SignalTokenProcessor, repair_signal_groups

logger = logging.getLogger(__name__)


MediaInput = str | os.PathLike | Image.Image | Audio | Video

DECODER_SETTINGS: tuple[str, ...] = (
    "num_inference_steps",
    "guidance_scale",
    "height",
    "width",
    "num_frames",
    "audio_seconds",
)
"""The decoder settings of ``__call__``; ``decoder_overrides`` may set any of them per output modality."""


@dataclass
class AnyGPTOutput:
    """What one call produced.

    Attributes:
        text: the reply text (signal tokens removed).
        images: generated images.
        videos: generated clips (uint8 frames (T, H, W, 3) and fps).
        audios: generated waveforms (float32 and sample rate).
        token_ids: every token the LLM produced, signal groups included.
        conditioning: the output projector's conditioning per modality, (G, L, D) or (G, D).
        stopped: the caller ended the call early while the media were rendered (``on_decode`` returned False or
            ``should_stop`` returned True): the media rendered before are here, the others are missing.
    """

    text: str
    images: list[Image.Image] = field(default_factory=list)
    videos: list[Video] = field(default_factory=list)
    audios: list[Audio] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    conditioning: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    stopped: bool = False


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


class AnyGPTPipeline:
    """Any-to-any generation: a frozen encoder, projectors, an LLM and diffusers decoders.

    Args:
        model: the encoder / projectors / LLM system.
        decoders: ``decoders.Decoder`` per output modality. Each loads its diffusers pipeline on first use and
            keeps it.
    """

    def __init__(self, model: AnyGPTModel, decoders: dict[Modality, Any]):
        self.model = model
        self.decoders = {Modality.parse(k): v for k, v in decoders.items()}

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
    def from_config(cls, config: AnyGPTConfig, *, tokenizer_dir: str | os.PathLike | None = None) -> AnyGPTPipeline:
        """Build a pipeline from a config (trained parts freshly initialised)."""
        from decoders import build_decoder

        decoders = {Modality(m): build_decoder(c) for m, c in config.decoders.items()}
        specs = {m: d.spec for m, d in decoders.items()}
        model = AnyGPTModel.build(config, specs, tokenizer_dir=tokenizer_dir)
        return cls(model, decoders)

    @classmethod
    def from_pretrained(cls, name_or_dir: str | os.PathLike) -> AnyGPTPipeline:
        """Load a preset (``tiny``, ``nextgpt-7b``) or a folder written by ``save_pretrained``.

        Raises:
            ValueError: an unknown preset name or an invalid folder.
            FileNotFoundError: a frozen backbone the config refers to is not on this machine.
        """
        path, config, parts = find_model(name_or_dir)
        if path is None:
            if str(name_or_dir) == "tiny":
                logger.warning("the 'tiny' preset is randomly initialised: its text and media are noise")
            return cls.from_config(config)
        pipe = cls.from_config(config, tokenizer_dir=resolve_part(path, parts["tokenizer"], "tokenizer"))
        pipe.model.load_trained(path, parts)
        logger.info("loaded anygpt pipeline from %s", path)
        return pipe

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write the trained parts and one JSON index into ``folder`` (atomically: all or nothing).

        Frozen backbones (encoder, LLM base weights, decoders) are not written: the index refers to them by preset,
        hub id or path.
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

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> AnyGPTPipeline:
        """Move the model and the decoders (decoders not loaded yet move when they load)."""
        self.model.to(device=device, dtype=dtype)
        for decoder in self.decoders.values():
            decoder.to(device=device, dtype=dtype)
        return self

    # ------------------------------------------------------------------ steps
    def check_inputs(
        self,
        prompt: str,
        media: dict[Modality, list],
        modalities: str | list[str],
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        decoder_settings: dict[str, Any] | None = None,
    ) -> set[Modality] | None:
        """Validate the arguments of ``__call__``; return the forced output modalities (None for "auto")."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
        for modality, items in media.items():
            if items and modality.value not in self.config.input_modalities:
                raise ValueError(
                    f"this model reads no {modality.value} input (it reads {', '.join(self.config.input_modalities)})"
                )
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        _check_decoder_settings(decoder_settings or {})
        return self.parse_modalities(modalities)

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
                f"modalities: unknown or unavailable output modality {unknown[0]!r}; expected 'auto' or a list of "
                f"{', '.join(valid)}"
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
        self, modality: Modality, items: list[MediaInput], known: Container[str] = ()
    ) -> list[tuple[MediaRef, Any]]:
        """Read media (paths or objects) and give each a content key. Raises ``MediaError`` for bad files.

        A file whose key is in ``known`` (features already cached) is hashed but not decoded again: its value is None.
        """
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
                loaded.append((MediaRef(modality, key, str(path)), value))
            else:
                _check_media_object(modality, item)
                loaded.append((MediaRef(modality, _object_key(modality, item)), item))
        return loaded

    @torch.no_grad()
    def encode_media(self, conversation: Conversation, items: list[tuple[MediaRef, Any]]) -> None:
        """Encode the items the conversation has not seen yet (batched per modality) and cache their features."""
        by_modality: dict[Modality, list[tuple[MediaRef, Any]]] = {}
        for ref, value in items:
            if ref.key not in conversation.features:
                by_modality.setdefault(ref.modality, []).append((ref, value))
        for modality, todo in by_modality.items():
            unique = list({ref.key: (ref, value) for ref, value in todo}.values())
            out = self.model.encoder.encode(modality, [value for _, value in unique])
            for i, (ref, _) in enumerate(unique):
                conversation.features[ref.key] = (out.embeds[i : i + 1], out.tokens[i : i + 1])
            logger.debug("encoded %d %s item(s)", len(unique), modality.value)

    @torch.no_grad()
    def build_inputs(self, conversation: Conversation) -> tuple[torch.Tensor, torch.Tensor]:
        """The conversation as LLM input: ``input_ids`` (1, T) and ``inputs_embeds`` (1, T, H)."""
        ids, order = self.model.tokenize_pieces(conversation.prompt_pieces(self.tokenizer.eos_token_id))
        media: dict[Modality, list[torch.Tensor]] = {}
        for ref in order:
            embeds, tokens = conversation.features[ref.key]
            media.setdefault(ref.modality, []).append(
                self.model.project_media(ref.modality, embeds.to(self.device), tokens.to(self.device))
            )
        input_ids = torch.tensor([ids], device=self.device)
        features = {m: torch.cat(v) for m, v in media.items()}
        return input_ids, self.model.embed_inputs(input_ids, features)

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

        Args:
            streamer: optional transformers streamer (e.g. ``TextIteratorStreamer``) that receives the new token ids as
                they are generated; signal tokens are special tokens, so ``skip_special_tokens=True`` hides them.

        Returns:
            the produced ids with every signal group complete (forced groups appended), and the key/value cache
            (``signal_conditioning`` reuses its prompt part; None if the model returned none).
        """
        from transformers import LogitsProcessorList

        tokens = self.model.tokens
        allowed = set(self.decoders) if forced is None else set()
        processor = SignalTokenProcessor(tokens, allowed=allowed)
        sample = temperature > 0
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
        )
        ids = out.sequences[0].tolist()
        eos = self.tokenizer.eos_token_id
        if eos in ids:
            ids = ids[: ids.index(eos)]
        ids = [i for i in ids if i != self.tokenizer.pad_token_id]
        ids = repair_signal_groups(ids, tokens)
        for modality in self.decoders:
            if forced is not None and modality in forced:
                ids.extend(tokens.signal[modality])
        return ids, getattr(out, "past_key_values", None)

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
    ) -> list:
        """Render conditioning with the modality's decoder (loaded on first use, then kept).

        ``should_stop`` goes to ``Decoder.generate``, which checks it between denoising steps and raises
        ``decoders.base.GenerationStopped`` when it returns True.
        """
        decoder = self.decoders[modality]
        generator = None
        if seed is not None:
            generator = torch.Generator(device="cpu").manual_seed(seed)
        extra = {} if should_stop is None else {"should_stop": should_stop}
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
    @torch.no_grad()
    def __call__(
        self,
        prompt: str,
        images: list[MediaInput] | None = None,
        audios: list[MediaInput] | None = None,
        videos: list[MediaInput] | None = None,
        *,
        modalities: str | list[str] = "auto",
        adapters: str | list[str] | Mapping[str, float] | None = None,
        conversation: Conversation | None = None,
        seed: int | None = None,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        audio_seconds: float | None = None,
        show_progress: bool = True,
        decoder_overrides: Mapping[str | Modality, Mapping[str, Any]] | None = None,
        streamer: Any = None,
        on_decode: Callable[[Modality, int, int], bool | None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> AnyGPTOutput:
        """Answer ``prompt`` (with optional media) with text and, as the LLM decides or as forced, media.

        Args:
            prompt: the user's text. May contain any characters, ``<`` and ``>`` included.
            images, audios, videos: file paths or ``PIL.Image`` / ``Audio`` / ``Video`` objects.
            modalities: ``"auto"`` (the LLM decides by emitting signal tokens) or a list / comma-separated string
                of output modalities that are produced after the text answer.
            adapters: the LoRA adapter(s) this call runs the LLM with, chosen without reloading: a name, a list or
                comma-separated string of names (combined: the mean of their updates), or ``{name: weight}`` (the
                weighted sum of their updates); see ``AnyGPTModel.set_lora_adapters``. None: the default of
                ``select_adapters`` (per-modality adapters: the forced output modalities' adapters, else all combined).
                The model keeps the choice after the call.
            conversation: a ``Conversation`` to continue (turn history and cached media features); a new
                one-turn conversation when None.
            seed: makes sampling and every decoder deterministic.
            max_new_tokens, temperature (0 = greedy), top_p: LLM decoding.
            num_inference_steps, guidance_scale, height, width, num_frames, audio_seconds: decoder settings
                (None: each decoder's default).
            show_progress: progress bars for decoder work.
            decoder_overrides: per output modality, decoder settings that replace the shared ones above for that
                decoder only (None keeps the shared value), e.g. ``{"image": {"num_inference_steps": 30}}``.
            streamer: a transformers streamer (``TextStreamer``, ``TextIteratorStreamer``) that receives the reply's
                token ids as the LLM produces them (see ``generate_tokens``).
            on_decode: called as ``on_decode(modality, index, total)`` before each decoder runs (progress reports).
                Returning False skips that decoder and the remaining ones: the call returns the media rendered so
                far with ``stopped=True``. An exception it raises stops the call.
            should_stop: checked before each decoder and, by the decoders, between denoising steps; when it
                returns True the running decoder is abandoned and the call returns the media rendered so far with
                ``stopped=True``. (It does not stop the LLM: give ``streamer`` a ``put`` that raises for that.)

        Returns:
            ``AnyGPTOutput``. The conversation holds the user's turn and the reply (text and every signal group)
            even when the media were ``stopped``; a caller that wants otherwise removes them
            (``conversation.pop_last_exchange()``).
        """
        media = {Modality.IMAGE: _as_list(images), Modality.AUDIO: _as_list(audios), Modality.VIDEO: _as_list(videos)}
        settings = dict(
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            num_frames=num_frames,
            audio_seconds=audio_seconds,
        )
        overrides = _decoder_overrides(decoder_overrides, list(self.decoders))
        forced = self.check_inputs(
            prompt,
            media,
            modalities,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            decoder_settings=settings,
        )
        selection = self.select_adapters(adapters, forced)
        if selection is not None:
            self.model.set_lora_adapters(*selection)
        if conversation is None:
            conversation = Conversation()
        if conversation.template is None:
            conversation.template = self.config.llm.template
        loaded = [pair for m in MEDIA_MODALITIES for pair in self.load_inputs(m, media[m], conversation.features)]
        self.encode_media(conversation, loaded)
        conversation.add_user(prompt, [ref for ref, _ in loaded])
        try:
            with torch.random.fork_rng(devices=_rng_devices(self.device)):  # the caller's RNG state is kept
                if seed is not None:
                    torch.manual_seed(seed)
                input_ids, inputs_embeds = self.build_inputs(conversation)
                generated, cache = self.generate_tokens(
                    inputs_embeds,
                    forced=forced,
                    max_new_tokens=max_new_tokens,
                    temperature=temperature,
                    top_p=top_p,
                    streamer=streamer,
                )
            conditioning = self.signal_conditioning(input_ids, inputs_embeds, generated, cache)
        except BaseException:
            conversation.turns.pop()  # the failed user turn is not kept
            raise
        signal_ids = self.model.tokens.all_signal_ids
        text = self.tokenizer.decode([i for i in generated if i not in signal_ids], skip_special_tokens=True).strip()
        conversation.add_assistant(text, generated)

        result = AnyGPTOutput(
            text=text, token_ids=generated, conditioning={m.value: c for m, c in conditioning.items()}
        )
        from decoders.base import GenerationStopped  # lazily, as build_decoder in from_config

        for offset, (modality, cond) in enumerate(conditioning.items()):
            if should_stop is not None and should_stop():
                result.stopped = True
                break
            if on_decode is not None and on_decode(modality, offset, len(conditioning)) is False:
                result.stopped = True
                break
            seed_m = None if seed is None else seed + offset
            decoder_settings = {**settings, **overrides.get(modality, {}), "should_stop": should_stop}
            try:
                outputs = self.decode(modality, cond, seed=seed_m, show_progress=show_progress, **decoder_settings)
            except GenerationStopped as stopped:
                if should_stop is None:
                    raise
                logger.info("%s", stopped)
                result.stopped = True
                break
            {Modality.IMAGE: result.images, Modality.VIDEO: result.videos, Modality.AUDIO: result.audios}[
                modality
            ].extend(outputs)
        return result


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


def _check_media_object(modality: Modality, item: Any) -> None:
    expected = {Modality.IMAGE: Image.Image, Modality.AUDIO: Audio, Modality.VIDEO: Video}[modality]
    if not isinstance(item, expected):
        raise MediaError(
            f"{modality.value} input: expected a file path or a {expected.__name__} object, got {type(item).__name__}"
        )


def _rng_devices(device: torch.device) -> list[int]:
    return [device.index or 0] if device.type == "cuda" else []


def _as_list(items: Any) -> list:
    """``None`` -> [], one item (a path or a media object) -> [item], a list or tuple -> a list."""
    if items is None:
        return []
    if isinstance(items, list | tuple):
        return list(items)
    return [items]


def _decoder_overrides(
    overrides: Mapping[str | Modality, Mapping[str, Any]] | None, available: list[Modality]
) -> dict[Modality, dict[str, Any]]:
    """Validate ``decoder_overrides``: known output modalities, known setting names, sensible values."""
    result: dict[Modality, dict[str, Any]] = {}
    for key, values in (overrides or {}).items():
        try:
            modality = Modality.parse(key)
        except ValueError:
            modality = None
        if modality not in available:
            valid = ", ".join(m.value for m in available)
            raise ValueError(f"decoder_overrides: unknown output modality {key!r}; expected one of {valid}")
        unknown = sorted(set(values) - set(DECODER_SETTINGS))
        if unknown:
            raise ValueError(
                f"decoder_overrides[{modality.value!r}]: unknown setting {unknown[0]!r}; expected any of "
                f"{', '.join(DECODER_SETTINGS)}"
            )
        _check_decoder_settings(dict(values))
        result[modality] = {name: value for name, value in values.items() if value is not None}
    return result


def _check_decoder_settings(settings: dict[str, Any]) -> None:
    """Decoder settings: None (the decoder's default) or a sensible value; a clear ValueError otherwise."""
    for name in ("num_inference_steps", "num_frames", "height", "width"):
        value = settings.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    for name in ("height", "width"):
        value = settings.get(name)
        if value is not None and value % 8:
            raise ValueError(f"{name} must be a multiple of 8 (the VAE's downsampling), got {value}")
    guidance = settings.get("guidance_scale")
    if guidance is not None and not (math.isfinite(guidance) and guidance >= 0):
        raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance!r}")
    seconds = settings.get("audio_seconds")
    if seconds is not None and not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"audio_seconds must be a finite number > 0, got {seconds!r}")
