"""End-to-end ``pipe(...)`` time against (a) the sum of its parts called directly and (b) a baseline that reloads
every decoder on every call (what NExT-GPT does), measured side by side in one run.

    python benchmarks/bench_pipeline.py [--model tiny] [--repeats 5] [--steps 3] [--json]

Reported as ratios, which carry over between machines better than seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from anygpt import AnyGPTPipeline, Conversation
from anygpt.modality import Modality

PROMPT = "draw a red circle and play a high beep and show a green square moving left"


def _time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    pipe = AnyGPTPipeline.from_pretrained(args.model)
    modalities = list(pipe.decoders)
    gen = dict(seed=0, max_new_tokens=args.max_new_tokens, num_inference_steps=args.steps, show_progress=False)

    def end_to_end():
        return pipe(PROMPT, modalities=modalities, **gen)

    end_to_end()  # warm-up: loads every decoder once

    # the same work, each part called directly: LLM generate, one forward for the hidden states, projectors,
    # and each diffusers pipeline with the same prompt_embeds
    def parts():
        conv = Conversation(template=pipe.config.llm.template)
        conv.add_user(PROMPT)
        with torch.no_grad():
            input_ids, embeds = pipe.build_inputs(conv)
            generated, cache = pipe.generate_tokens(
                embeds, forced=set(modalities), max_new_tokens=args.max_new_tokens, temperature=0.0, top_p=1.0
            )
            cond = pipe.signal_conditioning(input_ids, embeds, generated, cache)
            for i, (modality, c) in enumerate(cond.items()):
                decoder = pipe.decoders[modality]
                negative = decoder.empty_caption_embedding().to(c).expand_as(c)
                kwargs = dict(
                    prompt_embeds=c,
                    negative_prompt_embeds=negative,
                    num_inference_steps=args.steps,
                    generator=torch.Generator().manual_seed(i),
                )
                if modality is Modality.AUDIO:
                    kwargs["audio_length_in_s"] = decoder.config.audio_seconds
                else:
                    kwargs.update(height=decoder.config.height, width=decoder.config.width)
                if modality is Modality.VIDEO:
                    kwargs["num_frames"] = decoder.config.num_frames
                decoder.pipeline(**kwargs)

    def reload_every_call():
        for decoder in pipe.decoders.values():
            decoder.unload()
        return end_to_end()

    t_e2e = _time(end_to_end, args.repeats)
    t_parts = _time(parts, args.repeats)
    t_reload = _time(reload_every_call, args.repeats)
    end_to_end()  # leave the decoders loaded
    report = {
        "model": args.model,
        "repeats": args.repeats,
        "steps": args.steps,
        "modalities": [m.value for m in modalities],
        "end_to_end_s": round(t_e2e, 4),
        "sum_of_parts_s": round(t_parts, 4),
        "reload_every_call_s": round(t_reload, 4),
        "end_to_end_over_parts": round(t_e2e / t_parts, 3),
        "reload_over_end_to_end": round(t_reload / t_e2e, 3),
    }
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key:>24}: {value}")


if __name__ == "__main__":
    main()
