"""Per-modality LoRA adapters: switching, combining, saving, training one adapter per output modality, pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from anygpt.core.llm import LoraSettings
from anygpt.core.lora import checkpoint_context_fn, keep_requires_grad, lora_parameters

ADAPTERS = ["text", "image", "video", "audio"]
LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "adapters": ADAPTERS}
PROMPT_IDS = torch.tensor([[1, 50, 60, 70, 80, 90, 100]])


def _multi_pipe():
    """The tiny pipeline with four adapters whose B matrices are random (as if trained): each one changes outputs."""
    from anygpt.core.config import config_from_preset
    from anygpt.core.pipeline import AnyGPTPipeline

    config = config_from_preset("tiny")
    config.llm.lora = LoraSettings(**LORA)
    pipe = AnyGPTPipeline.from_config(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in pipe.model.language_model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.5 * torch.randn(param.shape, generator=generator))
    return pipe


@pytest.fixture(scope="module")
def multi():
    return _multi_pipe()


@torch.no_grad()
def _logits(model) -> torch.Tensor:
    return model.language_model(input_ids=PROMPT_IDS).logits


# ---------------------------------------------------------------------------------------------- settings
@pytest.mark.parametrize(
    ("adapters", "match"),
    [
        ([], "non-empty list"),
        ("image", "non-empty list"),
        (["text", "picture"], "unknown modality 'picture'"),
        (["image", "image"], "unique"),
    ],
)
def test_bad_adapter_names_in_the_settings(adapters, match):
    with pytest.raises(ValueError, match=match):
        LoraSettings(adapters=adapters)


def test_adapter_names_are_modality_names():
    assert LoraSettings(adapters=["Text", " image"]).adapters == ["text", "image"]
    assert LoraSettings().adapters is None


def test_build_makes_every_adapter_deterministically(multi):
    model = multi.model
    assert model.lora_adapters == ADAPTERS
    assert model.active_lora_adapters[0] in ADAPTERS
    assert not any(p.requires_grad for p in model.parameters())  # built frozen
    llm = model.language_model
    names = [n for n, _ in llm.named_parameters() if "lora_A" in n]
    assert len(names) == len(ADAPTERS) * 4 * model.config.llm.num_layers
    again = _multi_pipe().model.language_model
    assert all(torch.equal(llm.get_parameter(n), again.get_parameter(n)) for n in names)
    text, image = lora_parameters(llm, "text"), lora_parameters(llm, "image")
    first = next(n for n in text if "lora_A" in n)
    assert not torch.equal(text[first], image[first.replace(".text.", ".image.")])  # each adapter its own A


# ---------------------------------------------------------------------------------------------- switching
def test_switching_adapters_changes_outputs_and_switching_back_restores_them_exactly(multi):
    model = multi.model
    outputs = {}
    for name in ADAPTERS:
        model.set_lora_adapters(name)
        assert model.active_lora_adapters == [name]
        outputs[name] = _logits(model)
    for i, a in enumerate(ADAPTERS):
        for b in ADAPTERS[i + 1 :]:
            assert not torch.allclose(outputs[a], outputs[b]), (a, b)
    for name in reversed(ADAPTERS):  # back again, after combinations too
        model.set_lora_adapters(["text", "image"])
        model.set_lora_adapters(name)
        assert torch.equal(_logits(model), outputs[name])


def test_switching_keeps_requires_grad_as_it_was(multi):
    model = multi.model
    llm = model.language_model
    model.set_lora_adapters("image")
    model.set_lora_adapters(["video", "audio"], [0.3, 0.7])
    assert not any(p.requires_grad for p in model.parameters())  # a frozen model stays frozen
    lora = [p for n, p in llm.named_parameters() if "lora_" in n and ".combined_" not in n]
    try:
        for param in lora:
            param.requires_grad_(True)
        for name in ADAPTERS:
            model.set_lora_adapters(name)  # peft alone would turn the other adapters' gradients off
        assert all(p.requires_grad for p in lora)
        assert not any(p.requires_grad for n, p in llm.named_parameters() if "lora_" not in n)
    finally:
        for param in lora:
            param.requires_grad_(False)


def test_combination_is_the_weighted_sum_of_the_adapters_updates(multi):
    model = multi.model
    llm = model.language_model
    weights = [0.25, 0.75]
    model.set_lora_adapters(["text", "image"], weights)
    (combined,) = model.active_lora_adapters
    assert combined.startswith("combined_")
    # peft's "cat" combination: delta_W = sum_i w_i * delta_W_i, exactly (up to float rounding), in every layer
    q_proj = llm.base_model.model.model.layers[0].self_attn.q_proj
    expected = weights[0] * q_proj.get_delta_weight("text") + weights[1] * q_proj.get_delta_weight("image")
    torch.testing.assert_close(q_proj.get_delta_weight(combined), expected)
    mixed = _logits(model)
    count = len(llm.peft_config)
    model.set_lora_adapters("image")
    model.set_lora_adapters(["text", "image"], weights)  # built once, then reused: the same outputs exactly
    assert model.active_lora_adapters == [combined] and len(llm.peft_config) == count
    assert torch.equal(_logits(model), mixed)

    # weights 1 and 1 equal peft's several active adapters (whose outputs add up)
    model.set_lora_adapters(["text", "image"], [1.0, 1.0])
    summed = _logits(model)
    with keep_requires_grad(llm):
        llm.base_model.set_adapter(["text", "image"])
    torch.testing.assert_close(summed, _logits(model), rtol=1e-5, atol=1e-5)
    # a weight of 0 leaves the other adapter alone
    model.set_lora_adapters(["text", "image"], [1.0, 0.0])
    text_only = _logits(model)
    model.set_lora_adapters("text")
    torch.testing.assert_close(text_only, _logits(model), rtol=1e-5, atol=1e-5)

    # the mean (weights None) differs from each single adapter
    model.set_lora_adapters(["text", "image"])
    mean = _logits(model)
    assert model.active_lora_adapters[0].startswith("combined_")
    for name in ("text", "image"):
        model.set_lora_adapters(name)
        assert not torch.allclose(mean, _logits(model))


def test_combinations_kept_are_bounded(multi):
    from anygpt.core.lora import MAX_COMBINED

    model = multi.model
    for k in range(MAX_COMBINED + 3):
        model.set_lora_adapters(["video", "audio"], [1.0, 0.1 * (k + 1)])
    combined = [n for n in model.language_model.peft_config if n.startswith("combined_")]
    assert len(combined) == MAX_COMBINED
    assert model.active_lora_adapters[0] in combined


@pytest.mark.parametrize(
    ("names", "weights", "match"),
    [
        ("picture", None, "unknown LoRA adapter 'picture': this model has text, image, video, audio"),
        ("default", None, "unknown LoRA adapter 'default'"),
        ([], None, "at least one"),
        (["image", "image"], None, "named twice"),
        (["image", "text"], [1.0], "1 weights for 2"),
        (["image", "text"], [1.0, -1.0], "finite and >= 0"),
        (["image", "text"], [0.0, 0.0], "not all 0"),
        (["image"], [float("nan")], "finite"),
    ],
)
def test_bad_adapter_choices_are_refused(multi, names, weights, match):
    before = multi.model.active_lora_adapters
    with pytest.raises(ValueError, match=match):
        multi.model.set_lora_adapters(names, weights)
    assert multi.model.active_lora_adapters == before


def test_single_adapter_model_has_one_default_adapter(tiny_pipe):
    model = tiny_pipe.model
    assert model.lora_adapters == ["default"]
    before = _logits(model)
    model.set_lora_adapters("default")
    assert torch.equal(_logits(model), before)
    with pytest.raises(ValueError, match="unknown LoRA adapter 'image': this model has default"):
        model.set_lora_adapters("image")


# ---------------------------------------------------------------------------------------------- files
def test_save_load_reproduces_every_adapter(multi, tmp_path):
    from anygpt.core.pipeline import AnyGPTPipeline

    model = multi.model
    folder = tmp_path / "multi"
    model.set_lora_adapters(["text", "audio"])  # a combination is not saved
    multi.save_pretrained(folder)
    index = json.loads((folder / "anygpt_index.json").read_text())
    assert index["parts"]["lora"] == {name: f"lora/{name}" for name in ADAPTERS}
    assert index["config"]["llm"]["lora"]["adapters"] == ADAPTERS
    for name in ADAPTERS:
        assert (folder / "lora" / name / "adapter_model.safetensors").is_file()
        assert json.loads((folder / "lora" / name / "adapter_config.json").read_text())["r"] == LORA["r"]
    assert not (folder / "lora" / "adapter_model.safetensors").exists()

    loaded = AnyGPTPipeline.from_pretrained(folder).model
    assert loaded.lora_adapters == ADAPTERS
    assert not any(n.startswith("combined_") for n in loaded.language_model.peft_config)
    for name in ADAPTERS:
        model.set_lora_adapters(name)
        loaded.set_lora_adapters(name)
        assert torch.equal(_logits(loaded), _logits(model)), name


def test_loading_checks_the_adapter_names(multi, tmp_path):
    from anygpt.core.pipeline import AnyGPTPipeline

    folder = tmp_path / "multi"
    multi.save_pretrained(folder)
    path = folder / "anygpt_index.json"
    index = json.loads(path.read_text())
    index["config"]["llm"]["lora"]["adapters"] = ["text", "image"]
    path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"saved LoRA adapters are \['audio', 'image', 'text', 'video'\]"):
        AnyGPTPipeline.from_pretrained(folder)
    index["config"]["llm"]["lora"]["adapters"] = ADAPTERS
    index["parts"]["lora"] = "lora/text"  # the single-adapter form for a per-modality config
    path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"saved LoRA adapters are \['default'\]"):
        AnyGPTPipeline.from_pretrained(folder)


def test_old_single_adapter_index_still_loads(tiny_pipe, tmp_path):
    from anygpt.core.pipeline import AnyGPTPipeline

    folder = tmp_path / "single"
    tiny_pipe.save_pretrained(folder)
    path = folder / "anygpt_index.json"
    index = json.loads(path.read_text())
    assert index["parts"]["lora"] == "lora"  # the single-adapter layout is unchanged
    assert (folder / "lora" / "adapter_model.safetensors").is_file()
    assert (folder / "lora" / "adapter_config.json").is_file()
    del index["config"]["llm"]["lora"]["adapters"]  # as written before per-modality adapters existed
    path.write_text(json.dumps(index))
    loaded = AnyGPTPipeline.from_pretrained(folder).model
    assert loaded.lora_adapters == ["default"] and loaded.config.llm.lora.adapters is None
    assert torch.equal(_logits(loaded), _logits(tiny_pipe.model))


def test_shipped_model_index_keeps_its_single_adapter():
    from anygpt.core.index import packaged_model_dir, read_index

    config, parts = read_index(packaged_model_dir("toyworld"))
    assert parts["lora"] == "lora" and config.llm.lora is not None and config.llm.lora.adapters is None


# ---------------------------------------------------------------------------------------------- pipeline
def test_pipeline_selects_adapters_per_call(multi):
    model = multi.model
    kwargs = dict(seed=0, max_new_tokens=4, show_progress=False, on_decode=lambda *args: False)  # no decoding
    tokens = {}
    for name in ADAPTERS:
        tokens[name] = multi("a red circle", adapters=name, **kwargs).token_ids
        assert model.active_lora_adapters == [name]
    assert len({tuple(t) for t in tokens.values()}) > 1  # the adapters answer differently
    assert multi("a red circle", adapters="image", **kwargs).token_ids == tokens["image"]  # chosen again: the same

    # defaults: the forced output modality's adapter; "auto": every adapter combined (their mean)
    multi("a red circle", modalities=["audio"], **kwargs)
    assert model.active_lora_adapters == ["audio"]
    multi("a red circle", **kwargs)
    (everything,) = model.active_lora_adapters
    multi("a red circle", adapters=ADAPTERS, **kwargs)
    assert model.active_lora_adapters == [everything] and everything.startswith("combined_")
    # several forced modalities, or several names: one combined adapter (their mean); a dict gives weights
    multi("a red circle", modalities=["image", "audio"], **kwargs)
    (mean,) = model.active_lora_adapters
    multi("a red circle", adapters="image, audio", **kwargs)
    assert model.active_lora_adapters == [mean]
    multi("a red circle", adapters={"text": 0.2, "video": 0.8}, **kwargs)
    assert model.active_lora_adapters[0].startswith("combined_") and model.active_lora_adapters != [mean]
    assert multi.select_adapters(["text", "video"], None) == (["text", "video"], None)


def test_pipeline_refuses_unknown_adapters_before_changing_anything(multi, tiny_pipe):
    from anygpt.core.conversation import Conversation

    conversation = Conversation()
    with pytest.raises(ValueError, match="unknown LoRA adapter 'pictures': this model has text, image, video, audio"):
        multi("hello", adapters=["pictures"], conversation=conversation, max_new_tokens=2)
    assert conversation.turns == []
    with pytest.raises(ValueError, match="unknown LoRA adapter 'image': this model has default"):
        tiny_pipe("hello", adapters="image", max_new_tokens=2)
    assert tiny_pipe.select_adapters(None, None) is None  # one adapter: nothing to choose, nothing changed


# ---------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    from toyworld.sample_configs import write_sample

    return write_sample(tmp_path_factory.mktemp("sample") / "data", size=8)


def _trainer(sample: Path, tmp_path: Path, adapters: list[str] = ADAPTERS, **sets):
    from training.config import load_config
    from training.trainer import StageTrainer

    lora = {**LORA, "adapters": adapters}
    overrides = ["cache_dir=null", f"lora={json.dumps(lora)}", *(f"{k}={v}" for k, v in sets.items())]
    trainer = StageTrainer(load_config(sample / "stage3.yaml", overrides=overrides), output_dir=tmp_path / "out")
    trainer.setup()
    return trainer


def _examples(trainer, dataset: str, count: int):
    records = trainer.data.records[trainer.data.names.index(dataset)]
    return [trainer.builder.build(r) for r in records[:count]]


def test_stage_3_trains_every_adapter_and_nothing_else(sample, tmp_path):
    trainer = _trainer(sample, tmp_path)
    model = trainer.model
    llm = model.language_model
    names = {n for n, _ in trainer.params}
    lora = {f"model.language_model.{n}" for n, _ in llm.named_parameters() if "lora_" in n}
    assert names == lora | {"token_rows.input_rows", "token_rows.output_rows"}
    layers = model.config.llm.num_layers
    assert len(lora) == len(ADAPTERS) * 2 * 4 * layers  # A and B on q, k, v, o of every layer, per adapter
    for name in ADAPTERS:
        assert len(lora_parameters(llm, name)) == 2 * 4 * layers
    r, hidden = model.config.llm.lora.r, model.hidden_size
    count = sum(p.numel() for n, p in trainer.params if n in lora)
    assert count == len(ADAPTERS) * layers * 4 * 2 * r * hidden
    assert not llm.get_input_embeddings().weight.requires_grad


def test_a_step_on_image_outputs_changes_only_the_image_adapter(sample, tmp_path, monkeypatch):
    trainer = _trainer(sample, tmp_path, **{"optim.warmup_steps": 0})  # a learning rate > 0 at the first step
    examples = _examples(trainer, "image_t2x", 3)
    assert {e.reply_modality.value for e in examples} == {"image"}
    assert trainer.tensors(examples)["adapters"] == ["image"] * 3
    monkeypatch.setattr(trainer, "micro_batches", lambda step: [(examples, [0, 1, 2])])
    llm = trainer.model.language_model
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer._train_mode()
    metrics = trainer._step(0)
    assert metrics["loss"] > 0
    after = dict(trainer.model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    image = {f"language_model.{n}" for n in lora_parameters(llm, "image")}
    assert changed and changed <= image  # the other adapters, the frozen LLM, encoder and projectors: bit-identical
    assert any("lora_B" in n for n in changed)
    assert all(p.requires_grad for n, p in llm.named_parameters() if "lora_" in n)  # every adapter still trains


def test_a_mixed_batch_trains_each_rows_own_adapter(sample, tmp_path):
    trainer = _trainer(sample, tmp_path)
    examples = _examples(trainer, "image_t2x", 2) + _examples(trainer, "alpaca", 2)
    batch = trainer.tensors(examples)
    assert batch["adapters"] == ["image", "image", "text", "text"]
    module = trainer.module
    llm = trainer.model.language_model
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in llm.named_parameters():
            if "lora_B" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    trainer._train_mode()

    def run(rows, *, checkpointing=False):
        module.zero_grad(set_to_none=True)
        b = trainer.tensors([examples[i] for i in rows])
        sums = module(
            b["input_ids"], b["labels"], b["attention_mask"], b["media"], b["targets"], adapters=b["adapters"]
        )
        sum(sums.values()).backward()
        grads = {n: p.grad.clone() for n, p in llm.named_parameters() if p.grad is not None}
        return {k: v.detach() for k, v in sums.items()}, grads

    together, grads = run([0, 1, 2, 3])
    assert {n.split(".lora_")[1].split(".")[1] for n in grads} == {"image", "text"}
    images, image_grads = run([0, 1])
    texts, text_grads = run([2, 3])
    torch.testing.assert_close(together["ce"], images["ce"] + texts["ce"])  # the rows' sums add up
    torch.testing.assert_close(together["caption_image"], images["caption_image"])
    for name, grad in grads.items():
        torch.testing.assert_close(grad, image_grads[name] if ".image." in name else text_grads[name])

    # activation checkpointing recomputes each layer with the adapter its forward ran with
    llm.activation_checkpointing_enable(
        activation_checkpointing_kwargs={"use_reentrant": False, "context_fn": checkpoint_context_fn(llm)}
    )
    _, checkpointed = run([0, 1, 2, 3])
    assert set(checkpointed) == set(grads)
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed[name], grad)


def test_data_needing_a_missing_adapter_is_refused(sample, tmp_path):
    from training.config import ConfigError

    with pytest.raises(ConfigError, match="replies producing text, but the model has no such LoRA adapter"):
        _trainer(sample, tmp_path, adapters=["image", "video", "audio"])


def test_per_adapter_forwards_with_gated_cross_attention():
    """Each adapter's forward reads its own rows' media context, in the forward and in a checkpointed recompute."""
    from anygpt.base.modality import Modality
    from anygpt.core.config import config_from_preset
    from anygpt.core.fusion import CrossAttentionConfig
    from anygpt.core.lora import forward_per_adapter
    from anygpt.core.pipeline import AnyGPTPipeline

    config = config_from_preset("tiny")
    config.llm.lora = LoraSettings(**LORA)
    config.cross_attention = CrossAttentionConfig(every=1, num_heads=4)
    model = AnyGPTPipeline.from_config(config).model
    llm = model.language_model
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in llm.named_parameters():
            if "lora_B" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
        for block in model.cross_attention.blocks.values():
            block.attn_gate.fill_(0.5)
            block.ff_gate.fill_(0.5)
    image = model.tokens.placeholder[Modality.IMAGE]
    bos, pad = model.tokenizer.bos_token_id, model.tokenizer.pad_token_id
    ids = torch.tensor([[bos, 40, image, 41, 42], [bos, 50, 51, pad, pad], [bos, image, 60, image, 61]])
    mask = (ids != pad).long()
    features = {Modality.IMAGE: model.project_media(Modality.IMAGE, torch.randn(3, model.encoder.embed_dim), None)}
    adapters = ["image", "text", "image"]
    lora = [p for n, p in llm.named_parameters() if "lora_" in n]
    for param in lora:
        param.requires_grad_(True)
    llm.train()

    def run(rows=model.cross_attention.rows):
        llm.zero_grad(set_to_none=True)
        embeds = model.embed_inputs(ids, features)
        logits, _ = forward_per_adapter(llm, adapters, embeds, mask, output_hidden_states=False, rows=rows)
        (logits * mask[..., None]).sum().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in llm.named_parameters() if p.grad is not None}

    logits, grads = run()
    for name, members, items in (("image", [0, 2], [0, 1, 2]), ("text", [1], [])):
        sub = {Modality.IMAGE: features[Modality.IMAGE][items]} if items else {}
        with torch.no_grad():
            embeds = model.embed_inputs(ids[members], sub)
            model.set_lora_adapters(name)
            alone = llm(inputs_embeds=embeds, attention_mask=mask[members]).logits
        torch.testing.assert_close(logits[members], alone)
    llm.activation_checkpointing_enable(
        activation_checkpointing_kwargs={
            "use_reentrant": False,
            "context_fn": checkpoint_context_fn(llm, model.cross_attention),
        }
    )
    checkpointed_logits, checkpointed = run()
    torch.testing.assert_close(checkpointed_logits, logits)
    assert set(checkpointed) == set(grads) and {n.split(".lora_")[1].split(".")[1] for n in grads} == {"image", "text"}
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed[name], grad)


def test_stage_3_with_adapters_starts_from_a_stage_2_model_whose_adapter_never_trained(sample, tmp_path):
    from training.config import ConfigError, load_config
    from training.trainer import StageTrainer

    def run(stage: int, out: Path, start=None, **sets):
        overrides = ["cache_dir=null", *(f"{k}={v}" for k, v in sets.items())]
        config = load_config(sample / f"stage{stage}.yaml", overrides=overrides)
        return StageTrainer(config, start=start, output_dir=out, max_steps=2).train()

    stage2 = run(2, tmp_path / "s2")  # carries the preset's single adapter along, untouched (B = 0)
    lora = json.dumps({**LORA, "adapters": ADAPTERS})
    stage3 = run(3, tmp_path / "s3", start=str(stage2), lora=lora)
    from anygpt.core.pipeline import AnyGPTPipeline

    assert AnyGPTPipeline.from_pretrained(stage3).model.lora_adapters == ADAPTERS
    # a trained adapter is never thrown away silently
    trained = run(3, tmp_path / "s3-single", start=str(stage2))
    with pytest.raises(ConfigError, match="already holds a trained adapter"):
        run(3, tmp_path / "again", start=str(trained), lora=lora)
