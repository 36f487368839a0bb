"""The Python API is quiet by default: no import notices of torch's and diffusers' optional backends, no loading bars,
no denoising bars; ``anygpt.set_verbosity("info")`` brings them all back; other libraries' settings are changed only
while anygpt works (``anygpt.base.logs.quiet_libraries``) and put back after."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import threading

import pytest
import transformers
from diffusers.utils import logging as diffusers_logging

import anygpt
from anygpt.base import logs
from anygpt.base.errors import UsageError

NOTICES = ("torch/utils/_pytree.py", "register_constant", "gemm_4bit_forward", "Unable to import `torchao`")


def test_the_three_lines_of_the_readme_print_nothing_on_stderr_until_asked():
    """``import anygpt; pipe = from_pretrained('toyworld'); pipe('draw a red circle')``: stderr stays empty (it held
    the backends' import notices, transformers' "Loading weights", diffusers' "Loading pipeline components" and 20
    denoising steps); the libraries' own settings are as they were after the call; with ``set_verbosity("info")``
    the bars come back."""
    code = textwrap.dedent(
        """
        import logging, sys
        import anygpt
        pipe = anygpt.AnyGPTPipeline.from_pretrained("toyworld")
        out = pipe("draw a red circle")
        sys.stderr.write("@@QUIET@@\\n")
        sys.stderr.flush()
        import diffusers, transformers
        print("IMAGES", len(out.images))
        print("TRANSFORMERS", transformers.utils.logging.get_verbosity(),
              transformers.utils.logging.is_progress_bar_enabled())
        print("DIFFUSERS", diffusers.utils.logging.get_verbosity(), diffusers.utils.logging.is_progress_bar_enabled())
        print("NOTICE LOGGERS", [logging.getLogger(n).level for n in ("bitsandbytes", "torch.utils._pytree")])
        anygpt.set_verbosity("info")
        pipe = anygpt.AnyGPTPipeline.from_pretrained("toyworld")
        pipe("draw a red circle", num_inference_steps=3)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    quiet, _, loud = done.stderr.partition("@@QUIET@@\n")
    assert quiet == ""
    assert done.stdout.splitlines() == [
        "IMAGES 1",
        "TRANSFORMERS 30 True",  # WARNING and bars on: transformers' defaults, put back
        "DIFFUSERS 30 True",
        "NOTICE LOGGERS [0, 0]",
    ]
    assert "Loading pipeline components" in loud and "Loading weights" in loud
    assert "image: 100%" in loud and "| 3/3 [" in loud  # the decoder's bar, labelled
    assert "INFO anygpt.core.pipeline: loaded anygpt pipeline from" in loud


def test_the_pipeline_shows_denoising_bars_only_when_asked(tiny_pipe, capsys):
    call = dict(modalities="image", num_inference_steps=2, max_new_tokens=2, seed=0)
    tiny_pipe("x", **call)
    assert "image:" not in capsys.readouterr().err  # the default: quiet
    with logs.temporary_verbosity(progress_bar=True):
        tiny_pipe("x", **call)
    assert "image: 100%" in capsys.readouterr().err
    with logs.temporary_verbosity("info"):
        tiny_pipe("x", **call)
        assert "image: 100%" in capsys.readouterr().err
        tiny_pipe("x", show_progress=False, **call)  # the call's choice wins
        assert "image:" not in capsys.readouterr().err
    tiny_pipe("x", show_progress=True, **call)
    assert "image: 100%" in capsys.readouterr().err


def test_the_switches_of_anygpt_logging():
    assert anygpt.logging is logs and anygpt.set_verbosity is logs.set_verbosity
    with logs.temporary_verbosity():
        assert logs.get_verbosity() == logging.WARNING and not logs.is_progress_bar_enabled()
        anygpt.set_verbosity("INFO")
        assert logs.get_verbosity() == logging.INFO and logs.is_progress_bar_enabled()
        assert logging.getLogger("anygpt").level == logging.INFO and logging.getLogger("decoders").level == logging.INFO
        logs.disable_progress_bar()
        assert not logs.is_progress_bar_enabled()
        logs.set_verbosity_error()
        logs.enable_progress_bar()
        assert logs.get_verbosity() == logging.ERROR and logs.is_progress_bar_enabled()
        logs.set_verbosity(logging.DEBUG)
        assert logs.get_verbosity() == logging.DEBUG
        for bad in ("loud", True, -1, 99, None):
            with pytest.raises(UsageError, match="verbosity: expected one of debug, info, warning, error, critical"):
                logs.set_verbosity(bad)
    assert logs.get_verbosity() == logging.WARNING and not logs.is_progress_bar_enabled()
    assert logging.getLogger("anygpt").level == logging.NOTSET  # put back


def test_the_environment_variable_sets_the_default(monkeypatch):
    monkeypatch.setenv("ANYGPT_VERBOSITY", "info")
    assert logs.get_verbosity() == logging.INFO and logs.is_progress_bar_enabled()
    monkeypatch.setenv("ANYGPT_VERBOSITY", "chatty")
    with pytest.raises(UsageError, match="ANYGPT_VERBOSITY: expected one of debug, info"):
        logs.get_verbosity()


def test_set_verbosity_prints_on_stderr_when_logging_is_not_configured():
    code = textwrap.dedent(
        """
        import logging, anygpt
        anygpt.set_verbosity("info")
        logging.getLogger("anygpt.core.x").info("hello")
        logging.getLogger("anygpt.core.x").debug("not shown")
        logging.basicConfig(level=logging.INFO, format="ROOT %(message)s")
        logging.getLogger("anygpt.core.x").info("once")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stderr == "INFO anygpt.core.x: hello\nROOT once\n"  # once the application configures logging, once


def _library_state():
    return (
        transformers.utils.logging.get_verbosity(),
        transformers.utils.logging.is_progress_bar_enabled(),
        diffusers_logging.get_verbosity(),
        diffusers_logging.is_progress_bar_enabled(),
        logging.getLogger("bitsandbytes").level,
    )


def test_quiet_libraries_changes_the_libraries_only_inside_and_puts_them_back():
    before = _library_state()
    with logs.quiet_libraries():
        assert _library_state() == (logging.ERROR, False, logging.ERROR, False, logging.ERROR)
        with logs.quiet_libraries():
            assert _library_state()[:2] == (logging.ERROR, False)
        assert _library_state()[:2] == (logging.ERROR, False)  # the outer block still holds
    assert _library_state() == before
    with logs.temporary_verbosity("info"), logs.quiet_libraries():  # a user who wants them loud
        assert _library_state() == before
    transformers.utils.logging.set_verbosity_info()  # a user who turned transformers' logs up keeps them
    try:
        with logs.quiet_libraries():
            assert _library_state()[:2] == (logging.INFO, False)
        assert transformers.utils.logging.get_verbosity() == logging.INFO
    finally:
        transformers.utils.logging.set_verbosity(before[0])
    assert _library_state() == before


def test_quiet_libraries_across_threads_restores_when_the_last_block_ends():
    before = _library_state()
    entered, release, left = threading.Event(), threading.Event(), threading.Event()

    def worker():
        with logs.quiet_libraries():
            entered.set()
            release.wait(30)
        left.set()

    thread = threading.Thread(target=worker)
    thread.start()
    assert entered.wait(30)
    with logs.quiet_libraries():
        release.set()
        assert left.wait(30)
        assert _library_state()[:2] == (logging.ERROR, False)  # the worker's block ended, this one has not
    thread.join(30)
    assert _library_state() == before
