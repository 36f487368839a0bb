"""Real-size benchmark with random weights (nothing downloaded): the released widths of every component, measured
side by side in one run and reported as ratios.

    python benchmarks/bench_realsize.py --layers 1 --size 64 --frames 2 --steps 2 --tokens 4   # CPU: reduced depth
    python benchmarks/bench_realsize.py --full --device cuda --json out.json --markdown out.md  # a GPU: full size

What is built: ImageBind-huge's widths, Vicuna-7B's widths (the LLM's vocabulary is the tiny byte tokenizer's, so its
embedding and LM-head tables are small: a real 32k table adds about 0.13 GFLOP per token), the projectors of
``nextgpt-7b``, and the released decoders' architectures (``decoders.architectures``: hand-written configs); ``--layers
N`` keeps at most N layers per stack (same widths), ``--full`` keeps them all.

Measured: encoder seconds per item; LLM tokens per second; each decoder's seconds per call and per denoising step;
the end-to-end call against the sum of its parts (overhead ratio); a stage-1 training step (input projector, LLM
forward and backward) with encoder features from the feature cache against encoding every step; on CUDA the peak
memory of a call under each offload plan (``torch.cuda.max_memory_allocated``), beside ``anygpt.core.memory``'s
estimate. On the CPU the peaks are not measured (no allocator statistics); the estimates are printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from anygpt import AnyGPTPipeline
from anygpt.base.media import save_image
from anygpt.base.modality import Modality
from anygpt.core.config import config_from_preset
from anygpt.core.llm import architecture_config
from anygpt.core.memory import memory_report
from anygpt.core.runtime import RuntimeOptions
from decoders.architectures import released_components
from training.cache import MediaFeatureCache
from training.data.records import MediaFile

PROMPT = "draw a red circle and play a high beep and show a green square moving left"


def _time(fn, repeats: int = 1) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _step_time(decoder, cond: torch.Tensor, settings: dict) -> float:
    """Median time between consecutive denoising steps of one call (timestamps from ``callback_on_step_end``), so
    that loading, text encoding and the VAE decode are not counted; the whole call over its steps when it has one."""
    stamps = []

    def on_step(pipe, step, timestep, callback_kwargs):
        stamps.append(time.perf_counter())
        return callback_kwargs

    start = time.perf_counter()
    decoder.generate(cond, callback_on_step_end=on_step, **settings)
    if len(stamps) < 2:
        return (time.perf_counter() - start) / max(1, len(stamps))
    return statistics.median(b - a for a, b in zip(stamps[:-1], stamps[1:], strict=True))


def build_pipeline(
    layers: int | None, dtype: str, device: str, decoders: tuple[str, ...] = ("image", "video", "audio")
) -> AnyGPTPipeline:
    """``nextgpt-7b``'s widths with random weights, at most ``layers`` layers per stack, with the given decoders."""
    config = config_from_preset("nextgpt-7b")
    config.decoders = {name: c for name, c in config.decoders.items() if name in decoders}
    depth = {}
    if layers is not None:
        depth = {f"{t}_num_blocks": layers for t in ("vision", "text", "audio", "depth", "thermal", "imu")}
    config.encoder = dataclasses.replace(config.encoder, pretrained=False, checkpoint=None, **depth)
    arch = architecture_config(config.llm.source, layers=layers)
    config.llm = dataclasses.replace(
        config.llm,
        source="tiny",
        hidden_size=arch.hidden_size,
        num_layers=arch.num_hidden_layers,
        num_heads=arch.num_attention_heads,
        intermediate_size=arch.intermediate_size,
    )
    sources = {}
    for name, decoder in config.decoders.items():
        sources[name] = decoder.source
        config.decoders[name] = dataclasses.replace(decoder, source="tiny")
    pipe = AnyGPTPipeline.from_config(config)
    for name, source in sources.items():
        decoder = pipe.decoders[Modality(name)]
        decoder.adopt(
            decoder.pipeline_class(**{**released_components(source, layers=layers), **decoder.pipeline_options})
        )
    return pipe.apply_runtime(RuntimeOptions(device=device, dtype=dtype))


def measure(args) -> dict:
    torch.manual_seed(0)
    layers = None if args.full else args.layers
    start = time.perf_counter()
    pipe = build_pipeline(layers, args.dtype, args.device, tuple(args.decoders.split(",")))
    results: dict = {"layers": layers or "full", "dtype": args.dtype, "device": args.device}
    results["build_s"] = time.perf_counter() - start
    settings = dict(num_inference_steps=args.steps, height=args.size, width=args.size, show_progress=False)
    video = dict(settings, num_frames=args.frames)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (args.size, args.size, 3), dtype=np.uint8))

    # encoder, per item
    pipe.model.encoder.encode("image", [image])  # warm-up
    results["encoder_s_per_image"] = _time(lambda: pipe.model.encoder.encode("image", [image]), args.repeats)

    # LLM tokens per second (greedy, a fixed number of new tokens)
    llm = pipe.model.language_model
    prompt = torch.randint(4, 200, (1, 32), device=pipe.device)

    def generate():
        llm.generate(
            input_ids=prompt, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False, pad_token_id=0
        )

    generate()
    results["llm_tokens_per_s"] = args.tokens / _time(generate, args.repeats)

    # decoders: per call and per step
    parts = {}
    for modality, decoder in pipe.decoders.items():
        cond = torch.randn(1, *decoder.spec.cond_shape, device=pipe.device)
        kw = video if modality is Modality.VIDEO else settings
        one = dict(kw, num_inference_steps=1, audio_seconds=args.audio_seconds)
        many = dict(kw, audio_seconds=args.audio_seconds)
        decoder.generate(cond, **one)  # warm-up (loads the empty-caption embedding)
        tn = _time(lambda d=decoder, c=cond, o=many: d.generate(c, **o), args.repeats)
        results[f"{modality.value}_s_per_call"] = tn
        results[f"{modality.value}_s_per_step"] = _step_time(decoder, cond, many)
        parts[modality.value] = tn

    # end to end against the sum of its parts
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "in.png"
        save_image(image, path)
        kwargs = dict(
            images=[str(path)], modalities=[m.value for m in pipe.decoders], seed=0, max_new_tokens=args.tokens,
            num_inference_steps=args.steps, height=args.size, width=args.size, num_frames=args.frames,
            audio_seconds=args.audio_seconds, show_progress=False,
        )  # fmt: skip
        end_to_end = _time(lambda: pipe(PROMPT, **kwargs), args.repeats)
        parts_sum = results["encoder_s_per_image"] + args.tokens / results["llm_tokens_per_s"] + sum(parts.values())
        results["end_to_end_s"] = end_to_end
        results["end_to_end_overhead_ratio"] = end_to_end / parts_sum

        # stage-1 training step: features from the cache (warm) against encoding every step
        results.update(_training(pipe, path, Path(tmp) / "cache"))

    if torch.device(args.device).type == "cuda":
        results["peak_gib"] = _peaks(pipe, kwargs, args.device)
    estimates = memory_report("nextgpt-7b").plans
    results["estimated_peak_gib_full_size"] = {p.runtime.describe(): round(p.peak_gib, 2) for p in estimates}
    return results


def _training(pipe: AnyGPTPipeline, image_path: Path, cache_dir: Path) -> dict:
    model = pipe.model
    projector = model.input_projectors["image"]
    projector.requires_grad_(True)
    optimizer = torch.optim.AdamW(projector.parameters(), lr=1e-4)
    llm = model.language_model
    item = MediaFile(Modality.IMAGE, image_path, "bench/in.png")
    ids = torch.randint(4, 200, (1, 16), device=model.device)

    def step(cache: MediaFeatureCache) -> None:
        embeds, tokens = cache.get([item])[0]
        feature = model.project_media(Modality.IMAGE, embeds[None].to(model.device), None)  # (1, K, H)
        text = llm.get_input_embeddings()(ids)
        inputs = torch.cat([feature.to(text.dtype), text], dim=1)
        labels = torch.cat([torch.full(feature.shape[:2], -100, device=ids.device), ids], dim=1)
        loss = llm(inputs_embeds=inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    cached = MediaFeatureCache(cache_dir, model.encoder)
    step(cached)  # fills the cache
    uncached = MediaFeatureCache(None, model.encoder)
    with_cache = _time(lambda: step(cached), 2)
    without = _time(lambda: step(uncached), 2)
    projector.requires_grad_(False)
    return {
        "train_step_s_with_cache": with_cache,
        "train_step_s_without_cache": without,
        "feature_cache_speedup": without / with_cache,
    }


def _peaks(pipe: AnyGPTPipeline, kwargs: dict, device: str) -> dict:
    peaks = {}
    for plan in ("none", "decoders", "model", "sequential"):
        pipe.apply_runtime(RuntimeOptions(device=device, dtype=pipe.runtime.dtype, offload=plan))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        pipe(PROMPT, **kwargs)
        peaks[plan] = torch.cuda.max_memory_allocated() / 1024**3
        pipe.remove_offload()
    return peaks


def _markdown(results: dict) -> str:
    rows = ["| measure | value |", "|---|---|"]
    for key, value in results.items():
        if isinstance(value, dict):
            value = "; ".join(f"{k}: {v:.2f}" for k, v in value.items())
        elif isinstance(value, float):
            value = f"{value:.4g}"
        rows.append(f"| {key} | {value} |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=1, help="layers per stack (same widths); ignored with --full")
    parser.add_argument("--full", action="store_true", help="every layer (a GPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--size", type=int, default=64, help="image and video side in pixels")
    parser.add_argument("--frames", type=int, default=2)
    parser.add_argument("--audio-seconds", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=4)
    parser.add_argument("--decoders", default="image,video,audio", help="comma-separated output modalities")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    if args.full and (args.size, args.frames) == (64, 2):
        args.size, args.frames, args.steps, args.tokens, args.audio_seconds = 512, 24, 50, 64, 5.0
    if args.dtype is None:
        args.dtype = "float16" if torch.device(args.device).type == "cuda" else "float32"
    results = measure(args)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(_markdown(results))
    return results


if __name__ == "__main__":
    main()
