"""Draw ``docs/grid.png``: what the default model makes for a few prompts (an image, a clip's frames, a tone's
spectrogram), each beside its prompt and the model's reply. The README shows it.

    .venv/bin/python docs/make_grid.py [--model toyworld] [--out docs/grid.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

PROMPTS = (
    "draw a red circle",
    "draw a blue triangle",
    "show a green square moving left",
    "show a yellow square moving up",
    "play a high beep",
    "make a steady low tone",
)
CELL = 96  # each picture or frame, in pixels (64 px media enlarged with nearest-neighbour)
TEXT = 300  # the text column's width
FRAMES = 8


def spectrogram(samples: np.ndarray, rate: int, height: int = CELL, width: int = CELL * 4) -> Image.Image:
    """A log-magnitude spectrogram (0-2 kHz, time left to right) as a grey image, dark = loud."""
    window, hop = 512, 128
    frames = [samples[i : i + window] * np.hanning(window) for i in range(0, len(samples) - window, hop)]
    spec = np.abs(np.fft.rfft(np.stack(frames), axis=1)).T  # (freq, time)
    spec = spec[: int(2000 * window / rate)]  # up to 2 kHz: the world's tones are 262-1047 Hz
    db = 20 * np.log10(spec + 1e-6)
    db = np.clip((db - (db.max() - 60)) / 60, 0, 1)  # the top 60 dB
    picture = Image.fromarray((255 * (1 - db[::-1])).astype(np.uint8))
    return picture.resize((width, height), Image.Resampling.BILINEAR).convert("RGB")


def row(pipe, prompt: str) -> Image.Image:
    out = pipe(prompt, seed=0)
    media: list[Image.Image] = []
    if out.images:
        media.append(out.images[0].resize((CELL, CELL), Image.Resampling.NEAREST))
    if out.videos:
        frames = out.videos[0].frames
        for i in np.linspace(0, len(frames) - 1, min(FRAMES, len(frames))).round().astype(int):
            media.append(Image.fromarray(np.asarray(frames[i])).resize((CELL, CELL), Image.Resampling.NEAREST))
    if out.audios:
        media.append(
            spectrogram(np.asarray(out.audios[0].waveform, dtype=np.float64).ravel(), out.audios[0].sample_rate)
        )
    width = TEXT + sum(m.width + 4 for m in media)
    canvas = Image.new("RGB", (width, CELL + 8), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((6, 20), f'"{prompt}"', fill="black")
    draw.text((6, 48), out.text, fill=(60, 60, 160))
    x = TEXT
    for m in media:
        canvas.paste(m, (x, 4))
        draw.rectangle([x - 1, 3, x + m.width, 4 + m.height], outline=(200, 200, 200))
        x += m.width + 4
    return canvas


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toyworld")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "grid.png")
    args = parser.parse_args(argv)
    from anygpt import AnyGPTPipeline

    pipe = AnyGPTPipeline.from_pretrained(args.model)
    rows = [row(pipe, prompt) for prompt in PROMPTS]
    grid = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), "white")
    y = 0
    for r in rows:
        grid.paste(r, (0, y))
        y += r.height
    grid.save(args.out)
    print(args.out)
    return args.out


if __name__ == "__main__":
    main()
