"""Soak (issue 22): ``anygpt generate`` and ``anygpt train`` killed at random points (SIGKILL and SIGTERM, kill points
drawn from a fixed seed) leave nothing half-written under a final name, exit with the documented status, leave
temporaries only after SIGKILL (swept by the next run), and training resumed with ``--resume auto`` ends with the
weights and losses of an uninterrupted run, bit for bit.

The soak itself lives in ``benchmarks/probe_hardening.py`` (``--soak N`` runs it longer); here N is 3 of each. Below
it, the defects of ``training/`` the soak and the probe found, each made to happen on purpose.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from training_runs import run_stage  # tests/training_runs.py

import training.checkpoint as checkpoint_module
from training.checkpoint import clean_partial, list_checkpoints

pytestmark = pytest.mark.usefixtures("one_thread")  # runs are compared exactly

REPO = Path(__file__).resolve().parents[1]
SEED = 22  # the kill points: the same soak every run


def _probe():
    """``benchmarks/probe_hardening.py`` as a module (benchmarks is no package; the module imports no test)."""
    name = "probe_hardening"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / "probe_hardening.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _explain(report) -> str:
    return json.dumps(report.summary(), indent=1)


# ---------------------------------------------------------------------------------------------- the soak
def test_generate_killed_at_random_points_leaves_nothing_half_written(tmp_path):
    report = _probe().soak_generate(3, SEED, tmp_path, log=logging.getLogger(__name__).info)
    assert len(report.kills) == 3 and {k.signal for k in report.kills} == {"SIGKILL", "SIGTERM"}, _explain(report)
    assert report.ok, _explain(report)
    # what the last run left: whole files under final names, no temporary
    out = tmp_path / "out"
    assert not [p for p in out.iterdir() if p.name.startswith(".")], sorted(p.name for p in out.iterdir())
    assert _probe().unreadable_outputs(out) == []


def test_train_killed_at_random_points_resumes_to_the_uninterrupted_weights(tmp_path):
    report = _probe().soak_train(3, SEED, tmp_path, steps=8, log=logging.getLogger(__name__).info)
    assert len(report.kills) == 3 and {k.signal for k in report.kills} == {"SIGKILL", "SIGTERM"}, _explain(report)
    assert report.ok, _explain(report)
    assert (report.resumes_compared, report.resumes_identical) == (1, 1), _explain(report)


def test_the_probe_runs_a_category_and_prints_its_table(tmp_path):
    script = REPO / "benchmarks" / "probe_hardening.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(script), "--quick", "--only", "request_values", "--json", str(tmp_path / "r.json")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| Python API: request values |")]
    tried, held, failed = (int(cell) for cell in rows[0].strip("|").split("|")[1:])
    assert tried == held > 0 and failed == 0
    outcomes = json.loads((tmp_path / "r.json").read_text())["outcomes"]
    assert len(outcomes) == tried and all(o["held"] for o in outcomes)


# ---------------------------------------------------------------------------------------------- what it found
def test_a_run_killed_while_writing_train_config_leaves_no_half_of_it(sample, tmp_path, monkeypatch):
    """Before: ``train_config.yaml`` was written in place; a kill in the middle left half of it."""
    out = tmp_path / "out"
    write = Path.write_text

    def killed_half_way(self, text, *args, **kwargs):
        if "train_config.yaml" in self.name:
            write(self, text[: len(text) // 2], *args, **kwargs)
            raise KeyboardInterrupt  # the kill
        return write(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        run_stage(sample, out)
    monkeypatch.undo()
    assert not (out / "train_config.yaml").exists()
    assert not [p.name for p in out.iterdir() if "train_config" in p.name]  # nor a temporary: removed on the way out
    run_stage(sample, out, resume="auto")
    written = yaml.safe_load((out / "train_config.yaml").read_text())
    assert written["train"]["save_every"] == 2 and written["stage"] == 1


def test_a_run_killed_while_pruning_a_checkpoint_leaves_no_half_deleted_one(sample, tmp_path, monkeypatch):
    """Before: an old checkpoint was deleted under its name; a kill in the middle left ``checkpoint-2`` without its
    weights but with its ``trainer_state.json``, listed as complete."""
    out = tmp_path / "out"
    rmtree = shutil.rmtree

    def killed_while_deleting(path, *args, **kwargs):
        path = Path(path)
        if "checkpoint-2" in path.name and (path / "trainable.safetensors").exists():
            (path / "trainable.safetensors").unlink()  # the first file gone, then the kill
            raise KeyboardInterrupt
        return rmtree(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.shutil, "rmtree", killed_while_deleting)
    with pytest.raises(KeyboardInterrupt):
        run_stage(sample, out, **{"train.keep_checkpoints": 1})  # checkpoint-4 prunes checkpoint-2
    monkeypatch.undo()
    listed = list_checkpoints(out)
    assert [p.name for p in listed] == ["checkpoint-4"], [p.name for p in listed]
    assert _probe().checkpoint_problems(listed[0]) == []
    assert (out / ".checkpoint-2.pruned").is_dir()  # hidden until the next run sweeps it
    clean_partial(out)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".checkpoint-")]


def test_clean_partial_sweeps_a_checkpoint_being_pruned(tmp_path):
    (tmp_path / ".checkpoint-2.pruned").mkdir()
    (tmp_path / ".checkpoint-2.pruned" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-4").mkdir()
    clean_partial(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4"]


def test_a_checkpoint_past_the_runs_end_is_damaged_not_resumed(sample, tmp_path, caplog):
    """Before: ``checkpoint-99`` (step 99 of a 4-step run) was resumed: no step ran, and its state was saved over the
    real ``checkpoint-4``."""
    straight = tmp_path / "straight"
    run_stage(sample, straight)
    out = tmp_path / "out"
    shutil.copytree(straight, out)
    shutil.rmtree(out / "final")
    shutil.copytree(out / "checkpoint-4", out / "checkpoint-99")
    state = json.loads((out / "checkpoint-99" / "trainer_state.json").read_text())
    (out / "checkpoint-99" / "trainer_state.json").write_text(json.dumps({**state, "step": 99}))
    with caplog.at_level(logging.WARNING, logger="training.trainer"):
        final = run_stage(sample, out, resume="auto")
    warnings = " ".join(r.getMessage() for r in caplog.records)
    assert "checkpoint-99 is damaged" in warnings and "step 99 is past the run's max_steps 4" in warnings, warnings
    assert (out / "checkpoint-99.damaged").is_dir()
    assert _probe().same_final(final, straight / "final") == []
