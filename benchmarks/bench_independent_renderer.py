"""Does the default model read clips it has never seen the renderer of? (issue 18)

The toy world's clips come from ``toyworld.render.render_motion`` (a NumPy square on white). This benchmark draws the
same kind of scene with another program: Pillow draws each frame, the square is exactly 16 px, its colour is the
colour's CSS value (not the world's RGB), the frame sizes, frame counts, frame rates and paths are values the world
never uses (neither its training nor its held-out renderings), and each clip is written to an H.264 MP4 with
imageio-ffmpeg and read back from the file as a user's upload would be (lossy compression the world's clips never had).

Each clip is asked "what is in this video?" (and the other captioning questions) and the reply's direction and colour
words are read with the world's oracle. Chance is 25% for both.

    .venv/bin/python benchmarks/bench_independent_renderer.py [--model toyworld] [--clips 96] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import imageio_ffmpeg
import numpy as np
from PIL import Image, ImageDraw

# The world's colour names with their CSS values (https://www.w3.org/TR/css-color-4/#named-colors), not the world's
# own RGB: what another person would paint "a red square" with.
CSS = {"red": (255, 0, 0), "green": (0, 128, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}
DIRECTIONS = ("right", "left", "up", "down")
SIDE = 16  # the square's side in pixels, whatever the frame size
# Values outside both of the world's rendering sets (toyworld.world.RENDERINGS: sizes 48-112, 6-16 frames, 4-16 fps).
SIZES = (60, 88, 128)
FRAMES = (5, 11, 20)
FPS = (5.0, 15.0, 24.0)
QUESTIONS = ("what is in this video?", "describe this clip.", "what happens in this video?", "what moves?")


def draw_clip(rng: np.random.Generator, colour: str, direction: str) -> tuple[np.ndarray, float, dict]:
    """Frames of a ``SIDE`` px square crossing part of a white frame in ``direction``, drawn with Pillow."""
    size = int(rng.choice(SIZES))
    frames = int(rng.choice(FRAMES))
    fps = float(rng.choice(FPS))
    room = size - SIDE
    # where the path starts and how far it goes (between a third and all of the way), and where across it runs
    length = rng.uniform(0.33, 1.0) * room
    begin = rng.uniform(0.0, room - length)
    across = rng.uniform(0.0, room)
    out = []
    for i in range(frames):
        along = begin + length * i / (frames - 1)
        forward = {"right": along, "left": room - along, "down": along, "up": room - along}[direction]
        x, y = (forward, across) if direction in ("right", "left") else (across, forward)
        frame = Image.new("RGB", (size, size), "white")
        ImageDraw.Draw(frame).rectangle(
            [round(x), round(y), round(x) + SIDE - 1, round(y) + SIDE - 1], fill=CSS[colour]
        )
        out.append(np.asarray(frame))
    settings = {"size": size, "frames": frames, "fps": fps, "path_px": round(length, 1)}
    return np.stack(out), fps, settings


def write_mp4(path: Path, frames: np.ndarray, fps: float) -> None:
    """H.264 in yuv420p, as a phone or a browser would make it (even sizes are padded by ffmpeg's macro blocks)."""
    writer = imageio_ffmpeg.write_frames(
        str(path), (frames.shape[2], frames.shape[1]), fps=fps, codec="libx264", pix_fmt_out="yuv420p",
        macro_block_size=1, output_params=["-crf", "18"],
    )  # fmt: skip
    writer.send(None)
    for frame in frames:
        writer.send(np.ascontiguousarray(frame))
    writer.close()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toyworld")
    parser.add_argument("--clips", type=int, default=96, help="clips in all (a multiple of 16 keeps the cells even)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    from anygpt import AnyGPTPipeline
    from toyworld.oracles import caption_attributes

    pipe = AnyGPTPipeline.from_pretrained(args.model)
    rng = np.random.default_rng(args.seed)
    rows, start = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.clips):
            colour = list(CSS)[i % len(CSS)]
            direction = DIRECTIONS[(i // len(CSS)) % len(DIRECTIONS)]
            frames, fps, settings = draw_clip(rng, colour, direction)
            path = Path(tmp, f"clip-{i:03d}.mp4")
            write_mp4(path, frames, fps)
            question = QUESTIONS[i % len(QUESTIONS)]
            reply = pipe(question, videos=[str(path)], seed=i, max_new_tokens=24, modalities=["text"]).text
            found = caption_attributes(reply)
            rows.append({
                "colour": colour, "direction": direction, **settings, "question": question, "reply": reply,
                "direction_right": found.get("direction") == direction, "colour_right": found.get("colour") == colour,
            })  # fmt: skip
    n = len(rows)
    result = {
        "model": args.model,
        "clips": n,
        "direction": sum(r["direction_right"] for r in rows) / n,
        "colour": sum(r["colour_right"] for r in rows) / n,
        "by_direction": {
            d: sum(r["direction_right"] for r in rows if r["direction"] == d)
            / max(1, sum(r["direction"] == d for r in rows))
            for d in DIRECTIONS
        },
        "seconds": round(time.perf_counter() - start, 1),
        "rows": rows,
    }
    print(f"independent renderer, {n} clips ({args.model}): direction {result['direction']:.1%}, "
          f"colour {result['colour']:.1%} (chance 25% each); by direction: "
          + ", ".join(f"{d} {v:.0%}" for d, v in result["by_direction"].items()))  # fmt: skip
    misses = [r for r in rows if not r["direction_right"]][:8]
    for r in misses:
        print(
            f"  miss: {r['colour']} {r['direction']} {r['size']}px {r['frames']}f path {r['path_px']}px: {r['reply']!r}"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
