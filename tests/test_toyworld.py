"""The toy world: its generator and dataset, the component pretraining's pieces, packaging, the recipe end to end,
and a quick check of the shipped ``toyworld`` model (its full evaluation against the quality targets: ``make eval``)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anygpt.base.modality import Modality
from toyworld import world
from toyworld.data import MARKER_FILE, WorldSizes, read_corpus, write_world

# ------------------------------------------------------------------------------------------------------------ world


def test_world_is_deterministic_per_seed():
    def draw(seed):
        rng = np.random.default_rng(seed)
        return [world.draw_request(rng) for _ in range(20)] + [world.draw_video(rng) for _ in range(5)]

    assert draw(3) == draw(3)
    assert draw(3) != draw(4)


def test_captions_name_the_attributes():
    assert world.ImageItem("red", "circle").caption == "a red circle"
    assert world.AudioItem("high", "pulsed").caption == "a high beep"
    assert world.AudioItem("low", "steady").caption == "a steady low tone"
    assert world.VideoItem("blue", "right").caption == "a blue square moving right"


def test_media_have_the_world_shapes():
    rng = np.random.default_rng(0)
    assert world.draw_image(rng).render().shape == (64, 64, 3)
    audio = world.draw_audio(rng).render()
    assert audio.sample_rate == 16000 and audio.waveform.shape == (16000,)
    video = world.draw_video(rng).render()
    assert video.frames.shape == (8, 64, 64, 3) and video.fps == 8.0


def test_requests_ask_for_distinct_modalities():
    rng = np.random.default_rng(1)
    for _ in range(50):
        request = world.draw_request(rng)
        kinds = [item.modality for item in request.items]
        assert len(kinds) == len(set(kinds)) and 1 <= len(kinds) <= 3
        for item in request.items:
            assert item.caption in request.prompt


# ------------------------------------------------------------------------------------------------------------ dataset


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world") / "data"
    write_world(root, seed=0, sizes=WorldSizes.quick())
    return root


def test_dataset_is_read_by_the_stage_configs(world_dir):
    from training.config import load_config
    from training.data import read_dataset

    configs = Path(__file__).resolve().parents[1] / "toyworld" / "configs"
    for stage in (1, 2, 3):
        config = load_config(configs / f"toyworld-stage{stage}.yaml", overrides=[f"data_root={world_dir}"], stage=stage)
        for spec in config.dataset_specs():
            assert len(read_dataset(spec)) > 0, spec.name


def test_dataset_conversations_follow_the_world(world_dir):
    records = json.loads((world_dir / "IT_data" / "MosIT_data" / "toyworld.json").read_text())
    sizes = WorldSizes.quick()
    assert len(records) == sum(
        getattr(sizes, k)
        for k in ("generation", "captioning", "multi_turn", "follow_up", "media_to_media", "out_of_world")
    )
    for record in records:
        captions = {
            e[f"{m}_name"]: e["caption"] for m in ("image", "video", "audio") for e in record.get(f"{m}_list", [])
        }
        for turn in record["conversation"]:
            for name in captions:
                if name in turn["value"] and turn["from"] == "gpt" and turn["value"].startswith("Here"):
                    assert f"Here is {captions[name]}." in turn["value"]  # replies name what they show first
        for name in captions:
            folder = world_dir / "T_X_pair_data" / name
            assert folder.is_file(), folder
    corpus = read_corpus(world_dir)
    assert len(corpus) == json.loads((world_dir / MARKER_FILE).read_text())["counts"]["corpus"]
    assert all("<Image>" not in text and "ASSISTANT:" in text for text in corpus)


def test_dataset_is_reproducible_and_refuses_foreign_folders(world_dir, tmp_path):
    again = tmp_path / "again"
    write_world(again, seed=0, sizes=WorldSizes.quick())
    for rel in ("IT_data/MosIT_data/toyworld.json", "T_X_pair_data/cc3m/cc3m.json", "text/corpus.jsonl"):
        assert (again / rel).read_bytes() == (world_dir / rel).read_bytes()
    assert (again / "T_X_pair_data/cc3m/images/00003.png").read_bytes() == (
        world_dir / "T_X_pair_data/cc3m/images/00003.png"
    ).read_bytes()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        write_world(foreign, sizes=WorldSizes.quick())


# ------------------------------------------------------------------------------------------------------------ pieces


def test_encoder_embed_equals_forward():
    from encoders import ImageBindEncoder
    from toyworld.components import encoder_config

    torch.manual_seed(0)
    encoder = ImageBindEncoder(encoder_config())
    x = torch.stack([encoder.preprocess(Modality.AUDIO, world.AudioItem("mid", "steady").render())])
    assert torch.equal(encoder(Modality.AUDIO, x).embeds, encoder.embed(Modality.AUDIO, x).embeds)
    assert encoder.num_tokens(Modality.VIDEO) > encoder.num_tokens(Modality.IMAGE)


def test_restricted_clip_tokenizer_keeps_every_caption():
    from decoders.clip_tokenizer import build_clip_tokenizer, restrict_clip_tokenizer
    from toyworld.components import world_captions

    full = build_clip_tokenizer()
    small, old_ids = restrict_clip_tokenizer(full, world_captions() + [""])
    assert len(small) < 1000
    for caption in world_captions():
        assert [old_ids[i] for i in small(caption).input_ids] == full(caption).input_ids
    assert small("a purple hexagon").input_ids[0] == small.bos_token_id  # any text still tokenises


@pytest.mark.parametrize("kind", ["stable-diffusion", "audioldm"])
def test_restricting_a_text_encoder_keeps_caption_embeddings(kind, one_thread):
    from decoders import DecoderConfig, build_decoder
    from toyworld.components import world_captions
    from toyworld.package import _encode, restrict_text_encoder

    preset = {"stable-diffusion": "tiny-stable-diffusion", "audioldm": "tiny-audioldm"}[kind]
    pipe = build_decoder(DecoderConfig.from_preset(preset)).load()
    texts = world_captions() + [""]
    before = _encode(pipe, texts)
    vocab = restrict_text_encoder(pipe, texts)
    assert vocab == len(pipe.tokenizer) < 1000
    assert pipe.text_encoder.get_input_embeddings().weight.shape[0] == vocab
    assert torch.equal(_encode(pipe, texts), before)


def test_video_unet_starts_as_the_image_unet_frame_by_frame(one_thread):
    from decoders.tiny import tiny_stable_diffusion_components, tiny_zeroscope_components
    from toyworld.components import video_unet_from_image

    image = tiny_stable_diffusion_components(seed=1, unet_channels=(32, 64, 64))["unet"]
    video = tiny_zeroscope_components(seed=0, unet_channels=(32, 64, 64))["unet"]
    assert video_unet_from_image(video, image) == len(image.state_dict())
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 3, 16, 16, generator=gen)  # (B, C, F, h, w)
    t = torch.tensor([900, 20])
    text = torch.randn(2, 77, 32, generator=gen)
    with torch.no_grad():
        clip = video(x, t, encoder_hidden_states=text).sample
        frames = image(
            x.transpose(1, 2).flatten(0, 1), t.repeat_interleave(3), encoder_hidden_states=text.repeat_interleave(3, 0)
        ).sample
    assert torch.allclose(clip, frames.unflatten(0, (2, 3)).transpose(1, 2), atol=1e-5)

    other = tiny_stable_diffusion_components(seed=1, unet_channels=(64, 64, 64))["unet"]
    with pytest.raises(ValueError, match="no place for"):
        video_unet_from_image(tiny_zeroscope_components(seed=0, unet_channels=(32, 64, 64))["unet"], other)


@pytest.mark.parametrize("kind", ["stable-diffusion", "audioldm"])
def test_zero_snr_scheduler_keeps_the_betas_family_and_ends_in_pure_noise(kind):
    from decoders.tiny import _audioldm_scheduler, _sd_scheduler
    from toyworld.components import zero_snr_scheduler

    original = {"stable-diffusion": _sd_scheduler, "audioldm": _audioldm_scheduler}[kind]()
    scheduler = zero_snr_scheduler(original)
    assert type(scheduler).__name__ == "DDIMScheduler"
    assert scheduler.config.prediction_type == "v_prediction" and scheduler.config.timestep_spacing == "trailing"
    assert scheduler.config.beta_start == original.config.beta_start
    assert float(original.alphas_cumprod[-1]) > 1e-5  # the original schedule never reaches pure noise
    assert float(scheduler.alphas_cumprod[-1]) == 0.0
    scheduler.set_timesteps(20)
    assert int(scheduler.timesteps[0]) == 999  # sampling starts where training saw pure noise


def test_timestep_shift_moves_training_towards_the_noisy_end():
    from toyworld import components

    uniform = components._draw_timesteps(20000, 1000, torch.Generator().manual_seed(0))
    shifted = components._draw_timesteps(20000, 1000, torch.Generator().manual_seed(0), shift=3.0)
    for t in (uniform, shifted):
        assert t.dtype == torch.int64 and int(t.min()) >= 0 and int(t.max()) == 999
    assert abs(float((uniform >= 800).float().mean()) - 0.20) < 0.02
    assert abs(float((shifted >= 800).float().mean()) - 0.43) < 0.02  # u > 4/7
    assert float((shifted < 100).float().mean()) > 0.02  # every level still trained


def test_text_tower_alignment_separates_what_the_media_separate(one_thread):
    """LiT: a CLAP text tower tuned against locked media embeddings tells apart captions whose media differ."""
    from decoders.tiny import tiny_audioldm_components
    from toyworld import components

    parts = tiny_audioldm_components(seed=0)
    tower, tokenizer = parts["text_encoder"], parts["tokenizer"]
    tower.train()
    tower.requires_grad_(True)
    gen = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(2, 24, generator=gen), dim=-1)
    captions = ["a steady low tone", "a steady high tone"] * 16
    bank = F.normalize(centres[[0, 1] * 16] + 0.05 * torch.randn(32, 24, generator=gen), dim=-1)

    def similarity() -> float:
        tower.eval()  # no dropout
        with torch.no_grad():
            low, high = components._clap_embeds(tower, tokenizer, captions[:2])
        tower.train()
        return float(low @ high)

    before = similarity()
    settings = components.ComponentSettings(align_steps=40, align_batch=16, align_lr=2e-3)
    with torch.random.fork_rng(devices=[]):  # the discarded media head's initialisation: same in any test order
        torch.manual_seed(0)
        losses = components._lock_align_text(
            lambda c: components._clap_embeds(tower, tokenizer, c), list(tower.parameters()), bank, captions, settings,
            np.random.default_rng(0), desc="align",
        )  # fmt: skip
    floor = np.log(8)  # the soft targets' entropy: 8 of a batch of 16 share each caption
    assert np.mean(losses[-5:]) - floor < 0.25 * (np.mean(losses[:5]) - floor)
    assert before > 0.9 and similarity() < before - 0.25  # two captions one word apart, their media far apart


@pytest.mark.parametrize("train_text", [True, False])
def test_unet_training_leaves_a_frozen_text_tower_as_it_was(train_text, one_thread):
    """The video decoder trains its UNet on an aligned, frozen text tower: exactly the UNet changes then."""
    from decoders.tiny import tiny_stable_diffusion_components
    from toyworld import components

    parts = tiny_stable_diffusion_components(seed=0)
    parts["scheduler"] = components.zero_snr_scheduler(parts["scheduler"])
    rng = np.random.default_rng(0)
    before = {n: {k: v.clone() for k, v in parts[n].state_dict().items()} for n in ("unet", "text_encoder")}

    components._train_text_conditioned_unet(
        parts["unet"], parts["text_encoder"], parts["tokenizer"], parts["scheduler"], parts["vae"],
        lambda: components._images(rng, 2), 2, components.ComponentSettings(), rng, torch.Generator().manual_seed(0),
        desc="unet", train_text=train_text,
    )  # fmt: skip
    for name in ("unet", "text_encoder"):
        after = parts[name].state_dict()
        changed = any(not torch.equal(before[name][k], after[k]) for k in after)
        assert changed == (name == "unet" or train_text), name
        assert not any(p.requires_grad for p in parts[name].parameters())  # both frozen afterwards


# ------------------------------------------------------------------------------------------------------------ recipe


@pytest.fixture(scope="module")
def quick_recipe(tmp_path_factory):
    from toyworld.recipe import RecipeSettings, run_recipe

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("recipe")
    try:
        results = run_recipe(out, RecipeSettings.quick())
    finally:
        torch.set_num_threads(threads)
    return out, results


def test_quick_recipe_runs_every_part_and_packages_a_loadable_model(quick_recipe):
    from anygpt.core.pipeline import AnyGPTPipeline
    from toyworld.recipe import PARTS

    out, results = quick_recipe
    assert list(results) == list(PARTS)
    for name in PARTS:
        info = json.loads((out / name / "part.json").read_text())
        assert info["seconds"] >= 0
    assert not list(out.glob(".*.partial"))
    summary = (out / "summary.md").read_text()
    assert "| stage3 |" in summary and "routing" in summary and "| video.direction |" in summary
    import re

    total = float(re.search(r"\| \*\*total\*\* \(the parts' own minutes\) \| \*\*([0-9.]+)\*\* \|", summary)[1])
    wall = float(re.search(r"\| wall clock, first part's start to last part's end \| ([0-9.]+) \|", summary)[1])
    assert wall >= total - 0.1  # one part after another here: the clock covers every part's minutes
    from toyworld.evaluate import DECODER_METRICS

    alone = results["eval-decoders"]["metrics"]["metrics"]
    assert set(alone) == set(DECODER_METRICS)
    assert all(entry["total"] == 1 for entry in alone.values())  # one held-out item per modality, each scored
    package = out / "package" / "toyworld"
    index = json.loads((package / "anygpt_index.json").read_text())
    assert index["config"]["llm"]["source"] == "./llm"  # components named relative to the folder
    assert index["config"]["decoders"]["image"]["source"] == "./decoders/image"
    assert index["config"]["signal_tokens"]["counts"] == {"image": 4, "video": 4, "audio": 8}  # see toyworld_config
    moved = out / "moved-elsewhere"
    shutil.copytree(package, moved)  # the folder works wherever it is
    pipe = AnyGPTPipeline.from_pretrained(moved)
    assert Path(pipe.config.llm.source) == moved.resolve() / "llm"
    result = pipe("draw a red circle", modalities="image", max_new_tokens=4, num_inference_steps=2)
    assert len(result.images) == 1 and result.images[0].size == (64, 64)
    size = sum(p.stat().st_size for p in package.rglob("*") if p.is_file())
    assert size < 40e6
    _assert_no_local_paths(package)


def test_toyworld_eval_command_writes_the_report_and_fails_below_target(quick_recipe, tmp_path, capsys):
    """``anygpt toyworld eval``: the few-step model misses the targets (exit 1, table printed, report written);
    ``--decoders`` scores each decoder alone (exit 0)."""
    from anygpt.cli import main
    from toyworld.evaluate import DECODER_METRICS, TARGETS

    package = str(quick_recipe[0] / "package" / "toyworld")
    assert main(["toyworld", "eval", package, "--samples", "1", "--output", str(tmp_path / "sub" / "system.json")]) == 1
    assert "below target:" in capsys.readouterr().out
    assert set(TARGETS) <= set(json.loads((tmp_path / "sub" / "system.json").read_text())["metrics"])
    alone = ["toyworld", "eval", package, "--samples", "1", "--decoders", "--output", str(tmp_path / "d.json")]
    assert main(alone) == 0
    assert set(json.loads((tmp_path / "d.json").read_text())["metrics"]) == set(DECODER_METRICS)


def test_recipe_skips_finished_parts(quick_recipe):
    from toyworld.recipe import RecipeSettings, run_recipe

    out, results = quick_recipe
    again = run_recipe(out, RecipeSettings.quick())
    assert again == results  # read back from part.json, nothing run again


def test_recipe_leaves_no_half_part_and_resumes(tmp_path, monkeypatch, one_thread):
    from toyworld import recipe

    settings = recipe.RecipeSettings.quick()
    calls = []

    def failing(out, s):
        calls.append(out)
        (out / "half-written").mkdir(parents=True)
        raise RuntimeError("interrupted")

    monkeypatch.setattr(recipe.components, "train_encoder", failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        recipe.run_recipe(tmp_path, settings, until="encoder")
    assert (tmp_path / "data" / "part.json").is_file()
    assert not (tmp_path / "encoder").exists()  # never a half-finished part under its final name
    monkeypatch.undo()
    done = recipe.run_recipe(tmp_path, settings, until="encoder")
    assert set(done) == {"data", "encoder"} and (tmp_path / "encoder" / "imagebind.safetensors").is_file()
    assert not (tmp_path / "encoder" / "half-written").exists()  # the failed attempt's files are gone
    with pytest.raises(ValueError, match="other settings"):  # a quick folder is never reused by a full run
        recipe.run_recipe(tmp_path, recipe.RecipeSettings(), until="data")
    with pytest.raises(ValueError, match="needs the part"):
        recipe.run_recipe(tmp_path, settings, only=["stage1"])


class _FakePart:
    """A part "process" that finishes on its third poll, writing the part.json a real part writes."""

    def __init__(self, out, name, log, code=0, polls=3):
        self.out, self.name, self.log, self.code, self.polls, self.needed = out, name, log, code, 0, polls

    def poll(self):
        self.polls += 1
        if self.polls < self.needed:
            return None
        if self.code == 0:
            from toyworld import recipe

            (self.out / self.name).mkdir(exist_ok=True)
            inputs = recipe._inputs(self.out, self.name)
            info = {"part": self.name, "seconds": 0.0, "finished": time.time(), "inputs": inputs}
            (self.out / self.name / "part.json").write_text(json.dumps(info))
        self.log.append(("end", self.name))
        return self.code

    def wait(self):
        return self.code

    def terminate(self):
        pass

    def send_signal(self, signum):
        pass


def test_parallel_recipe_respects_inputs_and_job_count_and_starts_the_longest_chain_first(tmp_path):
    from toyworld.recipe import DEPENDS, PARTS, run_parallel

    log, peak = [], [0]

    def start(name, threads):
        finished = {n for kind, n in log if kind == "end"}
        assert all(dep in finished for dep in DEPENDS[name]), name  # its inputs are done
        log.append(("start", name))
        return _FakePart(tmp_path, name, log)

    def tracked(name, threads):
        handle = start(name, threads)
        peak[0] = max(peak[0], len({n for k, n in log if k == "start"} - {n for k, n in log if k == "end"}))
        return handle

    run_parallel(tmp_path, list(PARTS), 2, tracked, cores=2, poll=0)
    assert sorted(n for k, n in log if k == "start") == sorted(PARTS)
    assert peak[0] == 2
    started = [n for k, n in log if k == "start"]
    # the roots: image-decoder heads the longest chain (image -> video decoder -> refine -> package), data the shortest
    assert started[:2] == ["image-decoder", "encoder"]
    assert started.index("data") > started.index("encoder")


def test_parallel_recipe_gives_a_part_that_starts_alone_all_the_cores(tmp_path):
    from toyworld.recipe import run_parallel

    log, threads_of, folder = [], {}, [tmp_path]

    def start(name, threads):
        threads_of[name] = threads
        log.append(("start", name))
        return _FakePart(folder[0], name, log)

    # encoder and image-decoder start together (2 each of 4 cores); video-decoder waits on both, so it starts alone
    run_parallel(tmp_path, ["encoder", "image-decoder", "video-decoder"], 2, start, cores=4, poll=0)
    assert threads_of == {"encoder": 2, "image-decoder": 2, "video-decoder": 4}
    threads_of.clear()
    folder[0] = tmp_path / "one-core"
    folder[0].mkdir()
    run_parallel(folder[0], ["encoder", "image-decoder"], 2, start, cores=1, poll=0)
    assert threads_of == {"encoder": 1, "image-decoder": 1}  # never zero threads


def test_parallel_recipe_gives_a_part_left_running_alone_all_the_cores(tmp_path):
    """encoder and image-decoder start together with one thread each; the encoder ends first and nothing else is
    ready (video-decoder waits on image-decoder), so image-decoder is sent ALL_CORES, once; video-decoder then starts
    alone with both cores and is sent nothing."""
    from toyworld.recipe import ALL_CORES, run_parallel

    log, signals, threads_of = [], [], {}

    class Part(_FakePart):
        def send_signal(self, signum):
            signals.append((self.name, signum))

    def start(name, threads):
        threads_of[name] = threads
        log.append(("start", name))
        return Part(tmp_path, name, log, polls=2 if name == "encoder" else 6)

    run_parallel(tmp_path, ["encoder", "image-decoder", "video-decoder"], 2, start, cores=2, poll=0)
    assert threads_of == {"encoder": 1, "image-decoder": 1, "video-decoder": 2}
    assert signals == [("image-decoder", ALL_CORES)]


def test_a_part_process_signalled_as_it_starts_and_as_it_ends_takes_all_the_cores_and_is_not_killed(tmp_path):
    """The signal's default action is to end a process: the child starts with it blocked, so one sent before its
    handler is set waits for it; and it ignores it once its work is done, since Python's shutdown puts a handled
    signal back to the default (the parent signals a part left alone, which may be one that is just exiting)."""
    from toyworld.recipe import ALL_CORES, RecipeSettings, _start_child, run_recipe

    run_recipe(tmp_path, RecipeSettings.quick(), until="data")
    child = _start_child(tmp_path, "encoder", 1)
    child.send_signal(ALL_CORES)  # at once: the child is still importing torch
    done = tmp_path / "encoder" / "part.json"
    deadline = time.monotonic() + 300
    while child.poll() is None and not done.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    sent = 0
    while child.poll() is None and time.monotonic() < deadline:  # its work written: signal it until it has exited
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(ALL_CORES)
            sent += 1
        time.sleep(0.0005)
    assert child.wait(timeout=300) == 0, f"killed after {sent} signal(s) sent as it ended"
    log = (tmp_path / "logs" / "encoder.log").read_text()
    assert f"now with {len(os.sched_getaffinity(0))} thread(s)" in log
    assert (tmp_path / "encoder" / "part.json").is_file()


def test_parallel_recipe_skips_finished_parts_and_reruns_everything_downstream_of_a_redone_one(tmp_path):
    from toyworld.recipe import PARTS, run_parallel

    log = []

    def start(name, threads):
        log.append(("start", name))
        return _FakePart(tmp_path, name, log)

    run_parallel(tmp_path, list(PARTS), 2, start, cores=2, poll=0)
    log.clear()
    run_parallel(tmp_path, list(PARTS), 2, start, cores=2, poll=0)
    assert log == []  # all done: nothing starts
    time.sleep(0.01)
    part = _FakePart(tmp_path, "image-decoder", [])
    while part.poll() is None:  # image-decoder redone: a newer part.json
        pass
    log.clear()
    run_parallel(tmp_path, list(PARTS), 2, start, cores=2, poll=0)
    started = {n for k, n in log if k == "start"}
    assert started == {
        "image-decoder-refine", "video-decoder", "video-decoder-refine", "base", "stage1", "stage2", "stage3",
        "package", "eval-package", "eval-decoders", "eval-stage2", "eval-stage1",
    }  # fmt: skip


def test_parallel_recipe_stops_launching_after_a_failure_and_names_the_part(tmp_path):
    from toyworld.recipe import run_parallel

    log = []

    def start(name, threads):
        log.append(("start", name))
        return _FakePart(tmp_path, name, log, code=1 if name == "encoder" else 0)

    with pytest.raises(RuntimeError, match=r"part\(s\) encoder failed: see .*encoder\.log"):
        run_parallel(tmp_path, ["data", "encoder", "llm", "audio-decoder"], 2, start, cores=2, poll=0)
    started = [n for k, n in log if k == "start"]
    assert "audio-decoder" not in started  # it waits on the failed encoder
    assert (tmp_path / "data" / "part.json").is_file()  # parts already running finish and keep their work
    with pytest.raises(ValueError, match="needs the part"):
        run_parallel(tmp_path, ["stage1"], 2, start, cores=2, poll=0)


def test_parallel_recipe_runs_parts_in_their_own_processes(tmp_path):
    """``jobs=2``: real child processes read the settings from recipe.json and write each part and its log; a part
    done already starts no process."""
    from toyworld.recipe import RecipeSettings, run_recipe

    settings = RecipeSettings.quick()
    assert RecipeSettings.from_dict(json.loads(json.dumps(dataclasses.asdict(settings)))) == settings
    run_recipe(tmp_path, settings, until="data")  # here: the input of the llm part
    done = run_recipe(tmp_path, settings, until="llm", jobs=2)  # encoder and llm at once, each in its own process
    assert set(done) == {"data", "encoder", "llm"} and all(v is not None for v in done.values())
    assert (tmp_path / "llm" / "model.safetensors").is_file()
    assert (tmp_path / "encoder" / "imagebind.safetensors").is_file()
    assert "part llm: done" in (tmp_path / "logs" / "llm.log").read_text()
    assert "part encoder: done" in (tmp_path / "logs" / "encoder.log").read_text()
    assert not (tmp_path / "logs" / "data.log").exists()
    assert "| llm |" in (tmp_path / "summary.md").read_text()


def test_recipe_folders_recorded_before_the_components_rename_still_belong_to_their_settings(tmp_path):
    """A recipe.json written when the component pretraining's settings were recorded as "stage0" is read as today's
    "components": the folder's finished parts are kept, not refused as another recipe's."""
    from toyworld import recipe

    settings = recipe.RecipeSettings.quick()
    old = json.loads(json.dumps(dataclasses.asdict(settings)))
    old["stage0"] = old.pop("components")
    (tmp_path / "recipe.json").write_text(json.dumps(old))
    recipe._check_settings(tmp_path, settings)  # no error: the same settings
    assert recipe.RecipeSettings.from_dict(old) == settings
    with pytest.raises(ValueError, match=r"other settings \(components, seed differ"):
        recipe._check_settings(tmp_path, recipe.RecipeSettings.quick(seed=1))


def test_base_depends_on_every_folder_its_config_names(tmp_path):
    """A from-nothing run starts the stages only once every component folder the system names is written (a stage-2
    run once started before the video decoder's folder existed and failed loading its text encoder)."""
    from toyworld.recipe import DEPENDS, PARTS, toyworld_config

    config = toyworld_config(tmp_path)
    named = {config.llm.source, config.encoder.checkpoint} | {d.source for d in config.decoders.values()}
    parts = {Path(p).relative_to(tmp_path).parts[0] for p in named}
    assert parts <= set(PARTS) and parts <= set(DEPENDS["base"]), parts - set(DEPENDS["base"])


def test_recipe_rejects_unknown_parts(tmp_path):
    from toyworld.recipe import run_recipe

    with pytest.raises(ValueError, match="unknown part 'stage4'"):
        run_recipe(tmp_path, only=["stage4"])
    with pytest.raises(ValueError, match="no part is both in --only"):
        run_recipe(tmp_path, only=["stage2"], until="stage1")
    assert not (tmp_path / "recipe.json").exists()


# ------------------------------------------------------------------------------------------------ shipped model


def _shipped():
    from anygpt.core.index import packaged_model_dir

    try:
        return packaged_model_dir("toyworld")
    except FileNotFoundError as err:
        pytest.fail(str(err))


def _assert_no_local_paths(folder: Path) -> None:
    """No saved config names a folder of the machine that made the model."""
    for path in folder.rglob("*.json"):
        data = json.loads(path.read_text())
        if isinstance(data, dict):
            for key in ("_name_or_path", "base_model_name_or_path"):
                assert not Path(str(data.get(key, ""))).is_absolute(), (path, key, data[key])


def test_toyworld_is_the_default_and_ships_under_40_mb():
    from anygpt.core.config import DEFAULT_MODEL, list_presets

    assert DEFAULT_MODEL == "toyworld" and "toyworld" in list_presets()
    folder = _shipped()
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size < 40e6
    _assert_no_local_paths(folder)
    for path in folder.rglob("*.safetensors"):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                tensor = f.get_slice(key)
                assert tensor.get_dtype() in ("F16", "I64", "I32", "BOOL"), (path, key, tensor.get_dtype())


# The shipped model's quick check: a few held-out items per figure, each figure at most one in four items below its
# target (about 2 of 8). The full evaluation, 96 items per figure against the targets themselves, is `make eval`
# (`anygpt toyworld eval`, which CI runs after the tests).
QUICK_SAMPLES = 8
QUICK_SLACK = 0.25


@pytest.fixture(scope="module")
def shipped_report():
    """The evaluator on the shipped model: the first held-out items, ``QUICK_SAMPLES`` per figure."""
    from anygpt.core.pipeline import AnyGPTPipeline
    from toyworld.evaluate import evaluate

    _shipped()
    return evaluate(AnyGPTPipeline.from_pretrained("toyworld"), samples=QUICK_SAMPLES, progress=False)


def _target_params():
    from toyworld.evaluate import TARGETS

    return list(TARGETS)


@pytest.mark.parametrize("metric", _target_params())
def test_shipped_model_comes_close_to_the_quality_target(metric, shipped_report):
    from toyworld.evaluate import TARGETS

    figure = shipped_report["metrics"][metric]
    assert figure["total"] >= QUICK_SAMPLES
    floor = TARGETS[metric] - QUICK_SLACK
    assert figure["value"] >= floor, f"{metric}: {figure['correct']}/{figure['total']} < {floor:.2f}"


def test_make_run_request_gives_its_three_files(tmp_path):
    """`make run` (the Makefile's PROMPT, the default model and seed) writes one file per requested item, and each
    file, read back from disk, shows what was asked."""
    import re

    from PIL import Image

    from anygpt import cli
    from anygpt.base.media import load_audio, load_video
    from toyworld.oracles import audio_attributes, image_attributes, video_attributes

    _shipped()
    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    prompt = re.search(r"^PROMPT \?= (.+)$", makefile, re.M).group(1).strip()
    assert prompt == "draw a red circle and play a high beep and show a green square moving left"
    assert cli.main(["generate", prompt, "--out", str(tmp_path)]) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["gen-0001_audio0.wav", "gen-0001_image0.png", "gen-0001_video0.mp4"]
    image = np.asarray(Image.open(tmp_path / "gen-0001_image0.png").convert("RGB"))
    assert image_attributes(image) == {"colour": "red", "shape": "circle"}
    assert audio_attributes(load_audio(tmp_path / "gen-0001_audio0.wav"))["pitch"] == "high"
    assert video_attributes(load_video(tmp_path / "gen-0001_video0.mp4")) == {"colour": "green", "direction": "left"}
