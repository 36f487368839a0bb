"""Adversarial probe of issue 22's hardening: builds a corpus of bad inputs per category, runs every case and counts
the cases that held (a clear one-line error, or a correct result; nothing half-written) and those that failed (a
traceback, a crash, a hang past the timeout, a wrong result, half-written or left-over files); then kills ``anygpt
generate`` and ``anygpt train`` at random points (the soak) and checks what they leave and that resumed training ends
bit-identical to an uninterrupted run.

    python benchmarks/probe_hardening.py [--quick] [--soak N] [--seed S] [--timeout S] [--json FILE]

Categories (the probe's): ``generate`` (numbers without bounds, prompts that are not UTF-8 or are very long, bad and
huge media), damaged model folders (weight files, JSON files, index values), training (bad config values, damaged
checkpoints; signals are the soak), the Python API (every request field with exotic values; two threads on one
pipeline), the config loaders (seeded random mutations of a stage YAML and of a model index) and the prompt
tokenizer. The demo and the batch reader are probed elsewhere. The cases run in this process on the tiny model (one
pipeline, reused as the tests' ``use_tiny`` fixture does), each under a timeout; the soak runs ``python -m anygpt``
subprocesses. One thread is enough (``OMP_NUM_THREADS=1``).

``tests/test_soak.py`` runs :func:`soak_generate` and :func:`soak_train` with small N; the benchmark imports no test.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import logging
import math
import os
import random
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TEMPORARY_MARKER = ".anygpt-tmp-"  # anygpt.base.utils.TEMPORARY_MARKER (kept here: --help imports nothing heavy)


# ====================================================================================================== outcomes
@dataclass
class Outcome:
    """One case's result: held (a clear error or a correct result, nothing half-written) or failed, and why."""

    category: str
    name: str
    held: bool
    detail: str = ""
    seconds: float = 0.0


class CaseTimeout(BaseException):
    """Raised in the main thread when a case runs past its timeout (a hang)."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise :class:`CaseTimeout` in the main thread after ``seconds`` (SIGALRM)."""

    def expire(signum, frame):
        raise CaseTimeout()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_case(category: str, name: str, body: Callable[[], tuple[bool, str]], timeout: float) -> Outcome:
    """Run one case: ``body`` returns ``(held, detail)``; an exception escaping it, or the timeout, is a failure."""
    start = time.perf_counter()
    try:
        with time_limit(timeout):
            held, detail = body()
    except CaseTimeout:
        held, detail = False, f"hang: still running after {timeout:g} s"
    except Exception as err:  # noqa: BLE001 - a case's escaping exception is what the probe counts
        held, detail = False, f"{type(err).__name__} escaped: {_first_line(str(err))}"
    return Outcome(category, name, held, detail, round(time.perf_counter() - start, 3))


def _first_line(text: str, limit: int = 200) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[:limit] + "..."


# ====================================================================================================== files
def is_temporary(name: str) -> bool:
    """A name a writer uses before its rename: ``atomic_file`` / ``atomic_directory``'s and the trainer's."""
    return TEMPORARY_MARKER in name or bool(re.fullmatch(r"\.(checkpoint-\d+\.(tmp|old|pruned)|final\.old-\d+)", name))


def temporaries(folder: Path) -> list[str]:
    """The temporaries in ``folder`` (not its subfolders)."""
    return sorted(p.name for p in folder.iterdir() if is_temporary(p.name)) if folder.is_dir() else []


def read_output(path: Path) -> Any:
    """The decoded content of a finished output file; raises when the file is not whole."""
    from anygpt.base.media import load_audio, load_image, load_video

    if path.suffix == ".png":
        return np.asarray(load_image(path))
    if path.suffix == ".wav":
        return load_audio(path).waveform
    if path.suffix == ".mp4":
        return load_video(path).frames
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    return path.read_bytes()


def unreadable_outputs(folder: Path) -> list[str]:
    """``name: why`` for each file under a final name in ``folder`` that does not read back whole."""
    bad = []
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if path.name.startswith(".") or not path.is_file():
            continue
        try:
            read_output(path)
        except Exception as err:  # noqa: BLE001 - any failure to read is a half-written file
            bad.append(f"{path.name}: {type(err).__name__}: {_first_line(str(err), 120)}")
    return bad


def same_content(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.shape == b.shape and np.array_equal(a, b)
    return a == b


# ====================================================================================================== subprocesses
def child_env() -> dict[str, str]:
    """The environment of an ``anygpt`` subprocess: one thread, no network, this checkout first on the path."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": path}


def spawn(args: list[str], logs: Path) -> subprocess.Popen:
    """``python -m anygpt ARGS`` with its output in ``logs.out`` / ``logs.err`` (files: a pipe could fill)."""
    logs.parent.mkdir(parents=True, exist_ok=True)
    with open(logs.with_suffix(".out"), "w") as out, open(logs.with_suffix(".err"), "w") as err:
        return subprocess.Popen([sys.executable, "-m", "anygpt", *args], cwd=REPO, env=child_env(), stdout=out,
                                stderr=err)  # fmt: skip


def run_to_end(args: list[str], logs: Path, timeout: float = 900) -> tuple[int, float, str]:
    """Run ``python -m anygpt ARGS`` to its end: (exit status, seconds, stderr)."""
    start = time.monotonic()
    process = spawn(args, logs)
    try:
        code = process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return code, time.monotonic() - start, logs.with_suffix(".err").read_text(errors="replace")


def wait_then_signal(
    process: subprocess.Popen, sig: int, ready: Callable[[], bool], extra: float, deadline: float = 600
) -> float | None:
    """Wait until ``ready()`` (polled every 2 ms) or the process ends, then ``extra`` seconds, then send ``sig``.
    Returns the seconds from the call to the signal, or None when the process ended first."""
    start = time.monotonic()
    while process.poll() is None and not ready():
        if time.monotonic() - start > deadline:
            break
        time.sleep(0.002)
    end = time.monotonic() + extra
    while process.poll() is None and time.monotonic() < end:
        time.sleep(0.002)
    if process.poll() is not None:
        return None
    process.send_signal(sig)
    return time.monotonic() - start


@dataclass
class Kill:
    """One killed run of the soak."""

    index: int
    signal: str
    plan: str
    sent_after_s: float | None  # None: the run ended before the kill point
    exit_code: int
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class SoakReport:
    """What a soak found: every kill, and the runs that finished the work after them."""

    command: str
    kills: list[Kill] = field(default_factory=list)
    final_problems: list[str] = field(default_factory=list)
    resumes_compared: int = 0
    resumes_identical: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def held(self) -> int:
        return sum(not k.problems for k in self.kills)

    @property
    def ok(self) -> bool:
        return all(not k.problems for k in self.kills) and not self.final_problems

    def summary(self) -> dict:
        return {
            "command": self.command,
            "kills": len(self.kills),
            "held": self.held,
            "failed": len(self.kills) - self.held,
            "by_signal": {s: sum(k.signal == s for k in self.kills) for s in ("SIGKILL", "SIGTERM")},
            "ended_before_the_kill": sum(k.sent_after_s is None for k in self.kills),
            "resumes_compared": self.resumes_compared,
            "resumes_identical": self.resumes_identical,
            "final_problems": self.final_problems,
            "problems": [f"kill {k.index} ({k.signal}, {k.plan}): {p}" for k in self.kills for p in k.problems],
            "notes": self.notes + [f"kill {k.index}: {n}" for k in self.kills for n in k.notes],
        }


def _expected_codes(sig: int) -> set[int]:
    # SIGKILL: -9 (or 0: done first). SIGTERM: 143 once the command's handler is in place, -15 before it (during
    # Python's start-up nothing is written yet), 0 when done first.
    return {0, -signal.SIGKILL} if sig == signal.SIGKILL else {0, 128 + signal.SIGTERM, -signal.SIGTERM}


def _signal_plan(first: int, index: int) -> int:
    """Both signals in every soak of two kills or more: alternated, starting with ``first`` (drawn once)."""
    return first if index % 2 == 0 else ({signal.SIGKILL, signal.SIGTERM} - {first}).pop()


# ---------------------------------------------------------------------------------------------- soak: generate
GENERATE_ARGS = ["generate", "a red circle", "--model", "tiny", "--modalities", "image,video,audio", "--steps", "2",
                 "--max-new-tokens", "4", "--seed", "0"]  # fmt: skip


def _stems(folder: Path) -> dict[str, set[str]]:
    stems: dict[str, set[str]] = {}
    for path in folder.iterdir() if folder.is_dir() else []:
        match = re.fullmatch(r"(gen-\d+)_(image|video|audio)\d+\.\w+", path.name)
        if match:
            stems.setdefault(match.group(1), set()).add(match.group(2))
    return stems


def soak_generate(n: int, seed: int, work: Path, log: Callable[[str], None] = print) -> SoakReport:
    """Kill ``anygpt generate`` (tiny, image + video + audio) ``n`` times at random points into one ``--out``, then
    run it to the end there.

    Checked after each kill: the exit status is a documented one; every file under a final name reads back whole;
    SIGTERM leaves no temporary and no partial set of a result's files; a run that finished wrote what an
    uninterrupted run writes. After the last run: no temporary is left (the killed writers' are swept) and its files
    equal the uninterrupted run's. A SIGKILL between two files of one result leaves the files written before it
    (each whole): counted in the notes.
    """
    report = SoakReport("anygpt generate")
    rng = random.Random(seed)
    first = rng.choice((signal.SIGKILL, signal.SIGTERM))
    out, base = work / "out", work / "baseline"
    code, took, err = run_to_end([*GENERATE_ARGS, "--out", str(base)], work / "logs" / "baseline")
    if code != 0:
        report.final_problems.append(f"the uninterrupted run failed (exit {code}): {_first_line(err[-2000:])}")
        return report
    reference = {p.suffix: read_output(p) for p in base.iterdir() if not p.name.startswith(".")}
    log(f"generate: uninterrupted run {took:.1f} s, files {sorted(reference)}")
    partial_sets = 0
    for index in range(n):
        sig = _signal_plan(first, index)
        plan = rng.choice(("timed", "at-write"))
        before = {p.name for p in out.iterdir()} if out.is_dir() else set()
        extra = rng.uniform(0.05, took) if plan == "timed" else rng.uniform(0.0, 0.2)
        process = spawn([*GENERATE_ARGS, "--out", str(out)], work / "logs" / f"kill-{index}")

        def written(before=before) -> bool:  # a first new entry (a temporary, or a file) in --out
            return out.is_dir() and bool({p.name for p in out.iterdir()} - before)

        sent = wait_then_signal(process, sig, (lambda: True) if plan == "timed" else written, extra)
        code = process.wait(timeout=300)
        kill = Kill(index, signal.Signals(sig).name, plan, None if sent is None else round(sent, 3), code)
        err = (work / "logs" / f"kill-{index}.err").read_text(errors="replace")
        if code not in _expected_codes(sig):
            kill.problems.append(f"exit {code}, expected one of {sorted(_expected_codes(sig))}")
        if "Traceback" in err:
            kill.problems.append(f"a traceback: {_first_line(err[err.index('Traceback') :][-300:])}")
        kill.problems += [f"half-written: {bad}" for bad in unreadable_outputs(out)]
        mine = [name for name in temporaries(out) if f"{TEMPORARY_MARKER}{process.pid}-" in name]
        if sig == signal.SIGTERM and mine:
            kill.problems.append(f"SIGTERM left temporaries {mine}")
        new = {stem: kinds for stem, kinds in _stems(out).items() if not any(n.startswith(stem) for n in before)}
        for stem, kinds in new.items():
            if len(kinds) < 3:
                if sig == signal.SIGTERM:
                    kill.problems.append(f"SIGTERM left a partial result {stem}: {sorted(kinds)}")
                else:
                    partial_sets += 1
                    kill.notes.append(f"SIGKILL between two files of {stem}: {sorted(kinds)} kept (each whole)")
        if code == 0:
            kill.problems += _compare_generated(out, before, reference)
        if mine and sig == signal.SIGKILL:
            kill.notes.append(f"left {len(mine)} temporary file(s) for the next run to sweep")
        report.kills.append(kill)
        log(f"generate kill {index}: {kill.signal} {plan} after {kill.sent_after_s} s -> exit {code}"
            f"{'; ' + '; '.join(kill.problems) if kill.problems else ''}")  # fmt: skip
    before = {p.name for p in out.iterdir()} if out.is_dir() else set()
    code, _, err = run_to_end([*GENERATE_ARGS, "--out", str(out)], work / "logs" / "final")
    if code != 0:
        report.final_problems.append(f"the run after the kills failed (exit {code}): {_first_line(err[-2000:])}")
    report.final_problems += [f"left after the last run: {name}" for name in temporaries(out)]
    report.final_problems += [f"half-written: {bad}" for bad in unreadable_outputs(out)]
    if code == 0:
        report.final_problems += _compare_generated(out, before, reference)
    if partial_sets:
        report.notes.append(f"{partial_sets} SIGKILL(s) fell between two files of one result")
    return report


def _compare_generated(out: Path, before: set[str], reference: dict[str, Any]) -> list[str]:
    new = [p for p in out.iterdir() if p.name not in before and not p.name.startswith(".")]
    suffixes = sorted(p.suffix for p in new)
    if suffixes != sorted(reference):
        return [f"a finished run wrote {sorted(p.name for p in new)}, expected one file of each of {sorted(reference)}"]
    return [f"{p.name} differs from the uninterrupted run's" for p in new if not same_content(read_output(p),
            reference[p.suffix])]  # fmt: skip


# ---------------------------------------------------------------------------------------------- soak: train
TRAIN_SETS = {"cache_dir": "null", "train.save_every": 2, "train.keep_checkpoints": 2}


def train_args(sample: Path, out: Path, steps: int) -> list[str]:
    args = ["train", "--stage", "1", "--config", str(sample / "stage1.yaml"), "--output-dir", str(out)]
    return [*args, "--max-steps", str(steps), "--resume", "auto", *[f"--set={k}={v}" for k, v in TRAIN_SETS.items()]]


def checkpoint_problems(folder: Path) -> list[str]:
    """Why a checkpoint folder under its final name is not whole (every file present and readable)."""
    import torch
    from safetensors.torch import load_file

    problems = []
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
        if state.get("step") != int(folder.name.rsplit("-", 1)[-1]):
            problems.append(f"{folder.name}/trainer_state.json: step {state.get('step')!r}")
    except (OSError, ValueError) as err:
        problems.append(f"{folder.name}/trainer_state.json: {_first_line(str(err), 120)}")
    for name in ("trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng-0.pt"):
        try:
            if name.endswith(".safetensors"):
                load_file(folder / name)
            else:
                torch.load(folder / name, weights_only=True)
        except Exception as err:  # noqa: BLE001 - any failure to read is a damaged checkpoint
            problems.append(f"{folder.name}/{name}: {type(err).__name__}: {_first_line(str(err), 120)}")
    return problems


def final_problems(folder: Path) -> list[str]:
    """Why a ``final/`` model folder is not whole (its index reads and every weight file loads)."""
    from safetensors.torch import load_file

    from anygpt.core.index import read_index

    try:
        read_index(folder)
        for path in folder.rglob("*.safetensors"):
            load_file(path)
    except Exception as err:  # noqa: BLE001 - any failure to read is a damaged model folder
        return [f"final/: {type(err).__name__}: {_first_line(str(err), 160)}"]
    return []


def run_folder_problems(out: Path) -> tuple[list[str], list[str]]:
    """(problems, notes) of a training run's folder after a kill: whole checkpoints, a whole ``final/``, a readable
    ``train_config.yaml``; a last ``metrics.jsonl`` line cut by the kill is a note (the resume drops it)."""
    import yaml

    from training.checkpoint import list_checkpoints

    problems: list[str] = []
    notes: list[str] = []
    for folder in list_checkpoints(out):
        problems += checkpoint_problems(folder)
    if (out / "final").exists():
        problems += final_problems(out / "final")
    if (out / "train_config.yaml").exists():
        try:
            if not isinstance(yaml.safe_load((out / "train_config.yaml").read_text()), dict):
                problems.append("train_config.yaml: not a mapping (half-written)")
        except (yaml.YAMLError, ValueError) as err:
            problems.append(f"train_config.yaml: half-written ({_first_line(str(err), 80)})")
    metrics = out / "metrics.jsonl"
    if metrics.exists():
        for number, line in enumerate(metrics.read_text().splitlines(), 1):
            try:
                json.loads(line)
            except ValueError:
                notes.append(f"metrics.jsonl line {number} cut by the kill (dropped on resume)")
    return problems, notes


def same_final(a: Path, b: Path) -> list[str]:
    """Differences between two ``final/`` folders' weights (bitwise)."""
    import torch
    from safetensors.torch import load_file

    files = sorted(p.relative_to(a) for p in a.rglob("*.safetensors"))
    if not files or files != sorted(p.relative_to(b) for p in b.rglob("*.safetensors")):
        return [f"final/ weight files differ: {[str(f) for f in files]}"]
    problems = []
    for rel in files:
        x, y = load_file(a / rel), load_file(b / rel)
        if x.keys() != y.keys() or not all(torch.equal(x[k], y[k]) for k in x):
            problems.append(f"final/{rel} differs from the uninterrupted run's")
    return problems


def losses(out: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows]


def soak_train(
    n: int, seed: int, work: Path, steps: int = 8, per_round: int = 3, log: Callable[[str], None] = print
) -> SoakReport:
    """Kill ``anygpt train --resume auto`` (tiny, stage 1, ``steps`` steps, a checkpoint every 2) ``n`` times at
    random points (a time, a step, the final save), ``per_round`` kills into one folder, then run it to the end
    there and compare with an uninterrupted run.

    Checked after each kill: a documented exit status, no traceback, whole checkpoints, ``final/`` and
    ``train_config.yaml`` (when present), and after SIGTERM no temporary. After each round: the run to the end
    exits 0, leaves no temporary, and its ``final/`` weights and its losses equal the uninterrupted run's, bit for
    bit.
    """
    from toyworld.sample_configs import write_sample

    report = SoakReport("anygpt train --resume auto")
    rng = random.Random(seed)
    first = rng.choice((signal.SIGKILL, signal.SIGTERM))
    sample = write_sample(work / "data", size=8)
    straight = work / "straight"
    code, took, err = run_to_end(train_args(sample, straight, steps), work / "logs" / "straight")
    if code != 0:
        report.final_problems.append(f"the uninterrupted run failed (exit {code}): {_first_line(err[-2000:])}")
        return report
    log(f"train: uninterrupted run {took:.1f} s")
    index = 0
    for round_ in range(math.ceil(n / per_round)):
        out = work / f"round-{round_}"
        for _ in range(min(per_round, n - index)):
            sig = _signal_plan(first, index)
            plan = rng.choice(("timed", "at-step", "at-final"))
            start = time.time()
            if plan == "timed":
                ready, extra = (lambda: True), rng.uniform(0.05, took)
            elif plan == "at-step":
                ready, extra = _metrics_reach(out / "metrics.jsonl", rng.randint(1, steps), start), rng.uniform(0, 0.3)
            else:
                ready, extra = _final_started(out, start), rng.uniform(0, 0.05)
            process = spawn(train_args(sample, out, steps), work / "logs" / f"round-{round_}-kill-{index}")
            sent = wait_then_signal(process, sig, ready, extra)
            code = process.wait(timeout=300)
            kill = Kill(index, signal.Signals(sig).name, plan, None if sent is None else round(sent, 3), code)
            err = (work / "logs" / f"round-{round_}-kill-{index}.err").read_text(errors="replace")
            if code not in _expected_codes(sig):
                kill.problems.append(f"exit {code}, expected one of {sorted(_expected_codes(sig))}")
            if "Traceback" in err:
                kill.problems.append(f"a traceback: {_first_line(err[err.index('Traceback') :][-300:])}")
            if code == 128 + signal.SIGTERM and "anygpt: terminated (SIGTERM)" not in err:
                kill.problems.append("exit 143 without the 'terminated (SIGTERM)' line")
            problems, notes = run_folder_problems(out)
            kill.problems += problems
            kill.notes += notes
            if sig == signal.SIGTERM and code != 0 and temporaries(out):
                kill.problems.append(f"SIGTERM left temporaries {temporaries(out)}")
            if sig == signal.SIGKILL and temporaries(out):
                kill.notes.append(f"left {temporaries(out)} for the next run to sweep")
            report.kills.append(kill)
            log(f"train kill {index}: {kill.signal} {plan} after {kill.sent_after_s} s -> exit {code}"
                f"{'; ' + '; '.join(kill.problems) if kill.problems else ''}")  # fmt: skip
            index += 1
        code, _, err = run_to_end(train_args(sample, out, steps), work / "logs" / f"round-{round_}-final")
        report.resumes_compared += 1
        problems = [] if code == 0 else [f"round {round_}: the run to the end failed (exit {code}): "
                                         f"{_first_line(err[-2000:])}"]  # fmt: skip
        if code == 0:
            problems += [f"round {round_}: {p}" for p in same_final(out / "final", straight / "final")]
            if losses(out) != losses(straight):
                problems.append(f"round {round_}: losses differ from the uninterrupted run's")
            problems += [f"round {round_}: left {name}" for name in temporaries(out)]
            problems += [f"round {round_}: {p}" for p in run_folder_problems(out)[0]]
        report.resumes_identical += not problems
        report.final_problems += problems
    return report


def _metrics_reach(path: Path, step: int, since: float) -> Callable[[], bool]:
    """Ready once this run has logged a step >= ``step`` (or any step past a resume beyond it)."""

    def ready() -> bool:
        try:
            if path.stat().st_mtime < since:
                return False
            lines = path.read_text().splitlines()
            return bool(lines) and json.loads(lines[-1]).get("step", 0) >= step
        except (OSError, ValueError):
            return False

    return ready


def _final_started(out: Path, since: float) -> Callable[[], bool]:
    """Ready once this run has started writing ``final/`` (its temporary folder appears)."""

    def ready() -> bool:
        try:
            return any(p.name.startswith(".final.") and p.stat().st_mtime >= since for p in out.iterdir())
        except OSError:
            return False

    return ready


# ====================================================================================================== the corpus
class Probe:
    """Builds the corpus under ``work`` and runs it; ``outcomes`` collects every case."""

    def __init__(self, work: Path, *, quick: bool, seed: int, timeout: float):
        self.work, self.quick, self.seed, self.timeout = work, quick, seed, timeout
        self.outcomes: list[Outcome] = []
        self._pipe = None

    # ------------------------------------------------------------------ plumbing
    def case(self, category: str, name: str, body: Callable[[], tuple[bool, str]], timeout: float | None = None):
        outcome = run_case(category, name, body, timeout or self.timeout)
        self.outcomes.append(outcome)
        if not outcome.held:
            logging.getLogger("probe").warning("FAILED %s / %s: %s", category, name, outcome.detail)

    @property
    def pipe(self):
        if self._pipe is None:
            from anygpt.core.pipeline import AnyGPTPipeline

            self._pipe = AnyGPTPipeline.from_pretrained("tiny")
        return self._pipe

    @contextlib.contextmanager
    def tiny_reused(self):
        """``anygpt generate --model tiny`` gets this probe's one tiny pipeline (as the tests' ``use_tiny``)."""
        from anygpt.apps import generate as generate_command

        real = generate_command.load_pipeline
        pipe = self.pipe
        generate_command.load_pipeline = lambda model, runtime=None: (
            pipe if model == "tiny" and runtime is None else real(model, runtime)
        )
        try:
            yield
        finally:
            generate_command.load_pipeline = real

    def cli(self, argv: list[str], out: Path | None, expect: str) -> tuple[bool, str]:
        """Run ``anygpt ARGV`` in this process; held: exit 0 with whole outputs (unless ``expect`` is "error"), or
        exit 1/2 with one ``anygpt: ...`` line and no traceback (unless ``expect`` is "ok"); never a left-over
        temporary or a half-written file in ``out``."""
        from anygpt.cli import main

        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                code = main(argv)
            except SystemExit as exit_:  # argparse's usage errors
                code = exit_.code if isinstance(exit_.code, int) else 2
        err = stderr.getvalue()
        problems = []
        if out is not None:
            problems += [f"left {name}" for name in temporaries(out)]
            problems += [f"half-written {bad}" for bad in unreadable_outputs(out)]
        last = err.strip().splitlines()[-1] if err.strip() else ""
        if "Traceback" in err:
            problems.append("a traceback on stderr")
        if code == 0:
            if expect == "error":
                problems.append("accepted; expected a clear refusal")
            return not problems, "; ".join(problems) or f"ok: {_first_line(stdout.getvalue(), 100)}"
        if code not in (1, 2) or not last.startswith("anygpt"):
            problems.append(f"exit {code}, last line {last!r:.200}")
        elif expect == "ok":
            problems.append(f"refused a valid call: {last:.200}")
        return not problems, "; ".join(problems) or last[:200]

    # ------------------------------------------------------------------ generate: numbers
    def generate_numbers(self) -> None:
        out = self.work / "gen-numbers"
        base = ["generate", "x", "--model", "tiny", "--out", str(out), "--max-new-tokens", "2", "--steps", "1",
                "--modalities", "image"]  # fmt: skip
        refused = [
            ["--seed", "-1"], ["--seed", str(2**64)], ["--seed", str(10**400)], ["--steps", "0"],
            ["--steps", str(10**12)], ["--height", "4"], ["--height", "4104"], ["--width", "7"], ["--height", "-8"],
            ["--width", str(2**70)], ["--frames", "0"], ["--frames", str(10**9)], ["--audio-seconds", "nan"],
            ["--audio-seconds", "inf"], ["--audio-seconds", "-1"], ["--audio-seconds", "1e7"],
            ["--audio-seconds", "0"], ["--temperature", "nan"], ["--temperature", "-1"], ["--temperature", "1e-300"],
            ["--temperature", "1e300"], ["--temperature", "-inf"], ["--top-p", "0"], ["--top-p", "1.5"],
            ["--top-p", "nan"], ["--top-p", "-0.0"], ["--guidance", "-inf"], ["--guidance", "1e9"],
            ["--guidance", "nan"], ["--max-new-tokens", "0"], ["--max-new-tokens", "1000000"],
            ["--max-new-tokens", "2048"], ["--max-new-tokens", str(10**30)], ["--modalities", "picture"],
            ["--modalities", "image,,smell"], ["--adapters", "text"],
        ]  # fmt: skip
        accepted = [
            ["--height", "8", "--width", "8"], ["--height", "16", "--width", "40"], ["--guidance", "0"],
            ["--guidance", "100"], ["--temperature", "100", "--top-p", "1e-9"], ["--temperature", "0.001"],
            ["--seed", str(2**63 - 1)], ["--max-new-tokens", "1"], ["--modalities", "video", "--frames", "1"],
            ["--modalities", "audio", "--audio-seconds", "0.05"], ["--modalities", "text"],
        ]  # fmt: skip
        if self.quick:
            refused, accepted = refused[::3], accepted[::3]
        # "--option=value": a value starting with "-" is the option's value, not another option
        refused = [[f"{option}={value}" for option, value in zip(e[::2], e[1::2], strict=True)] for e in refused]
        with self.tiny_reused():
            for extra in refused:
                self.case("generate: numbers", " ".join(extra), lambda e=extra: self.cli([*base, *e], out, "error"))
            for extra in accepted:
                self.case("generate: numbers", " ".join(extra), lambda e=extra: self.cli([*base, *e], out, "ok"))

    # ------------------------------------------------------------------ generate: prompts
    def generate_prompts(self) -> None:
        out = self.work / "gen-prompts"
        context = 2048  # the tiny LLM's max_position_embeddings
        prompts = {
            "not UTF-8 (a shell's surrogate escape)": ("caf\udce9", "error"),
            "only a surrogate": ("\udcff", "error"),
            "a high surrogate": ("\ud800x", "error"),
            "empty": ("", "either"),
            "NUL and escape codes": ("\x00\x01\x1b[31mred\x1b[0m\x7f", "ok"),
            "right-to-left override and zero-width": ("\u202eabc\u200b\u200d\ufeff", "ok"),
            "template and special tokens as text": ("USER: <image> [IMG0] </s><s> ASSISTANT:", "ok"),
            "combining marks": ("e\u0301" * 300, "ok"),
            "emoji": ("\U0001f600" * 100, "ok"),
            "line and paragraph separators": ("a\u2028b\u2029c\r\n\x0b\x0c", "ok"),
            "lone BOM": ("\ufeff", "ok"),
            f"longer than the context ({context + 1000} bytes)": ("a" * (context + 1000), "error"),
            f"4-byte characters past the context ({context} characters)": ("\U0001f600" * context, "error"),
        }
        if self.quick:
            prompts = dict(list(prompts.items())[::2])
        base = ["generate", "--model", "tiny", "--out", str(out), "--max-new-tokens", "2", "--modalities", "text"]
        with self.tiny_reused():
            for name, (prompt, expect) in prompts.items():
                self.case("generate: prompts", name, lambda p=prompt, e=expect: self.cli([*base, p], out, e))

    # ------------------------------------------------------------------ generate: media
    def media_corpus(self) -> dict[str, tuple[str, Path, str]]:
        """``name: (option, path, expect)``: bad, huge and odd media files, and a few good ones."""
        import soundfile as sf
        from PIL import Image

        from anygpt.base.media import Audio as AudioObject
        from anygpt.base.media import save_audio, save_video

        folder = self.work / "media"
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(self.seed)
        files: dict[str, tuple[str, Path, str]] = {}

        def add(name: str, option: str, filename: str, expect: str, write: Callable[[Path], Any]) -> None:
            path = folder / filename
            write(path)
            files[name] = (option, path, expect)

        good_png = folder / "good.png"
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(good_png)
        t = np.arange(16000, dtype=np.float32) / 16000
        sine = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
        good_wav = save_audio(AudioObject(sine, 16000), folder / "good.wav")
        good_mp4 = save_video(np.zeros((8, 32, 32, 3), np.uint8), folder / "good.mp4", fps=8.0)
        files["a small PNG"] = ("--image", good_png, "ok")
        files["a small WAV"] = ("--audio", good_wav, "ok")
        files["a small MP4"] = ("--video", good_mp4, "ok")
        add("missing file", "--image", "missing.png", "error", lambda p: None)
        add("a folder", "--image", "folder.png", "error", lambda p: p.mkdir(exist_ok=True))
        add("empty PNG", "--image", "empty.png", "error", lambda p: p.write_bytes(b""))
        add("truncated PNG", "--image", "cut.png", "error", lambda p: p.write_bytes(good_png.read_bytes()[:200]))
        add("random bytes as PNG", "--image", "noise.png", "error", lambda p: p.write_bytes(rng.bytes(4096)))
        add("text as WAV", "--audio", "text.wav", "error", lambda p: p.write_text("RIFF? no\n"))
        add("garbage MP4", "--video", "garbage.mp4", "error", lambda p: p.write_bytes(rng.bytes(8192)))
        add("a PNG as --video", "--video", "image.mp4", "error", lambda p: shutil.copy(good_png, p))
        add("a WAV as --image", "--image", "sound.png", "error", lambda p: shutil.copy(good_wav, p))
        add("an MP4 as --audio", "--audio", "movie.wav", "error", lambda p: shutil.copy(good_mp4, p))
        add("60000 x 1 PNG", "--image", "thin.png", "error",
            lambda p: Image.fromarray(rng.integers(0, 255, (1, 60000, 3), dtype=np.uint8)).save(p))  # fmt: skip
        add("PNG header of 100000 x 100000", "--image", "bomb.png", "error", _png_header_bomb)
        add("NaN float WAV", "--audio", "nan.wav", "error",
            lambda p: sf.write(str(p), np.full(1600, np.nan, np.float32), 16000, subtype="FLOAT"))  # fmt: skip
        add("float WAV of peak 3e4", "--audio", "loud.wav", "error",
            lambda p: sf.write(str(p), sine * 6e4, 16000, subtype="FLOAT"))  # fmt: skip
        add("truncated WAV", "--audio", "cut.wav", "error", lambda p: p.write_bytes(good_wav.read_bytes()[:9000]))
        add("500 Hz WAV", "--audio", "slow.wav", "error", lambda p: sf.write(str(p), sine[:500], 500))
        add("WAV of no samples", "--audio", "none.wav", "error", lambda p: sf.write(str(p), sine[:0], 16000))
        add("2 x 6000 MP4", "--video", "thin.mp4", "error",
            lambda p: save_video(np.zeros((4, 2, 6000, 3), np.uint8), p, fps=4.0))  # fmt: skip
        add("symbolic link loop", "--image", "loop.png", "error", lambda p: p.symlink_to(p))
        add("FIFO", "--audio", "fifo.wav", "error", lambda p: os.mkfifo(p))
        add("8-channel WAV", "--audio", "many.wav", "either",
            lambda p: sf.write(str(p), np.tile(sine[:, None], (1, 8)), 16000))  # fmt: skip
        add("8 kHz 24-bit WAV", "--audio", "8k.wav", "ok", lambda p: sf.write(str(p), sine[::2], 8000, "PCM_24"))
        add("16-bit grey PNG", "--image", "grey16.png", "ok",
            lambda p: Image.fromarray(rng.integers(0, 65535, (16, 16), dtype=np.uint16)).save(p))  # fmt: skip
        add("palette PNG with transparency", "--image", "palette.png", "ok", _palette_png)
        add("CMYK JPEG", "--image", "cmyk.jpg", "ok", lambda p: Image.new("CMYK", (16, 16), (0, 50, 100, 0)).save(p))
        add("animated GIF", "--image", "anim.gif", "ok", _animated_gif)
        add("1 x 1 PNG", "--image", "dot.png", "ok", lambda p: Image.new("RGB", (1, 1)).save(p))
        add("one-frame MP4", "--video", "one.mp4", "ok", lambda p: save_video(np.zeros((1, 16, 16, 3), np.uint8), p,
                                                                              fps=1.0))  # fmt: skip
        return files

    def generate_media(self) -> None:
        out = self.work / "gen-media"
        corpus = self.media_corpus()
        if self.quick:
            corpus = dict(list(corpus.items())[::3])
        base = ["generate", "look", "--model", "tiny", "--out", str(out), "--max-new-tokens", "2", "--modalities",
                "text"]  # fmt: skip
        with self.tiny_reused():
            for name, (option, path, expect) in corpus.items():
                self.case("generate: media", name,
                          lambda o=option, p=path, e=expect: self.cli([*base, o, str(p)], out, e))  # fmt: skip

    # ------------------------------------------------------------------ damaged model folders
    def saved_model(self) -> Path:
        from anygpt.core.config import config_from_preset
        from anygpt.core.fusion import CrossAttentionConfig
        from anygpt.core.pipeline import AnyGPTPipeline

        folder = self.work / "model" / "saved"
        if not folder.exists():
            config = config_from_preset("tiny")
            config.cross_attention = CrossAttentionConfig(every=1, num_heads=2, ff_mult=1)
            AnyGPTPipeline.from_config(config).save_pretrained(folder)
        return folder

    def model_damages(self) -> dict[str, Callable[[Path], None]]:
        """``name: damage(folder)``: the corpus of damaged model folders."""
        weights = ["input_projectors/image/diffusion_pytorch_model.safetensors",
                   "output_projectors/audio/diffusion_pytorch_model.safetensors", "lora/adapter_model.safetensors",
                   "token_embeddings.safetensors", "cross_attention.safetensors"]  # fmt: skip
        jsons = ["anygpt_index.json", "input_projectors/video/config.json", "output_projectors/image/config.json",
                 "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"]  # fmt: skip
        damages: dict[str, Callable[[Path], None]] = {}
        for rel in weights[:2] if self.quick else weights:
            short = rel.split("/")[0]
            damages.update({
                f"{short}: truncated": lambda f, r=rel: _truncate(f / r),
                f"{short}: empty": lambda f, r=rel: (f / r).write_bytes(b""),
                f"{short}: a key missing": lambda f, r=rel: _edit_tensors(f / r, lambda t: t.pop(sorted(t)[-1])),
                f"{short}: an extra key": lambda f, r=rel: _edit_tensors(f / r, _extra_key),
                f"{short}: a wrong shape": lambda f, r=rel: _edit_tensors(f / r, _wrong_shape),
                f"{short}: a NaN row": lambda f, r=rel: _edit_tensors(f / r, _nan_row),
                f"{short}: integer weights": lambda f, r=rel: _edit_tensors(f / r, _integer_weights),
                f"{short}: missing": lambda f, r=rel: (f / r).unlink(),
                f"{short}: a folder": lambda f, r=rel: ((f / r).unlink(), (f / r).mkdir()),
                f"{short}: a link out of the folder": lambda f, r=rel: _link_outside(f, r),
                f"{short}: header length 2**62": lambda f, r=rel: _patch_header_length(f / r, 2**62),
                f"{short}: header of garbage JSON": lambda f, r=rel: _garbage_header(f / r),
                f"{short}: data offsets past the end": lambda f, r=rel: _offsets_past_end(f / r),
            })  # fmt: skip
        for rel in jsons[:2] if self.quick else jsons:
            damages.update({
                f"{rel}: truncated JSON": lambda f, r=rel: (f / r).write_bytes(b'{"config": {'),
                f"{rel}: a list": lambda f, r=rel: (f / r).write_bytes(b"[1, 2]"),
                f"{rel}: not UTF-8": lambda f, r=rel: (f / r).write_bytes(b"\xff\xfe{}"),
                f"{rel}: nested 100000 deep": lambda f, r=rel: (f / r).write_text("[" * 100000 + "]" * 100000),
            })  # fmt: skip
        index = "anygpt_index.json"
        damages.update({
            "index: missing": lambda f: (f / index).unlink(),
            "index: format_version 999": lambda f: _edit_index(f, lambda i: i.__setitem__("format_version", 999)),
            "index: a part outside the folder": lambda f: _edit_index(
                f, lambda i: i["parts"].__setitem__("token_embeddings", "../../outside.safetensors")),
            "index: an absolute part": lambda f: _edit_index(
                f, lambda i: i["parts"].__setitem__("token_embeddings", "/etc/passwd")),
            "index: llm.source a list": lambda f: _edit_index(f, lambda i: i["config"]["llm"].__setitem__("source",
                                                                                                        [None])),
            "index: decoders 7": lambda f: _edit_index(f, lambda i: i["config"].__setitem__("decoders", 7)),
            "index: hidden_size 32": lambda f: _edit_index(f, lambda i: i["config"]["llm"].__setitem__("hidden_size",
                                                                                                     32)),
            "index: a packaged part leaving the package": lambda f: _edit_index(
                f, lambda i: i["config"]["llm"].__setitem__("source", "packaged:toyworld/../../..")),
            "tokenizer/tokenizer.json: missing": lambda f: (f / "tokenizer/tokenizer.json").unlink(),
            "tokenizer/tokenizer.json: not a tokenizer": lambda f: (f / "tokenizer/tokenizer.json").write_text(
                '{"model": 3}'),
            "the model folder is a file": lambda f: (shutil.rmtree(f), f.write_text("x")),
            "an empty folder": lambda f: (shutil.rmtree(f), f.mkdir()),
        })  # fmt: skip
        return damages

    def damaged_models(self) -> None:
        saved = self.saved_model()
        out = self.work / "gen-models"
        for name, damage in self.model_damages().items():
            folder = self.work / "damaged" / _slug(name)
            if folder.exists():
                shutil.rmtree(folder)
            shutil.copytree(saved, folder)
            damage(folder)
            argv = ["generate", "x", "--model", str(folder), "--out", str(out), "--max-new-tokens", "1",
                    "--modalities", "text"]  # fmt: skip

            def body(argv=argv, folder=folder) -> tuple[bool, str]:
                held, detail = self.cli(argv, out, "error")
                if held and str(folder) not in detail:
                    return False, f"the error does not name the folder: {detail}"
                return held, detail

            self.case("damaged model folders", name, body)
        # sizes in the index are not bounded: run in a child with 4 GiB of address space, never in this process
        for name, key, value in [("index: llm.hidden_size 2**20", "hidden_size", 2**20)]:
            folder = self.work / "damaged" / _slug(name)
            if folder.exists():
                shutil.rmtree(folder)
            shutil.copytree(saved, folder)
            _edit_index(folder, lambda i, k=key, v=value: i["config"]["llm"].__setitem__(k, v))
            self.case("damaged model folders", name, lambda f=folder: _limited_generate(f, self.work), timeout=300)

    # ------------------------------------------------------------------ training: bad config values
    def training_configs(self) -> None:
        from toyworld.sample_configs import write_sample

        sample = write_sample(self.work / "train-data", size=4)
        base_text = (sample / "stage1.yaml").read_text()
        texts = {
            "an integer key": "1: 2\n",
            "a key null": "null: 1\n",
            "an integer key in train": "train:\n  7: 1\n",
            "a date that does not exist": "foo: 2001-02-30\n",
            "a date as optim.lr": "optim: {lr: 2001-02-03}\n",
            "!!binary as a dataset name": "data: {datasets: [{path: x.json, name: !!binary aGk=}]}\n",
            "!!set as lr": "optim: {lr: !!set {a}}\n",
            "!!timestamp of no time": "foo: !!timestamp x\n",
            "!!python/object": "foo: !!python/object:os.system x\n",
            "5000 nested lists": "a: " + "[" * 5000 + "]" * 5000 + "\n",
            "40 nested mappings": "lora: " + "{a: " * 40 + "1" + "}" * 40 + "\n",
            "an alias bomb (10**9 values)": "lora:\n" + "".join(f"  {line}\n" for line in _alias_bomb(9)),
            "a NUL in model": 'model: "a\\0b"\n',
            "a lone surrogate in data_root": 'data_root: "\\ud800"\n',
            "a 5000-character data_root": "data_root: /" + "a" * 5000 + "\n",
            "a tab indent": "\tfoo: 1\n",
            "a dataset weight of .inf": "data: {datasets: [{path: x.json, weight: .inf}]}\n",
            "a dataset max_samples of 2.5": "data: {datasets: [{path: x.json, max_samples: 2.5}]}\n",
        }
        raw = {
            "not UTF-8": base_text.encode() + b"\nfoo: caf\xe9\n",
            "binary noise": random.Random(self.seed).randbytes(300),
        }
        overrides = [
            "optim.lr=.nan", "optim.lr=0", "optim.lr=.inf", "optim.eps=-1.0", "optim.warmup_steps=1000000000",
            "optim.betas=[0.9, .nan]", "train.batch_size=1e12", "train.batch_size=1000000000000",
            "train.batch_size=0", "train.max_steps=1000000000000", "train.epochs=1.0e+300",
            "train.seed=18446744073709551616", "train.keep_checkpoints=0", "data.max_length=100000000",
            "loss.diffusion.weight=.nan", "loss.modality_weights.video=1.0e+9", "lora.r=.nan",
            "optim.lr=2001-02-30", "train.max_steps=2001-02-30", "model=a\x00b", "train.seed.x=1", "=3",
            "cross_attention.every=1e400", "cross_attention={every: 0}", "data.datasets=[1]", "train=5",
        ]  # fmt: skip
        if self.quick:
            texts, overrides = dict(list(texts.items())[::2]), overrides[::3]
        cfg = self.work / "train-configs"
        cfg.mkdir(parents=True, exist_ok=True)
        common = ["--output-dir", str(self.work / "train-never"), "--max-steps", "2"]

        def refused(path: Path) -> Callable[[], tuple[bool, str]]:
            return lambda: self._train_refused(["train", "--stage", "1", "--config", str(path), *common])

        for name, text in texts.items():
            path = cfg / f"{_slug(name)}.yaml"
            path.write_text(base_text + text if not text.startswith("\t") else "stage: 1\n" + text)
            self.case("training: bad config values", name, refused(path))
        for name, data in raw.items():
            path = cfg / f"{_slug(name)}.yaml"
            path.write_bytes(data)
            self.case("training: bad config values", name, refused(path))
        for item in overrides:
            argv = ["train", "--stage", "1", "--config", str(sample / "stage1.yaml"), *common, f"--set={item}"]
            self.case("training: bad config values", f"--set {item!r}", lambda a=argv: self._train_refused(a))

    def _train_refused(self, argv: list[str]) -> tuple[bool, str]:
        held, detail = self.cli(argv, None, "error")
        if (self.work / "train-never").exists():
            return False, f"the output folder was made before the config was refused ({detail})"
        return held, detail

    # ------------------------------------------------------------------ training: damaged checkpoints
    def damaged_checkpoints(self) -> None:
        import torch

        from toyworld.sample_configs import write_sample
        from training.config import load_config
        from training.trainer import StageTrainer

        sample = write_sample(self.work / "ckpt-data", size=8)
        sets = [f"{k}={v}" for k, v in {**TRAIN_SETS, "train.keep_checkpoints": 3}.items()]
        straight = self.work / "ckpt-straight"
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            if not (straight / "final").exists():
                StageTrainer(load_config(sample / "stage1.yaml", overrides=sets), output_dir=straight,
                             max_steps=4).train()  # fmt: skip
        finally:
            torch.set_num_threads(threads)
        damages: dict[str, tuple[Callable[[Path], None], str]] = {
            "truncated trained tensors": (lambda c: _truncate(c / "checkpoint-4/trainable.safetensors"), "resume"),
            "a NaN trained tensor": (lambda c: _edit_tensors(c / "checkpoint-4/trainable.safetensors", _nan_row),
                                     "resume"),
            "a trained key missing": (lambda c: _edit_tensors(c / "checkpoint-4/trainable.safetensors",
                                                              lambda t: t.pop(sorted(t)[0])), "resume"),
            "a wrong shape": (lambda c: _edit_tensors(c / "checkpoint-4/trainable.safetensors", _wrong_shape),
                              "resume"),
            "optimizer.pt missing": (lambda c: (c / "checkpoint-4/optimizer.pt").unlink(), "resume"),
            "optimizer.pt truncated": (lambda c: _truncate(c / "checkpoint-4/optimizer.pt"), "resume"),
            "optimizer.pt a pickle that runs code": (lambda c: _evil_pickle(c / "checkpoint-4/optimizer.pt"),
                                                     "resume"),
            "optimizer.pt of another shape": (lambda c: _other_optimizer(c / "checkpoint-4/optimizer.pt"), "resume"),
            "rng-0.pt truncated": (lambda c: _truncate(c / "checkpoint-4/rng-0.pt"), "resume"),
            "scheduler.pt a list": (lambda c: torch.save([1, 2], c / "checkpoint-4/scheduler.pt"), "resume"),
            "trainer_state.json damaged": (lambda c: (c / "checkpoint-4/trainer_state.json").write_text("{"),
                                           "resume"),
            "trainer_state.json step 'x'": (lambda c: _edit_state(c / "checkpoint-4", step="x"), "resume"),
            "trainer_state.json step 10**30": (lambda c: _edit_state(c / "checkpoint-4", step=10**30), "resume"),
            "trainer_state.json a list": (lambda c: (c / "checkpoint-4/trainer_state.json").write_text("[]"),
                                          "resume"),
            "checkpoint-4 a file": (lambda c: (shutil.rmtree(c / "checkpoint-4"), (c / "checkpoint-4").write_text(
                "x")), "resume"),
            "both checkpoints damaged": (lambda c: (_truncate(c / "checkpoint-4/trainable.safetensors"),
                                                    (c / "checkpoint-2/optimizer.pt").unlink()), "error"),
            "checkpoint-99 of a longer run": (lambda c: (shutil.copytree(c / "checkpoint-4", c / "checkpoint-99"),
                                                         _edit_state(c / "checkpoint-99", step=99)), "either"),
        }  # fmt: skip
        if self.quick:
            damages = dict(list(damages.items())[::4])
        for name, (damage, expect) in damages.items():
            out = self.work / "ckpt" / _slug(name)
            if out.exists():
                shutil.rmtree(out)
            shutil.copytree(straight, out)
            shutil.rmtree(out / "final")  # as if killed after checkpoint-4
            damage(out)
            argv = ["train", "--stage", "1", "--config", str(sample / "stage1.yaml"), "--output-dir", str(out),
                    "--max-steps", "4", "--resume", "auto", *[f"--set={s}" for s in sets]]  # fmt: skip

            def body(argv=argv, out=out, expect=expect) -> tuple[bool, str]:
                threads = torch.get_num_threads()
                torch.set_num_threads(1)
                try:
                    held, detail = self.cli(argv, None, "error" if expect == "error" else "either")
                finally:
                    torch.set_num_threads(threads)
                if not held:
                    return held, detail
                if (out / "final").exists():
                    different = same_final(out / "final", straight / "final")
                    if different:
                        return False, f"resumed, but {different[0]}"
                    return True, "resumed from the newest whole checkpoint; final/ equals the uninterrupted run's"
                if expect == "resume":
                    return False, f"no final/ and no resume: {detail}"
                return held, detail

            self.case("training: damaged checkpoints", name, body, timeout=max(self.timeout, 300))

    # ------------------------------------------------------------------ Python API: request values
    def request_values(self) -> None:
        from anygpt.base.errors import MediaError, UsageError
        from anygpt.core.request import GenerationRequest

        fields_ = ["prompt", "images", "audios", "videos", "modalities", "adapters", "seed", "max_new_tokens",
                   "temperature", "top_p", "num_inference_steps", "guidance_scale", "height", "width", "num_frames",
                   "audio_seconds", "decoder_overrides", "image_resolution", "id"]  # fmt: skip
        values = exotic_values(random.Random(self.seed), 12 if self.quick else 40)
        for name in fields_:
            for label, value in values:

                def body(name=name, value=value) -> tuple[bool, str]:
                    try:
                        request = GenerationRequest(**{"prompt": "x", name: value})
                    except (UsageError, MediaError) as err:
                        text = str(err)
                        held = text.startswith(name) and "\n" not in text and len(text) < 1000
                        return held, text[:160] if held else f"does not name {name} first, in one line: {text[:200]}"
                    problem = request_range_problem(name, getattr(request, name))
                    return problem is None, problem or "accepted, in range"

                self.case("Python API: request values", f"{name}={label}", body)

    # ------------------------------------------------------------------ Python API: two threads
    def two_threads(self) -> None:
        pipe = self.pipe
        gen = dict(max_new_tokens=4, show_progress=False)

        def image(steps: int, seed: int):
            return lambda: pipe("draw", modalities="image", seed=seed, num_inference_steps=steps, **gen)

        def batch():
            return lambda: pipe(["a", "bb"], modalities="image,audio", seed=2, temperature=0.7, batch_size=2,
                                num_inference_steps=2, **gen)  # fmt: skip

        def bad():
            return lambda: pipe("x", height=4104, **gen)

        def stopped():
            return lambda: pipe("draw", modalities="image", seed=3, num_inference_steps=3, should_stop=lambda: True,
                                **gen)  # fmt: skip

        def raising_hook():
            def hook(modality, index, total):
                raise RuntimeError("the caller's hook failed")

            return lambda: pipe("draw", modalities="image", seed=4, on_decode=hook, num_inference_steps=2, **gen)

        def chat(seed: int):
            def run():
                from anygpt.core.conversation import Conversation

                conversation = Conversation()
                first = pipe("hello", conversation=conversation, seed=seed, modalities="text", **gen)
                second = pipe("again", conversation=conversation, seed=seed, modalities="text", **gen)
                return [first.token_ids, second.token_ids]

            return run

        pairs = {
            "different step counts": (image(3, 1), batch()),
            "a refused request beside a running one": (bad(), image(2, 5)),
            "a stopped call beside a running one": (stopped(), image(2, 6)),
            "a failing hook beside a running one": (raising_hook(), batch()),
            "two conversations of two turns": (chat(7), chat(8)),
            "the same call twice": (image(2, 9), image(2, 9)),
        }
        if self.quick:
            pairs = dict(list(pairs.items())[::2])
        for name, (first, second) in pairs.items():
            self.case("Python API: two threads", name, lambda a=first, b=second: _threads_agree(a, b, self.timeout))

    # ------------------------------------------------------------------ config loaders: seeded mutations
    def config_mutations(self) -> None:
        import yaml

        from anygpt.base.errors import ConfigError
        from toyworld.sample_configs import write_sample
        from training.config import load_config

        sample = write_sample(self.work / "mutate-data", size=4)
        data = yaml.safe_load((sample / "stage1.yaml").read_text())
        rng = random.Random(self.seed)
        folder = self.work / "mutated"
        folder.mkdir(parents=True, exist_ok=True)
        for number in range(60 if self.quick else 300):
            mutated = copy.deepcopy(data)
            for _ in range(rng.randint(1, 3)):
                _mutate_yaml(mutated, rng)
            text = yaml.safe_dump(mutated).encode()
            if rng.random() < 0.3:
                cut = rng.randrange(len(text))
                text = text[:cut] + rng.randbytes(rng.randint(1, 6)) + text[cut:]
            path = folder / f"m{number}.yaml"
            path.write_bytes(text)

            def body(path=path) -> tuple[bool, str]:
                try:
                    config = load_config(path)
                except ConfigError as err:
                    held = str(err).startswith((str(path), "config file"))
                    return held, _first_line(str(err), 160)
                json.dumps(config.to_dict())  # what a checkpoint writes
                return True, "loaded"

            self.case("config loaders: stage YAML", f"mutation {number}", body)

    def index_mutations(self) -> None:
        from anygpt.base.errors import CheckpointError
        from anygpt.core.index import INDEX_FILE, read_index

        saved = self.saved_model()
        index = json.loads((saved / INDEX_FILE).read_text())
        rng = random.Random(self.seed + 1)
        folder = self.work / "index-mutated"
        folder.mkdir(parents=True, exist_ok=True)
        leaves = list(_json_paths(index))
        for _ in range(60 if self.quick else 300):
            mutated = copy.deepcopy(index)
            where = rng.choice(leaves)
            node = mutated
            for key in where[:-1]:
                node = node[key]
            node[where[-1]] = _random_json(rng, 2)
            (folder / INDEX_FILE).write_text(json.dumps(mutated))

            def body() -> tuple[bool, str]:
                try:
                    read_index(folder)
                except CheckpointError as err:
                    return str(folder) in str(err) and "\n" not in str(err), _first_line(str(err), 160)
                return True, "read"

            self.case("config loaders: model index", f"{'.'.join(map(str, where))}", body)

    # ------------------------------------------------------------------ prompt tokenizer
    def prompt_tokens(self) -> None:
        from anygpt.base.errors import UsageError
        from anygpt.core.conversation import Conversation
        from anygpt.core.request import GenerationRequest

        pipe = self.pipe
        model, tokenizer = pipe.model, pipe.tokenizer
        special = set(model.tokens.all_added_ids) | set(tokenizer.all_special_ids)
        rng = random.Random(self.seed + 2)
        prompts = [_random_text(rng, rng.randint(0, 60)) for _ in range(40 if self.quick else 200)]
        prompts += ["<image>", "[IMG0]</s>", "USER: x ASSISTANT:", "\x00" * 50, "\U0010ffff", "\ufffd", "a" * 4000]
        for number, prompt in enumerate(prompts):

            def body(prompt=prompt) -> tuple[bool, str]:
                try:
                    request = GenerationRequest(prompt)
                except UsageError as err:
                    surrogate = any(0xD800 <= ord(c) <= 0xDFFF for c in prompt)
                    return surrogate and str(err).startswith("prompt"), _first_line(str(err), 120)
                conversation = Conversation(template=pipe.config.llm.template)
                conversation.add_user(request.prompt, [])
                pieces = conversation.prompt_pieces(tokenizer.eos_token_id)
                ids, _ = model.tokenize_pieces(pieces)
                if special & set(ids[1:]):
                    return False, "user text became a special token"
                text = "".join(p for p in pieces if isinstance(p, str))
                if tokenizer.decode(ids[1:]) != text:
                    return False, "the token ids do not decode to the prompt"
                return True, f"{len(ids)} tokens"

            self.case("prompt tokenizer", f"prompt {number} ({len(prompt)} characters)", body)


# ====================================================================================================== builders
def _slug(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _edit_tensors(path: Path, change: Callable[[dict], Any]) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def _first_float(tensors: dict, ndim: int = 1) -> str:
    return sorted(k for k, v in tensors.items() if v.is_floating_point() and v.ndim >= ndim)[0]


def _extra_key(tensors: dict) -> None:
    import torch

    tensors["extra.weight"] = torch.zeros(3)


def _wrong_shape(tensors: dict) -> None:
    import torch

    key = _first_float(tensors)
    tensors[key] = torch.zeros(*(n + 1 for n in tensors[key].shape))


def _nan_row(tensors: dict) -> None:
    tensors[_first_float(tensors, ndim=2)][1] = float("nan")


def _integer_weights(tensors: dict) -> None:
    import torch

    key = _first_float(tensors)
    tensors[key] = tensors[key].to(torch.int32)


def _link_outside(folder: Path, rel: str) -> None:
    outside = folder.parent / f"{folder.name}-elsewhere.safetensors"
    shutil.copy(folder / rel, outside)
    (folder / rel).unlink()
    (folder / rel).symlink_to(outside)


def _patch_header_length(path: Path, length: int) -> None:
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", length) + data[8:])


def _garbage_header(path: Path) -> None:
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    path.write_bytes(data[:8] + b"{" * size + data[8 + size :])


def _offsets_past_end(path: Path) -> None:
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    for key, entry in header.items():
        if key != "__metadata__":
            entry["data_offsets"] = [entry["data_offsets"][0], entry["data_offsets"][1] + 10**9]
            break
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + size :])


def _edit_index(folder: Path, change: Callable[[dict], Any]) -> None:
    path = folder / "anygpt_index.json"
    index = json.loads(path.read_text())
    change(index)
    path.write_text(json.dumps(index))


def _edit_state(folder: Path, **values) -> None:
    path = folder / "trainer_state.json"
    state = json.loads(path.read_text())
    state.update(values)
    path.write_text(json.dumps(state))


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo the checkpoint ran code > /dev/null",))


def _evil_pickle(path: Path) -> None:
    import pickle

    path.write_bytes(pickle.dumps(_RunsCode()))


def _other_optimizer(path: Path) -> None:
    import torch

    state = torch.load(path, weights_only=True)
    for entry in state["state"].values():
        for key, value in entry.items():
            if torch.is_tensor(value) and value.ndim >= 1:
                entry[key] = torch.zeros(value.shape[0] + 1, *value.shape[1:])
    torch.save(state, path)


def _png_header_bomb(path: Path) -> None:
    """A PNG whose header says 100000 x 100000 pixels (the file is 60 bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) +
                     chunk(b"IEND", b""))  # fmt: skip


def _palette_png(path: Path) -> None:
    from PIL import Image

    image = Image.new("P", (16, 16))
    image.putpalette([i % 256 for i in range(768)])
    image.info["transparency"] = 0
    image.save(path, transparency=0)


def _animated_gif(path: Path) -> None:
    from PIL import Image

    frames = [Image.new("RGB", (16, 16), (i * 60, 0, 0)) for i in range(4)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)


def _alias_bomb(levels: int) -> list[str]:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    return lines + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]


def _limited_generate(folder: Path, work: Path) -> tuple[bool, str]:
    """``anygpt generate --model FOLDER`` in a child limited to 4 GiB of address space: a size bomb in the index
    must end in one clear error, not a traceback or an attempt to allocate what the machine does not have."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    argv = ["generate", "x", "--model", str(folder), "--out", str(work / "gen-limited"), "--max-new-tokens", "1",
            "--modalities", "text"]  # fmt: skip
    try:
        done = subprocess.run([sys.executable, "-m", "anygpt", *argv], cwd=REPO, env=child_env(), capture_output=True,
                              text=True, errors="replace", timeout=240, preexec_fn=limit)  # fmt: skip
    except subprocess.TimeoutExpired:
        return False, "hang: the child ran past 240 s"
    last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
    if "Traceback" in done.stderr or done.returncode not in (1, 2):
        return False, f"exit {done.returncode}: {last[:200]}"
    return last.startswith("anygpt: "), last[:200]


def _threads_agree(first: Callable[[], Any], second: Callable[[], Any], timeout: float) -> tuple[bool, str]:
    """Run each call alone, then both at once from two threads (three times each): every concurrent result (or
    error) equals the call's result (or error) alone, and both threads end."""
    alone = [_outcome(first), _outcome(second)]
    results: list[list] = [[], []]
    barrier = threading.Barrier(2)

    def worker(index: int, call) -> None:
        barrier.wait()
        for _ in range(3):
            results[index].append(_outcome(call))

    threads = [threading.Thread(target=worker, args=(i, c), daemon=True) for i, c in enumerate((first, second))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout)
    if any(thread.is_alive() for thread in threads):
        return False, "a thread did not end (a deadlock?)"
    for index in range(2):
        for got in results[index]:
            if not _same_outcome(got, alone[index]):
                return False, f"thread {index}: {str(got)[:120]} differs from the call alone: {str(alone[index])[:120]}"
    return True, f"alone and concurrent agree ({_describe(alone[0])}; {_describe(alone[1])})"


def _outcome(call: Callable[[], Any]) -> Any:
    try:
        return ("result", _fingerprint(call()))
    except BaseException as err:  # noqa: BLE001 - the error is part of the outcome compared
        return ("error", type(err).__name__, str(err))


def _fingerprint(result: Any) -> Any:
    if isinstance(result, list):
        return [_fingerprint(r) for r in result]
    if not hasattr(result, "token_ids"):
        return result
    return {
        "tokens": result.token_ids,
        "text": result.text,
        "images": [np.asarray(i).tobytes() for i in result.images],
        "audios": [a.waveform.tobytes() for a in result.audios],
        "videos": [v.frames.tobytes() for v in result.videos],
        "stopped": getattr(result, "stopped", None),
    }


def _same_outcome(a: Any, b: Any) -> bool:
    return a == b


def _describe(outcome: Any) -> str:
    return f"error {outcome[1]}" if outcome[0] == "error" else "a result"


# ---------------------------------------------------------------------------------------------- exotic values
def exotic_values(rng: random.Random, count: int) -> list[tuple[str, Any]]:
    """Values a Python caller can pass for any request field: fixed edge cases, then ``count`` drawn ones."""
    from decimal import Decimal
    from fractions import Fraction

    fixed: list[tuple[str, Any]] = [
        ("None", None), ("True", True), ("0", 0), ("-1", -1), ("8", 8), ("2**63", 2**63), ("10**400", 10**400),
        ("10**5000", 10**5000), ("nan", float("nan")), ("inf", float("inf")), ("-0.0", -0.0), ("5e-324", 5e-324),
        ("1e308", 1e308), ("np.int64(8)", np.int64(8)), ("np.float32(nan)", np.float32("nan")),
        ("np.float64(0.5)", np.float64(0.5)), ("np.bool_", np.bool_(True)), ("np.array", np.array([1, 2])),
        ("Decimal(NaN)", Decimal("NaN")), ("Fraction(1, 3)", Fraction(1, 3)), ("1+2j", 1 + 2j), ("b'x'", b"x"),
        ("''", ""), ("'auto'", "auto"), ("'image'", "image"), ("'\\udcff'", "\udcff"), ("'\\x00'", "\x00"),
        ("'..'", ".."), ("'fixed'", "fixed"), ("Path", Path("p.png")), ("object()", object()),
        ("[None]", [None]), ("[10**5000]", [10**5000]), ("{'image': {}}", {"image": {}}),
        ("{'text': 10**400}", {"text": 10**400}), ("{10**5000: 1}", {10**5000: 1}),
        ("{'image': {'height': 4104}}", {"image": {"height": 4104}}), ("('image', 'image')", ("image", "image")),
    ]  # fmt: skip
    drawn = [(f"drawn {i}", _random_python(rng, 2)) for i in range(count)]
    return fixed + drawn


def _random_python(rng: random.Random, depth: int) -> Any:
    kind = rng.randrange(9 if depth > 0 else 7)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.randint(-(2**70), 2**70)
    if kind == 2:
        return rng.choice([0, 1, 7, 8, 64, 256, 257, 1000, 1001, 4096, 8192, 8193, 2**63 - 1])
    if kind == 3:
        return rng.choice([0.0, 1e-3, 0.5, 1.0, 60.0, 100.0, 100.5, float("nan"), -float("inf"), 1e-320])
    if kind == 4:
        return rng.uniform(-200, 200)
    if kind in (5, 6):
        return _random_text(rng, rng.randint(0, 8))
    if kind == 7:
        return [_random_python(rng, depth - 1) for _ in range(rng.randint(0, 3))]
    keys = [rng.choice(["image", "video", "audio", "text", "height", "num_frames", _random_text(rng, 3)])
            for _ in range(rng.randint(0, 3))]  # fmt: skip
    return {k: _random_python(rng, depth - 1) for k in keys}


def _random_text(rng: random.Random, length: int) -> str:
    pools = [(0x20, 0x7E), (0x0, 0x1F), (0x80, 0x2FF), (0x4E00, 0x4FFF), (0x1F600, 0x1F64F), (0xD800, 0xDFFF),
             (0x200B, 0x202E), (0x10FF00, 0x10FFFF)]  # fmt: skip
    weights = [50, 8, 10, 8, 8, 2, 6, 2]
    return "".join(chr(rng.randint(*rng.choices(pools, weights)[0])) for _ in range(length))


def request_range_problem(name: str, value: Any) -> str | None:
    """None when an accepted request field holds a value in its documented range; else what is wrong."""
    from anygpt.core.request import DECODER_SETTINGS, MAX_ADAPTER_WEIGHT, MAX_SEED

    def integer(v, low, high):
        return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high

    def finite(v, ok):
        number = isinstance(v, int | float) and not isinstance(v, bool)
        return number and (not isinstance(v, float) or math.isfinite(v)) and ok(v)

    def setting(key, v):
        rules = {
            "num_inference_steps": lambda x: integer(x, 1, 1000),
            "guidance_scale": lambda x: finite(x, lambda y: 0 <= y <= 100),
            "height": lambda x: integer(x, 8, 4096) and x % 8 == 0,
            "width": lambda x: integer(x, 8, 4096) and x % 8 == 0,
            "num_frames": lambda x: integer(x, 1, 256),
            "audio_seconds": lambda x: finite(x, lambda y: 0 < y <= 60),
        }
        return v is None or rules[key](v)

    checks = {
        "prompt": lambda v: isinstance(v, str) and v.encode("utf-8") is not None,
        "images": lambda v: all(isinstance(i, str | os.PathLike) for i in v),
        "audios": lambda v: all(isinstance(i, str | os.PathLike) for i in v),
        "videos": lambda v: all(isinstance(i, str | os.PathLike) for i in v),
        "modalities": lambda v: v == "auto" or (isinstance(v, list) and len(set(v)) == len(v)
                                                and set(v) <= {"image", "video", "audio"}),
        "adapters": lambda v: v is None or isinstance(v, str) or (isinstance(v, list) and all(
            isinstance(a, str) for a in v)) or (isinstance(v, dict) and all(isinstance(k, str) for k in v) and all(
                finite(w, lambda x: 0 <= x <= MAX_ADAPTER_WEIGHT) for w in v.values())),
        "seed": lambda v: v is None or integer(v, 0, MAX_SEED),
        "max_new_tokens": lambda v: integer(v, 1, 8192),
        "temperature": lambda v: finite(v, lambda x: x == 0 or 1e-3 <= x <= 100),
        "top_p": lambda v: finite(v, lambda x: 0 < x <= 1),
        **{key: (lambda k: lambda v: setting(k, v))(key) for key in DECODER_SETTINGS},
        "decoder_overrides": lambda v: isinstance(v, dict) and set(v) <= {"image", "video", "audio"} and all(
            isinstance(s, dict) and set(s) <= set(DECODER_SETTINGS) and all(setting(k, x) for k, x in s.items())
            for s in v.values()),
        "image_resolution": lambda v: v in (None, "fixed", "anyres"),
        "id": lambda v: v is None or (isinstance(v, str) and re.fullmatch(r"[A-Za-z0-9._-]+", v) is not None
                                      and v not in (".", "..")),
    }  # fmt: skip
    try:
        ok = checks[name](value)
    except ValueError as err:
        return f"{name}: the stored value cannot be checked ({err})"
    return None if ok else f"{name} accepted out of range: {type(value).__name__}"


def _mutate_yaml(data: dict, rng: random.Random) -> None:
    sections = [[], ["data"], ["optim"], ["train"], ["loss"], ["loss", "diffusion"], ["trainable"], ["lora"],
                ["cross_attention"], ["input_projector"], ["data", "datasets", 0]]  # fmt: skip
    node: Any = data
    for part in rng.choice(sections):
        if isinstance(node, list):
            node = node[part] if node else None
        elif isinstance(node, dict):
            if not isinstance(node.get(part), dict | list):
                node[part] = {}
            node = node[part]
        if node is None:
            return
    if isinstance(node, dict):
        keys = list(node) + ["lr", "batch_size", "weight", "max_steps", "r", "every", "name", "path", 7, None, 1.5]
        node[rng.choice(keys)] = _random_yaml(rng, 2)


def _random_yaml(rng: random.Random, depth: int) -> Any:
    import datetime

    kind = rng.randrange(10 if depth > 0 else 8)
    if kind == 0:
        return rng.choice([None, True, False, "", "~", "null"])
    if kind == 1:
        return rng.choice([0, -1, 1, 2**31, 2**64, 10**40, -(10**40)])
    if kind == 2:
        return rng.choice([0.0, 1e-9, 0.5, 1.0, 1e9, float("nan"), float("inf"), -float("inf")])
    if kind == 3:
        return rng.choice(["1e9", "2001-02-30", "/nonexistent", "a\x00b", "\udcff", "x" * 300, "nan", "1e400"])
    if kind == 4:
        return datetime.date(2001, 2, 3)
    if kind == 5:
        return rng.randbytes(3)
    if kind in (6, 7):
        return _random_text(rng, rng.randint(0, 6))
    if kind == 8:
        return [_random_yaml(rng, depth - 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(["a", "r", "lr", 1, None, True]): _random_yaml(rng, depth - 1) for _ in range(3)}


def _json_paths(node: Any, prefix: tuple = ()):
    if prefix:
        yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _json_paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _json_paths(value, (*prefix, index))


def _random_json(rng: random.Random, depth: int) -> Any:
    kind = rng.randrange(8 if depth > 0 else 6)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.choice([0, -1, 1, 7, 2**31, 10**20, 2**20])
    if kind == 2:
        return rng.choice([0.0, 0.5, -1.5, 1e300])
    if kind == 3:
        return rng.choice(["./x", "./", "packaged:toyworld/../..", "packaged:", "tiny", "", "image", "linear",
                           "/etc/passwd", "../.."])  # fmt: skip
    if kind in (4, 5):
        return _random_text(rng, rng.randint(0, 6)).encode("utf-8", "replace").decode("utf-8")
    if kind == 6:
        return [_random_json(rng, depth - 1) for _ in range(rng.randint(0, 3))]
    return {_random_text(rng, 3).encode("utf-8", "replace").decode(): _random_json(rng, depth - 1) for _ in range(2)}


# ====================================================================================================== report
def table(outcomes: list[Outcome]) -> str:
    """The markdown table: tried / held / failed per category."""
    categories: dict[str, list[Outcome]] = {}
    for outcome in outcomes:
        categories.setdefault(outcome.category, []).append(outcome)
    rows = ["| category | tried | held | failed |", "|---|---:|---:|---:|"]
    for category, items in categories.items():
        held = sum(o.held for o in items)
        rows.append(f"| {category} | {len(items)} | {held} | {len(items) - held} |")
    held = sum(o.held for o in outcomes)
    rows.append(f"| **all** | **{len(outcomes)}** | **{held}** | **{len(outcomes) - held}** |")
    return "\n".join(rows)


def soak_table(reports: list[SoakReport]) -> str:
    rows = ["| soak | kills | SIGKILL / SIGTERM | held | failed | ended before the kill | resumes identical |",
            "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for report in reports:
        s = report.summary()
        identical = f"{s['resumes_identical']} / {s['resumes_compared']}" if s["resumes_compared"] else "-"
        rows.append(f"| {s['command']} | {s['kills']} | {s['by_signal']['SIGKILL']} / {s['by_signal']['SIGTERM']} | "
                    f"{s['held']} | {s['failed']} | {s['ended_before_the_kill']} | {identical} |")  # fmt: skip
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a third of each corpus, and a soak of 2 kills each")
    parser.add_argument("--soak", type=int, default=None, help="kills of generate and of train (default 6; quick 2)")
    parser.add_argument("--seed", type=int, default=22, help="seeds the corpus and the kill points")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a case may run before it is a hang")
    parser.add_argument(
        "--only", default=None, help="run the categories whose method name contains this ('soak': the soak alone)"
    )
    parser.add_argument("--json", type=Path, default=None, help="write every outcome and the soak reports here")
    parser.add_argument("--keep", type=Path, default=None, help="build the corpus here and keep it")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)
    soak_n = args.soak if args.soak is not None else (2 if args.quick else 6)
    with contextlib.ExitStack() as stack:
        work = args.keep or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="probe-hardening-")))
        work.mkdir(parents=True, exist_ok=True)
        probe = Probe(work, quick=args.quick, seed=args.seed, timeout=args.timeout)
        steps = [probe.generate_numbers, probe.generate_prompts, probe.generate_media, probe.damaged_models,
                 probe.training_configs, probe.damaged_checkpoints, probe.request_values, probe.two_threads,
                 probe.config_mutations, probe.index_mutations, probe.prompt_tokens]  # fmt: skip
        start = time.perf_counter()
        for step in steps:
            if args.only and args.only not in step.__name__:
                continue  # --only soak: the soak alone
            t0 = time.perf_counter()
            step()
            print(f"[{step.__name__}: {time.perf_counter() - t0:.0f} s]", file=sys.stderr, flush=True)
        reports = []
        if soak_n and (not args.only or args.only == "soak"):
            reports.append(soak_generate(soak_n, args.seed, work / "soak-generate",
                                         log=lambda m: print(m, file=sys.stderr, flush=True)))  # fmt: skip
            reports.append(soak_train(soak_n, args.seed, work / "soak-train",
                                      log=lambda m: print(m, file=sys.stderr, flush=True)))  # fmt: skip
        print(f"\n## Hardening probe ({'quick' if args.quick else 'full'}, seed {args.seed}, "
              f"{time.perf_counter() - start:.0f} s)\n")  # fmt: skip
        print(table(probe.outcomes))
        failed = [o for o in probe.outcomes if not o.held]
        if failed:
            print("\nFailed cases:\n")
            for o in failed:
                print(f"- {o.category} / {o.name}: {o.detail}")
        if reports:
            print("\n### Soak\n")
            print(soak_table(reports))
            for report in reports:
                s = report.summary()
                for line in s["problems"] + s["final_problems"]:
                    print(f"- {s['command']}: {line}")
                for line in s["notes"]:
                    print(f"- {s['command']} (note): {line}")
        if args.json:
            args.json.write_text(json.dumps({"outcomes": [asdict(o) for o in probe.outcomes],
                                             "soak": [r.summary() for r in reports]}, indent=2))  # fmt: skip
    return 0 if not failed and all(r.ok for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
