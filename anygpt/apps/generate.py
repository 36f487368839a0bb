"""``anygpt generate``: a prompt, or a JSONL batch of them, answered with text and media files.

    anygpt generate PROMPT [--image P]... [--audio P]... [--video P]... [--model NAME|DIR] [--out DIR] [--json]
    anygpt generate --batch prompts.jsonl --out DIR
        [--device cuda --dtype bfloat16 --offload model --quantize 4bit --compile]

Every step is a typed function that can also be called from Python (``generate``, ``read_batch``, ``generate_batch``,
``write_outputs``); each request is a ``GenerationRequest``. Bad input raises ``UsageError`` naming the problem
(the batch file's line too), before any model is loaded; nothing half-written is left in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from anygpt.apps.outputs import save_outputs
from anygpt.apps.runtime_args import add_runtime_arguments, runtime_options
from anygpt.base.errors import UsageError
from anygpt.base.modality import MEDIA_MODALITIES
from anygpt.base.utils import sweep_stale_temporaries
from anygpt.core.config import DEFAULT_MODEL
from anygpt.core.pipeline import AnyGPTPipeline
from anygpt.core.request import GenerationRequest
from anygpt.core.runtime import RuntimeOptions

logger = logging.getLogger(__name__)

COMMANDS = {"generate": "generate text and media from a prompt (or a batch of prompts)"}

BATCH_DEFAULTS = {"seed": 0}
"""What a batch line leaves out takes the command line's defaults (a fixed seed), not the pipeline's (no seed)."""


# ---------------------------------------------------------------------------------------------------- the work
def load_pipeline(model: str, runtime: RuntimeOptions | None = None) -> AnyGPTPipeline:
    """``AnyGPTPipeline.from_pretrained(model, runtime=runtime)``."""
    return AnyGPTPipeline.from_pretrained(model, runtime=runtime)


def generate(
    request: GenerationRequest,
    *,
    model: str = DEFAULT_MODEL,
    out: str | os.PathLike = "outputs",
    pipe: AnyGPTPipeline | None = None,
    runtime: RuntimeOptions | None = None,
) -> dict[str, Any]:
    """Answer one request and write its files into ``out`` (named ``request.id`` or the next ``gen-NNNN``).

    Returns:
        ``{"text": str, "images": [path], "videos": [path], "audios": [path]}``.
    """
    request.validate()
    check_files(request)
    out = _output_folder(out)
    pipe = pipe if pipe is not None else load_pipeline(model, runtime)
    result = pipe.run(request, show_progress=False)
    return {"text": result.text, **write_outputs(result, out, request.id or _next_stem(out))}


def read_batch(path: str | os.PathLike) -> list[GenerationRequest]:
    """Parse and validate a JSONL batch file: one ``GenerationRequest.to_dict()`` object a line (``seed`` 0 when left
    out). Media paths resolve against the file's folder. Every line is checked before any generation starts.

    Raises:
        UsageError: naming ``FILE:LINE``, the field, what was expected and what was found.
    """
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
        if isinstance(data, dict):
            data = {**BATCH_DEFAULTS, **_resolve_media(data, path.parent)}
            if isinstance(data.get("id"), int) and not isinstance(data["id"], bool):
                data["id"] = str(data["id"])
        request = GenerationRequest.from_dict(data, origin=where)
        if request.id is not None:
            if request.id in ids:
                raise UsageError(f"{where}id {request.id!r} is used by an earlier line too")
            ids.add(request.id)
        check_files(request)
        requests.append(request)
    if not requests:
        raise UsageError(f"--batch {path}: no requests in the file")
    return requests


def generate_batch(
    requests: list[GenerationRequest],
    *,
    model: str = DEFAULT_MODEL,
    out: str | os.PathLike = "outputs",
    pipe: AnyGPTPipeline | None = None,
    modalities: str | None = None,
    runtime: RuntimeOptions | None = None,
    batch_size: int = 1,
) -> list[dict[str, Any]]:
    """Answer many requests with a progress bar; each result is appended to ``out/results.jsonl`` as it finishes.

    Every request is checked against the model (``pipe.check_inputs``) before the first one runs.

    Args:
        modalities: the output modalities of the requests that leave them at ``"auto"``.
        batch_size: requests answered together (``AnyGPTPipeline.run_batch``); 1 answers them one by one,
            bit-identical to single calls.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"--batch-size: expected an integer >= 1, got {batch_size!r}")
    out = _output_folder(out)
    pipe = pipe if pipe is not None else load_pipeline(model, runtime)
    for request in requests:
        if modalities is not None and request.modalities == "auto":
            request.modalities = modalities
        pipe.check_inputs(request)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    with open(out / "results.jsonl", "a") as log, tqdm(total=len(requests), desc="generate", unit="prompt") as bar:
        for start in range(0, len(requests), batch_size):
            chunk = requests[start : start + batch_size]
            answers = [pipe.run(chunk[0], show_progress=False)] if batch_size == 1 else pipe.run_batch(chunk)
            for request, result in zip(chunk, answers, strict=True):
                stem = request.id or _next_stem(out)
                record = {"id": stem, "prompt": request.prompt, "text": result.text, **write_outputs(result, out, stem)}
                log.write(json.dumps(record) + "\n")
                log.flush()
                results.append(record)
            bar.update(len(chunk))
    return results


def write_outputs(result, out: Path, stem: str) -> dict[str, list[str]]:
    """Write a result's media as PNG / MP4 / WAV files named ``{stem}_{kind}{i}``, all or nothing.

    Returns:
        ``{"images": [path], "videos": [path], "audios": [path]}``.
    """
    written = save_outputs(result, out, stem)
    return {modality.plural: [str(p) for p in paths] for modality, paths in written.items()}


def check_files(request: GenerationRequest) -> None:
    """Every media path of the request names a file (checked before a model is loaded).

    Raises:
        UsageError: ``--image PATH: expected a readable file, found nothing`` (after the batch line, if any).
    """
    for modality in MEDIA_MODALITIES:
        for item in request.media(modality):
            if not isinstance(item, str | os.PathLike):
                continue
            path = Path(item).expanduser()
            if not path.is_file():
                found = "a folder" if path.is_dir() else "nothing"
                raise UsageError(f"{request.origin}--{modality.value} {item}: expected a readable file, found {found}")


def _resolve_media(data: dict[str, Any], folder: Path) -> dict[str, Any]:
    """A batch line's relative media paths, resolved against the batch file's folder (one path may stand alone)."""
    data = dict(data)
    for modality in MEDIA_MODALITIES:
        value = data.get(modality.plural)
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            data[modality.plural] = [str(folder / Path(v).expanduser()) if isinstance(v, str) else v for v in value]
    return data


def _output_folder(out: str | os.PathLike) -> Path:
    """``--out`` as a folder path, checked, and cleared of the temporaries of killed earlier runs."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: expected a folder, found a file")
    sweep_stale_temporaries(out)
    return out


def _next_stem(out: Path) -> str:
    taken = {int(m.group(1)) for p in out.glob("gen-*") if (m := re.match(r"gen-(\d+)_", p.name))}
    return f"gen-{(max(taken) + 1) if taken else 1:04d}"


# ---------------------------------------------------------------------------------------------------- the command
def add_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    """The options of ``anygpt generate``."""
    parser.add_argument("prompt", nargs="?", help="the prompt text (omit with --batch)")
    parser.add_argument("--batch", help="JSONL file: one request object a line")
    parser.add_argument(
        "--batch-size", type=int, default=1, help="with --batch: requests answered together (default 1: one by one)"
    )
    for modality in MEDIA_MODALITIES:
        parser.add_argument(
            f"--{modality.value}",
            dest=modality.plural,
            action="append",
            default=[],
            help=f"input {modality.value} file (repeatable)",
        )
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"preset name or saved folder (default {DEFAULT_MODEL})")
    parser.add_argument("--modalities", default="auto", help="auto, or a comma list of image,video,audio")
    parser.add_argument("--out", default="outputs", help="output folder (default ./outputs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="decoder inference steps")
    parser.add_argument("--guidance", type=float, default=None, help="decoder guidance scale")
    parser.add_argument("--height", type=int, default=None, help="image and video height (a multiple of 8)")
    parser.add_argument("--width", type=int, default=None, help="image and video width (a multiple of 8)")
    parser.add_argument("--frames", type=int, default=None, help="video frames")
    parser.add_argument("--audio-seconds", type=float, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument(
        "--adapters", default=None, help="LoRA adapters of a per-modality model: a name or a comma list (combined)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object (batch: one line per prompt)")
    add_runtime_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Run ``anygpt generate``: print the text and the paths (or JSON)."""
    runtime = runtime_options(args)
    if args.batch and args.prompt:
        raise UsageError("give either a PROMPT or --batch FILE, not both")
    if args.batch:
        requests = read_batch(args.batch)
        forced = None if args.modalities == "auto" else args.modalities
        batch = generate_batch(
            requests, model=args.model, out=args.out, modalities=forced, runtime=runtime, batch_size=args.batch_size
        )
        for record in batch:
            print(json.dumps(record) if args.json else f"{record['id']}: {record['text']!r} -> {_paths(record)}")
        return 0
    if args.prompt is None:
        raise UsageError("generate: a PROMPT or --batch FILE is required")
    result = generate(request_from_args(args), model=args.model, out=args.out, runtime=runtime)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"text: {result['text']}")
        for modality in MEDIA_MODALITIES:
            for path in result[modality.plural]:
                print(f"{modality.value}: {path}")
    return 0


def request_from_args(args: argparse.Namespace) -> GenerationRequest:
    """The ``GenerationRequest`` of ``anygpt generate PROMPT ...``."""
    return GenerationRequest(
        prompt=args.prompt,
        images=args.images,
        audios=args.audios,
        videos=args.videos,
        modalities=args.modalities,
        adapters=args.adapters,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        height=args.height,
        width=args.width,
        num_frames=args.frames,
        audio_seconds=args.audio_seconds,
    )


def _paths(record: dict[str, Any]) -> str:
    return ", ".join(p for m in MEDIA_MODALITIES for p in record[m.plural]) or "(no media)"
