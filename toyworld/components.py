"""Component pretraining: the toy world's frozen components, trained from nothing with the pipeline's architectures.

* :func:`train_encoder`: an ImageBind-architecture encoder (``imagebind.models.ImageBindModel``), trained
  contrastively: each image, video and audio embedding against the text-trunk embeddings of every caption of the
  world (the right caption is the target class).
* :func:`train_language_model`: a byte-level BPE tokenizer trained with ``tokenizers`` on the world's language, and a
  Llama-architecture causal LM trained on the world's conversations (media replaced by their captions).
* :func:`train_image_decoder`: Stable Diffusion (``AutoencoderKL``, ``UNet2DConditionModel``, ``CLIPTextModel``).
* :func:`train_video_decoder`: ZeroScope (``UNet3DConditionModel``; spatial layers, VAE and text encoder start from the
  image decoder's; the text encoder is then aligned to the encoder's video embeddings and frozen).
* :func:`train_audio_decoder`: AudioLDM (mel ``AutoencoderKL``, ``UNet2DConditionModel`` conditioned on the
  L2-normalised ``ClapTextModelWithProjection`` embedding, whose text tower is first aligned to the encoder's audio
  embeddings and then frozen; ``SpeechT5HifiGan`` vocoder).

The three decoders are trained and sampled with the zero-terminal-SNR, v-prediction DDIM scheduler
(:func:`zero_snr_scheduler`), saved in each decoder folder, so the unmodified pipelines sample them as trained.

Every function writes a folder that the pipeline loads as it loads real weights (a diffusers folder with
``model_index.json``, a transformers folder, an ImageBind safetensors checkpoint). The decoders and their text
encoders see freshly rendered media every step (:mod:`toyworld.world`); the encoder draws from a pool of
preprocessed media (``encoder_pool`` per modality, kept in fp16 to bound memory). Sizes and step counts come from
:class:`ComponentSettings`; :meth:`ComponentSettings.quick` is a few-step version for tests.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchaudio
from diffusers import AudioLDMPipeline, DDIMScheduler, StableDiffusionPipeline, TextToVideoSDPipeline
from diffusers.models.transformers.transformer_temporal import TransformerTemporalModel
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from tokenizers import decoders as bpe_decoders
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from anygpt.base.modality import Modality
from decoders.tiny import tiny_audioldm_components, tiny_stable_diffusion_components, tiny_zeroscope_components
from encoders import ImageBindConfig, ImageBindEncoder, build_imagebind_encoder
from toyworld import world

logger = logging.getLogger(__name__)

__all__ = [
    "ComponentSettings",
    "audio_log_mel",
    "encoder_config",
    "train_audio_decoder",
    "train_encoder",
    "train_image_decoder",
    "train_language_model",
    "train_video_decoder",
    "refine_video_decoder",
    "video_unet_from_image",
    "zero_snr_scheduler",
]

MEL_BINS = 64
HOP = 160  # 10 ms at 16 kHz: 100 mel frames per second, one per 160 vocoder samples
N_FFT = 1024


@dataclass
class ComponentSettings:
    """Sizes, steps and learning rates of the component pretraining (defaults: the full recipe, about an hour on 2
    CPU cores)."""

    seed: int = 0
    # encoder
    encoder_steps: int = 1500
    encoder_batch: int = 24
    encoder_lr: float = 1e-3
    encoder_pool: int = 1536
    encoder_varied: float = 0.67  # the share of the pool rendered another way (world.vary)
    # language model
    llm_vocab: int = 640
    llm_hidden: int = 128
    llm_layers: int = 4
    llm_heads: int = 4
    llm_steps: int = 1500
    llm_batch: int = 32
    llm_lr: float = 2e-3
    # image decoder
    cond_dim: int = 32
    image_vae_steps: int = 500
    image_unet_channels: tuple[int, ...] = (32, 64, 64)
    image_unet_steps: int = 1400
    image_batch: int = 32
    unet_lr: float = 1e-3
    image_refine_steps: int = 800
    image_refine_lr: float = 3e-4
    # video decoder
    video_unet_steps: int = 700
    video_batch: int = 8
    video_refine_steps: int = 600
    video_refine_lr: float = 5e-4
    video_timestep_shift: float = 3.0
    # audio decoder
    audio_vae_steps: int = 400
    audio_unet_channels: tuple[int, ...] = (32, 64)
    audio_unet_steps: int = 800
    audio_batch: int = 32
    vocoder_steps: int = 1500
    vocoder_batch: int = 8
    vae_lr: float = 2e-3
    # text towers aligned to the encoder's media embeddings before a decoder's UNet trains (LiT)
    align_steps: int = 300
    align_batch: int = 64
    align_pool: int = 512
    align_lr: float = 1e-3

    @classmethod
    def quick(cls, **overrides: Any) -> ComponentSettings:
        """A few steps of everything: proves the recipe runs, trains nothing useful."""
        steps = {f: 3 for f in asdict(cls()) if f.endswith("_steps")}
        small = {"encoder_batch": 4, "encoder_pool": 8, "llm_batch": 4, "image_batch": 4, "video_batch": 2,
                 "align_batch": 4, "align_pool": 8}  # fmt: skip
        return replace(cls(), **{**steps, **small, "audio_batch": 4, "vocoder_batch": 2, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))


# ------------------------------------------------------------------------------------------------------------
# Shared pieces
# ------------------------------------------------------------------------------------------------------------


def _rng(seed: int, part: str) -> np.random.Generator:
    return np.random.default_rng([seed, sum(part.encode())])


def _adamw(params, lr: float, steps: int, warmup: int = 50) -> tuple[torch.optim.Optimizer, Any]:
    params = [p for p in params if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    warmup = min(warmup, max(1, steps // 10))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _update(loss: torch.Tensor, params, optimizer, schedule) -> float:
    """One optimizer step on ``loss`` (gradients clipped to norm 1); returns the loss value."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    schedule.step()
    return loss.item()


def _loop(desc: str, steps: int, step_fn: Callable[[int], float], params, max_norm: float = 1.0) -> list[float]:
    """Run ``steps`` optimizer steps of ``step_fn`` (returns the loss tensor's value after backward)."""
    losses: list[float] = []
    bar = tqdm(range(steps), desc=desc, unit="step", leave=False)
    for step in bar:
        loss = step_fn(step)
        if not math.isfinite(loss):
            raise RuntimeError(f"{desc}: loss is {loss} at step {step}")
        losses.append(loss)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.4f}")
    if steps:
        logger.info("%s: loss %.4f -> %.4f over %d steps", desc, np.mean(losses[:10]), np.mean(losses[-10:]), steps)
    return losses


def _loss_summary(losses: list[float]) -> dict[str, float]:
    if not losses:
        return {}
    k = max(1, min(20, len(losses) // 5))
    return {"first": float(np.mean(losses[:k])), "last": float(np.mean(losses[-k:])), "steps": len(losses)}


def _images_tensor(pixels: list[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) images -> float (B, 3, H, W) in [-1, 1]."""
    array = torch.from_numpy(np.stack(pixels)).float()
    return array.permute(0, 3, 1, 2) / 127.5 - 1.0


def _images(rng: np.random.Generator, n: int) -> tuple[torch.Tensor, list[str]]:
    """``n`` fresh images as pixels (B, 3, H, W) in [-1, 1], and their captions."""
    items = [world.draw_image(rng) for _ in range(n)]
    return _images_tensor([i.render() for i in items]), [i.caption for i in items]


def _train_vae(vae, batch_fn: Callable[[], torch.Tensor], steps: int, lr: float, desc: str) -> list[float]:
    """Reconstruction (L1 + MSE) with a small KL term; afterwards the latent scaling factor is set from the data."""
    vae.train()
    vae.requires_grad_(True)
    optimizer, schedule = _adamw(vae.parameters(), lr, steps)

    def step(_: int) -> float:
        x = batch_fn()
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        return _update(loss, vae.parameters(), optimizer, schedule)

    losses = _loop(desc, steps, step, vae.parameters())
    vae.eval()
    vae.requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat([vae.encode(batch_fn()).latent_dist.sample() for _ in range(4)])
    scale = float(1.0 / latents.std().clamp_min(1e-3))
    vae.register_to_config(scaling_factor=scale)
    logger.info("%s: latent scaling factor %.4f", desc, scale)
    return losses


def _clip_embeds(text_encoder, tokenizer, captions: list[str], pooled: bool = False) -> torch.Tensor:
    """What ``StableDiffusionPipeline.encode_prompt`` computes (last hidden state of the padded prompt), with grad;
    ``pooled``: the end-of-text token's state instead (CLIP's own text embedding, before its projection)."""
    ids = tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    output = text_encoder(ids)
    return output.pooler_output if pooled else output.last_hidden_state


def _clap_embeds(text_encoder, tokenizer, captions: list[str], max_length: int | None = None) -> torch.Tensor:
    """What ``AudioLDMPipeline._encode_prompt`` computes (L2-normalised CLAP ``text_embeds``), with grad.

    The empty (unconditional) caption is padded to the embedding width, as the pipeline pads its negative prompt."""
    enc = tokenizer(
        captions,
        padding="max_length",
        max_length=max_length or tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    return F.normalize(text_encoder(enc.input_ids, attention_mask=enc.attention_mask).text_embeds, dim=-1)


def zero_snr_scheduler(scheduler):
    """The DDIM scheduler with the same betas rescaled to zero terminal SNR, v-prediction and trailing timesteps
    (Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed"), as the toy world's decoders
    are trained and sampled.

    With Stable Diffusion's own schedule the last training step still shows the model a trace of the clean
    latents, and sampling starts from pure noise: the model reads the colour and place of a shape from what that
    noise happens to hold, not from the prompt (trained alike for 500 steps, an image UNet drew the prompt's colour
    70% of the time with SD's schedule and 100% with this one)."""
    config = {k: v for k, v in scheduler.config.items() if not k.startswith("_")}
    for key in ("skip_prk_steps", "clip_sample", "set_alpha_to_one"):
        config.pop(key, None)
    return DDIMScheduler.from_config(
        config, clip_sample=False, set_alpha_to_one=False, rescale_betas_zero_snr=True,
        prediction_type="v_prediction", timestep_spacing="trailing",
    )  # fmt: skip


def _noise_loss(
    unet, scheduler, latents: torch.Tensor, generator: torch.Generator, shift: float = 1.0, **cond
) -> torch.Tensor:
    """The denoising loss for the scheduler's prediction type: epsilon with min-SNR (gamma 5) weighting, or v
    (velocity) unweighted, as Stable Diffusion 2 trains it.

    Timesteps are drawn uniformly, or with ``shift`` > 1 moved towards the noisy end as Stable Diffusion 3 shifts
    them (``t = s u / (1 + (s - 1) u)``, ``u`` uniform): the steps where the layout of the whole sample is decided,
    such as which way a clip moves, are seen more often (shift 3: 43% of the steps above t = 800 instead of 20%)."""
    noise = torch.randn(latents.shape, generator=generator)
    t = _draw_timesteps(latents.shape[0], scheduler.config.num_train_timesteps, generator, shift)
    noisy = scheduler.add_noise(latents, noise, t)
    pred = unet(noisy, t, **cond).sample
    if scheduler.config.prediction_type == "v_prediction":
        return F.mse_loss(pred, scheduler.get_velocity(latents, noise, t))
    alphas = scheduler.alphas_cumprod[t]
    snr = alphas / (1 - alphas)
    weight = torch.clamp(snr, max=5.0) / snr
    per_item = F.mse_loss(pred, noise, reduction="none").flatten(1).mean(1)
    return (weight * per_item).mean()


def _draw_timesteps(n: int, total: int, generator: torch.Generator, shift: float = 1.0) -> torch.Tensor:
    """``n`` training timesteps in [0, total): uniform, or shifted towards ``total`` (see :func:`_noise_loss`)."""
    if shift == 1.0:
        return torch.randint(0, total, (n,), generator=generator)
    u = torch.rand(n, generator=generator)
    return (shift * u / (1 + (shift - 1) * u) * total).long().clamp(max=total - 1)


def _media_bank(
    encoder_dir: Path, modality: Modality, n: int, rng: np.random.Generator
) -> tuple[torch.Tensor, list[str]]:
    """``n`` fresh media of ``modality`` embedded by the trained (frozen) encoder in ``encoder_dir``: the
    L2-normalised embeddings (n, E) and the media's captions."""
    encoder = build_imagebind_encoder(encoder_config(checkpoint=str(encoder_dir / "imagebind.safetensors")))
    items = [world.draw_item(rng, modality) for _ in range(n)]
    chunks = []
    with torch.no_grad():
        for i in tqdm(range(0, n, 64), desc=f"embed {modality.value}", leave=False):
            batch = [world.media_input(item) for item in items[i : i + 64]]
            chunks.append(F.normalize(encoder.encode(modality, batch).embeds.float(), dim=-1))
    return torch.cat(chunks), [item.caption for item in items]


def _lock_align_text(
    text_embed: Callable[[list[str]], torch.Tensor], params: list[torch.nn.Parameter], bank: torch.Tensor,
    captions: list[str], s: ComponentSettings, rng: np.random.Generator, *, desc: str,
) -> list[float]:  # fmt: skip
    """Tune a decoder's text tower contrastively against a locked media tower (LiT, Zhai et al. 2022), as CLIP and
    CLAP text towers are trained against their media towers: ``text_embed(captions)`` (B, D) against the frozen
    encoder's media embeddings ``bank`` (N, E) through a linear map E -> D that is discarded afterwards. Items with
    the same caption are all positives (soft targets), as the world repeats its captions. The tower leaves this
    knowing every attribute a medium shows (trained through the diffusion loss alone, a pooled CLAP embedding
    ended up blind to pitch)."""
    probe = text_embed(captions[:1])
    head = torch.nn.Linear(bank.shape[1], probe.shape[-1], bias=False)
    trained = list(params) + list(head.parameters())
    optimizer, schedule = _adamw(trained, s.align_lr, s.align_steps)

    def step(_: int) -> float:
        pick = rng.choice(len(captions), size=min(s.align_batch, len(captions)), replace=False)
        names = [captions[i] for i in pick]
        text = F.normalize(text_embed(names), dim=-1)
        media = F.normalize(head(bank[torch.from_numpy(pick)]), dim=-1)
        same = torch.tensor([[a == b for b in names] for a in names], dtype=torch.float32)
        targets = same / same.sum(-1, keepdim=True)
        logits = text @ media.T / 0.07
        loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
        return _update(loss, trained, optimizer, schedule)

    return _loop(desc, s.align_steps, step, trained)


def _drop_captions(captions: list[str], rng: np.random.Generator, rate: float = 0.1) -> list[str]:
    """Replace a fraction of captions by the empty one (classifier-free guidance training)."""
    return ["" if rng.random() < rate else c for c in captions]


# ------------------------------------------------------------------------------------------------------------
# Image decoder (Stable Diffusion)
# ------------------------------------------------------------------------------------------------------------


def train_image_decoder(out: Path, settings: ComponentSettings) -> dict[str, Any]:
    """Train a Stable Diffusion pipeline on the world's images; write it (diffusers folder) to ``out``."""
    s = settings
    rng = _rng(s.seed, "image")
    gen = torch.Generator().manual_seed(s.seed)
    parts = tiny_stable_diffusion_components(seed=s.seed, cond_dim=s.cond_dim, unet_channels=s.image_unet_channels)
    parts["scheduler"] = zero_snr_scheduler(parts["scheduler"])
    vae, unet, text_encoder, tokenizer, scheduler = (
        parts["vae"], parts["unet"], parts["text_encoder"], parts["tokenizer"], parts["scheduler"]
    )  # fmt: skip

    vae_batch = max(1, s.image_batch // 2)
    vae_losses = _train_vae(vae, lambda: _images(rng, vae_batch)[0], s.image_vae_steps, s.vae_lr, "image VAE")
    unet_losses = _train_text_conditioned_unet(
        unet, text_encoder, tokenizer, scheduler, vae, lambda: _images(rng, s.image_batch), s.image_unet_steps, s,
        rng, gen, desc="image UNet",
    )  # fmt: skip
    pipe = StableDiffusionPipeline(**parts)
    pipe.save_pretrained(out, safe_serialization=True)
    return {"vae_loss": _loss_summary(vae_losses), "unet_loss": _loss_summary(unet_losses)}


def refine_image_decoder(out: Path, image_decoder: Path, settings: ComponentSettings) -> dict[str, Any]:
    """Train the image decoder's UNet and text encoder further, at a lower learning rate (a second phase: colour
    binding keeps improving after the loss has flattened); write the result to ``out``."""
    s = settings
    rng = _rng(s.seed, "image-refine")
    gen = torch.Generator().manual_seed(s.seed + 3)
    pipe = StableDiffusionPipeline.from_pretrained(image_decoder, safety_checker=None, requires_safety_checker=False)

    losses = _train_text_conditioned_unet(
        pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, pipe.vae, lambda: _images(rng, s.image_batch),
        s.image_refine_steps, s, rng, gen, desc="image UNet (refine)", lr=s.image_refine_lr,
    )  # fmt: skip
    pipe.save_pretrained(out, safe_serialization=True)
    return {"unet_loss": _loss_summary(losses)}


def _train_text_conditioned_unet(
    unet, text_encoder, tokenizer, scheduler, vae, batch_fn, steps: int, s: ComponentSettings, rng, gen, *, desc: str,
    video: bool = False, lr: float | None = None, train_text: bool = True, shift: float = 1.0,
) -> list[float]:  # fmt: skip
    """Train the UNet, and the CLIP text encoder with it unless ``train_text`` is False (then it stays frozen), on
    (media, caption) batches from ``batch_fn``; ``shift``: see :func:`_noise_loss`."""
    unet.train()
    unet.requires_grad_(True)
    text_encoder.train(train_text)
    text_encoder.requires_grad_(train_text)
    params = list(unet.parameters()) + (list(text_encoder.parameters()) if train_text else [])
    optimizer, schedule = _adamw(params, lr or s.unet_lr, steps)

    def step(_: int) -> float:
        pixels, captions = batch_fn()
        with torch.no_grad():
            if video:  # (B, F, 3, H, W) -> latents (B, C, F, h, w)
                b, f = pixels.shape[:2]
                lat = vae.encode(pixels.flatten(0, 1)).latent_dist.sample(generator=gen)
                latents = lat.unflatten(0, (b, f)).permute(0, 2, 1, 3, 4) * vae.config.scaling_factor
            else:
                latents = vae.encode(pixels).latent_dist.sample(generator=gen) * vae.config.scaling_factor
        with torch.set_grad_enabled(train_text):
            cond = _clip_embeds(text_encoder, tokenizer, _drop_captions(captions, rng))
        loss = _noise_loss(unet, scheduler, latents, gen, shift, encoder_hidden_states=cond)
        return _update(loss, params, optimizer, schedule)

    losses = _loop(desc, steps, step, params)
    for module in (unet, text_encoder):
        module.eval()
        module.requires_grad_(False)
    return losses


# ------------------------------------------------------------------------------------------------------------
# Video decoder (ZeroScope)
# ------------------------------------------------------------------------------------------------------------


def train_video_decoder(out: Path, image_decoder: Path, settings: ComponentSettings, encoder: Path) -> dict[str, Any]:
    """Train a ZeroScope (``TextToVideoSDPipeline``) pipeline on the world's videos; write it to ``out``.

    The VAE, the text encoder and the UNet's spatial layers start from the trained image decoder in
    ``image_decoder``, so the UNet3D starts as the image UNet applied frame by frame (:func:`video_unet_from_image`);
    the VAE stays frozen. The text encoder has never read a direction word there: it is first aligned to the
    trained encoder's video embeddings (``encoder``, see :func:`_lock_align_text`, on its pooled output, as CLIP
    is trained), then frozen while the UNet learns (trained jointly instead, "moving left" and "moving right"
    stayed at cosine 0.997). On the aligned tower this part's UNet still draws a direction of its own:
    :func:`refine_video_decoder` teaches it the prompt's."""
    s = settings
    rng = _rng(s.seed, "video")
    gen = torch.Generator().manual_seed(s.seed + 1)
    image = StableDiffusionPipeline.from_pretrained(image_decoder, safety_checker=None, requires_safety_checker=False)
    parts = tiny_zeroscope_components(seed=s.seed, cond_dim=s.cond_dim, unet_channels=s.image_unet_channels)
    parts["scheduler"] = zero_snr_scheduler(parts["scheduler"])
    parts["vae"] = image.vae
    parts["text_encoder"] = image.text_encoder
    unet = parts["unet"]
    spatial = video_unet_from_image(unet, image.unet)

    text_encoder, tokenizer = parts["text_encoder"], parts["tokenizer"]
    align_rng = _rng(s.seed, "video-align")
    bank, bank_captions = _media_bank(encoder, Modality.VIDEO, s.align_pool, align_rng)
    text_encoder.train()
    text_encoder.requires_grad_(True)
    align_losses = _lock_align_text(
        lambda c: _clip_embeds(text_encoder, tokenizer, c, pooled=True), list(text_encoder.parameters()), bank,
        bank_captions, s, align_rng, desc="CLIP text tower (aligned to video)",
    )  # fmt: skip

    losses = _train_text_conditioned_unet(
        unet, text_encoder, tokenizer, parts["scheduler"], parts["vae"], lambda: _videos(rng, s.video_batch),
        s.video_unet_steps, s, rng, gen, desc="video UNet3D", video=True, train_text=False,
    )  # fmt: skip
    TextToVideoSDPipeline(**parts).save_pretrained(out, safe_serialization=True)
    return {
        "text_align_loss": _loss_summary(align_losses),
        "unet_loss": _loss_summary(losses),
        "initialised_from_image": spatial,
    }


def refine_video_decoder(out: Path, video_decoder: Path, settings: ComponentSettings) -> dict[str, Any]:
    """Train the video decoder's UNet further, its text encoder frozen (copied unchanged, so the stages that read
    only the text encoder need not wait for this part), with timesteps shifted towards the noisy end
    (``video_timestep_shift``, see :func:`_noise_loss`): which way the square moves is decided there. Write the
    result to ``out``.

    After ``train_video_decoder`` (uniform timesteps) the decoder alone drew the prompt's direction 27% of the time
    (chance, 48 clips); after this, 85% (48 clips) and 91.7% in the packaged model (96 clips, ``eval-decoders``).
    The shift and the extra steps were not tried apart."""
    s = settings
    rng = _rng(s.seed, "video-refine")
    gen = torch.Generator().manual_seed(s.seed + 4)
    pipe = TextToVideoSDPipeline.from_pretrained(video_decoder)
    losses = _train_text_conditioned_unet(
        pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, pipe.vae, lambda: _videos(rng, s.video_batch),
        s.video_refine_steps, s, rng, gen, desc="video UNet3D (refine)", video=True, lr=s.video_refine_lr,
        train_text=False, shift=s.video_timestep_shift,
    )  # fmt: skip
    pipe.save_pretrained(out, safe_serialization=True)
    return {"unet_loss": _loss_summary(losses)}


def _videos(rng: np.random.Generator, n: int) -> tuple[torch.Tensor, list[str]]:
    """``n`` fresh clips as pixels (B, F, 3, H, W) in [-1, 1], and their captions."""
    items = [world.draw_video(rng) for _ in range(n)]
    frames = np.stack([i.render().frames for i in items])  # (B, F, H, W, 3)
    x = torch.from_numpy(frames).float().permute(0, 1, 4, 2, 3) / 127.5 - 1.0
    return x, [i.caption for i in items]


def video_unet_from_image(unet, image_unet) -> int:
    """Start a ``UNet3DConditionModel`` as the ``UNet2DConditionModel`` ``image_unet`` applied frame by frame.

    Every tensor of the image UNet is copied (its spatial transformers' 1x1-convolution projections become the
    3-D UNet's Linear ones: the same weights, reshaped; the head layouts must agree, see
    :func:`decoders.tiny.tiny_stable_diffusion_components`). Every temporal layer starts as the identity:
    diffusers zeroes each temporal convolution's last layer, and this zeroes each temporal transformer's output
    projection (its residual branch), as motion modules are started (AnimateDiff); left random, that branch adds
    noise to every spatial feature and the image prior is lost.

    Returns:
        The number of tensors copied (all of the image UNet's).
    """
    own = unet.state_dict()
    image = image_unet.state_dict()
    spatial = {k: v.reshape(own[k].shape) for k, v in image.items() if k in own and own[k].numel() == v.numel()}
    if len(spatial) != len(image):
        missing = sorted(set(image) - set(spatial))
        raise ValueError(f"the video UNet has no place for {len(missing)} image UNet tensor(s), e.g. {missing[:3]}")
    unet.load_state_dict(spatial, strict=False)
    for module in unet.modules():
        if isinstance(module, TransformerTemporalModel):
            torch.nn.init.zeros_(module.proj_out.weight)
            torch.nn.init.zeros_(module.proj_out.bias)
    logger.info("video UNet: %d of %d tensors start from the image UNet, temporal layers as the identity",
                len(spatial), len(own))  # fmt: skip
    return len(spatial)


# ------------------------------------------------------------------------------------------------------------
# Audio decoder (AudioLDM)
# ------------------------------------------------------------------------------------------------------------


def audio_log_mel(waveform: torch.Tensor) -> torch.Tensor:
    """(B, N) 16 kHz waveforms -> (B, N / 160, 64) scaled log-mel frames: the representation the toy world's
    AudioLDM VAE reconstructs and its vocoder reads. ``log(mel + 1e-5)`` keeps gradients alive near silence."""
    transform = _mel_transform()
    mel = transform(waveform)[..., : waveform.shape[-1] // HOP]  # (B, 64, T)
    return ((torch.log(mel + 1e-5) + 5.0) / 5.0).transpose(1, 2)


_MEL: dict[str, Any] = {}


def _mel_transform() -> torchaudio.transforms.MelSpectrogram:
    if "t" not in _MEL:
        _MEL["t"] = torchaudio.transforms.MelSpectrogram(
            sample_rate=world.SAMPLE_RATE, n_fft=N_FFT, hop_length=HOP, n_mels=MEL_BINS, f_min=0.0, f_max=8000.0,
            power=1.0,
        )  # fmt: skip
    return _MEL["t"]


def train_audio_decoder(out: Path, settings: ComponentSettings, encoder: Path) -> dict[str, Any]:
    """Train an AudioLDM pipeline (mel VAE, vocoder, CLAP-conditioned UNet) on the world's tones; write it to
    ``out``.

    The CLAP text tower is first aligned to the trained encoder's audio embeddings (``encoder``, see
    :func:`_lock_align_text`), then frozen, as AudioLDM's CLAP is, while the UNet learns from its embeddings."""
    s = settings
    rng = _rng(s.seed, "audio")
    gen = torch.Generator().manual_seed(s.seed + 2)
    parts = tiny_audioldm_components(
        seed=s.seed, cond_dim=s.cond_dim, unet_channels=s.audio_unet_channels, vae_channels=(16, 32, 64)
    )  # mel (100, 64) -> latents (25, 16)
    parts["scheduler"] = zero_snr_scheduler(parts["scheduler"])
    vae, unet, text_encoder, tokenizer, scheduler = (
        parts["vae"], parts["unet"], parts["text_encoder"], parts["tokenizer"], parts["scheduler"]
    )  # fmt: skip

    def audio(n: int) -> tuple[torch.Tensor, list[str]]:
        items = [world.draw_audio(rng) for _ in range(n)]
        wave = torch.from_numpy(np.stack([i.render().waveform for i in items]))
        return wave, [i.caption for i in items]

    def mels(n: int) -> tuple[torch.Tensor, list[str]]:
        wave, captions = audio(n)
        return audio_log_mel(wave).unsqueeze(1), captions  # (B, 1, T, 64)

    vae_batch = max(1, s.audio_batch // 2)
    vae_losses = _train_vae(vae, lambda: mels(vae_batch)[0], s.audio_vae_steps, s.vae_lr, "audio VAE")

    align_rng = _rng(s.seed, "audio-align")
    bank, bank_captions = _media_bank(encoder, Modality.AUDIO, s.align_pool, align_rng)
    text_encoder.train()
    text_encoder.requires_grad_(True)
    align_losses = _lock_align_text(
        lambda c: _clap_embeds(text_encoder, tokenizer, c), list(text_encoder.parameters()), bank, bank_captions, s,
        align_rng, desc="CLAP text tower (aligned to audio)",
    )  # fmt: skip
    text_encoder.eval()
    text_encoder.requires_grad_(False)

    unet.train()
    unet.requires_grad_(True)
    params = list(unet.parameters())
    optimizer, schedule = _adamw(params, s.unet_lr, s.audio_unet_steps)
    with torch.no_grad():
        empty = _clap_embeds(text_encoder, tokenizer, [""], s.cond_dim)  # the pipeline's negative prompt

    def step(_: int) -> float:
        x, captions = mels(s.audio_batch)
        with torch.no_grad():
            latents = vae.encode(x).latent_dist.sample(generator=gen) * vae.config.scaling_factor
            keep = torch.tensor([c != "" for c in _drop_captions(captions, rng)])[:, None]
            cond = torch.where(keep, _clap_embeds(text_encoder, tokenizer, captions), empty)
        loss = _noise_loss(unet, scheduler, latents, gen, encoder_hidden_states=None, class_labels=cond)
        return _update(loss, params, optimizer, schedule)

    unet_losses = _loop("audio UNet", s.audio_unet_steps, step, params)
    unet.eval()
    unet.requires_grad_(False)
    AudioLDMPipeline(**parts).save_pretrained(out, safe_serialization=True)
    return {
        "vae_loss": _loss_summary(vae_losses),
        "text_align_loss": _loss_summary(align_losses),
        "unet_loss": _loss_summary(unet_losses),
    }


def train_vocoder(out: Path, audio_decoder: Path, settings: ComponentSettings) -> dict[str, Any]:
    """Train the AudioLDM decoder's HiFi-GAN vocoder (a fresh one) on the world's tones; write the decoder with it to
    ``out``. It reads what the pipeline gives it: mels (:func:`audio_log_mel`) passed through the decoder's frozen
    VAE (a latent sample, decoded), and learns to make the original tone."""
    s = settings
    rng = _rng(s.seed, "vocoder")
    pipe = AudioLDMPipeline.from_pretrained(audio_decoder)
    vocoder = tiny_audioldm_components(seed=s.seed + 4)["vocoder"]
    # transformers initialises HiFi-GAN convolutions with std 0.01: through its stack the output starts ~1e-6 and
    # barely learns. PyTorch's default (Kaiming-uniform) initialisation trains.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed + 4)
        for module in vocoder.modules():
            if isinstance(module, torch.nn.Conv1d | torch.nn.ConvTranspose1d):
                module.reset_parameters()
    pipe.register_modules(vocoder=vocoder)

    def waves() -> torch.Tensor:
        return torch.from_numpy(np.stack([world.draw_audio(rng).render().waveform for _ in range(s.vocoder_batch)]))

    gen = torch.Generator().manual_seed(s.seed + 5)

    def through_vae(mel: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            latents = pipe.vae.encode(mel.unsqueeze(1)).latent_dist.sample(generator=gen)
            return pipe.vae.decode(latents).sample.squeeze(1)

    losses = _train_vocoder(pipe.vocoder, waves, s, inputs=through_vae)
    pipe.save_pretrained(out, safe_serialization=True)
    return {"vocoder_loss": _loss_summary(losses)}


def _train_vocoder(
    vocoder, batch_fn: Callable[[], torch.Tensor], s: ComponentSettings, inputs: Callable[[torch.Tensor], torch.Tensor]
) -> list[float]:
    """HiFi-GAN generator on linear-mel losses (no discriminator: the world's tones do not need one): spectral
    convergence plus a relative L1. Log-mel losses are dominated by a tone's many silent bins and pull the generator
    to silence; so does an L1 on samples (phases are free)."""
    vocoder.train()
    vocoder.requires_grad_(True)
    optimizer, schedule = _adamw(vocoder.parameters(), s.vae_lr, s.vocoder_steps)

    mel_of = _mel_transform()

    def step(_: int) -> float:
        wave = batch_fn()
        target = mel_of(wave)[..., : wave.shape[-1] // HOP]
        fake = vocoder(inputs(audio_log_mel(wave)))[..., : wave.shape[-1]]
        made = mel_of(fake)[..., : wave.shape[-1] // HOP]
        # spectral convergence + L1 of the linear mel, relative to the target's level
        loss = torch.linalg.norm(made - target) / torch.linalg.norm(target) + F.l1_loss(made, target) / target.mean()
        return _update(loss, vocoder.parameters(), optimizer, schedule)

    losses = _loop("vocoder", s.vocoder_steps, step, vocoder.parameters())
    vocoder.eval()
    vocoder.requires_grad_(False)
    return losses


# ------------------------------------------------------------------------------------------------------------
# Encoder (ImageBind architecture)
# ------------------------------------------------------------------------------------------------------------


def encoder_config(checkpoint: str | None = None):
    """The toy world's ImageBind config: Meta's architecture at small widths, one clip per video / audio."""
    trunks = {}
    for trunk, (dim, blocks, heads) in {
        "vision": (64, 2, 4), "audio": (64, 2, 4), "text": (32, 2, 2),
        "depth": (16, 1, 1), "thermal": (16, 1, 1), "imu": (16, 1, 1),
    }.items():  # fmt: skip
        trunks.update({f"{trunk}_embed_dim": dim, f"{trunk}_num_blocks": blocks, f"{trunk}_num_heads": heads})
    return ImageBindConfig(
        out_embed_dim=64,
        **trunks,
        audio_drop_path=0.0,
        imu_drop_path=0.0,
        pretrained=False,
        checkpoint=checkpoint,
        video_clips=1,
        video_frames_per_clip=4,
        video_clip_seconds=1.0,
        video_spatial_crops=1,
        audio_clips=1,
        audio_clip_seconds=1.0,
        num_mel_bins=MEL_BINS,
        target_frames=100,
    )


def world_captions() -> list[str]:
    """Every caption of the world (34)."""
    captions = [world.ImageItem(c, s).caption for c in world.COLOURS for s in world.SHAPES]
    captions += [world.AudioItem(p, st).caption for p in world.PITCHES for st in world.STYLES]
    captions += [world.VideoItem(c, d).caption for c in world.COLOURS for d in world.DIRECTIONS]
    return captions


def train_encoder(out: Path, settings: ComponentSettings) -> dict[str, Any]:
    """Train the encoder contrastively on the world; write ``imagebind.safetensors`` (Meta's key names) to ``out``.

    Each step embeds a batch of images, videos and audio clips and every caption of the world with the text trunk;
    the loss is cross-entropy of each media embedding's similarities to all captions (temperature 0.07) with its
    own caption as the target (no false negatives, as every caption appears once)."""
    s = settings
    rng = _rng(s.seed, "encoder")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        encoder = ImageBindEncoder(encoder_config())
    captions = world_captions()
    index = {c: i for i, c in enumerate(captions)}
    text_ids = torch.stack([encoder.preprocess(Modality.TEXT, c) for c in captions])

    pools: dict[Modality, tuple[torch.Tensor, torch.Tensor]] = {}
    for modality in (Modality.IMAGE, Modality.VIDEO, Modality.AUDIO):
        items = [world.draw_item(rng, modality) for _ in range(s.encoder_pool)]
        # two in three rendered another way (frame size, shade, clip length and speed...): the encoder should learn
        # the world, not one renderer
        items = [world.vary(i, rng) if rng.random() < s.encoder_varied else i for i in items]
        rendered = [world.media_input(i) for i in items]
        x = torch.stack([encoder.preprocess(modality, r) for r in tqdm(rendered, desc=f"preprocess {modality.value}")])
        pools[modality] = (x.half(), torch.tensor([index[i.caption] for i in items]))

    model = encoder.model
    model.requires_grad_(True)
    model.train()
    optimizer, schedule = _adamw(model.parameters(), s.encoder_lr, s.encoder_steps)

    def step(_: int) -> float:
        text = F.normalize(encoder.embed(Modality.TEXT, text_ids).embeds, dim=-1)
        loss = 0.0
        for modality, (x, labels) in pools.items():
            pick = torch.from_numpy(rng.choice(len(labels), size=min(s.encoder_batch, len(labels)), replace=False))
            media = F.normalize(encoder.embed(modality, x[pick].float()).embeds, dim=-1)
            loss = loss + F.cross_entropy(media @ text.T / 0.07, labels[pick])
        return _update(loss, model.parameters(), optimizer, schedule) / len(pools)

    losses = _loop("encoder", s.encoder_steps, step, model.parameters())
    model.eval()
    model.requires_grad_(False)
    accuracy = {}
    with torch.no_grad():
        text = F.normalize(encoder(Modality.TEXT, text_ids).embeds, dim=-1)
        for modality in pools:  # retrieval accuracy on fresh media, as the world renders them and held-out renderings
            for label, split in ((modality.value, None), (f"{modality.value}_heldout_rendering", "heldout")):
                items = [world.draw_item(rng, modality) for _ in range(48)]
                if split is not None:
                    items = [world.vary(i, rng, split) for i in items]
                emb = F.normalize(encoder.encode(modality, [world.media_input(i) for i in items]).embeds, dim=-1)
                predicted = (emb @ text.T).argmax(-1)
                accuracy[label] = float(
                    np.mean([captions[p] == i.caption for p, i in zip(predicted.tolist(), items, strict=True)])
                )
    logger.info("encoder retrieval accuracy on fresh media: %s", accuracy)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().half().contiguous() for k, v in model.state_dict().items()}, out / "imagebind.safetensors")
    return {"loss": _loss_summary(losses), "retrieval_accuracy": accuracy}


# ------------------------------------------------------------------------------------------------------------
# Language model (Llama architecture, BPE tokenizer)
# ------------------------------------------------------------------------------------------------------------


def train_language_model(out: Path, corpus: list[str], settings: ComponentSettings) -> dict[str, Any]:
    """Train a BPE tokenizer and a Llama LM on ``corpus`` (whole conversations as text); save both to ``out``."""
    s = settings
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = bpe_decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=s.llm_vocab,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=len(tokenizer),
                hidden_size=s.llm_hidden,
                intermediate_size=3 * s.llm_hidden,
                num_hidden_layers=s.llm_layers,
                num_attention_heads=s.llm_heads,
                num_key_value_heads=s.llm_heads,
                max_position_embeddings=1024,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                tie_word_embeddings=False,
            )
        )
    # "</s>" in the text is the template's end of an assistant turn: tokenised as the EOS token, as at inference.
    encoded = [[tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False).input_ids for text in corpus]
    lengths = [len(e) for e in encoded]
    logger.info(
        "language model: %d conversations, %d tokens (mean %.0f, max %d), vocabulary %d",
        len(encoded), sum(lengths), np.mean(lengths), max(lengths), len(tokenizer),
    )  # fmt: skip
    rng = _rng(s.seed, "llm")
    model.train()
    optimizer, schedule = _adamw(model.parameters(), s.llm_lr, s.llm_steps)

    def batch(rows: list[list[int]]) -> dict[str, torch.Tensor]:
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), tokenizer.pad_token_id)
        labels = torch.full((len(rows), length), -100)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            labels[i, : len(r)] = torch.tensor(r)
        return {"input_ids": ids, "attention_mask": (labels != -100).long(), "labels": labels}

    def step(_: int) -> float:
        rows = [encoded[i] for i in rng.choice(len(encoded), size=min(s.llm_batch, len(encoded)), replace=False)]
        loss = model(**batch(rows)).loss
        return _update(loss, model.parameters(), optimizer, schedule)

    losses = _loop("language model", s.llm_steps, step, model.parameters())
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return {"loss": _loss_summary(losses), "vocabulary": len(tokenizer), "conversations": len(encoded)}
