"""End-to-end ``pipe(...)`` time against (a) the sum of its parts called directly on the libraries (LLM generate,
one forward pass for the signal hidden states, the output projectors, each diffusers pipeline with the same inputs)
and (b) a baseline that reloads every decoder from disk on every call (what NExT-GPT does), measured side by side
in one run.

    python benchmarks/bench_pipeline.py [--model tiny] [--repeats 5] [--steps 3] [--json]

The decoders are saved once to a temporary folder and loaded from there with diffusers' ``from_pretrained``, so the
reload baseline pays what a real reload pays (reading and building the pipeline), only for smaller weights.
Reported as ratios, which carry over between machines better than seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from anygpt import AnyGPTPipeline, Conversation
from anygpt.base.modality import Modality
from decoders import build_decoder

PROMPT = "draw a red circle and play a high beep and show a green square moving left"


def _time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _decoders_from_disk(pipe: AnyGPTPipeline, folder: Path) -> dict:
    decoders = {}
    for modality, decoder in pipe.decoders.items():
        target = folder / modality.value
        decoder.pipeline.save_pretrained(target)
        decoders[modality] = build_decoder(dataclasses.replace(decoder.config, source=str(target)))
    return decoders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    pipe = AnyGPTPipeline.from_pretrained(args.model)
    tmp = tempfile.TemporaryDirectory()
    pipe.decoders = _decoders_from_disk(pipe, Path(tmp.name))
    modalities = list(pipe.decoders)
    gen = dict(seed=0, max_new_tokens=args.max_new_tokens, num_inference_steps=args.steps, show_progress=False)

    def end_to_end():
        return pipe(PROMPT, modalities=modalities, **gen)

    end_to_end()  # warm-up: loads every decoder once

    model, llm, tokenizer = pipe.model, pipe.model.language_model, pipe.tokenizer
    conv = Conversation(template=pipe.config.llm.template)
    conv.add_user(PROMPT)
    with torch.no_grad():
        _, embeds = pipe.build_inputs(conv)  # the same inputs for the direct calls

    @torch.no_grad()
    def parts():
        out = llm.generate(
            inputs_embeds=embeds,
            attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        ids = [i for i in out[0].tolist() if i not in (tokenizer.eos_token_id, tokenizer.pad_token_id)]
        groups = [model.tokens.signal[m] for m in modalities]
        seq = torch.tensor([ids + [t for g in groups for t in g]])
        table = llm.get_input_embeddings()
        hidden = llm(inputs_embeds=torch.cat([embeds, table(seq)], 1), output_hidden_states=True).hidden_states[-1]
        end = hidden.shape[1] - sum(len(g) for g in groups)
        for i, (modality, group) in enumerate(zip(modalities, groups, strict=True)):
            h = hidden[:, end : end + len(group)]
            end += len(group)
            cond = model.output_projectors[modality.value](h, table(torch.tensor([group])))
            decoder = pipe.decoders[modality]
            if decoder.spec.pooled:
                cond = cond.mean(1)
            kwargs = dict(
                prompt_embeds=cond,
                negative_prompt_embeds=decoder.empty_caption_embedding(),
                num_inference_steps=args.steps,
                guidance_scale=decoder.config.guidance_scale,
                generator=torch.Generator().manual_seed(i),
                output_type="np",
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
    tmp.cleanup()
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key:>24}: {value}")


if __name__ == "__main__":
    main()
