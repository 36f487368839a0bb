"""Metric adapters: the libraries' own math on features we extract with the feature networks.

- FID and KID: torchmetrics' ``FrechetInceptionDistance`` / ``KernelInceptionDistance`` fed with features already
  extracted (an identity ``feature`` module), so one Inception pass serves both; the same Fréchet distance of
  torchmetrics gives FAD (on CLAP audio embeddings) and FVD (on I3D video features). fadtk and
  frechet-audio-distance pin numpy < 2 and transformers 4 (through laion-clap), which this project cannot take.
- CLIP score: torchmetrics' ``CLIPScore`` (100 x cosine, clamped at 0); CLIPSIM (no package has it): the same
  metric over every frame of a clip against its caption, divided by 100, i.e. the mean frame-text cosine.
- CLAP score: the mean cosine of CLAP audio and text embeddings (AudioLDM's and Make-An-Audio's convention).
- Captioning: pycocoevalcap (the COCO caption toolkit): PTB tokenisation, BLEU-1..4, METEOR, ROUGE-L, CIDEr-D and
  SPICE. The tokenizer, METEOR and SPICE run Java; SPICE also needs Stanford CoreNLP's jars in pycocoevalcap's
  ``spice/lib`` (its downloader is never run here).
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from anygpt.base.media import Audio, Video, resample, to_mono

logger = logging.getLogger(__name__)

__all__ = [
    "caption_scores",
    "clap_embeddings",
    "clap_text_embeddings",
    "clip_scores",
    "clipsim_scores",
    "cosine",
    "fid_kid",
    "frechet_distance",
    "i3d_features",
    "image_features",
    "java_available",
    "spice_available",
]


class _Precomputed(torch.nn.Module):
    """torchmetrics' ``feature`` module for features extracted beforehand: passes them through."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def _features(array: torch.Tensor | np.ndarray, what: str) -> torch.Tensor:
    tensor = torch.as_tensor(array).detach().to("cpu", torch.float64)
    if tensor.ndim != 2 or tensor.shape[0] < 2:
        raise ValueError(f"{what}: expected features (N >= 2, D), got shape {tuple(tensor.shape)}")
    return tensor


def frechet_distance(real: torch.Tensor | np.ndarray, fake: torch.Tensor | np.ndarray) -> float:
    """The Fréchet distance of two feature sets (N, D) through torchmetrics' FID (no extractor of its own)."""
    from torchmetrics.image.fid import FrechetInceptionDistance  # heavy: only when a metric is computed

    real, fake = _features(real, "real features"), _features(fake, "generated features")
    metric = FrechetInceptionDistance(feature=_Precomputed(real.shape[1])).double()
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return float(metric.compute())


def fid_kid(
    real: torch.Tensor | np.ndarray,
    fake: torch.Tensor | np.ndarray,
    *,
    seed: int,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
) -> dict[str, float]:
    """FID and KID (mean and standard deviation over random subsets) of two feature sets, by torchmetrics.

    KID's subsets are drawn with a generator seeded by ``seed``; its subset size is at most the smaller set.
    """
    from torchmetrics.image.kid import KernelInceptionDistance  # heavy: only when a metric is computed

    real, fake = _features(real, "real features"), _features(fake, "generated features")
    size = min(kid_subset_size, real.shape[0], fake.shape[0])
    kid = KernelInceptionDistance(feature=_Precomputed(real.shape[1]), subsets=kid_subsets, subset_size=size)
    kid.update(real, real=True)
    kid.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {"fid": frechet_distance(real, fake), "kid": float(kid_mean), "kid_std": float(kid_std)}


def _uint8_chw(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)


@torch.no_grad()
def image_features(images: Sequence[Image.Image], network: torch.nn.Module, *, batch_size: int = 16) -> torch.Tensor:
    """Features (N, D) of images through ``network`` (uint8 (B, 3, H, W) in; torchmetrics' Inception resizes them
    itself). Consecutive images of one size share a batch."""
    device = next(network.parameters(), torch.empty(0)).device
    out, batch = [], []
    for index, image in enumerate(images):
        tensor = _uint8_chw(image)
        if batch and (tensor.shape != batch[0].shape or len(batch) == batch_size):
            out.append(network(torch.stack(batch).to(device)).reshape(len(batch), -1).cpu())
            batch = []
        batch.append(tensor)
        if index == len(images) - 1:
            out.append(network(torch.stack(batch).to(device)).reshape(len(batch), -1).cpu())
    return torch.cat(out).double()


class _CLIPFeatures(torch.nn.Module):
    """A ``CLIPModel`` whose ``get_image_features`` / ``get_text_features`` return tensors, as torchmetrics 1.9
    expects (transformers 5 returns an output object holding them in ``pooler_output``)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _tensor(self.model.get_text_features(*args, **kwargs))


def _tensor(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _clip_metric(model: Any, processor: Any):
    from torchmetrics.multimodal import CLIPScore  # heavy: only when a metric is computed

    wrapped = _CLIPFeatures(model)
    return CLIPScore(model_name_or_path=lambda: (wrapped, processor))


@torch.no_grad()
def clip_scores(images: Sequence[Image.Image], texts: Sequence[str], model: Any, processor: Any) -> dict[str, Any]:
    """torchmetrics' CLIP score of each image against its text, and over all of them.

    Returns:
        ``{"clip_score": float, "per_sample": [float, ...]}`` (100 x cosine, clamped at 0 as torchmetrics does).
    """
    if len(images) != len(texts):
        raise ValueError(f"clip_scores: {len(images)} images and {len(texts)} texts")
    metric = _clip_metric(model, processor)
    per_sample = [float(metric([_uint8_chw(image)], [text])) for image, text in zip(images, texts, strict=True)]
    return {"clip_score": float(metric.compute()), "per_sample": per_sample}


@torch.no_grad()
def clipsim_scores(videos: Sequence[Video], texts: Sequence[str], model: Any, processor: Any) -> dict[str, Any]:
    """CLIPSIM: the mean CLIP cosine of every frame of a clip and its caption (torchmetrics' CLIP score / 100).

    Returns:
        ``{"clipsim": float over every frame of every clip, "per_sample": [per-clip mean, ...]}``.
    """
    if len(videos) != len(texts):
        raise ValueError(f"clipsim_scores: {len(videos)} clips and {len(texts)} texts")
    metric = _clip_metric(model, processor)
    per_sample = []
    for video, text in zip(videos, texts, strict=True):
        frames = [torch.from_numpy(np.ascontiguousarray(f)).permute(2, 0, 1) for f in video.frames]
        per_sample.append(float(metric(frames, [text] * len(frames))) / 100)
    return {"clipsim": float(metric.compute()) / 100, "per_sample": per_sample}


def _clap_waveform(audio: Audio, rate: int, seconds: float) -> np.ndarray:
    """Mono at ``rate``, cut to ``seconds`` (so the feature extractor never draws a random crop)."""
    wave = resample(to_mono(audio), rate).waveform.astype(np.float32)
    return wave[: int(rate * seconds)]


@torch.no_grad()
def clap_embeddings(audios: Sequence[Audio], model: Any, extractor: Any, *, batch_size: int = 16) -> torch.Tensor:
    """CLAP audio embeddings (N, D) (``ClapModel.get_audio_features``)."""
    rate, seconds = extractor.sampling_rate, extractor.nb_max_samples / extractor.sampling_rate
    device = next(model.parameters()).device
    out = []
    for begin in range(0, len(audios), batch_size):
        waves = [_clap_waveform(a, rate, seconds) for a in audios[begin : begin + batch_size]]
        inputs = extractor(waves, sampling_rate=rate, return_tensors="pt")
        inputs = {k: v.to(device) for k, v in inputs.items()}
        out.append(_tensor(model.get_audio_features(**inputs)).cpu())
    return torch.cat(out).double()


@torch.no_grad()
def clap_text_embeddings(texts: Sequence[str], model: Any, tokenizer: Any) -> torch.Tensor:
    """CLAP text embeddings (N, D) (``ClapModel.get_text_features``)."""
    device = next(model.parameters()).device
    inputs = tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True)
    inputs = {k: v.to(device) for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
    return _tensor(model.get_text_features(**inputs)).cpu().double()


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of two (N, D) tensors."""
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


FVD_FRAMES = 16
FVD_SIZE = 224


def _fvd_clip(video: Video) -> torch.Tensor:
    """A clip as StyleGAN-V's I3D reads it: its first 16 frames (the last repeated if fewer), short side resized to
    224 and centre-cropped, (3, T, 224, 224) in [-1, 1]."""
    frames = torch.from_numpy(np.ascontiguousarray(video.frames[:FVD_FRAMES])).permute(0, 3, 1, 2).float() / 255
    if frames.shape[0] < FVD_FRAMES:
        frames = torch.cat([frames, frames[-1:].expand(FVD_FRAMES - frames.shape[0], -1, -1, -1)])
    height, width = frames.shape[-2:]
    scale = FVD_SIZE / min(height, width)
    size = (max(FVD_SIZE, round(height * scale)), max(FVD_SIZE, round(width * scale)))
    frames = torch.nn.functional.interpolate(frames, size=size, mode="bilinear", align_corners=False)
    top, left = (size[0] - FVD_SIZE) // 2, (size[1] - FVD_SIZE) // 2
    frames = frames[:, :, top : top + FVD_SIZE, left : left + FVD_SIZE]
    return (frames * 2 - 1).permute(1, 0, 2, 3)


@torch.no_grad()
def i3d_features(videos: Sequence[Video], network: Any, *, batch_size: int = 8) -> torch.Tensor:
    """I3D features (N, 400) of clips, called as StyleGAN-V's FVD calls its TorchScript detector."""
    device = next(iter(network.parameters()), torch.empty(0)).device
    out = []
    for begin in range(0, len(videos), batch_size):
        clips = torch.stack([_fvd_clip(v) for v in videos[begin : begin + batch_size]]).to(device)
        out.append(network(clips, rescale=False, resize=True, return_features=True).cpu())
    return torch.cat(out).double()


# ------------------------------------------------------------------------------------------------------------
# captioning: pycocoevalcap
# ------------------------------------------------------------------------------------------------------------


def java_available() -> bool:
    return shutil.which("java") is not None


def spice_available() -> tuple[bool, str]:
    """Whether SPICE can run here, and why not: Java and Stanford CoreNLP 3.6.0's jars in pycocoevalcap's
    ``spice/lib`` (pycocoevalcap would download them; this harness never lets it)."""
    if not java_available():
        return False, "Java is not installed (SPICE runs java)"
    import pycocoevalcap.spice.spice as spice_module  # only to find its folder

    lib = Path(spice_module.__file__).parent / "lib"
    jars = [lib / "stanford-corenlp-3.6.0.jar", lib / "stanford-corenlp-3.6.0-models.jar"]
    missing = [str(j) for j in jars if not j.is_file()]
    if missing:
        return False, f"Stanford CoreNLP is not installed for SPICE (missing {', '.join(missing)})"
    return True, ""


def caption_scores(
    references: dict[str, list[str]], predictions: dict[str, str], *, spice: bool = True
) -> dict[str, Any]:
    """The COCO caption metrics of ``predictions`` (id -> caption) against ``references`` (id -> captions).

    Every text goes through pycocoevalcap's PTB tokenizer (Stanford's, on Java), then BLEU-1..4, METEOR, ROUGE-L,
    CIDEr-D and (``spice`` and available) SPICE, each the library's corpus-level score.

    Returns:
        ``{"metrics": {name: value}, "per_sample": {id: {name: value}}, "skipped": {name: reason}}``.

    Raises:
        RuntimeError: Java is not installed (the tokenizer needs it).
        ValueError: an id of ``predictions`` without references, or the other way round.
    """
    from pycocoevalcap.bleu.bleu import Bleu  # heavy: only when captions are scored
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    if not java_available():
        raise RuntimeError("caption metrics need Java (the COCO toolkit's PTB tokenizer, METEOR and SPICE run java)")
    if set(references) != set(predictions):
        odd = sorted(set(references) ^ set(predictions))[:3]
        raise ValueError(f"caption_scores: ids without both a prediction and references: {odd}")
    ids = sorted(predictions)
    gts = PTBTokenizer().tokenize({i: [{"caption": c} for c in references[i]] for i in ids})
    res = PTBTokenizer().tokenize({i: [{"caption": predictions[i]}] for i in ids})
    scorers: list[tuple[Any, list[str]]] = [
        (Bleu(4), ["bleu_1", "bleu_2", "bleu_3", "bleu_4"]),
        (Meteor(), ["meteor"]),
        (Rouge(), ["rouge_l"]),
        (Cider(), ["cider"]),
    ]
    skipped: dict[str, str] = {}
    if spice:
        usable, reason = spice_available()
        if usable:
            from pycocoevalcap.spice.spice import Spice

            scorers.append((Spice(), ["spice"]))
        else:
            skipped["spice"] = reason
    metrics: dict[str, float] = {}
    per_sample: dict[str, dict[str, float]] = {i: {} for i in ids}
    for scorer, names in scorers:
        with contextlib.redirect_stdout(io.StringIO()) as printed:  # pycocoevalcap prints BLEU's counts
            score, scores = scorer.compute_score(gts, res)
        logger.debug("%s: %s", type(scorer).__name__, printed.getvalue().strip())
        if len(names) == 1:
            score, scores = [score], [scores]
        for name, value, values in zip(names, score, scores, strict=True):
            metrics[name] = float(value)
            for i, v in zip(ids, values, strict=True):
                per_sample[i][name] = float(v["All"]["f"]) if isinstance(v, dict) else float(v)
    return {"metrics": metrics, "per_sample": per_sample, "skipped": skipped}
