"""anygpt: any-to-any multimodal generation (text, image, video, audio in and out)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

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
        return getattr(importlib.import_module(_LAZY[name]), name)
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
    "__version__",
]
