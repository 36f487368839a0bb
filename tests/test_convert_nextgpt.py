"""``anygpt convert nextgpt``: a synthetic NExT-GPT checkpoint (its exact key names, structure and fp16 at small sizes)
is converted, loaded with ``AnyGPTPipeline.from_pretrained`` and compared with an independent re-implementation, in
this file, of what NExT-GPT computes (``TextFcLayer``, ``llama_proj``, LoRA merged as W + B @ A * alpha / r)."""

from __future__ import annotations

import argparse
import io
import json
import pathlib
import shutil
import warnings

import numpy as np
import pytest
import sentencepiece as spm
import torch
import torch.nn as nn
from PIL import Image
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from anygpt import cli
from anygpt.apps.convert import add_arguments, convert_nextgpt, run
from anygpt.base.errors import CheckpointError, UsageError
from anygpt.base.modality import Modality
from anygpt.core.conversation import Conversation, MediaRef
from anygpt.core.pipeline import AnyGPTPipeline
from anygpt.core.tokens import SignalTokenProcessor

# Small sizes. The components are the `tiny` preset: ImageBind out 32, output projector d_model 64 with 4 heads and
# 1 + 1 layers, decoders conditioned on 32-wide vectors (77 x 32 for image and video, one pooled vector for audio).
V_BASE, HIDDEN, LAYERS, HEADS, RANK, ALPHA = 320, 64, 2, 4, 8, 32  # alpha 32 is NExT-GPT's; r 8: scaling 4
ENC_DIM, D_MODEL, TFM_LAYERS, COND = 32, 64, 1, 32
QUERIES = {"image": 77, "video": 77, "audio": 1}
PREFIX = {"image": "gen_text_hidden_fcs", "video": "gen_text_hidden_fcs_video", "audio": "gen_text_hidden_fcs_audio"}
SIGNALS = {"image": [f"[IMG{i}]" for i in range(4)], "video": [f"[VID{i}]" for i in range(24)]}
SIGNALS["audio"] = [f"[AUD{i}]" for i in range(8)]
ADDED = ["{'<Img>'}", "{'</Img>'}", *SIGNALS["image"], *SIGNALS["video"], *SIGNALS["audio"]]  # its added_tokens.json
ROWS = V_BASE + len(ADDED)
STAGE3 = "llama_model.base_model.model."
EMBED, HEAD = f"{STAGE3}model.embed_tokens.weight", f"{STAGE3}lm_head.weight"
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
TEXT = ["### Human: <Img> describe this image\n### Assistant: a cat sits on a mat.", "the quick brown fox jumps"]
TEXT += ["generate a caption for this video and audio clip", "Hello world! How are you today? I am fine, thanks."]


class TextFcLayer(nn.Module):
    """NExT-GPT's output projector, mode "transformer": ``model(tfm(fc(x + e), query_embs.repeat(B, 1, 1)))``."""

    def __init__(self, out_dim: int, num_queries: int):
        super().__init__()
        self.fc = nn.Linear(HIDDEN, D_MODEL)
        with warnings.catch_warnings():  # norm_first: no nested-tensor fast path, nothing to warn about
            warnings.filterwarnings("ignore", message="enable_nested_tensor is True")
            self.tfm = self._transformer()
        self.model = nn.Linear(D_MODEL, out_dim)
        self.query_embs = nn.Parameter(torch.randn(1, num_queries, D_MODEL))

    @staticmethod
    def _transformer() -> nn.Transformer:
        return nn.Transformer(
            d_model=D_MODEL,
            nhead=4,
            num_encoder_layers=TFM_LAYERS,
            num_decoder_layers=TFM_LAYERS,
            dim_feedforward=4 * D_MODEL,
            dropout=0.0,
            batch_first=True,
            norm_first=True,
        )

    def forward(self, x: torch.Tensor, input_embs: torch.Tensor) -> torch.Tensor:
        x = self.fc(x + input_embs)
        return self.model(self.tfm(x, self.query_embs.repeat(x.shape[0], 1, 1)))


class Reference:
    """NExT-GPT's trained parts at small sizes, fp16 values, and its forward computed here, by hand."""

    def __init__(self, base_dir: pathlib.Path, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)

        def rand(*shape, scale=0.1):
            return (torch.randn(*shape, generator=gen) * scale).half().float()  # values fp16 can hold

        self.embed, self.head = rand(ROWS, HIDDEN, scale=1.0), rand(ROWS, HIDDEN, scale=1.0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.proj = nn.Linear(ENC_DIM, HIDDEN)
            self.fcs = {m: TextFcLayer(COND, q) for m, q in QUERIES.items()}
        with torch.no_grad():
            for module in (self.proj, *self.fcs.values()):
                for p in module.parameters():
                    p.copy_((p + rand(*p.shape, scale=0.05)).half().float())
        for module in self.fcs.values():
            module.eval()
        self.lora = {(i, p): (rand(RANK, HIDDEN), rand(HIDDEN, RANK)) for i in range(LAYERS) for p in PROJ}
        self.llm = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
        self.llm.resize_token_embeddings(ROWS, mean_resizing=False)
        with torch.no_grad():
            self.llm.get_input_embeddings().weight.copy_(self.embed)
            self.llm.get_output_embeddings().weight.copy_(self.head)
            for (i, p), (a, b) in self.lora.items():
                getattr(self.llm.model.layers[i].self_attn, p).weight.add_(b @ a * (ALPHA / RANK))

    def state_dict(self, *, default: bool = True, stage3: bool = True) -> dict[str, torch.Tensor]:
        """The ``pytorch_model.pt`` dict: NExT-GPT's key names, fp16 ``nn.Parameter`` values."""
        state = {}
        tables = (EMBED, HEAD) if stage3 else ("llama_model.model.embed_tokens.weight", "llama_model.lm_head.weight")
        state[tables[0]], state[tables[1]] = self.embed, self.head
        adapter = ".default" if default else ""
        for (i, p), (a, b) in self.lora.items():
            state[f"{STAGE3}model.layers.{i}.self_attn.{p}.lora_A{adapter}.weight"] = a
            state[f"{STAGE3}model.layers.{i}.self_attn.{p}.lora_B{adapter}.weight"] = b
        state["llama_proj.weight"], state["llama_proj.bias"] = self.proj.weight, self.proj.bias
        for m, module in self.fcs.items():
            state.update({f"{PREFIX[m]}.0.{k}": v for k, v in module.state_dict().items()})
        return {k: nn.Parameter(v.detach().half(), requires_grad=False) for k, v in state.items()}


def _train_sentencepiece(path: pathlib.Path) -> None:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT * 50),
        model_writer=model,
        vocab_size=V_BASE,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=1.0,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        minloglevel=2,
    )
    path.write_bytes(model.getvalue())


def _write_legacy_tokenizer(folder: pathlib.Path, sp_model: pathlib.Path, added: list[str] | None) -> None:
    """The files transformers 4.29's slow ``LlamaTokenizer.save_pretrained`` wrote (NExT-GPT's release)."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(sp_model, folder / "tokenizer.model")
    token = {"__type": "AddedToken", "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    config = {"add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False}
    config |= {name: {**token, "content": c} for name, c in (("bos_token", "<s>"), ("eos_token", "</s>"))}
    config |= {"unk_token": {**token, "content": "<unk>"}, "pad_token": None, "tokenizer_class": "LlamaTokenizer"}
    config |= {"model_max_length": 2048, "sp_model_kwargs": {}}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special | ({"pad_token": "</s>"} if added else {})))
    if added:
        (folder / "added_tokens.json").write_text(json.dumps({s: V_BASE + i for i, s in enumerate(added)}))


def _llama_config(**changes) -> LlamaConfig:
    sizes = dict(vocab_size=V_BASE, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS)
    sizes |= dict(num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=2048)
    sizes |= dict(rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    return LlamaConfig(**(sizes | changes))


def _save_on_gpu_storage(state: dict, path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``torch.save`` as on NExT-GPT's GPUs: every storage tagged ``cuda:0`` (loading needs ``map_location``)."""
    with monkeypatch.context() as patch:
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(state, path)


def _write_released(folder: pathlib.Path, world, state: dict, *, files: bool = True) -> pathlib.Path:
    """A released folder: ``pytorch_model.pt`` (+ its tokenizer files and LLaMA config.json when ``files``)."""
    folder.mkdir(parents=True)
    with pytest.MonkeyPatch.context() as patch:
        _save_on_gpu_storage(state, folder / "pytorch_model.pt", patch)
    if files:
        _write_legacy_tokenizer(folder, world["sp_model"], ADDED)
        (folder / "config.json").write_text(_llama_config(vocab_size=ROWS).to_json_string())
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The base LLM folder (a small Vicuna-v0-like LLaMA and its SentencePiece tokenizer), the reference and the
    released folder, converted once with the `tiny` components."""
    root = tmp_path_factory.mktemp("nextgpt")
    sp_model = root / "tokenizer.model"
    _train_sentencepiece(sp_model)
    base = root / "vicuna-v0"
    _write_legacy_tokenizer(base, sp_model, None)
    torch.manual_seed(1)
    LlamaForCausalLM(_llama_config()).save_pretrained(base)
    world = {"root": root, "sp_model": sp_model, "base": base, "reference": Reference(base)}
    world["released"] = _write_released(root / "nextgpt_7b_tiva_v0", world, world["reference"].state_dict())
    world["out"] = convert_nextgpt(world["released"], root / "converted", llm=base, components="tiny")
    world["pipe"] = AnyGPTPipeline.from_pretrained(world["out"])
    return world


# ---------------------------------------------------------------------------------------------- faithful
def test_the_released_file_really_has_gpu_storage(world):
    if torch.cuda.is_available():
        pytest.skip("with a GPU, loading without map_location succeeds")
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(world["released"] / "pytorch_model.pt", weights_only=True)


def test_whole_embedding_and_lm_head_tables_all_rows(world):
    llm, ref = world["pipe"].model.language_model, world["reference"]
    emb, head = llm.get_input_embeddings().weight, llm.get_output_embeddings().weight
    assert emb.shape == head.shape == (ROWS + 3, HIDDEN)  # + anygpt's three media placeholders
    assert torch.equal(emb[:ROWS], ref.embed) and torch.equal(head[:ROWS], ref.head)  # base rows too
    assert not emb[ROWS:].any() and not head[ROWS:].any()
    rows = load_file(world["out"] / "token_embeddings.safetensors")
    assert rows["token_ids"].tolist() == list(range(ROWS + 3)) and rows["input_embeddings"].dtype == torch.float16


def test_tokens_ids_and_order(world):
    pipe = world["pipe"]
    assert pipe.tokenizer.convert_ids_to_tokens(list(range(V_BASE, ROWS))) == ADDED  # the quirk names are kept
    base = 0
    for name in ("image", "video", "audio"):
        ids = pipe.model.tokens.signal[Modality(name)]
        assert ids == list(range(V_BASE + 2 + base, V_BASE + 2 + base + len(SIGNALS[name])))
        assert pipe.tokenizer.convert_tokens_to_ids(SIGNALS[name]) == ids
        base += len(ids)
    assert sorted(pipe.model.tokens.placeholder.values()) == [ROWS, ROWS + 1, ROWS + 2]
    assert {ROWS, ROWS + 1, ROWS + 2} <= set(SignalTokenProcessor(pipe.model.tokens).banned)  # never generated


def test_prompt_template_and_media_wrapping_as_in_training(world):
    """``<s>### Human: <Img>{media}</Img> {text}\\n### Assistant:``, ``<Img>`` as plain text: in training the
    tokenizer had ``{'<Img>'}`` instead (NExT-GPT's added_tokens.json)."""
    pipe = world["pipe"]
    assert pipe.config.llm.template == "nextgpt_v0"
    conversation = Conversation(template=pipe.config.llm.template)
    conversation.add_user("describe this image", [MediaRef(Modality.IMAGE, "key")])
    ids, order = pipe.model.tokenize_pieces(conversation.prompt_pieces(pipe.tokenizer.eos_token_id))
    sp = spm.SentencePieceProcessor(model_file=str(world["sp_model"]))
    placeholder = pipe.model.tokens.placeholder[Modality.IMAGE]
    expected = [
        1,
        *sp.encode("### Human: <Img>"),
        placeholder,
        *sp.encode("</Img> describe this image\n### Assistant:"),
    ]
    assert ids == expected and len(order) == 1


def test_input_projection_equals_llama_proj(world):
    pipe, ref = world["pipe"], world["reference"]
    embeds = torch.randn(3, ENC_DIM)
    with torch.no_grad():
        expected = ref.proj(embeds).unsqueeze(1)  # (B, 1, H): one LLM token per item
        for name in ("image", "video", "audio"):
            got = pipe.model.project_media(Modality(name), embeds, None)
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["image", "video", "audio"])
def test_output_projector_computes_text_fc_layer(world, name):
    pipe, ref = world["pipe"], world["reference"]
    n = len(SIGNALS[name])
    hidden, embeds = torch.randn(2, n, HIDDEN), torch.randn(2, n, HIDDEN)
    with torch.no_grad():
        got = pipe.model.output_projectors[name](hidden, embeds)
        expected = ref.fcs[name](hidden, embeds)
    assert got.shape == (2, QUERIES[name], COND)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_llm_logits_with_lora_and_signal_conditioning_at_training_positions(world):
    """LoRA (r 8, alpha 32: scaling 4) and both tables give the reference's logits; each signal group's conditioning
    is TextFcLayer of the last-layer hidden states where its tokens are the input (audio as a (B, 512)-style vector)."""
    pipe, ref = world["pipe"], world["reference"]
    img, aud = pipe.model.tokens.signal[Modality.IMAGE], pipe.model.tokens.signal[Modality.AUDIO]
    ids = torch.tensor([[1, 40, 7, 99, *img, 12, V_BASE, 250, *aud, 3]])
    with torch.no_grad():
        ours = pipe.model.language_model(input_ids=ids, output_hidden_states=True)
        theirs = ref.llm(input_ids=ids, output_hidden_states=True)
        torch.testing.assert_close(ours.logits[..., :ROWS], theirs.logits, rtol=1e-4, atol=1e-4)
        hidden = theirs.hidden_states[-1]
        for modality, group, start in ((Modality.IMAGE, img, 4), (Modality.AUDIO, aud, 11)):
            got, where = pipe.model.signal_conditioning(modality, ours.hidden_states[-1], ids)
            span = slice(start, start + len(group))
            expected = ref.fcs[modality.value](hidden[:, span], ref.llm.get_input_embeddings()(ids[:, span]))
            if modality is Modality.AUDIO:
                expected = expected.view(1, COND)  # NExT-GPT: gen_emb.view(bs, hid_emb_size)
            assert where == [(0, start)]
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_converted_config_and_round_trip_keep_every_row(world, tmp_path):
    pipe = world["pipe"]
    lora = pipe.config.llm.lora
    assert (lora.r, lora.alpha, lora.dropout, lora.target_modules) == (RANK, ALPHA, 0.1, list(PROJ))
    assert json.loads((world["out"] / "lora" / "adapter_config.json").read_text())["r"] == RANK
    assert pipe.config.input_projector.name == "linear" and pipe.config.output_projector.name == "transformer"
    assert pipe.config.signal_tokens.counts == {"image": 4, "video": 24, "audio": 8}
    pipe.save_pretrained(tmp_path / "again")
    again = AnyGPTPipeline.from_pretrained(tmp_path / "again")
    weight = again.model.language_model.get_input_embeddings().weight
    assert torch.equal(weight[:ROWS], world["reference"].embed)  # the imported base rows survive a re-save


def test_the_converted_folder_runs_the_whole_pipeline(world):
    image = Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8))
    settings = dict(max_new_tokens=4, num_inference_steps=1, seed=0, show_progress=False)
    out = world["pipe"]("what is this?", images=[image], modalities=["image", "audio"], **settings)
    assert len(out.images) == 1 and len(out.audios) == 1
    assert out.conditioning["image"].shape == (1, 77, COND) and out.conditioning["audio"].shape == (1, COND)


# ---------------------------------------------------------------------------------------------- variants
@pytest.mark.parametrize(
    "variant",
    ["lora keys without .default", "stage-1/2 table names", "the .pt alone", "through the command line"],
)
def test_variants_give_the_same_folder(world, tmp_path, variant):
    ref = world["reference"]
    state = ref.state_dict(default=variant != "lora keys without .default", stage3=variant != "stage-1/2 table names")
    released = _write_released(tmp_path / "released", world, state, files=variant != "the .pt alone")
    out = tmp_path / "out"
    if variant == "through the command line":
        parser = argparse.ArgumentParser()
        add_arguments("convert", parser)
        pt = str(released / "pytorch_model.pt")
        argv = ["nextgpt", pt, "--out", str(out), "--llm", str(world["base"]), "--components", "tiny"]
        assert run(parser.parse_args(argv)) == 0
    else:
        convert_nextgpt(released, out, llm=world["base"], components="tiny")
    for name in ("token_embeddings.safetensors", "lora/adapter_model.safetensors"):
        ours, theirs = load_file(out / name), load_file(world["out"] / name)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    loaded = AnyGPTPipeline.from_pretrained(out)
    assert loaded.tokenizer.convert_ids_to_tokens(list(range(V_BASE, ROWS))) == ADDED


def test_a_tokenizer_saved_after_nextgpts_fix_names_img_tokens_and_they_are_used(world, tmp_path):
    """A checkpoint trained after NExT-GPT's fix has ``<Img>`` as token 320: the template's ``<Img>`` is that token."""
    released = _write_released(tmp_path / "released", world, world["reference"].state_dict())
    names = ["<Img>", "</Img>", *ADDED[2:]]
    (released / "added_tokens.json").write_text(json.dumps({s: V_BASE + i for i, s in enumerate(names)}))
    out = convert_nextgpt(released, tmp_path / "out", llm=world["base"], components="tiny")
    pipe = AnyGPTPipeline.from_pretrained(out)
    conversation = Conversation(template="nextgpt_v0")
    conversation.add_user("hi", [MediaRef(Modality.AUDIO, "key")])
    ids, _ = pipe.model.tokenize_pieces(conversation.prompt_pieces(pipe.tokenizer.eos_token_id))
    placeholder = ids.index(pipe.model.tokens.placeholder[Modality.AUDIO])
    assert ids[placeholder - 1] == V_BASE and ids[placeholder + 1] == V_BASE + 1


def test_a_foreign_output_folder_is_not_replaced(world, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="refusing to replace it"):
        convert_nextgpt(world["released"], tmp_path / "out", llm=world["base"], components="tiny")
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_stage_1_2_checkpoint_without_lora(world, tmp_path):
    state = {k: v for k, v in world["reference"].state_dict(stage3=False).items() if ".lora_" not in k}
    released = _write_released(tmp_path / "released", world, state)
    out = convert_nextgpt(released, tmp_path / "out", llm=world["base"], components="tiny")
    pipe = AnyGPTPipeline.from_pretrained(out)
    assert pipe.config.llm.lora is None and not (out / "lora").exists()
    assert torch.equal(pipe.model.language_model.get_input_embeddings().weight[:ROWS], world["reference"].embed)


def test_the_dispatcher_reaches_the_command(world, tmp_path, capsys):
    args = ["convert", "nextgpt", str(world["released"]), "--out", str(tmp_path / "out")]
    assert cli.main([*args, "--llm", str(world["base"]), "--components", "tiny"]) == 0
    assert (tmp_path / "out" / "anygpt_index.json").is_file()
    assert cli.main([*args[:2], str(tmp_path / "missing"), *args[3:], "--llm", str(world["base"])]) == 2
    assert "missing" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- errors
def _drop(key):
    return lambda state: state.pop(key)


def _set(key, shape):
    return lambda state: state.__setitem__(key, torch.zeros(shape, dtype=torch.float16))


LORA_B0 = f"{STAGE3}model.layers.1.self_attn.v_proj.lora_B.default.weight"
QUERY, EXTRA = "gen_text_hidden_fcs_video.0.query_embs", "gen_text_hidden_fcs.1.fc.weight"
MISMATCHES = {  # a change to the released dict -> words its error must hold (the key, expected, found)
    "32042-style table (issue #47)": (_set(EMBED, (V_BASE + 42, HIDDEN)), [EMBED, "(358, 64)", "(362, 64)", "#47"]),
    "missing key": (_drop(QUERY), [QUERY, "missing", "(1, 77, 64)"]),
    "wrong shape": (_set("llama_proj.weight", (HIDDEN, 16)), ["llama_proj.weight", "(64, 32)", "(64, 16)"]),
    "unexpected key": (_set("visual_encoder.trunk.weight", (4, 4)), ["visual_encoder.trunk.weight", "unexpected"]),
    "missing LoRA matrix": (_drop(LORA_B0), [LORA_B0, "missing", "(64, 8)"]),
    "wrong LoRA shape": (_set(LORA_B0, (HIDDEN, 4)), [LORA_B0, "(64, 8)", "(64, 4)"]),
    "stage-3 names, no LoRA": (
        lambda state: [state.pop(k) for k in [k for k in state if ".lora_" in k]],
        ["lora_A.default.weight", "missing"],
    ),
    "a second output layer": (_set(EXTRA, (64, 64)), [EXTRA, "unexpected"]),
}


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_mismatch_is_one_clear_error_and_nothing_is_written(world, tmp_path, case):
    change, words = MISMATCHES[case]
    state = world["reference"].state_dict()
    change(state)
    released = _write_released(tmp_path / "released", world, state)
    with pytest.raises(CheckpointError) as error:
        convert_nextgpt(released, tmp_path / "out", llm=world["base"], components="tiny")
    for word in words:
        assert word in str(error.value)
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["released"]


def test_a_llama2_like_base_is_refused(world, tmp_path):
    """Same shapes, another model: the base's config.json differs from the one saved with the checkpoint."""
    other = tmp_path / "llama-2"
    shutil.copytree(world["base"], other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(config | {"max_position_embeddings": 4096, "rms_norm_eps": 1e-5}))
    with pytest.raises(CheckpointError, match="max_position_embeddings is 4096.*had 2048"):
        convert_nextgpt(world["released"], tmp_path / "out", llm=other, components="tiny")


def test_released_tokenizer_with_other_added_tokens_is_refused(world, tmp_path):
    released = _write_released(tmp_path / "released", world, world["reference"].state_dict())
    (released / "added_tokens.json").write_text(json.dumps({s: V_BASE + i for i, s in enumerate(ADDED[::-1])}))
    with pytest.raises(CheckpointError, match=r"token 320 is '\[AUD7\]', NExT-GPT's is \"\{'<Img>'\}\""):
        convert_nextgpt(released, tmp_path / "out", llm=world["base"], components="tiny")


def test_non_tensor_pickle_payload_is_refused_unexecuted(world, tmp_path):
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (pathlib.Path.touch, (marker,))

    folder = tmp_path / "released"
    folder.mkdir()
    torch.save({**world["reference"].state_dict(), "payload": Payload()}, folder / "pytorch_model.pt")
    with pytest.raises(CheckpointError, match="refused.*weights_only"):
        convert_nextgpt(folder, tmp_path / "out", llm=world["base"], components="tiny")
    assert not marker.exists()
    torch.save({"epoch": 3, **world["reference"].state_dict()}, folder / "pytorch_model.pt")  # allowed, not a tensor
    with pytest.raises(CheckpointError, match="entry 'epoch' is a int, expected a tensor"):
        convert_nextgpt(folder, tmp_path / "out", llm=world["base"], components="tiny")


def test_a_reply_stops_at_nextgpts_stop_string(world, monkeypatch):
    """NExT-GPT ends a reply with ``###`` (its template's stop, token 835 in LLaMA's vocabulary), not EOS: generation
    is asked to stop there and the reply is cut before it, so no invented next turn reaches the text."""
    pipe = world["pipe"]
    reply = pipe.tokenizer("a cat [IMG0][IMG1][IMG2][IMG3]\n### Human: and more", add_special_tokens=False)
    seen = {}

    def fake_generate(**kwargs):
        seen.update(kwargs)
        return type("Out", (), {"sequences": torch.tensor([reply["input_ids"]]), "past_key_values": None})()

    monkeypatch.setattr(pipe.model.language_model, "generate", fake_generate)
    ids, _ = pipe.generate_tokens(torch.zeros(1, 3, HIDDEN), forced=None, max_new_tokens=32, temperature=0.0, top_p=1.0)
    assert seen["stop_strings"] == ["###"] and seen["tokenizer"] is pipe.tokenizer
    text = pipe.tokenizer.decode(ids, skip_special_tokens=False)
    assert "###" not in text and "Human" not in text and text.startswith("a cat")
    assert ids[-4:] == pipe.model.tokens.signal[Modality.IMAGE]  # the signal group before the stop is kept
