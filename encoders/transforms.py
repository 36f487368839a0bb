"""ImageBind's preprocessing as pure transforms: one media value in, one tensor out, no I/O and no device.

Each transform reproduces the corresponding loader in Meta's ``imagebind/data.py`` (image, audio, video, text)
on values that are already decoded (``PIL.Image.Image``, :class:`anygpt.base.media.Audio`,
:class:`anygpt.base.media.Video`, ``str``), so tensors match Meta's bit for bit given the same decoded input.
Differences, on purpose:

- audio: channels are averaged to mono first (Meta's kaldi fbank reads only the first channel of a stereo
  file); clips shorter than one 25 ms analysis window are zero-padded (Meta divides by zero there), and
  overlapping clips of short audio do not leak their mean subtraction into each other (Meta subtracts it in
  place on a shared view).
- video: works on decoded frames and their frame rate rather than a decord reader; a clip window that holds no
  frame (possible only for videos shorter than one frame interval) falls back to the nearest frame instead of
  failing.
"""

from __future__ import annotations

import functools
import logging
import math
from fractions import Fraction
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from anygpt.base.media import Audio, Video, resample, to_mono, validate_audio, validate_image, validate_video
from encoders.meta import import_imagebind

logger = logging.getLogger(__name__)

__all__ = [
    "AUDIO_MEAN",
    "AUDIO_STD",
    "IMAGE_SIZE",
    "VISION_MEAN",
    "VISION_STD",
    "audio_transform",
    "clip_start_times",
    "image_transform",
    "text_transform",
    "video_transform",
    "waveform_to_melspec",
]

IMAGE_SIZE = 224
VISION_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's, as ImageBind
VISION_STD = (0.26862954, 0.26130258, 0.27577711)
AUDIO_MEAN = -4.268  # ImageBind's log-mel statistics (AudioSet)
AUDIO_STD = 9.138
AUDIO_FRAME_LENGTH_MS = 25
AUDIO_FRAME_SHIFT_MS = 10
TEXT_CONTEXT_LENGTH = 77


@functools.cache
def _image_pipeline(size: int):
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(mean=VISION_MEAN, std=VISION_STD),
        ]
    )


def image_transform(image, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Resize the short side to ``size`` (bicubic), centre-crop, scale to [0, 1] and normalise with CLIP's
    statistics.

    The resize keeps the aspect ratio, so its cost grows with the long side: an image whose long side is more than
    ``anygpt.base.media.MAX_ASPECT_RATIO`` (20) times its short side, or of more than ``MAX_IMAGE_PIXELS``, is
    refused before anything is resized (not cropped or letterboxed: the centre crop would show a sliver of it).

    Args:
        image: a ``PIL.Image.Image`` (converted to RGB if needed) or a uint8 array (H, W, 3).
        size: output side.

    Returns:
        float32 tensor (3, size, size).

    Raises:
        MediaError: the image's size is past those limits (see ``anygpt.base.media.check_frame_size``).
    """
    return _image_pipeline(size)(rgb_image(image, "image_transform"))


def rgb_image(image: Any, caller: str) -> Any:
    """``image`` (a ``PIL.Image`` or a uint8 (H, W, 3) array) checked against the size limits and as an RGB
    ``PIL.Image``.

    Raises:
        TypeError: neither kind (naming ``caller``).
        MediaError: past the size limits (``anygpt.base.media.validate_image``).
    """
    from PIL import Image

    if not isinstance(image, np.ndarray | Image.Image):
        raise TypeError(f"{caller} expects a PIL image or a uint8 array, got {type(image).__name__}")
    validate_image(image, "image")
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    return image if image.mode == "RGB" else image.convert("RGB")


def clip_start_times(duration: float, clip_seconds: float, num_clips: int) -> list[Fraction]:
    """Start times of ``num_clips`` clips spread over a recording, as pytorchvideo's
    ``ConstantClipsPerVideoSampler``.

    The clips start at ``i * max(duration - clip_seconds, 0) / num_clips`` for ``i`` in ``range(num_clips)``,
    so a recording shorter than one clip gives ``num_clips`` clips that all start at 0.

    Args:
        duration: length of the recording in seconds.
        clip_seconds: length of one clip in seconds.
        num_clips: how many clips.

    Returns:
        ``num_clips`` exact start times in seconds.
    """
    max_start = Fraction(max(duration - Fraction(clip_seconds), 0))
    step = max_start / num_clips
    return [step * i for i in range(num_clips)]


def waveform_to_melspec(
    waveform: torch.Tensor, sample_rate: int, num_mel_bins: int = 128, target_frames: int = 204
) -> torch.Tensor:
    """Kaldi log-mel filterbank of one clip, padded or cropped to ``target_frames`` (ImageBind's
    ``waveform2melspec``).

    Args:
        waveform: float tensor (1, T) (not modified).
        sample_rate: its rate in Hz.
        num_mel_bins: mel bands.
        target_frames: frames kept (10 ms hop); shorter spectrograms are zero-padded at the end.

    Returns:
        float32 tensor (1, num_mel_bins, target_frames), not yet normalised.
    """
    import torchaudio

    waveform = waveform - waveform.mean()
    window = int(sample_rate * AUDIO_FRAME_LENGTH_MS / 1000)
    if waveform.shape[-1] < window:  # kaldi yields no frame for less than one window
        waveform = F.pad(waveform, (0, window - waveform.shape[-1]))
    fbank = torchaudio.compliance.kaldi.fbank(
        waveform,
        htk_compat=True,
        sample_frequency=sample_rate,
        use_energy=False,
        window_type="hanning",
        num_mel_bins=num_mel_bins,
        dither=0.0,
        frame_length=AUDIO_FRAME_LENGTH_MS,
        frame_shift=AUDIO_FRAME_SHIFT_MS,
    )
    fbank = fbank.transpose(0, 1)  # (mel, frames)
    n_frames = fbank.shape[1]
    if n_frames != target_frames:
        logger.debug("audio clip has %d fbank frames, padding/cropping to %d", n_frames, target_frames)
    if n_frames < target_frames:
        fbank = F.pad(fbank, (0, target_frames - n_frames), mode="constant", value=0)
    else:
        fbank = fbank[:, :target_frames]
    return fbank.unsqueeze(0)


def audio_transform(
    audio: Audio,
    *,
    sample_rate: int = 16000,
    num_clips: int = 3,
    clip_seconds: float = 2.0,
    num_mel_bins: int = 128,
    target_frames: int = 204,
    mean: float = AUDIO_MEAN,
    std: float = AUDIO_STD,
) -> torch.Tensor:
    """ImageBind's audio preprocessing: mono, resample, clips, log-mel, normalise.

    Args:
        audio: any sample rate, mono (T,) or multi-channel (C, T); at least one sample.
        sample_rate: rate the model expects (Hz).
        num_clips: clips spread over the recording (see :func:`clip_start_times`).
        clip_seconds: length of each clip; clips past the end are cut short and their spectrogram zero-padded.
        num_mel_bins: mel bands.
        target_frames: spectrogram frames per clip.
        mean: normalisation mean of the log-mel values.
        std: normalisation standard deviation.

    Returns:
        float32 tensor (num_clips, 1, num_mel_bins, target_frames).

    Raises:
        MediaError: samples that are NaN, infinite or beyond ``anygpt.base.media.MAX_AUDIO_AMPLITUDE``, or a rate or
            length past the limits (see ``anygpt.base.media.validate_audio``).
    """
    if not isinstance(audio, Audio):
        raise TypeError(f"audio_transform expects anygpt.base.media.Audio, got {type(audio).__name__}")
    mono = to_mono(audio)
    if mono.waveform.size == 0:
        raise ValueError("audio_transform got an empty waveform (0 samples)")
    validate_audio(audio, "audio")
    mono = resample(Audio(np.asarray(mono.waveform, dtype=np.float32), int(mono.sample_rate)), sample_rate)
    waveform = torch.from_numpy(np.ascontiguousarray(mono.waveform, dtype=np.float32)).unsqueeze(0)  # (1, T)
    duration = waveform.shape[1] / sample_rate
    mean_t = torch.as_tensor(mean, dtype=torch.float32)
    std_t = torch.as_tensor(std, dtype=torch.float32)
    clips = []
    for start in clip_start_times(duration, clip_seconds, num_clips):
        end = start + Fraction(clip_seconds)
        piece = waveform[:, int(start * sample_rate) : int(end * sample_rate)]
        if piece.shape[1] == 0:  # unreachable for non-empty audio, kept as a guard
            piece = waveform[:, -1:]
        melspec = waveform_to_melspec(piece, sample_rate, num_mel_bins, target_frames)
        clips.append((melspec - mean_t) / std_t)
    return torch.stack(clips)


def _uniform_crop(frames: torch.Tensor, size: int, spatial_idx: int) -> torch.Tensor:
    """Square crop of (C, T, H, W): 0/1/2 = left/centre/right (landscape) or top/centre/bottom (portrait)."""
    height, width = frames.shape[-2:]
    y_offset = int(math.ceil((height - size) / 2))
    x_offset = int(math.ceil((width - size) / 2))
    if height > width:
        y_offset = {0: 0, 1: y_offset, 2: height - size}[spatial_idx]
    else:
        x_offset = {0: 0, 1: x_offset, 2: width - size}[spatial_idx]
    return frames[..., y_offset : y_offset + size, x_offset : x_offset + size]


def _short_side_scale(frames: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of (C, T, H, W) so the short side is ``size`` (pytorchvideo's ``short_side_scale``)."""
    _, _, h, w = frames.shape
    if w < h:
        new_h, new_w = int(math.floor((float(h) / w) * size)), size
    else:
        new_h, new_w = size, int(math.floor((float(w) / h) * size))
    return F.interpolate(frames, size=(new_h, new_w), mode="bilinear", align_corners=False)


def video_transform(
    video: Video,
    *,
    num_clips: int = 5,
    frames_per_clip: int = 2,
    clip_seconds: float = 2.0,
    size: int = IMAGE_SIZE,
    num_crops: int = 3,
) -> torch.Tensor:
    """ImageBind's video preprocessing: clips over time, frames per clip, short-side resize, normalise,
    spatial crops.

    Clip ``i`` covers ``[t_i, t_i + clip_seconds)`` (see :func:`clip_start_times`; frame ``k`` sits at
    ``k / fps``); ``frames_per_clip`` frames are taken evenly from it, the first and last included.

    Args:
        video: uint8 frames (T, H, W, 3) and their frame rate; any length (a short clip repeats frames).
        num_clips: temporal clips.
        frames_per_clip: frames per clip.
        clip_seconds: clip length in seconds.
        size: short side after resize and side of the square crops.
        num_crops: 3 (left/centre/right or top/centre/bottom) or 1 (centre).

    Returns:
        float32 tensor (num_clips * num_crops, 3, frames_per_clip, size, size), clip-major.

    Raises:
        MediaError: frames whose long side is more than ``anygpt.base.media.MAX_ASPECT_RATIO`` (20) times the short
            side or of more than ``MAX_FRAME_PIXELS`` (the resize keeps the aspect ratio, so its memory grows with
            the long side: refused before anything is resized), or float frames that are not finite.
    """
    if not isinstance(video, Video):
        raise TypeError(f"video_transform expects anygpt.base.media.Video, got {type(video).__name__}")
    frames = np.asarray(video.frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"video_transform expects frames (T, H, W, 3) with T >= 1, got shape {frames.shape}")
    if num_crops not in (1, 3):
        raise ValueError(f"num_crops must be 1 or 3, got {num_crops}")
    fps = float(video.fps)
    if not fps > 0:
        raise ValueError(f"video_transform expects a positive fps, got {video.fps}")
    validate_video(video, "video")
    total = frames.shape[0]
    duration = float(total) / fps
    crops = [1] if num_crops == 1 else [0, 1, 2]
    mean = torch.as_tensor(VISION_MEAN, dtype=torch.float32)[:, None, None, None]
    std = torch.as_tensor(VISION_STD, dtype=torch.float32)[:, None, None, None]
    out = []
    for start in clip_start_times(duration, clip_seconds, num_clips):
        end = start + Fraction(clip_seconds)
        first = math.ceil(fps * start)
        stop = min(math.ceil(fps * end), total)
        window = np.arange(first, stop) if first < stop else np.array([min(first, total - 1)])
        picks = torch.linspace(0, len(window) - 1, frames_per_clip).clamp(0, len(window) - 1).long().numpy()
        clip = torch.from_numpy(frames[window[picks]]).to(torch.float32)  # (F, H, W, 3)
        clip = clip.permute(3, 0, 1, 2) / 255.0  # (3, F, H, W)
        clip = _short_side_scale(clip, size)
        clip = clip.sub_(mean).div_(std)
        out.extend(_uniform_crop(clip, size, idx) for idx in crops)
    return torch.stack(out)


@functools.cache
def _text_tokenizer():
    import_imagebind()
    from importlib.resources import files

    from imagebind.models.multimodal_preprocessors import SimpleTokenizer

    bpe = files("imagebind") / "bpe" / "bpe_simple_vocab_16e6.txt.gz"
    return SimpleTokenizer(bpe_path=str(bpe))


def text_transform(text: str, context_length: int = TEXT_CONTEXT_LENGTH) -> torch.Tensor:
    """Tokenise with ImageBind's (CLIP's) BPE: start token, text, end token, zero padding; long texts are cut.

    Args:
        text: the text.
        context_length: output length (ImageBind's text encoder is fixed at 77).

    Returns:
        int64 tensor (context_length,).
    """
    if not isinstance(text, str):
        raise TypeError(f"text_transform expects a str, got {type(text).__name__}")
    return _text_tokenizer()(text, context_length=context_length)
