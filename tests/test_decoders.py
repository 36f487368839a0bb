"""Decoders: tiny diffusers pipelines driven by prompt_embeds. No network; real weights only where marked."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from PIL import Image

from anygpt.base.media import Audio, Video
from anygpt.base.modality import Modality
from anygpt.base.utils import resolve_dtype
from decoders import (
    Decoder,
    DecoderConfig,
    DecoderSpec,
    build_clip_tokenizer,
    build_decoder,
    list_decoder_presets,
    list_decoders,
    register_decoder,
)

STEPS = 2  # enough to exercise the scheduler loop; keeps the file fast


@dataclass(frozen=True)
class Case:
    """One decoder kind: its tiny preset, what it makes, and small output sizes for the quicker tests.

    ``small`` goes to ``Decoder.generate``; ``pipeline_kwargs`` asks the pipeline itself for the same thing
    when it is called with a text prompt (PIL output: diffusers' own float -> uint8 conversion).
    """

    preset: str
    modality: Modality
    cond_shape: tuple[int, ...]
    small: dict[str, Any]
    pipeline_kwargs: dict[str, Any]


SMALL = {"height": 32, "width": 32}
CASES = [
    Case("tiny-stable-diffusion", Modality.IMAGE, (77, 32), SMALL, {**SMALL, "output_type": "pil"}),
    Case(
        "tiny-zeroscope",
        Modality.VIDEO,
        (77, 32),
        {**SMALL, "num_frames": 4},
        {**SMALL, "num_frames": 4, "output_type": "pil"},
    ),
    Case(
        "tiny-audioldm",
        Modality.AUDIO,
        (32,),
        {"audio_seconds": 0.5},
        {"audio_length_in_s": 0.5, "output_type": "np"},
    ),
]
IDS = [c.preset for c in CASES]

REAL_PRESETS = {
    "stable-diffusion-v1-5": ("stable-diffusion-v1-5/stable-diffusion-v1-5", Modality.IMAGE, (77, 768)),
    "zeroscope-v2-576w": ("cerspense/zeroscope_v2_576w", Modality.VIDEO, (77, 1024)),
    "audioldm-l-full": ("cvssp/audioldm-l-full", Modality.AUDIO, (512,)),
}


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def as_array(output: Any) -> np.ndarray:
    """The pixels or samples of one decoder output."""
    if isinstance(output, Image.Image):
        return np.asarray(output)
    if isinstance(output, Video):
        return output.frames
    return output.waveform


@pytest.fixture(scope="module")
def shared() -> dict[str, Decoder]:
    """One loaded decoder per tiny preset, shared by the read-only tests."""
    return {c.preset: build_decoder(DecoderConfig.from_preset(c.preset)) for c in CASES}


# ---- tokenizer


def test_clip_tokenizer_is_real_clip() -> None:
    tokenizer = build_clip_tokenizer()
    assert len(tokenizer) == 49408
    assert tokenizer("a red circle").input_ids == [49406, 320, 736, 7117, 49407]
    assert tokenizer.model_max_length == 77
    padded = tokenizer(["a red circle"], padding="max_length", max_length=77).input_ids[0]
    assert len(padded) == 77 and padded[-1] == 49407


# ---- per-kind behaviour, one table


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_lazy_load_and_outputs(case: Case) -> None:
    decoder = build_decoder(DecoderConfig.from_preset(case.preset))
    assert decoder.modality is case.modality
    assert decoder.spec.cond_shape == case.cond_shape
    assert not decoder.is_loaded and decoder.load_count == 0

    embeds = torch.randn(2, *decoder.spec.cond_shape, generator=seeded())
    outputs = decoder.generate(embeds, num_inference_steps=STEPS, generator=seeded(), show_progress=False)
    decoder.generate(embeds[:1], num_inference_steps=1, show_progress=False, **case.small)
    assert decoder.is_loaded and decoder.load_count == 1

    assert len(outputs) == 2
    for output in outputs:
        if case.modality is Modality.IMAGE:
            assert isinstance(output, Image.Image) and output.size == (64, 64) and output.mode == "RGB"
        elif case.modality is Modality.VIDEO:
            assert isinstance(output, Video) and output.fps == 8.0
            assert output.frames.shape == (8, 64, 64, 3) and output.frames.dtype == np.uint8
        else:
            assert isinstance(output, Audio) and output.sample_rate == 16000
            assert output.waveform.shape == (16000,) and output.waveform.dtype == np.float32

    decoder.unload()
    assert not decoder.is_loaded
    decoder.generate(embeds[:1], num_inference_steps=1, show_progress=False, **case.small)
    assert decoder.load_count == 2


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_encode_captions_shape_equals_spec(case: Case, shared: dict[str, Decoder]) -> None:
    decoder = shared[case.preset]
    embeds = decoder.encode_captions(["a red circle", "a blue square"])
    assert embeds.shape == (2, *decoder.spec.cond_shape)
    assert not torch.equal(embeds[0], embeds[1])
    if decoder.spec.pooled:  # AudioLDM's pipeline L2-normalises the CLAP text embedding
        torch.testing.assert_close(embeds.norm(dim=-1), torch.ones(2))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_prompt_embeds_path_equals_prompt_path(case: Case, shared: dict[str, Decoder]) -> None:
    decoder = shared[case.preset]
    guidance = decoder.config.guidance_scale
    reference = decoder.pipeline(
        prompt="a red circle",
        num_inference_steps=STEPS,
        guidance_scale=guidance,
        generator=seeded(),
        **case.pipeline_kwargs,
    )
    ours = decoder.generate(
        decoder.encode_captions(["a red circle"]),
        num_inference_steps=STEPS,
        guidance_scale=guidance,
        generator=seeded(),
        show_progress=False,
        **case.small,
    )[0]
    if case.modality is Modality.IMAGE:
        expected = np.asarray(reference.images[0])
    elif case.modality is Modality.VIDEO:
        expected = np.stack([np.asarray(frame) for frame in reference.frames[0]])
    else:
        expected = reference.audios[0]
    np.testing.assert_array_equal(as_array(ours), expected)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_same_seed_same_output_and_embeddings_matter(case: Case, shared: dict[str, Decoder]) -> None:
    decoder = shared[case.preset]
    embeds = decoder.encode_captions(["a red circle", "a blue square"])

    def run(row: int, seed: int = 0) -> np.ndarray:
        out = decoder.generate(
            embeds[row : row + 1],
            num_inference_steps=STEPS,
            generator=seeded(seed),
            show_progress=False,
            **case.small,
        )
        return as_array(out[0])

    first = run(0)
    np.testing.assert_array_equal(first, run(0))
    assert not np.array_equal(first, run(1))
    assert not np.array_equal(first, run(0, seed=1))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_tiny_build_is_deterministic(case: Case) -> None:
    def state(seed: int) -> dict[str, torch.Tensor]:
        config = DecoderConfig.from_preset(case.preset, seed=seed)
        components = build_decoder(config).load().components
        return {
            f"{name}.{key}": value
            for name, module in components.items()
            if isinstance(module, torch.nn.Module)
            for key, value in module.state_dict().items()
        }

    rng_before = torch.random.get_rng_state()
    first, again, other = state(0), state(0), state(1)
    assert torch.equal(rng_before, torch.random.get_rng_state())  # the global RNG is left alone
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first if first[k].is_floating_point())


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_wrong_prompt_embeds_shape_names_both_shapes(case: Case) -> None:
    decoder = build_decoder(DecoderConfig.from_preset(case.preset))
    expected = ", ".join(map(str, ("B", *case.cond_shape)))
    with pytest.raises(ValueError, match=rf"expected shape \({expected}\), found \(1, 5, 7\)"):
        decoder.generate(torch.zeros(1, 5, 7))
    good = torch.zeros(2, *case.cond_shape)
    with pytest.raises(ValueError, match=r"negative_prompt_embeds.*found \(3, "):
        decoder.generate(good, negative_prompt_embeds=torch.zeros(3, *case.cond_shape))
    assert not decoder.is_loaded  # checked before anything is built


def test_explicit_negative_and_batch1_expansion(shared: dict[str, Decoder]) -> None:
    decoder = shared["tiny-stable-diffusion"]
    embeds = decoder.encode_captions(["a red circle", "a blue square"])
    kwargs = {"num_inference_steps": STEPS, "show_progress": False, **SMALL}
    default = decoder.generate(embeds, generator=seeded(), **kwargs)
    explicit = decoder.generate(
        embeds, negative_prompt_embeds=decoder.encode_captions([""]), generator=seeded(), **kwargs
    )
    for a, b in zip(default, explicit, strict=True):
        np.testing.assert_array_equal(as_array(a), as_array(b))


# ---- conditioning length: any query count up to the tokenizer's 77


SEQUENCE_CASES = [c for c in CASES if c.modality is not Modality.AUDIO]


@pytest.mark.parametrize("cond_len", [24, 8])
@pytest.mark.parametrize("case", SEQUENCE_CASES, ids=[c.preset for c in SEQUENCE_CASES])
def test_shorter_cond_len_encodes_and_generates(case: Case, cond_len: int, shared: dict[str, Decoder]) -> None:
    decoder = build_decoder(DecoderConfig.from_preset(case.preset, cond_len=cond_len))
    assert decoder.spec.cond_len == cond_len and decoder.spec.cond_shape == (cond_len, 32)
    captions = ["a red circle", "a blue square"]
    embeds = decoder.encode_captions(captions)
    assert embeds.shape == (2, cond_len, 32)
    native = shared[case.preset].encode_captions(captions)  # same seed, standard 77 tokens
    assert native.shape == (2, 77, 32) and torch.equal(embeds, native[:, :cond_len])
    assert decoder.empty_caption_embedding().shape == (1, cond_len, 32)  # the default negative matches

    # CLIP's text encoder is causal: tokens past the kept ones change nothing in them
    prefix = " ".join(["red"] * (cond_len - 1))
    a, b = decoder.encode_captions([f"{prefix} circle square", f"{prefix} dog"])
    assert torch.equal(a, b)

    outputs = decoder.generate(embeds[:1], num_inference_steps=1, generator=seeded(), show_progress=False, **case.small)
    assert len(outputs) == 1 and isinstance(outputs[0], Image.Image | Video)
    with pytest.raises(ValueError, match=rf"expected shape \(B, {cond_len}, 32\), found \(1, 77, 32\)"):
        decoder.generate(torch.zeros(1, 77, 32))
    with pytest.raises(ValueError, match=rf"negative_prompt_embeds: expected shape \(1 or 2, {cond_len}, 32\)"):
        decoder.generate(embeds, negative_prompt_embeds=native[:1])


@pytest.mark.parametrize("case", SEQUENCE_CASES, ids=[c.preset for c in SEQUENCE_CASES])
def test_cond_len_longer_than_tokenizer_fails_on_load(case: Case) -> None:
    decoder = build_decoder(DecoderConfig.from_preset(case.preset, cond_len=78))
    assert decoder.spec.cond_len == 78
    with pytest.raises(ValueError, match=r"cond_len=78 is longer than its tokenizer's model_max_length=77"):
        decoder.generate(torch.zeros(1, 78, 32))
    assert not decoder.is_loaded


def test_pooled_decoder_rejects_a_cond_len() -> None:
    assert DecoderConfig.from_preset("tiny-audioldm", cond_len=1).cond_len == 1
    with pytest.raises(
        ValueError, match="audioldm conditioning is one pooled vector: cond_len must be None or 1, got 8"
    ):
        DecoderConfig.from_preset("tiny-audioldm", cond_len=8)


def test_to_before_load_applies_at_load() -> None:
    decoder = build_decoder(DecoderConfig.from_preset("tiny-stable-diffusion")).to("cpu", torch.bfloat16)
    assert not decoder.is_loaded
    embeds = decoder.encode_captions(["a red circle"])
    assert decoder.pipeline.unet.dtype == torch.bfloat16 and embeds.dtype == torch.bfloat16
    decoder.to(dtype=torch.float32)
    assert decoder.pipeline.unet.dtype == torch.float32 and decoder.load_count == 1
    decoder.to(dtype="bfloat16")  # names go through anygpt.base.utils.resolve_dtype
    assert decoder.pipeline.unet.dtype == torch.bfloat16 and decoder.dtype == torch.bfloat16


def test_dtype_names_are_anygpt_utils_resolve_dtype() -> None:
    config = DecoderConfig.from_preset("tiny-stable-diffusion", torch_dtype="bfloat16")
    assert build_decoder(config).dtype == resolve_dtype("bfloat16") == torch.bfloat16
    with pytest.raises(ValueError) as reference:
        resolve_dtype("float64")
    with pytest.raises(ValueError, match="^torch_dtype: ") as error:
        DecoderConfig.from_preset("tiny-stable-diffusion", torch_dtype="float64")
    assert str(reference.value) in str(error.value)  # one map, one list of valid names
    with pytest.raises(ValueError, match="torch_dtype must be a dtype name"):
        DecoderConfig.from_preset("tiny-stable-diffusion", torch_dtype=torch.float16)


# ---- real sources: missing weights


@pytest.mark.parametrize("preset", sorted(REAL_PRESETS))
def test_missing_real_model_raises_file_not_found(preset: str, tmp_path, monkeypatch) -> None:
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    decoder = build_decoder(DecoderConfig.from_preset(preset))
    model_id = REAL_PRESETS[preset][0]
    with pytest.raises(FileNotFoundError) as error:
        decoder.generate(torch.zeros(1, *decoder.spec.cond_shape))
    message = str(error.value)
    assert str(cache) in message and f"`hf download {model_id}`" in message  # same hint as anygpt.base.utils
    assert not decoder.is_loaded


def test_missing_local_folder_names_the_path(tmp_path) -> None:
    folder = tmp_path / "no-such-model"
    decoder = build_decoder(DecoderConfig(kind="stable-diffusion", source=str(folder)))
    with pytest.raises(FileNotFoundError, match=str(folder)):
        decoder.load()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_local_folder_source_loads_with_from_pretrained(case: Case, shared: dict[str, Decoder], tmp_path) -> None:
    tiny = shared[case.preset]
    tiny.pipeline.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="width 32, but the config declares cond_dim=.*set cond_dim=32"):
        build_decoder(DecoderConfig(kind=tiny.config.kind, source=str(tmp_path))).load()  # standard width declared
    local = build_decoder(DecoderConfig.from_preset(case.preset, source=str(tmp_path)))
    captions = ["a red circle"]
    torch.testing.assert_close(local.encode_captions(captions), tiny.encode_captions(captions), rtol=0, atol=1e-6)
    assert type(local.pipeline) is type(tiny.pipeline) and local.load_count == 1


@pytest.mark.real_weights
@pytest.mark.parametrize("preset", sorted(REAL_PRESETS))
def test_real_decoder_encodes_to_its_spec(preset: str) -> None:
    model_id = REAL_PRESETS[preset][0]
    cached = huggingface_hub.try_to_load_from_cache(model_id, "model_index.json")
    if not isinstance(cached, str):
        pytest.skip(f"{model_id} is not in the Hugging Face cache")
    decoder = build_decoder(DecoderConfig.from_preset(preset))
    embeds = decoder.encode_captions(["a red circle"])
    assert embeds.shape == (1, *decoder.spec.cond_shape)


# ---- configs, presets and registry


@pytest.mark.parametrize("name", list_decoder_presets())
def test_presets_validate_and_round_trip(name: str) -> None:
    config = DecoderConfig.from_preset(name)
    assert DecoderConfig.from_dict(config.to_dict()) == config
    decoder = build_decoder(config)
    assert not decoder.is_loaded
    if name in REAL_PRESETS:
        model_id, modality, cond_shape = REAL_PRESETS[name]
        assert config.source == model_id and decoder.spec.cond_shape == cond_shape
        assert decoder.modality is modality and config.modality is modality


def test_real_preset_generation_defaults() -> None:
    sd = DecoderConfig.from_preset("stable-diffusion-v1-5")
    assert (sd.num_inference_steps, sd.guidance_scale, sd.height, sd.width) == (50, 7.5, 512, 512)
    video = DecoderConfig.from_preset("zeroscope-v2-576w")
    assert (video.num_inference_steps, video.guidance_scale, video.height, video.width) == (40, 7.5, 320, 576)
    assert (video.num_frames, video.fps) == (24, 8.0)
    audio = DecoderConfig.from_preset("audioldm-l-full")
    assert (audio.num_inference_steps, audio.guidance_scale, audio.audio_seconds) == (50, 2.5, 5.0)
    assert DecoderSpec(Modality.AUDIO, 1, 512, pooled=True).cond_shape == (512,)


def test_unknown_names_list_the_valid_ones() -> None:
    with pytest.raises(ValueError) as error:
        DecoderConfig(kind="dall-e")
    assert all(kind in str(error.value) for kind in ["audioldm", "stable-diffusion", "zeroscope"])
    assert list_decoders() == ["audioldm", "stable-diffusion", "zeroscope"]
    with pytest.raises(ValueError) as error:
        DecoderConfig.from_preset("sdxl")
    assert all(name in str(error.value) for name in list_decoder_presets())


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"torch_dtype": "float64"}, "torch_dtype"),
        ({"height": 60}, "height"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"guidance_scale": -1.0}, "guidance_scale"),
        ({"audio_seconds": 0}, "audio_seconds"),
        ({"cond_dim": 0}, "cond_dim"),
        ({"cond_len": 0}, "cond_len"),
        ({"source": ""}, "source"),
    ],
)
def test_config_validation(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        DecoderConfig.from_preset("tiny-stable-diffusion", **overrides)


def test_config_rejects_unknown_keys_and_pooled_length() -> None:
    with pytest.raises(ValueError, match="valid keys"):
        DecoderConfig.from_dict({"kind": "audioldm", "colour": "red", "cond_dim": 8})
    with pytest.raises(ValueError, match="cond_len must be None or 1"):
        DecoderConfig(kind="audioldm", cond_len=77, cond_dim=8)


def test_register_decoder_rejects_a_taken_kind() -> None:
    with pytest.raises(ValueError, match="already registered"):

        @register_decoder("stable-diffusion")
        class Impostor(Decoder):  # noqa: F841
            pass
