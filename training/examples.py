"""Records -> token sequences with labels: the chat template of the model, applied as at inference.

The layout is the one ``anygpt.core.conversation.Conversation.prompt_pieces`` gives at inference (system, ``USER:``,
the turn's media, a newline, its text, ``ASSISTANT:``, reply, end of turn), so what the model is trained on is what
it reads when it chats: a user turn's media go first whatever their place in the dataset's text (as LLaVA does).
Text that belongs together is tokenised as one string (as at inference); which of its tokens are supervised comes
from the tokenizer's character offsets.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from anygpt.base.modality import Modality
from anygpt.core.conversation import get_template
from anygpt.core.tokens import PLACEHOLDER
from training.data.records import Dialogue, MediaFile, OutputMedia, Pair, Record, Turn, split_placeholders

IGNORE_INDEX = -100


@dataclass
class Example:
    """One tokenised training example.

    Attributes:
        input_ids, labels: same length; labels are ``IGNORE_INDEX`` where nothing is supervised.
        media: input media in the order of their placeholder runs.
        outputs: output media in the order of their signal groups.
        reply_modality: what its reply produces (``reply_modality``): with per-modality LoRA adapters, the adapter
            it runs with and trains.
    """

    input_ids: list[int]
    labels: list[int]
    media: list[MediaFile] = field(default_factory=list)
    outputs: list[OutputMedia] = field(default_factory=list)
    dataset: str = ""
    truncated: bool = False
    reply_modality: Modality = Modality.TEXT


def reply_modality(dialogue: Dialogue) -> Modality:
    """The modality of the first media output of the dialogue's last assistant turn; text when it outputs none.

    With per-modality LoRA adapters (``lora.adapters``) an example runs with, and trains, this modality's adapter
    (the whole sequence, every earlier turn included): the adapter the pipeline chooses by default when a request
    asks for that output.
    """
    for turn in reversed(dialogue.turns):
        if turn.role == "assistant":
            return turn.outputs[0].modality if turn.outputs else Modality.TEXT
    return Modality.TEXT


def pair_to_dialogue(pair: Pair, task: str, caption_prompts: list[str]) -> Dialogue:
    """A caption pair as a one-exchange conversation.

    ``caption``: media in, caption out (stage 1; NExT-GPT's "generate a caption" prompt).
    ``generate``: caption in, caption followed by the media's signal tokens out (stage 2, as NExT-GPT).
    """
    modality = pair.media.modality
    tag = PLACEHOLDER[modality]
    if task == "caption":
        prompt = caption_prompts[pair.index % len(caption_prompts)]
        turns = [
            Turn("user", f"{tag}\n{prompt}", inputs=[pair.media]),
            Turn("assistant", pair.caption),
        ]
    elif task == "generate":
        output = OutputMedia(modality, pair.caption, pair.caption_embedding, pair.media)
        turns = [Turn("user", pair.caption), Turn("assistant", f"{pair.caption} {tag}", outputs=[output])]
    else:
        raise ValueError(f"unknown pair task {task!r}: expected 'caption' or 'generate'")
    return Dialogue(pair.dataset, pair.index, turns)


def _tidy(text: str) -> str:
    """Text whose placeholders were taken out: no doubled spaces, no leading or trailing whitespace."""
    lines = [" ".join(line.split()) for line in text.strip().splitlines()]
    return "\n".join(line for line in lines if line)


class ExampleBuilder:
    """Turns records into ``Example``s for one model.

    Args:
        model: the ``AnyGPTModel`` (tokenizer, added tokens, template, tokens per media item).
        max_length: longest sequence.
        pair_task: how to use caption pairs (``caption`` or ``generate``).
        caption_prompts: prompts of captioning examples.
    """

    def __init__(self, model, *, max_length: int, pair_task: str, caption_prompts: list[str]):
        self.model = model
        self.tokenizer = model.tokenizer
        self.template = get_template(model.config.llm.template)
        self.max_length = max_length
        self.pair_task = pair_task
        self.caption_prompts = list(caption_prompts)

    # ------------------------------------------------------------------ layout
    def pieces(self, dialogue: Dialogue) -> list[tuple[str | list[int] | MediaFile | OutputMedia, bool]]:
        """(piece, supervised) in order: text, token ids, an input media item or an output's signal group."""
        tpl = self.template
        eos = self.tokenizer.eos_token_id
        out: list[tuple] = []
        if tpl.system:
            out.append((tpl.system + tpl.sep, False))
        for turn in dialogue.turns:
            if turn.role == "user":
                # as at inference (Conversation.prompt_pieces): the turn's media first, a newline, then its text
                out.append((f"{tpl.user} " if tpl.user else "", False))
                for item in turn.inputs:
                    out.append((item, False))
                if turn.inputs:
                    out.append(("\n", False))
                text = "".join(p for p in split_placeholders(turn.text) if not isinstance(p, Modality))
                out.append((_tidy(text) if turn.inputs else turn.text, False))
                out.append((tpl.sep, False))
            else:
                out.append((tpl.assistant, False))
                outputs = iter(turn.outputs)
                first = True
                for part in split_placeholders(turn.text):
                    if isinstance(part, Modality):  # (a str enum: test it first)
                        out.append((next(outputs), True))
                    else:
                        out.append(((" " if first and tpl.assistant else "") + part, True))
                    first = False
                out.append((tpl.assistant_end, True))
                if tpl.end_with_eos and eos is not None:
                    out.append(([eos], True))
        return [(p, s) for p, s in out if not (isinstance(p, str | list) and len(p) == 0)]

    # ------------------------------------------------------------------ tokenisation
    def _tokenize_text(self, run: list[tuple[str, bool]]) -> tuple[list[int], list[bool]]:
        text = "".join(t for t, _ in run)
        spans, pos = [], 0
        for t, supervised in run:
            spans.append((pos, pos + len(t), supervised))
            pos += len(t)
        if getattr(self.tokenizer, "is_fast", False):
            enc = self.tokenizer(text, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True)
            flags = []
            for start, end in enc.offset_mapping:
                flags.append(any(s < max(end, start + 1) and e > start and sup for s, e, sup in spans))
            return list(enc.input_ids), flags
        ids, flags = [], []  # slow tokenizer: segments one by one
        for t, supervised in run:
            seg = self.tokenizer(t, add_special_tokens=False, split_special_tokens=True).input_ids
            ids.extend(seg)
            flags.extend([supervised] * len(seg))
        return ids, flags

    def build(self, record: Record) -> Example:
        is_pair = isinstance(record, Pair)
        dialogue = pair_to_dialogue(record, self.pair_task, self.caption_prompts) if is_pair else record
        model = self.model
        ids: list[int] = []
        sup: list[bool] = []
        runs: list[tuple[int, int, str, int]] = []  # (start, end, "media"|"output", index) atomic spans
        media: list[MediaFile] = []
        outputs: list[OutputMedia] = []
        if self.tokenizer.bos_token_id is not None:
            ids.append(self.tokenizer.bos_token_id)
            sup.append(False)
        text_run: list[tuple[str, bool]] = []

        def flush() -> None:
            if text_run:
                t_ids, t_sup = self._tokenize_text(text_run)
                ids.extend(t_ids)
                sup.extend(t_sup)
                text_run.clear()

        for piece, supervised in self.pieces(dialogue):
            if isinstance(piece, str):
                text_run.append((piece, supervised))
                continue
            flush()
            start = len(ids)
            if isinstance(piece, MediaFile):
                n = model.num_media_tokens(piece.modality)
                ids.extend([model.tokens.placeholder[piece.modality]] * n)
                sup.extend([False] * n)
                runs.append((start, len(ids), "media", len(media)))
                media.append(piece)
            elif isinstance(piece, OutputMedia):
                group = model.tokens.signal[piece.modality]
                ids.extend(group)
                sup.extend([supervised] * len(group))
                runs.append((start, len(ids), "output", len(outputs)))
                outputs.append(piece)
            else:
                ids.extend(int(i) for i in piece)
                sup.extend([supervised] * len(piece))
        flush()

        truncated = len(ids) > self.max_length
        if truncated:
            cut = self.max_length
            for start, end, _, _ in runs:
                if start < cut < end:
                    cut = start  # never split a media run or a signal group
            ids, sup = ids[:cut], sup[:cut]
            media = media[: sum(1 for s, e, kind, _ in runs if kind == "media" and e <= cut)]
            outputs = outputs[: sum(1 for s, e, kind, _ in runs if kind == "output" and e <= cut)]
        labels = [i if s else IGNORE_INDEX for i, s in zip(ids, sup, strict=True)]
        return Example(
            ids,
            labels,
            media,
            outputs,
            dataset=dialogue.dataset,
            truncated=truncated,
            reply_modality=reply_modality(dialogue),
        )


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch: ``input_ids``, ``labels``, ``attention_mask`` of shape (B, T)."""
    length = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}
