"""The README's examples, run so they stay true (issue 20).

Every fenced block of ``README.md`` is found and given a stable key: a shell block one key per command (the line
without its trailing comment), any other block its language and first line. Each key is either run here, with what
the README claims about it asserted (its comments, and the answers its tables promise for the default model), or
listed in ``SKIPPED`` with the reason. A block or command that is neither, or a list entry the README no longer has,
fails ``test_every_readme_block_is_run_or_skipped_with_a_reason``: a new example cannot slip in untested.

The examples run against the shipped default model ``toyworld``, each shell block in a fresh temporary folder (as a
user's session: a later command may use an earlier one's files), the Python block in one too. Commands that load a
model run in this process through ``anygpt.cli.main``, the ``anygpt`` console script's entry point (checked below):
a fresh process spends 20-30 s importing torch and diffusers on a busy 2-core machine, the in-process call a second
or two. ``anygpt --version`` runs as the installed command itself.
"""

from __future__ import annotations

import ast
import io
import json
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points, version
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
ANYGPT = Path(sys.executable).parent / "anygpt"
"""The venv's installed ``anygpt`` command."""


# ---------------------------------------------------------------------------------------------------- the blocks
@dataclass(frozen=True)
class Block:
    """One fenced code block of the README."""

    lang: str
    line: int
    """The 1-based line of its opening fence."""
    body: str

    @property
    def first_line(self) -> str:
        return next(line.strip() for line in self.body.splitlines() if line.strip())

    @property
    def is_shell(self) -> bool:
        return self.lang in ("bash", "sh", "shell")

    def keys(self) -> list[str]:
        """A shell block's commands (each line without its comment), or ``"LANG: FIRST LINE"`` for any other."""
        if self.is_shell:
            return [command for command in map(strip_comment, self.body.splitlines()) if command]
        return [f"{self.lang or 'text'}: {self.first_line}"]


def strip_comment(line: str) -> str:
    """A shell line without its trailing ``# comment`` (a ``#`` inside quotes is kept)."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].strip()
    return line.strip()


def readme_blocks(text: str) -> list[Block]:
    """The fenced blocks of ``text``, in order."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        opening = re.match(r"^```(\S*)\s*$", lines[i])
        if opening:
            end = next((j for j in range(i + 1, len(lines)) if lines[j].rstrip() == "```"), None)
            assert end is not None, f"README.md:{i + 1}: a fenced block that never closes"
            blocks.append(Block(opening.group(1), i + 1, "\n".join(lines[i + 1 : end])))
            i = end
        i += 1
    return blocks


def table_answers(text: str) -> dict[str, str]:
    """The README's "you say | it answers" table: a row's first quoted request -> its first quoted answer (rows whose
    answer quotes nothing, such as "the last item, changed", are left out)."""
    answers = {}
    for said, answer in re.findall(r'^\| (".+?) \| (.+?) \|$', text, flags=re.M):
        replies = re.findall(r'"([^"]+)"', answer)
        if replies:
            answers[re.match(r'"([^"]+)"', said).group(1)] = replies[0]
    return answers


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))
SHELL_BLOCKS = [block for block in BLOCKS if block.is_shell]
ANSWERS = table_answers(README.read_text(encoding="utf-8"))
"""What the README promises the default model answers, by request."""


# ---------------------------------------------------------------------------------------------------- what is skipped
SKIPPED = {
    "make run": "creates .venv (about 6 GB, pip install) before answering; its request, the default model and seed "
    "are run with the oracles by tests/test_toyworld.py::test_make_run_request_gives_its_three_files",
    "make test": "runs the whole test suite (minutes), this file included",
    "anygpt serve --model toyworld --api-key KEY": "a server that runs until stopped; tests/test_serve.py starts the "
    "same app on loopback with a key and sends it these requests with the openai package and httpx",
    'curl -s http://127.0.0.1:8000/v1/chat/completions -H "Authorization: Bearer KEY" -H "Content-Type: '
    'application/json" -d \'{"model": "toyworld", "messages": [{"role": "user", "content": "draw a red circle"}]}\'': (
        "needs the server above running; tests/test_serve.py sends the same chat request over HTTP"
    ),
}
"""README keys that are not run, each with why. Every other key must have a runner below."""


# ---------------------------------------------------------------------------------------------------- shell commands
@dataclass
class Ran:
    """What one command did: its exit status, its output and the folder it ran in."""

    code: int
    out: str
    err: str
    cwd: Path


CHAT_INPUT = "/image outputs/gen-0001_image0.png\nwhat is in this image?\ndraw a red circle\nnow make it blue\n"
"""The lines typed into ``anygpt chat`` (the README's comment: ``/image PATH attaches a file``), then two turns."""


def _image(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _answer_image(ran: Ran, path: str, colour: str, shape: str) -> None:
    from toyworld.oracles import image_attributes

    image = _image(ran.cwd / path)
    assert image.shape == (64, 64, 3), path  # the README's table: 64 x 64 px
    assert image_attributes(image) == {"colour": colour, "shape": shape}, path


def check_generate_red_circle(ran: Ran) -> None:
    """``# prints text and paths``: the table's answer to "draw a red circle", and the image it names."""
    assert ran.out == f"text: {ANSWERS['draw a red circle']}\nimage: outputs/gen-0001_image0.png\n"
    _answer_image(ran, "outputs/gen-0001_image0.png", "red", "circle")


def check_caption_json(ran: Ran) -> None:
    """The table: "what is in this image?" with the red circle answers "It is a red circle." (and no media)."""
    assert json.loads(ran.out) == {"text": ANSWERS["what is in this image?"], "images": [], "videos": [], "audios": []}


def check_batch_file(ran: Ran) -> None:
    lines = (ran.cwd / "prompts.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"prompt": "draw a blue square"}, {"prompt": "play a high beep"}]


def check_batch(ran: Ran) -> None:
    """``# one result line each``: one line per request of prompts.jsonl, numbered after the earlier run's file."""
    from anygpt.base.media import load_audio
    from toyworld.oracles import audio_attributes

    assert ran.out.splitlines() == [
        "gen-0002: 'Here is a blue square.' -> outputs/gen-0002_image0.png",
        f"gen-0003: {ANSWERS['play a high beep']!r} -> outputs/gen-0003_audio0.wav",
    ]
    _answer_image(ran, "outputs/gen-0002_image0.png", "blue", "square")
    audio = load_audio(ran.cwd / "outputs/gen-0003_audio0.wav")
    assert (audio.sample_rate, audio.waveform.shape) == (16000, (16000,))  # 1 s, 16 kHz mono
    assert audio_attributes(audio) == {"pitch": "high", "style": "pulsed"}
    results = [json.loads(line) for line in (ran.cwd / "outputs/results.jsonl").read_text().splitlines()]
    assert [r["text"] for r in results] == ["Here is a blue square.", ANSWERS["play a high beep"]]


def check_chat(ran: Ran) -> None:
    """The attached image is captioned, then a second turn changes the item the first made."""
    replies = [line for line in ran.out.splitlines() if line.startswith(("anygpt> ", "  image: "))]
    assert replies == [
        f"anygpt> {ANSWERS['what is in this image?']}",
        f"anygpt> {ANSWERS['draw a red circle']}",
        "  image: outputs/chat/chat-0001_image0.png",
        "anygpt> Here is a blue circle.",
        "  image: outputs/chat/chat-0002_image0.png",
    ]
    assert "attached image gen-0001_image0.png" in ran.out
    _answer_image(ran, "outputs/chat/chat-0001_image0.png", "red", "circle")
    _answer_image(ran, "outputs/chat/chat-0002_image0.png", "blue", "circle")


def check_info(ran: Ran) -> None:
    """``# presets, projectors, decoders, encoders``; the presets are the README's table of models."""
    rows = dict(line.split(": ", 1) for line in ran.out.splitlines())
    assert list(rows) == ["presets", "input_projectors", "output_projectors", "decoders", "encoders"]
    table = re.findall(r"^\| `([^`]+)`", README.read_text(encoding="utf-8"), flags=re.M)
    assert sorted(rows["presets"].split(", ")) == sorted(table) == ["nextgpt-7b", "tiny", "toyworld"]


def check_data_sample(ran: Ran) -> None:
    """``# a small dataset in NExT-GPT's formats + stage1-3.yaml``."""
    root = ran.cwd / "data/sample"
    for stage in (1, 2, 3):
        assert (root / f"stage{stage}.yaml").is_file()
        assert f"anygpt train --stage {stage} --config {root / f'stage{stage}.yaml'}" in ran.out
    assert (root / "IT_data").is_dir() and (root / "T_X_pair_data").is_dir()  # NExT-GPT's folder names


def check_train(ran: Ran) -> None:
    final = ran.cwd / "runs/ft/final"
    assert (final / "anygpt_index.json").is_file()
    assert f"final model: {final}" in ran.out


def check_generate_fine_tuned(ran: Ran) -> None:
    """The fine-tuned folder loads and makes the one image asked for (the README claims no particular words)."""
    lines = ran.out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("text: "), ran.out
    assert lines[1] == "image: outputs/gen-0001_image0.png"
    assert _image(ran.cwd / "outputs/gen-0001_image0.png").shape == (64, 64, 3)


RUN: dict[str, Callable[[Ran], None]] = {
    'anygpt generate "draw a red circle" --modalities image --out outputs': check_generate_red_circle,
    'anygpt generate "what is in this image?" --image outputs/gen-0001_image0.png --json': check_caption_json,
    'printf \'{"prompt": "draw a blue square"}\\n{"prompt": "play a high beep"}\\n\' > prompts.jsonl': (
        check_batch_file
    ),
    "anygpt generate --batch prompts.jsonl --out outputs": check_batch,
    "anygpt chat": check_chat,
    "anygpt info": check_info,
    ".venv/bin/anygpt data sample data/sample": check_data_sample,
    ".venv/bin/anygpt train --stage 3 --config data/sample/stage3.yaml --from toyworld --output-dir runs/ft": (
        check_train
    ),
    '.venv/bin/anygpt generate "draw a red circle" --model runs/ft/final --modalities image': (
        check_generate_fine_tuned
    ),
}
"""Shell commands of the README that are run, each with the check of what it did."""

STDIN = {"anygpt chat": CHAT_INPUT}
"""What a command reads on stdin (the user's typing)."""


def run_command(command: str, cwd: Path, monkeypatch, capsys) -> Ran:
    """Run one README command in ``cwd``: ``anygpt ...`` through ``anygpt.cli.main``, anything else in bash."""
    from anygpt import cli

    argv = shlex.split(command)
    if argv[0] not in ("anygpt", ".venv/bin/anygpt"):
        done = subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True, text=True, timeout=60)
        return Ran(done.returncode, done.stdout, done.stderr, cwd)
    monkeypatch.setattr(sys, "stdin", io.StringIO(STDIN.get(command, "")))
    capsys.readouterr()
    code = cli.main(argv[1:])
    captured = capsys.readouterr()
    return Ran(code, captured.out, captured.err, cwd)


# ---------------------------------------------------------------------------------------------------- the tests
def test_every_readme_block_is_run_or_skipped_with_a_reason():
    keys = [key for block in BLOCKS for key in block.keys()]
    known = set(RUN) | set(SKIPPED) | set(PYTHON_BLOCKS) | set(OTHER_BLOCKS)
    unknown = [key for key in keys if key not in known]
    assert not unknown, f"README blocks neither run nor skipped with a reason here: {unknown}"
    stale = sorted(known - set(keys))
    assert not stale, f"listed here but no longer in README.md: {stale}"
    assert len(keys) == len(set(keys)), "a README command or block appears twice; give each a distinct key"
    assert all(reason.strip() for reason in SKIPPED.values())


def test_the_readme_table_of_answers_is_read():
    """The answers the checks compare with come from the README's table (a test that read none could not fail)."""
    assert ANSWERS["draw a red circle"] == "Here is a red circle."
    assert ANSWERS["play a high beep"] == "Here is a high beep."
    assert ANSWERS["show a green square moving left"] == "Here is a green square moving left."
    assert ANSWERS["what is in this image?"] == "It is a red circle."


def test_the_block_finder_sees_fences_and_comments():
    """The parser behind the check above: fences with and without a language, comments cut, quoted ``#`` kept."""
    text = "x\n```bash\nanygpt info   # a comment\n\necho '#1' > f  # two\n```\n```\nplain\n```\n"
    blocks = readme_blocks(text)
    assert [(b.lang, b.line) for b in blocks] == [("bash", 2), ("", 7)]
    assert blocks[0].keys() == ["anygpt info", "echo '#1' > f"]
    assert blocks[1].keys() == ["text: plain"]
    with pytest.raises(AssertionError, match="never closes"):
        readme_blocks("```python\nprint(1)\n")


def test_the_anygpt_command_is_cli_main_and_prints_its_version():
    """The commands below call ``anygpt.cli.main`` in-process: it is what the installed ``anygpt`` runs. The
    README's ``anygpt --version`` (in the Command line block's comment) runs as the real command."""
    (script,) = [ep for ep in entry_points(group="console_scripts") if ep.name == "anygpt"]
    assert script.value == "anygpt.cli:main"
    assert ANYGPT.is_file(), f"{ANYGPT} is missing: install the project into this venv"
    done = subprocess.run([str(ANYGPT), "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"anygpt {version('anygpt')}\n"


@pytest.mark.parametrize("block", SHELL_BLOCKS, ids=[f"line{b.line}" for b in SHELL_BLOCKS])
def test_shell_block(block, tmp_path, monkeypatch, capsys):
    """Each command of the block, in order, in one fresh folder: exit 0 and what the README says it does."""
    monkeypatch.chdir(tmp_path)
    commands = [key for key in block.keys() if key not in SKIPPED]
    if not commands:
        pytest.skip(f"README.md:{block.line}: every command skipped: {[SKIPPED[k] for k in block.keys()]}")
    for command in commands:
        assert command in RUN, f"README.md:{block.line}: no runner for {command!r}"
        ran = run_command(command, tmp_path, monkeypatch, capsys)
        assert ran.code == 0, f"{command}: exit {ran.code}\n{ran.err[-2000:]}"
        RUN[command](ran)


# ---------------------------------------------------------------------------------------------------- Python
def run_like_a_session(source: str, namespace: dict) -> dict[str, object]:
    """Execute ``source`` statement by statement, as typed at a prompt: the value of each expression statement,
    keyed by its code (without its comment)."""
    values = {}
    for statement in ast.parse(source).body:
        code = ast.get_source_segment(source, statement)
        if isinstance(statement, ast.Expr):
            values[code] = eval(compile(ast.Expression(statement.value), "README.md", "eval"), namespace)
        else:
            exec(compile(ast.Module([statement], type_ignores=[]), "README.md", "exec"), namespace)
    return values


def check_first_answer(value, cwd: Path) -> None:
    """``str, [PIL.Image], [Video(frames, fps)], [Audio(waveform, sample_rate)]``; "auto" made an image and a sound."""
    from anygpt import Audio
    from toyworld.oracles import audio_attributes, image_attributes

    text, images, videos, audios = value
    assert text == f"{ANSWERS['draw a red circle']} {ANSWERS['play a high beep']}"  # the table's answers, in order
    assert len(images) == 1 and isinstance(images[0], Image.Image) and images[0].size == (64, 64)
    assert image_attributes(images[0]) == {"colour": "red", "shape": "circle"}
    assert videos == []
    assert len(audios) == 1 and isinstance(audios[0], Audio)
    assert (audios[0].sample_rate, audios[0].waveform.shape) == (16000, (16000,))
    assert audio_attributes(audios[0]) == {"pitch": "high", "style": "pulsed"}


def check_saved_circle(value, cwd: Path) -> None:
    assert value is None
    from toyworld.oracles import image_attributes

    assert image_attributes(_image(cwd / "circle.png")) == {"colour": "red", "shape": "circle"}


def check_caption(value, cwd: Path) -> None:
    assert value == ANSWERS["what is in this image?"]


def check_forced_video(value, cwd: Path) -> None:
    """Exactly one video: 8 frames of 64 x 64 px at 8 fps, a green square moving left."""
    from anygpt import Video
    from toyworld.oracles import video_attributes

    assert len(value) == 1 and isinstance(value[0], Video)
    assert value[0].frames.shape == (8, 64, 64, 3) and value[0].fps == 8
    assert video_attributes(value[0]) == {"colour": "green", "direction": "left"}


def check_first_turn(value, cwd: Path) -> None:
    assert value.text == ANSWERS["draw a red circle"] and len(value.images) == 1


def check_second_turn(value, cwd: Path) -> None:
    """ "now make it blue": the last item, changed (no seed: the image's pixels are not reproducible, its words are)."""
    assert value.text == "Here is a blue circle."
    assert len(value.images) == 1 and value.images[0].size == (64, 64)
    assert value.videos == [] and value.audios == []


def check_saved_model(value, cwd: Path) -> None:
    """``# trained parts only + anygpt_index.json; loads on any machine``: the folder loads and answers alike."""
    from anygpt import AnyGPTPipeline

    assert value is None
    assert (cwd / "my-model/anygpt_index.json").is_file()
    reloaded = AnyGPTPipeline.from_pretrained("my-model")
    assert reloaded("what is in this image?", images=["circle.png"]).text == ANSWERS["what is in this image?"]


PYTHON_BLOCKS: dict[str, dict[str, Callable[[object, Path], None]]] = {
    "python: from anygpt import AnyGPTPipeline, Conversation": {
        "out.text, out.images, out.videos, out.audios": check_first_answer,
        'out.images[0].save("circle.png")': check_saved_circle,
        'pipe("what is in this image?", images=["circle.png"]).text': check_caption,
        'pipe("show a green square moving left", modalities=["video"], seed=0).videos': check_forced_video,
        'pipe("draw a red circle", conversation=conv)': check_first_turn,
        'pipe("now make it blue", modalities="image", conversation=conv)': check_second_turn,
        'pipe.save_pretrained("my-model")': check_saved_model,
    },
}
"""Python blocks, by key: the check of every expression statement's value (what the README's comments claim)."""


@pytest.mark.parametrize("key", list(PYTHON_BLOCKS))
def test_python_block(key, tmp_path, monkeypatch):
    """The block runs as written in a fresh folder; every expression statement is checked, none left unchecked."""
    (block,) = [block for block in BLOCKS if block.keys() == [key]]
    monkeypatch.chdir(tmp_path)
    values = run_like_a_session(block.body, {"__name__": "__readme__"})
    checks = PYTHON_BLOCKS[key]
    unchecked, gone = sorted(set(values) - set(checks)), sorted(set(checks) - set(values))
    assert not unchecked, f"expressions of the README's Python block with no check here: {unchecked}"
    assert not gone, f"checks here for expressions no longer in the README's Python block: {gone}"
    for code, check in checks.items():
        check(values[code], tmp_path)


# ---------------------------------------------------------------------------------------------------- other blocks
def check_layout(block: Block) -> None:
    """The "What is in the box" listing names folders and files that exist."""
    names = [line.split()[0] for line in block.body.splitlines() if line and not line[0].isspace()]
    assert len(names) >= 10
    missing = [name for name in names if not (REPO / name).exists()]
    assert not missing, f"the README's layout names what does not exist: {missing}"
    assert all((REPO / name).is_dir() for name in names if name.endswith("/"))


def check_citation(block: Block) -> None:
    """The BibTeX cites the paper CITATION.cff references: its authors, year and arXiv id."""
    import yaml

    (paper,) = yaml.safe_load((REPO / "CITATION.cff").read_text())["references"]
    authors = re.search(r"author\s*=\s*\{(.+)\}", block.body).group(1).split(" and ")
    assert authors == [f"{a['family-names']}, {a['given-names']}" for a in paper["authors"]]
    assert re.search(r"year\s*=\s*\{(\d+)\}", block.body).group(1) == str(paper["year"])
    assert paper["identifiers"][0]["value"] in block.body


OTHER_BLOCKS: dict[str, Callable[[Block], None]] = {
    "text: anygpt/cli.py     the `anygpt` command: loads only the chosen command's module (`anygpt generate` never "
    "loads training)": check_layout,
    "bibtex: @inproceedings{wu2024nextgpt,": check_citation,
}
"""Blocks that are neither shell nor Python, with their check."""


@pytest.mark.parametrize("key", list(OTHER_BLOCKS))
def test_other_block(key):
    (block,) = [block for block in BLOCKS if block.keys() == [key]]
    OTHER_BLOCKS[key](block)
