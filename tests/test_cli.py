"""The command line: files written are valid media, bad input exits 2 with one line and leaves nothing behind."""

from __future__ import annotations

import json

import pytest

from anygpt import cli
from anygpt.base.media import load_audio, load_image, load_video


@pytest.fixture()
def use_tiny(monkeypatch, tiny_pipe):
    """Reuse the session's tiny pipeline instead of building one per CLI call."""
    real = cli.load_pipeline
    monkeypatch.setattr(cli, "load_pipeline", lambda model: tiny_pipe if model == "tiny" else real(model))


def test_generate_writes_valid_png_mp4_wav(tmp_path, capsys, use_tiny, media_files):
    out = tmp_path / "out"
    code = cli.main(
        ["generate", "draw <this> & that", "--image", str(media_files["image"]), "--modalities", "image,video,audio",
         "--out", str(out), "--steps", "2", "--max-new-tokens", "4", "--json"]
    )  # fmt: skip
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result) == {"text", "images", "videos", "audios"}
    assert load_image(result["images"][0]).size == (64, 64)
    video = load_video(result["videos"][0])
    assert video.frames.shape[0] == 8 and video.frames.shape[1:] == (64, 64, 3)
    audio = load_audio(result["audios"][0])
    assert audio.sample_rate == 16000 and audio.waveform.shape[-1] > 8000
    assert all(str(out) in p for k in ("images", "videos", "audios") for p in result[k])


def test_generate_plain_output_lists_paths(tmp_path, capsys, use_tiny):
    assert cli.main(["generate", "hi", "--modalities", "audio", "--out", str(tmp_path), "--steps", "2",
                     "--max-new-tokens", "2"]) == 0  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("text: ") and lines[-1].startswith("audio: ") and lines[-1].endswith(".wav")
    assert cli.main(["generate", "hi", "--modalities", "audio", "--out", str(tmp_path), "--steps", "2",
                     "--max-new-tokens", "2"]) == 0  # fmt: skip
    assert len(list(tmp_path.glob("*.wav"))) == 2  # a second run does not overwrite the first


def test_batch(tmp_path, capsys, use_tiny, media_files):
    batch = tmp_path / "prompts.jsonl"
    (tmp_path / "in.png").write_bytes(media_files["image"].read_bytes())
    batch.write_text(
        json.dumps({"prompt": "one", "modalities": ["image"], "id": "first"})
        + "\n\n"
        + json.dumps({"prompt": "two", "images": ["in.png"], "modalities": "audio", "max_new_tokens": 2})
        + "\n"
    )
    out = tmp_path / "out"
    assert cli.main(["generate", "--batch", str(batch), "--out", str(out), "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["prompt"] for r in records] == ["one", "two"]
    assert records[0]["id"] == "first" and records[0]["images"][0].endswith("first_image0.png")
    assert len(records[1]["audios"]) == 1 and records[1]["images"] == []
    logged = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert logged == records


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["generate", "x", "--image", "{tmp}/missing.png"],
            "--image {tmp}/missing.png: expected a readable file, found nothing",
        ),
        (["generate", "x", "--image", "{wav}"], "in.wav"),
        (["generate", "x", "--modalities", "image,smell"], "unknown or unavailable output modality 'smell'"),
        (["generate", "x", "--out", "{wav}"], "--out {wav}: expected a folder, found a file"),
        (["generate", "--batch", "{tmp}/dup.jsonl"], "dup.jsonl:2: 'id' 'a' is used by an earlier line too"),
        (["generate", "--batch", "{tmp}/types.jsonl"], "types.jsonl:1: 'steps' must be an integer >= 1, got 'many'"),
        (["generate", "--batch", "{tmp}/mods.jsonl"], "mods.jsonl:1: modalities: unknown or unavailable output"),
        (["generate", "x", "--model", "no-such-model"], "unknown model 'no-such-model'"),
        (["generate", "--batch", "{tmp}/bad.jsonl"], "bad.jsonl:2: not valid JSON"),
        (["generate"], "a PROMPT or --batch FILE is required"),
        (["generate", "x", "--adapters", "image"], "unknown LoRA adapter 'image': this model has default"),
        (["generate", "--batch", "{tmp}/adapters.jsonl"], "adapters.jsonl:1: 'adapters' must be a comma-separated"),
        (["info", "nonsense"], "unknown topic 'nonsense'"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, use_tiny, media_files, args, message):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "fine"}\n{"prompt": \n')
    (tmp_path / "dup.jsonl").write_text('{"prompt": "one", "id": "a"}\n{"prompt": "two", "id": "a"}\n')
    (tmp_path / "types.jsonl").write_text('{"prompt": "one", "steps": "many"}\n')
    (tmp_path / "mods.jsonl").write_text('{"prompt": "one", "modalities": "smell"}\n')
    (tmp_path / "adapters.jsonl").write_text('{"prompt": "one", "adapters": 3}\n')
    out = tmp_path / "out"
    fill = {"tmp": str(tmp_path), "wav": str(media_files["audio"])}
    argv = [a.format(**fill) for a in args]
    if argv[0] == "generate":
        argv += ["--max-new-tokens", "2", "--steps", "2"] + ([] if "--out" in argv else ["--out", str(out)])
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("anygpt: error: ") and err.count("\n") == 1
    assert message.format(**fill) in err
    if out.is_dir():
        assert not any(out.iterdir())


def test_info_lists_registries(capsys):
    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    assert "input_projectors: cabstractor, group, linear, mlp, perceiver, qformer" in text
    assert "output_projectors: linear, qformer, transformer" in text
    assert "presets: " in text and "tiny" in text


def test_info_projectors_describes_every_registered_connector(capsys):
    from projectors import list_input_projectors, list_output_projectors

    assert cli.main(["info", "projectors"]) == 0
    text = capsys.readouterr().out
    for name in {*list_input_projectors(), *list_output_projectors(), "cross_attention"}:
        line = next(line for line in text.splitlines() if line.strip().startswith(name + " "))
        assert len(line.split(None, 1)[1]) > 20, line  # a description, not just the name
    assert "--set input_projector=NAME" in text and "--set output_projector=NAME" in text
