"""The command line: files written are valid media, bad input exits 2 with one line and leaves nothing behind; the
dispatcher imports only the chosen command's module."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from anygpt import cli
from anygpt.apps import generate as generate_command
from anygpt.base.media import load_audio, load_image, load_video
from anygpt.core.runtime import OFFLOAD_PLANS, RuntimeOptions


def test_generate_writes_valid_png_mp4_wav(tmp_path, capsys, use_tiny, media_files):
    out = tmp_path / "out"
    code = cli.main(
        ["generate", "draw <this> & that", "--image", str(media_files["image"]), "--modalities", "image,video,audio",
         "--out", str(out), "--steps", "2", "--max-new-tokens", "4", "--json"]
    )  # fmt: skip
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result) == {"text", "images", "videos", "audios"}
    assert load_image(result["images"][0]).size == (64, 64)
    video = load_video(result["videos"][0])
    assert video.frames.shape[0] == 8 and video.frames.shape[1:] == (64, 64, 3)
    audio = load_audio(result["audios"][0])
    assert audio.sample_rate == 16000 and audio.waveform.shape[-1] > 8000
    assert all(str(out) in p for k in ("images", "videos", "audios") for p in result[k])


def test_generate_plain_output_lists_paths(tmp_path, capsys, use_tiny):
    assert cli.main(["generate", "hi", "--modalities", "audio", "--out", str(tmp_path), "--steps", "2",
                     "--max-new-tokens", "2"]) == 0  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("text: ") and lines[-1].startswith("audio: ") and lines[-1].endswith(".wav")
    assert cli.main(["generate", "hi", "--modalities", "audio", "--out", str(tmp_path), "--steps", "2",
                     "--max-new-tokens", "2"]) == 0  # fmt: skip
    assert len(list(tmp_path.glob("*.wav"))) == 2  # a second run does not overwrite the first


def test_batch(tmp_path, capsys, use_tiny, media_files):
    batch = tmp_path / "prompts.jsonl"
    (tmp_path / "in.png").write_bytes(media_files["image"].read_bytes())
    batch.write_text(
        json.dumps({"prompt": "one", "modalities": ["image"], "id": "first"})
        + "\n\n"
        + json.dumps({"prompt": "two", "images": ["in.png"], "modalities": "audio", "max_new_tokens": 2})
        + "\n"
    )
    out = tmp_path / "out"
    assert cli.main(["generate", "--batch", str(batch), "--out", str(out), "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["prompt"] for r in records] == ["one", "two"]
    assert records[0]["id"] == "first" and records[0]["images"][0].endswith("first_image0.png")
    assert len(records[1]["audios"]) == 1 and records[1]["images"] == []
    logged = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert logged == records


FOUND_AFTER_LOADING = {
    "in.wav",  # an image option holding a WAV file: read when the pipeline reads its inputs
    "unknown model 'no-such-model'",
    "unknown LoRA adapter 'image': this model has default",
}
"""The bad inputs that only the model reveals (a file's content, the model's name, its adapters)."""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["generate", "x", "--image", "{tmp}/missing.png"],
            "--image {tmp}/missing.png: expected a readable file, found nothing",
        ),
        (["generate", "x", "--image", "{wav}"], "in.wav"),
        (["generate", "x", "--modalities", "image,smell"], "modalities: unknown output modality 'smell'"),
        (["generate", "x", "--out", "{wav}"], "--out {wav}: expected a folder, found a file"),
        (["generate", "--batch", "{tmp}/dup.jsonl"], "dup.jsonl:2: id 'a' is used by line 1 too"),
        (
            ["generate", "--batch", "{tmp}/types.jsonl"],
            "types.jsonl:1: num_inference_steps must be a positive integer, got 'many'",
        ),
        (["generate", "--batch", "{tmp}/mods.jsonl"], "mods.jsonl:1: modalities: unknown output modality 'smell'"),
        (["generate", "--batch", "{tmp}/both.jsonl"], "both.jsonl:1: 'steps' and 'num_inference_steps' name the same"),
        (["generate", "--batch", "{tmp}/field.jsonl"], "field.jsonl:1: unknown fields ['colour']; allowed: ["),
        (["generate", "--batch", "{tmp}/range.jsonl"], "range.jsonl:2: top_p must be a finite number in (0, 1], got 2"),
        (["generate", "--batch", "{tmp}/media.jsonl"], "media.jsonl:1: images[0]: expected a file path or an Image"),
        (["generate", "--batch", "{tmp}/gone.jsonl"], "gone.jsonl:1: --image {tmp}/nope.png: expected a readable file"),
        (["generate", "x", "--model", "no-such-model"], "unknown model 'no-such-model'"),
        (["generate", "--batch", "{tmp}/bad.jsonl"], "bad.jsonl:2: not valid JSON"),
        (["generate"], "a PROMPT or --batch FILE is required"),
        (["generate", "x", "--adapters", "image"], "unknown LoRA adapter 'image': this model has default"),
        (["generate", "--batch", "{tmp}/adapters.jsonl"], "adapters.jsonl:1: adapters must be a name, a comma-sep"),
        (["generate", "x", "--height", "60"], "height must be a multiple of 8 (the VAE's downsampling), got 60"),
        (["generate", "x", "--temperature", "-1"], "temperature must be a finite number >= 0 (0 = greedy), got -1.0"),
        (["generate", "x", "--dtype", "float8"], "dtype: expected one of float32, float16, bfloat16, got 'float8'"),
        (["generate", "x", "--offload", "model"], "offload 'model' moves components to an accelerator"),
        (["generate", "x", "--offload", "all"], f"offload: expected one of {', '.join(OFFLOAD_PLANS)}, got 'all'"),
        (["generate", "x", "--quantize", "3bit"], "quantize: expected one of 8bit, 4bit or none, got '3bit'"),
        (["info", "nonsense"], "unknown topic 'nonsense'"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, use_tiny, media_files, args, message):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "fine"}\n{"prompt": \n')
    (tmp_path / "dup.jsonl").write_text('{"prompt": "one", "id": "a"}\n{"prompt": "two", "id": "a"}\n')
    (tmp_path / "types.jsonl").write_text('{"prompt": "one", "steps": "many"}\n')
    (tmp_path / "mods.jsonl").write_text('{"prompt": "one", "modalities": "smell"}\n')
    (tmp_path / "adapters.jsonl").write_text('{"prompt": "one", "adapters": 3}\n')
    (tmp_path / "both.jsonl").write_text('{"prompt": "one", "steps": 2, "num_inference_steps": 3}\n')
    (tmp_path / "field.jsonl").write_text('{"prompt": "one", "colour": "red"}\n')
    (tmp_path / "range.jsonl").write_text('{"prompt": "one"}\n{"prompt": "two", "top_p": 2}\n')
    (tmp_path / "media.jsonl").write_text('{"prompt": "one", "images": [3]}\n')
    (tmp_path / "gone.jsonl").write_text('{"prompt": "one", "images": "nope.png"}\n')
    out = tmp_path / "out"
    fill = {"tmp": str(tmp_path), "wav": str(media_files["audio"])}
    argv = [a.format(**fill) for a in args]
    if argv[0] == "generate":
        argv += ["--max-new-tokens", "2", "--steps", "2"] + ([] if "--out" in argv else ["--out", str(out)])
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2
    lines = err.splitlines()
    assert lines[-1].startswith("anygpt: error: ") and message.format(**fill) in lines[-1]
    if message in FOUND_AFTER_LOADING:  # the model is needed to find these: the loading line came first
        model = argv[argv.index("--model") + 1] if "--model" in argv else "toyworld"
        assert lines[:-1] == [f"anygpt: loading {model} (cpu) ..."]
    else:  # found before anything loads: the error is the only line
        assert len(lines) == 1
    if out.is_dir():
        assert not any(out.iterdir())


def test_with_quiet_an_error_found_after_loading_is_one_line_too(tmp_path, capsys):
    assert cli.main(["generate", "x", "--model", "no-such-model", "--out", str(tmp_path), "--quiet"]) == 2
    assert capsys.readouterr().err == (
        "anygpt: error: unknown model 'no-such-model': not a folder, and presets are nextgpt-7b, tiny, toyworld\n"
    )


def test_info_lists_registries(capsys):
    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    assert "input_projectors: cabstractor, group, linear, mlp, perceiver, qformer" in text
    assert "output_projectors: linear, qformer, transformer" in text
    assert "presets: " in text and "tiny" in text


def test_info_projectors_describes_every_registered_connector(capsys):
    from projectors import list_input_projectors, list_output_projectors

    assert cli.main(["info", "projectors"]) == 0
    text = capsys.readouterr().out
    for name in {*list_input_projectors(), *list_output_projectors(), "cross_attention"}:
        line = next(line for line in text.splitlines() if line.strip().startswith(name + " "))
        assert len(line.split(None, 1)[1]) > 20, line  # a description, not just the name
    assert "--set input_projector=NAME" in text and "--set output_projector=NAME" in text


def test_batch_lines_are_generation_requests(tmp_path, use_tiny, tiny_pipe):
    """A batch line is ``GenerationRequest.to_dict()`` (the old short names still read), media relative to the file;
    each line gives what the pipeline gives for the same request."""
    from anygpt.core.request import GenerationRequest

    (tmp_path / "in.png").write_bytes(b"")  # only its presence is checked before the run; not used below
    request = GenerationRequest("draw", modalities=["image"], seed=3, num_inference_steps=2, max_new_tokens=3, id="a")
    legacy = {"prompt": "draw", "modalities": "image", "seed": 3, "steps": 2, "max_new_tokens": 3, "id": "b"}
    batch = tmp_path / "b.jsonl"
    batch.write_text(json.dumps(request.to_dict()) + "\n" + json.dumps(legacy) + "\n")
    read = generate_command.read_batch(batch)
    assert read[0] == request and read[1] == GenerationRequest(**{**request.to_dict(), "id": "b"})
    assert read[0].origin == f"{batch}:1: "
    default_seed = tmp_path / "c.jsonl"
    default_seed.write_text('{"prompt": "x", "images": "in.png"}\n')
    (only,) = generate_command.read_batch(default_seed)
    assert only.seed == 0 and only.images == [str(tmp_path / "in.png")]  # the command line's seed; resolved path
    records = generate_command.generate_batch(read, model="tiny", out=tmp_path / "out")
    expected = tiny_pipe("draw", modalities="image", seed=3, num_inference_steps=2, max_new_tokens=3)
    assert [r["text"] for r in records] == [expected.text] * 2
    assert load_image(records[0]["images"][0]).tobytes() == load_image(records[1]["images"][0]).tobytes()


def test_runtime_flags_parse_into_runtime_options():
    parser, module = cli.build_parser(["generate"])
    args = parser.parse_args(["generate", "x"])
    assert generate_command.runtime_options(args) is None  # nothing asked: from_pretrained's defaults
    flags = ["--device", "cuda:1", "--dtype", "float16", "--offload", "model", "--quantize", "4bit", "--compile"]
    args = parser.parse_args(["generate", "x", *flags, "--quantization-backend", "bitsandbytes"])
    assert generate_command.runtime_options(args) == RuntimeOptions(
        device="cuda:1", dtype="float16", offload="model", quantize="4bit", quantization_backend="bitsandbytes",
        compile=True,
    )  # fmt: skip
    assert generate_command.runtime_options(parser.parse_args(["generate", "x", "--quantize", "none"])) is None


def test_device_and_dtype_reach_the_loaded_pipeline(tmp_path, capsys, monkeypatch):
    """``--device cpu --dtype bfloat16`` loads the tiny preset in bfloat16 and generates with it."""
    loaded = []
    real = generate_command.load_pipeline
    monkeypatch.setattr(generate_command, "load_pipeline", lambda m, r=None: loaded.append(real(m, r)) or loaded[-1])
    argv = ["generate", "hi", "--model", "tiny", "--device", "cpu", "--dtype", "bfloat16", "--modalities", "image",
            "--steps", "1", "--max-new-tokens", "2", "--out", str(tmp_path), "--json"]  # fmt: skip
    assert cli.main(argv) == 0
    (pipe,) = loaded
    llm_dtypes = {p.dtype for p in pipe.model.language_model.parameters()}
    assert llm_dtypes == {torch.bfloat16} and pipe.device.type == "cpu"
    assert pipe.decoders[next(iter(pipe.decoders))].dtype == torch.bfloat16
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert load_image(result["images"][0]).size == (64, 64)


# ---------------------------------------------------------------------------------------------------- the dispatcher
def test_help_lists_every_command_without_importing_them():
    code = textwrap.dedent(
        """
        import contextlib, io, sys
        from anygpt.cli import main
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            try:
                main(["--help"])
            except SystemExit as stop:
                assert stop.code == 0
        print(out.getvalue())
        heavy = ("training", "toyworld", "anygpt.apps", "anygpt.core", "torch", "diffusers")
        print("IMPORTED", sorted(m for m in sys.modules if m.startswith(heavy)))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for name, command in cli.available_commands().items():
        assert f"{name}  " in out and command.help.split()[0] in out
    assert out.strip().splitlines()[-1] == "IMPORTED []"


def test_generate_imports_nothing_of_training_or_the_toy_world(tmp_path):
    code = textwrap.dedent(
        f"""
        import sys
        from anygpt.cli import main
        status = main(["generate", "hi", "--model", "tiny", "--modalities", "", "--max-new-tokens", "2",
                       "--out", {str(tmp_path)!r}])
        print("STATUS", status)
        print("IMPORTED", sorted(m for m in sys.modules if m.split(".")[0] in ("training", "toyworld")))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.splitlines()[-2:] == ["STATUS 0", "IMPORTED []"], result.stderr[-2000:]


def test_table_helps_match_the_command_modules():
    import importlib

    for name, command in cli.available_commands().items():
        module = importlib.import_module(command.module)
        assert module.COMMANDS[name] == command.help, name
        assert callable(module.add_arguments) and callable(module.run)


@pytest.fixture()
def fake_command(tmp_path, monkeypatch):
    """A command module ``fakecmd`` on the path, whose ``run`` raises what ``--raise`` names."""
    (tmp_path / "fakecmd.py").write_text(
        textwrap.dedent(
            """
            from anygpt.base.errors import CheckpointError, TrainingError
            from anygpt.base.logs import get_verbosity, is_progress_bar_enabled
            COMMANDS = {"fake": "a command for the tests"}
            def add_arguments(command, parser):
                parser.add_argument("--raise", dest="error", default=None)
                parser.add_argument("--report", action="store_true")
            def run(args):
                if args.report:
                    print(get_verbosity(), is_progress_bar_enabled())
                errors = {"checkpoint": CheckpointError("w.safetensors: key x: expected (2, 3)\\nfound (3, 2)"),
                          "training": TrainingError("loss is nan at step 3"), "interrupt": KeyboardInterrupt(),
                          "os": OSError("disk full")}
                if args.error:
                    raise errors[args.error]
                return 3
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    commands = {**cli.COMMANDS, "fake": cli.Command("fakecmd", "a command for the tests"),
                "ghost": cli.Command("anygpt.apps.no_such_module", "not installed")}  # fmt: skip
    monkeypatch.setattr(cli, "COMMANDS", commands)


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["fake"], 3, ""),
        (["fake", "--raise", "checkpoint"], 2, "anygpt: error: w.safetensors: key x: expected (2, 3)\n"),
        (["fake", "--raise", "os"], 2, "anygpt: error: disk full\n"),
        (["fake", "--raise", "training"], 1, "anygpt: training stopped: loss is nan at step 3\n"),
        (["fake", "--raise", "interrupt"], 130, "anygpt: interrupted\n"),
        (["ghost"], 2, "anygpt: error: command 'ghost' is not available: its module anygpt.apps.no_such_module is"),
    ],
)
def test_dispatcher_runs_the_chosen_module_and_reports_errors(fake_command, capsys, argv, code, message):
    assert cli.main(argv) == code
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == (1 if message else 0)


def test_a_missing_command_module_is_left_out_of_the_help(fake_command, capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "fake " in out and "a command for the tests" in out and "ghost" not in out


def test_a_command_prints_no_import_notices_of_optional_backends():
    """torchao and bitsandbytes announce themselves while diffusers imports them; a user's command stays quiet.
    (``anygpt info decoders`` imports diffusers.)"""
    done = subprocess.run(
        [sys.executable, "-m", "anygpt", "info", "decoders"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and done.stdout.startswith("decoders: ")
    assert done.stderr == ""


def test_batch_size_answers_the_same_requests_together(tmp_path, capsys, use_tiny):
    """``--batch-size 3`` runs ``run_batch`` on the file's requests: same texts and the same files as one by one
    (greedy tokens are the same; media within the rounding run_batch documents)."""
    batch = tmp_path / "prompts.jsonl"
    lines = [{"prompt": p, "modalities": ["image"], "max_new_tokens": 3, "seed": 5} for p in ("a", "bb c", "dd")]
    batch.write_text("".join(json.dumps(line) + "\n" for line in lines))
    records = {}
    for size in (1, 3):
        out = tmp_path / f"out{size}"
        assert (
            cli.main(["generate", "--batch", str(batch), "--out", str(out), "--json", "--batch-size", str(size)]) == 0
        )
        records[size] = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert [r["text"] for r in records[3]] == [r["text"] for r in records[1]]
    for one, together in zip(records[1], records[3], strict=True):
        a = np.asarray(Image.open(one["images"][0]), dtype=np.int16)
        b = np.asarray(Image.open(together["images"][0]), dtype=np.int16)
        assert a.shape == b.shape and np.abs(a - b).max() <= 2
    assert cli.main(["generate", "--batch", str(batch), "--batch-size", "0"]) == 2
    assert "--batch-size: expected an integer >= 1, got 0" in capsys.readouterr().err


def test_version_reads_the_metadata_and_imports_nothing_heavy():
    from importlib.metadata import version

    code = textwrap.dedent(
        """
        import contextlib, io, sys
        from anygpt.cli import main
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            try:
                main(["--version"])
            except SystemExit as stop:
                assert stop.code == 0
        print(out.getvalue().strip())
        print("IMPORTED", sorted(m for m in sys.modules if m.startswith(("torch", "anygpt.core", "anygpt.apps"))))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == [f"anygpt {version('anygpt')}", "IMPORTED []"]


def test_info_presets_says_what_each_model_is(capsys):
    from anygpt.apps.info import PRESET_SUMMARIES
    from anygpt.core.config import DEFAULT_MODEL, list_presets

    assert set(PRESET_SUMMARIES) == set(list_presets())  # a new preset needs its line
    assert cli.main(["info", "presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("presets: ") and len(lines) == 1 + len(list_presets())
    for name, line in zip(list_presets(), lines[1:], strict=True):
        assert line.split()[0] == f"{name}:" and PRESET_SUMMARIES[name] in line and "->" in line
        assert line.endswith("(default)") == (name == DEFAULT_MODEL)


def test_info_presets_imports_nothing_heavy():
    """``anygpt info presets`` answers without torch, diffusers or the models' code (it took 8-13 s with them)."""
    code = textwrap.dedent(
        """
        import contextlib, io, sys
        from anygpt.cli import main
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            status = main(["info", "presets"])
        print("STATUS", status, out.getvalue().splitlines()[0])
        heavy = ("torch", "diffusers", "transformers", "decoders", "encoders", "projectors", "anygpt.core")
        print("IMPORTED", sorted(m for m in sys.modules if m.startswith(heavy)))
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines() == [
        "STATUS 0 presets: the names --model takes (or a folder written by save_pretrained)",
        "IMPORTED []",
    ]
    assert done.stderr == ""


def test_info_light_constants_agree_with_the_core():
    """``anygpt.apps.info`` repeats a few names of the core so that it imports none of it; they must agree."""
    from anygpt.apps import info
    from anygpt.core import config, runtime

    assert info.DEFAULT_MODEL == config.DEFAULT_MODEL
    assert info.PLAN_VALUES == {
        "dtype": runtime.DTYPES, "offload": runtime.OFFLOAD_PLANS, "quantize": runtime.QUANTIZATIONS,
    }  # fmt: skip
    parser, _ = cli.build_parser(["info"])
    assert parser.parse_args(["info"]).model == config.DEFAULT_MODEL


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (
            ["generate", "x", "--steps", "abc"],
            "anygpt generate: error: argument --steps: invalid int value: 'abc' (see anygpt generate --help)\n",
        ),
        (
            ["info", "--memory", "--dtype"],
            "anygpt info: error: argument --dtype: expected one argument (see anygpt info --help)\n",
        ),
        (["nonsense"], "anygpt: error: argument COMMAND: invalid choice: 'nonsense' (choose from "),
        (
            ["generate", "x", "--no-such-option"],
            "anygpt: error: unrecognized arguments: --no-such-option (see anygpt --help)\n",
        ),
        ([], "anygpt: error: the following arguments are required: COMMAND (see anygpt --help)\n"),
        (["-v", "info", "-q"], "anygpt: error: -v/--verbose and -q/--quiet exclude each other (see anygpt --help)\n"),
    ],
)
def test_a_bad_option_is_one_line_and_exits_2(capsys, argv, line):
    """argparse's errors are one line (issue 22), not a usage block, for ``anygpt`` and every command."""
    with pytest.raises(SystemExit) as stop:
        cli.main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(line) and err.count("\n") == 1


@pytest.mark.parametrize(
    ("argv", "reported"),
    [
        (["fake", "--report"], "30 True"),  # WARNING, the command's own progress shown
        (["-v", "fake", "--report"], "20 True"),  # INFO
        (["fake", "--report", "--verbose"], "20 True"),
        (["fake", "--report", "-q"], "40 False"),  # ERROR, no progress
        (["--quiet", "fake", "--report"], "40 False"),
    ],
)
def test_verbose_and_quiet_set_anygpt_verbosity_while_the_command_runs(fake_command, capsys, argv, reported):
    from anygpt.base.logs import get_verbosity, is_progress_bar_enabled

    before = (get_verbosity(), is_progress_bar_enabled())
    assert cli.main(argv) == 3
    assert capsys.readouterr().out.strip() == reported
    assert (get_verbosity(), is_progress_bar_enabled()) == before  # put back when the command returns


def test_anygpt_verbosity_in_the_environment_is_the_commands_default(fake_command, capsys, monkeypatch):
    monkeypatch.setenv("ANYGPT_VERBOSITY", "info")
    assert cli.main(["fake", "--report"]) == 3 and capsys.readouterr().out.strip() == "20 True"
    assert cli.main(["fake", "--report", "-q"]) == 3 and capsys.readouterr().out.strip() == "40 False"
    monkeypatch.setenv("ANYGPT_VERBOSITY", "loud")
    assert cli.main(["fake", "--report"]) == 2
    assert capsys.readouterr().err == (
        "anygpt: error: ANYGPT_VERBOSITY: expected one of debug, info, warning, error, critical or a logging level "
        "(0..50, e.g. logging.INFO), got 'loud'\n"
    )


def test_generate_says_what_it_loads_then_shows_each_decoders_progress(tmp_path, capsys, monkeypatch, tiny_pipe):
    """Before the model loads, one line on stderr says what loads; then each decoder's progress bar, labelled with
    its modality; ``--quiet`` leaves stderr empty."""
    said_before_loading = []

    def load(model, runtime=None):
        said_before_loading.append(capsys.readouterr().err)
        return tiny_pipe

    monkeypatch.setattr(generate_command, "load_pipeline", load)
    argv = ["generate", "hi", "--model", "tiny", "--modalities", "image,audio", "--steps", "2", "--max-new-tokens",
            "2", "--out", str(tmp_path)]  # fmt: skip
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert said_before_loading == ["anygpt: loading tiny (cpu) ...\n"]
    image, audio = err.find("image: 100%"), err.find("audio: 100%")
    assert 0 <= image < audio and "| 2/2 [" in err
    for quiet in (["--quiet"], ["-q"]):
        assert cli.main([*argv, *quiet]) == 0
        assert capsys.readouterr().err == "" and said_before_loading[-1] == ""
    assert len(list(tmp_path.glob("*_image0.png"))) == 3


def test_a_sigterm_raised_where_python_cannot_raise_still_ends_the_command_as_terminated(monkeypatch, capsys):
    """A SIGTERM whose ``Terminated`` lands in a ``__del__`` or a fork handler is printed by Python as "Exception
    ignored" and lost; the command then ends as terminated (143) once it returns, with no traceback printed."""
    import anygpt.apps.info as info_module
    from anygpt import cli

    class Dying:
        def __del__(self):
            raise cli.Terminated()

    def run(args):
        Dying()  # collected at once: its exception is unraisable
        return 0

    import sys

    hook = sys.unraisablehook
    monkeypatch.setattr(cli, "SIGTERM_AS_INTERRUPT", frozenset({"info"}))
    monkeypatch.setattr(info_module, "run", run)
    assert cli.main(["info", "presets"]) == 143
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "anygpt: terminated" and "Traceback" not in err and "ignored" not in err
    assert sys.unraisablehook is hook  # put back after the command
