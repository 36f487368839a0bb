"""The ``anygpt`` command line: a thin dispatcher over command modules, each imported only when its command runs.

    anygpt generate PROMPT [--image P]... [--model NAME|DIR] [--out DIR] [--device cuda --dtype bfloat16] [--json]
    anygpt generate --batch prompts.jsonl --out DIR
    anygpt chat [--model NAME|DIR] [--out DIR]      (an interactive terminal chat; /help lists its commands)
    anygpt info [presets|projectors|decoders|encoders]
    anygpt --version
    anygpt train | cache | toyworld | data | convert | serve ...      (anygpt --help lists them)

A command module exposes ``COMMANDS: dict[str, str]`` (name -> one-line help), ``add_arguments(command, parser)`` and
``run(args) -> int | None``; ``COMMANDS`` below names its module and repeats the help, so that ``anygpt --help``
imports none of them and ``anygpt generate`` imports nothing of the training side. A command whose module is not
installed is left out.

Output: ``-v/--verbose`` logs at INFO and lets the libraries speak (their notices and loading bars:
``anygpt.set_verbosity("info")``); ``-q/--quiet`` prints nothing on stderr but errors; both go before or after the
command (``anygpt -q generate ...`` or ``anygpt generate ... -q``). By default a short command (``generate``) shows its
own progress (what it loads, the decoders' steps) and keeps the libraries quiet; a long job (``train``, ``serve``)
logs at INFO.

Errors: a bad option is one line, ``anygpt generate: error: argument --steps: invalid int value: 'abc'`` (exit 2,
no usage block); bad input (``AnyGPTError``, ``ValueError``, ``TypeError``, ``OSError``) prints one line and exits 2
(an error holding several ``messages``, such as a batch file's, one line each); a training that cannot go on
(``TrainingError``) exits 1; Ctrl-C exits 130. For the commands in
``SIGTERM_AS_INTERRUPT`` a SIGTERM (``kill``, a job scheduler, ``timeout``) is handled as Ctrl-C is: the command's
clean-ups run (temporary files are removed) and it exits 143.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import NamedTuple, NoReturn

from anygpt.base.errors import AnyGPTError, TrainingError
from anygpt.base.logs import get_verbosity, quiet_import_notices, quiet_libraries, temporary_verbosity

logger = logging.getLogger("anygpt.cli")


class Command(NamedTuple):
    """Where a command lives and what ``anygpt --help`` says of it."""

    module: str
    help: str
    logs: bool = False  # a long job: log at INFO and keep the libraries' progress bars


COMMANDS: dict[str, Command] = {
    "generate": Command("anygpt.apps.generate", "generate text and media from a prompt (or a batch of prompts)"),
    "chat": Command("anygpt.apps.terminal_chat", "chat in the terminal: several turns, media attached with /image"),
    "info": Command(
        "anygpt.apps.info",
        "list presets, projectors, decoders and encoders; --memory: a model's size and GPU memory per plan",
    ),
    "convert": Command(
        "anygpt.apps.convert",
        "import a foreign checkpoint (NExT-GPT's released model) into a save_pretrained folder",
        logs=True,
    ),
    "serve": Command("anygpt.apps.serve", "serve a model over HTTP (OpenAI-compatible)", logs=True),
    "eval": Command(
        "anygpt.apps.eval",
        "evaluate a model: FID/KID/CLIP score, FAD, CLIPSIM/FVD, COCO caption metrics, VQAv2, the toy world",
        logs=True,
    ),
    "train": Command(
        "training.cli", "run a training stage from a YAML config (0: Q-Former pretraining, 1, 2 or 3)", logs=True
    ),
    "cache": Command(
        "training.cli", "precompute encoder features and caption embeddings for a stage config", logs=True
    ),
    "toyworld": Command(
        "toyworld.cli", "the toy world: its dataset, the recipe that trains `toyworld`, evaluation", logs=True
    ),
    "data": Command("toyworld.cli", "datasets: write a small synthetic sample dataset", logs=True),
}


MAX_ERROR_LINES = 50
"""An error with several ``messages`` (a batch file's problems) prints at most this many lines, then a count."""

SIGTERM_AS_INTERRUPT: frozenset[str] = frozenset({"generate"})
"""Commands whose run a SIGTERM interrupts as Ctrl-C does (raising :class:`Terminated`, a ``KeyboardInterrupt``)."""


class Terminated(KeyboardInterrupt):
    """Raised in the main thread by SIGTERM while a command of ``SIGTERM_AS_INTERRUPT`` runs, so that the ``finally``
    clean-ups and ``except BaseException`` handlers run as they do for Ctrl-C."""


class _Termination:
    """What :func:`_sigterm_as_interrupt` saw: ``lost`` when its :class:`Terminated` was raised where Python cannot
    raise (a ``__del__``, a fork handler of ``logging``): Python then prints it as "Exception ignored" and goes on."""

    lost: bool = False


@contextmanager
def _sigterm_as_interrupt(enabled: bool) -> Iterator[_Termination]:
    """While in the block, SIGTERM raises :class:`Terminated` (once: a second SIGTERM is ignored, so that it cannot
    interrupt the clean-ups of the first); the previous handler is restored after.

    A ``Terminated`` that lands where it cannot be raised is not printed: the yielded object's ``lost`` says so, and
    the caller ends as terminated once the command returns (its outputs, written whole, are kept).
    """
    seen = _Termination()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield seen
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    def unraisable(info):
        if isinstance(info.exc_value, Terminated):
            seen.lost = True
        else:
            hook(info)

    hook = sys.unraisablehook
    previous = signal.signal(signal.SIGTERM, handler)
    sys.unraisablehook = unraisable
    try:
        yield seen
    finally:
        signal.signal(signal.SIGTERM, previous)
        sys.unraisablehook = hook


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors are one line, ``PROG: error: MESSAGE (see PROG --help)``, exit status 2, instead
    of the usage block; its subparsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        message = "; ".join(line.strip() for line in message.splitlines() if line.strip())
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_output_options(parser: argparse.ArgumentParser, *, default: object) -> None:
    """``-v/--verbose`` and ``-q/--quiet``: on ``anygpt`` (default False) and on each command (default
    ``argparse.SUPPRESS``, so that a command's parser leaves ``anygpt -v COMMAND``'s value alone)."""
    parser.add_argument(
        "-v", "--verbose", action="store_true", default=default, help="log at INFO, with the libraries' notices"
    )
    parser.add_argument(
        "-q", "--quiet", action="store_true", default=default, help="print nothing on stderr but errors (no progress)"
    )


def available_commands() -> dict[str, Command]:
    """The commands whose module is installed (found without importing it)."""
    return {name: command for name, command in COMMANDS.items() if _module_exists(command.module)}


def _module_exists(name: str) -> bool:
    """Whether module ``name`` can be imported, found without importing it or its packages."""
    top, _, rest = name.partition(".")
    spec = importlib.util.find_spec(top)
    if spec is None or not rest:
        return spec is not None
    for location in spec.submodule_search_locations or []:
        path = Path(location, *rest.split("."))
        if path.with_suffix(".py").is_file() or (path / "__init__.py").is_file():
            return True
    return False


def build_parser(argv: Sequence[str]) -> tuple[argparse.ArgumentParser, object | None]:
    """The parser of ``argv``: every available command listed, and only the chosen one's module imported (its
    arguments added). Returns the parser and that module (None when no known command is chosen)."""
    parser = ArgumentParser(prog="anygpt", description="Any-to-any multimodal generation.")
    _add_output_options(parser, default=False)
    parser.add_argument("--version", action="version", version=f"anygpt {anygpt_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = _chosen_command(argv)
    module = None
    for name, command in available_commands().items():
        subparser = sub.add_parser(name, help=command.help, description=command.help)
        _add_output_options(subparser, default=argparse.SUPPRESS)
        if name == chosen:
            module = importlib.import_module(command.module)
            missing = [attr for attr in ("add_arguments", "run") if not callable(getattr(module, attr, None))]
            if missing:
                raise AnyGPTError(f"command {name!r}: {command.module} does not define {' and '.join(missing)}")
            module.add_arguments(name, subparser)
    return parser, module


def anygpt_version() -> str:
    """The installed distribution's version (read from its metadata: nothing of the project is imported)."""
    try:
        return version("anygpt")
    except PackageNotFoundError:  # run from a source tree that was not installed
        return "unknown (not installed)"


def _chosen_command(argv: Sequence[str]) -> str | None:
    """The first argument that is not an option of ``anygpt`` itself."""
    for arg in argv:
        if not arg.startswith("-"):
            return arg
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = _chosen_command(argv)
    try:
        default = get_verbosity()  # ANYGPT_VERBOSITY's, else WARNING
        loud = bool({"-v", "--verbose"} & set(argv)) or (default <= logging.INFO and not {"-q", "--quiet"} & set(argv))
        if not loud:
            quiet_import_notices()
        if chosen in COMMANDS and chosen not in available_commands():
            raise AnyGPTError(
                f"command {chosen!r} is not available: its module {COMMANDS[chosen].module} is not installed"
            )
        with nullcontext() if loud else quiet_libraries():  # the command module's imports
            parser, module = build_parser(argv)
    except AnyGPTError as err:
        print(f"anygpt: error: {err}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if args.verbose and args.quiet:
        parser.error("-v/--verbose and -q/--quiet exclude each other")
    logs = COMMANDS[args.command].logs
    verbosity = logging.ERROR if args.quiet else min(default, logging.INFO) if (args.verbose or logs) else default
    _configure_logging(verbosity, loud=loud or args.verbose, logs=logs)
    try:
        with (
            temporary_verbosity(verbosity, progress_bar=not args.quiet),
            quiet_libraries(),
            _sigterm_as_interrupt(args.command in SIGTERM_AS_INTERRUPT) as termination,
        ):
            status = module.run(args)
            if termination.lost:  # the SIGTERM came where it could not stop the command
                raise Terminated()
    except TrainingError as err:
        print(f"anygpt: training stopped: {err}", file=sys.stderr)
        return 1
    except (AnyGPTError, ValueError, TypeError, OSError) as err:
        logger.debug("error details", exc_info=True)
        for line in _error_lines(err):
            print(f"anygpt: error: {line}", file=sys.stderr)
        return 2
    except Terminated:
        print("anygpt: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("anygpt: interrupted", file=sys.stderr)
        return 130
    return int(status or 0)


def _error_lines(err: BaseException) -> list[str]:
    """The lines an error prints: one per message of an error holding ``messages`` (at most ``MAX_ERROR_LINES``,
    then how many more), else the first line of its text."""
    messages = getattr(err, "messages", None)
    if not isinstance(messages, list | tuple) or not messages:
        return [(str(err).splitlines() or [type(err).__name__])[0]]
    lines = [(str(m).splitlines() or [""])[0] for m in messages[:MAX_ERROR_LINES]]
    if len(messages) > MAX_ERROR_LINES:
        lines.append(f"... and {len(messages) - MAX_ERROR_LINES} more")
    return lines


def _configure_logging(level: int, *, loud: bool, logs: bool) -> None:
    """Log at ``level`` (INFO for ``-v`` and long jobs, ERROR for ``-q``, else ``ANYGPT_VERBOSITY`` or WARNING). A long
    job keeps the libraries' loading bars but not their deprecation notices (for developers), for good: it imports
    them anyway. A short command changes no library: anygpt quietens them while it works (``quiet_libraries``), and
    ``--help`` or ``info presets`` import none of them."""
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if loud or not logs:
        return
    import diffusers  # heavy: only for a long job, once it runs
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()


if __name__ == "__main__":
    sys.exit(main())
