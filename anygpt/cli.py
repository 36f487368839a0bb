"""The ``anygpt`` command line.

    anygpt generate PROMPT [--image P]... [--audio P]... [--video P]... [--model NAME|DIR] [--out DIR] [--json]
    anygpt generate --batch prompts.jsonl --out DIR
    anygpt info [presets|projectors|decoders]

Every subcommand is a typed function that can also be called from Python (``generate``, ``generate_batch``).
Bad input exits with status 2 and one line naming the problem; nothing half-written is left in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from anygpt.base.errors import UsageError
from anygpt.core.config import DEFAULT_MODEL

logger = logging.getLogger("anygpt.cli")


@dataclass
class GenerateRequest:
    """One generation job (a command-line call or one line of a batch file)."""

    prompt: str
    images: list[str] = field(default_factory=list)
    audios: list[str] = field(default_factory=list)
    videos: list[str] = field(default_factory=list)
    modalities: str | list[str] = "auto"
    seed: int | None = 0
    steps: int | None = None
    guidance: float | None = None
    frames: int | None = None
    audio_seconds: float | None = None
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    adapters: str | list[str] | None = None
    id: str | None = None
    origin: str = field(default="", repr=False, compare=False)  # "FILE:LINE: " for error messages, not a field

    def validate(self) -> None:
        """Check every field's type and range; raise ``UsageError`` naming the field (and the batch line)."""
        where = self.origin

        def fail(name: str, expected: str) -> None:
            raise UsageError(f"{where}'{name}' must be {expected}, got {getattr(self, name)!r}")

        if not isinstance(self.prompt, str):
            fail("prompt", "a string")
        for name in ("images", "audios", "videos"):
            value = getattr(self, name)
            if not isinstance(value, list) or not all(isinstance(v, str | os.PathLike) for v in value):
                fail(name, "a list of file paths")
        if not isinstance(self.modalities, str) and not (
            isinstance(self.modalities, list) and all(isinstance(m, str) for m in self.modalities)
        ):
            fail("modalities", "'auto', a comma-separated string or a list of names")
        if self.adapters is not None and not (
            isinstance(self.adapters, str)
            or (isinstance(self.adapters, list) and all(isinstance(a, str) for a in self.adapters))
        ):
            fail("adapters", "a comma-separated string or a list of LoRA adapter names")
        for name, minimum in (("seed", 0), ("steps", 1), ("frames", 1), ("max_new_tokens", 1)):
            value = getattr(self, name)
            if value is None and name != "max_new_tokens":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                fail(name, f"an integer >= {minimum}")
        for name in ("guidance", "audio_seconds", "temperature", "top_p"):
            value = getattr(self, name)
            if value is None and name in ("guidance", "audio_seconds"):
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                fail(name, "a finite number")
        if self.id is not None and not (isinstance(self.id, str) and re.fullmatch(r"[A-Za-z0-9._-]+", self.id)):
            fail("id", "a name of letters, digits, '.', '_' and '-'")
        if self.id in (".", ".."):
            fail("id", "a file-name stem")


BATCH_FIELDS = {f.name for f in fields(GenerateRequest)} - {"origin"}


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: expected a folder, found a file")


def _check_files(request: GenerateRequest, where: str = "") -> None:
    for kind in ("images", "audios", "videos"):
        for p in getattr(request, kind):
            path = Path(p).expanduser()
            if not path.is_file():
                found = "a folder" if path.is_dir() else "nothing"
                raise UsageError(f"{where}--{kind[:-1]} {p}: expected a readable file, found {found}")


def _next_stem(out: Path) -> str:
    taken = {int(m.group(1)) for p in out.glob("gen-*") if (m := re.match(r"gen-(\d+)_", p.name))}
    return f"gen-{(max(taken) + 1) if taken else 1:04d}"


def write_outputs(result, out: Path, stem: str) -> dict[str, list[str]]:
    """Write a result's media as PNG / MP4 / WAV files named ``{stem}_{kind}{i}``; all or nothing."""
    from anygpt.base.media import save_audio, save_image, save_video

    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    paths: dict[str, list[str]] = {"images": [], "videos": [], "audios": []}
    jobs = [("images", "image", ".png", save_image, item) for item in result.images]
    jobs += [("videos", "video", ".mp4", save_video, item) for item in result.videos]
    jobs += [("audios", "audio", ".wav", save_audio, item) for item in result.audios]
    counters: dict[str, int] = {}
    try:
        for key, kind, ext, save, item in jobs:
            index = counters.get(kind, 0)
            counters[kind] = index + 1
            path = out / f"{stem}_{kind}{index}{ext}"
            save(item, path)
            written.append(path)
            paths[key].append(str(path))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return paths


def generate(
    request: GenerateRequest, *, model: str = DEFAULT_MODEL, out: str | os.PathLike = "outputs", pipe=None
) -> dict:
    """Run one request and write its files. Returns ``{"text", "images", "videos", "audios"}`` (paths)."""
    request.validate()
    _check_files(request)
    out = Path(out).expanduser()
    _check_out(out)
    pipe = pipe if pipe is not None else load_pipeline(model)
    result = _run(pipe, request)
    paths = write_outputs(result, out, request.id or _next_stem(out))
    return {"text": result.text, **paths}


def _run(pipe, request: GenerateRequest):
    return pipe(
        request.prompt,
        images=request.images,
        audios=request.audios,
        videos=request.videos,
        modalities=request.modalities,
        seed=request.seed,
        max_new_tokens=request.max_new_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        num_inference_steps=request.steps,
        guidance_scale=request.guidance,
        num_frames=request.frames,
        audio_seconds=request.audio_seconds,
        adapters=request.adapters,
        show_progress=False,
    )


def read_batch(path: str | os.PathLike) -> list[GenerateRequest]:
    """Parse and validate a JSONL batch file (one request object a line). Media paths resolve against the file's
    folder. Every line is checked before any generation starts."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UsageError(f"--batch {path}: expected a JSONL file, found {'a folder' if path.is_dir() else 'nothing'}")
    requests = []
    ids: set[str] = set()
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}: "
        try:
            data = json.loads(line)
        except json.JSONDecodeError as err:
            raise UsageError(f"{where}not valid JSON ({err.msg})") from None
        if not isinstance(data, dict) or not isinstance(data.get("prompt"), str):
            raise UsageError(f"{where}expected an object with a string 'prompt'")
        unknown = set(data) - BATCH_FIELDS
        if unknown:
            raise UsageError(f"{where}unknown fields {sorted(unknown)}; allowed: {sorted(BATCH_FIELDS)}")
        for kind in ("images", "audios", "videos"):
            value = data.get(kind, [])
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise UsageError(f"{where}'{kind}' must be a list of file paths")
            data[kind] = [str(path.parent / Path(v).expanduser()) for v in value]
        if data.get("id") is not None:
            data["id"] = str(data["id"])
            if data["id"] in ids:
                raise UsageError(f"{where}'id' {data['id']!r} is used by an earlier line too")
            ids.add(data["id"])
        request = GenerateRequest(**data, origin=where)
        request.validate()
        _check_files(request, where)
        requests.append(request)
    if not requests:
        raise UsageError(f"--batch {path}: no requests in the file")
    return requests


def generate_batch(
    requests: list[GenerateRequest],
    *,
    model: str = DEFAULT_MODEL,
    out: str | os.PathLike = "outputs",
    pipe=None,
    modalities: str | None = None,
) -> list[dict]:
    """Run many requests with a progress bar; each result is appended to ``out/results.jsonl`` as it finishes."""
    from tqdm.auto import tqdm

    out = Path(out).expanduser()
    _check_out(out)
    pipe = pipe if pipe is not None else load_pipeline(model)
    out.mkdir(parents=True, exist_ok=True)
    for request in requests:
        request.validate()
        if modalities is not None and request.modalities == "auto":
            request.modalities = modalities
        try:
            pipe.parse_modalities(request.modalities)  # validate every line before generating anything
        except ValueError as err:
            raise UsageError(f"{request.origin}{err}") from None
    results = []
    with open(out / "results.jsonl", "a") as log:
        for request in tqdm(requests, desc="generate", unit="prompt"):
            result = _run(pipe, request)
            stem = request.id or _next_stem(out)
            record = {
                "id": stem,
                "prompt": request.prompt,
                "text": result.text,
                **write_outputs(result, out, stem),
            }
            log.write(json.dumps(record) + "\n")
            log.flush()
            results.append(record)
    return results


def load_pipeline(model: str):
    from anygpt.core.pipeline import AnyGPTPipeline

    return AnyGPTPipeline.from_pretrained(model)


def info(topic: str = "all") -> dict[str, list[str]]:
    """The registered names: model presets, projectors, decoders, encoders."""
    from anygpt.core.config import list_presets
    from decoders import list_decoder_presets
    from encoders import list_encoder_presets
    from projectors import list_input_projectors, list_output_projectors

    table = {
        "presets": list_presets(),
        "input_projectors": list_input_projectors(),
        "output_projectors": list_output_projectors(),
        "decoders": list_decoder_presets(),
        "encoders": list_encoder_presets(),
    }
    if topic == "all":
        return table
    if topic == "projectors":
        return {k: v for k, v in table.items() if k.endswith("projectors")}
    if topic not in table:
        raise UsageError(f"info: unknown topic {topic!r}; expected all, presets, projectors, decoders or encoders")
    return {topic: table[topic]}


def _describe_projectors() -> str:
    from projectors import describe_projectors

    lines = []
    for side in ("input", "output"):
        lines.append(f"\n{side} projectors (training: --set {side}_projector=NAME):")
        for name, summary in describe_projectors(side).items():
            lines.append(f"  {name:<12} {summary}")
    lines.append("\nfusion (training: --set cross_attention.every=4):")
    lines.append(
        "  cross_attention  Flamingo's gated cross-attention blocks y = x + tanh(g) * xattn(x, media), g = 0 at start, "
        "before every k-th LLM layer, reading the input projector's output (instead of or beside splicing it in)."
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- argument parsing
def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anygpt", description="Any-to-any multimodal generation.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text and media from a prompt (or a batch of prompts)")
    gen.add_argument("prompt", nargs="?", help="the prompt text (omit with --batch)")
    gen.add_argument("--batch", help="JSONL file: one request object a line")
    gen.add_argument("--image", action="append", default=[], help="input image file (repeatable)")
    gen.add_argument("--audio", action="append", default=[], help="input audio file (repeatable)")
    gen.add_argument("--video", action="append", default=[], help="input video file (repeatable)")
    gen.add_argument("--model", default=DEFAULT_MODEL, help=f"preset name or saved folder (default {DEFAULT_MODEL})")
    gen.add_argument("--modalities", default="auto", help="auto, or a comma list of image,video,audio")
    gen.add_argument("--out", default="outputs", help="output folder (default ./outputs)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--steps", type=int, default=None, help="decoder inference steps")
    gen.add_argument("--guidance", type=float, default=None, help="decoder guidance scale")
    gen.add_argument("--frames", type=int, default=None, help="video frames")
    gen.add_argument("--audio-seconds", type=float, default=None)
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument(
        "--adapters", default=None, help="LoRA adapters of a per-modality model: a name or a comma list (combined)"
    )
    gen.add_argument("--json", action="store_true", help="print one JSON object (batch: one line per prompt)")

    inf = sub.add_parser("info", help="list presets, projectors, decoders and encoders")
    inf.add_argument("topic", nargs="?", default="all")

    from training.cli import add_commands

    add_commands(sub)
    return parser


def _cmd_generate(args: argparse.Namespace) -> None:
    if args.batch and args.prompt:
        raise UsageError("give either a PROMPT or --batch FILE, not both")
    if args.batch:
        requests = read_batch(args.batch)
        forced = None if args.modalities == "auto" else args.modalities
        for record in generate_batch(requests, model=args.model, out=args.out, modalities=forced):
            print(json.dumps(record) if args.json else f"{record['id']}: {record['text']!r} -> {_paths(record)}")
        return
    if args.prompt is None:
        raise UsageError("generate: a PROMPT or --batch FILE is required")
    request = GenerateRequest(
        prompt=args.prompt,
        images=args.image,
        audios=args.audio,
        videos=args.video,
        modalities=args.modalities,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        frames=args.frames,
        audio_seconds=args.audio_seconds,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        adapters=args.adapters,
    )
    result = generate(request, model=args.model, out=args.out)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"text: {result['text']}")
        for kind in ("images", "videos", "audios"):
            for path in result[kind]:
                print(f"{kind[:-1]}: {path}")


def _paths(record: dict[str, Any]) -> str:
    return ", ".join(p for k in ("images", "videos", "audios") for p in record[k]) or "(no media)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    from training.cli import COMMANDS as TRAINING_COMMANDS

    training = args.command in TRAINING_COMMANDS
    logging.basicConfig(
        level=logging.INFO if (args.verbose or training) else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:  # libraries' deprecation notices are for developers, not for users of the command
        import diffusers
        import transformers

        diffusers.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
        if not training:  # loading bars of the libraries (weights, pipeline components) would bury the result
            diffusers.utils.logging.disable_progress_bar()
            transformers.utils.logging.disable_progress_bar()
    from anygpt.base.media import MediaError
    from training.trainer import TrainingError

    try:
        if args.command == "generate":
            _cmd_generate(args)
        elif training:
            from training.cli import run

            run(args)
        else:
            for key, names in info(args.topic).items():
                print(f"{key}: {', '.join(names)}")
            if args.topic == "projectors":
                print(_describe_projectors())
    except (UsageError, MediaError, ValueError, TypeError, OSError) as err:
        logger.debug("error details", exc_info=True)
        print(f"anygpt: error: {err}".splitlines()[0], file=sys.stderr)
        return 2
    except TrainingError as err:
        print(f"anygpt: training stopped: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("anygpt: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
