"""The frozen ImageBind encoder (tiny config, no network): shapes, freezing, determinism, preprocessing equal
to Meta's own transforms, checkpoint lookup and loading, presets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anygpt.base.media import Audio, Video, load_audio, load_image, load_video, to_mono
from anygpt.base.modality import Modality
from encoders import (
    EncoderOutput,
    ImageBindConfig,
    ImageBindEncoder,
    build_imagebind_encoder,
    default_checkpoint_path,
    find_imagebind_checkpoint,
    list_encoder_presets,
)
from encoders import transforms as T
from encoders.imagebind import CHECKPOINT_ENV, import_imagebind

SAMPLES = Path(__file__).resolve().parents[1] / ".." / "shared" / "nextgpt-samples" / "T_X_pair_data"
needs_samples = pytest.mark.skipif(
    not SAMPLES.is_dir(),
    reason=f"NExT-GPT sample folder {SAMPLES} is absent (see ../shared/nextgpt-samples/README)",
)
MEDIA = (Modality.IMAGE, Modality.VIDEO, Modality.AUDIO)


@pytest.fixture(scope="module")
def encoder() -> ImageBindEncoder:
    return build_imagebind_encoder("tiny", seed=0)


@pytest.fixture(scope="module")
def meta_data():
    """Meta's ``imagebind.data`` module (its loaders are the reference for our transforms)."""
    import_imagebind()
    from imagebind import data

    return data


def _random_batch(encoder: ImageBindEncoder, modality: Modality, batch: int, clips: int | None = None):
    shape = list(encoder.input_shape(modality))
    if clips is not None:
        shape[0] = clips
    generator = torch.Generator().manual_seed(1)
    return torch.randn(batch, *shape, generator=generator)


def _first_file(sub: str, pattern: str, **info) -> Path:
    import soundfile as sf

    for path in sorted((SAMPLES / sub).glob(pattern)):
        if not info or all(getattr(sf.info(str(path)), k) == v for k, v in info.items()):
            return path
    pytest.skip(f"no {pattern} with {info} in {SAMPLES / sub}")


# ------------------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("modality", MEDIA)
def test_forward_shapes_match_num_tokens_and_token_dim(encoder, modality):
    out = encoder(modality, _random_batch(encoder, modality, batch=2))
    assert isinstance(out, EncoderOutput)
    assert out.embeds.shape == (2, encoder.embed_dim) == (2, 32)
    assert out.tokens.shape == (2, encoder.num_tokens(modality), encoder.token_dim(modality))
    assert not out.embeds.requires_grad and not out.tokens.requires_grad


def test_num_tokens_values(encoder):
    # 16x16 patches of 14 px + CLS; audio 12x19 patches (kernel 16, stride 10 on 128x204) + CLS; text 77.
    assert [encoder.num_tokens(m) for m in ("image", "video", "audio", "text")] == [257, 257, 229, 77]


@pytest.mark.parametrize("modality", MEDIA)
def test_forward_equals_meta_model_forward(encoder, modality):
    batch = _random_batch(encoder, modality, batch=2)
    key = "audio" if modality is Modality.AUDIO else "vision"
    expected = encoder.model({key: batch})[key]
    torch.testing.assert_close(encoder(modality, batch).embeds, expected, rtol=0, atol=0)


def test_embedding_norms(encoder):
    image = encoder("image", _random_batch(encoder, Modality.IMAGE, batch=3)).embeds
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(3))
    audio = encoder("audio", _random_batch(encoder, Modality.AUDIO, batch=2, clips=1)).embeds
    torch.testing.assert_close(audio.norm(dim=-1), torch.full((2,), 20.0))  # Meta's fixed logit scale


def test_clips_are_averaged(encoder):
    clips = _random_batch(encoder, Modality.AUDIO, batch=1, clips=3)
    each = [encoder("audio", clips[:, i : i + 1]) for i in range(3)]
    out = encoder("audio", clips)
    torch.testing.assert_close(out.embeds, torch.stack([o.embeds for o in each]).mean(0))
    torch.testing.assert_close(out.tokens, torch.stack([o.tokens for o in each]).mean(0))


def test_encode_equals_preprocess_then_forward(encoder):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40 + 10 * i, 60, 3), dtype=np.uint8)) for i in range(2)]
    out = encoder.encode("image", images)
    batch = torch.stack([encoder.preprocess("image", im) for im in images])
    torch.testing.assert_close(out.embeds, encoder("image", batch).embeds, rtol=0, atol=0)
    text = encoder.encode(Modality.TEXT, ["a dog barks", "rain on a roof"])
    assert text.embeds.shape == (2, 32) and text.tokens.shape == (2, 77, 32)


def test_bad_batches_raise(encoder):
    with pytest.raises(ValueError, match=r"\(B, 3, 224, 224\)"):
        encoder("image", torch.zeros(3, 224, 224))
    with pytest.raises(ValueError, match="audio batch"):
        encoder("audio", torch.zeros(1, 3, 1, 128, 100))
    with pytest.raises(ValueError, match="empty"):
        encoder.encode("image", [])
    with pytest.raises(ValueError, match="unknown modality"):
        encoder("smell", torch.zeros(1))


# ------------------------------------------------------------------------------------------------------------
# Frozen, deterministic
# ------------------------------------------------------------------------------------------------------------


def test_frozen_and_always_eval(encoder):
    assert all(not p.requires_grad for p in encoder.parameters())
    assert not encoder.training
    encoder.train()
    assert not encoder.training and not any(m.training for m in encoder.modules())
    with torch.enable_grad():
        out = encoder("image", _random_batch(encoder, Modality.IMAGE, batch=1))
    assert out.embeds.grad_fn is None


def test_build_is_deterministic_and_leaves_rng_alone(encoder):
    state = torch.get_rng_state()
    again = build_imagebind_encoder("tiny", seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    other = build_imagebind_encoder(ImageBindConfig.from_preset("tiny"), seed=1)
    reference = encoder.state_dict()
    assert all(torch.equal(reference[k], v) for k, v in again.state_dict().items())
    assert not all(torch.equal(reference[k], v) for k, v in other.state_dict().items())


def test_tiny_size():
    assert 1.5e6 < sum(p.numel() for p in build_imagebind_encoder("tiny").parameters()) < 2.0e6


def test_huge_parameter_count_on_meta_device():
    with torch.device("meta"):
        huge = ImageBindEncoder(ImageBindConfig.from_preset("imagebind-huge"))
    params = list(huge.parameters())
    assert all(p.is_meta for p in params)
    assert 1.15e9 < sum(p.numel() for p in params) < 1.25e9
    assert huge.embed_dim == 1024 and huge.token_dim("image") == 1280 and huge.token_dim("audio") == 768


# ------------------------------------------------------------------------------------------------------------
# Preprocessing: shapes, and equality with Meta's transforms
# ------------------------------------------------------------------------------------------------------------


@needs_samples
def test_preprocess_real_samples(encoder):
    wav = _first_file("audiocap/audios", "*.wav", channels=2, samplerate=48000)
    audio = encoder.preprocess("audio", load_audio(wav))
    assert audio.shape == (3, 1, 128, 204) and audio.dtype == torch.float32 and torch.isfinite(audio).all()
    image = encoder.preprocess("image", load_image(next((SAMPLES / "cc3m/images").glob("*.jpg"))))
    assert image.shape == (3, 224, 224)
    video = load_video(sorted((SAMPLES / "webvid/videos").glob("*.mp4"))[0], max_frames=encoder.max_video_frames)
    assert video.fps == pytest.approx(29.97 * encoder.max_video_frames / 300)
    assert encoder.preprocess("video", video).shape == (15, 3, 2, 224, 224)


def test_preprocess_short_synthetic_media(encoder):
    rng = np.random.default_rng(0)
    one_second = Audio((rng.standard_normal((2, 44100)) * 0.1).astype(np.float32), 44100)
    x = encoder.preprocess("audio", one_second)
    assert x.shape == (3, 1, 128, 204) and torch.isfinite(x).all()
    assert torch.equal(x[0], x[2])  # a clip shorter than 2 s gives three identical clips starting at 0
    tiny = encoder.preprocess("audio", Audio(np.ones(80, np.float32), 8000))  # 10 ms, less than one fbank window
    assert tiny.shape == (3, 1, 128, 204) and torch.isfinite(tiny).all()

    eight_frames = Video(rng.integers(0, 255, (8, 48, 64, 3), dtype=np.uint8), fps=8.0)
    v = encoder.preprocess("video", eight_frames)
    assert v.shape == (15, 3, 2, 224, 224) and torch.isfinite(v).all()
    one_frame = encoder.preprocess("video", Video(eight_frames.frames[:1], fps=30.0))
    assert one_frame.shape == (15, 3, 2, 224, 224)
    assert encoder.encode("video", [eight_frames]).embeds.shape == (1, 32)


@needs_samples
def test_image_preprocess_equals_meta(meta_data, encoder):
    paths = sorted((SAMPLES / "cc3m/images").glob("*.jpg"))[:3]
    expected = meta_data.load_and_transform_vision_data([str(p) for p in paths], "cpu")
    ours = torch.stack([encoder.preprocess("image", load_image(p)) for p in paths])
    assert torch.equal(ours, expected)


def test_image_preprocess_equals_meta_transform_on_odd_sizes(meta_data):
    from torchvision import transforms

    meta = transforms.Compose(
        [
            transforms.Resize(224, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711)),
        ]
    )
    rng = np.random.default_rng(0)
    for size in [(37, 300), (500, 231)]:
        image = Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))
        assert torch.equal(T.image_transform(image), meta(image))


def test_melspec_equals_meta_waveform2melspec(meta_data):
    waveform = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 32000)).astype(np.float32) * 0.1)
    expected = meta_data.waveform2melspec(waveform.clone(), 16000, 128, 204)
    assert torch.equal(T.waveform_to_melspec(waveform, 16000, 128, 204), expected)
    short = waveform[:, :16000]
    expected = meta_data.waveform2melspec(short.clone(), 16000, 128, 204)
    assert torch.equal(T.waveform_to_melspec(short, 16000, 128, 204), expected)


@needs_samples
def test_audio_preprocess_equals_meta_loader(meta_data, encoder, monkeypatch):
    """Meta's whole audio loader (resample, clip sampler, fbank, normalise) on the same mono waveform."""
    import torchaudio

    wav = _first_file("audiocap/audios", "*.wav", channels=2, samplerate=48000)
    mono = to_mono(load_audio(wav))
    waveform = torch.from_numpy(mono.waveform).unsqueeze(0)
    monkeypatch.setattr(torchaudio, "load", lambda path: (waveform.clone(), mono.sample_rate))
    expected = meta_data.load_and_transform_audio_data([str(wav)], "cpu")[0]
    assert torch.equal(encoder.preprocess("audio", mono), expected)


def _meta_video_reference(meta_data, video: Video) -> torch.Tensor:
    """Meta's video loader steps on already decoded frames (a stand-in for its decord reader)."""
    from pytorchvideo import transforms as pv_transforms
    from pytorchvideo.data.clip_sampling import ConstantClipsPerVideoSampler
    from pytorchvideo.data.encoded_video_decord import EncodedVideoDecord
    from torchvision import transforms

    class Reader:
        def __len__(self):
            return len(video.frames)

        def get_batch(self, indices):
            return torch.from_numpy(video.frames[indices])

    reader = object.__new__(EncodedVideoDecord)
    reader._av_reader, reader._fps, reader._decode_audio, reader._video_name = (
        Reader(),
        video.fps,
        False,
        "test",
    )
    reader._duration = len(video.frames) / video.fps
    transform = transforms.Compose(
        [pv_transforms.ShortSideScale(224), meta_data.NormalizeVideo(mean=T.VISION_MEAN, std=T.VISION_STD)]
    )
    sampler = ConstantClipsPerVideoSampler(clip_duration=2, clips_per_video=5)
    subsample = pv_transforms.UniformTemporalSubsample(num_samples=2)
    clips = []
    for start, end in meta_data.get_clip_timepoints(sampler, reader.duration):
        clips.append(transform(subsample(reader.get_clip(start, end)["video"]) / 255.0))
    return torch.stack(meta_data.SpatialCrop(224, num_crops=3)(clips))


@pytest.mark.parametrize(
    ("frames", "height", "width", "fps"), [(75, 36, 64, 25.0), (30, 61, 37, 10.0), (8, 48, 48, 8.0)]
)
def test_video_preprocess_equals_meta_steps(meta_data, encoder, frames, height, width, fps):
    rng = np.random.default_rng(frames)
    video = Video(rng.integers(0, 255, (frames, height, width, 3), dtype=np.uint8), fps)
    assert torch.equal(encoder.preprocess("video", video), _meta_video_reference(meta_data, video))


@needs_samples
def test_video_preprocess_equals_meta_loader_on_real_mp4(meta_data, encoder, monkeypatch):
    """Meta's whole video loader (decord decoding) on a real WebVid MP4 against load_video + preprocess."""
    pytest.importorskip("decord")
    from pytorchvideo.data.encoded_video import EncodedVideo

    original = EncodedVideo.from_path.__func__

    def from_path(cls, path, **kwargs):  # Meta passes a sample_rate that pytorchvideo 0.1.5 rejects
        kwargs.pop("sample_rate", None)
        return original(cls, path, **kwargs)

    monkeypatch.setattr(EncodedVideo, "from_path", classmethod(from_path))
    path = sorted((SAMPLES / "webvid/videos").glob("*.mp4"))[0]
    expected = meta_data.load_and_transform_video_data([str(path)], "cpu")[0]
    assert torch.equal(encoder.preprocess("video", load_video(path)), expected)


def test_text_preprocess_equals_meta(meta_data, encoder):
    texts = ["A dog barks at the mailman.", "rain"]
    expected = meta_data.load_and_transform_text(texts, "cpu")
    assert torch.equal(torch.stack([encoder.preprocess("text", t) for t in texts]), expected)


def test_preprocess_is_pure(encoder):
    audio = Audio(np.random.default_rng(0).standard_normal(16000).astype(np.float32), 16000)
    before = audio.waveform.copy()
    first = encoder.preprocess("audio", audio)
    assert np.array_equal(audio.waveform, before)
    assert torch.equal(first, encoder.preprocess("audio", audio)) and first.device.type == "cpu"


# ------------------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture
def clean_env(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(CHECKPOINT_ENV, raising=False)
    return tmp_path


def test_explicit_missing_checkpoint_names_that_path_and_never_falls_back(encoder, clean_env, monkeypatch):
    # a valid checkpoint waits at both fallback places: neither may stand in for the file the user named
    valid = clean_env / "env.pth"
    torch.save(encoder.model.state_dict(), valid)
    monkeypatch.setenv(CHECKPOINT_ENV, str(valid))
    cached = default_checkpoint_path()
    cached.parent.mkdir(parents=True)
    cached.write_bytes(valid.read_bytes())
    given = clean_env / "given.pth"
    with pytest.raises(FileNotFoundError) as excinfo:
        build_imagebind_encoder(ImageBindConfig.from_preset("tiny", checkpoint=str(given)))
    message = str(excinfo.value)
    assert str(given) in message and "does not exist" in message and "config.checkpoint" in message
    with pytest.raises(FileNotFoundError, match=rf"{clean_env} .*is a directory"):
        find_imagebind_checkpoint(ImageBindConfig.from_preset("tiny", checkpoint=str(clean_env)))
    # without an explicit checkpoint the same environment resolves through the env variable, then the default
    assert find_imagebind_checkpoint(ImageBindConfig.from_preset("tiny", pretrained=True)) == valid
    monkeypatch.delenv(CHECKPOINT_ENV)
    assert find_imagebind_checkpoint(ImageBindConfig.from_preset("tiny", pretrained=True)) == cached


def test_missing_checkpoint_names_every_place(clean_env, monkeypatch):
    monkeypatch.setenv(CHECKPOINT_ENV, str(clean_env / "env" / "ib.pth"))
    config = ImageBindConfig.from_preset("tiny", pretrained=True)
    with pytest.raises(FileNotFoundError) as excinfo:
        build_imagebind_encoder(config)
    message = str(excinfo.value)
    for place in (clean_env / "env" / "ib.pth", clean_env / "cache/anygpt/imagebind_huge.pth"):
        assert str(place) in message
    assert "dl.fbaipublicfiles.com" in message
    assert default_checkpoint_path() == clean_env / "cache" / "anygpt" / "imagebind_huge.pth"
    with pytest.raises(FileNotFoundError, match="not set"):
        monkeypatch.delenv(CHECKPOINT_ENV)
        build_imagebind_encoder("imagebind-huge")


def test_default_path_ignores_relative_xdg(monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")
    assert default_checkpoint_path() == Path.home() / ".cache" / "anygpt" / "imagebind_huge.pth"


def test_checkpoint_round_trip_is_exact(encoder, clean_env):
    path = clean_env / "tiny.pth"
    torch.save(encoder.model.state_dict(), path)
    loaded = build_imagebind_encoder(ImageBindConfig.from_preset("tiny", checkpoint=str(path)), seed=123)
    reference = encoder.state_dict()
    assert set(loaded.state_dict()) == set(reference)
    assert all(torch.equal(reference[k], v) for k, v in loaded.state_dict().items())
    assert not any(t.is_meta for t in loaded.state_dict().values())
    assert all(not p.requires_grad for p in loaded.parameters()) and not loaded.training
    batch = _random_batch(encoder, Modality.IMAGE, batch=2)
    assert torch.equal(loaded("image", batch).embeds, encoder("image", batch).embeds)


def test_checkpoint_found_through_env_and_cache(encoder, clean_env, monkeypatch):
    path = clean_env / "env.pth"
    torch.save(encoder.model.state_dict(), path)
    config = ImageBindConfig.from_preset("tiny", pretrained=True)
    monkeypatch.setenv(CHECKPOINT_ENV, str(path))
    assert find_imagebind_checkpoint(config) == path
    monkeypatch.delenv(CHECKPOINT_ENV)
    cached = default_checkpoint_path()
    cached.parent.mkdir(parents=True)
    path.rename(cached)
    assert find_imagebind_checkpoint(config) == cached
    assert torch.equal(
        build_imagebind_encoder(config).model.modality_heads.vision[2].weight,
        encoder.model.modality_heads.vision[2].weight,
    )


def test_mismatched_checkpoint_lists_keys(encoder, clean_env):
    state = dict(encoder.model.state_dict())
    state.pop("modality_heads.vision.2.weight")
    state["extra.weight"] = torch.zeros(1)
    path = clean_env / "bad.pth"
    torch.save(state, path)
    with pytest.raises(RuntimeError, match="missing: modality_heads.vision.2.weight.*unexpected: extra.weight"):
        build_imagebind_encoder(ImageBindConfig.from_preset("tiny", checkpoint=str(path)))
    wider = ImageBindConfig.from_preset("tiny", out_embed_dim=64, checkpoint=str(clean_env / "tiny.pth"))
    torch.save(encoder.model.state_dict(), clean_env / "tiny.pth")
    with pytest.raises(RuntimeError, match="mis-shaped"):
        build_imagebind_encoder(wider)


class _NotATensor:
    pass


def test_checkpoint_is_never_fully_unpickled(clean_env):
    path = clean_env / "pickle.pth"
    torch.save({"x": _NotATensor()}, path)
    with pytest.raises(RuntimeError, match="weights_only=True"):
        build_imagebind_encoder(ImageBindConfig.from_preset("tiny", checkpoint=str(path)))


# ------------------------------------------------------------------------------------------------------------
# Config and presets
# ------------------------------------------------------------------------------------------------------------


def test_presets():
    assert list_encoder_presets() == ["imagebind-huge", "tiny"]
    huge = ImageBindConfig.from_preset("ImageBind-Huge")
    assert (huge.vision_embed_dim, huge.vision_num_blocks, huge.vision_num_heads) == (1280, 32, 16)
    assert (huge.text_embed_dim, huge.text_num_blocks, huge.text_num_heads) == (1024, 24, 16)
    assert (huge.audio_embed_dim, huge.audio_num_blocks, huge.audio_num_heads) == (768, 12, 12)
    assert (huge.out_embed_dim, huge.audio_drop_path, huge.imu_drop_path, huge.pretrained) == (
        1024,
        0.1,
        0.7,
        True,
    )
    tiny = ImageBindConfig.from_preset("tiny")
    assert (tiny.out_embed_dim, tiny.vision_embed_dim, tiny.vision_num_blocks, tiny.vision_num_heads) == (
        32,
        32,
        1,
        2,
    )
    with pytest.raises(ValueError, match="imagebind-huge, tiny"):
        ImageBindConfig.from_preset("giant")


def test_config_dict_round_trip():
    config = ImageBindConfig.from_preset("tiny", checkpoint="/weights/ib.pth")
    assert ImageBindConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="unknown ImageBindConfig keys: colour"):
        ImageBindConfig.from_dict({**config.to_dict(), "colour": 1})


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"vision_embed_dim": 31}, "divisible"),
        ({"audio_num_blocks": 0}, "positive integer"),
        ({"out_embed_dim": 32.0}, "positive integer"),
        ({"video_frames_per_clip": 3}, "multiple of 2"),
        ({"audio_clip_seconds": 0.0}, "positive"),
        ({"num_mel_bins": 8}, "at least 16"),
        ({"audio_drop_path": 1.5}, r"\[0, 1\)"),
        ({"checkpoint": ""}, "checkpoint"),
        ({"pretrained": "yes"}, "bool"),
        ({"video_spatial_crops": 2}, "1 or 3"),
    ],
)
def test_config_validation(overrides, match):
    with pytest.raises(ValueError, match=match):
        ImageBindConfig.from_preset("tiny", **overrides)
