"""The project's exceptions, in one place so that every layer raises and catches the same classes.

Each is a user-facing error: its message names the problem (the file, field or key, what was expected, what was
found) and the command line prints it as one line. ``AnyGPTError`` is their common base.
"""

from __future__ import annotations


class AnyGPTError(Exception):
    """Base class of the errors anygpt reports to its users."""


class UsageError(AnyGPTError, ValueError):
    """Bad input from the user (a command-line option, a request field): one line, exit status 2. A ``ValueError``,
    as a bad argument to a diffusers pipeline is."""


class MediaError(AnyGPTError, ValueError):
    """A media file or object that cannot be read, decoded or written; the message names the file."""


class ConfigError(AnyGPTError, ValueError):
    """A configuration file or key that is missing or invalid; the message names the file and key."""


class DatasetError(AnyGPTError, ValueError):
    """A dataset record that cannot be read; the message names the file, the record and the field."""


class UnknownModelError(AnyGPTError, ValueError):
    """A model name that is neither a preset, a packaged model, nor a folder written by ``save_pretrained``."""


class CheckpointError(AnyGPTError, ValueError):
    """A weights file whose keys or shapes do not match the model; the message names the key and both shapes."""


class TrainingError(AnyGPTError, RuntimeError):
    """Training cannot go on (a non-finite loss, no usable data); the last checkpoint is kept."""


class GenerationStopped(AnyGPTError):
    """Raised inside a generation to stop it early (the chat's Stop button); nothing is written."""
