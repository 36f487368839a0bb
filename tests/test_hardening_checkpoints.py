"""Damaged model folders and checkpoints, signals in training and a full disk end cleanly (issue 22).

A corpus of damaged model folders is built from one small saved model: every damage ends in one ``CheckpointError``
naming the file (and the key and both shapes); ``--resume auto`` skips a damaged newest checkpoint; SIGTERM writes
a checkpoint as Ctrl-C does; what a killed final save leaves is swept; a full disk says what to free and keeps the
previous checkpoint.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from training_runs import SETS, run_stage  # tests/training_runs.py

import training.checkpoint as checkpoint_module
from anygpt.base.errors import CheckpointError, ConfigError, TrainingError
from anygpt.core.config import config_from_preset
from anygpt.core.fusion import CrossAttentionConfig
from anygpt.core.index import INDEX_FILE
from anygpt.core.pipeline import AnyGPTPipeline
from training.checkpoint import clean_partial, list_checkpoints, run_lock

pytestmark = pytest.mark.usefixtures("one_thread")  # runs are compared exactly

REPO = Path(__file__).resolve().parents[1]

PROJECTOR = "input_projectors/image/diffusion_pytorch_model.safetensors"
OUTPUT_PROJECTOR = "output_projectors/audio/diffusion_pytorch_model.safetensors"
LORA = "lora/adapter_model.safetensors"
TOKENS = "token_embeddings.safetensors"
CROSS = "cross_attention.safetensors"
WEIGHT_FILES = [PROJECTOR, OUTPUT_PROJECTOR, LORA, TOKENS, CROSS]


# ---------------------------------------------------------------------------------------------- damaged model folders
@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    """A tiny model with every kind of weight file (projectors, LoRA, token rows, cross-attention), saved once."""
    config = config_from_preset("tiny")
    config.cross_attention = CrossAttentionConfig(every=1, num_heads=2, ff_mult=1)
    folder = tmp_path_factory.mktemp("model") / "saved"
    AnyGPTPipeline.from_config(config).save_pretrained(folder)
    return folder


def _copy(saved_model: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(saved_model, folder)
    return folder


def _edit(folder: Path, rel: str, change) -> None:
    tensors = load_file(folder / rel)
    change(tensors)
    save_file(tensors, folder / rel)


def _first(tensors: dict, ndim: int = 1) -> str:
    return sorted(k for k, v in tensors.items() if v.is_floating_point() and v.ndim >= ndim)[0]


def _truncate(folder: Path, rel: str) -> None:
    data = (folder / rel).read_bytes()
    (folder / rel).write_bytes(data[: len(data) // 2])


def _wrong_shape(tensors: dict) -> None:
    key = _first(tensors)
    tensors[key] = torch.zeros(*(n + 1 for n in tensors[key].shape))


def _nan_row(tensors: dict) -> None:
    tensors[_first(tensors, ndim=2)][1] = float("nan")


def _symlink_outside(folder: Path, rel: str) -> None:
    outside = folder.parent / "elsewhere.safetensors"
    shutil.copy(folder / rel, outside)
    (folder / rel).unlink()
    (folder / rel).symlink_to(outside)


DAMAGES = {
    "truncated": (_truncate, r"not a readable safetensors file \(.*\); the file is damaged"),
    "empty": (lambda f, rel: (f / rel).write_bytes(b""), "not a readable safetensors file"),
    "missing key": (lambda f, rel: _edit(f, rel, lambda t: t.pop(sorted(t)[-1])), r"key '.+' is missing"),
    "extra key": (
        lambda f, rel: _edit(f, rel, lambda t: t.__setitem__("extra.weight", torch.zeros(3))),
        "key 'extra.weight' is not in the model",
    ),
    "wrong shape": (
        lambda f, rel: _edit(f, rel, _wrong_shape),
        r"key '.+' has shape \((\d+, )*\d+,?\), expected \((\d+, )*\d+,?\)",
    ),
    "nan row": (lambda f, rel: _edit(f, rel, _nan_row), r"key '.+' holds NaN or infinite values \(row 1 of shape"),
    "missing file": (lambda f, rel: (f / rel).unlink(), "missing"),
    "folder instead of file": (lambda f, rel: ((f / rel).unlink(), (f / rel).mkdir()), "not a file"),
    "symlink outside": (_symlink_outside, "outside the model folder"),
}


@pytest.mark.parametrize("rel", WEIGHT_FILES)
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_weight_file_is_one_checkpoint_error_naming_it(saved_model, tmp_path, damage, rel):
    folder = _copy(saved_model, tmp_path)
    apply, message = DAMAGES[damage]
    apply(folder, rel)
    with pytest.raises(CheckpointError, match=message) as caught:
        AnyGPTPipeline.from_pretrained(folder)
    text = str(caught.value)
    assert "\n" not in text
    # the file itself, or (for a file the index names directly) the index and the file's name
    assert str(folder / rel) in text or (str(folder / INDEX_FILE) in text and Path(rel).name in text), text


def test_wrong_shape_names_the_key_and_both_shapes(saved_model, tmp_path):
    folder = _copy(saved_model, tmp_path)
    _edit(folder, PROJECTOR, lambda t: t.__setitem__("proj.weight", torch.zeros(5, 7)))
    expected = tuple(load_file(saved_model / PROJECTOR)["proj.weight"].shape)
    with pytest.raises(CheckpointError) as caught:
        AnyGPTPipeline.from_pretrained(folder)
    assert str(caught.value) == f"{folder / PROJECTOR}: key 'proj.weight' has shape (5, 7), expected {expected}"


def test_integer_weights_are_refused(saved_model, tmp_path):
    folder = _copy(saved_model, tmp_path)
    key = _first(load_file(saved_model / LORA))
    _edit(folder, LORA, lambda t: t.__setitem__(key, t[key].to(torch.int32)))
    with pytest.raises(CheckpointError, match=f"{folder / LORA}: key '{key}' holds I32 values"):
        AnyGPTPipeline.from_pretrained(folder)


JSON_FILES = [
    INDEX_FILE,
    "input_projectors/video/config.json",
    "output_projectors/image/config.json",
    "tokenizer/tokenizer.json",
    "tokenizer/tokenizer_config.json",
]


@pytest.mark.parametrize("rel", JSON_FILES)
@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"config": {', r"not valid JSON \(.*\); the file is damaged"),
        (b"[1, 2]", "expected a JSON object, found list"),
        (b"\xff\xfe{}", r"not UTF-8 text \(byte 0\)"),
    ],
    ids=["truncated", "list", "not utf-8"],
)
def test_a_damaged_json_file_is_one_checkpoint_error_naming_it(saved_model, tmp_path, rel, content, message):
    folder = _copy(saved_model, tmp_path)
    (folder / rel).write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as caught:
        AnyGPTPipeline.from_pretrained(folder)
    assert str(caught.value).startswith(f"{folder / rel}: ")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: (f / "tokenizer/tokenizer.json").unlink(), "tokenizer/tokenizer.json: tokenizer file is missing"),
        (lambda f: (f / "tokenizer/tokenizer.json").write_text('{"model": 3}'), "not a readable tokenizer"),
        (lambda f: _symlink_outside(f, "tokenizer/tokenizer.json"), "tokenizer/tokenizer.json: tokenizer file "),
        (lambda f: _symlink_outside(f, "output_projectors/image/config.json"), "resolves to .*outside the model"),
        (lambda f: _index(f, lambda i: i["parts"].pop("lora")), "parts names no 'lora' files, but the config has"),
        (lambda f: _index(f, lambda i: i["parts"].__setitem__("token_embeddings", 5)), "parts.token_embeddings is 5"),
        (lambda f: _index(f, lambda i: i["config"]["llm"].__setitem__("hidden_size", 32)), r"\['out_dim'\] differ"),
        (lambda f: _index(f, lambda i: i["config"].__setitem__("decoders", 7)), "anygpt_index.json: invalid config"),
    ],
    ids=["no tokenizer.json", "bad tokenizer.json", "tokenizer link", "config link", "lora", "kind", "size", "cfg"],
)
def test_other_damages_are_one_checkpoint_error(saved_model, tmp_path, damage, message):
    folder = _copy(saved_model, tmp_path)
    damage(folder)
    with pytest.raises(CheckpointError, match=message) as caught:
        AnyGPTPipeline.from_pretrained(folder)
    assert "\n" not in str(caught.value) and str(folder) in str(caught.value)


def _index(folder: Path, change) -> None:
    index = json.loads((folder / INDEX_FILE).read_text())
    change(index)
    (folder / INDEX_FILE).write_text(json.dumps(index))


def test_a_weight_of_a_component_stored_in_the_folder_may_not_link_out(saved_model, tmp_path):
    """``./llm``-style components: the folder is inside, and so must be each of its files."""
    folder = _copy(saved_model, tmp_path)
    (folder / "llm").mkdir()
    (folder / "llm" / "config.json").write_text("{}")
    outside = tmp_path / "outside.safetensors"
    shutil.copy(folder / TOKENS, outside)
    (folder / "llm" / "model.safetensors").symlink_to(outside)
    _index(folder, lambda i: i["config"]["llm"].__setitem__("source", "./llm"))
    with pytest.raises(CheckpointError) as caught:
        AnyGPTPipeline.from_pretrained(folder)
    assert str(caught.value) == (
        f"{folder / 'llm' / 'model.safetensors'}: llm.source resolves to {outside}, outside the model folder "
        f"{folder}; refused"
    )


def test_links_inside_the_folder_and_a_hub_snapshot_load(saved_model, tmp_path):
    """Containment refuses files that leave the folder only: a link to a file inside it, and a Hugging Face hub
    download (``snapshots/REV`` whose files link into the repository's ``blobs``), load as the original."""
    folder = _copy(saved_model, tmp_path)
    (folder / "spare.safetensors").write_bytes((folder / TOKENS).read_bytes())
    (folder / TOKENS).unlink()
    (folder / TOKENS).symlink_to(folder / "spare.safetensors")
    original = AnyGPTPipeline.from_pretrained(saved_model).model.state_dict()
    for key, value in AnyGPTPipeline.from_pretrained(folder).model.state_dict().items():
        assert torch.equal(value, original[key]), key

    repo = tmp_path / "hub" / "models--someone--model"
    snapshot = repo / "snapshots" / "0123abcd"
    shutil.copytree(saved_model, snapshot)
    (repo / "blobs").mkdir()
    for path in sorted(p for p in snapshot.rglob("*") if p.is_file()):
        blob = repo / "blobs" / f"{abs(hash(str(path))):x}"
        path.rename(blob)
        path.symlink_to(os.path.relpath(blob, path.parent))
    for key, value in AnyGPTPipeline.from_pretrained(snapshot).model.state_dict().items():
        assert torch.equal(value, original[key]), key


# ---------------------------------------------------------------------------------------------- training runs
def _losses(out: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows]


def _assert_same_final(a: Path, b: Path) -> None:
    files = sorted(p.relative_to(a) for p in a.rglob("*.safetensors"))
    assert files and files == sorted(p.relative_to(b) for p in b.rglob("*.safetensors"))
    for rel in files:
        x, y = load_file(a / rel), load_file(b / rel)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), rel


@pytest.fixture(scope="module")
def straight(sample, tmp_path_factory) -> Path:
    """A 4-step run with checkpoint-2 and checkpoint-4."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("straight") / "out"
    run_stage(sample, out)
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    return out


def _interrupted_copy(straight: Path, where: Path) -> Path:
    """The straight run as if killed after writing checkpoint-4 (before final/)."""
    shutil.copytree(straight, where)
    shutil.rmtree(where / "final")
    return where


CHECKPOINT_DAMAGES = {
    "truncated trained tensors": (
        lambda c: _truncate(c, "trainable.safetensors"),
        "trainable.safetensors: not a readable safetensors file",
    ),
    "NaN trained tensor": (
        lambda c: _edit(c, "trainable.safetensors", _nan_row),
        "trainable.safetensors: key '.+' holds NaN",
    ),
    "missing trained key": (
        lambda c: _edit(c, "trainable.safetensors", lambda t: t.pop(sorted(t)[0])),
        "trainable.safetensors: key '.+' is missing",
    ),
    "wrong shape": (lambda c: _edit(c, "trainable.safetensors", _wrong_shape), r"has shape \(.*\), expected"),
    "missing optimizer": (lambda c: (c / "optimizer.pt").unlink(), "optimizer.pt: missing"),
    "truncated optimizer": (lambda c: _truncate(c, "optimizer.pt"), "optimizer.pt: not a readable torch file"),
    "truncated random state": (lambda c: _truncate(c, "rng-0.pt"), "rng-0.pt: not a readable torch file"),
    "damaged trainer state": (lambda c: (c / "trainer_state.json").write_text("{"), "trainer_state.json: not valid"),
}


@pytest.mark.parametrize("damage", list(CHECKPOINT_DAMAGES))
def test_resume_auto_falls_back_past_a_damaged_newest_checkpoint(sample, straight, tmp_path, caplog, damage):
    spoil, reason = CHECKPOINT_DAMAGES[damage]
    out = _interrupted_copy(straight, tmp_path / "damaged")
    spoil(out / "checkpoint-4")
    with caplog.at_level(logging.WARNING, logger="training.trainer"):
        final = run_stage(sample, out, resume="auto")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("checkpoint-4 is damaged" in w and re.search(reason, w) for w in warnings), warnings
    assert any("resuming from checkpoint-2: the damaged checkpoint-4 was moved" in w for w in warnings), warnings
    assert (out / "checkpoint-4.damaged").is_dir()

    # the same as resuming from checkpoint-2 directly, and as the run that was never interrupted
    direct = _interrupted_copy(straight, tmp_path / "direct")
    shutil.rmtree(direct / "checkpoint-4")
    run_stage(sample, direct, resume=str(direct / "checkpoint-2"))
    assert _losses(out) == _losses(direct) == _losses(straight)
    _assert_same_final(final, direct / "final")
    _assert_same_final(final, straight / "final")
    # the fresh checkpoint-4 is whole: the next resume takes it
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    run_stage(sample, out, resume="auto")
    _assert_same_final(out / "final", straight / "final")


def test_no_whole_checkpoint_is_one_error_naming_the_folder(sample, straight, tmp_path):
    out = _interrupted_copy(straight, tmp_path / "out")
    _truncate(out / "checkpoint-4", "trainable.safetensors")
    (out / "checkpoint-2" / "optimizer.pt").unlink()
    with pytest.raises(CheckpointError) as caught:
        run_stage(sample, out, resume="auto")
    text = str(caught.value)
    assert text.startswith(f"{out}: no checkpoint to resume from is whole (checkpoint-4: ")
    assert "checkpoint-2: " in text and "\n" not in text
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]  # nothing moved


def test_an_explicit_damaged_checkpoint_is_refused_naming_the_file(sample, straight, tmp_path):
    out = _interrupted_copy(straight, tmp_path / "out")
    shutil.rmtree(out / "checkpoint-4")
    _edit(out / "checkpoint-2", "trainable.safetensors", _nan_row)
    with pytest.raises(CheckpointError, match=r"--resume .*checkpoint-2: .*trainable.safetensors: key '.+' holds NaN"):
        run_stage(sample, out, resume=str(out / "checkpoint-2"))


def test_a_checkpoint_of_another_run_is_not_skipped(sample, straight, tmp_path):
    out = _interrupted_copy(straight, tmp_path / "out")
    with pytest.raises(ConfigError, match="checkpoint-4: written with max_steps 4, this run has 6"):
        run_stage(sample, out, steps=6, resume="auto")
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]


# ---------------------------------------------------------------------------------------------- a full disk
def test_disk_full_during_a_checkpoint_keeps_the_previous_one(sample, straight, tmp_path, monkeypatch):
    write = checkpoint_module._write

    def full_disk(path: Path, data: bytes) -> None:
        if path.parent.name == ".checkpoint-4.tmp" and path.name == "optimizer.pt":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        write(path, data)

    monkeypatch.setattr(checkpoint_module, "_write", full_disk)
    out = tmp_path / "out"
    with pytest.raises(TrainingError) as caught:
        run_stage(sample, out)
    text = str(caught.value)
    assert text.startswith(f"no space left on the device of {out} while writing checkpoint-4 (it needs about ")
    assert text.endswith("then continue with --resume auto; checkpoint-2 is intact") and "\n" not in text
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]
    assert not list(out.glob(".checkpoint-*")) and not (out / "final").exists()
    for name in ("trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng-0.pt", "trainer_state.json"):
        assert (out / "checkpoint-2" / name).read_bytes() == (straight / "checkpoint-2" / name).read_bytes(), name

    monkeypatch.setattr(checkpoint_module, "_write", write)
    run_stage(sample, out, resume="auto")
    assert _losses(out) == _losses(straight)
    _assert_same_final(out / "final", straight / "final")


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),  # safetensors
    ],
    ids=["OSError", "safetensors"],
)
def test_disk_full_during_the_final_save_is_one_line_and_a_rerun_finishes(
    sample, straight, tmp_path, monkeypatch, capsys, error
):
    from anygpt.cli import main

    def full_disk(self, folder):
        raise error

    out = tmp_path / "out"
    args = ["train", "--stage", "1", "--config", str(sample / "stage1.yaml"), "--output-dir", str(out)]
    args += ["--max-steps", "4"] + [f"--set={k}={v}" for k, v in SETS.items()]
    monkeypatch.setattr(AnyGPTPipeline, "save_pretrained", full_disk)
    assert main(args) == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # above it: the progress bar
    assert last.startswith(f"anygpt: training stopped: no space left on the device of {out} while writing final/ (")
    assert last.endswith("then run again with --resume auto (checkpoint-4 is intact: no step is trained again)")
    assert "Traceback" not in err
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    assert not (out / "final").exists()

    monkeypatch.undo()
    assert main([*args, "--resume", "auto"]) == 0
    _assert_same_final(out / "final", straight / "final")


# ---------------------------------------------------------------------------------------------- signals
CHILD = textwrap.dedent(
    """
    import os, signal, sys, time
    from anygpt.core.model import AnyGPTModel
    from training.trainer import StageTrainer

    mode = sys.argv[1]
    if mode == "slow":  # time to be signalled between steps
        step = StageTrainer._step
        def slow(self, n):
            time.sleep(0.3)
            return step(self, n)
        StageTrainer._step = slow
    else:  # a signal in the middle of writing final/: after the trained parts, before the index
        save = AnyGPTModel.save_trained
        def killed(self, folder):
            parts = save(self, folder)
            os.kill(os.getpid(), getattr(signal, mode))
            time.sleep(5)
            return parts
        AnyGPTModel.save_trained = killed
    from anygpt.cli import main
    sys.exit(main(sys.argv[2:]))
    """
)


def _child(sample: Path, out: Path, mode: str, steps: int) -> subprocess.Popen:
    args = ["train", "--stage", "1", "--config", str(sample / "stage1.yaml"), "--output-dir", str(out)]
    args += ["--max-steps", str(steps)] + [f"--set={k}={v}" for k, v in SETS.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-c", CHILD, mode, *args]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigterm_writes_a_checkpoint_and_a_rerun_resumes_from_it(sample, tmp_path):
    out = tmp_path / "out"
    child = _child(sample, out, "slow", steps=8)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert child.poll() is None, child.communicate()
        assert time.monotonic() < deadline, "the run logged no step"
        time.sleep(0.05)
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM: stopping after this step with a checkpoint" in err
    done = len(metrics.read_text().splitlines())
    assert f"terminated (SIGTERM); checkpoint-{done} written, continue with --resume auto" in err
    assert "Traceback" not in err
    assert 2 <= done < 8
    assert list_checkpoints(out)[-1].name == f"checkpoint-{done}"  # besides checkpoint-2 (train.save_every)
    assert not (out / "final").exists() and not list(out.glob(".checkpoint-*"))

    resumed = run_stage(sample, out, steps=8, resume="auto")
    straight = run_stage(sample, tmp_path / "straight", steps=8)
    assert [s for s, _ in _losses(out)] == list(range(1, 9))
    assert _losses(out) == _losses(tmp_path / "straight")
    _assert_same_final(resumed, straight)


@pytest.mark.parametrize("sent", ["SIGKILL", "SIGTERM"])
def test_a_signal_during_the_final_save_leaves_nothing_a_rerun_keeps(sample, straight, tmp_path, sent):
    """SIGTERM: the writer removes its temporary folder on the way out. SIGKILL: nothing can, so the next run into
    the folder sweeps it. Either way checkpoint-4 is intact and a rerun writes final/."""
    out = tmp_path / "out"
    child = _child(sample, out, sent, steps=4)
    _, err = child.communicate(timeout=300)
    left = sorted(p.name for p in out.iterdir() if p.name.startswith(f".{'final'}."))
    if sent == "SIGKILL":
        assert child.returncode == -signal.SIGKILL, err
        assert left and all("tmp" in name for name in left), left  # the killed writer's temporary folder
    else:
        assert child.returncode == 128 + signal.SIGTERM, err
        assert left == [] and "Traceback" not in err
    assert not (out / "final").exists()
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]

    final = run_stage(sample, out, resume="auto")
    assert not [p for p in out.iterdir() if p.name.startswith(".final.")]
    _assert_same_final(final, straight / "final")
    assert AnyGPTPipeline.from_pretrained(final) is not None


# ---------------------------------------------------------------------------------------------- the run's folder
def test_a_second_run_into_a_folder_in_use_is_refused_and_sweeps_nothing(sample, straight, tmp_path):
    out = _interrupted_copy(straight, tmp_path / "out")
    live = out / ".final.tmp-live1234"
    live.mkdir()
    with (
        run_lock(out),
        pytest.raises(ConfigError, match=rf"{out} is in use by another anygpt train \(pid {os.getpid()}\)"),
    ):
        run_stage(sample, out, resume="auto")
    assert live.is_dir()  # the other run's temporary folder is left alone
    run_stage(sample, out, resume="auto")  # the lock was released: this run holds the folder and sweeps it
    assert not live.exists()


def test_clean_partial_puts_back_a_checkpoint_whose_replacement_was_killed(tmp_path):
    (tmp_path / ".checkpoint-4.old").mkdir()  # set aside, the new checkpoint-4 never renamed into place
    (tmp_path / ".checkpoint-4.old" / "trainer_state.json").write_text("{}")
    (tmp_path / ".checkpoint-4.tmp").mkdir()
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / ".checkpoint-2.old").mkdir()  # checkpoint-2 is there: the old copy goes
    (tmp_path / ".final.tmp-abcd1234").mkdir()  # atomic_directory's names, before and after issue 22
    (tmp_path / ".final.anygpt-tmp-99999-abcd1234").mkdir()
    (tmp_path / ".metrics.jsonl.anygpt-tmp-99999-abcd1234").write_text("")
    (tmp_path / ".final.old-123").mkdir()
    (tmp_path / ".metrics.jsonl.x1y2z3.tmp").write_text("")
    (tmp_path / ".keep.me").write_text("")
    clean_partial(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".keep.me", "checkpoint-2", "checkpoint-4"]
    assert (tmp_path / "checkpoint-4" / "trainer_state.json").read_text() == "{}"


@pytest.mark.parametrize(
    "sizes, message",
    [
        ({"hidden_size": 2**20}, r"llm\.hidden_size must be an integer in \[1, 65536\], got 1048576"),
        ({"num_layers": 10**9}, r"llm\.num_layers must be an integer in \[1, 1024\], got 1000000000"),
        ({"num_heads": True}, r"llm\.num_heads must be an integer in \[1, 1024\], got True"),
        ({"max_position_embeddings": 2.5}, r"llm\.max_position_embeddings must be an integer .* got 2\.5"),
        ({"seed": 2**5000}, r"llm\.seed must be an integer .* got an integer of 5001 bits"),
        (
            {"hidden_size": 16384, "num_layers": 126, "num_heads": 128, "intermediate_size": 53248},
            r"about 465\.1 billion parameters, over the 10 billion",
        ),
    ],
)
def test_llm_sizes_out_of_range_are_refused_before_anything_is_built(sizes, message):
    from anygpt.core.llm import LanguageModelConfig

    with pytest.raises(ValueError, match=message):
        LanguageModelConfig(**sizes)
    # a real model's sizes are not built locally: only the ranges apply
    LanguageModelConfig(
        source="org/some-llm", hidden_size=16384, num_layers=126, num_heads=128, intermediate_size=53248
    )
