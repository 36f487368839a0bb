"""The synthetic sample dataset: real media, deterministic files, every entry readable, safe writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from anygpt.base.media import load_media
from anygpt.base.modality import Modality
from toyworld import sample as sample_module
from toyworld.render import COLOURS
from toyworld.sample import MARKER_FILE, write_sample_dataset
from training.data import DatasetSpec, Dialogue, Pair, list_formats, read_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict[int, list[dict]]]:
    root = tmp_path_factory.mktemp("sample") / "data"
    return root, write_sample_dataset(root, seed=0)


def spec_for(root: Path, entry: dict) -> DatasetSpec:
    media_root = root / entry["media_root"] if "media_root" in entry else None
    return DatasetSpec(path=root / entry["path"], format=entry["format"], name=entry["name"], media_root=media_root)


def json_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.json"))}


def test_media_are_real_files_of_the_promised_sizes(dataset):
    root, _ = dataset
    pairs = root / "T_X_pair_data"
    images = sorted((pairs / "cc3m" / "images").glob("*.png"))
    audios = sorted((pairs / "audiocap" / "audios").glob("*.wav"))
    videos = sorted((pairs / "webvid" / "videos").glob("*.mp4"))
    assert len(images) == len(audios) == len(videos) == 12
    for path in images:
        image = load_media("image", path)
        assert image.size == (64, 64) and image.mode == "RGB"
    for path in audios:
        audio = load_media("audio", path)
        assert audio.sample_rate == 16000 and audio.waveform.shape == (16000,)
        assert 0.3 < np.abs(audio.waveform).max() <= 0.51
    for path in videos:
        video = load_media("video", path)
        assert video.frames.shape == (8, 64, 64, 3) and video.fps == pytest.approx(8.0)


def test_captions_describe_the_media(dataset):
    root, _ = dataset
    folder = root / "T_X_pair_data"
    for record in json.loads((folder / "cc3m" / "cc3m.json").read_text()):
        colour, shape = record["caption"].removeprefix("a ").split()
        pixels = np.asarray(load_media("image", folder / "cc3m" / "images" / record["image_name"])).astype(int)
        shape_pixels = pixels[(pixels < 250).any(-1)]
        assert len(shape_pixels) > 100
        assert np.abs(np.median(shape_pixels, 0) - COLOURS[colour]).max() <= 2
        corners = [pixels[0, 0], pixels[0, -1], pixels[-1, 0], pixels[-1, -1]]
        assert all((c == 255).all() for c in corners)
    for record in json.loads((folder / "audiocap" / "audiocap.json").read_text()):
        wave = load_media("audio", folder / "audiocap" / "audios" / record["audio_name"]).waveform
        peak = np.argmax(np.abs(np.fft.rfft(wave)))  # 1 s at 16 kHz: bin index == frequency in Hz
        expected = {"low": 262, "middle": 523, "high": 1047}[record["caption"].split()[-2]]
        assert abs(peak - expected) <= 2
        silent = (np.abs(wave.reshape(-1, 160)).max(1) < 0.01).mean()  # 10 ms windows
        assert (silent > 0.3) == record["caption"].startswith("a pulsing")
    for record in json.loads((folder / "webvid" / "webvid.json").read_text()):
        frames = load_media("video", folder / "webvid" / "videos" / record["video_name"]).frames.astype(int)
        centres = [np.argwhere((f < 200).any(-1)).mean(0) for f in frames[[0, -1]]]  # (y, x) of the square
        dy, dx = centres[1] - centres[0]
        direction = record["caption"].split()[-1]
        assert {"right": dx > 30, "left": dx < -30, "down": dy > 30, "up": dy < -30}[direction]


def test_same_seed_gives_identical_files_and_another_seed_differs(dataset, tmp_path):
    root, stages = dataset
    again = write_sample_dataset(tmp_path / "again", seed=0)
    assert again == stages
    assert json_files(tmp_path / "again") == json_files(root)
    for name in ("00000.png", "00007.png"):
        a = np.asarray(load_media("image", root / "T_X_pair_data" / "cc3m" / "images" / name))
        b = np.asarray(load_media("image", tmp_path / "again" / "T_X_pair_data" / "cc3m" / "images" / name))
        assert np.array_equal(a, b)
    write_sample_dataset(tmp_path / "other", seed=1)
    assert json_files(tmp_path / "other") != json_files(root)


def test_every_entry_reads_with_existing_media(dataset):
    root, stages = dataset
    assert sorted(stages) == [1, 2, 3]
    assert [e["format"] for e in stages[1]] == [e["format"] for e in stages[2]] == ["cc3m", "webvid", "audiocap"]
    assert {e["format"] for e in stages[3]} == set(list_formats()) - {"cc3m", "webvid", "audiocap", "pairs"}
    names = [e["name"] for stage in (1, 3) for e in stages[stage]]
    assert len(names) == len(set(names))
    for entries in stages.values():
        for entry in entries:
            assert not Path(entry["path"]).is_absolute() and not Path(entry.get("media_root", "")).is_absolute()
            records = read_dataset(spec_for(root, entry))
            assert len(records) == 12, entry
            for record in records:
                if isinstance(record, Pair):
                    assert record.media.path.is_file() and record.caption
                    continue
                assert isinstance(record, Dialogue)
                for turn in record.turns:
                    assert all(m.path.is_file() for m in turn.inputs)
                    assert all(o.caption and o.media is not None and o.media.path.is_file() for o in turn.outputs)


def test_stage3_covers_inputs_and_outputs_of_every_modality(dataset):
    root, stages = dataset
    seen_in, seen_out = set(), set()
    for entry in stages[3]:
        for record in read_dataset(spec_for(root, entry)):
            for turn in record.turns:
                seen_in |= {m.modality for m in turn.inputs}
                seen_out |= {o.modality for o in turn.outputs}
    media = {Modality.IMAGE, Modality.VIDEO, Modality.AUDIO}
    assert seen_in == media and seen_out == media


def test_marker_is_written_and_a_previous_sample_dataset_is_replaced(tmp_path):
    root = tmp_path / "data"
    root.mkdir()  # an empty folder is fine
    stages = write_sample_dataset(root, seed=3, size=2)
    marker = json.loads((root / MARKER_FILE).read_text())
    assert marker["seed"] == 3 and marker["size"] == 2
    assert marker["stages"] == {str(k): v for k, v in stages.items()}
    assert marker["complete"] is True
    # Rewriting replaces the dataset and keeps what else lives in the folder (configs, runs).
    (root / "stage1.yaml").write_text("stage: 1\n")
    (root / "runs").mkdir()
    (root / "runs" / "log.txt").write_text("step 1\n")
    write_sample_dataset(root, seed=4, size=3)
    assert json.loads((root / MARKER_FILE).read_text())["size"] == 3
    assert len(list((root / "T_X_pair_data" / "cc3m" / "images").iterdir())) == 3
    assert len(json.loads((root / "IT_data" / "MosIT_data" / "mosit.json").read_text())) == 3
    assert (root / "stage1.yaml").read_text() == "stage: 1\n" and (root / "runs" / "log.txt").is_file()
    assert sorted(p.name for p in root.iterdir()) == sorted(
        ["IT_data", "T_X_pair_data", MARKER_FILE, "runs", "stage1.yaml"]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no temporary folders left


def test_refuses_a_foreign_folder_or_a_file(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"mine: expected an empty folder or a previous sample dataset"):
        write_sample_dataset(foreign)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match=r"expected a folder, found a file"):
        write_sample_dataset(tmp_path / "file")
    with pytest.raises(ValueError, match="size must be >= 1"):
        write_sample_dataset(tmp_path / "zero", size=0)


def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(sample_module, "save_video", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        write_sample_dataset(tmp_path / "data", size=2)
    assert list(tmp_path.iterdir()) == []


def test_every_input_connector_trains_on_the_sample_stage1_config_as_written(tmp_path, capsys):
    """The README's connector switch (``--set input_projector=NAME`` on the sample configs) works for every registered
    connector: a perceiver's or C-Abstractor's tokens per item still leave the caption inside data.max_length."""
    from anygpt import cli
    from projectors import list_input_projectors
    from toyworld.sample_configs import write_sample

    root = write_sample(tmp_path / "sample", seed=0, size=4)
    for name in list_input_projectors():
        out = tmp_path / f"run-{name}"
        argv = ["train", "--stage", "1", "--config", str(root / "stage1.yaml"), "--from", "tiny"]
        argv += ["--set", f"input_projector={name}", "--max-steps", "1", "--output-dir", str(out)]
        assert cli.main(argv) == 0, (name, capsys.readouterr().err)
        assert (out / "final" / "anygpt_index.json").is_file(), name
