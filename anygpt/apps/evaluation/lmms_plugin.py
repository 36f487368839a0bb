"""anygpt as an lmms-eval model: ``lmms-eval --model anygpt --model_args pretrained=toyworld --tasks ...``.

Registered through lmms-eval's ``lmms_eval.models`` entry point (``lmms_entry.manifest``); this module is imported
by lmms-eval only (it needs ``lmms-eval``, an optional extra: ``pip install 'anygpt[lmms]'`` in an environment of
its own, see docs/evaluation.md).

Model arguments (``--model_args key=value,...``):
    pretrained: a preset name or a ``save_pretrained`` folder (default ``toyworld``).
    device, dtype: where and in what precision it runs (``RuntimeOptions``; default the CPU in each part's dtype).
    modalities: ``none`` (text answers, the default), or output modalities to produce, e.g. ``image``: the answer is
        then lmms-eval's image-generation contract, the JSON ``{"text": ..., "images": [paths]}`` (audio and video
        paths under ``"audios"`` / ``"videos"``), the files written under ``output_dir``.
    output_dir: where generated media go (default ``anygpt_lmms_outputs``).
    seed: request ``doc_id`` of a task is generated with ``seed + doc_id`` (default 0).
    max_new_tokens: the default reply length when the task's ``generation_kwargs`` give none (default 128).

A visual of a document may be a ``PIL.Image``, a media file path (image, audio or video, told apart by content), or
an audio dict ``{"array", "sampling_rate"}`` as Hugging Face datasets decode audio. ``<image>``-style placeholders in
the context are removed (the pipeline places media itself). ``loglikelihood`` is not supported: anygpt is a
generator, and lmms-eval's likelihood tasks score fixed continuations.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm.auto import tqdm

from anygpt.apps.outputs import save_outputs
from anygpt.base.media import Audio, guess_modality
from anygpt.base.modality import MEDIA_MODALITIES, Modality
from anygpt.core.pipeline import AnyGPTPipeline
from anygpt.core.request import GenerationRequest
from anygpt.core.runtime import RuntimeOptions

__all__ = ["AnyGPTLMMs"]

_PLACEHOLDERS = re.compile(r"<(image|audio|video)>\s*")


class AnyGPTLMMs(lmms):
    """An ``AnyGPTPipeline`` behind lmms-eval's ``lmms`` interface (``generate_until``)."""

    is_simple = True

    def __init__(
        self,
        pretrained: str = "toyworld",
        device: str | None = None,
        dtype: str | None = None,
        modalities: str = "none",
        output_dir: str = "anygpt_lmms_outputs",
        seed: int = 0,
        max_new_tokens: int = 128,
        batch_size: int | str = 1,  # lmms-eval passes it; requests run one at a time
        **unused: Any,
    ) -> None:
        super().__init__()
        runtime = RuntimeOptions(device=device, dtype=dtype) if (device or dtype) else None
        self.pipe = AnyGPTPipeline.from_pretrained(str(pretrained), runtime=runtime)
        self.modalities = [] if str(modalities).lower() in ("none", "") else str(modalities).replace("+", ",")
        self.output_dir = Path(output_dir)
        self.seed = int(seed)
        self.max_new_tokens = int(max_new_tokens)

    # ------------------------------------------------------------------ lmms-eval's interface
    def generate_until(self, requests: list[Instance]) -> list[str]:
        answers = []
        for request in tqdm(requests, desc="anygpt", disable=self.rank != 0):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
            answer = self.answer(context, visuals, dict(gen_kwargs or {}), doc_id=int(doc_id), stem=f"{task}_{doc_id}")
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), answer)
            answers.append(answer)
        return answers

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        return self.generate_until(requests)

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError(
            "anygpt's lmms-eval model generates answers (generate_until); likelihood-scored tasks are not supported"
        )

    # ------------------------------------------------------------------ one request
    def answer(self, context: str, visuals: Any, gen_kwargs: dict[str, Any], *, doc_id: int, stem: str) -> str:
        """The pipeline's answer to one lmms-eval request: the reply text cut at the first ``until`` string, or the
        image-generation JSON when output modalities are set."""
        media = _media(visuals)
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        request = GenerationRequest(
            prompt=_PLACEHOLDERS.sub("", context).strip(),
            modalities=self.modalities,
            seed=self.seed + doc_id,
            max_new_tokens=int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens),
            temperature=temperature,
            top_p=float(gen_kwargs.get("top_p") or 1.0) if temperature > 0 else 1.0,
            **media,
        )
        output = self.pipe.run(request, show_progress=False)
        text = output.text
        for stop in until:
            if stop and stop in text:
                text = text.split(stop, 1)[0]
        if not self.modalities:
            return text
        written = save_outputs(output, self.output_dir, stem)
        reply: dict[str, Any] = {"text": text}
        for modality in MEDIA_MODALITIES:
            if written[modality]:
                reply[modality.plural] = [str(p) for p in written[modality]]
        return json.dumps(reply, ensure_ascii=False)


def _media(visuals: Any) -> dict[str, list[Any]]:
    """A document's visuals as ``GenerationRequest`` media fields."""
    if visuals is None:
        return {}
    items = visuals if isinstance(visuals, list | tuple) else [visuals]
    media: dict[str, list[Any]] = {}
    for item in items:
        if isinstance(item, Image.Image):
            modality, value = Modality.IMAGE, item.convert("RGB")
        elif isinstance(item, str | os.PathLike):
            modality, value = guess_modality(item), str(item)
        elif isinstance(item, dict) and "array" in item and "sampling_rate" in item:
            modality = Modality.AUDIO
            value = Audio(np.asarray(item["array"], dtype=np.float32), int(item["sampling_rate"]))
        else:
            raise TypeError(f"anygpt lmms-eval model: cannot read a visual of type {type(item).__name__}")
        media.setdefault(modality.plural, []).append(value)
    return media
