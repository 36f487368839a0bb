"""Property-based hardening (issue 22): whatever value reaches the request validation, the training config loader,
the model index reader or the prompt tokenizer, the outcome is a result within the documented ranges or one clear
error of the project's classes naming the field, key or file, never another exception.

``tests/test_hardening.py`` draws whole JSON request objects through ``from_dict``; here each field is drawn alone
with the values a Python caller can pass (numpy scalars, ``Decimal``, integers too long to print, lone surrogates,
containers of them), and the stored value is checked against the field's range.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from anygpt.base.errors import AnyGPTError, CheckpointError, ConfigError, MediaError, UsageError
from anygpt.base.modality import Modality
from anygpt.core.request import (
    DECODER_SETTINGS,
    MAX_ADAPTER_WEIGHT,
    MAX_SEED,
    GenerationRequest,
)
from training.config import MAX_CONFIG_DEPTH, load_config

EXAMPLES = int(os.environ.get("ANYGPT_PROPERTY_EXAMPLES", "120"))
"""Examples per property (a longer search: ``ANYGPT_PROPERTY_EXAMPLES=2000``)."""
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))

# ---------------------------------------------------------------------------------------------- values
_CHARS = st.one_of(st.characters(exclude_categories=()), st.characters(categories=["Cs"]))  # lone surrogates too
_TEXT = st.one_of(
    st.text(_CHARS, max_size=12),
    st.sampled_from(["auto", "image", "video", "audio", "text", "image,audio", " Image ", "fixed", "anyres", "..",
                     ".", "gen-1", "a b", "\x00", "\udcff", "1e400", "nan", "2001-02-30"]),
)  # fmt: skip
_HUGE = st.one_of(
    st.sampled_from([2**63, -(2**63) - 1, 10**400, -(10**400), 2**1030]),
    st.sampled_from([4400, 5000]).map(lambda digits: 10**digits),  # repr() of these raises ValueError
)
_NUMBERS = st.one_of(
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    _HUGE,
    st.floats(),
    st.sampled_from([0, 1, 8, 4096, 4104, 0.0, 1e-3, 1e-300, 5e-324, 100.0, 100.0000001, 60.0, 1.0, 0.5]),
)
_NUMPY = st.one_of(
    st.integers(-(2**62), 2**62).map(np.int64),
    st.floats(width=32).map(np.float32),
    st.floats().map(np.float64),  # a float subclass
    st.just(np.bool_(True)),
    st.just(np.array([1, 2])),
)
_ODD = st.sampled_from(
    [Decimal("1"), Decimal("NaN"), Fraction(1, 3), 1 + 2j, b"bytes", bytearray(b"x"), Path("p.png"), Modality.IMAGE,
     object(), Ellipsis, frozenset({1}), range(3)]
)  # fmt: skip
_SCALARS = st.one_of(st.none(), st.booleans(), _NUMBERS, _TEXT, _NUMPY, _ODD)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(st.one_of(_TEXT, st.integers(), _HUGE), inner, max_size=3),
    ),
    max_leaves=6,
)


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _int_in(value, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _finite_in(value, ok) -> bool:
    return _number(value) and (not isinstance(value, float) or math.isfinite(value)) and ok(value)


def _side(value) -> bool:
    return value is None or (_int_in(value, 8, 4096) and value % 8 == 0)


def _settings_ok(settings_: dict) -> bool:
    rules = {
        "num_inference_steps": lambda v: _int_in(v, 1, 1000),
        "guidance_scale": lambda v: _finite_in(v, lambda x: 0 <= x <= 100),
        "height": _side,
        "width": _side,
        "num_frames": lambda v: _int_in(v, 1, 256),
        "audio_seconds": lambda v: _finite_in(v, lambda x: 0 < x <= 60),
    }
    return all(value is None or rules[name](value) for name, value in settings_.items())


_MEDIA = {"images", "audios", "videos"}
RANGES = {
    "prompt": lambda v: isinstance(v, str) and v.encode("utf-8") is not None,
    "modalities": lambda v: (
        v == "auto" or (isinstance(v, list) and len(set(v)) == len(v) and set(v) <= {"image", "video", "audio"})
    ),
    "adapters": lambda v: (
        v is None
        or isinstance(v, str)
        or (isinstance(v, list) and all(isinstance(a, str) for a in v))
        or (
            isinstance(v, dict)
            and all(isinstance(k, str) for k in v)
            and all(_finite_in(w, lambda x: 0 <= x <= MAX_ADAPTER_WEIGHT) for w in v.values())
        )
    ),
    "seed": lambda v: v is None or _int_in(v, 0, MAX_SEED),
    "max_new_tokens": lambda v: _int_in(v, 1, 8192),
    "temperature": lambda v: _finite_in(v, lambda x: x == 0 or 1e-3 <= x <= 100),
    "top_p": lambda v: _finite_in(v, lambda x: 0 < x <= 1),
    **{name: (lambda n: lambda v: _settings_ok({n: v}))(name) for name in DECODER_SETTINGS},
    "decoder_overrides": lambda v: (
        isinstance(v, dict)
        and set(v) <= {"image", "video", "audio"}
        and all(isinstance(s, dict) and set(s) <= set(DECODER_SETTINGS) and _settings_ok(s) for s in v.values())
    ),
    "image_resolution": lambda v: v in (None, "fixed", "anyres"),
    "id": lambda v: v is None or (isinstance(v, str) and re.fullmatch(r"[A-Za-z0-9._-]+", v) and v not in {".", ".."}),
}


def _check_refusal(error: AnyGPTError, field: str) -> None:
    """A refusal names the field first, in one line of readable length."""
    message = str(error)
    assert message.startswith(field), (field, message)
    assert "\n" not in message and len(message) < 1000, message


@SETTINGS
@given(field=st.sampled_from(sorted(set(RANGES) | _MEDIA)), value=_VALUES)
def test_any_value_of_one_field_is_in_range_or_a_usage_error_naming_it(field, value):
    try:
        request = GenerationRequest(**{"prompt": "x", field: value})
    except (UsageError, MediaError) as error:
        if field in _MEDIA:
            assert isinstance(error, MediaError) or str(error).startswith(field), str(error)
        _check_refusal(error, field)
        return
    if field in _MEDIA:
        assert all(isinstance(item, str | Path) for item in getattr(request, field)), getattr(request, field)
        return
    assert RANGES[field](getattr(request, field)), (field, getattr(request, field))
    try:
        data = request.to_dict()
    except ValueError:
        return
    assert GenerationRequest.from_dict(json.loads(json.dumps(data))) == request


_OVERRIDE_KEYS = st.one_of(st.sampled_from(["image", "video", "audio", "Image", "text", "picture"]), _TEXT, _HUGE)


@SETTINGS
@given(
    overrides=st.one_of(
        _VALUES,
        st.dictionaries(
            _OVERRIDE_KEYS,
            st.one_of(_VALUES, st.dictionaries(st.one_of(st.sampled_from(DECODER_SETTINGS), _TEXT, _HUGE), _VALUES)),
            max_size=3,
        ),
    )
)
def test_any_decoder_overrides_are_in_range_or_a_usage_error_naming_them(overrides):
    try:
        request = GenerationRequest("x", decoder_overrides=overrides)
    except UsageError as error:
        _check_refusal(error, "decoder_overrides")
        return
    assert RANGES["decoder_overrides"](request.decoder_overrides), request.decoder_overrides


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        # accepted before: float(10**400) overflowed in the pipeline's adapter selection (OverflowError, a traceback)
        (dict(adapters={"text": 10**400}), r"^adapters must be .*weights: finite numbers in \[0, 100\]"),
        (dict(adapters={"text": 1e308, "image": 1e308}), r"^adapters must be .*got \{'text': 1e\+308"),
        (dict(adapters={"text": -1}), r"^adapters must be"),
        # before: repr() of an integer of more than 4300 digits raised ValueError while building the message
        (dict(modalities=["image", 10**5000]), r"^modalities: unknown output modality an integer of 16610 bits"),
        (dict(adapters={"a": 10**5000}), r"^adapters must be .*got a dict holding an integer too long to print$"),
        (dict(decoder_overrides={10**5000: {}}), r"^decoder_overrides: unknown output modality an integer of "),
        (dict(decoder_overrides={"image": {10**5000: 1}}), r"unknown setting an integer of 16610 bits"),
    ],
)
def test_values_that_escaped_the_validation_before(kwargs, message):
    with pytest.raises(UsageError, match=message):
        GenerationRequest("x", **kwargs)


def test_a_json_key_too_long_to_print_is_named_as_such():
    with pytest.raises(UsageError, match=r"^f:1: unknown fields \[an integer of 16610 bits"):
        GenerationRequest.from_dict({"prompt": "x", 10**5000: 1}, origin="f:1: ")


def test_adapter_weights_at_the_limits_are_accepted():
    request = GenerationRequest("x", adapters={"text": 0, "image": MAX_ADAPTER_WEIGHT, "audio": 100})
    assert request.adapters == {"text": 0, "image": 100.0, "audio": 100}


def test_an_adapter_weight_of_10_to_the_400_is_refused_before_the_pipeline(tiny_pipe, monkeypatch):
    """The path the value took before: through ``pipe(...)`` to ``check_selection``'s ``float(w)``."""
    monkeypatch.setattr(tiny_pipe, "_generate_reply", lambda *a, **k: pytest.fail("generated"))
    with pytest.raises(UsageError, match="^adapters must be"):
        tiny_pipe("x", adapters={"text": 10**400}, max_new_tokens=1, show_progress=False)


# ---------------------------------------------------------------------------------------------- training config
@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    from toyworld.sample_configs import write_sample

    return write_sample(tmp_path_factory.mktemp("sample") / "data", size=4)


_SECTIONS = {
    "": ["stage", "model", "output_dir", "data_root", "cache_dir", "lora", "cross_attention", "input_projector",
         "output_projector", "data", "optim", "train", "loss", "trainable"],
    "data": ["datasets", "sampling", "max_length", "pair_task", "caption_prompts"],
    "data.datasets.0": ["path", "format", "name", "media_root", "embedding_root", "weight", "max_samples",
                        "missing_media", "modality"],
    "optim": ["lr", "weight_decay", "betas", "eps", "schedule", "warmup_steps", "warmup_ratio", "max_grad_norm"],
    "train": ["batch_size", "gradient_accumulation_steps", "max_steps", "epochs", "mixed_precision", "seed",
              "log_every", "save_every", "keep_checkpoints", "device", "gradient_checkpointing"],
    "loss": ["caption_embedding_weight", "distance", "modality_weights", "diffusion", "blip2"],
    "loss.diffusion": ["enabled", "weight", "min_snr_gamma"],
    "loss.modality_weights": ["image", "video", "audio", "text"],
    "trainable": ["input_projectors", "output_projectors", "lora", "token_rows", "cross_attention"],
    "lora": ["r", "alpha", "dropout"],
    "cross_attention": ["every", "num_heads", "ff_mult"],
    "input_projector": ["name", "options"],
    "input_projector.options": ["num_layers", "token_merge"],
}  # fmt: skip
_YAML_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    _HUGE.filter(lambda n: abs(n) < 10**4000),
    st.floats(),
    st.text(_CHARS, max_size=10),
    st.sampled_from(
        ["2001-02-03", "2001-02-30", "1e9", ".nan", "~", "/", "/nonexistent", "a\x00b", "\udcff", "x" * 300]
    ),
    st.dates(),
    st.binary(max_size=4),
)
_YAML_VALUES = st.recursive(
    _YAML_SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(
            st.one_of(st.text(max_size=5), st.integers(), st.booleans(), st.none(), st.floats()), inner, max_size=3
        ),
    ),  # fmt: skip
    max_leaves=5,
)


@st.composite
def _mutations(draw):
    section = draw(st.sampled_from(sorted(_SECTIONS)))
    key = draw(st.one_of(st.sampled_from(_SECTIONS[section]), st.text(max_size=6), st.integers(), st.none()))
    return section, key, draw(_YAML_VALUES)


def _mutate(data: dict, section: str, key, value) -> None:
    node = data
    for part in section.split(".") if section else []:
        if isinstance(node, list):
            node = node[int(part)] if node else None
        elif isinstance(node, dict):
            if not isinstance(node.get(part), dict | list):
                node[part] = {}
            node = node[part]
        if node is None:
            return
    if isinstance(node, dict):
        node[key] = value


def _check_config_error(error: ConfigError, source: Path) -> None:
    message = str(error)
    assert message.startswith((f"{source}: ", "--set ", "config file")), message
    assert message.split(": ", 1)[-1].strip(), message


@SETTINGS
@given(mutations=st.lists(_mutations(), min_size=1, max_size=3), splice=st.one_of(st.none(), st.binary(max_size=8)),
       at=st.floats(0, 1))  # fmt: skip
def test_any_yaml_config_loads_or_is_one_config_error_naming_the_file(sample, tmp_path_factory, mutations, splice, at):
    data = yaml.safe_load((sample / "stage1.yaml").read_text())
    for section, key, value in mutations:
        _mutate(data, section, key, value)
    text = yaml.safe_dump(data).encode()  # surrogates and control characters escaped
    if splice is not None:  # and raw damage: broken syntax, bytes that are not UTF-8
        cut = int(at * len(text))
        text = text[:cut] + splice + text[cut:]
    path = tmp_path_factory.mktemp("cfg") / "stage.yaml"
    path.write_bytes(text)
    try:
        config = load_config(path)
    except ConfigError as error:
        _check_config_error(error, path)
        return
    # what loaded is valid and can be written as the checkpoints write it
    config.validate()
    json.dumps(config.to_dict())
    assert config.stage in (0, 1, 2, 3)


_OVERRIDE_VALUES = st.one_of(
    st.text(_CHARS, max_size=12),
    st.sampled_from(["2001-02-30", "[[[[", "&a [*a]", "!!binary aGk=", "!!python/name:os.system", "1e400", "{1: 2}",
                     "{a: 1, 2: b}", "null", "[1, .inf]", "!!set {a}", "2001-02-03", "'", "a\x00b", "~",
                     "!!timestamp x"]),
)  # fmt: skip
_OVERRIDE_KEYS_CFG = st.one_of(
    st.sampled_from([f"{s}.{k}".lstrip(".") for s, keys in _SECTIONS.items() for k in keys]),
    st.text(_CHARS, max_size=8),
)


@SETTINGS
@given(overrides=st.lists(st.tuples(_OVERRIDE_KEYS_CFG, _OVERRIDE_VALUES).map("=".join), min_size=1, max_size=3))
def test_any_set_override_loads_or_is_one_config_error(sample, overrides):
    try:
        load_config(sample / "stage1.yaml", overrides=overrides)
    except ConfigError as error:
        _check_config_error(error, sample / "stage1.yaml")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # each raised another exception before: TypeError, ValueError, RecursionError, UnicodeDecodeError
        ("1: 2\n", r": unknown key\(s\) \['1'\]; valid keys here"),
        ("1: 2\nfoo: 3\n", r": unknown key\(s\) \['1', 'foo'\]"),
        ("train:\n  7: 1\n", r": unknown key\(s\) \['train.7'\]"),
        ("null: 1\n", r": unknown key\(s\) \['None'\]"),
        ("foo: 2001-02-30\n", r": not valid YAML \(a value YAML cannot build: day is out of range for month\)$"),
        ("a: " + "[" * 5000 + "]" * 5000 + "\n", r": not valid YAML \(nested too deeply\)$"),
        ("a: " + "[" * (MAX_CONFIG_DEPTH + 2) + "]" * (MAX_CONFIG_DEPTH + 2) + "\n", r"nested more than 32 levels"),
        ("lora: {x: 2001-02-03}\n", r"lora.x: expected a string, number.* got date .*: quote it\)$"),
        (
            "data: {datasets: [{name: !!binary aGk=}]}\n",
            r"data.datasets\[0\].name: expected a string.* got bytes b'hi'",
        ),
        ('model: "a\\0b"\n', r": model: not a usable path \(it holds a NUL character\)"),
        ('data_root: "\\ud800"\n', r": data_root: not a usable path \('\\ud800' at position 0 cannot be in a file"),
        (
            "data_root: /" + "a" * 5000 + "\n",
            r"data_root: cannot look up '/a+\.\.\. \(5003 characters\) \(File name too long\)$",
        ),
        ("stage: 1\n\tfoo: 1\n", r"not valid YAML \(.*found character '\\t' that cannot start any token at line 2"),
    ],
)
def test_config_texts_that_escaped_the_loader_before(sample, tmp_path, text, message):
    data = yaml.safe_load((sample / "stage1.yaml").read_text())
    path = tmp_path / "stage.yaml"
    path.write_text(text if text.startswith("stage:") else yaml.safe_dump(data) + text)  # the sample's, and ``text``
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    _check_config_error(caught.value, path)
    assert "\n" not in str(caught.value)
    if message:
        assert re.search(message, str(caught.value)), str(caught.value)


def test_alias_bombs_are_refused_before_they_expand(sample, tmp_path):
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]  # 10**9 values
    path = tmp_path / "bomb.yaml"
    path.write_text(yaml.safe_dump(yaml.safe_load((sample / "stage1.yaml").read_text())) + "lora:\n" +
                    "".join(f"  {line}\n" for line in levels))  # fmt: skip
    with pytest.raises(ConfigError, match=r"more than 100,000 values \(YAML aliases"):
        load_config(path)


def test_non_utf8_config_names_the_byte(sample, tmp_path):
    path = tmp_path / "latin1.yaml"
    text = (sample / "stage1.yaml").read_bytes()
    path.write_bytes(text + b"\nfoo: caf\xe9\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: not UTF-8 text \(byte {len(text) + 9}\)"):
        load_config(path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=2001-02-30", r"optim.lr: expected a number, got '2001-02-30'"),  # ValueError before
        ("model=a\x00b", r"model: not a usable path \(it holds a NUL character\)"),
        ("data.datasets=[{path: x.json, weight: .inf}]", r"data.datasets\[0\].weight: must be a finite number"),
        ("data.datasets=[{path: x.json, weight: 1.0e+9}]", r"data.datasets\[0\].weight: must be <= 10\*\*6"),
        ("data.datasets=[{path: x.json, max_samples: 2.5}]", r"data.datasets\[0\].max_samples: expected an integer"),
    ],
)
def test_overrides_that_escaped_the_loader_before(sample, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(sample / "stage1.yaml", overrides=[override])


# ---------------------------------------------------------------------------------------------- model index (JSON)
@pytest.fixture(scope="module")
def saved_index(tmp_path_factory) -> tuple[Path, dict]:
    from anygpt.core.config import config_from_preset
    from anygpt.core.index import INDEX_FILE
    from anygpt.core.pipeline import AnyGPTPipeline

    folder = tmp_path_factory.mktemp("model") / "saved"
    AnyGPTPipeline.from_config(config_from_preset("tiny")).save_pretrained(folder)
    return folder, json.loads((folder / INDEX_FILE).read_text())


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _paths(value, (*prefix, index))


_JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8),
              st.sampled_from(["./x", "./", "packaged:toyworld/../..", "packaged:", "tiny", "", "image", "linear"])),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=5,
)  # fmt: skip


@SETTINGS
@given(data=st.data(), value=_JSON_VALUES, op=st.sampled_from(["set", "delete", "add"]))
def test_any_model_index_config_reads_or_is_one_checkpoint_error(saved_index, tmp_path_factory, data, value, op):
    from anygpt.core.index import INDEX_FILE, read_index

    saved, index = saved_index
    index = copy.deepcopy(index)
    where = data.draw(st.sampled_from([p for p in _paths(index) if p]))
    node = index
    for key in where[:-1]:
        node = node[key]
    if op == "set":
        node[where[-1]] = value
    elif op == "delete":
        node.pop(where[-1])
    else:
        assume(isinstance(node[where[-1]], dict))
        node[where[-1]]["zz_unknown"] = value
    folder = tmp_path_factory.mktemp("index")
    (folder / INDEX_FILE).write_text(json.dumps(index))
    try:
        read_index(folder)
    except CheckpointError as error:
        assert str(folder) in str(error) and "\n" not in str(error), str(error)


@pytest.mark.parametrize("value", [[None], {"a": 1}, 5])
def test_a_component_source_of_another_type_is_one_checkpoint_error(saved_index, tmp_path, value):
    """Before: ``AttributeError: 'list' object has no attribute 'startswith'``."""
    from anygpt.core.index import INDEX_FILE, read_index

    saved, index = saved_index
    index = copy.deepcopy(index)
    index["config"]["llm"]["source"] = value
    shutil.copytree(saved, tmp_path / "m")
    (tmp_path / "m" / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"anygpt_index.json: invalid config \(.*expected a string\)"):
        read_index(tmp_path / "m")


# ---------------------------------------------------------------------------------------------- prompt tokenizer
_PROMPTS = st.one_of(
    st.text(_CHARS, max_size=40),
    st.text(st.characters(categories=["Cc", "Cf", "Zs", "Zl", "Zp", "Mn"]), max_size=20),  # controls, marks
    st.sampled_from(["<image>", "[IMG0]", "</s>", "<s>", "USER:", "ASSISTANT:", "<unk><pad>", "\r\n\x00", "\ufeff"]),
    st.builds(lambda a, b: a + b, st.sampled_from(["<video>", "[AUD3]", "</s>"]), st.text(max_size=5)),
)


@settings(max_examples=EXAMPLES + 30, deadline=None, suppress_health_check=list(HealthCheck))
@given(prompt=_PROMPTS)
def test_any_prompt_tokenizes_to_its_own_bytes_or_is_refused_naming_prompt(tiny_pipe, prompt):
    from anygpt.core.conversation import Conversation

    surrogate = any(0xD800 <= ord(c) <= 0xDFFF for c in prompt)
    try:
        request = GenerationRequest(prompt)
    except UsageError as error:
        assert surrogate and str(error).startswith("prompt must be UTF-8 text"), str(error)
        return
    assert not surrogate
    model, tokenizer = tiny_pipe.model, tiny_pipe.tokenizer
    conversation = Conversation(template=tiny_pipe.config.llm.template)
    conversation.add_user(request.prompt, [])
    ids, order = model.tokenize_pieces(conversation.prompt_pieces(tokenizer.eos_token_id))
    special = set(model.tokens.all_added_ids) | set(tokenizer.all_special_ids)
    assert ids[0] == tokenizer.bos_token_id and order == []
    assert all(isinstance(i, int) and 0 <= i < len(tokenizer) for i in ids)
    assert not special & set(ids[1:]), "user text made a special token"
    text = "".join(p for p in conversation.prompt_pieces(tokenizer.eos_token_id) if isinstance(p, str))
    assert tokenizer.decode(ids[1:]) == text  # the byte-level tokenizer: every character round-trips
    assert prompt in text


@settings(max_examples=max(12, EXAMPLES // 10), deadline=None, suppress_health_check=list(HealthCheck))
@given(prompt=_PROMPTS)
def test_any_prompt_generates_utf8_text(tiny_pipe, prompt):
    assume(not any(0xD800 <= ord(c) <= 0xDFFF for c in prompt))
    result = tiny_pipe(prompt, max_new_tokens=3, modalities="text", seed=0, show_progress=False)
    assert isinstance(result.text, str) and result.text.encode("utf-8") is not None
    assert len(result.token_ids) <= 3


def test_a_long_prompt_within_the_context_generates(tiny_pipe):
    context = tiny_pipe.model.language_model.config.max_position_embeddings
    result = tiny_pipe("\x00\x1b[31m" + "é" * ((context - 200) // 2), max_new_tokens=2, modalities="text",
                       seed=0, show_progress=False)  # fmt: skip
    assert len(result.token_ids) <= 2


def test_a_prompt_longer_than_the_context_is_refused_naming_prompt(tiny_pipe, monkeypatch):
    context = tiny_pipe.model.language_model.config.max_position_embeddings
    monkeypatch.setattr(tiny_pipe, "generate_tokens", lambda *a, **k: pytest.fail("generated past the context"))
    with pytest.raises(UsageError, match="prompt"):
        tiny_pipe("a" * (context + 10), max_new_tokens=2, modalities="text", show_progress=False)
