"""The ``lmms_eval.models`` entry point: announces the ``anygpt`` model to lmms-eval without importing it.

lmms-eval reads every entry point of the group when it starts; the model class (``lmms_plugin``, which loads torch
and the pipeline) is imported only when ``--model anygpt`` is chosen.
"""

from __future__ import annotations

from typing import Any

MODEL_ID = "anygpt"
CLASS_PATH = "anygpt.apps.evaluation.lmms_plugin.AnyGPTLMMs"


def manifest() -> Any:
    """lmms-eval's ``ModelManifest`` of the ``anygpt`` model (a simple, i.e. prompt-string, model)."""
    from lmms_eval.models.registry_v2 import ModelManifest  # lmms-eval is the caller: it is installed

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)
