"""Real-size configurations on the meta device, memory estimates, and every dtype / offload / quantization path on the
CPU with tiny components.

What the offload tests assert, honestly: the CPU is the only device here, so the hooks run with the CPU as their
execution device and move nothing. They check that accelerate's / diffusers' hooks are attached where they should
be, that model offload keeps one component resident at a time (its bookkeeping) and moves the resident one off before
a decoder runs, that sequential offload leaves the LLM's own tensors on ``meta`` (its weights wait in the hooks' CPU
copy), and that outputs are exactly those without offload. Actual transfers to an accelerator are not exercised.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from anygpt import AnyGPTPipeline
from anygpt.base.errors import ConfigError, UsageError
from anygpt.base.modality import Modality
from anygpt.core.config import PRESETS, config_from_preset
from anygpt.core.memory import GIB, build_meta, component_sizes, default_runtime, estimate_plan, memory_report
from anygpt.core.model import AnyGPTModel
from anygpt.core.runtime import RuntimeOptions
from decoders import DecoderConfig, build_decoder

PROMPT = "draw a red circle"


def _call(pipe, **kwargs):
    options = dict(modalities=["image", "audio"], seed=0, max_new_tokens=4, num_inference_steps=2, show_progress=False)
    return pipe(PROMPT, **{**options, **kwargs})


@pytest.fixture(scope="module")
def reference():
    """The tiny pipeline's output with no offload, fp32, on the CPU."""
    return _call(AnyGPTPipeline.from_pretrained("tiny"))


def _same_media(a, b) -> None:
    assert a.token_ids == b.token_ids and a.text == b.text
    for x, y in zip(a.images, b.images, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    for x, y in zip(a.audios, b.audios, strict=True):
        np.testing.assert_array_equal(x.waveform, y.waveform)


# ---------------------------------------------------------------------------------------------------- meta builds


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_builds_on_the_meta_device(preset):
    system = build_meta(config_from_preset(preset))
    tensors = list(system.model.parameters()) + [
        p for m in system.decoders.values() for v in m.values() for p in v.parameters()
    ]
    assert tensors and all(t.is_meta for t in tensors)
    assert set(system.decoders) == {Modality(m) for m in system.config.decoders}


def test_model_builds_under_a_meta_device_context():
    config = config_from_preset("tiny")
    specs = {Modality(m): build_decoder(c).spec for m, c in config.decoders.items()}
    with torch.device("meta"):
        model = AnyGPTModel.build(config, specs)  # init_added_token_rows used to call .item() here
    assert all(p.is_meta for p in model.parameters())
    assert model.language_model.get_input_embeddings().weight.shape[0] == len(model.tokenizer)


def test_nextgpt_sizes_match_the_released_models():
    sizes = {c.name: c for c in component_sizes(build_meta(config_from_preset("nextgpt-7b")))}
    billions = {name: round(c.params / 1e9, 2) for name, c in sizes.items()}
    assert billions["encoder"] == 1.20
    assert round(sizes["llm"].parts["base"] / 1e9, 2) == 6.74  # Vicuna-7B without the added rows and LoRA
    assert (billions["decoder image"], billions["decoder video"], billions["decoder audio"]) == (1.07, 1.84, 0.98)
    assert sizes["llm"].parts["lora"] == 32 * 4 * 2 * 4096 * 32  # r 32 on q/k/v/o of 32 layers
    assert sizes["encoder"].trainable == 0 and sizes["output projectors"].trainable == sizes["output projectors"].params


def test_default_plan_fits_24_gb_and_the_16_gb_plan_fits_16_gb():
    config = config_from_preset("nextgpt-7b")
    system = build_meta(config)
    big, small = default_runtime(config, "cuda", gpu_memory_gib=24), default_runtime(config, "cuda", gpu_memory_gib=16)
    assert (big.dtype, big.offload, big.quantize) == ("float16", "decoders", None)
    assert (small.dtype, small.offload, small.quantize) == ("float16", "model", None)
    assert estimate_plan(system, big).peak < 24 * GIB
    assert estimate_plan(system, small).peak < 16 * GIB
    everything = estimate_plan(system, RuntimeOptions(device="cuda", dtype="float16"))
    assert everything.peak > 24 * GIB  # all of it resident does not fit: the choice is not trivial
    assert default_runtime(config, "cpu") == RuntimeOptions(device="cpu")


def test_memory_report_weights_follow_dtype_and_quantization():
    plans = [
        RuntimeOptions(device="cuda", dtype="float32"),
        RuntimeOptions(device="cuda", dtype="float16"),
        RuntimeOptions(device="cuda", dtype="float16", offload="model", quantize="8bit"),
        RuntimeOptions(device="cuda", dtype="float16", offload="model", quantize="4bit"),
    ]
    report = memory_report("nextgpt-7b", plans)
    fp32, fp16, q8, q4 = (p.weights for p in report.plans)
    assert fp32 == 4 * report.total_params and fp16 == 2 * report.total_params
    assert fp16 > q8 > q4
    text = report.format()
    for name in ("encoder", "llm", "decoder image", "decoder video", "decoder audio", "8bit (bitsandbytes)"):
        assert name in text


def test_unknown_decoder_source_cannot_be_sized():
    config = config_from_preset("tiny")
    config.decoders["image"] = DecoderConfig.from_preset("tiny-stable-diffusion", source="someone/unknown-model")
    with pytest.raises(ConfigError, match="someone/unknown-model"):
        build_meta(config)


# ---------------------------------------------------------------------------------------------------- bugs


def test_imagebind_from_a_checkpoint_through_encoders_alone_encodes_audio(tmp_path):
    """A fresh interpreter that imports only ``encoders``: torchaudio's module constants must not land on meta."""
    from safetensors.torch import save_file

    from encoders import build_imagebind_encoder

    encoder = build_imagebind_encoder("tiny")
    save_file({k: v.contiguous() for k, v in encoder.model.state_dict().items()}, tmp_path / "ib.safetensors")
    script = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        from encoders import ImageBindConfig, build_imagebind_encoder
        from anygpt.base.media import Audio
        assert "decoders" not in sys.modules
        config = ImageBindConfig.from_preset("tiny", checkpoint={str(tmp_path / "ib.safetensors")!r})
        encoder = build_imagebind_encoder(config)
        out = encoder.encode("audio", [Audio(np.sin(np.arange(16000, dtype=np.float32) / 10), 16000)])
        print(tuple(out.embeds.shape))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "(1, 32)"


def test_sentencepiece_tokenizer_without_the_package_names_it(tmp_path, monkeypatch):
    from anygpt.core import llm

    (tmp_path / "tokenizer.model").write_bytes(b"\0")
    real = llm.importlib.util.find_spec
    monkeypatch.setattr(
        llm.importlib.util, "find_spec", lambda name, *a: None if name == "sentencepiece" else real(name)
    )
    with pytest.raises(ConfigError, match="pip install sentencepiece") as err:
        llm._load_tokenizer(tmp_path)
    assert "tiktoken" not in str(err.value)


# ---------------------------------------------------------------------------------------------------- options


def test_loader_arguments_map_onto_runtime_options():
    assert RuntimeOptions.from_loader_arguments(torch.bfloat16, "cpu") == RuntimeOptions(device="cpu", dtype="bfloat16")
    assert RuntimeOptions.from_loader_arguments("float16", torch.device("cuda", 1)).device == "cuda:1"
    with pytest.raises(UsageError, match="device_map"):
        RuntimeOptions.from_loader_arguments(device_map={"": "cuda"})
    with pytest.raises(UsageError, match="torch_dtype"):
        RuntimeOptions.from_loader_arguments(torch_dtype=torch.int8)
    with pytest.raises(UsageError, match="not both"):
        AnyGPTPipeline.from_pretrained("tiny", runtime=RuntimeOptions(), torch_dtype="float16")
    with pytest.raises(UsageError, match="accelerator"):
        RuntimeOptions(device="cpu", offload="model")


# ---------------------------------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize(("dtype", "tolerance"), [("bfloat16", 0.05), ("float16", 0.01)])
def test_half_precision_components_stay_close_to_fp32(dtype, tolerance):
    """Relative to the fp32 output's largest magnitude: bf16 within 5 %, fp16 within 1 % (tiny random weights)."""
    ref = AnyGPTPipeline.from_pretrained("tiny")
    half = AnyGPTPipeline.from_pretrained("tiny", torch_dtype=dtype, device_map="cpu")
    assert half.model.encoder.dtype == half.model.dtype == getattr(torch, dtype)
    assert half.decoders[Modality.IMAGE].dtype == getattr(torch, dtype)

    def close(a, b):
        a, b = a.float(), b.float()
        assert (a - b).abs().max() <= tolerance * a.abs().max()

    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    close(ref.model.encoder.encode("image", [image]).embeds, half.model.encoder.encode("image", [image]).embeds)
    ids = torch.tensor([[1, 70, 80, 90, 100]])
    close(ref.model.language_model(input_ids=ids).logits, half.model.language_model(input_ids=ids).logits)
    cond = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(0))
    decoder_ref, decoder_half = ref.decoders[Modality.IMAGE], half.decoders[Modality.IMAGE]
    steps = dict(num_inference_steps=2, generator=torch.Generator().manual_seed(0), show_progress=False)
    a = np.asarray(decoder_ref.generate(cond, **steps)[0], dtype=np.float32)
    steps["generator"] = torch.Generator().manual_seed(0)
    b = np.asarray(decoder_half.generate(cond, **steps)[0], dtype=np.float32)
    assert np.abs(a - b).mean() <= 255 * tolerance


# ---------------------------------------------------------------------------------------------------- quantization


@pytest.mark.parametrize("backend", ["torchao", "bitsandbytes"])
@pytest.mark.parametrize(("quantize", "tolerance"), [("8bit", 0.05), ("4bit", 0.35)])
def test_quantized_llm_logits_stay_close_to_fp32(backend, quantize, tolerance):
    """Loaded through transformers' quantization config with device_map (the tiny LLM goes through from_pretrained
    too); LoRA sits on the quantized layers. Tolerance: relative to the fp32 logits' largest magnitude."""
    ref = AnyGPTPipeline.from_pretrained("tiny")
    runtime = RuntimeOptions(device="cpu", quantize=quantize, quantization_backend=backend)
    pipe = AnyGPTPipeline.from_pretrained("tiny", runtime=runtime)
    llm = pipe.model.language_model
    q_proj = llm.get_base_model().model.layers[0].self_attn.q_proj
    layer = q_proj.base_layer
    if backend == "bitsandbytes":
        assert type(layer).__name__ == ("Linear8bitLt" if quantize == "8bit" else "Linear4bit")
    else:
        assert "torchao" in type(layer.weight).__module__
    assert llm.get_base_model().hf_quantizer is not None
    ids = torch.tensor([[1, 70, 80, 90, 100, 110]])
    a = ref.model.language_model(input_ids=ids).logits
    b = llm(input_ids=ids).logits.float()
    assert (a - b).abs().max() <= tolerance * a.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= (0.8 if quantize == "8bit" else 0.5)
    with pytest.raises(UsageError, match="never moved"):
        pipe.to(dtype=torch.bfloat16)


def test_decoder_unet_quantized_through_diffusers_pipeline_config():
    decoder = build_decoder(DecoderConfig.from_preset("tiny-stable-diffusion"))
    plain = build_decoder(DecoderConfig.from_preset("tiny-stable-diffusion"))
    decoder.set_quantization("8bit", "torchao")
    unet = decoder.pipeline.unet
    linear = next(m for n, m in unet.named_modules() if n.endswith("attn1.to_q"))
    assert "torchao" in type(linear.weight).__module__
    assert type(plain.pipeline.unet.conv_in.weight) is type(unet.conv_in.weight)  # convolutions stay as they were
    cond = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(0))
    kwargs = dict(num_inference_steps=2, show_progress=False, output_type=None)
    kwargs.pop("output_type")
    a = np.asarray(plain.generate(cond, generator=torch.Generator().manual_seed(0), **kwargs)[0], dtype=np.float32)
    b = np.asarray(decoder.generate(cond, generator=torch.Generator().manual_seed(0), **kwargs)[0], dtype=np.float32)
    assert np.abs(a - b).mean() <= 255 * 0.02
    bnb = build_decoder(DecoderConfig.from_preset("tiny-stable-diffusion")).set_quantization("8bit", "bitsandbytes")
    assert type(bnb.pipeline.unet.conv_in.weight) is torch.nn.Parameter  # diffusers' bnb needs CUDA: left as is


# ---------------------------------------------------------------------------------------------------- offload


def test_model_offload_keeps_one_component_resident_and_gives_the_same_outputs(reference, monkeypatch):
    from accelerate.hooks import UserCpuOffloadHook

    offloaded: list[str] = []
    original = UserCpuOffloadHook.offload

    def record(self):
        offloaded.append(type(self.model).__name__)
        original(self)

    monkeypatch.setattr(UserCpuOffloadHook, "offload", record)
    pipe = AnyGPTPipeline.from_pretrained("tiny")
    pipe.enable_model_cpu_offload("cpu")
    group = pipe._model_offload
    assert group.members == ["encoder", "llm"]
    assert type(pipe.model.encoder._hf_hook).__name__ == "_SwapIn"
    assert pipe.model.language_model.get_input_embeddings()._hf_hook is not None  # called directly by the pipeline
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    pipe.model.encoder.encode("image", [image])
    assert group.resident == "encoder"
    _same_media(reference, _call(pipe))
    assert group.resident is None  # moved off before the decoders ran
    assert offloaded == ["PeftModelForCausalLM"]  # the LLM, by offload_all; the encoder was already on the CPU
    pipe.model.encoder.encode("image", [image])
    group.activate("llm")  # accelerate's CpuOffload moves its previous module (the encoder) off, if not on the CPU
    assert group.resident == "llm" and group._hooks["llm"].hook.prev_module_hook is group._hooks["encoder"]
    for decoder in pipe.decoders.values():
        assert decoder.offload_plan == "model" and hasattr(decoder.pipeline.unet, "_hf_hook")
    pipe.remove_offload()
    assert not hasattr(pipe.model.encoder, "_hf_hook") and pipe.offload_plan == "none"
    _same_media(reference, _call(pipe))


def test_decoder_offload_plan_keeps_the_llm_and_offloads_decoders(reference):
    pipe = AnyGPTPipeline.from_pretrained("tiny")
    pipe.enable_decoder_offload("cpu")
    assert not hasattr(pipe.model.language_model, "_hf_hook")
    _same_media(reference, _call(pipe))
    assert all(hasattr(d.pipeline.unet, "_hf_hook") for d in pipe.decoders.values())


def test_sequential_offload_leaves_weights_in_the_hooks_and_gives_the_same_tokens(reference):
    pipe = AnyGPTPipeline.from_pretrained("tiny")
    pipe.enable_sequential_cpu_offload("cpu")
    assert all(p.is_meta for p in pipe.model.language_model.parameters())
    assert all(p.is_meta for p in pipe.model.encoder.parameters())
    # the LLM and the encoder run through the hooks; the decoders' hooks are attached but not run here: diffusers
    # names the execution device "cpu:0", on which accelerate's CPU-only path fails (CUDA devices are unaffected)
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    ref = AnyGPTPipeline.from_pretrained("tiny")
    torch.testing.assert_close(
        pipe.model.encoder.encode("image", [image]).embeds, ref.model.encoder.encode("image", [image]).embeds
    )
    ids = torch.tensor([[1, 70, 80, 90]])
    torch.testing.assert_close(
        pipe.model.language_model(input_ids=ids).logits, ref.model.language_model(input_ids=ids).logits
    )
    assert any(hasattr(m, "_hf_hook") for m in pipe.decoders[Modality.IMAGE].pipeline.unet.modules())


def test_group_offload_gives_the_same_outputs(reference):
    pipe = AnyGPTPipeline.from_pretrained("tiny")
    pipe.enable_group_offload("cpu")
    _same_media(reference, _call(pipe))
    with pytest.raises(UsageError, match="cannot be undone"):
        pipe.remove_offload()


def test_decoders_leave_the_accelerator_between_uses_and_stay_loaded():
    decoder = build_decoder(DecoderConfig.from_preset("tiny-audioldm"))
    decoder.enable_offload("model", "cpu")
    cond = torch.randn(1, 32)
    decoder.generate(cond, num_inference_steps=1, show_progress=False)
    assert decoder.is_loaded and decoder.load_count == 1
    pipe = decoder.pipeline
    assert all(hasattr(m, "_hf_hook") for m in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.vocoder))
    decoder.offload()
    decoder.unload()
    assert not decoder.is_loaded


def test_compile_option_compiles_the_llm_and_the_denoisers():
    pipe = AnyGPTPipeline.from_pretrained("tiny", runtime=RuntimeOptions(device="cpu", compile=True))
    assert pipe.model.language_model._compiled_call_impl is not None
    assert pipe.decoders[Modality.IMAGE].pipeline.unet._compiled_call_impl is not None


# ---------------------------------------------------------------------------------------------------- benchmark


@pytest.mark.slow
def test_realsize_benchmark_runs_at_reduced_depth(tmp_path):
    """One layer per stack at the released widths, 64 px, one decoder: every measure is there (no timing asserted)."""
    out = tmp_path / "bench.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_realsize.py"
    args = ["--layers", "1", "--size", "32", "--steps", "2", "--tokens", "2", "--decoders", "audio"]
    done = subprocess.run(
        [
            sys.executable,
            str(script),
            *args,
            "--audio-seconds",
            "0.5",
            "--json",
            str(out),
            "--markdown",
            str(tmp_path / "b.md"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    for key in (
        "encoder_s_per_image", "llm_tokens_per_s", "audio_s_per_call", "audio_s_per_step", "end_to_end_overhead_ratio",
        "train_step_s_with_cache", "train_step_s_without_cache", "feature_cache_speedup",
    ):  # fmt: skip
        assert results[key] > 0, key
    assert results["layers"] == 1 and "cuda float16, model offload" in results["estimated_peak_gib_full_size"]
    assert "| feature_cache_speedup |" in (tmp_path / "b.md").read_text()


def test_info_memory_through_the_command_line(capsys):
    from anygpt import cli

    assert cli.main(["info", "--memory", "--model", "nextgpt-7b"]) == 0
    out = capsys.readouterr().out
    for line in ("encoder            1.20 B", "decoder video      1.84 B", "default on a 24 GB GPU: cuda float16"):
        assert line in out
    assert "default on a 16 GB GPU: cuda float16, model offload" in out
    assert cli.main(["info", "--memory", "--model", "tiny", "--dtype", "bfloat16", "--quantize", "4bit"]) == 0
    plans = [row for row in capsys.readouterr().out.splitlines() if row.startswith("cuda ")]
    assert len(plans) == 1 and "bfloat16" in plans[0] and "4bit" in plans[0]
    assert cli.main(["info", "presets", "--dtype", "float16"]) == 2  # plan options only go with --memory
    assert "go with --memory" in capsys.readouterr().err
