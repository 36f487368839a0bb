"""Dataset readers: every format on small files written here, NExT-GPT's real sample files, and every error case."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from anygpt.base.modality import Modality
from training.data import (
    DatasetError,
    DatasetSpec,
    Dialogue,
    MediaFile,
    OutputMedia,
    Pair,
    Turn,
    detect_format,
    list_formats,
    read_dataset,
)

FORMATS = [
    "alpaca",
    "audiocap",
    "cc3m",
    "llava",
    "mosit",
    "nextgpt_comprehension",
    "nextgpt_generation",
    "pairs",
    "t2m",
    "webvid",
]


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def touch(folder: Path, *names: str) -> None:
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"x")


def media(modality: Modality, root: Path, name: str, dataset: str) -> MediaFile:
    return MediaFile(modality, (root / name).resolve(), f"{dataset}/{name}")


@pytest.fixture
def roots(tmp_path) -> tuple[Path, Path]:
    """A media root and an embedding root (resolved: tmp_path may sit behind a symlink)."""
    media_root, embed_root = tmp_path / "media", tmp_path / "embed"
    media_root.mkdir()
    embed_root.mkdir()
    return media_root.resolve(), embed_root.resolve()


def test_list_formats():
    assert list_formats() == FORMATS


# ------------------------------------------------------------------------------------------------------------
# Pair formats
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt, modality, record",
    [
        ("cc3m", Modality.IMAGE, {"caption": "  a dog on grass \n", "id": "001", "image_name": "001.jpg"}),
        ("webvid", Modality.VIDEO, {"caption": "  a dog on grass \n", "id": 7, "video_name": "001.jpg"}),
        ("audiocap", Modality.AUDIO, {"audio_id": 7, "audio_name": "001.jpg", "caption": "  a dog on grass \n"}),
    ],
)
def test_pair_formats(tmp_path, roots, fmt, modality, record):
    media_root, embed_root = roots
    touch(media_root, "001.jpg", "sub/002.jpg")
    touch(embed_root, "001.jpg.npy", "002.jpg.npy")
    name_key = next(k for k in record if k.endswith("_name"))
    second = {**record, name_key: "./sub/002.jpg", "caption": "a cat"}
    path = write_json(tmp_path / "data" / f"{fmt}.json", [record, second])

    records = read_dataset(DatasetSpec(path=path, format=fmt, media_root=media_root, embedding_root=embed_root))

    assert records == [
        Pair(fmt, 0, media(modality, media_root, "001.jpg", fmt), "a dog on grass", embed_root / "001.jpg.npy"),
        Pair(fmt, 1, media(modality, media_root, "sub/002.jpg", fmt), "a cat", embed_root / "002.jpg.npy"),
    ]
    assert all(r.media.path.is_absolute() for r in records)
    # Without an embedding root there is no caption embedding; auto-detection picks the same reader.
    auto = read_dataset(DatasetSpec(path=path, media_root=media_root, name="x"))
    assert [r.caption_embedding for r in auto] == [None, None]
    assert [r.media.modality for r in auto] == [modality, modality]
    assert [r.media.media_id for r in auto] == ["x/001.jpg", "x/sub/002.jpg"]


def test_pairs_generic_reads_media_or_path_and_needs_a_modality(tmp_path, roots):
    media_root, _ = roots
    touch(media_root, "a.wav", "b.wav")
    path = write_json(
        tmp_path / "p.json", [{"media": "a.wav", "caption": "rain"}, {"path": "b.wav", "caption": "wind"}]
    )

    records = read_dataset(DatasetSpec(path=path, format="pairs", media_root=media_root, modality="audio"))
    assert records == [
        Pair("p", 0, media(Modality.AUDIO, media_root, "a.wav", "p"), "rain"),
        Pair("p", 1, media(Modality.AUDIO, media_root, "b.wav", "p"), "wind"),
    ]
    with pytest.raises(DatasetError, match=r"p\.json: format 'pairs' needs the dataset's modality"):
        read_dataset(DatasetSpec(path=path, format="pairs", media_root=media_root))
    with pytest.raises(DatasetError, match=r"p\.json: format 'pairs': expected modality image, video or audio"):
        read_dataset(DatasetSpec(path=path, format="pairs", media_root=media_root, modality="text"))


# ------------------------------------------------------------------------------------------------------------
# Conversation formats
# ------------------------------------------------------------------------------------------------------------


def test_t2m_appends_the_placeholder_and_reads_caption_embedding_and_media(tmp_path, roots):
    media_root, embed_root = roots
    touch(media_root, "t2x_0.jpg")
    touch(embed_root, "t2x_0.jpg.npy", "t2x_1.mp4.npy")
    data = [
        {
            "mm_name": "t2x_0.jpg",
            "output_modality": "image",
            "conversation": [
                {"from": "human", "value": "Show me a city at night.", "input_modality": "text"},
                {"from": "gpt", "value": "Here it is. ", "caption": " a city at night ", "output_modality": "image"},
            ],
        },
        {  # placeholder already in the answer (kept in place); upstream's ``image_name`` spelling; no media file
            "image_name": "t2x_1.mp4",
            "conversation": [
                {"from": "human", "value": "A clip of waves?"},
                {"from": "gpt", "value": "<video> Waves.", "caption": "waves", "output_modality": "video"},
                {"from": "human", "value": "Thanks."},
                {"from": "gpt", "value": "You are welcome.", "output_modality": "text"},
            ],
        },
    ]
    path = write_json(tmp_path / "image_t2x.json", data)

    records = read_dataset(DatasetSpec(path=path, format="t2m", media_root=media_root, embedding_root=embed_root))

    image_out = OutputMedia(
        Modality.IMAGE,
        "a city at night",
        embed_root / "t2x_0.jpg.npy",
        media(Modality.IMAGE, media_root, "t2x_0.jpg", "image_t2x"),
    )
    assert records[0] == Dialogue(
        "image_t2x",
        0,
        [Turn("user", "Show me a city at night."), Turn("assistant", "Here it is. <image>", outputs=[image_out])],
    )
    assert records[1].turns == [
        Turn("user", "A clip of waves?"),
        Turn(
            "assistant", "<video> Waves.", outputs=[OutputMedia(Modality.VIDEO, "waves", embed_root / "t2x_1.mp4.npy")]
        ),
        Turn("user", "Thanks."),
        Turn("assistant", "You are welcome."),
    ]
    assert detect_format(data[0]) == "t2m"


def test_t2m_media_input_and_errors(tmp_path, roots):
    media_root, _ = roots
    touch(media_root, "cat.jpg")
    ok = {
        "image_name": "cat.jpg",
        "conversation": [
            {"from": "human", "value": "What is this?", "input_modality": "image"},
            {"from": "gpt", "value": "A cat.", "caption": "", "output_modality": "text"},
        ],
    }
    path = write_json(tmp_path / "legacy.json", [ok])
    (record,) = read_dataset(DatasetSpec(path=path, format="t2m", media_root=media_root))
    assert record.turns[0] == Turn(
        "user", "<image>\nWhat is this?", inputs=[media(Modality.IMAGE, media_root, "cat.jpg", "legacy")]
    )

    two = {
        "mm_name": "cat.jpg",
        "conversation": [
            {"from": "human", "value": "Draw a cat."},
            {"from": "gpt", "value": "Here.", "caption": "a cat", "output_modality": "image"},
            {"from": "human", "value": "Again."},
            {"from": "gpt", "value": "Here.", "caption": "a cat", "output_modality": "image"},
        ],
    }
    path = write_json(tmp_path / "two.json", [ok, two])
    with pytest.raises(DatasetError, match=r"two\.json: record 1: key 'conversation': expected at most one turn"):
        read_dataset(DatasetSpec(path=path, format="t2m", media_root=media_root))

    no_caption = {
        "mm_name": "x.jpg",
        "conversation": [two["conversation"][0], {"from": "gpt", "value": "Here.", "output_modality": "image"}],
    }
    path = write_json(tmp_path / "nocap.json", [no_caption])
    with pytest.raises(DatasetError, match=r"nocap\.json: record 0: missing key 'conversation\[1\]\.caption'"):
        read_dataset(DatasetSpec(path=path, format="t2m", media_root=media_root))

    bad_kind = {
        "mm_name": "x.jpg",
        "conversation": [two["conversation"][0], {"from": "gpt", "value": "Hi", "output_modality": "smell"}],
    }
    path = write_json(tmp_path / "kind.json", [bad_kind])
    with pytest.raises(DatasetError, match=r"kind\.json: record 0: key 'conversation\[1\]\.output_modality'.*'smell'"):
        read_dataset(DatasetSpec(path=path, format="t2m", media_root=media_root))


def test_nextgpt_comprehension(tmp_path, roots):
    media_root, _ = roots
    touch(media_root, "a.jpg", "b.jpg", "c.wav")
    data = [
        {
            "input_image": "a.jpg",
            "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."}],
        },
        {  # a list of inputs of two kinds, no placeholders: inserted at the start of the first user turn
            "input_image": ["a.jpg", "b.jpg"],
            "input_audio": "c.wav",
            "conversations": [{"from": "user", "value": "Compare them."}, {"from": "assistant", "value": "Same."}],
        },
    ]
    path = write_json(tmp_path / "cc3m_comprehension.json", data)
    records = read_dataset(DatasetSpec(path=path, format="nextgpt_comprehension", media_root=media_root))

    name = "cc3m_comprehension"
    assert records[0].turns == [
        Turn("user", "<image>\nWhat is it?", inputs=[media(Modality.IMAGE, media_root, "a.jpg", name)]),
        Turn("assistant", "A cat."),
    ]
    assert records[1].turns[0] == Turn(
        "user",
        "<image>\n<image>\n<audio>\nCompare them.",
        inputs=[
            media(Modality.IMAGE, media_root, "a.jpg", name),
            media(Modality.IMAGE, media_root, "b.jpg", name),
            media(Modality.AUDIO, media_root, "c.wav", name),
        ],
    )
    assert detect_format(data[0]) == "nextgpt_comprehension"

    mismatch = {"input_image": ["a.jpg", "b.jpg"], "conversations": data[0]["conversations"]}
    path = write_json(tmp_path / "mismatch.json", [data[0], mismatch])
    with pytest.raises(
        DatasetError, match=r"mismatch\.json: record 1: key 'input_image': expected 2 <image> .* found 1"
    ):
        read_dataset(DatasetSpec(path=path, format="nextgpt_comprehension", media_root=media_root))


def test_nextgpt_generation(tmp_path, roots):
    media_root, embed_root = roots
    touch(media_root, "a.jpg")
    touch(embed_root, "a.jpg.npy", "b.jpg.npy", "c.wav.npy")
    data = [
        {
            "output_image": "a.jpg",
            "image_captions": " a red kite ",
            "image_caption_embeddings": "a.jpg.npy",
            "conversations": [
                {"from": "human", "value": "Draw a red kite."},
                {"from": "gpt", "value": "Sure! <image>"},
            ],
        },
        {  # instruction-tuning style: caption lists, outputs spread over turns, output files absent
            "image_captions": ["a beach", "a boat"],
            "image_caption_embeddings": ["b.jpg.npy", "b.jpg.npy"],
            "audio_captions": ["waves"],
            "audio_caption_embeddings": ["c.wav.npy"],
            "conversations": [
                {"from": "human", "value": "Take me to the sea."},
                {"from": "gpt", "value": "Look: <image> and listen: <audio>"},
                {"from": "human", "value": "And a boat?"},
                {"from": "gpt", "value": "<image>"},
            ],
        },
    ]
    path = write_json(tmp_path / "gen.json", data)
    records = read_dataset(
        DatasetSpec(path=path, format="nextgpt_generation", media_root=media_root, embedding_root=embed_root)
    )

    assert records[0].turns == [
        Turn("user", "Draw a red kite."),
        Turn(
            "assistant",
            "Sure! <image>",
            outputs=[
                OutputMedia(
                    Modality.IMAGE,
                    "a red kite",
                    embed_root / "a.jpg.npy",
                    media(Modality.IMAGE, media_root, "a.jpg", "gen"),
                )
            ],
        ),
    ]
    assert records[1].turns[1].outputs == [
        OutputMedia(Modality.IMAGE, "a beach", embed_root / "b.jpg.npy"),
        OutputMedia(Modality.AUDIO, "waves", embed_root / "c.wav.npy"),
    ]
    assert records[1].turns[3].outputs == [OutputMedia(Modality.IMAGE, "a boat", embed_root / "b.jpg.npy")]
    # No embedding root: no embeddings; the output file still resolves; no placeholder: appended to the last answer.
    no_marker = {**data[0], "conversations": [data[0]["conversations"][0], {"from": "gpt", "value": "Sure!"}]}
    path = write_json(tmp_path / "gen2.json", [no_marker])
    (record,) = read_dataset(DatasetSpec(path=path, media_root=media_root))
    assert record.turns[1].text == "Sure! <image>"
    assert record.turns[1].outputs == [
        OutputMedia(Modality.IMAGE, "a red kite", None, media(Modality.IMAGE, media_root, "a.jpg", "gen2"))
    ]

    bad = {**data[1], "image_caption_embeddings": ["b.jpg.npy"]}
    path = write_json(tmp_path / "bad.json", [bad])
    with pytest.raises(
        DatasetError,
        match=r"bad\.json: record 0: key 'image_caption_embeddings': expected one name per caption .* found 1",
    ):
        read_dataset(DatasetSpec(path=path, format="nextgpt_generation", media_root=media_root))


def test_mosit_maps_tags_to_inputs_and_outputs(tmp_path, roots):
    media_root, embed_root = roots
    touch(media_root, "mosit_i_0.jpg", "user.wav")
    touch(embed_root, "mosit_i_0.jpg.npy", "mosit_v_0.mp4.npy")
    record = {
        "image_list": [
            {"image_name": "mosit_i_0.jpg", "data_source": "mosit", "caption": " storm clouds "},
            {"image_name": "unused.jpg", "data_source": "mosit", "caption": "never shown"},
        ],
        "video_list": [{"video_name": "mosit_v_0.mp4", "data_source": "mosit", "caption": "rain on a window"}],
        "audio_list": [{"audio_name": "user.wav", "data_source": "mosit", "caption": "thunder"}],
        "conversation": [
            {"from": "human", "value": "Hear the storm? <Audio>user.wav</Audio> It was loud."},
            {"from": "gpt", "value": "Dramatic! <Image>mosit_i_0.jpg</Image> <Image>A picture of a dog</Image>"},
            {"from": "human", "value": "Show it moving."},
            {"from": "gpt", "value": "Here: <Video>mosit_v_0.mp4</Video>"},
        ],
    }
    path = write_json(tmp_path / "mosit.json", [record])
    (dialogue,) = read_dataset(DatasetSpec(path=path, format="mosit", media_root=media_root, embedding_root=embed_root))

    assert dialogue.turns == [
        Turn(
            "user",
            "Hear the storm? <audio> It was loud.",
            inputs=[media(Modality.AUDIO, media_root, "user.wav", "mosit")],
        ),
        Turn(
            "assistant",
            "Dramatic! <image>",
            outputs=[
                OutputMedia(
                    Modality.IMAGE,
                    "storm clouds",
                    embed_root / "mosit_i_0.jpg.npy",
                    media(Modality.IMAGE, media_root, "mosit_i_0.jpg", "mosit"),
                )
            ],
        ),
        Turn("user", "Show it moving."),
        Turn(
            "assistant",
            "Here: <video>",
            outputs=[OutputMedia(Modality.VIDEO, "rain on a window", embed_root / "mosit_v_0.mp4.npy")],
        ),
    ]
    assert detect_format(record) == "mosit"


def test_alpaca(tmp_path):
    data = [
        {"instruction": "Give three tips.", "input": "", "output": "Sleep, eat, move."},
        {"instruction": "Translate.", "input": " bonjour ", "output": "hello"},
    ]
    path = write_json(tmp_path / "alpaca.json", data)
    records = read_dataset(DatasetSpec(path=path))
    assert records == [
        Dialogue("alpaca", 0, [Turn("user", "Give three tips."), Turn("assistant", "Sleep, eat, move.")]),
        Dialogue("alpaca", 1, [Turn("user", "Translate.\n\nbonjour"), Turn("assistant", "hello")]),
    ]


def test_llava(tmp_path, roots):
    media_root, _ = roots
    touch(media_root, "coco/1.jpg")
    turns = [
        {"from": "human", "value": "What is shown?\n<image>"},
        {"from": "gpt", "value": "A bus."},
        {"from": "human", "value": "What colour?"},
        {"from": "gpt", "value": "Red."},
    ]
    data = [
        {"id": "1", "image": "coco/1.jpg", "conversations": turns},
        {
            "id": "2",
            "image": "coco/1.jpg",
            "conversations": [{"from": "human", "value": "Describe it."}, {"from": "gpt", "value": "A bus."}],
        },
        {"id": "3", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    ]
    path = write_json(tmp_path / "llava.json", data)
    records = read_dataset(DatasetSpec(path=path, format="llava", media_root=media_root))
    bus = media(Modality.IMAGE, media_root, "coco/1.jpg", "llava")
    assert records[0].turns == [
        Turn("user", "What is shown?\n<image>", inputs=[bus]),
        Turn("assistant", "A bus."),
        Turn("user", "What colour?"),
        Turn("assistant", "Red."),
    ]
    assert records[1].turns[0] == Turn("user", "<image>\nDescribe it.", inputs=[bus])
    assert records[2].turns == [Turn("user", "Hi"), Turn("assistant", "Hello")]
    assert [detect_format(d) for d in data] == ["llava"] * 3

    twice = {
        "image": "coco/1.jpg",
        "conversations": [{"from": "human", "value": "<image> <image>"}, {"from": "gpt", "value": "x"}],
    }
    path = write_json(tmp_path / "twice.json", [data[0], twice])
    with pytest.raises(DatasetError, match=r"twice\.json: record 1: key 'image': expected 1 <image> .*found 2"):
        read_dataset(DatasetSpec(path=path, format="llava", media_root=media_root))
    orphan = {"conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}]}
    path = write_json(tmp_path / "orphan.json", [orphan])
    with pytest.raises(
        DatasetError, match=r"orphan\.json: record 0: key 'image': expected no <image> placeholder .*found 1"
    ):
        read_dataset(DatasetSpec(path=path, format="llava", media_root=media_root))


@pytest.mark.parametrize(
    "conversation, found",
    [
        ([{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}], r"\[gpt, human\]"),
        (
            [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}, {"from": "human", "value": "c"}],
            r"\[human, gpt, human\]",
        ),
        ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], r"\[human, human\]"),
        ([], r"\[no turns\]"),
    ],
)
def test_conversations_must_alternate_from_user_to_assistant(tmp_path, conversation, found):
    path = write_json(tmp_path / "conv.json", [{"conversations": conversation}])
    with pytest.raises(
        DatasetError, match=r"conv\.json: record 0: key 'conversations': expected turns alternating.*" + found
    ):
        read_dataset(DatasetSpec(path=path, format="llava"))


def test_unknown_role_and_stray_placeholder_are_errors(tmp_path):
    path = write_json(
        tmp_path / "role.json", [{"conversations": [{"from": "system", "value": "a"}, {"from": "gpt", "value": "b"}]}]
    )
    with pytest.raises(
        DatasetError, match=r"role\.json: record 0: key 'conversations\[0\]\.from': expected one of .*'system'"
    ):
        read_dataset(DatasetSpec(path=path))
    ok = {"instruction": "a", "input": "", "output": "b"}
    path = write_json(tmp_path / "stray.json", [ok, {"instruction": "Embed <video> here", "input": "", "output": "ok"}])
    with pytest.raises(
        DatasetError, match=r"stray\.json: record 1: turn 0 \(user\): expected .*\[none\], found \[<video>\]"
    ):
        read_dataset(DatasetSpec(path=path, format="alpaca"))


@pytest.mark.parametrize("name", ["/etc/passwd", "../outside.jpg", "a/../../b.jpg", "C:\\x.jpg", ""])
def test_media_names_may_not_leave_the_media_root(tmp_path, roots, name):
    media_root, _ = roots
    path = write_json(
        tmp_path / "escape.json", [{"caption": "a", "image_name": "ok.jpg"}, {"caption": "b", "image_name": name}]
    )
    with pytest.raises(
        DatasetError, match=r"escape\.json: record 1: key 'image_name': expected a file name relative to"
    ):
        read_dataset(DatasetSpec(path=path, format="cc3m", media_root=media_root))


def test_reading_does_not_depend_on_the_working_directory(tmp_path, roots, monkeypatch):
    media_root, _ = roots
    touch(media_root, "a.jpg")
    path = write_json(tmp_path / "cc3m.json", [{"caption": "a", "image_name": "a.jpg"}])
    spec = DatasetSpec(path=path, media_root=media_root)
    before = read_dataset(spec)
    monkeypatch.chdir(media_root)
    assert read_dataset(spec) == before
    # Default media root: the JSON file's folder, whatever the working directory.
    touch(tmp_path, "a.jpg")
    (record,) = read_dataset(DatasetSpec(path=path))
    assert record.media.path == (tmp_path / "a.jpg").resolve()


def test_json_lines_and_max_samples(tmp_path, roots):
    media_root, _ = roots
    touch(media_root, "0.jpg", "1.jpg")
    lines = [json.dumps({"caption": f"c{i}", "image_name": f"{i}.jpg"}) for i in range(5)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n{broken\n", encoding="utf-8")
    # max_samples truncates before parsing the rest and before the missing-media check (2.jpg.. do not exist).
    records = read_dataset(DatasetSpec(path=path, media_root=media_root, max_samples=2))
    assert [(r.index, r.caption) for r in records] == [(0, "c0"), (1, "c1")]
    with pytest.raises(DatasetError, match=r"pairs\.jsonl: invalid JSON on line 7 \(record 5\)"):
        read_dataset(DatasetSpec(path=path, media_root=media_root))
    json_path = write_json(tmp_path / "pairs.json", [json.loads(line) for line in lines])
    assert len(read_dataset(DatasetSpec(path=json_path, media_root=media_root, max_samples=2))) == 2


# ------------------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------------------


def test_file_level_errors(tmp_path):
    with pytest.raises(DatasetError, match=r"dataset file .*absent\.json does not exist"):
        read_dataset(DatasetSpec(path=tmp_path / "absent.json"))
    (tmp_path / "broken.json").write_text('[{"caption": "a",}]', encoding="utf-8")
    with pytest.raises(DatasetError, match=r"broken\.json: invalid JSON at line 1 column \d+"):
        read_dataset(DatasetSpec(path=tmp_path / "broken.json"))
    path = write_json(tmp_path / "object.json", {"data": []})
    with pytest.raises(
        DatasetError, match=r"object\.json: expected a JSON list of records, found an object with keys \[data\]"
    ):
        read_dataset(DatasetSpec(path=path))
    path = write_json(tmp_path / "empty.json", [])
    with pytest.raises(DatasetError, match=r"empty\.json: expected at least one record, found an empty list"):
        read_dataset(DatasetSpec(path=path))


def test_record_level_errors(tmp_path):
    ok = {"caption": "a", "image_name": "a.jpg"}
    path = write_json(tmp_path / "records.json", [ok, "not an object"])
    with pytest.raises(DatasetError, match=r"records\.json: record 1: expected a JSON object, found a string"):
        read_dataset(DatasetSpec(path=path, format="cc3m"))
    path = write_json(tmp_path / "missing.json", [ok, {"caption": "b"}])
    with pytest.raises(DatasetError, match=r"missing\.json: record 1: missing key 'image_name'.*keys \[caption\]"):
        read_dataset(DatasetSpec(path=path, format="cc3m"))
    path = write_json(tmp_path / "type.json", [ok, {"caption": 5, "image_name": "b.jpg"}])
    with pytest.raises(
        DatasetError, match=r"type\.json: record 1: key 'caption': expected a string, found an integer \(5\)"
    ):
        read_dataset(DatasetSpec(path=path, format="cc3m"))
    path = write_json(tmp_path / "blank.json", [ok, {"caption": "  ", "image_name": "b.jpg"}])
    with pytest.raises(DatasetError, match=r"blank\.json: record 1: key 'caption': expected a non-empty caption"):
        read_dataset(DatasetSpec(path=path, format="cc3m"))


def test_unknown_format_lists_the_valid_ones(tmp_path):
    path = write_json(tmp_path / "x.json", [{"caption": "a", "image_name": "a.jpg"}])
    with pytest.raises(
        DatasetError, match=r"x\.json: unknown dataset format 'coco': expected one of auto, alpaca, audiocap, cc3m"
    ):
        read_dataset(DatasetSpec(path=path, format="coco"))


def test_auto_detection_failure_lists_the_keys_found(tmp_path):
    path = write_json(tmp_path / "odd.json", [{"text": "a", "label": 3}])
    with pytest.raises(
        DatasetError, match=r"odd\.json: record 0: cannot detect the dataset format .*keys \[label, text\]"
    ):
        read_dataset(DatasetSpec(path=path))


def test_missing_media_error_and_skip(tmp_path, roots, caplog):
    media_root, _ = roots
    touch(media_root, "0.jpg", "2.jpg")
    path = write_json(tmp_path / "gaps.json", [{"caption": f"c{i}", "image_name": f"{i}.jpg"} for i in range(5)])
    with pytest.raises(
        DatasetError, match=r"gaps\.json: 3 missing media files .*\(3 of 5 records; first: record 1, .*1\.jpg\)"
    ):
        read_dataset(DatasetSpec(path=path, media_root=media_root))
    with caplog.at_level(logging.WARNING, logger="training.data.readers"):
        records = read_dataset(DatasetSpec(path=path, media_root=media_root, missing_media="skip"))
    assert [r.index for r in records] == [0, 2]
    assert "3 missing media files" in caplog.text and "gaps.json" in caplog.text
    # Nothing left after skipping is an error too.
    path = write_json(tmp_path / "none.json", [{"caption": "c", "image_name": "absent.jpg"}])
    with pytest.raises(DatasetError, match=r"none\.json: no records left after skipping"):
        read_dataset(DatasetSpec(path=path, media_root=media_root, missing_media="skip"))


def test_missing_caption_embeddings_error_and_skip(tmp_path, roots, caplog):
    media_root, embed_root = roots
    touch(media_root, "0.jpg", "1.jpg")
    touch(embed_root, "0.jpg.npy")
    data = [
        {
            "image_captions": f"c{i}",
            "image_caption_embeddings": f"{i}.jpg.npy",
            "conversations": [{"from": "human", "value": "draw"}, {"from": "gpt", "value": "<image>"}],
        }
        for i in range(2)
    ]
    path = write_json(tmp_path / "emb.json", data)
    spec = dict(path=path, media_root=media_root, embedding_root=embed_root)
    with pytest.raises(
        DatasetError, match=r"emb\.json: 1 missing caption-embedding file .*first: record 1, .*1\.jpg\.npy"
    ):
        read_dataset(DatasetSpec(**spec))
    with caplog.at_level(logging.WARNING, logger="training.data.readers"):
        records = read_dataset(DatasetSpec(**spec, missing_media="skip"))
    assert [r.index for r in records] == [0]
    assert "1 missing caption-embedding file" in caplog.text
    # Pairs: {embedding_root}/{media name}.npy
    path = write_json(tmp_path / "pairs.json", [{"caption": f"c{i}", "image_name": f"{i}.jpg"} for i in range(2)])
    with pytest.raises(DatasetError, match=r"pairs\.json: 1 missing caption-embedding file"):
        read_dataset(DatasetSpec(path=path, media_root=media_root, embedding_root=embed_root))


@pytest.mark.parametrize(
    "record, expected",
    [
        ({"caption": "a", "id": "1", "image_name": "a.jpg"}, "cc3m"),
        ({"caption": "a", "id": 1, "video_name": "a.mp4"}, "webvid"),
        ({"audio_id": 1, "audio_name": "a.wav", "caption": "a"}, "audiocap"),
        ({"media": "a.wav", "caption": "a"}, "pairs"),
        ({"mm_name": "a.jpg", "conversation": []}, "t2m"),
        ({"image_list": [], "video_list": [], "audio_list": [], "conversation": []}, "mosit"),
        ({"input_video": "a.mp4", "conversations": []}, "nextgpt_comprehension"),
        ({"output_audio": "a.wav", "audio_captions": "a", "conversations": []}, "nextgpt_generation"),
        ({"audio_captions": ["a"], "conversations": []}, "nextgpt_generation"),
        ({"id": "1", "image": "a.jpg", "conversations": []}, "llava"),
        ({"instruction": "a", "input": "", "output": "b"}, "alpaca"),
        ({"text": "a"}, None),
        ("a string", None),
    ],
)
def test_detect_format(record, expected):
    assert detect_format(record) == expected


# ------------------------------------------------------------------------------------------------------------
# NExT-GPT's real sample files
# ------------------------------------------------------------------------------------------------------------

REAL = [
    ("cc3m", "images", Modality.IMAGE),
    ("webvid", "videos", Modality.VIDEO),
    ("audiocap", "audios", Modality.AUDIO),
]


@pytest.mark.parametrize("folder, media_folder, modality", REAL)
def test_real_pair_files(samples_dir, folder, media_folder, modality):
    root = samples_dir / "T_X_pair_data" / folder
    spec = dict(path=root / f"{folder}.json", media_root=root / media_folder, embedding_root=samples_dir / "embed")
    raw = json.loads((root / f"{folder}.json").read_text())
    if folder == "webvid":
        with pytest.raises(DatasetError, match=r"webvid\.json: 3 missing media files .*\(3 of 20 records"):
            read_dataset(DatasetSpec(**spec))
        records = read_dataset(DatasetSpec(**spec, missing_media="skip"))
        assert len(records) == 17
        assert {r.index for r in records} == set(range(20)) - {
            i for i, r in enumerate(raw) if not (root / media_folder / r["video_name"]).exists()
        }
    else:
        records = read_dataset(DatasetSpec(**spec))
        assert len(records) == 20
    assert all(isinstance(r, Pair) and r.media.modality is modality and r.media.path.is_file() for r in records)
    assert all(r.caption_embedding.is_file() for r in records)
    assert [r.caption for r in records] == [raw[r.index]["caption"].strip() for r in records]
    assert records[0].media.media_id == f"{folder}/{raw[records[0].index][f'{modality.value}_name']}"
    auto = read_dataset(DatasetSpec(**spec, format="auto", missing_media="skip"))
    assert auto == read_dataset(DatasetSpec(**spec, format=folder, missing_media="skip"))


@pytest.mark.parametrize("folder, media_folder, modality", REAL)
def test_real_comprehension_and_generation_files(samples_dir, folder, media_folder, modality):
    root = samples_dir / "T_X_pair_data" / folder
    placeholder = f"<{modality.value}>"
    expected_count = 17 if folder == "webvid" else 20

    spec = DatasetSpec(path=root / f"{folder}_comprehension.json", media_root=root / media_folder, missing_media="skip")
    records = read_dataset(spec)
    assert len(records) == expected_count
    assert detect_format(json.loads(spec.path.read_text())[0]) == "nextgpt_comprehension"
    for r in records:
        user, answer = r.turns
        assert user.text.startswith(placeholder + "\n") and [m.modality for m in user.inputs] == [modality]
        assert user.inputs[0].path.is_file() and not answer.outputs and answer.text

    spec = DatasetSpec(
        path=root / f"{folder}_generation.json", media_root=root / media_folder, embedding_root=samples_dir / "embed"
    )
    records = read_dataset(spec)  # output files are optional: the 3 absent videos are not an error
    assert len(records) == 20
    assert detect_format(json.loads(spec.path.read_text())[0]) == "nextgpt_generation"
    outputs = [o for r in records for o in r.turns[1].outputs]
    assert len(outputs) == 20 and all(r.turns[1].text.endswith(placeholder) for r in records)
    assert all(o.modality is modality and o.caption and o.caption_embedding.is_file() for o in outputs)
    assert sum(o.media is not None for o in outputs) == expected_count
    assert all(o.media.path.is_file() for o in outputs if o.media is not None)
