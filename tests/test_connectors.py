"""Every connector in the registries through one table: shapes and token counts for varying input lengths,
save/load round trips, and a short stage-1 run (gradients reach only the connector; the loss falls)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from projectors import (
    build_input_projector,
    get_input_projector_class,
    get_output_projector_class,
    list_input_projectors,
    list_output_projectors,
)
from training.config import ConfigError, load_config
from training.trainer import StageTrainer

GRID = [1, 4, 4]  # one CLS token + a 4 x 4 patch grid: N = 17
# every registry entry with its tiny preset, plus the option variants the table covers
VARIANTS = [(name, {}) for name in list_input_projectors()] + [
    ("linear", {"source": "tokens"}),
    ("linear", {"source": "tokens", "spatial_pool": 2}),
    ("mlp", {"source": "tokens", "spatial_pool": 2}),
    ("perceiver", {"spatial_pool": 2}),
    ("group", {"spatial_pool": 2}),
]
IDS = [name + "".join(f"-{k}={v}" for k, v in options.items()) for name, options in VARIANTS]


def _options(name: str, options: dict) -> dict:
    return {**get_input_projector_class(name).presets["tiny"], **options}


def _build(name: str, options: dict):
    cls = get_input_projector_class(name)
    extra = {"grid": GRID} if cls.uses_grid else {}
    return build_input_projector(name, in_dim=24, token_dim=20, out_dim=48, **extra, **_options(name, options))


def _per_token(options: dict) -> bool:
    return options.get("source") == "tokens"


@pytest.mark.parametrize(("name", "options"), VARIANTS, ids=IDS)
def test_output_shape_and_token_count_for_varying_input_lengths(name, options):
    torch.manual_seed(0)
    proj = _build(name, options).eval()
    k = proj.num_output_tokens
    if _per_token(options):  # one token per patch (after pooling): 16 patches, or 4 after 2 x 2 pooling
        assert k == 16 // options.get("spatial_pool", 1) ** 2
    lengths = [17] if _per_token(options) else [17, 37, 65]  # the built grid, then square grids 6 x 6 and 8 x 8
    for n in lengths:
        out = proj(torch.randn(3, 24), torch.randn(3, n, 20))
        assert out.shape == (3, k, 48), (n, out.shape)
        assert torch.isfinite(out).all()
    if _per_token(options):
        with pytest.raises(ValueError, match="built for 1 \\+ 4 x 4 tokens, got 37"):
            proj(torch.randn(3, 24), torch.randn(3, 37, 20))


@pytest.mark.parametrize(("name", "options"), VARIANTS, ids=IDS)
def test_save_load_round_trip(tmp_path, name, options):
    torch.manual_seed(0)
    proj = _build(name, options).eval()
    proj.save_pretrained(tmp_path)
    loaded = get_input_projector_class(name).from_pretrained(tmp_path).eval()
    x, t = torch.randn(2, 24), torch.randn(2, 17, 20)
    assert torch.equal(proj(x, t), loaded(x, t))
    assert loaded.num_output_tokens == proj.num_output_tokens


@pytest.mark.parametrize("name", ["perceiver", "cabstractor", "group"])
def test_sequence_connectors_need_the_token_sequence(name):
    with pytest.raises(ValueError, match="needs the encoder's token sequence"):
        _build(name, {})(torch.randn(2, 24), None)


def test_grid_that_fits_nothing_is_a_clear_error():
    proj = _build("cabstractor", {})
    with pytest.raises(ValueError, match="cannot lay 20 tokens out as a grid"):
        proj(torch.randn(2, 24), torch.randn(2, 20, 20))


def test_spatial_pool_averages_2x2_patches_and_keeps_the_cls_token():
    from projectors.tokens import spatial_pool

    tokens = torch.arange(17, dtype=torch.float32).reshape(1, 17, 1)  # CLS 0, patches 1..16 row by row
    pooled = spatial_pool(tokens, 2, GRID, "test")
    assert pooled.flatten().tolist() == [0.0, 3.5, 5.5, 11.5, 13.5]  # e.g. (1 + 2 + 5 + 6) / 4


# ---------------------------------------------------------------------------------------------- stage 1
@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    from toyworld.sample_configs import write_sample

    return write_sample(tmp_path_factory.mktemp("sample") / "data", size=8)


def _trainer(sample: Path, out: Path, name: str, options: dict, **sets) -> StageTrainer:
    overrides = [
        "cache_dir=null",
        f"input_projector.name={name}",
        f"input_projector.options={json.dumps(_options(name, options))}",
        *[f"{k}={v}" for k, v in sets.items()],
    ]
    return StageTrainer(load_config(sample / "stage1.yaml", overrides=overrides), output_dir=out, max_steps=14)


@pytest.mark.parametrize(("name", "options"), VARIANTS, ids=IDS)
def test_stage1_trains_only_the_connector_and_the_loss_falls(sample, tmp_path, name, options):
    trainer = _trainer(sample, tmp_path / "out", name, options, **{"optim.lr": 0.003, "data.max_length": 1024})
    trainer.setup()
    model = trainer.model
    assert all(type(p) is get_input_projector_class(name) for p in model.input_projectors.values())
    # gradients reach only the connectors (and the added tokens' rows): one backward pass
    batch = trainer.tensors(trainer.micro_batches(0)[0][0])
    sums = trainer.module(batch["input_ids"], batch["labels"], batch["attention_mask"], batch["media"], {}, {})
    sums["ce"].backward()
    with_grad = {n for n, p in trainer.module.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    allowed = {n for n, _ in trainer.params}
    assert with_grad and with_grad <= allowed
    assert all(n.startswith(("model.input_projectors.", "token_rows.")) for n in allowed)
    assert any(n.startswith("model.input_projectors.") for n in with_grad)
    trainer.module.zero_grad(set_to_none=True)
    final = trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    first = sum(r["loss"] for r in rows[:3]) / 3
    last = sum(r["loss"] for r in rows[-3:]) / 3
    assert last < first, (first, last)
    # the run's final model is a normal model folder holding this connector
    from anygpt.core.pipeline import AnyGPTPipeline

    loaded = AnyGPTPipeline.from_pretrained(final)
    assert loaded.model.config.input_projector.name == name


def test_connector_choice_is_refused_when_the_stage_does_not_train_it(sample, tmp_path):
    overrides = ["cache_dir=null", "input_projector=perceiver"]
    trainer = StageTrainer(load_config(sample / "stage2.yaml", overrides=overrides), output_dir=tmp_path / "o")
    with pytest.raises(ConfigError, match="input_projector: 'perceiver' would be built untrained"):
        trainer.setup()


def test_unknown_connector_name_lists_the_registered_ones(sample):
    with pytest.raises(ConfigError, match="input_projector.name: unknown connector 'nope'; registered: .*perceiver"):
        load_config(sample / "stage1.yaml", overrides=["input_projector=nope"])


def test_bare_name_then_options(sample):
    config = load_config(
        sample / "stage1.yaml", overrides=["input_projector=perceiver", "input_projector.options.num_latents=4"]
    )
    assert (config.input_projector.name, config.input_projector.options) == ("perceiver", {"num_latents": 4})


@pytest.mark.parametrize("name", list_output_projectors())
def test_stage2_trains_only_the_output_connector_and_the_loss_falls(sample, tmp_path, name):
    options = get_output_projector_class(name).presets["tiny"]
    overrides = [
        "cache_dir=null",
        f"output_projector.name={name}",
        f"output_projector.options={json.dumps(options)}",
        "optim.lr=0.003",
    ]
    out = tmp_path / "out"
    trainer = StageTrainer(load_config(sample / "stage2.yaml", overrides=overrides), output_dir=out, max_steps=14)
    trainer.setup()
    model = trainer.model
    assert all(type(p) is get_output_projector_class(name) for p in model.output_projectors.values())
    allowed = {n for n, _ in trainer.params}
    assert allowed and all(n.startswith(("model.output_projectors.", "token_rows.")) for n in allowed)
    assert any(n.startswith("model.output_projectors.") for n in allowed)
    trainer.train()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    caption = [r for r in rows if any(k.startswith("loss_caption_") for k in r)]
    first = sum(r["loss"] for r in caption[:3]) / 3
    last = sum(r["loss"] for r in caption[-3:]) / 3
    assert last < first, (first, last)
