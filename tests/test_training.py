"""Staged training on the sample dataset: what trains, losses, files, resume, cache, processes, configs, errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import training.objectives as objectives
from anygpt.base.errors import ConfigError, TrainingError
from training.config import load_config
from training.trainer import StageTrainer

REPO = Path(__file__).resolve().parents[1]
SHIPPED = [
    p for p in sorted((REPO / "training" / "configs").glob("*.yaml")) if not p.name.startswith("toyworld-")
]  # toyworld-*: tests/test_toyworld.py


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    from toyworld.sample_configs import write_sample

    return write_sample(tmp_path_factory.mktemp("sample") / "data", size=8)


def _config(sample: Path, stage: int, **sets):
    overrides = [f"{k}={v}" for k, v in sets.items()]
    return load_config(sample / f"stage{stage}.yaml", overrides=overrides)


def _run(sample: Path, stage: int, out: Path, steps: int, start: str | None = None, resume=None, **sets) -> Path:
    sets.setdefault("cache_dir", "null")
    trainer = StageTrainer(_config(sample, stage, **sets), start=start, output_dir=out, max_steps=steps, resume=resume)
    return trainer.train()


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------- what trains
def _setup(sample: Path, stage: int, tmp_path: Path, **sets) -> StageTrainer:
    trainer = StageTrainer(_config(sample, stage, cache_dir="null", **sets), output_dir=tmp_path / "out")
    trainer.setup()
    return trainer


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_exact_trainable_parameters(sample, tmp_path, stage):
    trainer = _setup(sample, stage, tmp_path)
    model = trainer.model
    names = {n for n, _ in trainer.params}
    if stage == 1:
        expected = {f"model.input_projectors.{k}" for k in model.input_projectors.state_dict()}
        rows = len(model.tokens.all_added_ids)
    elif stage == 2:
        expected = {f"model.output_projectors.{k}" for k in model.output_projectors.state_dict()}
        rows = len(model.tokens.all_signal_ids)
    else:
        expected = {f"model.language_model.{n}" for n, _ in model.language_model.named_parameters() if "lora_" in n}
        rows = len(model.tokens.all_signal_ids)
        assert len(expected) == 2 * 4 * model.config.llm.num_layers  # A and B on q, k, v, o of every layer
    expected |= {"token_rows.input_rows", "token_rows.output_rows"}
    assert names == expected
    hidden = model.hidden_size
    assert trainer.token_rows.input_rows.shape == (rows, hidden)
    count = sum(p.numel() for _, p in trainer.params)
    assert count == sum(dict(trainer.module.named_parameters())[n].numel() for n in expected)
    token_rows = 2 * rows * hidden  # input-embedding rows + LM-head rows
    if stage == 1:  # one Linear(embed_dim -> hidden) per input modality
        embed = model.encoder.embed_dim
        assert count == len(model.input_projectors) * (embed * hidden + hidden) + token_rows
    if stage == 3:  # A (r x hidden) and B (hidden x r) on q, k, v, o of every layer
        r = model.config.llm.lora.r
        assert count == model.config.llm.num_layers * 4 * 2 * r * hidden + token_rows
    # never the whole embedding matrix or LM head (NExT-GPT's freezing bug), never the encoder or base LLM
    llm = model.language_model
    assert not llm.get_input_embeddings().weight.requires_grad
    assert not llm.get_output_embeddings().weight.requires_grad
    assert not any(p.requires_grad for p in model.encoder.parameters())


def test_trainable_overrides(sample, tmp_path):
    trainer = _setup(sample, 3, tmp_path, **{"trainable.output_projectors": "true", "trainable.token_rows": "none"})
    names = {n for n, _ in trainer.params}
    assert trainer.token_rows is None
    assert any(n.startswith("model.output_projectors.") for n in names)
    assert any("lora_" in n for n in names)
    assert not any(n.startswith("model.input_projectors.") for n in names)


def test_token_rows_train_only_their_rows(sample, tmp_path):
    from anygpt.core.pipeline import AnyGPTPipeline

    final = _run(sample, 2, tmp_path / "out", steps=4)
    before = AnyGPTPipeline.from_pretrained("tiny").model.language_model.get_input_embeddings().weight
    after = AnyGPTPipeline.from_pretrained(final).model.language_model.get_input_embeddings().weight
    changed = torch.nonzero((before - after).abs().sum(1) > 0).flatten().tolist()
    tokens = AnyGPTPipeline.from_pretrained("tiny").model.tokens
    assert changed and set(changed) <= tokens.all_signal_ids


# ---------------------------------------------------------------------------------------------- runs
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_stage_run_writes_files_loss_falls_and_final_changes_output(sample, tmp_path, stage, media_files):
    from anygpt.core.pipeline import AnyGPTPipeline

    out = tmp_path / "out"
    steps = 16
    final = _run(sample, stage, out, steps=steps, **{"train.save_every": 8})
    assert final == out / "final"
    assert (final / "anygpt_index.json").is_file()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-16", "checkpoint-8"]
    assert (out / "train_config.yaml").is_file()
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    rows = _metrics(out)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for r in rows:
        assert {"loss", "loss_ce", "lr", "samples_per_s"} <= set(r)
        assert np.isfinite(r["loss"])
    if stage > 1:
        assert any(k.startswith("loss_caption_") for r in rows for k in r)
    # loss falls: compare the same datasets (round robin over 3 / 12 datasets) at the start and at the end
    first = np.mean([r["loss"] for r in rows[:3]])
    last = np.mean([r["loss"] for r in rows[-3:]])
    assert last < first, (first, last)

    trained = AnyGPTPipeline.from_pretrained(final)
    preset = AnyGPTPipeline.from_pretrained("tiny")
    kwargs = dict(
        images=[media_files["image"]], modalities=["image", "audio"], seed=0, max_new_tokens=4, show_progress=False
    )
    kwargs["num_inference_steps"] = 1
    a = preset("describe this", **kwargs)
    b = trained("describe this", **kwargs)
    assert not torch.allclose(a.conditioning["image"], b.conditioning["image"])


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_resume_equals_straight_run(sample, tmp_path, monkeypatch, stage):
    # one thread: CPU reductions then add in one order, so both runs can be compared exactly
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _check_resume(sample, tmp_path, monkeypatch, stage)
    finally:
        torch.set_num_threads(threads)


def _check_resume(sample, tmp_path, monkeypatch, stage):
    import signal

    # stage 3 with LoRA dropout: the random stream must resume exactly too
    sets = {"train.save_every": 100, "lora": "{r: 4, alpha: 8, dropout: 0.2}"} if stage == 3 else {}
    sets.setdefault("train.save_every", 100)
    straight = _run(sample, stage, tmp_path / "straight", steps=6, **sets)

    # the same run, Ctrl-C pressed during step 3 (after its optimizer step): it finishes the step, writes
    # checkpoint-3 and stops; then --resume auto continues it
    original = StageTrainer._step

    def interrupted(self, step):
        metrics = original(self, step)
        if step == 2:
            signal.raise_signal(signal.SIGINT)
        return metrics

    monkeypatch.setattr(StageTrainer, "_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(sample, stage, tmp_path / "resumed", steps=6, **sets)
    monkeypatch.setattr(StageTrainer, "_step", original)
    assert [p.name for p in (tmp_path / "resumed").glob("checkpoint-*")] == ["checkpoint-3"]
    assert len(_metrics(tmp_path / "resumed")) == 3
    resumed = _run(sample, stage, tmp_path / "resumed", steps=6, resume="auto", **sets)

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in rows]

    a, b = strip(_metrics(tmp_path / "straight")), strip(_metrics(tmp_path / "resumed"))
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert a == b
    files = sorted(p.relative_to(straight) for p in straight.rglob("*.safetensors"))
    assert files == sorted(p.relative_to(resumed) for p in resumed.rglob("*.safetensors"))
    for rel in files:
        x, y = load_file(straight / rel), load_file(resumed / rel)
        assert all(torch.equal(x[k], y[k]) for k in x), rel


def test_resume_refuses_a_checkpoint_of_another_run(sample, tmp_path):
    _run(sample, 3, tmp_path / "three", steps=2)
    with pytest.raises(ConfigError, match="written with stage 3"):
        _run(sample, 2, tmp_path / "three", steps=2, resume=str(tmp_path / "three" / "checkpoint-2"))
    with pytest.raises(ConfigError, match="written with max_steps 2"):
        _run(sample, 3, tmp_path / "three", steps=4, resume="auto")


def test_partial_metrics_line_does_not_block_resume(sample, tmp_path):
    out = tmp_path / "out"
    _run(sample, 1, out, steps=4, **{"train.save_every": 2})
    shutil.rmtree(out / "final")
    shutil.rmtree(out / "checkpoint-4")
    with open(out / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 5, "lo')  # a write killed half-way
    (out / ".checkpoint-6.tmp").mkdir()  # a checkpoint write killed half-way
    _run(sample, 1, out, steps=4, resume="auto", **{"train.save_every": 2})
    assert [r["step"] for r in _metrics(out)] == [1, 2, 3, 4]
    assert not (out / ".checkpoint-6.tmp").exists()


def test_fresh_run_refuses_previous_run_folder(sample, tmp_path):
    _run(sample, 1, tmp_path / "out", steps=1)
    with pytest.raises(ConfigError, match="--resume auto"):
        _run(sample, 1, tmp_path / "out", steps=1)


def test_killed_checkpoint_write_is_ignored(sample, tmp_path):
    from training.checkpoint import list_checkpoints

    out = tmp_path / "out"
    _run(sample, 1, out, steps=2, **{"train.save_every": 1})
    (out / ".checkpoint-5.tmp").mkdir()  # a write that was killed before its rename
    (out / "checkpoint-9").mkdir()  # a folder without trainer_state.json
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]


def test_non_finite_loss_is_reported_with_its_step(sample, tmp_path, monkeypatch):
    real = objectives.token_cross_entropy_sum
    state = {"calls": 0}

    def poisoned(logits, labels):
        state["calls"] += 1
        loss, count = real(logits, labels)
        return (loss * float("nan"), count) if state["calls"] == 3 else (loss, count)

    monkeypatch.setattr(objectives, "token_cross_entropy_sum", poisoned)
    with pytest.raises(TrainingError, match="non-finite loss at step 3"):
        _run(sample, 1, tmp_path / "out", steps=5, **{"train.save_every": 1})
    assert (tmp_path / "out" / "checkpoint-2").is_dir()  # progress before the bad step is kept


def test_non_finite_gradient_is_caught_before_the_update(sample, tmp_path, monkeypatch):
    real = objectives.StageModule.forward
    state = {"calls": 0}

    def poisoned(self, *args, **kwargs):
        sums = real(self, *args, **kwargs)
        state["calls"] += 1
        if state["calls"] == 2:  # a finite loss whose gradient overflows
            weight = self.model.input_projectors["image"].proj.weight
            sums["ce"] = sums["ce"] + _inf_grad(weight)
        return sums

    monkeypatch.setattr(objectives.StageModule, "forward", poisoned)
    with pytest.raises(TrainingError, match="non-finite gradient norm at step 2"):
        _run(sample, 1, tmp_path / "out", steps=4, **{"train.save_every": 1})
    assert [p.name for p in (tmp_path / "out").glob("checkpoint-*")] == ["checkpoint-1"]


def _inf_grad(x: torch.Tensor) -> torch.Tensor:
    """Zero in the forward pass, an infinite gradient for ``x`` in the backward pass."""

    class Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            ctx.save_for_backward(t)
            return t.new_zeros(())

        @staticmethod
        def backward(ctx, grad):
            (t,) = ctx.saved_tensors
            return torch.full_like(t, float("inf"))

    return Fn.apply(x)


def test_stage_2_without_any_output_loss_is_refused(sample, tmp_path):
    trainer = StageTrainer(_config(sample, 2, **{"loss.caption_embedding_weight": 0}), output_dir=tmp_path / "o")
    with pytest.raises(ConfigError, match="nothing would train the output projectors"):
        trainer.setup()


def test_lora_initialisation_does_not_depend_on_the_global_rng():
    from anygpt.core.pipeline import AnyGPTPipeline

    torch.manual_seed(1)
    a = AnyGPTPipeline.from_pretrained("tiny").model.language_model
    torch.manual_seed(2)
    b = AnyGPTPipeline.from_pretrained("tiny").model.language_model
    lora = [n for n, _ in a.named_parameters() if "lora_A" in n]
    assert lora and all(torch.equal(a.get_parameter(n), b.get_parameter(n)) for n in lora)


def test_diffusion_loss_option(sample, tmp_path):
    out = tmp_path / "out"
    _run(sample, 2, out, steps=3, **{"loss.diffusion.enabled": "true"})
    rows = _metrics(out)
    keys = {k for r in rows for k in r if k.startswith("loss_diffusion_")}
    assert keys == {"loss_diffusion_image", "loss_diffusion_video", "loss_diffusion_audio"}
    assert all(np.isfinite(r[k]) and r[k] > 0 for r in rows for k in r if k in keys)


def test_bf16_with_gradient_checkpointing(sample, tmp_path):
    from accelerate.state import AcceleratorState

    # accelerate keeps one process-wide state: a run with another precision needs it reset (a CLI run is one process)
    AcceleratorState._reset_state()
    try:
        out = tmp_path / "out"
        sets = {"train.mixed_precision": "bf16", "train.gradient_checkpointing": "true"}
        _run(sample, 3, out, steps=3, **sets)
        assert all(np.isfinite(r["loss"]) for r in _metrics(out))
    finally:
        AcceleratorState._reset_state()


# ---------------------------------------------------------------------------------------------- cache
def test_warm_cache_calls_the_encoder_zero_times(sample, tmp_path, monkeypatch):
    from encoders.imagebind import ImageBindEncoder

    calls = {"n": 0}
    original = ImageBindEncoder.encode

    def counting(self, modality, items):
        calls["n"] += 1
        return original(self, modality, items)

    monkeypatch.setattr(ImageBindEncoder, "encode", counting)
    cache = tmp_path / "cache"
    cold = _run(sample, 1, tmp_path / "cold", steps=6, cache_dir=str(cache))
    assert calls["n"] > 0 and list(cache.glob("encoder-*/shard-*.safetensors"))
    calls["n"] = 0
    warm = _run(sample, 1, tmp_path / "warm", steps=6, cache_dir=str(cache))
    assert calls["n"] == 0
    a = load_file(cold / "input_projectors/image/diffusion_pytorch_model.safetensors")
    b = load_file(warm / "input_projectors/image/diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # cached features are the features


def test_cache_invalidation(sample, tmp_path):
    from anygpt.base.modality import Modality
    from encoders import build_imagebind_encoder
    from training.cache import MediaFeatureCache
    from training.data.records import MediaFile

    image = sorted((sample / "T_X_pair_data/cc3m/images").iterdir())[0]
    copy = tmp_path / "img.png"
    shutil.copy(image, copy)
    item = MediaFile(Modality.IMAGE, copy, "x/img.png")
    encoder = build_imagebind_encoder("tiny", seed=0)
    first = MediaFeatureCache(tmp_path / "c", encoder)
    e1, _ = first.get([item])[0]
    first.flush()
    again = MediaFeatureCache(tmp_path / "c", encoder)
    again.get([item])
    assert again.stats.hits == 1 and again.stats.encoder_calls == 0
    os.utime(copy, ns=(1, 1))  # touched, unchanged content: still a hit (hash checked)
    touched = MediaFeatureCache(tmp_path / "c", encoder)
    touched.get([item])
    assert touched.stats.hits == 1
    shutil.copy(sorted((sample / "T_X_pair_data/cc3m/images").iterdir())[1], copy)  # changed file
    changed = MediaFeatureCache(tmp_path / "c", encoder)
    e2, _ = changed.get([item])[0]
    assert changed.stats.misses == 1 and not torch.equal(e1, e2)
    other = MediaFeatureCache(tmp_path / "c", build_imagebind_encoder("tiny", seed=1))  # another encoder
    assert other.fingerprint != first.fingerprint
    other.get([item])
    assert other.stats.misses == 1


def test_cache_command_fills_the_cache(sample, tmp_path):
    from training.precompute import precompute

    config = _config(sample, 2, cache_dir=str(tmp_path / "cache"))
    stats = precompute(config)
    assert stats["captions_computed"] > 0 and stats["captions_cached"] == 0
    again = precompute(_config(sample, 2, cache_dir=str(tmp_path / "cache")))
    assert again["captions_computed"] == 0 and again["captions_cached"] == stats["captions_computed"]


# ---------------------------------------------------------------------------------------------- processes
def test_two_processes_equal_one_process(sample, tmp_path):
    from accelerate.state import AcceleratorState

    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not installed beside this python")
    sets = {
        "cache_dir": "null", "train.device": "cpu", "train.batch_size": 2,
        "loss.diffusion.enabled": "true",  # per-item noise seeds: the same draws however the batch is split
    }  # fmt: skip
    two = tmp_path / "two"
    command = ["train", "--stage", "2", "--config", str(sample / "stage2.yaml"), "--max-steps", "3"]
    command += [arg for k, v in sets.items() for arg in ("--set", f"{k}={v}")]
    subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "anygpt", *command, "--output-dir", str(two)],
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        timeout=300,
    )
    # the same global batch in one process (here: no second interpreter to start), two micro-batches of 2
    one = tmp_path / "one"
    AcceleratorState._reset_state()  # a run on the CPU: a fresh process-wide accelerate state, as a CLI run has
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _run(sample, 2, one, steps=3, **sets, **{"train.gradient_accumulation_steps": 2})
    finally:
        torch.set_num_threads(threads)
        AcceleratorState._reset_state()
    a, b = _metrics(one), _metrics(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for x, y in zip(a, b, strict=True):
        assert x["tokens"] == y["tokens"]
        assert {k for k in x if k.startswith("loss_")} == {k for k in y if k.startswith("loss_")}
        for key in (k for k in x if k.startswith("loss")):
            assert x[key] == pytest.approx(y[key], rel=1e-5), key
    for rel in [
        f"final/output_projectors/{m}/diffusion_pytorch_model.safetensors" for m in ("image", "video", "audio")
    ]:
        wa, wb = load_file(one / rel), load_file(two / rel)
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-4)
    ta, tb = (
        load_file(one / "final/token_embeddings.safetensors"),
        load_file(two / "final/token_embeddings.safetensors"),
    )
    torch.testing.assert_close(ta["input_embeddings"], tb["input_embeddings"], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_configs_load_and_validate(path, sample):
    config = load_config(path, overrides=[f"data_root={sample}"])
    assert config.stage in (0, 1, 2, 3)
    specs = config.dataset_specs()
    assert specs and all(s.path.is_file() and s.media_root.is_dir() for s in specs)
    from training.data.readers import read_dataset

    assert all(read_dataset(s) for s in specs)


def test_shipped_configs_cover_every_stage_at_both_sizes():
    stages = {f"{size}-stage{s}.yaml" for size in ("tiny", "nextgpt-7b") for s in (1, 2, 3)}
    assert {p.name for p in SHIPPED} == stages | {"tiny-qformer-pretraining.yaml"}  # stage 0: optional, Q-Former


def test_nextgpt_hyperparameters():
    import yaml

    for stage, lr in ((1, 4e-4), (2, 4e-4), (3, 5e-4)):
        data = yaml.safe_load((REPO / f"training/configs/nextgpt-7b-stage{stage}.yaml").read_text())
        assert data["model"] == "nextgpt-7b"
        assert float(data["optim"]["lr"]) == lr
        assert data["optim"]["betas"] == [0.9, 0.95] and data["optim"]["weight_decay"] == 0.001
        assert data["train"]["seed"] == 13 and data["data"]["max_length"] == 512
    stage3 = yaml.safe_load((REPO / "training/configs/nextgpt-7b-stage3.yaml").read_text())
    assert stage3["lora"] == {
        "r": 32,
        "alpha": 32,
        "dropout": 0.1,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
    }
    assert stage3["loss"]["modality_weights"] == {"video": 2.0}


@pytest.mark.parametrize(
    "sets, match",
    [
        ({"train.bacth_size": 2}, r"train\.bacth_size"),
        ({"train.batch_size": "two"}, r"train\.batch_size: expected an integer"),
        ({"optim.lr": -1}, r"optim\.lr: must be > 0"),
        ({"data.sampling": "random"}, r"data\.sampling"),
        ({"loss.distance": "cosine"}, r"loss\.distance"),
        ({"train.mixed_precision": "fp8"}, r"train\.mixed_precision"),
        ({"data_root": "/nonexistent/folder"}, r"data_root: folder not found"),
    ],
)
def test_bad_config_values_name_the_key(sample, sets, match):
    with pytest.raises(ConfigError, match=match):
        _config(sample, 1, **sets)


def test_bad_dataset_entries_name_the_file(sample, tmp_path):
    import yaml

    data = yaml.safe_load((sample / "stage1.yaml").read_text())
    bad = dict(data)
    bad["data"] = dict(data["data"], datasets=[dict(data["data"]["datasets"][0], path="missing.json")])
    path = sample / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match=r"data\.datasets\[0\]\.path: file not found: .*missing\.json"):
        load_config(path)
    bad["data"]["datasets"] = [dict(data["data"]["datasets"][0], media_root="nowhere")]
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match=r"media_root: folder not found"):
        load_config(path)
    bad["data"]["datasets"] = [dict(data["data"]["datasets"][0], colour="red")]
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['colour'\]"):
        load_config(path)
    with pytest.raises(ConfigError, match="stage 1, --stage asks for 2"):
        load_config(sample / "stage1.yaml", stage=2)


def test_caption_embedding_of_another_decoder_is_refused_before_training(sample, tmp_path):
    embeds = tmp_path / "embed"
    embeds.mkdir()
    for image in (sample / "T_X_pair_data/cc3m/images").iterdir():
        np.save(embeds / f"{image.name}.npy", np.zeros((77, 1024), dtype=np.float16))  # SD-2 size
    trainer = StageTrainer(_config(sample, 2, cache_dir="null"), output_dir=tmp_path / "out")
    for entry in trainer.config.data.datasets:
        if entry["name"] == "cc3m":
            entry["embedding_root"] = str(embeds)
    with pytest.raises(ConfigError, match=r"has shape \(77, 1024\).*conditioned on \(77, 32\)"):
        trainer.setup()


def test_model_without_the_modality_is_refused(sample, tmp_path):
    from anygpt.core.config import config_from_preset
    from anygpt.core.pipeline import AnyGPTPipeline

    config = config_from_preset("tiny")
    config.input_modalities = ["image"]
    AnyGPTPipeline.from_config(config).save_pretrained(tmp_path / "image-only")
    trainer = StageTrainer(_config(sample, 1), start=str(tmp_path / "image-only"), output_dir=tmp_path / "out")
    with pytest.raises(ConfigError, match=r"dataset webvid has video inputs, but the model reads only \['image'\]"):
        trainer.setup()


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_train_and_errors(sample, tmp_path, capsys):
    from anygpt.cli import main

    out = tmp_path / "cli"
    code = main(
        ["train", "--stage", "1", "--config", str(sample / "stage1.yaml"), "--output-dir", str(out), "--max-steps", "2"]
    )
    assert code == 0 and (out / "final" / "anygpt_index.json").is_file()
    assert "final model:" in capsys.readouterr().out
    code = main(["train", "--stage", "1", "--config", str(sample / "stage1.yaml"), "--set", "train.oops=1"])
    err = capsys.readouterr().err
    assert code == 2 and "train.oops" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    code = main(["train", "--stage", "2", "--config", str(sample / "stage2.yaml"), "--from", str(tmp_path / "nope")])
    assert code == 2 and "neither a preset" in capsys.readouterr().err


def test_cli_cache_command(sample, tmp_path, capsys):
    from anygpt.cli import main

    args = ["cache", "--config", str(sample / "stage1.yaml"), "--cache-dir", str(tmp_path / "c")]
    assert main(args) == 0
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert stats["media_computed"] == 24 and stats["media_cached"] == 0  # 3 pair datasets x 8 records
    assert main(args) == 0
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert stats["media_computed"] == 0 and stats["media_cached"] == 24
    assert main(["cache", "--config", str(sample / "stage1.yaml"), "--set", "cache_dir=null"]) == 2
    assert "cache_dir: not set" in capsys.readouterr().err


def test_cli_data_sample_writes_configs_that_load(tmp_path, capsys):
    from anygpt.cli import main

    assert main(["data", "sample", str(tmp_path / "d"), "--size", "3"]) == 0
    for stage in (1, 2, 3):
        config = load_config(tmp_path / "d" / f"stage{stage}.yaml")
        assert config.stage == stage and config.model == "tiny"
        assert Path(config.output_dir) == tmp_path / "d" / "runs" / f"stage{stage}"  # relative to the file
    assert "anygpt train --stage 3" in capsys.readouterr().out
