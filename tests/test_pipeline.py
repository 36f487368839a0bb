"""End-to-end behaviour of AnyGPTPipeline on the tiny preset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anygpt import AnyGPTPipeline, Conversation
from anygpt.media import Audio, MediaError, Video
from anygpt.modality import Modality

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
    assert c.token_ids != a.token_ids or not np.array_equal(np.asarray(a.images[0]), np.asarray(c.images[0]))


def test_media_encoded_once_across_turns(tiny_pipe, media_files, monkeypatch):
    calls = []
    original = tiny_pipe.model.encoder.encode

    def counting(modality, items):
        calls.append((modality, len(items)))
        return original(modality, items)

    monkeypatch.setattr(tiny_pipe.model.encoder, "encode", counting)
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
    conv = Conversation()
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
        (dict(modalities="image,smell"), "unknown modality 'smell'"),
        (dict(temperature=-1.0), "temperature must be >= 0"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
    ],
)
def test_bad_arguments_raise_clear_errors(tiny_pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_pipe("x", **kwargs)


def test_wrong_object_type_is_a_media_error(tiny_pipe):
    with pytest.raises(MediaError, match="expected a file path or a Audio object, got ndarray"):
        tiny_pipe("x", audios=[np.zeros(10)])


def test_cached_and_full_forward_give_the_same_conditioning(tiny_pipe):
    """Reusing the prompt's key/value cache for the signal hidden states matches a full forward pass."""
    conv = Conversation()
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
