"""``anygpt chat``: an interactive chat in the terminal (LLaVA's ``python -m llava.serve.cli`` habit).

    anygpt chat [--model NAME|DIR] [--out DIR] [--seed N] [--max-new-tokens N] [--device cuda --dtype bfloat16]

One ``Conversation`` for the whole session: each message continues it, and media attached earlier stay in it (each
encoded once). A line is a message, or a command:

    /image PATH, /audio PATH, /video PATH   attach a file to the next message
    /modalities image,audio                 force these outputs (``/modalities none``: text only)
    /auto                                   the model decides what to make (the default)
    /reset  /help  /quit                    a new conversation; the commands; the end (so does EOF, Ctrl-D)

Replies print as text; the media they hold are written to ``--out`` (``chat-0001_image0.png`` and so on, never
overwriting an earlier session's) and their paths printed. A bad line (a missing file, an unknown modality) prints one
``error:`` line on stderr and the chat goes on. Lines may come from a pipe: ``printf 'draw a red circle\\n' | anygpt
chat`` answers and ends at EOF.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TextIO

from anygpt.apps.outputs import save_outputs
from anygpt.apps.runtime_args import add_runtime_arguments, runtime_options
from anygpt.base.errors import AnyGPTError, MediaError, UsageError
from anygpt.base.media import guess_modality
from anygpt.base.modality import MEDIA_MODALITIES, Modality
from anygpt.core.config import DEFAULT_MODEL
from anygpt.core.conversation import Conversation
from anygpt.core.pipeline import AnyGPTPipeline
from anygpt.core.request import GenerationRequest
from anygpt.core.runtime import RuntimeOptions

COMMANDS = {"chat": "chat in the terminal: several turns, media attached with /image"}

DEFAULT_OUT = "outputs/chat"
PROMPT = "you> "
HELP = """\
commands:
  /image PATH            attach an image to your next message (also /audio PATH, /video PATH)
  /modalities image,audio  make these media after the text (/modalities none: text only)
  /auto                  the model decides what to make (the default)
  /reset                 start a new conversation
  /help                  this list
  /quit                  end the chat (so does Ctrl-D)
anything else is a message; media the model makes are written to {out} and their paths printed"""

_ERRORS = (AnyGPTError, ValueError, TypeError, OSError)
"""What a chat line can go wrong with: one error line, and the chat goes on."""


def load_pipeline(model: str, runtime: RuntimeOptions | None = None) -> AnyGPTPipeline:
    """``AnyGPTPipeline.from_pretrained(model, runtime=runtime)``."""
    return AnyGPTPipeline.from_pretrained(model, runtime=runtime)


class TerminalChat:
    """The chat's state and its line handler, free of the terminal: ``handle(line)`` answers one line.

    Args:
        pipe: the model.
        out: the folder media replies are written to (created on the first one).
        defaults: the request every message starts from (seed, lengths, decoder settings); its prompt, media and
            modalities are the chat's.
        stdout, stderr: where replies, and errors and progress, are printed.
    """

    def __init__(
        self,
        pipe: AnyGPTPipeline,
        out: str | Path = DEFAULT_OUT,
        *,
        defaults: GenerationRequest | None = None,
        stdout: TextIO | None = None,
        stderr: TextIO | None = None,
    ):
        self.pipe = pipe
        self.out = Path(out).expanduser()
        self.defaults = defaults if defaults is not None else GenerationRequest(seed=0)
        self.stdout = stdout if stdout is not None else sys.stdout
        self.stderr = stderr if stderr is not None else sys.stderr
        self.conversation = Conversation()
        self.attached: dict[Modality, list[str]] = {m: [] for m in MEDIA_MODALITIES}
        self.modalities: str | list[str] = "auto"

    # ------------------------------------------------------------------ the loop
    def loop(self, lines: Iterable[str]) -> int:
        """Answer every line until ``/quit`` or the end of ``lines``; returns the exit status (0)."""
        for line in lines:
            if not self.handle(line):
                break
        return 0

    def handle(self, line: str) -> bool:
        """Answer one line (a command or a message); False when the chat should end. Errors are printed, not raised."""
        line = line.strip()
        if not line:
            return True
        if line.startswith("/"):
            name, _, arg = line[1:].partition(" ")
            return self._command(name.lower(), arg.strip())
        self._send(line)
        return True

    def _command(self, name: str, arg: str) -> bool:
        if name in ("quit", "exit"):
            return False
        try:
            if name in ("image", "audio", "video"):
                self.attach(Modality(name), arg)
            elif name == "modalities":
                self.set_modalities(arg)
            elif name == "auto":
                self.set_modalities("auto")
            elif name == "reset":
                self.reset()
                self._say("(new conversation)")
            elif name == "help":
                self._say(HELP.format(out=self.out))
            else:
                raise UsageError(f"unknown command /{name}: /help lists the commands")
        except _ERRORS as err:
            self._error(err)
        return True

    # ------------------------------------------------------------------ commands
    def attach(self, modality: Modality, path: str) -> None:
        """Attach a file to the next message, checked now: it exists, the model reads its modality, and its name does
        not say it is another kind of media.

        Raises:
            UsageError: no path, or a model that does not read ``modality``.
            MediaError: a missing file, or one named as another modality.
        """
        command = f"/{modality.value}"
        path = path.strip().strip("'\"")
        if not path:
            raise UsageError(f"{command}: expected a file path, as in {command} PATH")
        if modality.value not in self.pipe.config.input_modalities:
            reads = ", ".join(self.pipe.config.input_modalities) or "no media"
            raise UsageError(f"{command}: this model reads no {modality.value} (it reads {reads})")
        file = Path(path).expanduser()
        if not file.is_file():
            found = "a folder" if file.is_dir() else "nothing"
            raise MediaError(f"{command} {path}: expected a readable file, found {found}")
        try:
            named = guess_modality(file)
        except MediaError:  # an unusual extension: the loader decides when the message is sent
            named = modality
        if named != modality:
            raise MediaError(f"{command} {path}: the name says {named.value}; attach it with /{named.value}")
        self.attached[modality].append(str(file))
        self._say(f"(attached {modality.value} {file.name}: sent with your next message)")

    def set_modalities(self, value: str) -> None:
        """``auto``, ``none``/``text`` (text only) or a comma list of output modalities, checked against the model.

        Raises:
            UsageError: an empty value or a modality the model cannot make, naming the valid ones.
        """
        value = value.strip().lower()
        if not value:
            shown = "auto" if self.modalities == "auto" else ", ".join(self.modalities) or "none (text only)"
            self._say(f"(outputs: {shown})")
            return
        if value == "auto":
            self.modalities = "auto"
            self._say("(outputs: the model decides)")
            return
        if value in ("none", "text"):
            self.modalities = []
        else:
            try:
                forced = self.pipe.parse_modalities(value)
            except ValueError as err:
                reason = str(err).removeprefix("modalities: ")
                raise UsageError(f"/modalities {value}: {reason} (or none: text only)") from None
            self.modalities = [m.value for m in self.pipe.decoders if m in forced]
        self._say(f"(outputs: {', '.join(self.modalities) or 'text only'})")

    def reset(self) -> None:
        """A new conversation: no turns, no attachments (the output setting is kept)."""
        self.conversation = Conversation()
        for items in self.attached.values():
            items.clear()

    # ------------------------------------------------------------------ a message
    def _send(self, text: str) -> None:
        attached = {m.plural: list(items) for m, items in self.attached.items()}
        for items in self.attached.values():  # sent once, whatever happens
            items.clear()
        try:
            request = dataclasses.replace(self.defaults, prompt=text, modalities=self.modalities, **attached)
            result = self.pipe.run(
                request, conversation=self.conversation, show_progress=False, on_decode=self._decoding
            )
            paths = save_outputs(result, self.out, _next_stem(self.out)) if _has_media(result) else {}
        except _ERRORS as err:
            dropped = sum(len(items) for items in attached.values())
            self._error(err, f" (the {dropped} attached file(s) were dropped: attach again)" if dropped else "")
            return
        except KeyboardInterrupt:
            self._error("stopped (Ctrl-C); the chat goes on")
            return
        self._say(f"anygpt> {result.text}")
        for modality, written in paths.items():
            for path in written:
                self._say(f"  {modality.value}: {path}")

    def _decoding(self, modality: Modality, index: int, total: int) -> None:
        print(f"  (rendering {modality.value}: {index + 1} of {total}...)", file=self.stderr, flush=True)

    def _say(self, text: str) -> None:
        print(text, file=self.stdout, flush=True)

    def _error(self, err: BaseException | str, tail: str = "") -> None:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"error: {first}{tail}", file=self.stderr, flush=True)


def _has_media(result) -> bool:
    return any(getattr(result, m.plural) for m in MEDIA_MODALITIES)


def _next_stem(out: Path) -> str:
    """``chat-NNNN``, one past the highest in ``out``: a later session never overwrites an earlier one's files."""
    taken = [int(m.group(1)) for p in out.glob("chat-*") if (m := re.match(r"chat-(\d+)_", p.name))]
    return f"chat-{max(taken, default=0) + 1:04d}"


def read_lines(stream: TextIO) -> Iterator[str]:
    """The lines of ``stream``: with a prompt and line editing on a terminal, plain lines from a pipe."""
    if not stream.isatty():
        yield from stream
        return
    try:
        import readline  # noqa: F401  (line editing and history for input(); absent on some platforms)
    except ImportError:
        pass
    while True:
        try:
            yield input(PROMPT)
        except EOFError:
            print()
            return


# ---------------------------------------------------------------------------------------------------- the command
def add_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    """The options of ``anygpt chat``."""
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"preset name or saved folder (default {DEFAULT_MODEL})")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"folder for the media replies (default {DEFAULT_OUT})")
    parser.add_argument("--seed", type=int, default=0, help="seed of every reply (default 0)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=None, help="decoder inference steps")
    parser.add_argument("--guidance", type=float, default=None, help="decoder guidance scale")
    add_runtime_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Run ``anygpt chat`` on stdin: bad options fail (exit 2) before the model loads; then every line is answered."""
    runtime = runtime_options(args)
    defaults = GenerationRequest(
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
    )
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: expected a folder, found a file")
    print(f"loading {args.model}...", file=sys.stderr, flush=True)
    pipe = load_pipeline(args.model, runtime)
    print(f"anygpt chat with {args.model}: type a message; /help lists the commands, /quit ends", flush=True)
    return TerminalChat(pipe, out, defaults=defaults).loop(read_lines(sys.stdin))
