"""``anygpt generate --batch`` (issue 22): the whole file is checked before anything loads, every problem reported as
``FILE:LINE: message``; ids are unique, short and never of the automatic form; nothing is written when the check
fails; each result is printed as soon as it is done. Property tests: the reader never fails with anything but a
``UsageError``, and valid lines read back as the requests they were written from."""

from __future__ import annotations

import json
import string
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from anygpt import cli
from anygpt.apps import generate as generate_command
from anygpt.apps.generate import MAX_ID_LENGTH, BatchError, generate_batch, read_batch
from anygpt.base.errors import UsageError
from anygpt.core.request import GenerationRequest

PROPERTY = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)


class FakePipeline:
    """Stands for a loaded pipeline: refuses the prompts starting with ``bad`` (as ``check_inputs`` refuses what the
    model cannot do) and answers the others with text only, noting what stdout held when each run started."""

    def __init__(self, capsys=None):
        self.capsys = capsys
        self.printed_before_run: list[str] = []

    def check_inputs(self, request):
        if request.prompt.startswith("bad"):
            raise UsageError(f"{request.origin}adapters: this model has no adapter 'x'")

    def run(self, request, show_progress=None):
        if self.capsys is not None:
            self.printed_before_run.append(self.capsys.readouterr().out)
        return SimpleNamespace(text=f"answer {request.prompt}", images=[], videos=[], audios=[])


@pytest.fixture()
def no_loading(monkeypatch):
    """Any model load fails the test."""

    def load(model, runtime=None):
        raise AssertionError(f"a model ({model}) was loaded")

    monkeypatch.setattr(generate_command, "load_pipeline", load)


def test_every_problem_of_the_file_is_reported_before_anything_loads(tmp_path, capsys, no_loading):
    batch = tmp_path / "prompts.jsonl"
    lines = [
        b'{"prompt": "fine", "id": "a"}',
        b'\xff{"prompt": "latin-1"}',
        b'{"prompt": "two", "top_p": 2}',
        b'{"prompt": "three", "id": "a"}',
        b'{"prompt": "four", "id": "gen-0001"}',
        json.dumps({"prompt": "five", "id": "x" * (MAX_ID_LENGTH + 1)}).encode(),
        b'{"prompt": ',
        b"",
        b'{"prompt": "six", "id": "A"}',
        b'{"prompt": "seven", "id": "b/c"}',
        b'{"prompt": "fine too"}',
    ]
    batch.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out"
    assert cli.main(["generate", "--batch", str(batch), "--out", str(out)]) == 2
    f = f"anygpt: error: {batch}"
    assert capsys.readouterr().err.splitlines() == [
        f"{f}:2: not UTF-8 text (byte 0xff at byte 1 of the line); save the file as UTF-8",
        f"{f}:3: top_p must be a finite number in (0, 1], got 2",
        f"{f}:4: id 'a' is used by line 1 too; each line needs its own id",
        f"{f}:5: id 'gen-0001' has the form of the names given to requests without an id (gen-0001, gen-0002, ...), "
        "whose files it could take: choose another",
        f"{f}:6: id must be at most {MAX_ID_LENGTH} characters (it names the output files), got 101: {'x' * 20!r}...",
        f"{f}:7: not valid JSON (Expecting value at column 12)",
        f"{f}:9: id 'A' is used by line 1 too (as 'a': ids differing in case name the same files); each line needs its "
        "own id",
        f"{f}:10: id must be a name of letters, digits, '.', '_' and '-', got 'b/c'",
    ]
    assert not out.exists()  # no results.jsonl, not even an empty one, and no media


def test_ids_up_to_the_limit_and_of_other_forms_are_accepted(tmp_path):
    batch = tmp_path / "b.jsonl"
    ids = ["x" * MAX_ID_LENGTH, "gen-1a", "generated-0001", "GEN-", "a.b_c-d"]
    batch.write_text("".join(json.dumps({"prompt": "p", "id": i}) + "\n" for i in ids))
    assert [r.id for r in read_batch(batch)] == ids
    for auto in ("gen-1", "GEN-0002", "gen-123456"):
        batch.write_text(json.dumps({"prompt": "p", "id": auto}) + "\n")
        with pytest.raises(BatchError, match=f"{batch}:1: id '{auto}' has the form of the names given"):
            read_batch(batch)


def test_a_utf8_bom_and_crlf_line_ends_are_read(tmp_path):
    batch = tmp_path / "b.jsonl"
    batch.write_bytes(b'\xef\xbb\xbf{"prompt": "one"}\r\n{"prompt": "two"}\r\n')
    assert [r.prompt for r in read_batch(batch)] == ["one", "two"]


def test_problems_found_with_the_model_are_all_reported_and_nothing_is_written(tmp_path, capsys, monkeypatch):
    batch = tmp_path / "b.jsonl"
    batch.write_text('{"prompt": "good"}\n{"prompt": "bad one"}\n{"prompt": "bad two"}\n')
    out = tmp_path / "out"
    with pytest.raises(BatchError) as caught:
        generate_batch(read_batch(batch), pipe=FakePipeline(), out=out)
    assert caught.value.messages == [
        f"{batch}:2: adapters: this model has no adapter 'x'",
        f"{batch}:3: adapters: this model has no adapter 'x'",
    ]
    assert not out.exists()
    monkeypatch.setattr(generate_command, "load_pipeline", lambda model, runtime=None: FakePipeline())
    assert cli.main(["generate", "--batch", str(batch), "--out", str(out), "--quiet"]) == 2
    assert capsys.readouterr().err.splitlines() == [f"anygpt: error: {m}" for m in caught.value.messages]
    assert not out.exists()


def test_a_long_list_of_problems_is_cut(tmp_path, capsys, no_loading):
    batch = tmp_path / "b.jsonl"
    batch.write_text('{"prompt": 1}\n' * (cli.MAX_ERROR_LINES + 7))
    assert cli.main(["generate", "--batch", str(batch)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == cli.MAX_ERROR_LINES + 1 and err[-1] == "anygpt: error: ... and 7 more"
    assert err[0] == f"anygpt: error: {batch}:1: expected an object with a string 'prompt'"


@pytest.mark.parametrize("json_output", [False, True])
def test_a_batch_prints_each_result_as_soon_as_it_is_done(tmp_path, capsys, monkeypatch, json_output):
    pipe = FakePipeline(capsys)
    monkeypatch.setattr(generate_command, "load_pipeline", lambda model, runtime=None: pipe)
    batch = tmp_path / "b.jsonl"
    batch.write_text('{"prompt": "one", "id": "first"}\n{"prompt": "two"}\n')
    out = tmp_path / "out"
    argv = ["generate", "--batch", str(batch), "--out", str(out)] + (["--json"] if json_output else [])
    assert cli.main(argv) == 0
    printed = [*pipe.printed_before_run, capsys.readouterr().out]
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["first", "gen-0001"]
    if json_output:
        lines = [json.dumps(r) + "\n" for r in records]
    else:
        lines = ["first: 'answer one' -> (no media)\n", "gen-0001: 'answer two' -> (no media)\n"]
    assert printed == ["", lines[0], lines[1]]  # the first line was out before the second request ran


# ---------------------------------------------------------------------------------------------------- properties
FIELDS = [
    *(f for f in GenerationRequest.__dataclass_fields__ if f != "origin"),
    "steps", "guidance", "frames", "colour", "origin",
]  # fmt: skip

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["auto", "image", "audio,video", "tiny", "gen-0001", "", ".", "a/b", "~nobody/x.png"]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
objects = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6)
lines = st.one_of(
    objects.map(lambda d: json.dumps({"prompt": "p", **d})),
    objects.map(json.dumps),
    json_values.map(json.dumps),
    st.text(max_size=40),
).map(str.encode) | st.binary(max_size=40)


@PROPERTY
@given(st.lists(lines, max_size=6))
def test_any_file_reads_or_fails_with_a_usage_error_naming_its_lines(tmp_path, content):
    batch = tmp_path / "b.jsonl"
    batch.write_bytes(b"\n".join(content))
    try:
        requests = read_batch(batch)
    except BatchError as err:
        count = len(batch.read_bytes().splitlines())
        for message in err.messages:
            head, line, _ = message.split(":", 2)
            assert head == str(batch) and 1 <= int(line) <= count, message
        return
    except UsageError as err:
        assert str(err) == f"--batch {batch}: no requests in the file"
        return
    assert requests and all(isinstance(r, GenerationRequest) for r in requests)
    assert len({r.id.casefold() for r in requests if r.id is not None}) == sum(r.id is not None for r in requests)


SIDES = st.none() | st.integers(1, 512).map(lambda n: 8 * n)
valid_fields = st.fixed_dictionaries(
    {"prompt": st.text(max_size=30)},
    optional={
        "modalities": st.sampled_from(["auto", ["image"], ["audio", "video"], []]),
        "seed": st.none() | st.integers(0, 2**63 - 1),
        "max_new_tokens": st.integers(1, 8192),
        "temperature": st.just(0.0) | st.floats(1e-3, 100),
        "top_p": st.floats(0, 1, exclude_min=True),
        "num_inference_steps": st.none() | st.integers(1, 1000),
        "guidance_scale": st.none() | st.floats(0, 100),
        "height": SIDES,
        "width": SIDES,
        "num_frames": st.none() | st.integers(1, 256),
        "audio_seconds": st.none() | st.floats(0, 60, exclude_min=True),
        "adapters": st.sampled_from([None, "text", ["image", "audio"], {"image": 0.5}]),
        "decoder_overrides": st.sampled_from([{}, {"image": {"num_inference_steps": 3}}, {"audio": {"height": 64}}]),
        "image_resolution": st.sampled_from([None, "fixed", "anyres"]),
    },
)
ID_SUFFIX = st.text(alphabet=string.ascii_letters + string.digits + "._-", max_size=MAX_ID_LENGTH)


@PROPERTY
@given(
    st.lists(st.tuples(valid_fields, st.none() | ID_SUFFIX), min_size=1, max_size=5),
    st.booleans(),
    st.lists(st.sampled_from([b"", b"   ", b"\t"]), max_size=3),
)
def test_valid_lines_read_back_as_the_requests_written(tmp_path, rows, ascii_only, blanks):
    """``to_dict`` lines (ids unique, within the limit) read back equal, whatever their characters (a prompt may hold
    U+2028, U+0085 or U+001C, which are line ends for ``str.splitlines`` but not in a JSON line)."""
    written = [
        GenerationRequest(**fields, id=None if suffix is None else f"r{i}_{suffix}"[:MAX_ID_LENGTH])
        for i, (fields, suffix) in enumerate(rows)
    ]
    assume(all(r.id not in (".", "..") for r in written))
    encoded = [json.dumps(r.to_dict(), ensure_ascii=ascii_only).encode() for r in written]
    batch = tmp_path / "b.jsonl"
    batch.write_bytes(b"\n".join([*blanks, *encoded, *blanks]) + b"\n")
    assert read_batch(batch) == written


@PROPERTY
@given(st.text(alphabet="\u2028\u2029\x85\x1c\x1d\x1e\x0b\x0cab", min_size=1, max_size=8))
def test_unicode_line_separators_inside_a_prompt_do_not_split_the_line(tmp_path, prompt):
    batch = tmp_path / "b.jsonl"
    batch.write_text(json.dumps({"prompt": prompt}, ensure_ascii=False) + "\n", encoding="utf-8")
    (request,) = read_batch(batch)
    assert request.prompt == prompt
