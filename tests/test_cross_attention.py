"""Gated cross-attention (Flamingo) as a fusion mode: exactness at gate 0, training, saving, generation, config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from anygpt.base.modality import Modality
from anygpt.core.config import AnyGPTConfig, config_from_preset
from anygpt.core.fusion import CrossAttentionConfig, GatedCrossAttentionLayers, count_parameters, media_context
from anygpt.core.model import AnyGPTModel
from training.config import ConfigError, load_config
from training.trainer import StageTrainer

IMAGE, AUDIO = Modality.IMAGE, Modality.AUDIO


@pytest.fixture(scope="module")
def specs():
    from decoders import build_decoder

    config = config_from_preset("tiny")
    return {Modality(m): build_decoder(c).spec for m, c in config.decoders.items()}


def _config(*, lora: bool = True, **cross_attention) -> AnyGPTConfig:
    config = config_from_preset("tiny")
    if not lora:
        config.llm.lora = None
    if cross_attention:
        config.cross_attention = CrossAttentionConfig(**cross_attention)
    return config


def _perturb_lora(model: AnyGPTModel, seed: int = 1) -> None:
    """LoRA B starts at 0 (a no-op): give both models the same non-zero adapter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.language_model.named_parameters()):
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


def _open_gates(model: AnyGPTModel, value: float = 0.5) -> None:
    with torch.no_grad():
        for block in model.cross_attention.blocks.values():
            block.attn_gate.fill_(value)
            block.ff_gate.fill_(value)


def _batch(model: AnyGPTModel) -> tuple[torch.Tensor, torch.Tensor, dict[Modality, torch.Tensor]]:
    """Three right-padded rows: an image and an audio clip; two images; text only. Returns ids, mask, features."""
    bos, pad = model.tokenizer.bos_token_id, model.tokenizer.pad_token_id
    img = [model.tokens.placeholder[IMAGE]] * model.num_media_tokens(IMAGE)
    aud = [model.tokens.placeholder[AUDIO]] * model.num_media_tokens(AUDIO)
    rows = [[bos, 40, *img, 41, *aud, 42, 43, 44], [bos, 50, *img, 51, *img, 52], [bos, 60, 61, 62, 63]]
    length = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad] * (length - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows])
    gen = torch.Generator().manual_seed(0)
    dim = model.encoder.embed_dim
    features = {
        IMAGE: model.project_media(IMAGE, torch.randn(3, dim, generator=gen), None),
        AUDIO: model.project_media(AUDIO, torch.randn(1, dim, generator=gen), None),
    }
    return ids, mask, features


def _logits(model: AnyGPTModel, ids, mask, features) -> torch.Tensor:
    with torch.no_grad():
        embeds = model.embed_inputs(ids, features)
        return model.language_model(inputs_embeds=embeds, attention_mask=mask).logits


def _plain_logits(plain: AnyGPTModel, ids, mask, features, *, inline: bool) -> torch.Tensor:
    """The plain model's logits: media spliced (inline), or the placeholder tokens' own rows (not inline)."""
    if inline:
        return _logits(plain, ids, mask, features)
    with torch.no_grad():
        embeds = plain.language_model.get_input_embeddings()(ids)
        return plain.language_model(inputs_embeds=embeds, attention_mask=mask).logits


# ---------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("inline", [False, True], ids=["instead", "beside"])
@pytest.mark.parametrize("lora", [False, True], ids=["no-lora", "lora"])
@pytest.mark.parametrize("every", [1, 2])
def test_gates_at_zero_reproduce_the_plain_llm_exactly(specs, every, lora, inline):
    plain = AnyGPTModel.build(_config(lora=lora), specs)
    model = AnyGPTModel.build(_config(lora=lora, every=every, num_heads=4, inline=inline), specs)
    assert model.cross_attention.layer_indices == list(range(0, model.config.llm.num_layers, every))
    if lora:
        _perturb_lora(plain)
        _perturb_lora(model)
    ids, mask, features = _batch(model)
    expected = _plain_logits(plain, ids, mask, features, inline=inline)
    ran = []
    handles = [b.register_forward_hook(lambda *a: ran.append(1)) for b in model.cross_attention.blocks.values()]
    got = _logits(model, ids, mask, features)
    for handle in handles:
        handle.remove()
    assert len(ran) == len(model.cross_attention.blocks)  # the blocks ran, and changed nothing
    assert torch.equal(got, expected)


@pytest.mark.parametrize("inline", [False, True], ids=["instead", "beside"])
def test_open_gates_change_only_rows_with_media(specs, inline):
    plain = AnyGPTModel.build(_config(), specs)
    model = AnyGPTModel.build(_config(every=1, num_heads=4, inline=inline), specs)
    _open_gates(model)
    ids, mask, features = _batch(model)
    expected = _plain_logits(plain, ids, mask, features, inline=inline)
    got = _logits(model, ids, mask, features)
    assert torch.equal(got[2], expected[2])  # the text-only row
    for row in (0, 1):
        assert not torch.allclose(got[row], expected[row], atol=1e-3)
    # the media moved: so does the output of the rows that read them
    moved = {m: f + 1.0 for m, f in features.items()}
    assert not torch.allclose(_logits(model, ids, mask, moved)[0], got[0], atol=1e-3)


def test_gate_gradients_are_finite_and_open_the_gates(specs):
    model = AnyGPTModel.build(_config(every=1, num_heads=4), specs)
    model.cross_attention.requires_grad_(True)
    ids, mask, features = _batch(model)
    embeds = model.embed_inputs(ids, features)
    model.language_model(inputs_embeds=embeds, attention_mask=mask).logits.pow(2).mean().backward()
    for name, param in model.cross_attention.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name  # no NaN from the text-only row
    assert all(block.attn_gate.grad.abs().item() > 0 for block in model.cross_attention.blocks.values())


def test_context_follows_the_batch_and_a_mismatch_is_clear(specs):
    model = AnyGPTModel.build(_config(every=2, num_heads=4), specs)
    _open_gates(model)
    ids, mask, features = _batch(model)
    model.embed_inputs(ids, features)
    media, media_mask = model.cross_attention.context
    assert media.shape == (3, 2, model.hidden_size)  # row 0: image, audio; row 1: two images; row 2: nothing
    assert media_mask.tolist() == [[True, True], [True, True], [False, False]]
    assert torch.equal(media[0, 1], features[AUDIO][0, 0]) and torch.equal(media[1, 1], features[IMAGE][2, 0])
    with pytest.raises(ValueError, match="context holds 3 row"):
        model.language_model(input_ids=ids[:1])
    with torch.no_grad():  # the LLM on some rows only (one forward per LoRA adapter): narrow the context to them
        embeds = model.embed_inputs(ids, features)
        full = model.language_model(inputs_embeds=embeds, attention_mask=mask).logits
        with model.cross_attention.rows(torch.tensor([1, 2])):
            part = model.language_model(inputs_embeds=embeds[1:], attention_mask=mask[1:]).logits
    torch.testing.assert_close(part, full[1:])
    assert model.cross_attention.context[0].shape[0] == 3  # restored
    model.embed_inputs(ids[2:], {})  # a text-only batch: no context, the plain LLM
    assert model.cross_attention.context is None
    with pytest.raises(ValueError, match="placeholder token"):
        model.embed_inputs(ids, {IMAGE: features[IMAGE]})  # the audio item has no features


def test_media_context_layout():
    a, b = 7, 9  # two placeholder ids
    ids = torch.tensor([[1, b, 2, a, 3], [1, 2, 3, 4, 5], [a, 1, a, 2, 3]])
    feats_a = torch.arange(3 * 2 * 1, dtype=torch.float).reshape(3, 2, 1)  # three items, K = 2
    feats_b = torch.full((1, 2, 1), -1.0)
    context, mask = media_context(ids, {a: feats_a, b: feats_b}, inline=False)
    assert context.shape == (3, 4, 1)
    assert context[0, :, 0].tolist() == [-1, -1, 0, 1]  # in the row's order: b first, then a
    assert mask.tolist() == [[True] * 4, [False] * 4, [True] * 4]
    assert context[2, :, 0].tolist() == [2, 3, 4, 5]
    inline_ids = torch.tensor([[a, a, 1], [1, a, a]])
    context, mask = media_context(inline_ids, {a: torch.arange(4.0).reshape(2, 2, 1)}, inline=True)
    assert context[:, :, 0].tolist() == [[0, 1], [2, 3]] and mask.all()
    assert media_context(ids[1:2], {a: torch.zeros(0, 2, 1)}, inline=False) == (None, None)
    with pytest.raises(ValueError, match="appears 3 times in the input but 2 media items"):
        media_context(ids, {a: feats_a[:2], b: feats_b}, inline=False)


def test_not_inline_means_one_placeholder_per_item(specs):
    from anygpt.core.conversation import MediaRef

    model = AnyGPTModel.build(_config(every=2, num_heads=4), specs)
    assert model.num_media_tokens(IMAGE) == model.num_media_tokens(AUDIO) == 1
    ids, order = model.tokenize_pieces(["look ", MediaRef(IMAGE, "k1"), " and ", MediaRef(AUDIO, "k2")])
    assert ids.count(model.tokens.placeholder[IMAGE]) == ids.count(model.tokens.placeholder[AUDIO]) == 1
    assert [r.key for r in order] == ["k1", "k2"]


def test_parameter_count_at_real_size():
    hidden, layers = 4096, 32
    config = CrossAttentionConfig(every=4, num_heads=32)
    per_block = 12 * hidden * hidden + 4 * hidden + 2  # q, out: H^2; kv: 2 H^2; feed-forward: 8 H^2; 2 norms; 2 gates
    assert count_parameters(config, hidden_size=hidden, num_layers=layers) == 8 * per_block == 1_610_743_824
    with torch.device("meta"):
        blocks = GatedCrossAttentionLayers(config, hidden_size=hidden, num_layers=layers)
    assert blocks.layer_indices == [0, 4, 8, 12, 16, 20, 24, 28]


# ---------------------------------------------------------------------------------------------- config
def test_config_errors_and_round_trip(specs):
    for bad, message in [
        ({"every": 0}, "cross_attention.every must be a positive integer"),
        ({"num_heads": "four"}, "cross_attention.num_heads"),
        ({"inline": "yes"}, "cross_attention.inline"),
        ({"evry": 2}, r"unknown keys \['evry'\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            CrossAttentionConfig.from_dict(bad)
    data = _config(every=2, num_heads=4, inline=True).to_dict()
    assert data["cross_attention"] == {"every": 2, "num_heads": 4, "ff_mult": 4, "inline": True}
    assert AnyGPTConfig.from_dict(data).cross_attention == CrossAttentionConfig(every=2, num_heads=4, inline=True)
    assert "cross_attention" not in _config().to_dict()  # indexes of models without it are as before
    data["cross_attention"] = {"every": 2, "heads": 4}
    with pytest.raises(ValueError, match="unknown keys"):
        AnyGPTConfig.from_dict(data)
    with pytest.raises(ValueError, match="num_heads 5 does not divide the LLM's hidden size 64"):
        AnyGPTModel.build(_config(every=1, num_heads=5), specs)


# ---------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    from toyworld.sample_configs import write_sample

    return write_sample(tmp_path_factory.mktemp("sample") / "data", size=8)


def _trainer(sample: Path, stage: int, out: Path, **sets) -> StageTrainer:
    sets.setdefault("cache_dir", "null")
    config = load_config(sample / f"stage{stage}.yaml", overrides=[f"{k}={v}" for k, v in sets.items()])
    return StageTrainer(config, output_dir=out)


def test_stage1_trains_blocks_projectors_and_token_rows_only(sample, tmp_path):
    trainer = _trainer(sample, 1, tmp_path / "out", **{"cross_attention.every": 1, "cross_attention.num_heads": 4})
    trainer.setup()
    model = trainer.model
    names = {n for n, _ in trainer.params}
    expected = {f"model.input_projectors.{k}" for k in model.input_projectors.state_dict()}
    expected |= {f"model.cross_attention.{k}" for k in model.cross_attention.state_dict()}
    expected |= {"token_rows.input_rows", "token_rows.output_rows"}
    assert names == expected
    hidden, embed = model.hidden_size, model.encoder.embed_dim
    blocks = model.config.llm.num_layers * (12 * hidden * hidden + 4 * hidden + 2)
    projectors = len(model.input_projectors) * (embed * hidden + hidden)
    rows = 2 * len(model.tokens.all_added_ids) * hidden
    assert sum(p.numel() for _, p in trainer.params) == blocks + projectors + rows
    assert not any(p.requires_grad for p in model.language_model.parameters())


def test_stage_config_errors(sample, tmp_path):
    with pytest.raises(ConfigError, match="cross_attention: cross_attention.every must be a positive integer"):
        _trainer(sample, 1, tmp_path / "a", **{"cross_attention.every": 0})
    with pytest.raises(ConfigError, match=r"cross_attention: unknown keys \['heads'\]"):
        _trainer(sample, 1, tmp_path / "a", **{"cross_attention.heads": 4})
    with pytest.raises(ConfigError, match="stage 2 does not train them"):
        _trainer(sample, 2, tmp_path / "b", **{"cross_attention.every": 2}).load_pipeline()
    with pytest.raises(ConfigError, match="has no gated cross-attention blocks"):
        _trainer(sample, 1, tmp_path / "c", **{"trainable.cross_attention": "true"}).load_pipeline()
    sets = {"cross_attention.every": 2, "trainable.cross_attention": "false"}
    with pytest.raises(ConfigError, match="stage 1 does not train them"):
        _trainer(sample, 1, tmp_path / "d", **sets).load_pipeline()


@pytest.fixture(scope="module")
def trained(sample, tmp_path_factory) -> Path:
    """A short stage-1 run with blocks before every layer ("instead of" the spliced tokens)."""
    out = tmp_path_factory.mktemp("stage1") / "out"
    sets = {"cross_attention.every": 1, "cross_attention.num_heads": 4, "train.save_every": 0, "train.max_steps": 12}
    return _trainer(sample, 1, out, **sets).train()


def test_stage1_run_loss_falls_and_gates_open(trained):
    from anygpt.core.pipeline import AnyGPTPipeline

    rows = [json.loads(line) for line in (trained.parent / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 12
    first = sum(r["loss"] for r in rows[:3]) / 3
    last = sum(r["loss"] for r in rows[-3:]) / 3
    assert last < first, (first, last)
    index = json.loads((trained / "anygpt_index.json").read_text())
    assert index["config"]["cross_attention"]["every"] == 1
    assert index["parts"]["cross_attention"] == "cross_attention.safetensors"
    gates = AnyGPTPipeline.from_pretrained(trained).model.cross_attention.gates
    assert gates.shape == (2, 2) and (gates.abs() > 0).all()


def test_save_load_round_trip_reproduces_logits(trained, tmp_path, specs):
    from anygpt.core.index import read_index
    from anygpt.core.pipeline import AnyGPTPipeline

    pipe = AnyGPTPipeline.from_pretrained(trained)
    with torch.no_grad():  # gates well open, so the blocks weigh in the comparison
        for block in pipe.model.cross_attention.blocks.values():
            block.attn_gate.add_(0.3)
    pipe.save_pretrained(tmp_path / "saved")
    loaded = AnyGPTPipeline.from_pretrained(tmp_path / "saved")
    ids, mask, features = _batch(pipe.model)
    assert torch.equal(_logits(loaded.model, ids, mask, features), _logits(pipe.model, ids, mask, features))
    # an index that declares the blocks but holds none is refused
    index_path = tmp_path / "saved" / "anygpt_index.json"
    index = json.loads(index_path.read_text())
    del index["parts"]["cross_attention"]
    index_path.write_text(json.dumps(index))
    config, parts = read_index(tmp_path / "saved")
    with pytest.raises(ValueError, match="holds no cross-attention blocks"):
        AnyGPTModel.build(config, specs).load_trained(tmp_path / "saved", parts)


def test_pipeline_replies_with_one_placeholder_per_image(trained, media_files):
    from anygpt import Conversation
    from anygpt.core.pipeline import AnyGPTPipeline

    pipe = AnyGPTPipeline.from_pretrained(trained)
    conversation = Conversation()
    out = pipe(
        "describe this",
        images=[media_files["image"]],
        modalities=[],
        conversation=conversation,
        seed=0,
        max_new_tokens=6,
        show_progress=False,
    )
    assert isinstance(out.text, str) and 0 < len(out.token_ids) <= 6
    assert pipe.model.cross_attention.context is None  # the call's media features are released when it ends
    input_ids, embeds = pipe.build_inputs(conversation)
    assert int((input_ids == pipe.model.tokens.placeholder[IMAGE]).sum()) == 1
    media, mask = pipe.model.cross_attention.context
    assert media.shape == (1, 1, pipe.model.hidden_size) and mask.all()
    # generation steps with the key/value cache read the prompt's media as a full forward pass does
    generated, cache = pipe.generate_tokens(embeds, forced={IMAGE}, max_new_tokens=4, temperature=0.0, top_p=1.0)
    with_cache = pipe.signal_conditioning(input_ids, embeds, generated, cache)
    full = pipe.signal_conditioning(input_ids, embeds, generated)
    torch.testing.assert_close(with_cache[IMAGE], full[IMAGE], rtol=1e-4, atol=1e-5)
