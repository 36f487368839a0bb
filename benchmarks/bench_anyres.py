"""High resolution and the token budget in the toy world: fixed 224, AnyRes, AnyRes + token merging, in one run.

Each variant is one system config (``image_input`` and the connector's ``token_merge``, ``anygpt.core.config``) on the
same starting model; its connector is built fresh from the same seed and trained by the ordinary stage 1 (the same
data, steps and seed for all, like ``benchmarks/bench_connectors.py``). Then each captions a held-out set of large
images, one small toy-world shape (``toyworld.render.render_shape``, the world's colours) placed anywhere on a 448 x 448
or a 672 x 224 (wide) canvas, never seen in training; the reply's words are scored by the world's oracle
(``toyworld.oracles.caption_attributes``). A 224 x 224 encoder sees the square canvas at half scale and only the middle
third of the wide one (ImageBind's centre crop); AnyRes sees them whole (global view + 2 x 2 or 1 x 3 tiles).

Reported per variant: caption colour / shape accuracy (overall and per canvas), LLM tokens per image (placeholder
positions in the sequence: one marker per item for a model that reads media through gated cross-attention) and
projected features per image (what the LLM reads), the seconds per image of a caption call (encode, project,
generate) and of the encoder alone, and the median stage-1 step.

    python benchmarks/bench_anyres.py --recipe RECIPE [--steps 600] [--samples 48] [--out results.json]
    python benchmarks/bench_anyres.py --start FOLDER --data DATA [--connector perceiver --options '{...}']
    python benchmarks/bench_anyres.py --quick        # a smoke run in under a minute (tiny preset, sample data)

``--recipe`` is a toy-world recipe folder (``anygpt toyworld recipe OUT --until base``): stage 1 starts from its
``base/model`` and reads its ``data/``; nothing is written into it (the feature cache and runs go to a temporary
folder unless ``--cache`` / ``--work`` say otherwise). ``--inline`` drops the model's gated cross-attention so the
features are spliced into the sequence (then LLM tokens = features). ``--quick`` trains the tiny preset (random
weights: its accuracies mean nothing) for 2 steps on the sample dataset and captions 2 images per canvas.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_training import median_step_time  # the benchmarks' folder is on sys.path when run as a script
from PIL import Image

from anygpt.base.modality import Modality
from anygpt.core.config import ImageInputConfig, ProjectorConfig
from anygpt.core.index import resolve_part
from anygpt.core.pipeline import AnyGPTPipeline, find_model
from toyworld.oracles import caption_attributes
from toyworld.render import COLOURS, SHAPES, render_shape
from toyworld.world import ASK_CAPTION
from training.config import load_config
from training.trainer import StageTrainer

REPO = Path(__file__).resolve().parents[1]
STAGE1 = REPO / "toyworld" / "configs" / "toyworld-stage1.yaml"
CANVASES = ((448, 448), (672, 224))  # (width, height)
QUICK_CONNECTOR = ("perceiver", {"num_latents": 8, "hidden_dim": 32, "depth": 1, "num_heads": 2})
PROMPTS = ASK_CAPTION[Modality.IMAGE][:3]  # the general questions (not "what shape is this?")


def held_out_images(per_canvas: int, seed: int = 1234) -> list[dict[str, Any]]:
    """``per_canvas`` images per canvas size, each one small shape anywhere on white: colours and shapes cycle so
    every pair comes up, radius 20..32 px, the centre uniform over the places where the whole shape fits."""
    rng = np.random.default_rng(seed)
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    items = []
    for width, height in CANVASES:
        order = rng.permutation(len(pairs))
        for i in range(per_canvas):
            colour, shape = pairs[int(order[i % len(pairs)])]
            radius = float(rng.uniform(20, 32))
            centre = (float(rng.uniform(radius, width - radius)), float(rng.uniform(radius, height - radius)))
            pixels = render_shape(shape, COLOURS[colour], size=max(width, height), radius=radius, centre=centre)
            items.append(
                {
                    "image": Image.fromarray(pixels[:height, :width]),
                    "canvas": f"{width}x{height}",
                    "colour": colour,
                    "shape": shape,
                    "prompt": PROMPTS[i % len(PROMPTS)],
                }
            )
    return items


def variants(merge_ratio: float, budget: int | None) -> dict[str, tuple[dict, dict | None]]:
    """name -> (image_input, token_merge)."""
    anyres = {"resolution": "anyres", "max_image_tokens": budget}
    return {
        "fixed 224": ({"resolution": "fixed"}, None),
        "anyres": (anyres, None),
        f"anyres + merge {merge_ratio:g}": (anyres, {"ratio": merge_ratio}),
    }


def prepare_start(
    start: str, folder: Path, image_input: dict, merge: dict | None, connector: tuple[str, dict] | None, inline: bool
) -> Path:
    """A copy of the starting model with this variant's config and a fresh connector (the same seed for every
    variant), written to ``folder`` (``save_pretrained``: the frozen parts by reference)."""
    source, config, parts = find_model(start)
    config = copy.deepcopy(config)
    name, options = (
        connector if connector is not None else (config.input_projector.name, config.input_projector.options)
    )
    options = {k: v for k, v in options.items() if k != "token_merge"}
    if merge is not None:
        options["token_merge"] = merge
    config.input_projector = ProjectorConfig(name, options)
    config.image_input = ImageInputConfig(**image_input)
    skip = {"input_projectors"}
    if inline and config.cross_attention is not None:
        config.cross_attention = None
        skip.add("cross_attention")
    tokenizer_dir = resolve_part(source, parts["tokenizer"], "tokenizer") if parts else None
    pipe = AnyGPTPipeline.from_config(config, tokenizer_dir=tokenizer_dir)
    if parts:
        pipe.model.load_trained(source, parts, skip=skip)
    pipe.save_pretrained(folder)
    return folder


def caption_scores(pipe: AnyGPTPipeline, items: list[dict[str, Any]], max_new_tokens: int) -> dict[str, Any]:
    """Accuracy of the colour and shape words of each caption, and the seconds per image."""
    ask = dict(modalities=[], temperature=0.0, max_new_tokens=max_new_tokens, show_progress=False)
    pipe(items[0]["prompt"], images=[items[0]["image"]], seed=0, **ask)  # warm-up
    pipe.model.encoder.encode("image", [items[0]["image"]])
    right: dict[str, list[bool]] = {}
    call_s, encode_s = [], []
    for i, item in enumerate(items):
        started = time.perf_counter()
        out = pipe(item["prompt"], images=[item["image"]], seed=i, **ask)
        call_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        with torch.no_grad():
            pipe.model.encoder.encode("image", [item["image"]])
        encode_s.append(time.perf_counter() - started)
        found = caption_attributes(out.text)
        for key in ("colour", "shape"):
            ok = found[key] == item[key]
            right.setdefault(key, []).append(ok)
            right.setdefault(f"{key} {item['canvas']}", []).append(ok)
    scores = {key: round(sum(v) / len(v), 4) for key, v in right.items()}
    both = [c and s for c, s in zip(right["colour"], right["shape"], strict=True)]
    return {
        **scores,
        "both": round(sum(both) / len(both), 4),
        "s_per_image": round(statistics.mean(call_s), 4),
        "encoder_s_per_image": round(statistics.mean(encode_s), 4),
    }


def run_variants(args: argparse.Namespace, start: str, data: Path, stage1: Path, cache: Path, work: Path) -> dict:
    items = held_out_images(args.samples)
    connector = None
    if args.connector:
        connector = (args.connector, json.loads(args.options) if args.options else {})
    table = {}
    for name, (image_input, merge) in variants(args.merge_ratio, args.max_image_tokens).items():
        slug = name.replace(" ", "-").replace("+", "plus")
        folder = prepare_start(start, work / slug / "start", image_input, merge, connector, args.inline)
        sets = [
            f"data_root={data}",
            f"cache_dir={cache}",
            f"train.max_steps={args.steps}",
            "train.save_every=0",
            "train.log_every=1",
        ]
        started = time.perf_counter()
        trainer = StageTrainer(load_config(stage1, overrides=sets), start=str(folder), output_dir=work / slug / "run")
        final = trainer.train()
        train_s = time.perf_counter() - started
        pipe = AnyGPTPipeline.from_pretrained(final)
        model = pipe.model
        table[name] = {
            "tokens_per_image": model.num_media_tokens(Modality.IMAGE),
            "features_per_image": model.num_media_features(Modality.IMAGE),
            **caption_scores(pipe, items, args.max_new_tokens),
            "step_s": round(
                median_step_time(work / slug / "run", trainer.global_batch, skip=min(5, args.steps - 1)), 4
            ),
            "train_s": round(train_s, 1),
        }
        print(json.dumps({name: table[name]}), flush=True)
    return table


def markdown(table: dict[str, dict]) -> str:
    """The results as a markdown table (accuracies in %)."""
    canvases = [f"{w}x{h}" for w, h in CANVASES]
    head = ["variant", "colour", "shape", "both"]
    head += [f"{kind} {c}" for c in canvases for kind in ("colour", "shape")]
    head += ["LLM tokens / image", "features / image", "s / image", "encoder s / image", "stage-1 step"]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for name, row in table.items():
        accuracy = [row["colour"], row["shape"], row["both"]]
        accuracy += [row[f"{kind} {c}"] for c in canvases for kind in ("colour", "shape")]
        cells = [name, *[f"{100 * a:.1f}%" for a in accuracy]]
        cells += [str(row["tokens_per_image"]), str(row["features_per_image"])]
        cells += [f"{row['s_per_image']:.3f} s", f"{row['encoder_s_per_image']:.4f} s", f"{row['step_s']:.3f} s"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, help="toy-world recipe folder: its base/model and data/")
    parser.add_argument("--start", help="model stage 1 starts from (default: RECIPE/base/model)")
    parser.add_argument("--data", type=Path, help="toy-world dataset folder (default: RECIPE/data)")
    parser.add_argument("--cache", type=Path, help="feature cache folder (default: temporary)")
    parser.add_argument("--work", type=Path, help="where the variants' start models and runs go (default: temporary)")
    parser.add_argument("--steps", type=int, default=600, help="stage-1 steps per variant (the recipe's 600)")
    parser.add_argument("--samples", type=int, default=48, help="held-out images per canvas size")
    parser.add_argument("--merge-ratio", type=float, default=0.5, help="token_merge ratio of the merging variant")
    parser.add_argument("--max-image-tokens", type=int, help="image_input.max_image_tokens of the AnyRes variants")
    parser.add_argument("--connector", help="input projector name (default: the starting model's)")
    parser.add_argument("--options", help="its options as JSON (with --connector)")
    parser.add_argument("--inline", action="store_true", help="drop gated cross-attention: features spliced inline")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny preset, sample data, 2 steps")
    parser.add_argument("--out", type=Path, help="write the JSON results here too")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.quick:
            from toyworld.sample_configs import write_sample

            data = write_sample(tmp / "data", size=4)
            start, stage1 = args.start or "tiny", data / "stage1.yaml"
            args.steps, args.samples, args.max_new_tokens = 2, 2, 8
            if args.connector is None:
                args.connector, args.options = QUICK_CONNECTOR[0], json.dumps(QUICK_CONNECTOR[1])
        else:
            if args.recipe is None and (args.start is None or args.data is None):
                parser.error("give --recipe, or --start and --data (or --quick)")
            start = args.start or str(args.recipe / "base" / "model")
            data, stage1 = args.data or args.recipe / "data", STAGE1
        table = run_variants(args, start, Path(data), stage1, args.cache or tmp / "cache", args.work or tmp / "work")
    settings = {
        "start": start,
        "steps": args.steps,
        "held_out_per_canvas": args.samples,
        "canvases": [f"{w}x{h}" for w, h in CANVASES],
        "merge_ratio": args.merge_ratio,
        "max_image_tokens": args.max_image_tokens,
        "inline": args.inline,
        "quick": args.quick,
    }
    results = {"toy_world_anyres": table, "settings": settings, "markdown": markdown(table)}
    print(markdown(table))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
