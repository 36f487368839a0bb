"""``run_batch`` (what ``anygpt serve`` answers its concurrent requests with) against single ``run`` calls.

What is equal, and how (``AnyGPTPipeline.run_batch``'s docstring and docs/serving.md): every row's token ids are
those of the same request alone, greedy or sampled with a seed, whatever the batch around it (prompts of other
lengths, other settings, another order); a row whose choice came within rounding of another is answered again by
``run`` and is then bit-identical, media included. The batched rows' numbers differ in their last bits: the decoder
conditioning by up to ~1e-6 (asserted: 1e-5) and the media by up to 1 of 255 levels (asserted: 2), because a batched
matrix product rounds differently from a lone one.

The ``tiny`` preset has random weights: replies are noise, so the tests check equalities, never content.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import TopPLogitsWarper

import anygpt.core.batch as batch_module
from anygpt.core.batch import _clear_best, _clear_draw
from anygpt.core.conversation import Conversation
from anygpt.core.request import GenerationRequest

FAST = {"num_inference_steps": 2}


def _requests() -> list[GenerationRequest]:
    """Seven prompts of different lengths (so most rows are left-padded): greedy, sampled (with and without top-p,
    several temperatures), each medium forced, the model's choice, and two media at once."""
    return [
        GenerationRequest("draw a red circle", modalities=["image"], seed=1, max_new_tokens=8, **FAST),
        GenerationRequest(
            "a much longer prompt, with more words than the others, so that they are padded",
            modalities=["image"],
            seed=2,
            max_new_tokens=10,
            **FAST,
        ),
        GenerationRequest("hi", modalities=[], seed=3, max_new_tokens=9, temperature=0.9, top_p=0.8),
        GenerationRequest("sing", modalities=["audio"], seed=4, max_new_tokens=5, temperature=1.0, **FAST),
        GenerationRequest("film a ball", modalities=["video"], seed=5, max_new_tokens=7, **FAST),
        GenerationRequest("anything at all", seed=6, max_new_tokens=12, temperature=1.3),
        GenerationRequest("both", modalities=["image", "audio"], seed=7, max_new_tokens=6, top_p=0.5, **FAST),
    ]


def _numbers(item) -> np.ndarray:
    if isinstance(item, Image.Image):
        return np.asarray(item).astype(np.float64)
    return (item.frames if hasattr(item, "frames") else item.waveform).astype(np.float64)


def _media(output) -> list[np.ndarray]:
    return [_numbers(item) for kind in ("images", "videos", "audios") for item in getattr(output, kind)]


def _assert_same_reply(single, batched, *, bitwise: bool) -> None:
    assert batched.token_ids == single.token_ids and batched.text == single.text
    assert batched.conditioning.keys() == single.conditioning.keys()
    assert [m.shape for m in _media(batched)] == [m.shape for m in _media(single)]
    for name, cond in single.conditioning.items():
        if bitwise:
            assert torch.equal(batched.conditioning[name], cond)
        else:
            torch.testing.assert_close(batched.conditioning[name], cond, rtol=0, atol=1e-5)
    for a, b in zip(_media(single), _media(batched), strict=True):
        if bitwise:
            assert np.array_equal(a, b)
        else:
            assert np.abs(a - b).max() <= 2  # measured: at most 1 level


@pytest.fixture()
def redone(tiny_pipe, monkeypatch) -> list[tuple[GenerationRequest, int | None]]:
    """The requests ``run_batch`` answered again alone, in the order they ran, each with the number of token ids its
    streamer (a ``Collect``) held from the batch when the lone run started."""
    rows: list[tuple[GenerationRequest, int | None]] = []
    real = tiny_pipe.run

    def run(request, **kwargs):
        inner = getattr(kwargs.get("streamer"), "streamer", None)  # run_batch's _Resumed wrapper
        rows.append((request, len(inner.ids) if isinstance(inner, Collect) else None))
        return real(request, **kwargs)

    monkeypatch.setattr(tiny_pipe, "run", run)
    return rows


def test_prompts_of_different_lengths_batched_equal_single_calls(tiny_pipe, redone):
    requests = _requests()
    alone = [tiny_pipe.run(r, show_progress=False) for r in requests]
    redone.clear()
    together = tiny_pipe.run_batch(requests)
    assert redone == []  # no choice came near a tie: every row is the batch's own
    for single, batched in zip(alone, together, strict=True):
        _assert_same_reply(single, batched, bitwise=False)
    assert any(o.images for o in together) and any(o.audios for o in together) and any(o.videos for o in together)


def test_the_batch_around_a_request_does_not_change_it(tiny_pipe):
    """Each sampled row draws from its own generator: the same request in another batch, at another place, or
    twice in one batch gives the same tokens; another seed gives others."""
    requests = _requests()
    first = tiny_pipe.run_batch(requests)
    again = tiny_pipe.run_batch([requests[5], requests[2], requests[5], requests[0]])
    assert [o.token_ids for o in again] == [first[i].token_ids for i in (5, 2, 5, 0)]
    other = GenerationRequest("anything at all", seed=60, max_new_tokens=12, temperature=1.3)
    assert tiny_pipe.run_batch([requests[5], other])[1].token_ids != first[5].token_ids


class Collect:
    """A streamer that keeps the token ids it is given (after the prompt's) and counts ``end`` calls."""

    def __init__(self):
        self.ids: list[int] = []
        self.puts = 0
        self.ended = 0

    def put(self, value):
        self.puts += 1
        if self.puts > 1:  # the first put is the prompt's ids
            self.ids.extend(value.reshape(-1).tolist())

    def end(self):
        self.ended += 1


def test_rows_near_a_tie_are_answered_alone_bit_for_bit(tiny_pipe, redone, monkeypatch):
    """A margin far wider than rounding makes the check catch rows at their first token and later ones (greedy and
    sampled): those rows are ``run``'s replies bit for bit (media included); every streamer gets the token ids a
    lone call streams, each once (a caught row's first ones from the batch, the rest from its lone run), and ends
    once; every conversation holds one exchange."""
    requests = _requests()
    lone = [Collect() for _ in requests]
    alone = [tiny_pipe.run(r, show_progress=False, streamer=c) for r, c in zip(requests, lone, strict=True)]
    monkeypatch.setattr(batch_module, "EXACT_MARGIN_EPS", 3e5)  # 2 x 0.036 logits for these |logits| < 1
    streamers = [Collect() for _ in requests]
    conversations = [Conversation() for _ in requests]
    redone.clear()
    together = tiny_pipe.run_batch(requests, conversations=conversations, streamers=streamers)
    again = [requests.index(r) for r, _ in redone]
    assert again and len(again) < len(requests), "the margin should catch some rows and not others"
    assert any(requests[i].temperature > 0 for i in again)
    assert any(held > 0 for _, held in redone), "some row should be caught after its first token"
    for row, (single, batched) in enumerate(zip(alone, together, strict=True)):
        _assert_same_reply(single, batched, bitwise=row in again)
        assert streamers[row].ids == lone[row].ids
        assert streamers[row].ended == 1
        assert [t.role for t in conversations[row].turns] == ["user", "assistant"]


def test_exact_false_keeps_the_batchs_choices(tiny_pipe, redone, monkeypatch):
    monkeypatch.setattr(batch_module, "EXACT_MARGIN_EPS", 1e9)
    redone.clear()
    tiny_pipe.run_batch(_requests()[:3], exact=False)
    assert redone == []
    tiny_pipe.run_batch(_requests()[:3])
    assert len(redone) == 3  # every choice is "near" with such a margin


def test_the_replayed_draw_is_torch_multinomials():
    """``_clear_draw`` replays ``torch.multinomial``'s exponential race from the generator's state: it must pick the
    token ``torch.multinomial`` picked (else every sampled row would be answered again alone); two equally likely
    tokens are never a clear draw once the scores may move."""
    generator = torch.Generator().manual_seed(0)
    for trial in range(200):
        scores = torch.randn(1, 300, generator=generator) * (1 + trial % 7)
        probs = torch.softmax(scores, dim=-1)
        state = generator.get_state()
        token = torch.multinomial(probs, 1, generator=generator)
        assert _clear_draw(scores, probs, 1.0, token, state, 0.0)
    scores = torch.tensor([[5.0, 5.0, -30.0]])
    probs = torch.softmax(scores, dim=-1)
    for seed in range(20):
        generator = torch.Generator().manual_seed(seed)
        state = generator.get_state()
        token = torch.multinomial(probs, 1, generator=generator)
        assert not _clear_draw(scores, probs, 1.0, token, state, 20.0)  # the race itself decides, by < e^40


def test_a_token_at_the_top_p_cut_that_would_win_makes_the_draw_unclear():
    """Probabilities 0.5, 0.3, 0.2 with top-p 0.5: the cumulative sums (smallest first) are 0.2, 0.5, 1.0, so the
    0.3 token sits on the cut, kept or dropped by rounding. A draw is clear only when the token drawn also beats it
    in the race; with top-p 0.6 no token is near the cut and every draw here is clear."""
    scores = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    seen = set()
    for seed in range(40):
        q = torch.empty(1, 3).exponential_(1, generator=torch.Generator().manual_seed(seed))
        race = (torch.softmax(scores, dim=-1) / q)[0]
        if abs(float(torch.log(race[0] / race[1]))) < 0.01:
            continue  # too close to call in this test
        for top_p, near_cut in ((0.5, True), (0.6, False)):
            probs = torch.softmax(TopPLogitsWarper(top_p)(None, scores.clone()), dim=-1)
            generator = torch.Generator().manual_seed(seed)
            state = generator.get_state()
            token = torch.multinomial(probs, 1, generator=generator)
            clear = _clear_draw(scores, probs, top_p, token, state, 1e-4)
            if near_cut:
                assert clear == (int(token) == 0 and bool(race[0] > race[1]))
                seen.add(clear)
            else:
                assert clear and int(token) == int(race[:2].argmax())
    assert seen == {True, False}


def test_clear_best():
    assert _clear_best(torch.tensor([[1.0, 0.5, -1.0]]), 0.2)
    assert not _clear_best(torch.tensor([[1.0, 0.9, -1.0]]), 0.06)
    assert _clear_best(torch.tensor([[0.0, float("-inf"), float("-inf")]]), 10.0)  # a token forced in a group
