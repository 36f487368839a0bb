"""anygpt: any-to-any multimodal generation (text, image, video, audio in and out).

Quiet by default: ``anygpt.set_verbosity("info")`` shows anygpt's logs and progress bars and lets the libraries it
uses (torch, transformers, diffusers) speak; ``anygpt.logging`` holds the other switches
(``set_verbosity_warning``, ``enable_progress_bar``, ... in the style of ``transformers.logging``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from anygpt.base import logs as logging  # anygpt.logging, as transformers.logging (not in __all__: no shadowing)
from anygpt.base.logs import get_verbosity, set_verbosity
from anygpt.base.modality import Modality

__version__ = "0.1.0"

# Heavy modules are imported on first use so that `import anygpt` (and the command line's start) stays cheap.
_LAZY = {
    "AnyGPTPipeline": "anygpt.core.pipeline",
    "AnyGPTOutput": "anygpt.core.pipeline",
    "GenerationRequest": "anygpt.core.request",
    "RuntimeOptions": "anygpt.core.runtime",
    "Conversation": "anygpt.core.conversation",
    "Audio": "anygpt.base.media",
    "Video": "anygpt.base.media",
}

if TYPE_CHECKING:
    from anygpt.base.media import Audio, Video
    from anygpt.core.conversation import Conversation
    from anygpt.core.pipeline import AnyGPTOutput, AnyGPTPipeline
    from anygpt.core.request import GenerationRequest
    from anygpt.core.runtime import RuntimeOptions


def __getattr__(name: str):
    if name in _LAZY:
        with logging.quiet_libraries():  # the import notices of torch's and diffusers' optional backends
            module = importlib.import_module(_LAZY[name])
        return getattr(module, name)
    raise AttributeError(f"module 'anygpt' has no attribute {name!r}")


__all__ = [
    "Modality",
    "AnyGPTPipeline",
    "AnyGPTOutput",
    "GenerationRequest",
    "RuntimeOptions",
    "Conversation",
    "Audio",
    "Video",
    "get_verbosity",
    "set_verbosity",
    "__version__",
]
