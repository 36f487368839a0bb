"""Training examples (layout, labels, truncation) and the batch plan."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from anygpt.base.modality import Modality
from anygpt.core.conversation import Conversation, MediaRef
from training.data.records import Dialogue, MediaFile, OutputMedia, Pair, Turn
from training.examples import IGNORE_INDEX, ExampleBuilder, collate, pair_to_dialogue
from training.sampling import BatchPlan


@pytest.fixture(scope="module")
def model(tiny_pipe):
    return tiny_pipe.model


def _builder(model, max_length=512, task="caption"):
    return ExampleBuilder(model, max_length=max_length, pair_task=task, caption_prompts=["describe it"])


IMAGE = MediaFile(Modality.IMAGE, Path("/data/a.png"), "d/a.png")


def test_prompt_layout_equals_inference(model):
    """The tokens before the reply are exactly what the pipeline feeds the LLM for the same user turn."""
    dialogue = Dialogue("d", 0, [Turn("user", "<image>\nwhat is this?", inputs=[IMAGE]), Turn("assistant", "a cat")])
    example = _builder(model).build(dialogue)
    conv = Conversation(template=model.config.llm.template)
    conv.add_user("what is this?", [MediaRef(Modality.IMAGE, "k")])
    prompt, order = model.tokenize_pieces(conv.prompt_pieces(model.tokenizer.eos_token_id))
    assert example.input_ids[: len(prompt)] == prompt
    assert len(order) == len(example.media) == 1
    # everything after the prompt is the reply, supervised, ending with EOS
    reply = example.input_ids[len(prompt) :]
    assert example.labels[len(prompt) :] == reply and reply[-1] == model.tokenizer.eos_token_id
    assert all(label == IGNORE_INDEX for label in example.labels[: len(prompt)])
    assert model.tokenizer.decode(reply, skip_special_tokens=True).strip() == "a cat"


def test_media_placed_as_at_inference_whatever_the_dataset_text(model):
    """MosIT / LLaVA put <image> mid-text; training lays the turn out as the chat does: media, newline, text."""
    inline = Dialogue(
        "d", 0, [Turn("user", "I drew this. <image> What do you see?", inputs=[IMAGE]), Turn("assistant", "ok")]
    )
    example = _builder(model).build(inline)
    conv = Conversation(template=model.config.llm.template)
    conv.add_user("I drew this. What do you see?", [MediaRef(Modality.IMAGE, "k")])
    prompt, _ = model.tokenize_pieces(conv.prompt_pieces(model.tokenizer.eos_token_id))
    assert example.input_ids[: len(prompt)] == prompt


def test_caption_pair_supervises_the_caption_only(model):
    pair = Pair("cc3m", 3, IMAGE, "a red circle")
    example = _builder(model, task="caption").build(pair)
    supervised = [i for i, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE_INDEX]
    assert model.tokenizer.decode(supervised, skip_special_tokens=True).strip() == "a red circle"
    placeholder = model.tokens.placeholder[Modality.IMAGE]
    assert example.input_ids.count(placeholder) == model.num_media_tokens(Modality.IMAGE)
    assert example.media == [IMAGE] and example.outputs == []


def test_generation_pair_supervises_caption_and_signal_tokens(model):
    pair = Pair("cc3m", 0, IMAGE, "a red circle")
    dialogue = pair_to_dialogue(pair, "generate", ["x"])
    assert dialogue.turns[0].text == "a red circle" and dialogue.turns[1].outputs[0].caption == "a red circle"
    example = _builder(model, task="generate").build(pair)
    group = model.tokens.signal[Modality.IMAGE]
    start = example.input_ids.index(group[0])
    assert example.input_ids[start : start + len(group)] == group
    assert example.labels[start : start + len(group)] == group  # the model learns to emit the group
    assert [o.modality for o in example.outputs] == [Modality.IMAGE] and example.media == []
    text = [i for i, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE_INDEX]
    assert "a red circle" in model.tokenizer.decode(text, skip_special_tokens=True)


def test_multi_turn_supervises_every_assistant_turn(model):
    out = OutputMedia(Modality.AUDIO, "a high beep")
    dialogue = Dialogue(
        "mosit",
        0,
        [
            Turn("user", "hello"),
            Turn("assistant", "hi"),
            Turn("user", "play a beep"),
            Turn("assistant", "here <audio> done", outputs=[out]),
        ],
    )
    example = _builder(model).build(dialogue)
    text = model.tokenizer.decode(
        [i for i, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE_INDEX],
        skip_special_tokens=True,
    )
    assert "hi" in text and "here" in text and "done" in text and "hello" not in text and "beep" not in text
    assert example.outputs == [out]


def test_truncation_never_splits_a_group(model):
    pair = Pair("cc3m", 0, IMAGE, "a very long caption " * 3)
    full = _builder(model, task="generate").build(pair)
    group = model.tokens.signal[Modality.IMAGE]
    start = full.input_ids.index(group[0])
    cut = _builder(model, max_length=start + 2, task="generate").build(pair)  # would cut inside the group
    assert cut.truncated and len(cut.input_ids) == start and cut.outputs == []
    assert len(cut.labels) == len(cut.input_ids)


def test_collate_pads_right(model):
    builder = _builder(model)
    a = builder.build(Pair("d", 0, IMAGE, "a"))
    b = builder.build(Pair("d", 1, IMAGE, "a much longer caption"))
    batch = collate([a, b], pad_id=model.tokenizer.pad_token_id)
    n = len(a.input_ids)
    assert batch["input_ids"].shape == (2, len(b.input_ids))
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (len(b.input_ids) - n)
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all()


# ---------------------------------------------------------------------------------------------- batch plan
def test_round_robin_batches_come_from_one_dataset_in_proportion():
    plan = BatchPlan([10, 10, 10], [2.0, 1.0, 1.0], global_batch=4, mode="round_robin", seed=0)
    owners = []
    for step in range(40):
        batch = plan.batch(step)
        assert len({d for d, _ in batch}) == 1
        owners.append(batch[0][0])
    assert Counter(owners) == {0: 20, 1: 10, 2: 10}


def test_mixed_batches_draw_by_weight_and_cover_each_dataset():
    plan = BatchPlan([5, 50], [1.0, 3.0], global_batch=8, mode="mixed", seed=1)
    items = [item for step in range(100) for item in plan.batch(step)]
    counts = Counter(d for d, _ in items)
    assert 0.2 < counts[0] / len(items) < 0.3
    first_pass = [i for d, i in items if d == 0][:5]
    assert sorted(first_pass) == list(range(5))  # each pass over a dataset reads every record once


def test_plan_is_deterministic_and_shards_partition_the_global_batch():
    a = BatchPlan([7, 9], [1.0, 1.0], global_batch=8, mode="mixed", seed=3)
    b = BatchPlan([7, 9], [1.0, 1.0], global_batch=8, mode="mixed", seed=3)
    assert [a.batch(s) for s in range(5)] == [b.batch(s) for s in range(5)]
    for step in range(5):
        parts = [a.shard(step, rank, 2, micro, 2) for micro in range(2) for rank in range(2)]
        assert [x for p in parts for x in p] == a.batch(step) and all(len(p) == 2 for p in parts)
    c = BatchPlan([7, 9], [1.0, 1.0], global_batch=8, mode="mixed", seed=4)
    assert [a.batch(s) for s in range(5)] != [c.batch(s) for s in range(5)]
