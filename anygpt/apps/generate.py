"""``anygpt generate``: a prompt, or a JSONL batch of them, answered with text and media files.

    anygpt generate PROMPT [--image P]... [--audio P]... [--video P]... [--model NAME|DIR] [--out DIR] [--json]
    anygpt generate --batch prompts.jsonl --out DIR
        [--device cuda --dtype bfloat16 --offload model --quantize 4bit --compile] [-q | -v]

Every step is a typed function that can also be called from Python (``generate``, ``read_batch``, ``generate_batch``,
``write_outputs``); each request is a ``GenerationRequest``. Bad input raises ``UsageError`` naming the problem
(the batch file's line too), before any model is loaded; nothing half-written is left in ``--out``.

A batch file is checked whole before anything runs: every line is parsed and validated (``GenerationRequest``, the
one validation of a request's fields and ranges; files present; ids unique, short and not of the automatic form
``gen-NNNN``), and every problem is reported (``BatchError``, one ``FILE:LINE: message`` each). Then the model loads,
every request is checked against it, and only then are ``results.jsonl`` and the media written.

On the command line a line on stderr says what is loading as soon as the input is checked, then the decoders' (or the
batch's) progress bars follow; ``-q`` keeps stderr for errors. A batch prints each result as soon as it is done.
"""

from __future__ import annotations

import argparse
import codecs
import json
import logging
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from anygpt.apps.info import DEFAULT_MODEL
from anygpt.apps.runtime_args import add_runtime_arguments, runtime_options
from anygpt.base.errors import MediaError, UsageError
from anygpt.base.logs import is_progress_bar_enabled
from anygpt.base.modality import MEDIA_MODALITIES
from anygpt.core.request import GenerationRequest

if TYPE_CHECKING:  # the pipeline (diffusers, transformers) is imported when a model loads, not with the command
    from anygpt.core.pipeline import AnyGPTPipeline
    from anygpt.core.runtime import RuntimeOptions

logger = logging.getLogger(__name__)

COMMANDS = {"generate": "generate text and media from a prompt (or a batch of prompts)"}

BATCH_DEFAULTS = {"seed": 0}
"""What a batch line leaves out takes the command line's defaults (a fixed seed), not the pipeline's (no seed)."""

MAX_ID_LENGTH = 100
"""The longest ``id`` (a file-name stem: ``{id}_image0.png`` must fit the file systems' 255 bytes)."""

AUTOMATIC_ID = re.compile(r"gen-\d+", re.IGNORECASE)
"""The stems given to requests without an ``id`` (``gen-0001``, ...): an explicit ``id`` may not take this form."""


class BatchError(UsageError):
    """A batch file that cannot run. ``messages`` holds every problem found, each ``FILE:LINE: message``; the
    command line prints one line each, and ``str()`` is all of them, a line each."""

    def __init__(self, messages: list[str]):
        if not messages:
            raise ValueError("BatchError needs at least one message")
        self.messages = list(messages)
        super().__init__("\n".join(self.messages))


# ---------------------------------------------------------------------------------------------------- the work
def load_pipeline(model: str, runtime: RuntimeOptions | None = None) -> AnyGPTPipeline:
    """``AnyGPTPipeline.from_pretrained(model, runtime=runtime)``."""
    from anygpt.core.pipeline import AnyGPTPipeline

    return AnyGPTPipeline.from_pretrained(model, runtime=runtime)


def generate(
    request: GenerationRequest,
    *,
    model: str = DEFAULT_MODEL,
    out: str | os.PathLike = "outputs",
    pipe: AnyGPTPipeline | None = None,
    runtime: RuntimeOptions | None = None,
    show_progress: bool | None = None,
) -> dict[str, Any]:
    """Answer one request and write its files into ``out`` (named ``request.id`` or the next ``gen-NNNN``).

    Args:
        show_progress: the decoders' progress bars; None: ``anygpt.logging.is_progress_bar_enabled()``.

    Returns:
        ``{"text": str, "images": [path], "videos": [path], "audios": [path]}``.
    """
    check_request(request)
    out = _output_folder(out)
    pipe = pipe if pipe is not None else load_pipeline(model, runtime)
    result = pipe.run(request, show_progress=show_progress)
    return {"text": result.text, **write_outputs(result, out, request.id or _next_stem(out))}


def check_request(request: GenerationRequest) -> None:
    """What can be checked of a request without a model: its fields (``GenerationRequest.validate``), its ``id``
    (``check_id``) and its media files (``check_files``).

    Raises:
        UsageError: naming the field (after ``request.origin``). MediaError: a media item of the wrong kind.
    """
    request.validate()
    check_id(request)
    check_files(request)


def check_id(request: GenerationRequest) -> None:
    """An explicit ``id`` (checked for its characters by ``GenerationRequest``) is at most ``MAX_ID_LENGTH``
    characters and not of the automatic form ``gen-NNNN`` (whose files another request may get).

    Raises:
        UsageError: naming the id.
    """
    rid = request.id
    if rid is None:
        return
    if len(rid) > MAX_ID_LENGTH:
        raise UsageError(
            f"{request.origin}id must be at most {MAX_ID_LENGTH} characters (it names the output files), "
            f"got {len(rid)}: {rid[:20]!r}..."
        )
    if AUTOMATIC_ID.fullmatch(rid):
        raise UsageError(
            f"{request.origin}id {rid!r} has the form of the names given to requests without an id "
            "(gen-0001, gen-0002, ...), whose files it could take: choose another"
        )


def read_batch(path: str | os.PathLike, *, modalities: str | list[str] | None = None) -> list[GenerationRequest]:
    """Parse and validate a JSONL batch file: one ``GenerationRequest.to_dict()`` object a line (``seed`` 0 when left
    out; blank lines skipped). Media paths resolve against the file's folder. Every line is checked, and every
    problem reported, before anything is generated or any model loads.

    Args:
        modalities: the output modalities of the lines that leave them at ``"auto"`` (the command line's
            ``--modalities``), validated with each line.

    Raises:
        BatchError: every problem, each naming ``FILE:LINE``, the field, what was expected and what was found: a
            line that is not UTF-8 or not JSON, a bad field (``GenerationRequest``), a missing media file, an ``id``
            too long, of the automatic form ``gen-NNNN``, or used by another line (both lines named; ids that differ
            only in case count as the same: they name the same files on some file systems).
        UsageError: no such file, or no request in it.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UsageError(f"--batch {path}: expected a JSONL file, found {'a folder' if path.is_dir() else 'nothing'}")
    requests: list[GenerationRequest] = []
    errors: list[str] = []
    ids: dict[str, tuple[int, str]] = {}  # casefolded id -> (line, id as written)
    for lineno, raw in enumerate(path.read_bytes().splitlines(), 1):  # \n, \r\n, \r: never inside a JSON line
        where = f"{path}:{lineno}: "
        try:
            request = _read_line(raw, where, path.parent, first=lineno == 1, modalities=modalities)
        except (UsageError, MediaError) as err:
            errors.append(str(err))
            continue
        if request is None:
            continue
        if request.id is not None:
            key = request.id.casefold()
            if key in ids:
                line, written = ids[key]
                same = "" if written == request.id else f" (as {written!r}: ids differing in case name the same files)"
                errors.append(f"{where}id {request.id!r} is used by line {line} too{same}; each line needs its own id")
                continue
            ids[key] = (lineno, request.id)
        requests.append(request)
    if errors:
        raise BatchError(errors)
    if not requests:
        raise UsageError(f"--batch {path}: no requests in the file")
    return requests


def _read_line(
    raw: bytes, where: str, folder: Path, *, first: bool, modalities: str | list[str] | None
) -> GenerationRequest | None:
    """One batch line as a checked request (None for a blank line).

    Raises:
        UsageError, MediaError: naming ``where`` first.
    """
    if first and raw.startswith(codecs.BOM_UTF8):  # written by some Windows editors
        raw = raw[len(codecs.BOM_UTF8) :]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(
            f"{where}not UTF-8 text (byte 0x{raw[err.start]:02x} at byte {err.start + 1} of the line); "
            "save the file as UTF-8"
        ) from None
    if not text.strip():
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise UsageError(f"{where}not valid JSON ({err.msg} at column {err.colno})") from None
    except (ValueError, RecursionError) as err:  # an integer of thousands of digits; nesting too deep
        reason = "nested too deeply" if isinstance(err, RecursionError) else str(err).splitlines()[0]
        raise UsageError(f"{where}not valid JSON ({reason})") from None
    if isinstance(data, dict):
        data = {**BATCH_DEFAULTS, **_resolve_media(data, folder)}
        if isinstance(data.get("id"), int) and not isinstance(data["id"], bool):
            data["id"] = str(data["id"])
    request = GenerationRequest.from_dict(data, origin=where)
    if modalities is not None and request.modalities == "auto":
        request.modalities = modalities
    check_request(request)
    return request


def generate_batch(
    requests: list[GenerationRequest],
    *,
    model: str = DEFAULT_MODEL,
    out: str | os.PathLike = "outputs",
    pipe: AnyGPTPipeline | None = None,
    modalities: str | None = None,
    runtime: RuntimeOptions | None = None,
    batch_size: int = 1,
    show_progress: bool | None = None,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Answer many requests with a progress bar; each result is appended to ``out/results.jsonl`` as it finishes.

    Every request is checked against the model (``pipe.check_inputs``) before the first one runs, every problem
    reported (``BatchError``); ``results.jsonl`` and the media are written only after.

    Args:
        modalities: the output modalities of the requests that leave them at ``"auto"``.
        batch_size: requests answered together (``AnyGPTPipeline.run_batch``); 1 answers them one by one,
            bit-identical to single calls.
        show_progress: the batch's progress bar (one step a request); None:
            ``anygpt.logging.is_progress_bar_enabled()``.
        on_result: called with each result's record as soon as it is written (the command line prints it).
    """
    from tqdm.auto import tqdm

    check_batch_size(batch_size)
    out = _output_folder(out)
    pipe = pipe if pipe is not None else load_pipeline(model, runtime)
    problems = []
    for request in requests:
        if modalities is not None and request.modalities == "auto":
            request.modalities = modalities
        try:
            pipe.check_inputs(request)
        except (UsageError, MediaError) as err:
            problems.append(str(err))
    if problems:
        raise BatchError(problems)
    show = is_progress_bar_enabled() if show_progress is None else show_progress
    out.mkdir(parents=True, exist_ok=True)
    results = []
    with (
        open(out / "results.jsonl", "a") as log,
        tqdm(total=len(requests), desc="generate", unit="prompt", disable=not show) as bar,
    ):
        for start in range(0, len(requests), batch_size):
            chunk = requests[start : start + batch_size]
            answers = [pipe.run(chunk[0], show_progress=False)] if batch_size == 1 else pipe.run_batch(chunk)
            for request, result in zip(chunk, answers, strict=True):
                stem = request.id or _next_stem(out)
                record = {"id": stem, "prompt": request.prompt, "text": result.text, **write_outputs(result, out, stem)}
                log.write(json.dumps(record) + "\n")
                log.flush()
                results.append(record)
                if on_result is not None:
                    on_result(record)
            bar.update(len(chunk))
    return results


def check_batch_size(batch_size: Any) -> None:
    """Raises ``UsageError`` unless ``batch_size`` is an integer >= 1."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"--batch-size: expected an integer >= 1, got {batch_size!r}")


def write_outputs(result, out: Path, stem: str) -> dict[str, list[str]]:
    """Write a result's media as PNG / MP4 / WAV files named ``{stem}_{kind}{i}``, all or nothing.

    Returns:
        ``{"images": [path], "videos": [path], "audios": [path]}``.
    """
    from anygpt.apps.outputs import save_outputs

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
            path = _expand(Path(item))
            if not path.is_file():
                found = "a folder" if path.is_dir() else "nothing"
                raise UsageError(f"{request.origin}--{modality.value} {item}: expected a readable file, found {found}")


def _expand(path: Path) -> Path:
    """``path.expanduser()``, or ``path`` when its ``~user`` names no user."""
    try:
        return path.expanduser()
    except RuntimeError:
        return path


def _resolve_media(data: dict[str, Any], folder: Path) -> dict[str, Any]:
    """A batch line's relative media paths, resolved against the batch file's folder (one path may stand alone)."""
    data = dict(data)
    for modality in MEDIA_MODALITIES:
        value = data.get(modality.plural)
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            data[modality.plural] = [str(folder / _expand(Path(v))) if isinstance(v, str) else v for v in value]
    return data


def _output_folder(out: str | os.PathLike) -> Path:
    """``--out`` as a folder path, checked, and cleared of the temporaries of killed earlier runs."""
    from anygpt.base.utils import sweep_stale_temporaries

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
    """Run ``anygpt generate``: print the text and the paths (or JSON); a batch prints each result as it is done.

    Everything that can be checked without the model is checked first; then, unless ``--quiet``, one line on stderr
    says what is loading, before the (slow) imports and the loading.
    """
    runtime = runtime_options(args)
    if args.batch and args.prompt:
        raise UsageError("give either a PROMPT or --batch FILE, not both")
    if args.batch:
        check_batch_size(args.batch_size)
        forced = None if args.modalities == "auto" else args.modalities
        requests = read_batch(args.batch, modalities=forced)
        _output_folder(args.out)
        _say_loading(args, runtime, f"{len(requests)} request{'s' if len(requests) != 1 else ''}")
        generate_batch(
            requests,
            model=args.model,
            out=args.out,
            runtime=runtime,
            batch_size=args.batch_size,
            on_result=lambda record: _print_now(
                json.dumps(record) if args.json else f"{record['id']}: {record['text']!r} -> {_paths(record)}"
            ),
        )
        return 0
    if args.prompt is None:
        raise UsageError("generate: a PROMPT or --batch FILE is required")
    request = request_from_args(args)
    check_request(request)
    _output_folder(args.out)
    _say_loading(args, runtime)
    result = generate(request, model=args.model, out=args.out, runtime=runtime)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"text: {result['text']}")
        for modality in MEDIA_MODALITIES:
            for path in result[modality.plural]:
                print(f"{modality.value}: {path}")
    return 0


def _say_loading(args: argparse.Namespace, runtime: RuntimeOptions | None, what: str = "") -> None:
    """``anygpt: loading MODEL (PLAN) for N requests ...`` on stderr, at once (not with ``--quiet``)."""
    if getattr(args, "quiet", False):
        return
    plan = runtime.describe() if runtime is not None else "cpu"
    print(f"anygpt: loading {args.model} ({plan}){f' for {what}' if what else ''} ...", file=sys.stderr, flush=True)


def _print_now(line: str) -> None:
    """Print a result line on stdout at once (flushed: a pipe reads it now), without breaking a progress bar."""
    from tqdm.auto import tqdm

    with tqdm.external_write_mode(file=sys.stdout):
        print(line, flush=True)


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
