"""End-to-end behaviour of AnyGPTPipeline on the tiny preset."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from anygpt import AnyGPTPipeline, Conversation, GenerationRequest
from anygpt.base.errors import UsageError
from anygpt.base.media import Audio, MediaError, Video
from anygpt.base.modality import MEDIA_MODALITIES, Modality

GEN = dict(seed=0, max_new_tokens=4, num_inference_steps=2, show_progress=False)


def test_every_modality_in_and_out(tiny_pipe, media_files):
    out = tiny_pipe(
        "describe these and answer with media <b>bold</b> [IMG0] <image>",
        images=[media_files["image"]],
        audios=[media_files["audio"]],
        videos=[media_files["video"]],
        modalities=["image", "video", "audio"],
        **GEN,
    )
    assert isinstance(out.text, str)
    assert len(out.images) == 1 and out.images[0].size == (64, 64)
    assert len(out.videos) == 1 and isinstance(out.videos[0], Video)
    assert out.videos[0].frames.shape == (8, 64, 64, 3) and out.videos[0].frames.dtype == np.uint8
    assert len(out.audios) == 1 and isinstance(out.audios[0], Audio) and out.audios[0].sample_rate == 16000
    assert out.audios[0].waveform.ndim == 1 and 0.5 < out.audios[0].duration < 1.5
    assert out.conditioning["image"].shape == (1, 77, tiny_pipe.decoders[Modality.IMAGE].spec.cond_dim)
    assert out.conditioning["audio"].shape == (1, tiny_pipe.decoders[Modality.AUDIO].spec.cond_dim)
    # forced groups come after the text, complete and in order
    tokens = tiny_pipe.model.tokens
    tail = out.token_ids[-(4 + 24 + 8) :]
    assert tail == tokens.signal[Modality.IMAGE] + tokens.signal[Modality.VIDEO] + tokens.signal[Modality.AUDIO]


def test_text_only_request_loads_no_decoder():
    pipe = AnyGPTPipeline.from_pretrained("tiny")
    out = pipe("hello", modalities=[], **GEN)
    assert out.images == out.videos == out.audios == []
    assert not any(d.is_loaded for d in pipe.decoders.values())
    pipe("hello", modalities="image", **GEN)
    assert pipe.decoders[Modality.IMAGE].is_loaded
    assert not pipe.decoders[Modality.VIDEO].is_loaded and not pipe.decoders[Modality.AUDIO].is_loaded


def test_decoders_loaded_once_across_calls(tiny_pipe):
    for _ in range(3):
        tiny_pipe("again", modalities="image,audio", **GEN)
    assert tiny_pipe.decoders[Modality.IMAGE].load_count == 1
    assert tiny_pipe.decoders[Modality.AUDIO].load_count == 1


def test_same_seed_same_result_and_sampling_respects_seed(tiny_pipe):
    kwargs = dict(GEN, temperature=1.0, top_p=0.9, max_new_tokens=8)
    a = tiny_pipe("hi", modalities="image", **kwargs)
    b = tiny_pipe("hi", modalities="image", **kwargs)
    assert a.token_ids == b.token_ids
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    c = tiny_pipe("hi", modalities="image", **dict(kwargs, seed=1))
    assert not np.array_equal(np.asarray(a.images[0]), np.asarray(c.images[0]))  # the decoder's noise differs


def test_media_encoded_once_across_turns(tiny_pipe, media_files, monkeypatch):
    calls = []
    original = tiny_pipe.model.encoder.encode

    def counting(modality, items):
        calls.append((modality, len(items)))
        return original(modality, items)

    monkeypatch.setattr(tiny_pipe.model.encoder, "encode", counting)
    import anygpt.core.pipeline as pipeline_module

    decoded = []
    real_load = pipeline_module.load_media

    def counting_load(modality, path, **kwargs):
        decoded.append(modality)
        return real_load(modality, path, **kwargs)

    monkeypatch.setattr(pipeline_module, "load_media", counting_load)
    conv = Conversation()
    tiny_pipe("what is this?", images=[media_files["image"]], conversation=conv, **GEN)
    tiny_pipe("and now?", conversation=conv, **GEN)
    tiny_pipe(
        "same picture again",
        images=[media_files["image"]],
        audios=[media_files["audio"]],
        conversation=conv,
        **GEN,
    )
    assert calls == [(Modality.IMAGE, 1), (Modality.AUDIO, 1)]
    assert decoded == [Modality.IMAGE, Modality.AUDIO]  # the cached image file is hashed, not decoded again
    assert [t.role for t in conv.turns] == ["user", "assistant"] * 3
    # the third prompt holds two image items (turns 1 and 3) and one audio item
    ids, order = tiny_pipe.model.tokenize_pieces(conv.prompt_pieces(tiny_pipe.tokenizer.eos_token_id))
    assert [r.modality for r in order] == [Modality.IMAGE, Modality.IMAGE, Modality.AUDIO]


def test_failed_turn_is_not_kept(tiny_pipe, tmp_path):
    conv = Conversation()
    bad = tmp_path / "not_an_image.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(MediaError, match="not_an_image.png"):
        tiny_pipe("look", images=[bad], conversation=conv, **GEN)
    assert conv.turns == []


def test_auto_mode_completes_groups_the_llm_starts():
    """Make the LLM want [IMG0] at every step: forcing must keep each group whole, even when cut off."""
    pipe = AnyGPTPipeline.from_pretrained("tiny")
    img = pipe.model.tokens.signal[Modality.IMAGE]
    head = pipe.model.language_model.get_output_embeddings()
    with torch.no_grad():
        head.weight[img[0]] = head.weight[img[0]] * 0 + 50.0 * head.weight.std()
        final_norm = pipe.model.language_model.base_model.model.model.norm
        final_norm.weight.fill_(1.0)
    out = pipe("draw", modalities="auto", **dict(GEN, max_new_tokens=6))
    # IMG0 forced IMG1..3, then IMG0 again starts a group that max_new_tokens cuts after IMG1: it is completed
    assert out.token_ids[:8] == img + img
    assert len(out.images) == 2 and out.conditioning["image"].shape[0] == 2


def test_forced_modalities_suppress_other_groups():
    pipe = AnyGPTPipeline.from_pretrained("tiny")
    img = pipe.model.tokens.signal[Modality.IMAGE]
    head = pipe.model.language_model.get_output_embeddings()
    with torch.no_grad():
        head.weight[img[0]] += 50.0 * head.weight.std()
    out = pipe("make a sound", modalities=["audio"], **GEN)
    assert out.images == [] and len(out.audios) == 1
    assert not set(img) & set(out.token_ids)


def test_hidden_states_read_where_signal_tokens_are_inputs(tiny_pipe):
    """The conditioning equals the output projector applied to a teacher-forced forward pass, read at the
    positions where the signal tokens are the input (NExT-GPT's inference read one position earlier)."""
    out = tiny_pipe("a picture please", modalities="image", **GEN)
    model = tiny_pipe.model
    conv = Conversation(template="vicuna_v1")
    conv.add_user("a picture please")
    prompt_ids, _ = model.tokenize_pieces(conv.prompt_pieces(tiny_pipe.tokenizer.eos_token_id))
    ids = torch.tensor([prompt_ids + out.token_ids])
    with torch.no_grad():
        hidden = model.language_model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        start = len(prompt_ids) + out.token_ids.index(model.tokens.signal[Modality.IMAGE][0])
        group = torch.tensor([model.tokens.signal[Modality.IMAGE]])
        expected = model.output_projectors["image"](
            hidden[:, start : start + 4], model.language_model.get_input_embeddings()(group)
        )
        shifted = model.output_projectors["image"](
            hidden[:, start - 1 : start + 3], model.language_model.get_input_embeddings()(group)
        )
    torch.testing.assert_close(out.conditioning["image"], expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out.conditioning["image"], shifted, atol=1e-5)


def _perturb_trained_parts(pipe, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pipe.model.named_parameters():
            if "lora_" in name or "projectors" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        ids = pipe.model.tokens.all_added_ids
        for matrix in (
            pipe.model.language_model.get_input_embeddings().weight,
            pipe.model.language_model.get_output_embeddings().weight,
        ):
            matrix[ids] += torch.randn(len(ids), matrix.shape[1], generator=gen)


def test_save_and_load_reproduce_outputs_exactly(tmp_path, media_files):
    pipe = AnyGPTPipeline.from_pretrained("tiny")
    _perturb_trained_parts(pipe)
    kwargs = dict(images=[media_files["image"]], modalities="image,audio", **dict(GEN, max_new_tokens=8))
    before = pipe("round trip", **kwargs)
    pipe.save_pretrained(tmp_path / "saved")
    files = sorted(p.relative_to(tmp_path / "saved").as_posix() for p in (tmp_path / "saved").rglob("*") if p.is_file())
    assert "anygpt_index.json" in files and "token_embeddings.safetensors" in files
    assert "lora/adapter_model.safetensors" in files and "output_projectors/image/config.json" in files
    assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl")) for f in files)
    loaded = AnyGPTPipeline.from_pretrained(tmp_path / "saved")
    after = loaded("round trip", **kwargs)
    assert after.token_ids == before.token_ids and after.text == before.text
    for key in before.conditioning:
        assert torch.equal(before.conditioning[key], after.conditioning[key])
    assert np.array_equal(np.asarray(before.images[0]), np.asarray(after.images[0]))
    assert np.array_equal(before.audios[0].waveform, after.audios[0].waveform)
    # only the trained parts are written: far smaller than the model
    size = sum((tmp_path / "saved" / f).stat().st_size for f in files)
    assert size < 4 * sum(p.numel() for p in pipe.model.parameters())


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'no-such-model'.*tiny"):
        AnyGPTPipeline.from_pretrained("no-such-model")
    with pytest.raises(ValueError, match="holds no anygpt_index.json"):
        AnyGPTPipeline.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(modalities="image,smell"), "modalities: unknown output modality 'smell'"),
        (dict(temperature=-1.0), "temperature must be a finite number >= 0"),
        (dict(top_p=0.0), r"top_p must be a finite number in \(0, 1\]"),
        (dict(max_new_tokens=0), "max_new_tokens must be a positive integer, got 0"),
        (dict(seed=-1), "seed must be an integer >= 0"),
        (dict(adapters=3), "adapters must be a name, a comma-separated string or list of names"),
        (dict(num_inference_steps=0), "num_inference_steps must be a positive integer, got 0"),
        (dict(num_frames=-1), "num_frames must be a positive integer, got -1"),
        (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number >= 0, got nan"),
        (dict(audio_seconds=0.0), "audio_seconds must be a finite number > 0"),
        (dict(height=65), "height must be a multiple of 8"),
    ],
)
def test_bad_arguments_raise_clear_errors(tiny_pipe, kwargs, message):
    with pytest.raises(UsageError, match=message) as raised:
        tiny_pipe("x", **kwargs)
    assert isinstance(raised.value, ValueError)  # as a diffusers pipeline's bad argument


def test_wrong_object_type_is_a_media_error(tiny_pipe):
    with pytest.raises(MediaError, match=r"audios\[0\]: expected a file path or an Audio object, got ndarray"):
        tiny_pipe("x", audios=[np.zeros(10)])


def test_cached_and_full_forward_give_the_same_conditioning(tiny_pipe):
    """Reusing the prompt's key/value cache for the signal hidden states matches a full forward pass."""
    conv = Conversation(template="vicuna_v1")
    conv.add_user("draw something and play something")
    input_ids, embeds = tiny_pipe.build_inputs(conv)
    forced = {Modality.IMAGE, Modality.AUDIO}
    generated, cache = tiny_pipe.generate_tokens(embeds, forced=forced, max_new_tokens=5, temperature=0.0, top_p=1.0)
    assert cache is not None
    with_cache = tiny_pipe.signal_conditioning(input_ids, embeds, generated, cache)
    full = tiny_pipe.signal_conditioning(input_ids, embeds, generated)
    assert set(with_cache) == set(full) == forced
    for m in forced:
        torch.testing.assert_close(with_cache[m], full[m], rtol=1e-4, atol=1e-5)


def test_later_turns_render_only_their_own_media(tiny_pipe):
    """Signal groups of earlier assistant turns stay in the history but are not rendered again."""
    conv = Conversation()
    counts = [len(tiny_pipe("draw", modalities="image", conversation=conv, **GEN).images) for _ in range(3)]
    assert counts == [1, 1, 1]


def test_prompt_layout_follows_the_vicuna_template(tiny_pipe):
    conv = Conversation(template="vicuna_v1")
    conv.add_user("hi <there>")
    conv.add_assistant("yo", tiny_pipe.tokenizer("yo", add_special_tokens=False).input_ids)
    conv.add_user("again")
    ids, _ = tiny_pipe.model.tokenize_pieces(conv.prompt_pieces(tiny_pipe.tokenizer.eos_token_id))
    assert ids[0] == tiny_pipe.tokenizer.bos_token_id
    text = tiny_pipe.tokenizer.decode(ids)
    assert text.startswith("<s>A chat between a curious user")
    assert text.endswith("questions. USER: hi <there> ASSISTANT:yo</s>USER: again ASSISTANT:")


def test_neighbouring_text_pieces_are_tokenised_together(tiny_pipe, monkeypatch):
    seen = []
    tokenizer = tiny_pipe.model.tokenizer

    class Spy:
        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def __call__(self, text, **kwargs):
            seen.append(text)
            return tokenizer(text, **kwargs)

    monkeypatch.setattr(tiny_pipe.model, "tokenizer", Spy())
    from anygpt.core.conversation import MediaRef

    ref = MediaRef(Modality.IMAGE, "k")
    tiny_pipe.model.tokenize_pieces(["USER: ", ref, "\n", "what ", "is it", [7], "ASSISTANT:"])
    assert seen == ["USER: ", "\nwhat is it", "ASSISTANT:"]


def test_a_single_path_needs_no_list(tiny_pipe, media_files):
    out = tiny_pipe("x", images=str(media_files["image"]), **GEN)
    assert isinstance(out.text, str)


def test_save_refuses_to_replace_a_foreign_folder(tmp_path, tiny_pipe, monkeypatch):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty and holds no anygpt_index.json"):
        tiny_pipe.save_pretrained(foreign)
    assert (foreign / "precious.txt").read_text() == "keep me"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    tiny_pipe.save_pretrained("~/model")
    saved = tmp_path / "home" / "model"
    assert (saved / "anygpt_index.json").is_file()
    umask = os.umask(0)
    os.umask(umask)
    assert saved.stat().st_mode & 0o777 == 0o777 & ~umask  # follows the umask, not mkdtemp's 0o700
    tiny_pipe.save_pretrained(saved)  # a previous save may be replaced


def test_index_paths_may_not_leave_the_folder(tmp_path, tiny_pipe):
    tiny_pipe.save_pretrained(tmp_path / "m")
    index_path = tmp_path / "m" / "anygpt_index.json"
    index = json.loads(index_path.read_text())
    index["parts"]["token_embeddings"] = "../../etc/passwd"
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="points outside the model folder"):
        AnyGPTPipeline.from_pretrained(tmp_path / "m")
    del index["config"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"missing or invalid key\(s\) \['config'\]"):
        AnyGPTPipeline.from_pretrained(tmp_path / "m")


def test_any_query_count_works_end_to_end():
    """The design card's query lengths: image 77 -> 24, video 77 -> 8, and 8 audio queries pooled to one vector."""
    import dataclasses

    from anygpt.core.config import config_from_preset

    config = config_from_preset("tiny")
    config.decoders["image"] = dataclasses.replace(config.decoders["image"], cond_len=24)
    config.decoders["video"] = dataclasses.replace(config.decoders["video"], cond_len=8)
    config.output_projector_overrides = {"audio": {"num_queries": 8}}
    pipe = AnyGPTPipeline.from_config(config)
    assert pipe.model.output_projectors["audio"].config.num_queries == 8
    out = pipe("all of them", modalities=[Modality.IMAGE, "video", "audio"], **GEN)
    assert out.conditioning["image"].shape[1] == 24 and out.conditioning["video"].shape[1] == 8
    assert out.conditioning["audio"].ndim == 2
    assert len(out.images) == len(out.videos) == len(out.audios) == 1
    config.output_projector_overrides = {"image": {"num_queries": 77}}
    with pytest.raises(ValueError, match="set decoders.image.cond_len instead"):
        AnyGPTPipeline.from_config(config)


def test_half_precision_with_real_sample_media(samples_dir):
    """``.to(dtype=...)`` moves every part; NExT-GPT's own JPEG / 48 kHz WAV / 29.97 fps MP4 samples go through."""
    pipe = AnyGPTPipeline.from_pretrained("tiny").to(dtype=torch.bfloat16)
    data = samples_dir / "T_X_pair_data"
    out = pipe(
        "what is in these?",
        images=[data / "cc3m" / "images" / "001310451.jpg"],
        audios=[data / "audiocap" / "audios" / "102666.wav"],
        videos=[data / "webvid" / "videos" / "00007033.mp4"],
        modalities="image,video,audio",
        **GEN,
    )
    assert pipe.model.dtype == torch.bfloat16 and all(d.dtype == torch.bfloat16 for d in pipe.decoders.values())
    assert all(c.dtype == torch.bfloat16 for c in out.conditioning.values())
    assert out.images[0].size == (64, 64) and out.videos[0].frames.dtype == np.uint8
    assert out.audios[0].waveform.dtype == np.float32 and np.isfinite(out.audios[0].waveform).all()


# ---------------------------------------------------------------------------------------------------- the request
def _same(a, b) -> bool:
    return (
        a.text == b.text
        and a.token_ids == b.token_ids
        and [np.asarray(i).tobytes() for i in a.images] == [np.asarray(i).tobytes() for i in b.images]
        and [v.frames.tobytes() for v in a.videos] == [v.frames.tobytes() for v in b.videos]
        and [x.waveform.tobytes() for x in a.audios] == [x.waveform.tobytes() for x in b.audios]
    )


def test_keywords_and_run_take_one_path(tiny_pipe, media_files):
    """``pipe(...)`` builds the ``GenerationRequest`` that ``pipe.run`` answers: the same output, bit for bit."""
    kwargs = dict(
        images=[media_files["image"]],
        modalities="image,audio",
        seed=4,
        max_new_tokens=4,
        num_inference_steps=2,
        guidance_scale=3.0,
        decoder_overrides={"audio": {"num_inference_steps": 1}},
    )
    by_keywords = tiny_pipe("look", show_progress=False, **kwargs)
    request = GenerationRequest("look", **kwargs)
    assert request.modalities == ["image", "audio"] and request.images == [media_files["image"]]
    assert request.decoder_settings(Modality.AUDIO)["num_inference_steps"] == 1
    assert request.decoder_settings(Modality.IMAGE)["num_inference_steps"] == 2
    assert _same(tiny_pipe.run(request, show_progress=False), by_keywords)
    assert len(by_keywords.images) == len(by_keywords.audios) == 1


def test_request_json_form_round_trips_and_names_its_fields():
    request = GenerationRequest(
        "draw <it>",
        images="cat.png",
        modalities="Image, audio",
        adapters={"image": 0.5, "audio": 1},
        seed=7,
        num_frames=8,
        height=64,
        decoder_overrides={Modality.IMAGE: {"guidance_scale": 2.5, "num_inference_steps": None}},
        id="x-1",
    )
    data = request.to_dict()
    assert data["images"] == ["cat.png"] and data["modalities"] == ["image", "audio"]
    assert data["decoder_overrides"] == {"image": {"guidance_scale": 2.5}}
    assert set(data) == {f for f in GenerationRequest.__dataclass_fields__} - {"origin"}
    assert GenerationRequest.from_dict(json.loads(json.dumps(data))) == request
    legacy = {"prompt": "draw <it>", "steps": 3, "guidance": 1.5, "frames": 4}
    assert GenerationRequest.from_dict(legacy) == GenerationRequest(
        "draw <it>", num_inference_steps=3, guidance_scale=1.5, num_frames=4
    )
    with pytest.raises(UsageError, match=r"^in.jsonl:2: guidance_scale must be a finite number >= 0, got -1$"):
        GenerationRequest.from_dict({"prompt": "x", "guidance": -1}, origin="in.jsonl:2: ")
    with pytest.raises(UsageError, match=r"unknown fields \['colour'\]; allowed: \['adapters', 'audio_seconds'"):
        GenerationRequest.from_dict({"prompt": "x", "colour": "red"})
    with pytest.raises(UsageError, match="expected an object with a string 'prompt'"):
        GenerationRequest.from_dict({"images": []})
    with pytest.raises(ValueError, match="images: Image objects have no JSON form"):
        GenerationRequest("x", images=[Image.new("RGB", (8, 8))]).to_dict()
    assert [m.plural for m in MEDIA_MODALITIES] == ["images", "videos", "audios"]


def test_a_request_is_checked_against_the_model(tiny_pipe):
    request = GenerationRequest("x", decoder_overrides={"video": {"num_frames": 2}}, origin="f:3: ")
    tiny_pipe.check_inputs(request)  # valid for a model with a video decoder
    request.decoder_overrides["video"]["num_frames"] = 0  # changed after it was built: checked again
    with pytest.raises(UsageError, match=r"^f:3: decoder_overrides\['video'\].num_frames must be a positive integer"):
        tiny_pipe.check_inputs(request)
    with pytest.raises(UsageError, match="^f:3: unknown LoRA adapter 'nope'"):
        tiny_pipe.check_inputs(GenerationRequest("x", adapters="nope", origin="f:3: "))
    with pytest.raises(UsageError, match="give seed or generator, not both"):
        tiny_pipe("x", seed=1, generator=torch.Generator().manual_seed(1), max_new_tokens=1)


def test_generator_seeds_the_call_as_in_diffusers(tiny_pipe):
    kwargs = dict(modalities="image", temperature=1.0, max_new_tokens=6, num_inference_steps=2, show_progress=False)
    a = tiny_pipe("hi", generator=torch.Generator().manual_seed(5), **kwargs)
    b = tiny_pipe("hi", generator=torch.Generator().manual_seed(5), **kwargs)
    assert _same(a, b)  # a freshly seeded generator reproduces the call
    reused = torch.Generator().manual_seed(5)
    first, second = (tiny_pipe("hi", generator=reused, **kwargs) for _ in range(2))
    assert _same(first, a) and not _same(second, first)  # a reused one moves on, like diffusers' noise
    drawn = int(torch.randint(0, 2**32, (1,), generator=torch.Generator().manual_seed(5)).item())
    assert _same(tiny_pipe("hi", seed=drawn, **kwargs), a)  # the generator stands where the seed would


def test_a_list_of_prompts_gives_one_output_per_prompt(tiny_pipe):
    kwargs = dict(modalities="image", max_new_tokens=3, num_inference_steps=1, show_progress=False)
    outputs = tiny_pipe(["one", "two"], seed=2, **kwargs)
    assert isinstance(outputs, list) and len(outputs) == 2 and all(len(o.images) == 1 for o in outputs)
    assert _same(outputs[0], tiny_pipe("one", seed=2, **kwargs)) and _same(
        outputs[1], tiny_pipe("two", seed=2, **kwargs)
    )
    generators = [torch.Generator().manual_seed(i) for i in (8, 9)]
    by_list = tiny_pipe(["one", "one"], generator=generators, **kwargs)
    assert _same(by_list[1], tiny_pipe("one", generator=torch.Generator().manual_seed(9), **kwargs))
    with pytest.raises(UsageError, match="a list of 1 generators for 2 prompts"):
        tiny_pipe(["one", "two"], generator=[torch.Generator()], **kwargs)
    with pytest.raises(UsageError, match="not with a list of prompts"):
        tiny_pipe(["one"], conversation=Conversation(), **kwargs)
    with pytest.raises(UsageError, match="prompt must be a string, got 3"):
        tiny_pipe(["one", 3], **kwargs)


def test_a_list_of_prompts_in_batches_matches_one_by_one(tiny_pipe):
    """``batch_size`` answers the prompts together (``run_batch``): the same tokens as one by one, and media within
    the rounding of a batched denoiser (documented in ``run_batch``); generators give each prompt its seed."""
    kwargs = dict(modalities="image", max_new_tokens=3, num_inference_steps=1, show_progress=False)
    prompts = ["one", "two three", "four"]
    alone = tiny_pipe(prompts, generator=[torch.Generator().manual_seed(i) for i in (1, 2, 3)], **kwargs)
    together = tiny_pipe(
        prompts, generator=[torch.Generator().manual_seed(i) for i in (1, 2, 3)], batch_size=2, **kwargs
    )
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    for a, b in zip(alone, together, strict=True):
        diff = np.abs(np.asarray(a.images[0], dtype=np.int16) - np.asarray(b.images[0], dtype=np.int16))
        assert diff.max() <= 2
    with pytest.raises(UsageError, match="batch_size: expected an integer >= 1, got 0"):
        tiny_pipe(prompts, batch_size=0, **kwargs)
    with pytest.raises(UsageError, match="takes no streamer"):
        tiny_pipe(prompts, batch_size=2, on_decode=lambda *a: None, **kwargs)


def test_callback_on_step_end_sees_every_denoising_step(tiny_pipe):
    """diffusers' ``callback(pipe, step, timestep, callback_kwargs)``, for every decoder (Stable Diffusion's own
    hook, and ZeroScope / AudioLDM's older ``callback``); what it returns replaces the latents."""
    seen = []

    def record(pipe, step, timestep, callback_kwargs):
        seen.append((type(pipe).__name__, step, callback_kwargs["latents"].shape[0]))
        return callback_kwargs

    kwargs = dict(modalities="image,video,audio", seed=0, max_new_tokens=2, num_inference_steps=2, show_progress=False)
    plain = tiny_pipe("x", **kwargs)
    watched = tiny_pipe("x", callback_on_step_end=record, **kwargs)
    assert _same(watched, plain)  # looking changes nothing
    names = list(dict.fromkeys(name for name, _, _ in seen))
    assert names == ["StableDiffusionPipeline", "TextToVideoSDPipeline", "AudioLDMPipeline"]
    for name in names:  # every step of each, in order (SD's PNDM scheduler runs one more than asked)
        steps = [step for n, step, _ in seen if n == name]
        assert steps == list(range(len(steps))) and len(steps) >= 2, name

    def zero_latents(pipe, step, timestep, callback_kwargs):
        return {**callback_kwargs, "latents": torch.zeros_like(callback_kwargs["latents"])}

    changed = tiny_pipe("x", callback_on_step_end=zero_latents, **kwargs)
    assert np.asarray(changed.images[0]).tobytes() != np.asarray(plain.images[0]).tobytes()
    assert changed.audios[0].waveform.tobytes() != plain.audios[0].waveform.tobytes()
