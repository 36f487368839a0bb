"""The toy-world recipe: from nothing to the packaged ``toyworld`` model, part by part.

=================  ==========================================================================================
part               writes
=================  ==========================================================================================
data               the world as a dataset in NExT-GPT's formats (:mod:`toyworld.data`)
encoder            an ImageBind-architecture encoder trained contrastively (components)
llm                a BPE tokenizer and a Llama LM trained on the world's conversations (components)
image-decoder      Stable Diffusion trained on the world's images (components)
image-decoder-...  its UNet and text encoder trained further at a lower learning rate (``-refine``)
video-decoder      ZeroScope, its spatial layers from the image decoder (components)
video-decoder-...  its UNet trained further on noisier timesteps, the text encoder kept (``-refine``)
audio-decoder      AudioLDM with its CLAP text encoder and HiFi-GAN vocoder (components)
base               the untrained any-to-any system over those components (``save_pretrained``)
stage1..stage3     ``anygpt train`` with ``toyworld/configs/toyworld-stage{1,2,3}.yaml`` (resumable)
eval-stage1, -2    the evaluator on held-out prompts and media after stages 1 and 2
eval-package       the evaluator on the package: the figures after stage 3 (its weights in fp16)
eval-decoders      each packaged decoder alone, from its own caption embeddings (the text -> media ceiling)
package            the stage-3 model with its components in fp16, loadable as one folder
=================  ==========================================================================================

Each part writes ``OUT/<part>/`` through a temporary folder renamed when the part ends, with ``part.json`` (seconds,
metrics); a finished part is skipped, so the recipe resumes after an interruption (the training stages also resume
from their last checkpoint) and its parts can be run one by one (``--only``). Nothing here is special to the model or
the pipeline: the stages are ordinary training runs and the package is an ordinary ``save_pretrained`` folder whose
components live inside it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import anygpt
from anygpt.base.utils import atomic_directory, write_text_atomic
from anygpt.core.config import PACKAGED_MODELS, AnyGPTConfig, ProjectorConfig
from anygpt.core.fusion import CrossAttentionConfig
from anygpt.core.index import packaged_reference
from anygpt.core.llm import LanguageModelConfig, LoraSettings
from anygpt.core.pipeline import AnyGPTPipeline
from anygpt.core.tokens import SignalTokenConfig
from decoders import DecoderConfig
from toyworld import components, evaluate
from toyworld.data import WorldSizes, read_corpus, write_world
from toyworld.package import package_model
from training.config import load_config
from training.trainer import StageTrainer

logger = logging.getLogger(__name__)

__all__ = ["PARTS", "RecipeSettings", "run_recipe"]

PART_FILE = "part.json"
ALL_CORES = signal.SIGUSR1  # sent to a part's process: use every core from now on
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
PARTS = (
    "data", "encoder", "llm", "image-decoder", "video-decoder", "audio-decoder", "image-decoder-refine",
    "video-decoder-refine", "audio-vocoder", "base", "stage1", "stage2", "stage3", "package", "eval-package",
    "eval-decoders", "eval-stage2", "eval-stage1",
)  # fmt: skip
# Minutes each part took in the from-nothing run at issue 18's code (``--jobs 2`` on the 2-core machine, one thread
# each, two when a part ran alone); with ``jobs > 1`` the ready part that heads the longest remaining chain of work
# starts first.
PART_MINUTES = {
    "data": 1.8, "encoder": 14.8, "llm": 7.4, "image-decoder": 16.0, "video-decoder": 25.0, "audio-decoder": 11.5,
    "image-decoder-refine": 7.6, "video-decoder-refine": 14.8, "audio-vocoder": 4.5, "base": 0.1, "stage1": 1.7,
    "stage2": 1.7, "stage3": 14.1, "package": 0.1, "eval-package": 14.5, "eval-decoders": 7.1, "eval-stage2": 7.9,
    "eval-stage1": 7.1,
}  # fmt: skip


@dataclass
class RecipeSettings:
    """The whole recipe's knobs. ``quick()`` runs every part for a few steps (tests, CI)."""

    seed: int = 0
    components: components.ComponentSettings | None = None
    sizes: WorldSizes | None = None
    stage_steps: dict[int, int] | None = None  # None: the shipped configs' max_steps
    eval_samples: int = 96
    eval_max_new_tokens: int = 128
    eval_decoder_settings: dict[str, Any] | None = None  # e.g. fewer denoising steps (quick runs)
    quick_run: bool = False

    def __post_init__(self):
        self.components = self.components or components.ComponentSettings(seed=self.seed)
        self.sizes = self.sizes or WorldSizes()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RecipeSettings:
        """The settings a recipe folder's ``recipe.json`` records (the inverse of ``asdict``)."""
        data = _renamed(data)
        parts = {k: tuple(v) if isinstance(v, list) else v for k, v in (data.pop("components") or {}).items()}
        steps = data.pop("stage_steps")
        return cls(
            components=components.ComponentSettings(**parts),
            sizes=WorldSizes(**(data.pop("sizes") or {})),
            stage_steps=None if steps is None else {int(k): v for k, v in steps.items()},
            **data,
        )

    @classmethod
    def quick(cls, seed: int = 0) -> RecipeSettings:
        return cls(
            seed=seed,
            components=components.ComponentSettings.quick(seed=seed),
            sizes=WorldSizes.quick(),
            stage_steps={1: 3, 2: 3, 3: 3},
            eval_samples=1,
            eval_max_new_tokens=12,
            eval_decoder_settings={"num_inference_steps": 2},
            quick_run=True,
        )


def _renamed(data: dict[str, Any]) -> dict[str, Any]:
    """Recorded settings with today's key names (recipe folders written before "stage0" became "components")."""
    data = dict(data)
    if "stage0" in data and "components" not in data:
        data["components"] = data.pop("stage0")
    return data


# What each part reads: a part whose inputs were redone since it ran is stale and runs again.
DEPENDS: dict[str, tuple[str, ...]] = {
    "data": (), "encoder": (), "llm": ("data",), "image-decoder": (), "video-decoder": ("image-decoder", "encoder"),
    "audio-decoder": ("encoder",), "image-decoder-refine": ("image-decoder",), "audio-vocoder": ("audio-decoder",),
    "video-decoder-refine": ("video-decoder",),
    # the base system names these folders as its components (toyworld_config); stage 2 reads the decoders' text
    # encoders from them for its caption targets
    "base": ("encoder", "llm", "image-decoder-refine", "video-decoder-refine", "audio-vocoder"),
    "stage1": ("base", "data"), "stage2": ("stage1", "data"), "stage3": ("stage2", "data"),
    "eval-stage1": ("stage1",), "eval-stage2": ("stage2",),
    # the package is stage 3's model with its weights in fp16: its evaluation is the figure after stage 3
    "package": ("stage3",), "eval-package": ("package",), "eval-decoders": ("package",),
}  # fmt: skip


def _stamp(out: Path, name: str) -> float | None:
    """When a part finished (None: not done)."""
    marker = out / name / PART_FILE
    if not marker.is_file():
        return None
    return json.loads(marker.read_text()).get("finished", marker.stat().st_mtime)


def _inputs(out: Path, name: str) -> dict[str, float | None]:
    return {dep: _stamp(out, dep) for dep in DEPENDS[name]}


def _part_done(out: Path, name: str) -> dict | None:
    """The part's ``part.json`` if it finished after its inputs as they are now, else None."""
    marker = out / name / PART_FILE
    if not marker.is_file():
        return None
    info = json.loads(marker.read_text())
    recorded = info.get("inputs")
    if recorded is not None and recorded != _inputs(out, name):
        logger.info("part %s: its inputs were redone since it ran; running it again", name)
        return None
    return info


def _run_part(out: Path, name: str, fn: Callable[[Path], dict[str, Any]], *, seed: int) -> dict[str, Any]:
    """Run one part into ``out/.<name>.partial`` and rename it to ``out/<name>`` when it ends."""
    done = _part_done(out, name)
    if done is not None:
        logger.info("part %s: done already (%.0f s), skipped", name, done["seconds"])
        return done
    missing = [dep for dep, stamp in _inputs(out, name).items() if stamp is None]
    if missing:
        raise ValueError(f"part {name} needs the part(s) {', '.join(missing)} done first in {out}")
    final = out / name
    tmp = out / f".{name}.partial"
    for stale in (final, tmp):  # an unfinished attempt, or a part whose inputs changed
        if stale.exists():
            shutil.rmtree(stale)
    logger.info("part %s (%d of %d): starting", name, PARTS.index(name) + 1, len(PARTS))
    torch.manual_seed(seed)
    start = time.perf_counter()
    metrics = fn(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    info = {
        "part": name,
        "seconds": round(time.perf_counter() - start, 1),
        "finished": time.time(),
        "inputs": _inputs(out, name),
        "metrics": metrics,
    }
    (tmp / PART_FILE).write_text(json.dumps(info, indent=2) + "\n")
    # the recipe's protocol, not a plain atomic write: a part runs in its ``.NAME.partial`` folder (removed when a
    # run finds it unfinished) and the rename publishes it with its part.json
    os.replace(tmp, final)
    logger.info("part %s: done in %.0f s", name, info["seconds"])
    return info


# The decoder parts a packaged model can stand in for: the folder of each under the package's ``decoders/``.
SEEDABLE = {"image-decoder-refine": "image", "video-decoder-refine": "video", "audio-vocoder": "audio"}


def seed_decoders(out: str | os.PathLike, model: str | os.PathLike) -> list[str]:
    """Take the decoders of a packaged toy-world model (``anygpt/models/toyworld`` or a package part's
    ``toyworld`` folder) as the recipe's finished decoder parts, so that a retraining of the world's language, its
    encoder and stages 1-3 keeps the decoders as they are (they are frozen in stages 1-3, and nothing they learnt
    depends on the conversations or the encoder once trained).

    Each ``out/<part>`` gets the decoder's diffusers folder and a ``part.json`` that says where it came from; such a
    part has no recorded inputs, so it is never stale (the recipe does not train the decoders again). Parts already
    done are left as they are.

    Returns:
        the parts written.
    """
    out, model = Path(out).expanduser().resolve(), Path(model).expanduser().resolve()
    written = []
    for part, folder in SEEDABLE.items():
        source = model / "decoders" / folder
        if not (source / "model_index.json").is_file():
            raise ValueError(f"{source}: no diffusers model_index.json; expected a packaged toy-world model folder")
        if (out / part / PART_FILE).is_file():
            continue
        tmp = out / f".{part}.partial"
        if tmp.exists():
            shutil.rmtree(tmp)
        shutil.copytree(source, tmp)
        info = {
            "part": part,
            "seconds": 0.0,
            "finished": time.time(),
            "seeded_from": packaged_reference(str(source)),  # packaged:toyworld/decoders/... for the shipped one
            "metrics": {"note": f"the decoder of the packaged model {model.name} (trained by an earlier recipe run)"},
        }
        (tmp / PART_FILE).write_text(json.dumps(info, indent=2) + "\n")
        os.replace(tmp, out / part)
        written.append(part)
    return written


def _check_settings(out: Path, settings: RecipeSettings) -> None:
    """A recipe folder belongs to one set of settings (``OUT/recipe.json``): a quick run's parts are never reused
    by a full run, nor one seed's by another's."""
    path = out / "recipe.json"
    mine = json.loads(json.dumps(asdict(settings)))
    if path.is_file():
        theirs = _renamed(json.loads(path.read_text()))
        if theirs != mine:
            missing = object()  # a key only one side has differs too
            differ = sorted(k for k in set(mine) | set(theirs) if mine.get(k, missing) != theirs.get(k, missing))
            raise ValueError(
                f"{out} was made by the recipe with other settings ({', '.join(differ)} differ: see {path}); "
                "use a new folder"
            )
    else:
        path.write_text(json.dumps(mine, indent=2) + "\n")


def toyworld_config(out: Path):
    """The any-to-any system over the pretrained components in ``out`` (absolute paths)."""
    decoders = {
        "image": DecoderConfig(
            kind="stable-diffusion", source=str(out / "image-decoder-refine"), num_inference_steps=20,
            guidance_scale=5.0, height=64, width=64, cond_dim=32,
        ),
        "video": DecoderConfig(
            kind="zeroscope", source=str(out / "video-decoder-refine"), num_inference_steps=20, guidance_scale=5.0,
            height=64, width=64, num_frames=8, fps=8.0, cond_dim=32,
        ),
        "audio": DecoderConfig(
            kind="audioldm", source=str(out / "audio-vocoder"), num_inference_steps=20, guidance_scale=2.5,
            audio_seconds=1.0, cond_dim=32,
        ),
    }  # fmt: skip
    return AnyGPTConfig(
        encoder=components.encoder_config(checkpoint=str(out / "encoder" / "imagebind.safetensors")),
        llm=LanguageModelConfig(
            source=str(out / "llm"),
            torch_dtype="float32",
            template="vicuna_v1",
            lora=LoraSettings(
                r=16,
                alpha=32,
                dropout=0.05,
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            ),
        ),  # fmt: skip
        decoders=decoders,
        # Four video signal tokens, not NExT-GPT's 24: a reply's next item comes after the previous item's signal
        # tokens, and across 24 of them this 4-layer LLM lost track of which item came next (the attribute after a
        # video item was right 42% of the time with 24 tokens, 86% with 8, 97.5% with 4; 179 such items).
        signal_tokens=SignalTokenConfig({"image": 4, "video": 4, "audio": 8}),
        # the best connector of benchmarks/bench_connectors.py on this world after stage 1 (captions 97%): a
        # Perceiver Resampler read through Flamingo's gated cross-attention, one marker token per item
        input_projector=ProjectorConfig("perceiver", {"num_latents": 8, "hidden_dim": 64, "depth": 2, "num_heads": 4}),
        cross_attention=CrossAttentionConfig(every=2, num_heads=4),
        output_projector=ProjectorConfig(
            "transformer",
            {"d_model": 128, "num_heads": 4, "num_encoder_layers": 2, "num_decoder_layers": 2, "dim_feedforward": 512},
        ),
        output_projector_overrides={"audio": {"num_queries": 1}},
        seed=0,
    )


def _train_stage(out: Path, stage: int, start: Path, settings: RecipeSettings) -> Callable[[Path], dict[str, Any]]:
    def run(tmp: Path) -> dict[str, Any]:
        overrides = [f"data_root={out / 'data'}", f"cache_dir={out / 'cache'}"]
        config = load_config(CONFIG_DIR / f"toyworld-stage{stage}.yaml", overrides=overrides, stage=stage)
        # Train in out/stageN.run (kept between attempts so a stopped stage resumes), then move final/ into place.
        work = out / f"stage{stage}.run"
        inputs = json.dumps(_inputs(out, f"stage{stage}"))
        if work.exists() and (not (work / "inputs.json").is_file() or (work / "inputs.json").read_text() != inputs):
            shutil.rmtree(work)  # checkpoints of a run from other inputs: start again
        work.mkdir(parents=True, exist_ok=True)
        (work / "inputs.json").write_text(inputs)
        steps = (settings.stage_steps or {}).get(stage)
        trainer = StageTrainer(config, start=str(start), output_dir=str(work), max_steps=steps, resume="auto")
        final = trainer.train()
        shutil.copytree(final, tmp / "final")
        for name in ("metrics.jsonl", "train_config.yaml"):
            if (work / name).is_file():
                shutil.copy2(work / name, tmp / name)
        shutil.rmtree(work)
        lines = [json.loads(x) for x in (tmp / "metrics.jsonl").read_text().splitlines() if x.strip()]
        logged = [x for x in lines if "loss" in x]
        return {
            "steps": logged[-1].get("step") if logged else 0,
            "loss_first": logged[0]["loss"] if logged else None,
            "loss_last": logged[-1]["loss"] if logged else None,
        }

    return run


def _evaluate(
    model_dir: Path, settings: RecipeSettings, *, decoders_alone: bool = False
) -> Callable[[Path], dict[str, Any]]:
    """The evaluator on ``model_dir`` (``decoders_alone``: each decoder from its own caption embeddings), writing
    ``report.json`` and ``report.md``."""

    def run(tmp: Path) -> dict[str, Any]:
        pipe = AnyGPTPipeline.from_pretrained(model_dir)
        report, table = evaluate.evaluate_with_table(
            pipe, decoders=decoders_alone, samples=settings.eval_samples, max_new_tokens=settings.eval_max_new_tokens,
            decoder_settings=settings.eval_decoder_settings,
        )  # fmt: skip
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (tmp / "report.md").write_text(table + "\n")
        return report

    return run


def run_recipe(
    out: str | os.PathLike,
    settings: RecipeSettings | None = None,
    *,
    only: list[str] | None = None,
    until: str | None = None,
    jobs: int = 1,
) -> dict[str, dict[str, Any]]:
    """Run the recipe's parts into ``out`` (skipping finished parts).

    Args:
        out: the recipe's folder.
        settings: sizes and steps (default: the full recipe).
        only: run just these parts (their inputs must be done).
        until: stop after this part (in the order of :data:`PARTS`).
        jobs: parts run at once. 1: one after another in this process. More: each part in its own process, a
            part starting as soon as its inputs are done (the longest remaining chain first) with its share of the
            cores (all of them when it starts alone); each writes ``out/logs/<part>.log``. Small models use two
            cores poorly, so two parts side by side finish sooner than one after another.

    Returns:
        ``part.json`` content per part run or found.
    """
    out = Path(out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    settings = settings or RecipeSettings()
    for name in only or []:
        if name not in PARTS:
            raise ValueError(f"unknown part {name!r}: expected one of {', '.join(PARTS)}")
    if until is not None and until not in PARTS:
        raise ValueError(f"unknown part {until!r}: expected one of {', '.join(PARTS)}")
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    names = [n for n in PARTS[: PARTS.index(until) + 1 if until else None] if not only or n in only]
    if not names:
        raise ValueError(f"no part is both in --only ({', '.join(only or [])}) and at or before --until ({until})")
    _check_settings(out, settings)
    results = {}
    if jobs > 1:
        cores = len(os.sched_getaffinity(0))
        run_parallel(out, names, jobs, lambda name, threads: _start_child(out, name, threads), cores=cores)
        results = {name: _part_done(out, name) for name in names}
    else:
        steps = _part_steps(out, settings)
        for name in names:
            results[name] = _run_part(out, name, steps[name], seed=settings.seed)
    _write_summary(out)
    return results


def _part_steps(out: Path, settings: RecipeSettings) -> dict[str, Callable[[Path], dict[str, Any]]]:
    """What each part runs, given the folder it writes into."""
    cs = settings.components

    def base(tmp: Path) -> dict[str, Any]:
        pipe = AnyGPTPipeline.from_config(toyworld_config(out))
        pipe.save_pretrained(tmp / "model")
        return {"parameters": {k: v for k, v in _parameter_counts(pipe).items()}}

    steps: dict[str, Callable[[Path], dict[str, Any]]] = {
        "data": lambda tmp: write_world(tmp, seed=settings.seed, sizes=settings.sizes),
        "encoder": lambda tmp: components.train_encoder(tmp, cs),
        "llm": lambda tmp: components.train_language_model(tmp, read_corpus(out / "data"), cs),
        "image-decoder": lambda tmp: components.train_image_decoder(tmp, cs),
        "video-decoder": lambda tmp: components.train_video_decoder(tmp, out / "image-decoder", cs, out / "encoder"),
        "audio-decoder": lambda tmp: components.train_audio_decoder(tmp, cs, out / "encoder"),
        "audio-vocoder": lambda tmp: components.train_vocoder(tmp, out / "audio-decoder", cs),
        "image-decoder-refine": lambda tmp: components.refine_image_decoder(tmp, out / "image-decoder", cs),
        "video-decoder-refine": lambda tmp: components.refine_video_decoder(tmp, out / "video-decoder", cs),
        "base": base,
        "stage1": _train_stage(out, 1, out / "base" / "model", settings),
        "stage2": _train_stage(out, 2, out / "stage1" / "final", settings),
        "stage3": _train_stage(out, 3, out / "stage2" / "final", settings),
        "eval-stage1": _evaluate(out / "stage1" / "final", settings),
        "eval-stage2": _evaluate(out / "stage2" / "final", settings),
        "eval-package": _evaluate(out / "package" / "toyworld", settings),
        "eval-decoders": _evaluate(out / "package" / "toyworld", settings, decoders_alone=True),
        "package": lambda tmp: package_model(
            out / "stage3" / "final", tmp / "toyworld", vocabulary_texts=components.world_captions() + [""]
        ),
    }
    return steps


def _start_child(out: Path, name: str, threads: int) -> subprocess.Popen:
    """One part in its own process (``python -m toyworld.recipe OUT PART``), its output in a log file."""
    log = out / "logs" / f"{name}.log"
    log.parent.mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    # the child starts with ALL_CORES blocked (the mask is inherited), so a signal sent before it has set its handler
    # waits for it instead of killing it (the default action)
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {ALL_CORES})
    try:
        with open(log, "w") as f:
            return subprocess.Popen(
                [sys.executable, "-m", "toyworld.recipe", str(out), name, "--threads", str(threads)],
                stdout=f, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _chain_minutes() -> dict[str, float]:
    """Per part: its minutes plus the longest chain of parts that wait on it."""
    after: dict[str, float] = {}
    for name in reversed(PARTS):
        waiting = [after[n] for n in PARTS if name in DEPENDS[n] and n in after]
        after[name] = PART_MINUTES.get(name, 1.0) + max(waiting, default=0.0)
    return after


def run_parallel(
    out: Path, names: list[str], jobs: int, start: Callable[[str, int], Any], *, cores: int, poll: float = 1.0
) -> None:
    """Run ``names`` with at most ``jobs`` at once, each as soon as its inputs are done.

    ``start(name, threads)`` launches a part and returns a handle with ``poll()``, ``wait()``, ``terminate()``,
    ``send_signal()`` and ``args`` (a ``subprocess.Popen``). A part gets its share of ``cores`` among the parts
    running once it starts: one that starts alone (nothing else ready) gets them all, since a lone part would leave
    the rest idle for its whole run (the video decoder's refinement, 29 minutes at one thread); a part that becomes
    ready later still gets its share, so the cores can be briefly oversubscribed. A part left running alone with
    nothing ready to start (the others it started beside have ended) is sent :data:`ALL_CORES` and takes every core
    from then on. A failed part stops new launches; the running ones finish (they keep their work), then the error
    names the part and its log. Finished parts are skipped as in the sequential run.
    """
    todo: list[str] = []
    for name in names:  # PARTS order: a part waiting on one that will run again is stale too
        if _part_done(out, name) is None or any(d in todo for d in DEPENDS[name]):
            todo.append(name)
    for name in todo:
        missing = [d for d in DEPENDS[name] if d not in todo and _part_done(out, d) is None]
        if missing:
            raise ValueError(f"part {name} needs the part(s) {', '.join(missing)} done first in {out}")
    rank = _chain_minutes()
    running: dict[str, tuple[Any, float]] = {}
    threads_of: dict[str, int] = {}  # each running part's threads
    failed: list[str] = []
    bar = tqdm(total=len(names), initial=len(names) - len(todo), desc="recipe", unit="part")
    previous = _raise_on_termination()
    try:
        while todo or running:
            for name, (handle, began) in list(running.items()):
                code = handle.poll()
                if code is None:
                    continue
                del running[name]
                bar.update()
                if code != 0:
                    failed.append(name)
                    logger.error("part %s failed (exit %s) after %.0f s", name, code, time.perf_counter() - began)
                else:
                    logger.info("part %s: done in %.0f s", name, time.perf_counter() - began)
            if failed:
                todo = []
            ready = [n for n in todo if all(d not in todo and d not in running for d in DEPENDS[n])]
            launch = sorted(ready, key=lambda n: -rank[n])[: jobs - len(running)]
            threads = max(1, cores // (len(running) + len(launch))) if launch else 0
            for name in launch:
                todo.remove(name)
                running[name] = (start(name, threads), time.perf_counter())
                threads_of[name] = threads
                logger.info("part %s: started with %d thread(s) (%s running)", name, threads, ", ".join(running))
            if len(running) == 1:  # with jobs > 1: nothing else is ready to start beside it
                (name,) = running
                if threads_of[name] < cores:
                    running[name][0].send_signal(ALL_CORES)
                    logger.info("part %s: running alone, now with %d thread(s)", name, cores)
                threads_of[name] = cores
            if bar.postfix != ", ".join(running):
                bar.set_postfix_str(", ".join(running))
            if running:
                time.sleep(poll)
    except BaseException:  # interrupted (Ctrl-C, SIGTERM, SIGHUP): stop the parts; they resume on the next run
        for handle, _ in running.values():
            handle.terminate()
        for handle, _ in running.values():
            try:
                handle.wait(timeout=30)
            except subprocess.TimeoutExpired:
                handle.kill()
        raise
    finally:
        bar.close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if failed:
        logs = ", ".join(str(out / "logs" / f"{n}.log") for n in failed)
        raise RuntimeError(f"recipe part(s) {', '.join(failed)} failed: see {logs}")
    unfinished = [n for n in names if _part_done(out, n) is None]
    if unfinished:
        raise RuntimeError(f"recipe part(s) {', '.join(unfinished)} ended without finishing (no {PART_FILE})")


def _raise_on_termination() -> dict[int, Any]:
    """Turn SIGTERM and SIGHUP into ``SystemExit`` (so the running parts are stopped, never orphaned); returns the
    handlers to restore. Only the main thread can set handlers: elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    return {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGHUP)}


def _child_main(argv: list[str] | None = None) -> None:
    """Run one part with the settings recorded in ``OUT/recipe.json`` (how :func:`run_recipe` starts each job)."""
    parser = argparse.ArgumentParser(prog="python -m toyworld.recipe")
    parser.add_argument("out")
    parser.add_argument("part", choices=PARTS)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    signal.signal(ALL_CORES, _use_all_cores)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {ALL_CORES})  # blocked by the parent until now (``_start_child``)
    try:
        out = Path(args.out).resolve()
        settings = RecipeSettings.from_dict(json.loads((out / "recipe.json").read_text()))
        _check_settings(out, settings)
        _run_part(out, args.part, _part_steps(out, settings)[args.part], seed=settings.seed)  # parent writes summary
    finally:
        # ignored from here on: Python's shutdown puts a handled signal back to its default action (ending the
        # process), so one that came as this part exits would turn its finished work into a failure (exit -10)
        signal.signal(ALL_CORES, signal.SIG_IGN)


def _use_all_cores(signum: int, frame: Any) -> None:
    """The parent's word that this part now runs alone. Python runs it on the main thread between two steps, where
    the thread count of the next parallel region may change."""
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(cores)
    logger.info("running alone: now with %d thread(s)", cores)


def _parameter_counts(pipe) -> dict[str, int]:
    model = pipe.model
    counts = {
        "encoder": sum(p.numel() for p in model.encoder.parameters()),
        "llm": sum(p.numel() for p in model.language_model.parameters()),
        "input_projectors": sum(p.numel() for p in model.input_projectors.parameters()),
        "output_projectors": sum(p.numel() for p in model.output_projectors.parameters()),
    }
    return counts


def _write_summary(out: Path) -> None:
    """``OUT/summary.json`` and ``summary.md``: every finished part's time, and the evaluation after each stage."""
    parts = {name: _part_done(out, name) for name in PARTS}
    done = {k: v for k, v in parts.items() if v is not None}
    lines = ["| part | minutes |", "|---|---:|"]
    lines += [f"| {k} | {v['seconds'] / 60:.1f} |" for k, v in done.items()]
    lines.append(f"| **total** (the parts' own minutes) | **{sum(v['seconds'] for v in done.values()) / 60:.1f}** |")
    spans = [(v["finished"] - v["seconds"], v["finished"]) for v in done.values() if "finished" in v]
    if spans:  # parts run side by side (--jobs) or resumed later: the clock from the first start to the last end
        wall = max(end for _, end in spans) - min(begin for begin, _ in spans)
        lines.append(f"| wall clock, first part's start to last part's end | {wall / 60:.1f} |")
    evals = {k: v["metrics"] for k, v in done.items() if k.startswith("eval-") and k != "eval-decoders"}
    if evals:
        lines += [
            "",
            "| metric | target | "
            + " | ".join(
                "after stage3 = shipped (fp16)" if k == "eval-package" else k.replace("eval-", "after ") for k in evals
            )
            + " |",
        ]
        lines.append("|---|---:|" + "---:|" * len(evals))
        for metric, target in evaluate.TARGETS.items():
            values = [r.get("metrics", {}).get(metric, {}).get("value") for r in evals.values()]
            row = ["-" if v is None else f"{100 * v:.1f}" for v in values]
            lines.append(f"| {metric} | {100 * target:.0f} | " + " | ".join(row) + " |")
    if "eval-decoders" in done:
        lines += ["", evaluate.format_decoder_report(done["eval-decoders"]["metrics"])]
    write_text_atomic(out / "summary.md", "\n".join(lines) + "\n")  # a reader never sees half a summary
    write_text_atomic(out / "summary.json", json.dumps(done, indent=2) + "\n")


def install_package(out: str | os.PathLike) -> Path:
    """Copy the recipe's packaged model into the anygpt package (``anygpt/models/toyworld``), replacing it (its
    model card, ``README.md``, is kept: the card is written by hand), with the package's evaluation report as
    ``evaluation.json`` when the recipe has one (``OUT/eval-package/report.json``)."""
    src = Path(out) / "package" / "toyworld"
    if _part_done(Path(out), "package") is None:
        raise FileNotFoundError(f"{src}: the recipe's package part has not finished")
    dst = Path(anygpt.__file__).resolve().parent / PACKAGED_MODELS["toyworld"]
    card = dst / "README.md"
    report = Path(out) / "eval-package" / "report.json"  # the package's evaluation, when the recipe ran it
    with atomic_directory(dst) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        for name in ("summary.md", "summary.json"):
            shutil.copy2(Path(out) / name, tmp / name)
        if card.is_file():
            shutil.copy2(card, tmp / "README.md")
        if report.is_file():
            shutil.copy2(report, tmp / "evaluation.json")
    return dst


if __name__ == "__main__":
    _child_main()
