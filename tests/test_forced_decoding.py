"""Forced output modalities and the end of a turn (issue 18): the LLM writes a forced medium's signal group where it
would, never another medium's; a forced group it did not write is appended once, right after the reply's text; and a
reply ends at EOS or at the chat template's end of a turn (its stop strings and role markers), so the template never
shows in it, in the single and the batched path and in what the streamers pass on."""

from __future__ import annotations

import queue
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import StopStringCriteria

from anygpt import GenerationRequest
from anygpt.base.modality import Modality
from anygpt.core.conversation import TEMPLATES, ChatTemplate
from anygpt.core.pipeline import _cut_at_stop
from anygpt.core.tokens import SignalTokenProcessor

IMAGE, VIDEO, AUDIO = Modality.IMAGE, Modality.VIDEO, Modality.AUDIO
REPLY = "Here is a red circle."


def _ids(pipe, text: str) -> list[int]:
    return pipe.tokenizer(text, add_special_tokens=False).input_ids


def _groups(pipe, ids: list[int]) -> dict[Modality, list[int]]:
    """Start positions of each modality's group in ``ids`` (each group checked complete and in order)."""
    found: dict[Modality, list[int]] = {}
    for modality, group in pipe.model.tokens.signal.items():
        starts = [p for p, i in enumerate(ids) if i == group[0]]
        for start in starts:
            assert ids[start : start + len(group)] == group, (modality, ids)
        assert sum(i in group for i in ids) == len(group) * len(starts), (modality, ids)  # no stray members
        if starts:
            found[modality] = starts
    return found


class ScriptedLM:
    """Stands in for the LLM's ``generate``: at each step it wants the next token of its row's script (None: no
    wish) and, next best, the fallback token ``x``, passes its scores through the call's logits processors and takes
    the best, and ends a row at EOS, at the call's stop strings or stopping criteria, or at ``max_new_tokens``, as
    transformers does; it records the calls' keyword arguments."""

    def __init__(self, pipe, scripts: list[list[int | None]]):
        self.pipe = pipe
        self.scripts = scripts
        self.fallback = _ids(pipe, "x")[0]
        self.calls: list[dict] = []

    def __call__(self, *, inputs_embeds, max_new_tokens, logits_processor, eos_token_id, pad_token_id, **kwargs):
        self.calls.append(dict(kwargs, max_new_tokens=max_new_tokens))
        rows = inputs_embeds.shape[0]
        vocab = len(self.pipe.tokenizer)
        criteria = list(kwargs.get("stopping_criteria") or [])
        if kwargs.get("stop_strings"):
            criteria.append(StopStringCriteria(tokenizer=kwargs["tokenizer"], stop_strings=kwargs["stop_strings"]))
        streamer = kwargs.get("streamer")
        if streamer is not None:
            streamer.put(torch.zeros((rows, 0), dtype=torch.long))
        ids = torch.zeros((rows, 0), dtype=torch.long)
        done = torch.zeros(rows, dtype=torch.bool)
        for step in range(max_new_tokens):
            scores = torch.zeros((rows, vocab))
            for row, script in enumerate(self.scripts):
                scores[row, self.fallback] = 5.0
                if step < len(script) and script[step] is not None:
                    scores[row, script[step]] = 10.0
            for processor in logits_processor:
                scores = processor(ids, scores)
            chosen = scores.argmax(dim=-1)
            chosen[done] = pad_token_id
            ids = torch.cat([ids, chosen[:, None]], dim=1)
            if streamer is not None:
                streamer.put(chosen[:, None])
            done |= chosen == eos_token_id
            for criterion in criteria:
                done |= criterion(ids, scores).to(done.device)
            if bool(done.all()):
                break
        if streamer is not None:
            streamer.end()
        return SimpleNamespace(sequences=ids, past_key_values=None)


def _scripted(pipe, monkeypatch, *scripts: list[int | None]) -> ScriptedLM:
    lm = ScriptedLM(pipe, list(scripts))
    monkeypatch.setattr(pipe.model.language_model, "generate", lm)
    return lm


def _generate(pipe, forced, max_new_tokens: int = 64) -> list[int]:
    embeds = torch.zeros((1, 3, pipe.model.language_model.get_input_embeddings().weight.shape[1]))
    ids, _ = pipe.generate_tokens(embeds, forced=forced, max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0)
    return ids


# ------------------------------------------------------------------------------------------------ the end of a turn


def test_end_of_turn_is_the_stop_strings_and_the_role_markers():
    assert TEMPLATES["vicuna_v1"].end_of_turn == ("USER:", "ASSISTANT:")
    assert TEMPLATES["nextgpt_v0"].end_of_turn == ("###",)  # "### Human:" and "### Assistant:" hold its "###"
    assert TEMPLATES["plain"].end_of_turn == ()
    custom = ChatTemplate("c", "", " <|user|> ", "<|bot|>", "\n", "", True, stop=("<|end|>",))
    assert custom.end_of_turn == ("<|end|>", "<|user|>", "<|bot|>")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Hi! ASSISTANT: You are welcome.", "Hi!"),
        ("Hi!\nUSER: thanks ASSISTANT: ok", "Hi!"),
        ("Hi! USER:", "Hi!"),
        ("Hi there, no marker here.", "Hi there, no marker here."),
        ("ASSISTANT: at once", ""),
    ],
)
def test_cut_drops_the_marker_and_everything_after_it(tiny_pipe, text, expected):
    ids = _ids(tiny_pipe, text)
    cut = _cut_at_stop(ids, tiny_pipe.tokenizer, list(TEMPLATES["vicuna_v1"].end_of_turn))
    assert cut == ids[: len(cut)]
    assert tiny_pipe.tokenizer.decode(cut) == expected


def test_cut_keeps_the_signal_group_before_the_marker(tiny_pipe):
    img = tiny_pipe.model.tokens.signal[IMAGE]
    ids = _ids(tiny_pipe, REPLY + " ") + img + _ids(tiny_pipe, " USER: draw more")
    assert tiny_pipe._complete_reply(ids, {IMAGE}) == _ids(tiny_pipe, REPLY + " ") + img


def test_generation_stops_at_the_role_markers_in_every_mode(tiny_pipe, monkeypatch):
    junk = _ids(tiny_pipe, REPLY + " USER: and a sound ASSISTANT: sure")
    for forced in (None, set(), {IMAGE}):
        lm = _scripted(tiny_pipe, monkeypatch, junk)
        ids = _generate(tiny_pipe, forced)
        assert {"USER:", "ASSISTANT:"} <= set(lm.calls[-1]["stop_strings"])
        assert lm.calls[-1]["tokenizer"] is tiny_pipe.tokenizer
        text_ids = [i for i in ids if i not in tiny_pipe.model.tokens.all_signal_ids]
        assert tiny_pipe.tokenizer.decode(text_ids) == REPLY, forced
        assert ids[len(text_ids) :] == ([] if not forced else tiny_pipe.model.tokens.signal[IMAGE])


# --------------------------------------------------------------------------------------------------- forced outputs


def test_processor_allows_the_forced_groups_only(tiny_pipe):
    signal = tiny_pipe.model.tokens.signal
    vocab = len(tiny_pipe.tokenizer)
    for forced in ({IMAGE}, {IMAGE, AUDIO}, {IMAGE, VIDEO, AUDIO}, set(), None):
        processor = SignalTokenProcessor(tiny_pipe.model.tokens, allowed=tiny_pipe._allowed_signals(forced))
        scores = processor(torch.tensor([[5]]), torch.zeros(1, vocab))
        for modality, group in signal.items():
            open_ = forced is None or modality in forced
            assert (scores[0, group[0]] == 0) == open_, (forced, modality)
            assert torch.isinf(scores[0, group[1:]]).all()  # later members never start a group
        if forced:  # a forced group, once started, is written whole
            group = signal[sorted(forced, key=list(signal).index)[0]]
            after = processor(torch.tensor([[5, group[0]]]), torch.zeros(1, vocab))
            assert after[0].argmax().item() == group[1] and torch.isinf(after[0]).sum() == vocab - 1


@pytest.mark.parametrize(
    "forced",
    [{IMAGE}, {AUDIO}, {IMAGE, AUDIO}, {VIDEO, AUDIO}, {IMAGE, VIDEO, AUDIO}],
    ids=lambda f: "+".join(sorted(m.value for m in f)),
)
def test_missing_forced_groups_are_appended_once_right_after_the_text(tiny_pipe, forced):
    signal = tiny_pipe.model.tokens.signal
    text = _ids(tiny_pipe, REPLY)
    eos = tiny_pipe.tokenizer.eos_token_id
    expected = text + [i for m in (IMAGE, VIDEO, AUDIO) if m in forced for i in signal[m]]  # the decoders' order
    assert tiny_pipe._complete_reply(text + [eos] + _ids(tiny_pipe, "junk"), forced) == expected
    assert tiny_pipe._complete_reply(text + _ids(tiny_pipe, " ASSISTANT: junk"), forced) == expected
    assert set(_groups(tiny_pipe, expected)) == forced


def test_a_forced_group_the_model_wrote_is_not_appended_again(tiny_pipe):
    signal = tiny_pipe.model.tokens.signal
    text, eos = _ids(tiny_pipe, REPLY + " "), tiny_pipe.tokenizer.eos_token_id
    written = text + signal[IMAGE] + [eos]
    assert tiny_pipe._complete_reply(written, {IMAGE}) == text + signal[IMAGE]
    assert tiny_pipe._complete_reply(written, {IMAGE, AUDIO}) == text + signal[IMAGE] + signal[AUDIO]
    cut_off = text + signal[AUDIO][:3]  # the token limit ended the model's group: repaired, not doubled
    assert tiny_pipe._complete_reply(cut_off, {AUDIO, IMAGE}) == text + signal[AUDIO] + signal[IMAGE]
    assert tiny_pipe._complete_reply(written, None) == text + signal[IMAGE]  # auto mode: as written
    assert tiny_pipe._complete_reply(text + [eos], None) == text  # nothing appended


def test_the_model_places_a_forced_group_and_cannot_write_another(tiny_pipe, monkeypatch):
    signal = tiny_pipe.model.tokens.signal
    text, eos = _ids(tiny_pipe, REPLY + " "), tiny_pipe.tokenizer.eos_token_id
    # the model wants the image group's first token, then the audio group's, then to end the turn; a refused
    # group's steps fall back to "x"
    script = text + [signal[IMAGE][0]] + [None] * 3 + [signal[AUDIO][0]] + [None] * 7 + [eos]
    x = [_scripted(tiny_pipe, monkeypatch, script).fallback]
    assert _generate(tiny_pipe, {IMAGE}) == text + signal[IMAGE] + x * 8
    _scripted(tiny_pipe, monkeypatch, script)
    assert _generate(tiny_pipe, {IMAGE, AUDIO}) == text + signal[IMAGE] + signal[AUDIO]
    _scripted(tiny_pipe, monkeypatch, script)
    assert _generate(tiny_pipe, {AUDIO, VIDEO}) == text + x * 4 + signal[AUDIO] + signal[VIDEO]
    _scripted(tiny_pipe, monkeypatch, script)
    assert _generate(tiny_pipe, set()) == text + x * 12  # text only: no group at all
    _scripted(tiny_pipe, monkeypatch, script)
    assert _generate(tiny_pipe, None) == text + signal[IMAGE] + signal[AUDIO]  # auto mode: as the model wants


def test_a_forced_call_renders_each_forced_medium_once(tiny_pipe, monkeypatch):
    signal = tiny_pipe.model.tokens.signal
    text = _ids(tiny_pipe, REPLY + " ")
    junk = _ids(tiny_pipe, " ASSISTANT: , and a sound USER: again")
    _scripted(tiny_pipe, monkeypatch, text + [signal[IMAGE][0], None, None, None] + junk)
    settings = dict(seed=0, num_inference_steps=1, show_progress=False)
    out = tiny_pipe("draw a red circle", modalities=["image", "audio"], **settings)
    assert out.text == REPLY and out.token_ids == text + signal[IMAGE] + signal[AUDIO]
    assert len(out.images) == 1 and len(out.audios) == 1 and out.videos == []


def test_the_batched_path_forces_and_stops_as_a_single_call(tiny_pipe, monkeypatch):
    signal = tiny_pipe.model.tokens.signal
    text, eos = _ids(tiny_pipe, REPLY + " "), tiny_pipe.tokenizer.eos_token_id
    scripts = [
        text + [signal[IMAGE][0], None, None, None, eos],  # writes the forced image group
        text[:-1] + _ids(tiny_pipe, " USER: and a clip"),  # runs into the template, forced video and audio
        text + [signal[AUDIO][0]] + [None] * 7 + [eos],  # text only: the audio group is refused
        text + [signal[AUDIO][0]] + [None] * 7 + _ids(tiny_pipe, "ASSISTANT:"),  # auto
    ]
    lm = _scripted(tiny_pipe, monkeypatch, *scripts)
    modalities = [["image"], ["video", "audio"], [], "auto"]
    requests = [GenerationRequest(f"p{i}", modalities=m, max_new_tokens=40) for i, m in enumerate(modalities)]
    monkeypatch.setattr(tiny_pipe, "_render_batch", lambda *args: None)  # the media are not this test's subject
    outputs = tiny_pipe.run_batch(requests)
    assert len(lm.calls) == 1 and "USER:" in lm.calls[0]["stopping_criteria"][0].stop_strings.stop_strings
    assert outputs[0].token_ids == text + signal[IMAGE]
    assert outputs[1].token_ids == text[:-1] + signal[VIDEO] + signal[AUDIO]
    assert outputs[2].token_ids == text + [lm.fallback] * 8
    assert outputs[3].token_ids == text + signal[AUDIO]
    assert all(out.text == REPLY for out in outputs[:2])


# -------------------------------------------------------------------------------------------------------- streaming


def _stream_through(pipe, streamer, text: str) -> None:
    streamer.put(torch.zeros((1, 0), dtype=torch.long))  # generate() first passes the (empty) prompt
    for token in _ids(pipe, text):
        streamer.put(torch.tensor([[token]]))
    streamer.end()


@pytest.mark.parametrize("tail", [" ASSISTANT: You are welcome.", " USER: thanks", " ASSIST"])
def test_streamers_never_pass_a_role_marker(tiny_pipe, tail):
    from anygpt.apps.chat import _QueueStreamer
    from anygpt.apps.server.worker import DeltaStreamer, stop_strings

    stops = stop_strings(tiny_pipe)
    assert {"USER:", "ASSISTANT:"} <= set(stops)
    events: queue.Queue = queue.Queue()
    streamer = _QueueStreamer(tiny_pipe.tokenizer, events, threading.Event(), stops)
    _stream_through(tiny_pipe, streamer, "Hi!" + tail)
    pieces = []
    while not events.empty():
        pieces.append(events.get_nowait()[1])
    sent: list[str] = []
    server = DeltaStreamer(tiny_pipe.tokenizer, sent.append, stops)
    _stream_through(tiny_pipe, server, "Hi!" + tail)
    if tail == " ASSIST":  # the reply ended there (the token limit): the demo shows all, the server sends the rest
        assert "".join(pieces) == "Hi! ASSIST" and "".join(sent) == "Hi!"
    else:
        assert "".join(pieces).rstrip() == "Hi!" and "".join(sent) == "Hi!"
        assert not any(c in "".join(pieces) for c in "AU")  # no partial marker was ever shown


# ------------------------------------------------------------------------------------------------ the shipped model


def test_toyworld_forced_image_reply_is_the_trained_answer(toyworld):
    from toyworld.oracles import image_attributes

    out = toyworld("draw a red circle", modalities=["image"], seed=0, num_inference_steps=4, show_progress=False)
    assert out.text == REPLY
    assert list(_groups(toyworld, out.token_ids)) == [IMAGE] and len(_groups(toyworld, out.token_ids)[IMAGE]) == 1
    assert len(out.images) == 1 and out.videos == [] and out.audios == []
    assert image_attributes(np.asarray(out.images[0].convert("RGB")))["colour"] == "red"


@pytest.mark.parametrize(("modalities", "groups"), [([], []), ("auto", [IMAGE]), (["audio"], [AUDIO])])
def test_toyworld_replies_never_show_the_template(toyworld, modalities, groups):
    out = toyworld("draw a red circle", modalities=modalities, seed=0, num_inference_steps=1, show_progress=False)
    assert "USER" not in out.text and "ASSISTANT" not in out.text, out.text
    assert out.text.startswith(REPLY)
    assert list(_groups(toyworld, out.token_ids)) == groups
