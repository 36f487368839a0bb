"""The layers hold: the import-linter contracts of ``pyproject.toml`` pass, generation imports nothing of the training
side, and the command modules keep the interface the ``anygpt`` dispatcher loads them by."""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = REPO / "pyproject.toml"


def _contracts() -> list[dict]:
    from importlinter.api import read_configuration

    return read_configuration(str(PYPROJECT))["contracts_options"]


def test_import_contracts_are_kept():
    """``lint-imports`` on the project's own contracts: a wrong-way import or a cycle fails here with the report.
    (In its own process: import-linter reconfigures logging, which would hide the warnings later tests look for.)"""
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run(
        [str(lint), str(PYPROJECT), "--no-cache"], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"Contracts: {len(_contracts())} kept, 0 broken." in done.stdout


def test_the_contracts_name_every_layer():
    """The contracts that keep the training side apart are there (a deleted contract would pass silently)."""
    contracts = {c["name"]: c for c in _contracts()}
    layers = next(c for c in contracts.values() if c["type"] == "layers")["layers"]
    order = [layer.replace(" ", "") for layer in layers]
    assert order == [
        "anygpt.cli",
        "toyworld",
        "anygpt.apps|training",
        "anygpt.core",
        "encoders|projectors|decoders",
        "anygpt.base",
    ]
    forbidden = next(c for c in contracts.values() if c["type"] == "forbidden")
    assert set(forbidden["forbidden_modules"]) == {"training", "toyworld"}
    assert {"anygpt.core", "anygpt.apps", "anygpt.base"} <= set(forbidden["source_modules"])
    assert any(c["type"] == "acyclic_siblings" for c in contracts.values())


# What a generation loads, in a fresh interpreter: the pipeline, the generate command and the dispatcher parsing a
# `generate` command line. Prints the training-side modules it found in sys.modules as one JSON line.
_GENERATION_IMPORTS = """
import contextlib, io, json, sys
import anygpt.core.pipeline
try:
    import anygpt.apps.generate
except ModuleNotFoundError as err:
    if err.name != "anygpt.apps.generate":
        raise
from anygpt import cli
with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
    cli.main(["generate", "--help"])
print(json.dumps(sorted(m for m in sys.modules if m.partition(".")[0] in ("training", "toyworld"))))
"""


def test_generation_imports_nothing_of_the_training_side():
    done = subprocess.run(
        [sys.executable, "-c", _GENERATION_IMPORTS], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded == [], f"generation imported {loaded}"


@pytest.mark.parametrize(
    ("module_name", "commands"), [("training.cli", {"train", "cache"}), ("toyworld.cli", {"toyworld", "data"})]
)
def test_command_modules_keep_the_dispatcher_interface(module_name, commands):
    """``COMMANDS`` (name -> help, the same help the dispatcher lists), ``add_arguments`` fills a parser per command,
    ``run`` refuses a command it does not own."""
    from anygpt import cli

    module = importlib.import_module(module_name)
    assert set(module.COMMANDS) == commands
    for name, help_text in module.COMMANDS.items():
        assert cli.COMMANDS[name].module == module_name
        assert cli.COMMANDS[name].help == help_text
        parser = argparse.ArgumentParser(prog=f"anygpt {name}")
        module.add_arguments(name, parser)
        assert parser._actions[1:], f"{name}: no arguments added"
    with pytest.raises(ValueError, match="unknown command 'generate'"):
        module.add_arguments("generate", argparse.ArgumentParser())
    with pytest.raises(ValueError, match="unknown command 'generate'"):
        module.run(argparse.Namespace(command="generate"))
