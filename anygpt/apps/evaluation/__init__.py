"""``anygpt eval``'s harness: tasks, data readers, metric adapters, feature networks, reports, contact sheets.

    >>> from anygpt.apps.evaluation import EvalContext, get_task, run_evaluation  # doctest: +SKIP
    >>> task = get_task("t2i")
    >>> ctx = EvalContext(out=Path("runs/t2i"))
    >>> samples, data = task.samples("dataset_coco.json", ctx, limit=100)
    >>> report = run_evaluation(task, pipe, samples, ctx, model="runs/final", data=data)

The metric math is the libraries' (torchmetrics, pycocoevalcap). ``lmms_plugin`` makes anygpt an lmms-eval model,
announced by the light ``lmms_entry`` module through lmms-eval's ``lmms_eval.models`` entry point. The names below
load on first use, so that lmms-eval's start-up (which reads every entry point) imports nothing heavy.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "DataSet": "data", "Sample": "data", "detect_format": "data", "read_data": "data",
    "NETWORKS": "networks", "FeatureNetworks": "networks",
    "read_predictions": "runner", "run_evaluation": "runner",
    "ENTRY_POINT_GROUP": "tasks", "EvalContext": "tasks", "EvalTask": "tasks", "get_task": "tasks",
    "task_names": "tasks",
}  # fmt: skip

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
