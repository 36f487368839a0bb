"""BLIP-2's Q-Former connectors (``projectors.qformer``) and Q-Former pretraining (``--stage 0``), BLIP-2's
representation learning (``training.blip2``): shapes, the shared Q-Former against transformers' own, the attention
masks, the hardest in-batch negatives, losses that fall, and a Q-Former pretraining run that stage 1 continues from."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import Blip2QFormerModel

from projectors import (
    QFormerInputProjector,
    QFormerOutputProjector,
    build_input_projector,
    build_output_projector,
    get_input_projector_class,
    get_output_projector_class,
)
from training.blip2 import BLIP2_LOSSES, Blip2Objectives
from training.config import ConfigError, load_config
from training.trainer import StageTrainer

REPO = Path(__file__).resolve().parents[1]
PRETRAINING_CONFIG = REPO / "training" / "configs" / "tiny-qformer-pretraining.yaml"
TINY = QFormerInputProjector.presets["tiny"]
GRID = [1, 4, 4]  # one CLS token + a 4 x 4 patch grid: N = 17


def _projector(**options) -> QFormerInputProjector:
    return build_input_projector("qformer", in_dim=24, token_dim=20, out_dim=48, grid=GRID, **{**TINY, **options})


def _objectives(seed: int = 0, **options) -> Blip2Objectives:
    torch.manual_seed(seed)
    return Blip2Objectives(_projector(**options), vocab_size=60, pad_token_id=3, max_text_length=12)


def _captions(lengths, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 60, (n,), generator=generator) for n in lengths]


# ---------------------------------------------------------------------------------------------- the connectors
@pytest.mark.parametrize("spatial_pool", [1, 2])
@pytest.mark.parametrize("num_tokens", [17, 37, 65])  # the built grid, then square 6 x 6 and 8 x 8 (+ CLS)
def test_input_projector_shape_for_varying_lengths(num_tokens, spatial_pool):
    proj = _projector(spatial_pool=spatial_pool).eval()
    assert proj.num_output_tokens == TINY["num_queries"] and proj.uses_tokens and proj.uses_grid
    tokens = torch.randn(3, num_tokens, 20)
    out = proj(torch.randn(3, 24), tokens)
    assert out.shape == (3, TINY["num_queries"], 48) and torch.isfinite(out).all()
    side = round((num_tokens - 1) ** 0.5)
    pooled = -(-side // spatial_pool)  # ceil: an odd edge is pooled over what is there
    assert proj.media_tokens(tokens).shape == (3, 1 + pooled * pooled, 20)


def test_input_projector_is_transformers_qformer_with_cross_attention_every_second_layer():
    proj = _projector(num_layers=4)
    assert isinstance(proj.qformer, Blip2QFormerModel)
    layers = proj.qformer.encoder.layer
    assert [layer.has_cross_attention for layer in layers] == [True, False, True, False]
    assert layers[0].crossattention.attention.key.in_features == 20  # keys and values read the encoder's tokens
    assert proj.query_tokens.shape == (1, TINY["num_queries"], TINY["hidden_size"])
    assert proj.proj.out_features == 48
    assert not hasattr(layers[0], "intermediate")  # the query side only: no text feed-forward in the connector


def test_input_projector_errors():
    with pytest.raises(ValueError, match="qformer projector needs the encoder's token sequence"):
        _projector()(torch.randn(2, 24), None)
    with pytest.raises(ValueError, match="hidden_size 30 is not divisible by num_heads 4"):
        _projector(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="num_queries must be >= 1"):
        _projector(num_queries=0)


def test_input_projector_round_trip(tmp_path):
    proj = _projector(spatial_pool=2).eval()
    proj.save_pretrained(tmp_path)
    loaded = get_input_projector_class("qformer").from_pretrained(tmp_path).eval()
    x, t = torch.randn(2, 24), torch.randn(2, 17, 20)
    assert torch.equal(proj(x, t), loaded(x, t))
    assert loaded.config.grid == GRID and loaded.config.spatial_pool == 2


@pytest.mark.parametrize(("num_queries", "num_signal", "dim"), [(77, 4, 768), (1, 8, 512)])  # image-like, pooled
def test_output_projector_shapes(num_queries, num_signal, dim):
    proj = build_output_projector(
        "qformer",
        in_dim=32,
        out_dim=dim,
        num_queries=num_queries,
        num_signal_tokens=num_signal,
        **QFormerOutputProjector.presets["tiny"],
    )
    assert isinstance(proj.qformer, Blip2QFormerModel)
    assert all(layer.has_cross_attention for layer in proj.qformer.encoder.layer)  # NExT-GPT: in every layer
    out = proj(torch.randn(2, num_signal, 32), torch.randn(2, num_signal, 32))
    assert out.shape == (2, num_queries, dim) and torch.isfinite(out).all()


def test_output_projector_gradients_and_round_trip(tmp_path):
    proj = build_output_projector(
        "qformer", in_dim=32, out_dim=16, num_queries=5, num_signal_tokens=4, **QFormerOutputProjector.presets["tiny"]
    )
    h, e = torch.randn(2, 4, 32, requires_grad=True), torch.randn(2, 4, 32)
    proj(h, e).pow(2).sum().backward()
    assert h.grad is not None and h.grad.abs().sum() > 0
    assert all(p.grad is not None for p in proj.parameters())
    proj.save_pretrained(tmp_path)
    loaded = get_output_projector_class("qformer").from_pretrained(tmp_path)
    assert torch.equal(proj.eval()(h, e), loaded.eval()(h, e))


def test_real_size_parameter_counts():
    with torch.device("meta"):
        inp = build_input_projector("qformer", in_dim=1024, token_dim=1280, out_dim=4096)
        out = build_output_projector("qformer", in_dim=4096, out_dim=768, num_queries=77, num_signal_tokens=4)
    count = sum(p.numel() for p in inp.parameters())
    # 12 BERT-base layers with query feed-forward, 6 cross-attention blocks over 1280-d tokens, 32 x 768 queries,
    # Linear(768 -> 4096)
    assert count == 107_132_416
    assert inp.num_output_tokens == 32
    assert sum(p.numel() for p in out.parameters()) == 22_701_312  # Linear(4096 -> 768), 2 layers, Linear(768 -> 768)


# ---------------------------------------------------------------------------------------------- the objectives
def test_shared_qformer_equals_transformers_qformer_with_text_input():
    """The objectives run the projector's own layers; with the text feed-forward added they compute exactly what
    ``Blip2QFormerModel`` built with ``use_qformer_text_input`` computes (query-only, joint and text-only passes)."""
    obj = _objectives().eval()
    proj = obj.projector
    config = copy.deepcopy(proj.qformer.config)
    config.use_qformer_text_input = True
    reference = Blip2QFormerModel(config).eval()
    state = proj.qformer.state_dict()
    for i, ffn in enumerate(obj.text_ffn):
        state.update({f"encoder.layer.{i}.{k}": v for k, v in ffn.state_dict().items()})
    reference.load_state_dict(state, strict=True)
    tokens = torch.randn(3, 17, 20)
    ids, mask = obj.text_inputs(_captions([5, 9, 3]), obj.cls_token_id)
    queries = proj.query_tokens.expand(3, -1, -1)
    nq = queries.shape[1]
    with torch.no_grad():
        torch.testing.assert_close(obj.encode(ids[:, :0], mask[:, :0], tokens), proj.query_features(tokens))
        joint = obj.encode(ids, mask, tokens)
        full = torch.cat([torch.ones(3, nq, dtype=torch.long), mask], dim=1)
        expected = reference(
            query_embeds=obj.embeddings(input_ids=ids, query_embeds=queries),
            query_length=nq,
            attention_mask=full,
            encoder_hidden_states=tokens,
        ).last_hidden_state
        torch.testing.assert_close(joint[full.bool()], expected[full.bool()])
        text = obj.encode(ids, mask)
        expected = reference(
            query_embeds=obj.embeddings(input_ids=ids), query_length=0, attention_mask=mask
        ).last_hidden_state
        torch.testing.assert_close(text[mask.bool()], expected[mask.bool()])


def test_itg_mask_text_is_causal_and_queries_see_only_queries():
    obj = _objectives().eval()
    nq = obj.projector.config.num_queries
    tokens = torch.randn(2, 17, 20)
    ids, mask = obj.text_inputs(_captions([8, 8]), obj.dec_token_id)
    changed = ids.clone()
    changed[:, 5] = (changed[:, 5] + 1 - 4) % 56 + 4
    with torch.no_grad():
        a = obj.encode(ids, mask, tokens, causal=True)
        b = obj.encode(changed, mask, tokens, causal=True)
        c = obj.encode(ids, mask, tokens + 1.0, causal=True)
    torch.testing.assert_close(a[:, :nq], b[:, :nq])  # queries do not see the text
    torch.testing.assert_close(a[:, nq : nq + 5], b[:, nq : nq + 5])  # text sees only earlier text
    assert not torch.allclose(a[:, nq + 5 :], b[:, nq + 5 :])
    assert not torch.allclose(a[:, nq:], c[:, nq:])  # text sees the queries (which read the media)
    mask = Blip2Objectives.attention_mask(torch.tensor([[1, 1, 0]]), 2, True, torch.float32)[0, 0] == 0
    assert mask.tolist() == [
        [True, True, False, False, False],
        [True, True, False, False, False],
        [True, True, True, False, False],
        [True, True, True, True, False],
        [True, True, True, True, False],  # a padding row still sees the queries and the real text
    ]


def test_itm_hard_negatives_are_the_hardest_in_batch():
    obj = _objectives().eval()
    tokens = torch.randn(6, 17, 20)
    captions = _captions([4, 5, 6, 7, 8, 9])  # all different
    ids, mask = obj.text_inputs(captions, obj.cls_token_id)
    with torch.no_grad():
        sim = obj.similarity(obj.media_features(tokens), obj.text_features(ids, mask))
    text_for_media, media_for_text = obj.hard_negatives(sim, torch.eye(6, dtype=torch.bool))
    for i in range(6):  # an explicit argmax over the similarity matrix, the diagonal excluded
        assert text_for_media[i] == max((j for j in range(6) if j != i), key=lambda j: sim[i, j].item())
        assert media_for_text[i] == max((j for j in range(6) if j != i), key=lambda j: sim[j, i].item())

    # the ITM pass really pairs each media item with those texts and each text with those media items
    seen = []
    encode = obj.encode

    def spy(text_ids, text_mask, media=None, *, causal=False):
        seen.append((text_ids, media))
        return encode(text_ids, text_mask, media, causal=causal)

    obj.encode = spy
    with torch.no_grad():
        obj(tokens, captions, terms=("itc", "itm"))
    itm_ids, itm_media = seen[-1]
    media = obj.projector.media_tokens(tokens)
    assert torch.equal(itm_ids[:6], ids) and torch.equal(itm_media[:6], media)  # the true pairs
    assert torch.equal(itm_ids[6:12], ids[text_for_media]) and torch.equal(itm_media[6:12], media)
    assert torch.equal(itm_ids[12:], ids) and torch.equal(itm_media[12:], media[media_for_text])

    # equal captions are matches, never negatives; a row that only has matches has no negative (-1)
    same = torch.eye(6, dtype=torch.bool)
    same[0, 1] = same[1, 0] = True
    text_for_media, _ = obj.hard_negatives(sim, same)
    assert text_for_media[0] not in (0, 1) and text_for_media[1] not in (0, 1)
    text_for_media, media_for_text = obj.hard_negatives(sim, torch.ones(6, 6, dtype=torch.bool))
    assert (text_for_media == -1).all() and (media_for_text == -1).all()


def test_captions_are_cut_and_led_by_cls_or_dec():
    obj = _objectives()
    ids, mask = obj.text_inputs(_captions([3, 20]), obj.cls_token_id)
    assert ids.shape == mask.shape == (2, 12)  # max_text_length, CLS included
    assert (ids[:, 0] == obj.cls_token_id).all() and mask[0].tolist() == [1] * 4 + [0] * 8
    assert (ids[0, 4:] == 3).all()  # padding id
    sums = obj(torch.randn(2, 17, 20), _captions([3, 20]))
    assert set(sums) == set(BLIP2_LOSSES) and all(torch.isfinite(v) for v in sums.values())
    with pytest.raises(ValueError, match="unknown BLIP-2 loss terms"):
        obj(torch.randn(2, 17, 20), _captions([3, 20]), terms=("itc", "mlm"))


@pytest.fixture(scope="module")
def sample_features(tmp_path_factory):
    """The sample dataset's image-caption pairs as tiny-encoder token sequences and LLM caption ids."""
    from anygpt import AnyGPTPipeline
    from toyworld.sample import write_sample_dataset
    from training.cache import MediaFeatureCache
    from training.data.readers import read_dataset
    from training.data.records import DatasetSpec

    root = tmp_path_factory.mktemp("pairs")
    entry = write_sample_dataset(root, seed=0, size=8)[1][0]
    spec = DatasetSpec(
        path=root / entry["path"], format=entry["format"], name=entry["name"], media_root=root / entry["media_root"]
    )
    pairs = read_dataset(spec)
    model = AnyGPTPipeline.from_pretrained("tiny").model
    features = MediaFeatureCache(None, model.encoder).get([p.media for p in pairs], need_tokens=True)
    tokens = torch.stack([f[1] for f in features]).float()  # (8, 257, 32)
    tokenizer = model.tokenizer
    captions = [torch.tensor(tokenizer(p.caption, add_special_tokens=False).input_ids) for p in pairs]
    grid = list(model.encoder.token_grid(pairs[0].media.modality))
    return tokens, captions, len(tokenizer), tokenizer.pad_token_id, grid


def _train(sample_features, weights: dict[str, float], lr: float = 3e-3, steps: int = 30) -> list[dict[str, float]]:
    tokens, captions, vocab, pad, grid = sample_features
    torch.manual_seed(0)
    proj = build_input_projector("qformer", in_dim=32, token_dim=32, out_dim=64, grid=grid, spatial_pool=2, **TINY)
    obj = Blip2Objectives(proj, vocab_size=vocab, pad_token_id=pad)
    optimizer = torch.optim.AdamW(obj.parameters(), lr=lr)
    history = []
    for _ in range(steps):
        sums = obj(tokens, captions, terms=tuple(weights))
        loss = sum(weights[k] * v for k, v in sums.items()) / len(captions)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append({k: v.item() / len(captions) for k, v in sums.items()})
    return history


def _falls(history: list[dict[str, float]], key: str, by: float) -> None:
    values = [h[key] for h in history]
    assert all(np.isfinite(values)), (key, values)
    first, last = values[0], np.mean(values[-3:])
    assert last < first - by, (key, first, last)


# ITM: from about ln 2 to below 0.6365, the loss of always answering "no match" (1 true pair : 2 negatives)
@pytest.mark.parametrize(("term", "lr", "by"), [("itc", 3e-3, 0.3), ("itm", 1e-2, 0.06), ("itg", 3e-3, 1.0)])
def test_each_loss_falls_on_the_sample_data(sample_features, term, lr, by):
    _falls(_train(sample_features, {term: 1.0}, lr=lr), term, by)


def test_the_three_losses_train_together(sample_features):
    history = _train(sample_features, dict.fromkeys(BLIP2_LOSSES, 1.0))
    for h in history:
        h["total"] = sum(h[k] for k in BLIP2_LOSSES)
    _falls(history, "total", 1.0)
    _falls(history, "itm", 0.02)
    _falls(history, "itg", 1.0)
    # ITC barely moves in 30 joint steps from random initialisation (BLIP-2 starts from BERT): finite is asserted
    assert all(np.isfinite(h["itc"]) for h in history)


# ------------------------------------------------------------------------------------ Q-Former pretraining runs
@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    from toyworld.sample_configs import write_sample

    return write_sample(tmp_path_factory.mktemp("sample") / "data", size=8)


@pytest.fixture(scope="module")
def pretraining_run(sample, tmp_path_factory) -> Path:
    """``anygpt train --stage 0`` (Q-Former pretraining) on the sample data: 3 steps, checkpoints at 2 and 3 (one
    thread: exact resume)."""
    from anygpt.cli import main

    out = tmp_path_factory.mktemp("qformer-pretraining") / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        args = ["train", "--stage", "0", "--config", str(PRETRAINING_CONFIG), "--output-dir", str(out)]
        args += ["--max-steps", "3"]
        for setting in (f"data_root={sample}", "cache_dir=null", "train.save_every=2"):
            args += ["--set", setting]
        assert main(args) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_pretraining_run_writes_checkpoints_with_heads_and_a_normal_final(pretraining_run):
    from anygpt.core.pipeline import AnyGPTPipeline

    rows = _metrics(pretraining_run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert {"loss", "loss_itc", "loss_itm", "loss_itg", "pairs"} <= set(r) and "loss_ce" not in r
        assert r["pairs"] == 4 and np.isfinite(r["loss"])
    assert sorted(p.name for p in pretraining_run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    trained = load_file(pretraining_run / "checkpoint-2" / "trainable.safetensors")
    assert any(k.startswith("objectives.image.itm_head.") for k in trained)  # the heads resume too
    assert any(k.startswith("model.input_projectors.image.qformer.") for k in trained)
    assert not any(k.startswith("objectives.image.projector.") for k in trained)  # shared: saved once
    assert not any(k.startswith(("model.language_model.", "model.output_projectors.")) for k in trained)

    final = pretraining_run / "final"
    pipe = AnyGPTPipeline.from_pretrained(final)
    assert pipe.model.config.input_projector.name == "qformer"
    for name, projector in pipe.model.input_projectors.items():
        assert isinstance(projector, QFormerInputProjector)
        saved = load_file(next((final / "input_projectors" / name).glob("*.safetensors")))
        assert set(saved) == set(projector.state_dict())  # the connector only: no BLIP-2 heads in final/
    assert not list(final.rglob("*objectives*"))


def test_pretraining_resume_equals_the_straight_run(sample, pretraining_run, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = load_config(PRETRAINING_CONFIG, overrides=[f"data_root={sample}", "cache_dir=null"])
        resume = str(pretraining_run / "checkpoint-2")
        StageTrainer(config, output_dir=tmp_path / "resumed", max_steps=3, resume=resume).train()
    finally:
        torch.set_num_threads(threads)
    a, b = _metrics(pretraining_run)[-1], _metrics(tmp_path / "resumed")[-1]
    assert {k: v for k, v in a.items() if k != "samples_per_s"} == {k: v for k, v in b.items() if k != "samples_per_s"}
    x = load_file(pretraining_run / "checkpoint-3" / "trainable.safetensors")
    y = load_file(tmp_path / "resumed" / "checkpoint-3" / "trainable.safetensors")
    assert set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x)


def test_stage1_starts_from_pretraining_final_with_its_qformer(sample, pretraining_run, tmp_path):
    final = pretraining_run / "final"
    options = json.dumps(TINY)
    sets = ["cache_dir=null", "input_projector.name=qformer", f"input_projector.options={options}"]
    trainer = StageTrainer(load_config(sample / "stage1.yaml", overrides=sets), start=str(final), output_dir=tmp_path)
    trainer.setup()
    for name, projector in trainer.model.input_projectors.items():
        saved = load_file(next((final / "input_projectors" / name).glob("*.safetensors")))
        state = projector.state_dict()
        assert all(torch.equal(state[k], saved[k]) for k in saved), name  # the pre-trained Q-Former, not a fresh one
    names = {n for n, _ in trainer.params}
    assert any(n.startswith("model.input_projectors.image.qformer.") for n in names)
    assert not any(n.startswith("objectives.") for n in names)
    metrics = trainer._step(0)  # stage 1's own loss through the LLM
    assert np.isfinite(metrics["loss_ce"])


def test_pretraining_refuses_a_connector_that_is_not_a_qformer(sample, tmp_path):
    config = load_config(sample / "stage1.yaml", overrides=["stage=0", "cache_dir=null"])  # the preset's linear
    with pytest.raises(ConfigError, match=r"stage1\.yaml: input_projector: .*'linear'.*--set input_projector=qformer"):
        StageTrainer(config, output_dir=tmp_path / "a").setup()


def test_pretraining_refuses_records_without_exactly_one_media_input(sample, tmp_path):
    options = json.dumps(TINY)
    sets = ["stage=0", "cache_dir=null", "input_projector.name=qformer", f"input_projector.options={options}"]
    config = load_config(sample / "stage3.yaml", overrides=sets)
    with pytest.raises(ConfigError, match=r"needs exactly one media input per example"):
        StageTrainer(config, output_dir=tmp_path / "b").setup()


@pytest.mark.parametrize(
    ("sets", "match"),
    [
        ({"loss.blip2.itc": -1}, r"loss\.blip2\.itc: must be >= 0"),
        ({"loss.blip2.itc": 0, "loss.blip2.itm": 0, "loss.blip2.itg": 0}, r"loss\.blip2: itc, itm and itg are all 0"),
        ({"loss.blip2.max_text_length": 1}, r"loss\.blip2\.max_text_length: must be >= 2"),
    ],
)
def test_blip2_loss_config_is_validated(sample, sets, match):
    with pytest.raises(ConfigError, match=match):
        load_config(PRETRAINING_CONFIG, overrides=[f"data_root={sample}", *[f"{k}={v}" for k, v in sets.items()]])


def test_pretraining_config_and_objective(sample):
    from training.objectives import QFormerPretraining, objective_for

    config = load_config(PRETRAINING_CONFIG, overrides=[f"data_root={sample}"])
    assert config.stage == 0 and config.input_projector.name == "qformer"
    assert config.input_projector.options == TINY
    objective = objective_for(config)
    assert isinstance(objective, QFormerPretraining) and objective.pair_task == "caption"
    trains = objective.trainable
    assert trains.input_projectors and trains.token_rows == "none"
    assert not (trains.output_projectors or trains.lora or trains.cross_attention)
    assert objective.terms(None) == ["itc", "itm", "itg"] and objective.unit == "pairs"
