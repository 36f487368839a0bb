"""How much anygpt says: quiet by default, one switch to hear everything (``anygpt.set_verbosity``).

In the style of ``transformers.logging``:

    >>> import anygpt
    >>> anygpt.set_verbosity("info")  # doctest: +SKIP
    >>> anygpt.logging.set_verbosity_warning()  # the default again  # doctest: +SKIP
    >>> anygpt.logging.enable_progress_bar()  # only the denoising and batch bars  # doctest: +SKIP

The verbosity (``get_verbosity``; default ``WARNING``, or the ``ANYGPT_VERBOSITY`` environment variable: ``debug``,
``info``, ``warning``, ``error``, ``critical``) decides three things:

* the level of anygpt's own loggers (``anygpt``, ``encoders``, ``projectors``, ``decoders``, ``training``,
  ``toyworld``; set by ``set_verbosity``, left to the logging configuration until it is called);
* whether anygpt's own progress bars (the decoders' denoising steps, a batch) are shown: at ``INFO`` and below,
  unless ``enable_progress_bar`` / ``disable_progress_bar`` said otherwise;
* whether other libraries are quietened while anygpt works (``quiet_libraries``): above ``INFO``, the import notices
  of optional backends (torch's pytree registrations, bitsandbytes' missing CPU kernels, torchao), transformers' and
  diffusers' warnings and their "Loading weights" / "Loading pipeline components" bars are silenced while anygpt
  imports, loads and renders, and put back as they were when it returns. At ``INFO`` they are left alone.

Kept free of heavy imports so that ``anygpt --help`` loads nothing but the standard library.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from anygpt.base.errors import UsageError

__all__ = [
    "LOGGERS",
    "disable_progress_bar",
    "enable_progress_bar",
    "get_verbosity",
    "is_progress_bar_enabled",
    "quiet_import_notices",
    "quiet_libraries",
    "set_verbosity",
    "set_verbosity_debug",
    "set_verbosity_error",
    "set_verbosity_info",
    "set_verbosity_warning",
    "temporary_verbosity",
]

LOGGERS = ("anygpt", "encoders", "projectors", "decoders", "training", "toyworld")
"""The top-level loggers of anygpt's packages (every module logs to ``logging.getLogger(__name__)``)."""

ENVIRONMENT_VARIABLE = "ANYGPT_VERBOSITY"
LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

# Notices that optional backends print while diffusers and transformers import them (torchao's pytree
# registrations, bitsandbytes' missing CPU kernels package, torchao's tensor objects): for their developers.
_IMPORT_NOISE = ("torch.utils._pytree", "bitsandbytes", "diffusers.quantizers", "transformers.quantizers")
_LIBRARIES = ("transformers", "diffusers")  # each has utils.logging with verbosity and progress-bar switches

_lock = threading.RLock()
_verbosity: int | None = None  # set_verbosity's level; None: the environment variable's, else WARNING
_progress: bool | None = None  # enable/disable_progress_bar; None: follow the verbosity
_depth = 0  # quiet_libraries blocks open (in every thread)
_saved_loggers: dict[str, int] = {}
_saved_libraries: dict[str, tuple[int, bool]] = {}
_saved_hub_bars: bool | None = None  # huggingface_hub's bars were disabled (transformers' switch turns them too)


class _FallbackHandler(logging.StreamHandler):
    """Writes to the current ``sys.stderr``, and only while the root logger has no handler (``set_verbosity`` without
    a logging configuration): once the application configures logging, its handlers print anygpt's records."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers:
            return
        self.setStream(sys.stderr)
        super().emit(record)


_handler = _FallbackHandler()


# ---------------------------------------------------------------------------------------------------- verbosity
def _parse_level(level: int | str, where: str = "verbosity") -> int:
    if isinstance(level, str) and level.strip().lower() in LEVELS:
        return LEVELS[level.strip().lower()]
    if isinstance(level, int) and not isinstance(level, bool) and 0 <= level <= logging.CRITICAL:
        return level
    raise UsageError(
        f"{where}: expected one of {', '.join(LEVELS)} or a logging level (0..50, e.g. logging.INFO), got {level!r}"
    )


def get_verbosity() -> int:
    """anygpt's verbosity, a ``logging`` level: ``set_verbosity``'s, else ``ANYGPT_VERBOSITY``'s, else ``WARNING``.

    Raises:
        UsageError: ``ANYGPT_VERBOSITY`` holds something else than a level name.
    """
    if _verbosity is not None:
        return _verbosity
    value = os.environ.get(ENVIRONMENT_VARIABLE)
    return logging.WARNING if not value else _parse_level(value, ENVIRONMENT_VARIABLE)


def set_verbosity(level: int | str) -> None:
    """Set anygpt's verbosity: ``"debug"``, ``"info"`` (anygpt's INFO logs, progress bars, and other libraries as
    loud as they are themselves), ``"warning"`` (the default: warnings only, no bars, other libraries quiet while
    anygpt works), ``"error"``, ``"critical"``, or a ``logging`` level.

    anygpt's loggers are set to the level; when the application has configured no logging, their records are printed
    to stderr.

    Raises:
        UsageError: an unknown level.
    """
    global _verbosity
    value = _parse_level(level)
    with _lock:
        _verbosity = value
        for name in LOGGERS:
            logger = logging.getLogger(name)
            logger.setLevel(value)
            if _handler not in logger.handlers:
                logger.addHandler(_handler)


def set_verbosity_debug() -> None:
    """``set_verbosity("debug")``."""
    set_verbosity(logging.DEBUG)


def set_verbosity_info() -> None:
    """``set_verbosity("info")``: anygpt's INFO logs and progress bars, other libraries' notices and bars."""
    set_verbosity(logging.INFO)


def set_verbosity_warning() -> None:
    """``set_verbosity("warning")``: the default."""
    set_verbosity(logging.WARNING)


def set_verbosity_error() -> None:
    """``set_verbosity("error")``: errors only."""
    set_verbosity(logging.ERROR)


def enable_progress_bar() -> None:
    """Show anygpt's progress bars (the decoders' denoising steps, a batch's requests) whatever the verbosity."""
    global _progress
    _progress = True


def disable_progress_bar() -> None:
    """Hide anygpt's progress bars whatever the verbosity."""
    global _progress
    _progress = False


def is_progress_bar_enabled() -> bool:
    """Whether anygpt shows progress bars: as ``enable_progress_bar`` / ``disable_progress_bar`` said, else at a
    verbosity of ``INFO`` or below. A call's ``show_progress=True/False`` overrides it for that call."""
    return _progress if _progress is not None else get_verbosity() <= logging.INFO


@contextmanager
def temporary_verbosity(level: int | str | None = None, *, progress_bar: bool | None = None) -> Iterator[None]:
    """Within the block, anygpt's verbosity is ``level`` and its progress bars are ``progress_bar`` (None: left as
    they are); everything (anygpt's logger levels too) is put back after.

    Example:
        >>> with temporary_verbosity("info"):  # doctest: +SKIP
        ...     pipe("draw a red circle")
    """
    global _verbosity, _progress
    with _lock:
        saved = (_verbosity, _progress, {name: logging.getLogger(name).level for name in LOGGERS})
        if level is not None:
            set_verbosity(level)
        if progress_bar is not None:
            _progress = bool(progress_bar)
    try:
        yield
    finally:
        with _lock:
            _verbosity, _progress, levels = saved
            for name, value in levels.items():
                logging.getLogger(name).setLevel(value)


# ---------------------------------------------------------------------------------------------------- other libraries
def quiet_import_notices() -> None:
    """Silence (below ERROR), for good, the import-time notices of optional backends. For entry points only (the
    command line, the demo), before the heavy imports; library code uses ``quiet_libraries``, which puts them back."""
    for name in _IMPORT_NOISE:
        logging.getLogger(name).setLevel(logging.ERROR)


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """While in the block (a context manager or a decorator), and only when anygpt's verbosity is above ``INFO``,
    other libraries are quiet: the import notices of optional backends, transformers' and diffusers' warnings and
    their loading bars. The outermost block puts everything back as it found it; blocks may nest and run in several
    threads at once. A library imported inside the block is quietened by the next (inner) block that starts.

    A user who set transformers' or diffusers' own verbosity to INFO or DEBUG keeps their logs (not their bars).
    """
    global _depth
    if get_verbosity() <= logging.INFO:
        yield
        return
    with _lock:
        _depth += 1
        try:
            _silence()
        except BaseException:
            _depth -= 1
            if _depth == 0:
                _restore()
            raise
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _restore()


def _silence() -> None:
    """Quieten what is not quiet yet (saving how it was): the import-notice loggers, and the libraries imported."""
    global _saved_hub_bars
    for name in _IMPORT_NOISE:
        if name not in _saved_loggers:
            logger = logging.getLogger(name)
            _saved_loggers[name] = logger.level
            logger.setLevel(logging.ERROR)
    hub = sys.modules.get("huggingface_hub.utils")
    for library in _LIBRARIES:
        switches = sys.modules.get(f"{library}.utils.logging")
        if switches is None or library in _saved_libraries:
            continue
        if _saved_hub_bars is None and hub is not None:
            _saved_hub_bars = bool(hub.are_progress_bars_disabled())
        level = switches.get_verbosity()
        _saved_libraries[library] = (level, switches.is_progress_bar_enabled())
        if level >= logging.WARNING:  # not a user's explicit INFO / DEBUG
            switches.set_verbosity(logging.ERROR)
        switches.disable_progress_bar()


def _restore() -> None:
    global _saved_hub_bars
    for name, level in _saved_loggers.items():
        logging.getLogger(name).setLevel(level)
    _saved_loggers.clear()
    for library, (level, bars) in _saved_libraries.items():
        switches = sys.modules[f"{library}.utils.logging"]
        switches.set_verbosity(level)
        if bars:
            switches.enable_progress_bar()
        else:
            switches.disable_progress_bar()
    _saved_libraries.clear()
    hub = sys.modules.get("huggingface_hub.utils")
    if _saved_hub_bars is not None and hub is not None and bool(hub.are_progress_bars_disabled()) != _saved_hub_bars:
        (hub.disable_progress_bars if _saved_hub_bars else hub.enable_progress_bars)()
    _saved_hub_bars = None
