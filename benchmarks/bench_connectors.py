"""The connector zoo compared on the same work, in one run.

Two tables:

* real size: every connector's parameter count with ImageBind-huge features (pooled 1024-d, vision tokens 1280-d on a
  16 x 16 patch grid + CLS) into a 4096-d LLM, built on the meta device (no weights, no memory), and the LLM tokens it
  gives per image and per 8-frame video (ImageBind averages a video's 2-frame clips, so a video has an image's token
  grid);
* toy world: each connector trained through the ordinary stage 1 (``toyworld/configs/toyworld-stage1.yaml``, the same
  data, steps, seed and starting model for all), then the toy-world evaluator's captioning figures (media -> text) on
  the held-out media, and the median stage-1 step time.

    python benchmarks/bench_connectors.py --start RECIPE/base/model --data RECIPE/data [--steps 450] [--samples 96]
    python benchmarks/bench_connectors.py --real-size-only

``--start`` is the model stage 1 starts from: the toy-world recipe's ``base/model`` (``anygpt toyworld recipe OUT
--until base``), or by default the shipped ``toyworld`` model (its own connector is replaced by each one in turn).
``--data`` is a toy-world dataset (``anygpt toyworld data DIR``); by default one is written into a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_training import median_step_time  # the benchmarks' folder is on sys.path when run as a script

from anygpt.core.fusion import CrossAttentionConfig, count_parameters
from anygpt.core.pipeline import AnyGPTPipeline
from encoders import ImageBindConfig, build_imagebind_encoder
from projectors import build_input_projector, get_input_projector_class, list_input_projectors
from toyworld.data import write_world
from toyworld.evaluate import evaluate
from training.config import load_config
from training.trainer import StageTrainer

REPO = Path(__file__).resolve().parents[1]
STAGE1 = REPO / "toyworld" / "configs" / "toyworld-stage1.yaml"

# name -> (registry name, options at the toy world's size (64-d encoder tokens, 128-d LLM), extra run settings)
TOY: dict[str, tuple[str, dict, dict]] = {
    "linear": ("linear", {}, {}),
    "mlp": ("mlp", {}, {}),
    "mlp-patches-2x2": ("mlp", {"source": "tokens", "spatial_pool": 2}, {}),
    "group": (
        "group",
        {"hidden_dim": 64, "num_heads": 4, "num_groups": [32, 8], "depths": [1, 1], "final_depth": 1},
        {},
    ),
    "qformer": (
        "qformer",
        {"num_queries": 8, "hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 256},
        {},
    ),
    "perceiver": ("perceiver", {"num_latents": 8, "hidden_dim": 64, "depth": 2, "num_heads": 4}, {}),
    "perceiver-2x2": (
        "perceiver",
        {"num_latents": 8, "hidden_dim": 64, "depth": 2, "num_heads": 4, "spatial_pool": 2},
        {},
    ),
    "cabstractor": ("cabstractor", {"num_queries": 9, "hidden_dim": 64, "depth": 1}, {}),
    "perceiver+xattn": (
        "perceiver",
        {"num_latents": 8, "hidden_dim": 64, "depth": 2, "num_heads": 4},
        {"cross_attention": {"every": 2, "num_heads": 4}},
    ),
}
# name -> (registry name, options at real size); None options: the class's "real" preset
REAL: dict[str, tuple[str, dict | None]] = {
    "linear": ("linear", None),
    "linear-patches": ("linear", {"source": "tokens"}),
    "mlp": ("mlp", None),
    "mlp-patches": ("mlp", {"source": "tokens"}),
    "mlp-patches-2x2": ("mlp", {"source": "tokens", "spatial_pool": 2}),
    "group": ("group", None),
    "qformer": ("qformer", None),
    "perceiver": ("perceiver", None),
    "perceiver-2x2": ("perceiver", {"spatial_pool": 2}),
    "cabstractor": ("cabstractor", None),
}


def real_size_table() -> dict[str, dict]:
    """Parameters (millions) and tokens per image / 8-frame video of every connector at real size."""
    # the token grid depends only on the preprocessing (224 px, 14 px patches, 2-frame clips), the same at any size
    encoder = build_imagebind_encoder(ImageBindConfig.from_preset("tiny"))
    huge = ImageBindConfig.from_preset("imagebind-huge")
    table = {}
    for name, (registry, options) in REAL.items():
        if registry not in list_input_projectors():
            continue
        cls = get_input_projector_class(registry)
        opts = dict(cls.presets["real"] if options is None else options)
        counts = {}
        for modality in ("image", "video"):
            if cls.uses_grid:
                opts["grid"] = list(encoder.token_grid(modality))
            with torch.device("meta"):
                proj = build_input_projector(
                    registry, in_dim=huge.out_embed_dim, token_dim=huge.vision_embed_dim, out_dim=4096, **opts
                )
            counts[modality] = proj.num_output_tokens
        table[name] = {
            "params_m": round(sum(p.numel() for p in proj.parameters()) / 1e6, 2),
            "tokens_per_image": counts["image"],
            "tokens_per_8_frame_video": counts["video"],
            "reads": "token sequence" if proj.uses_tokens else "pooled embedding",
        }
    # Flamingo's gated cross-attention blocks before every 4th of 32 layers of a 4096-d LLM (32 heads), counted on
    # the meta device; they read a connector's output (e.g. the perceiver's 64 latents) and add one marker token
    xattn = count_parameters(CrossAttentionConfig(every=4, num_heads=32), hidden_size=4096, num_layers=32)
    table["gated-xattn (every 4th of 32 layers)"] = {
        "params_m": round(xattn / 1e6, 2),
        "tokens_per_image": 1,
        "tokens_per_8_frame_video": 1,
        "reads": "a connector's output",
    }
    return table


def toy_world_table(start: str, data: Path, cache: Path, work: Path, steps: int, samples: int, only) -> dict:
    table = {}
    for name, (registry, options, extra) in TOY.items():
        if only and name not in only:
            continue
        sets = [
            f"data_root={data}",
            f"cache_dir={cache}",
            f"input_projector.name={registry}",
            f"input_projector.options={json.dumps(options)}",
            f"train.max_steps={steps}",
            "train.save_every=0",
            "train.log_every=1",
        ]
        for key, value in extra.items():
            sets.append(f"{key}={json.dumps(value)}")
        out = work / name
        started = time.perf_counter()
        try:
            config = load_config(STAGE1, overrides=sets)
            trainer = StageTrainer(config, start=start, output_dir=out)
            final = trainer.train()
        except Exception as err:  # noqa: BLE001 - a connector that cannot run is reported, the others still run
            logging.getLogger(__name__).exception("%s: stage 1 failed", name)
            table[name] = {"error": f"{type(err).__name__}: {err}"}
            continue
        train_s = time.perf_counter() - started
        pipe = AnyGPTPipeline.from_pretrained(final)
        report = evaluate(pipe, samples=samples, tasks=("captioning",), max_new_tokens=32)
        metrics = {k: v["value"] for k, v in report["metrics"].items() if v["value"] is not None}
        table[name] = {
            "tokens_per_item": pipe.model.num_media_tokens(next(iter(pipe.model.tokens.placeholder))),
            "trained_params": sum(p.numel() for p in pipe.model.input_projectors.parameters())
            + sum(p.numel() for p in (pipe.model.cross_attention.parameters() if pipe.model.cross_attention else [])),
            "step_s": round(median_step_time(out, trainer.global_batch, skip=min(5, steps - 1)), 4),
            "train_s": round(train_s, 1),
            **{k: round(v, 4) for k, v in metrics.items()},
            "caption_mean": round(statistics.mean(metrics.values()), 4),
        }
        print(json.dumps({name: table[name]}), flush=True)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--start", default="toyworld", help="model stage 1 starts from (default: shipped toyworld)")
    parser.add_argument("--data", type=Path, help="toy-world dataset folder (default: written to a temp folder)")
    parser.add_argument("--cache", type=Path, help="feature cache folder (default: temporary)")
    parser.add_argument("--steps", type=int, default=450, help="stage-1 steps per connector (the recipe's 450)")
    parser.add_argument("--samples", type=int, default=96, help="held-out media per captioning figure")
    parser.add_argument("--only", help="comma-separated connector rows to run")
    parser.add_argument("--real-size-only", action="store_true")
    parser.add_argument("--out", type=Path, help="write the JSON results here too")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    results = {"real_size": real_size_table()}
    print(json.dumps(results, indent=2), flush=True)
    if not args.real_size_only:
        with tempfile.TemporaryDirectory() as tmp:
            data = args.data
            if data is None:
                data = Path(tmp) / "data"
                write_world(data)
            cache = args.cache or Path(tmp) / "cache"
            only = [s.strip() for s in args.only.split(",")] if args.only else None
            results["toy_world_stage1"] = toy_world_table(
                args.start, Path(data), cache, Path(tmp) / "runs", args.steps, args.samples, only
            )
            results["toy_world_settings"] = {"start": args.start, "steps": args.steps, "samples": args.samples}
    print(json.dumps(results, indent=2))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
