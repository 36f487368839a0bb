"""The optional diffusion loss: noise prediction through each frozen decoder's UNet, conditioned on the output
projector's conditioning, min-SNR weighted (NExT-GPT's newer code, gamma 5).

The target media file of each generated item is turned into the decoder's latents with the decoder's own VAE (and,
for audio, a log-mel spectrogram with the vocoder's settings); noise and timesteps are drawn per item; the loss is
the weighted mean squared error of the UNet's prediction. Gradients reach the conditioning only: VAE and UNet stay
frozen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torchaudio
from diffusers import DDPMScheduler

from anygpt.base.media import load_media, resample, to_mono
from anygpt.base.modality import Modality
from training.losses import min_snr_weights


@dataclass
class DiffusionInputs:
    """Per modality: which conditioning rows have a target (``index``), and the noised latents to denoise."""

    index: torch.Tensor  # (n,) rows of the modality's conditioning (signal-group order)
    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor  # noise (epsilon prediction) or velocity (v prediction)
    weights: torch.Tensor  # (n,) min-SNR weights


class DiffusionLoss:
    """Prepares latents (no gradients) and computes the loss from the conditioning (with gradients)."""

    def __init__(self, decoders: dict, *, gamma: float):
        self.decoders = decoders
        self.gamma = gamma
        self._schedulers = {}

    def _scheduler(self, modality: Modality):
        if modality not in self._schedulers:
            pipe = self.decoders[modality].load()
            self._schedulers[modality] = DDPMScheduler.from_config(pipe.scheduler.config)
        return self._schedulers[modality]

    # ------------------------------------------------------------------ latents
    @torch.no_grad()
    def latents(self, modality: Modality, paths: list) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's latent distribution of each target file: (mean, std), already scaled."""
        decoder = self.decoders[modality]
        pipe = decoder.load()
        config = decoder.config
        vae = pipe.vae
        device, dtype = vae.device, vae.dtype
        if modality is Modality.IMAGE:
            images = [load_media(modality, p) for p in paths]
            pixels = pipe.image_processor.preprocess(images, height=config.height, width=config.width)
            dist = vae.encode(pixels.to(device, dtype)).latent_dist
            return dist.mean * vae.config.scaling_factor, dist.std * vae.config.scaling_factor
        if modality is Modality.VIDEO:
            means, stds = [], []
            for path in paths:
                video = load_media(modality, path)
                frames = video.frames[np.linspace(0, len(video.frames) - 1, config.num_frames).round().astype(int)]
                pixels = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (T, 3, H, W)
                pixels = F.interpolate(pixels, size=(config.height, config.width), mode="bilinear", antialias=True)
                dist = vae.encode(pixels.to(device, dtype)).latent_dist
                means.append(dist.mean.permute(1, 0, 2, 3) * vae.config.scaling_factor)  # (C, T, h, w)
                stds.append(dist.std.permute(1, 0, 2, 3) * vae.config.scaling_factor)
            return torch.stack(means), torch.stack(stds)
        # audio: log-mel with the vocoder's settings, cut or padded to the decoder's length
        mels = [self._log_mel(pipe, load_media(modality, p), config.audio_seconds) for p in paths]
        mel = torch.stack(mels).unsqueeze(1).to(device, dtype)  # (B, 1, T, n_mels)
        dist = vae.encode(mel).latent_dist
        return dist.mean * vae.config.scaling_factor, dist.std * vae.config.scaling_factor

    @staticmethod
    def _log_mel(pipe, audio, seconds: float) -> torch.Tensor:
        rate = int(pipe.vocoder.config.sampling_rate)
        n_mels = int(pipe.vocoder.config.model_in_dim)
        hop = 160 if rate == 16000 else rate // 100
        wave = torch.from_numpy(resample(to_mono(audio), rate).waveform).float()
        mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=rate,
            n_fft=1024,
            win_length=1024,
            hop_length=hop,
            f_min=0.0,
            f_max=rate / 2,
            n_mels=n_mels,
            power=1.0,
            norm="slaney",
            mel_scale="slaney",
        )(wave)
        mel = torch.log(torch.clamp(mel, min=1e-5)).t()  # (T, n_mels)
        scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        frames = int(math.ceil(seconds * rate / hop / scale) * scale)
        if mel.shape[0] < frames:
            mel = torch.cat([mel, mel.new_full((frames - mel.shape[0], n_mels), math.log(1e-5))])
        return mel[:frames]

    def prepare(self, modality: Modality, index: list[int], paths: list, seeds: list[int]) -> DiffusionInputs:
        """Latents of the target media (sampled from the VAE's distribution), noised at a random timestep: every
        random draw of an item comes from its own seed, so no draw depends on how the batch is split."""
        scheduler = self._scheduler(modality)
        mean, std = self.latents(modality, paths)
        sample, noise, steps = [], [], []
        for seed in seeds:
            generator = torch.Generator().manual_seed(int(seed))
            sample.append(torch.randn(mean.shape[1:], generator=generator, dtype=torch.float32))
            noise.append(torch.randn(mean.shape[1:], generator=generator, dtype=torch.float32))
            steps.append(int(torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=generator)))
        latents = mean + std * torch.stack(sample).to(mean.device, mean.dtype)
        noise = torch.stack(noise).to(latents.device, latents.dtype)
        steps = torch.tensor(steps, device=latents.device)
        noisy = scheduler.add_noise(latents, noise, steps)
        if scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, steps)
        else:
            target = noise
        return DiffusionInputs(
            index=torch.tensor(index, dtype=torch.long, device=latents.device),
            noisy=noisy,
            timesteps=steps,
            target=target,
            weights=min_snr_weights(scheduler, steps, self.gamma),
        )

    # ------------------------------------------------------------------ loss
    def loss_sum(self, modality: Modality, cond: torch.Tensor, inputs: DiffusionInputs) -> torch.Tensor:
        """Sum over items of the min-SNR-weighted MSE of the frozen UNet's prediction."""
        unet = self.decoders[modality].pipeline.unet
        cond = cond[inputs.index].to(unet.dtype)
        if modality is Modality.AUDIO:
            pred = unet(inputs.noisy, inputs.timesteps, encoder_hidden_states=None, class_labels=cond).sample
        else:
            pred = unet(inputs.noisy, inputs.timesteps, encoder_hidden_states=cond).sample
        per_item = (pred.float() - inputs.target.float()).pow(2).flatten(1).mean(1)
        return (per_item * inputs.weights.float()).sum()
