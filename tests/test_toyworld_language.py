"""The toy world as people use it: other renderings of the same things, casual phrasings, second turns, media ->
media requests, requests for what the world lacks, and the evaluator rows that measure them."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from anygpt.base.modality import Modality
from toyworld import world
from toyworld.oracles import audio_attributes, caption_attributes, image_attributes, video_attributes
from toyworld.render import render_motion

ORACLES = {Modality.IMAGE: image_attributes, Modality.AUDIO: audio_attributes, Modality.VIDEO: video_attributes}


# ------------------------------------------------------------------------------------------------ renderings


def test_default_items_render_as_before():
    """The fields added for other renderings default to the world's own: 64 x 64, 8 frames at 8 fps, 1 s."""
    clip = world.VideoItem("red", "left", side=14, offset=3).render()
    expected = render_motion(world.COLOURS["red"], "left", frames=8, size=64, side=14, offset=3)
    assert clip.fps == 8.0 and np.array_equal(clip.frames, expected)
    assert world.ImageItem("blue", "circle").render().shape == (64, 64, 3)
    assert world.AudioItem("low", "steady").render().waveform.shape == (16000,)


def test_motion_path_covers_the_asked_part_of_the_way():
    frames = render_motion((255, 0, 0), "right", frames=5, size=64, side=10, start=0.25, end=0.75)
    xs = [np.nonzero((f[..., 1] == 0).any(axis=0))[0][0] for f in frames]  # left edge of the square per frame
    travel = 64 - 10
    assert xs[0] == round(0.25 * travel) and xs[-1] == round(0.75 * travel)
    assert all(b > a for a, b in zip(xs, xs[1:], strict=False))
    with pytest.raises(ValueError, match="start and end"):
        render_motion((255, 0, 0), "up", start=0.6, end=0.4)


@pytest.mark.parametrize("split", ["train", "heldout"])
@pytest.mark.parametrize("modality", [Modality.IMAGE, Modality.AUDIO, Modality.VIDEO])
def test_varied_renderings_keep_the_caption_and_show_its_attributes(split, modality):
    rng = np.random.default_rng(3)
    for _ in range(40):
        item = world.draw_item(rng, modality)
        varied = world.vary(item, rng, split)
        assert varied.caption == item.caption
        found = ORACLES[modality](world.media_input(varied))
        assert {k: found[k] for k in item.attributes()} == item.attributes(), varied


def test_heldout_rendering_settings_are_never_trained_on():
    train, heldout = world.RENDERINGS["train"], world.RENDERINGS["heldout"]
    assert set(train) == set(heldout)
    for key in train:
        assert not set(train[key]) & set(heldout[key]), key
    rng = np.random.default_rng(0)
    clips = [world.vary(world.draw_video(rng), rng, "heldout") for _ in range(30)]
    assert {c.frames for c in clips} <= set(heldout["frames"]) and {c.size for c in clips} <= set(heldout["size"])
    rendered = clips[0].render()
    assert rendered.frames.shape == (clips[0].frames, clips[0].size, clips[0].size, 3)
    assert rendered.fps == clips[0].fps
    with pytest.raises(ValueError, match="split"):
        world.vary(clips[0], rng, "test")


# ------------------------------------------------------------------------------------------------ language


def test_casual_phrasing_keeps_the_request_words():
    rng = np.random.default_rng(1)
    seen_cases = set()
    for _ in range(200):
        request = world.draw_request(rng, 1)
        typed = world.casual(rng, request.prompt)
        assert request.prompt in typed.lower()
        seen_cases.add("upper" if typed.isupper() else "capital" if typed[:1].isupper() else "lower")
    assert seen_cases == {"upper", "capital", "lower"}
    assert world.casual(np.random.default_rng(5), "draw a red circle") == world.casual(
        np.random.default_rng(5), "draw a red circle"
    )


def test_casual_requests_name_every_item():
    rng = np.random.default_rng(2)
    for _ in range(100):
        request = world.draw_casual_request(rng)
        lowered = request.prompt.lower()
        for item in request.items:
            assert world.bare(item.caption) in lowered


@pytest.mark.parametrize("modality", [Modality.IMAGE, Modality.AUDIO, Modality.VIDEO])
def test_a_follow_up_changes_exactly_one_attribute(modality):
    rng = np.random.default_rng(4)
    for _ in range(60):
        item = world.draw_item(rng, modality)
        (changed,) = world.draw_follow_up(rng, item).items
        before, after = item.attributes(), changed.attributes()
        assert type(changed) is type(item)
        assert sum(before[k] != after[k] for k in before) == 1


def test_media_requests_answer_from_the_source_item():
    rng = np.random.default_rng(6)
    kinds = set()
    for _ in range(200):
        request = world.draw_media_request(rng)
        (out,) = request.items
        source = request.source
        kinds.add((source.modality, out.modality))
        if source.modality is Modality.VIDEO and out.modality is Modality.IMAGE:
            assert out.attributes() == {"colour": source.colour, "shape": "square"}
        elif out.modality is Modality.VIDEO:
            assert out.colour == source.colour
        else:  # an image recoloured or reshaped: one attribute changed
            assert sum(source.attributes()[k] != out.attributes()[k] for k in ("colour", "shape")) == 1
    assert kinds == {
        (Modality.IMAGE, Modality.VIDEO),
        (Modality.IMAGE, Modality.IMAGE),
        (Modality.VIDEO, Modality.IMAGE),
        (Modality.VIDEO, Modality.VIDEO),
    }
    with pytest.raises(ValueError, match="image or a clip"):
        world.draw_media_request(rng, world.draw_audio(rng))


def test_out_of_world_requests_ask_for_nothing_the_world_has():
    train, heldout = world.OUT_OF_WORLD["train"], world.OUT_OF_WORLD["heldout"]
    assert not set(train) & set(heldout)
    captions = {f"a {c} {s}" for c in world.COLOURS for s in world.SHAPES}
    assert not (set(train) | set(heldout)) & captions
    rng = np.random.default_rng(7)
    prompts = [world.draw_out_of_world(rng, "heldout").lower() for _ in range(50)]
    assert all(any(thing in p for thing in heldout) for p in prompts)
    assert "I can only" in world.OUT_OF_WORLD_REPLY


def test_dataset_holds_every_new_kind_of_conversation(tmp_path):
    from toyworld.data import WorldSizes, write_world

    sizes = WorldSizes.quick()
    write_world(tmp_path / "w", sizes=sizes)
    records = json.loads((tmp_path / "w" / "IT_data" / "MosIT_data" / "toyworld.json").read_text())
    replies = [r["conversation"][-1]["value"] for r in records]
    assert sum(r == world.OUT_OF_WORLD_REPLY for r in replies) == sizes.out_of_world
    four_turns = [r for r in records if len(r["conversation"]) == 4 and "Here is" in r["conversation"][1]["value"]]
    assert len(four_turns) >= sizes.follow_up
    media_in_and_out = [
        r
        for r in records
        if len(r["conversation"]) == 2
        and "<" in r["conversation"][0]["value"]
        and "Here is" in r["conversation"][1]["value"]
    ]
    assert len(media_in_and_out) == sizes.media_to_media
    for record in media_in_and_out:  # every media file named is listed with its caption
        listed = {e[k] for key in ("image_list", "video_list") for e in record.get(key, []) for k in e if "name" in k}
        for turn in record["conversation"]:
            for name in re.findall(r">([^<]+)</", turn["value"]):
                assert name in listed


# ------------------------------------------------------------------------------------------------ evaluator


def _output(text: str, media: tuple[str, ...] = ()):
    return SimpleNamespace(text=text, conditioning={m: torch.zeros(1, 2) for m in media})


@pytest.mark.parametrize(
    "text, media, clean",
    [
        ("Here is a red circle.", ("image",), True),
        ("Here is a red circle. Here is a high beep.", ("image", "audio"), True),
        ("It is a yellow square.", (), True),
        (world.OUT_OF_WORLD_REPLY, (), True),
        ("Here is a red circle. , and make a clip a sound of a steady mid tone", ("image",), False),
        ("Hi! ASSISTANT: You are welcome.", (), False),
        ("Here is a red circle.", (), False),  # words without media
        ("", ("image",), False),  # media without words
    ],
)
def test_clean_reply_rule(text, media, clean):
    from toyworld.evaluate import _score_clean, _Tally

    tally = _Tally()
    assert _score_clean(tally, "p", _output(text, media)) is clean
    assert tally.counts["clean_replies"] == [int(clean), 1]


def test_reply_words_are_scored_item_by_item():
    from toyworld.evaluate import _words_right

    request = world.Request("x", (world.ImageItem("red", "circle"), world.AudioItem("high", "pulsed")))
    assert _words_right(request, _output("Here is a red circle. Here is a high beep.", ("image", "audio")))
    assert not _words_right(request, _output("Here is a red circle. Here is a low beep.", ("image", "audio")))
    assert not _words_right(request, _output("Here is a red circle. Here is a high beep.", ("image",)))
    assert not _words_right(request, _output("Here is a high beep. Here is a red circle.", ("image", "audio")))
    assert caption_attributes("a high beep")["pitch"] == "high"


def test_heldout_sets_are_reproducible_and_sized():
    from toyworld import evaluate as ev

    assert len(ev.heldout_single_requests(4)) == 12
    assert [r.prompt for r in ev.heldout_casual_requests(5)] == [r.prompt for r in ev.heldout_casual_requests(5)]
    two = ev.heldout_two_turns(6)
    assert len(two) == 6 and all(len(c.second.items) == 1 for c in two)
    rendered = ev.heldout_rendered_items(3)
    assert len(rendered) == 9 and all(c.heldout_rendering for c in rendered)
    plain = ev.heldout_items(3)
    assert [c.item.caption for c in rendered] == [c.item.caption for c in plain]
    assert any(replace(c.item) != p.item for c, p in zip(rendered, plain, strict=True))
    assert all("I can only" not in p for p in ev.heldout_out_of_world(4))
    with pytest.raises(ValueError, match="tasks"):
        ev.evaluate(None, tasks=("dancing",))


# ------------------------------------------------------------------------------------------------ retraining


def test_decoders_taken_from_a_package_are_never_stale(tmp_path):
    """`anygpt toyworld recipe OUT --decoders-from toyworld`: the packaged decoders stand in for the decoder parts,
    and a redone encoder (which the decoders were once trained beside) does not send them back to training."""
    from anygpt.core.index import packaged_model_dir
    from toyworld import recipe

    model = packaged_model_dir("toyworld")
    written = recipe.seed_decoders(tmp_path, model)
    assert written == list(recipe.SEEDABLE)
    for part, folder in recipe.SEEDABLE.items():
        assert (tmp_path / part / "model_index.json").read_bytes() == (
            model / "decoders" / folder / "model_index.json"
        ).read_bytes()
        info = json.loads((tmp_path / part / recipe.PART_FILE).read_text())
        assert "inputs" not in info and info["seeded_from"] == f"packaged:toyworld/decoders/{folder}"  # no machine path
    (tmp_path / "encoder").mkdir()
    (tmp_path / "encoder" / recipe.PART_FILE).write_text(json.dumps({"finished": 1e12}))  # redone later
    assert all(recipe._part_done(tmp_path, part) is not None for part in recipe.SEEDABLE)
    assert recipe.seed_decoders(tmp_path, model) == []  # done parts are left as they are
    with pytest.raises(ValueError, match="model_index.json"):
        recipe.seed_decoders(tmp_path / "other", tmp_path / "encoder")


def test_packaging_keeps_a_restricted_vocabulary_as_it_is():
    from anygpt.core.config import DecoderConfig
    from anygpt.core.index import packaged_model_dir
    from decoders import build_decoder
    from toyworld.package import restrict_text_encoder

    folder = packaged_model_dir("toyworld") / "decoders" / "image"
    pipe = build_decoder(DecoderConfig(kind="stable-diffusion", source=str(folder), cond_dim=32)).load()
    size = len(pipe.tokenizer)
    weights = pipe.text_encoder.get_input_embeddings().weight.clone()
    assert restrict_text_encoder(pipe, ["a red circle"]) == size
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight, weights)


# ------------------------------------------------------------------------------------------------ the shipped model


FEW_STEPS = {"num_inference_steps": 12, "seed": 0, "temperature": 0.0}


def test_two_turns_through_the_api(toyworld):
    from anygpt.core.conversation import Conversation

    conversation = Conversation()
    first = toyworld("draw a red circle", conversation=conversation, **FEW_STEPS)
    second = toyworld("now make it blue", conversation=conversation, **FEW_STEPS)
    assert first.text == "Here is a red circle." and second.text == "Here is a blue circle."
    assert len(second.images) == 1 and not second.videos and not second.audios
    assert image_attributes(second.images[0]) == {"colour": "blue", "shape": "circle"}
    assert [t.role for t in conversation.turns] == ["user", "assistant", "user", "assistant"]
    shown = repr(conversation)  # one readable line, not the cached tensors
    assert "tensor" not in shown and "\n" not in shown
    assert "user: 'now make it blue'" in shown and "assistant: 'Here is a blue circle.'" in shown


def test_two_turns_through_the_demo_engine(toyworld, tmp_path):
    from anygpt.apps.chat import ChatEngine
    from anygpt.base.media import load_video
    from anygpt.core.request import GenerationRequest

    engine = ChatEngine(toyworld, tmp_path)
    session = engine.new_session()
    settings = GenerationRequest(**FEW_STEPS)
    for prompt in ("show a green square moving left", "now make it move up"):
        for _ in engine.respond(session, prompt, [], settings):
            pass
    first, second = (exchange.reply for exchange in session.exchanges)
    assert first.text == "Here is a green square moving left." and second.text == "Here is a green square moving up."
    assert [p.suffix for p in second.files] == [".mp4"] and second.error is None
    assert video_attributes(load_video(second.videos[0])) == {"colour": "green", "direction": "up"}  # read back


def test_two_turns_through_anygpt_chat(tmp_path):
    """`anygpt chat` on the default model, driven through stdin: the second turn changes the first turn's item."""
    import subprocess
    import sys

    from anygpt.base.media import load_audio

    out = tmp_path / "chat"
    lines = "play a low beep\nnow make it high\n/quit\n"
    done = subprocess.run(
        [sys.executable, "-m", "anygpt.cli", "chat", "--out", str(out), "--seed", "0", "--steps", "12"],
        input=lines, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Here is a low beep." in done.stdout and "Here is a high beep." in done.stdout
    second = sorted(out.glob("chat-0002_audio*.wav"))
    assert len(second) == 1 and audio_attributes(load_audio(second[0]))["pitch"] == "high"


def test_parallel_evaluation_splits_every_task_once_and_merges_counts():
    from toyworld import evaluate as ev

    for jobs in (1, 2, 3, 20):
        groups = ev.split_tasks(ev.TASKS, jobs)
        assert sorted(t for g in groups for t in g) == sorted(ev.TASKS) and len(groups) == min(jobs, len(ev.TASKS))

    def report(right: int, total: int, tasks: list[str]) -> dict:
        metrics = {n: {"correct": 0, "total": 0} for n in ev.METRICS}
        metrics["clean_replies"] = {"correct": right, "total": total}
        meta = {"seconds": total, "requests": 1, "caption_items": 2, "tasks": tasks, "samples": 4}
        return {"metrics": metrics, "meta": meta, "examples": [{"task": tasks[0]}]}

    merged = ev.merge_reports([report(3, 4, ["generation"]), report(5, 6, ["casual"])])
    assert merged["metrics"]["clean_replies"] == {"value": 0.8, "correct": 8, "total": 10, "target": 1.0}
    assert merged["metrics"]["routing"]["value"] is None
    assert merged["meta"]["tasks"] == ["generation", "casual"] and merged["meta"]["seconds"] == 6
    assert merged["meta"]["requests"] == 2 and len(merged["examples"]) == 2
    with pytest.raises(ValueError, match="tasks"):
        ev.run("toyworld", tasks=["dancing"])


def test_the_shipped_models_recorded_evaluation_matches_its_targets():
    """The full evaluation recorded with the shipped model (96 held-out items per row): every target met except the
    open ones, and every open target really below (an open target that is met must become a kept target)."""
    from anygpt.core.index import packaged_model_dir
    from toyworld.evaluate import OPEN_TARGETS, TARGETS

    report = json.loads((packaged_model_dir("toyworld") / "evaluation.json").read_text())
    assert report["meta"]["samples"] == 96 and set(OPEN_TARGETS) <= set(TARGETS)
    for name, target in TARGETS.items():
        metric = report["metrics"][name]
        assert metric["total"] >= 96, name
        assert (metric["value"] < target) == (name in OPEN_TARGETS), (name, metric["value"], target)
