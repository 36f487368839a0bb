"""Training configs: one YAML file per stage run, validated before anything heavy happens.

Every section is a dataclass; an unknown key, a value of the wrong type or a path that does not exist is a
``ConfigError`` naming the key (``train.batch_size``) and the file. Paths inside a config file resolve relative to
that file, never to the working directory. ``--set key=value`` overrides use the same dotted names.

Every number has a range (``RANGES``), checked when the config loads, before any model is built; NaN and infinity are
never numbers, a ``bool`` is never an integer:

==========================================  ==================  ====================================================
key                                         range               note
==========================================  ==================  ====================================================
optim.lr                                    (0, 1]              AdamW's step size; finite
optim.weight_decay                          [0, 1]
optim.eps                                   (0, 1]
optim.betas                                 two in [0, 1)
optim.warmup_steps                          0 .. 10**8, null
optim.warmup_ratio                          [0, 1)
optim.max_grad_norm                         (0, 10**6], null
train.batch_size                            1 .. 65536          examples per process per micro-batch
train.gradient_accumulation_steps           1 .. 65536
train.max_steps                             1 .. 10**8, null    optimizer steps
train.epochs                                (0, 10**6]
train.seed                                  0 .. 2**32-1        numpy's seed range (torch's is wider)
train.log_every                             1 .. 10**8
train.save_every                            0 .. 10**8          0: only at the end
train.keep_checkpoints                      1 .. 10**4
data.max_length                             8 .. 131072         token positions of one example
loss weights (caption_embedding_weight,     [0, 10**6]
diffusion.weight, blip2.itc/itm/itg,
modality_weights.*)
loss.diffusion.min_snr_gamma                (0, 10**6]
loss.blip2.max_text_length                  2 .. 4096
data.datasets[i].weight                     (0, 10**6]          relative sampling weight
data.datasets[i].max_samples                1 .. 10**12, null
model options (see below)                   finite numbers;     model sizes (layers, heads, rank, latents...)
                                            integers |n| <= 2**20
==========================================  ==================  ====================================================

The model options are ``lora``, ``cross_attention`` and ``input_projector.options`` / ``output_projector.options``;
a number written as YAML text there (``1e9``: YAML 1.1 reads it as a string) is refused too.

Whatever the file holds, loading it ends in a config or in one ``ConfigError`` of one line: a file that is not UTF-8
or not YAML, a value YAML cannot build (``2001-02-30``), keys that are not strings, a value that is no plain YAML
data (a date, ``!!binary``, ``!!set``: the config is written into every checkpoint as JSON), a document nested more
than ``MAX_CONFIG_DEPTH`` deep or of more than ``MAX_CONFIG_VALUES`` values (aliases included), and a path with a NUL
or a character no file name can hold.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from anygpt.base.errors import ConfigError
from anygpt.base.modality import MEDIA_MODALITIES, Modality
from anygpt.core.config import list_presets
from anygpt.core.fusion import CrossAttentionConfig
from projectors import list_input_projectors, list_output_projectors
from training.data.records import DatasetSpec

STAGES = (0, 1, 2, 3)

RANGES: dict[str, tuple[type, float, float, bool, bool]] = {
    # key: (int or float, low, high, low included, high included); see the module's table
    "optim.lr": (float, 0, 1, False, True),
    "optim.weight_decay": (float, 0, 1, True, True),
    "optim.eps": (float, 0, 1, False, True),
    "optim.warmup_steps": (int, 0, 10**8, True, True),
    "optim.warmup_ratio": (float, 0, 1, True, False),
    "optim.max_grad_norm": (float, 0, 10**6, False, True),
    "train.batch_size": (int, 1, 65536, True, True),
    "train.gradient_accumulation_steps": (int, 1, 65536, True, True),
    "train.max_steps": (int, 1, 10**8, True, True),
    "train.epochs": (float, 0, 10**6, False, True),
    "train.seed": (int, 0, 2**32 - 1, True, True),
    "train.log_every": (int, 1, 10**8, True, True),
    "train.save_every": (int, 0, 10**8, True, True),
    "train.keep_checkpoints": (int, 1, 10**4, True, True),
    "data.max_length": (int, 8, 131072, True, True),
    "loss.caption_embedding_weight": (float, 0, 10**6, True, True),
    "loss.diffusion.weight": (float, 0, 10**6, True, True),
    "loss.diffusion.min_snr_gamma": (float, 0, 10**6, False, True),
    "loss.blip2.itc": (float, 0, 10**6, True, True),
    "loss.blip2.itm": (float, 0, 10**6, True, True),
    "loss.blip2.itg": (float, 0, 10**6, True, True),
    "loss.blip2.max_text_length": (int, 2, 4096, True, True),
}
"""The range of every numeric key (None is allowed where the field's default is None)."""
MAX_OPTION_INT = 2**20
"""The largest integer (in absolute value) in the free-form model options: ``lora``, ``cross_attention`` and the
connectors' ``options`` (layers, heads, rank, latents, hidden sizes)."""
MAX_CONFIG_DEPTH = 32
"""The deepest nesting of a config document (a stage config nests 4 levels)."""
MAX_CONFIG_VALUES = 100_000
"""The most values (every list item and mapping value, aliases counted each time they are used) a config may hold: a
stage config holds a few hundred; YAML aliases of aliases could otherwise stand for billions."""


@dataclass
class DataConfig:
    """Which data a stage reads and how batches are drawn.

    Attributes:
        datasets: the stage's datasets (see ``training.data.DatasetSpec``).
        sampling: ``round_robin`` (each batch from one dataset, datasets taken in turn in proportion to their
            weights, as NExT-GPT does) or ``mixed`` (each item of a batch from a dataset drawn by weight).
        max_length: longest token sequence; longer examples are cut before the first media or signal group that
            does not fit whole.
        pair_task: how caption pairs are used: ``caption`` (media in, caption out), ``generate`` (caption in,
            caption + signal tokens out) or None (the stage's default: 1 caption, 2 and 3 generate).
        caption_prompts: user prompts of captioning examples, taken in turn.
    """

    datasets: list[dict[str, Any]] = field(default_factory=list)
    sampling: str = "round_robin"
    max_length: int = 512
    pair_task: str | None = None
    caption_prompts: list[str] = field(default_factory=lambda: ["generate a caption"])


@dataclass
class TrainableConfig:
    """Which parts train. None: the stage's default (its objective's ``trains``, ``training.objectives``).

    ``token_rows``: ``none``, ``signal`` (the signal tokens' rows of the input embedding and LM head) or ``all``
    (every added token). Only these rows train, never the whole embedding matrix. ``cross_attention``: the gated
    cross-attention blocks (stage 1 trains them when the model has them; true asks for them).
    """

    input_projectors: bool | None = None
    output_projectors: bool | None = None
    lora: bool | None = None
    token_rows: str | None = None
    cross_attention: bool | None = None


@dataclass
class DiffusionLossConfig:
    """The optional noise-prediction loss through each frozen decoder's UNet (min-SNR weighted)."""

    enabled: bool = False
    weight: float = 1.0
    min_snr_gamma: float = 5.0


@dataclass
class Blip2LossConfig:
    """Q-Former pretraining's terms (stage 0): BLIP-2's representation learning of Q-Former connectors
    (``training.blip2``).

    Attributes:
        itc, itm, itg: weights of image-text contrastive, image-text matching (hardest in-batch negatives) and
            image-grounded text generation (each >= 0, not all 0).
        max_text_length: text positions of the Q-Former's text side (BLIP-2: 32); longer captions are cut.
    """

    itc: float = 1.0
    itm: float = 1.0
    itg: float = 1.0
    max_text_length: int = 32


@dataclass
class LossConfig:
    """Loss terms.

    Attributes:
        caption_embedding_weight: weight of the distance between the output projector's conditioning and the
            caption's embedding by the decoder's own text encoder.
        distance: ``l2`` (NExT-GPT: mean per-token Euclidean distance) or ``mse``.
        modality_weights: per output modality factor on that distance (NExT-GPT's stage 3 weighs video x2).
        diffusion: the optional diffusion loss.
        blip2: the BLIP-2 terms of Q-Former pretraining (stage 0).
    """

    caption_embedding_weight: float = 1.0
    distance: str = "l2"
    modality_weights: dict[str, float] = field(default_factory=dict)
    diffusion: DiffusionLossConfig = field(default_factory=DiffusionLossConfig)
    blip2: Blip2LossConfig = field(default_factory=Blip2LossConfig)


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule (NExT-GPT: betas (0.9, 0.95), weight decay 0.001, clip 1.0)."""

    lr: float = 4e-4
    weight_decay: float = 0.001
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    schedule: str = "cosine"  # cosine | linear | constant (all after warmup)
    warmup_steps: int | None = None
    warmup_ratio: float = 0.03
    max_grad_norm: float | None = 1.0


@dataclass
class RunConfig:
    """The loop.

    Attributes:
        batch_size: examples per process per micro-batch. The global batch is
            ``batch_size x processes x gradient_accumulation_steps``.
        max_steps: optimizer steps; None: ``epochs`` over the stage's data.
        mixed_precision: ``no``, ``bf16`` or ``fp16`` (fp16 needs a GPU).
        save_every: write ``checkpoint-STEP/`` every N steps (0: only at the end).
        keep_checkpoints: how many checkpoints to keep (the newest).
        log_every: write a ``metrics.jsonl`` line and TensorBoard scalars every N steps.
    """

    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_steps: int | None = None
    epochs: float = 1.0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    seed: int = 13
    log_every: int = 1
    save_every: int = 500
    keep_checkpoints: int = 2
    device: str | None = None  # None: accelerate's choice (a GPU when there is one)


@dataclass
class ConnectorChoice:
    """A connector picked by registry name for this run (``anygpt info projectors`` lists the names), with options.

    ``--set input_projector=perceiver`` (a bare name) or ``--set input_projector.name=perceiver
    --set input_projector.options.num_latents=32``.
    """

    name: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    """One stage run.

    Attributes:
        stage: 0 (Q-Former pretraining of Q-Former input projectors, BLIP-2's), 1 (encoder-side alignment),
            2 (decoder-side alignment) or 3 (instruction tuning); ``training.objectives`` says what each trains.
        model: a preset name or a folder written by a previous stage (``.../final``); ``--from`` overrides it.
        output_dir: where checkpoints, metrics and ``final/`` go (relative to the config file; when the file has
            none, ``runs/stage{N}`` in the working directory, like any command's output).
        data_root: the folder dataset paths are relative to (itself relative to the config file); default: the
            config file's folder. Shipped configs use NExT-GPT's data layout and take ``--set data_root=DIR``.
        cache_dir: the feature cache (None: no cache; features are computed every time).
        lora: LoRA settings to use when the starting model has no trained adapter yet (stage 3), e.g. ``{r: 32}``.
        input_projector, output_projector: build fresh connectors of this kind instead of the starting model's
            (the stage must train that side; see ``ConnectorChoice``).
        cross_attention: gated cross-attention blocks (``anygpt.core.fusion.CrossAttentionConfig`` options, e.g.
            ``--set cross_attention.every=2``) built fresh in the starting model (the stage must train them).
    """

    stage: int
    output_dir: str
    model: str = "tiny"
    data_root: str | None = None
    cache_dir: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    trainable: TrainableConfig = field(default_factory=TrainableConfig)
    lora: dict[str, Any] | None = None
    input_projector: ConnectorChoice | None = None
    output_projector: ConnectorChoice | None = None
    cross_attention: dict[str, Any] | None = None
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: RunConfig = field(default_factory=RunConfig)
    source: str = field(default="<dict>", repr=False)  # the file it came from, for messages

    # ------------------------------------------------------------------ derived
    def dataset_specs(self) -> list[DatasetSpec]:
        return [_dataset_spec(d, i, self.source) for i, d in enumerate(self.data.datasets)]

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("source")
        return data

    def validate(self) -> None:
        """Check values (types are checked while loading). Raises ``ConfigError``."""
        where = self.source

        def fail(key: str, message: str) -> None:
            raise ConfigError(f"{where}: {key}: {message}")

        for key, bounds in RANGES.items():
            _check_range(self, key, bounds, fail)
        for name, weight in self.loss.modality_weights.items():
            _check_range(weight, f"loss.modality_weights.{name}", (float, 0, 10**6, True, True), fail)
        for i, beta in enumerate(self.optim.betas):
            _check_range(beta, f"optim.betas[{i}]", (float, 0, 1, True, False), fail)
        _check_options(self.lora, "lora", fail)
        _check_options(self.cross_attention, "cross_attention", fail)
        for key in ("input_projector", "output_projector"):
            choice = getattr(self, key)
            if choice is not None:
                _check_options(choice.options, f"{key}.options", fail)
        if not _exists(Path(self.data_root), "dir", "data_root", where):
            fail("data_root", f"folder not found: {self.data_root}")
        if self.stage not in STAGES:
            fail("stage", f"expected one of {STAGES}, got {self.stage!r}")
        if not self.data.datasets:
            fail("data.datasets", "a stage needs at least one dataset")
        if self.data.sampling not in ("round_robin", "mixed"):
            fail("data.sampling", f"expected 'round_robin' or 'mixed', got {self.data.sampling!r}")
        if self.data.pair_task not in (None, "caption", "generate"):
            fail("data.pair_task", f"expected 'caption', 'generate' or null, got {self.data.pair_task!r}")
        if not self.data.caption_prompts:
            fail("data.caption_prompts", "give at least one prompt")
        for key, names in (
            ("input_projector", list_input_projectors()),
            ("output_projector", list_output_projectors()),
        ):
            choice = getattr(self, key)
            if choice is not None and choice.name.lower() not in names:
                fail(f"{key}.name", f"unknown connector {choice.name!r}; registered: {', '.join(names)}")
        if self.cross_attention is not None:
            try:
                CrossAttentionConfig.from_dict(self.cross_attention)
            except (TypeError, ValueError) as err:
                fail("cross_attention", str(err))
        if self.trainable.token_rows not in (None, "none", "signal", "all"):
            fail("trainable.token_rows", f"expected none, signal or all, got {self.trainable.token_rows!r}")
        if self.loss.distance not in ("l2", "mse"):
            fail("loss.distance", f"expected 'l2' or 'mse', got {self.loss.distance!r}")
        for name in self.loss.modality_weights:
            try:
                modality = Modality.parse(name)
            except ValueError:
                modality = None
            if modality not in MEDIA_MODALITIES:
                fail(f"loss.modality_weights.{name}", "not an output media modality (image, video, audio)")
        blip2 = self.loss.blip2
        if not (blip2.itc or blip2.itm or blip2.itg):
            fail("loss.blip2", "itc, itm and itg are all 0: nothing would train")
        if len(self.optim.betas) != 2 or not all(0 <= b < 1 for b in self.optim.betas):
            fail("optim.betas", f"expected two numbers in [0, 1), got {self.optim.betas}")
        if self.optim.schedule not in ("cosine", "linear", "constant"):
            fail("optim.schedule", f"expected cosine, linear or constant, got {self.optim.schedule!r}")
        run = self.train
        if run.device not in (None, "cpu"):
            fail(
                "train.device",
                f"expected null (accelerate's choice: a GPU when there is one) or cpu, got {run.device!r}",
            )
        if run.mixed_precision not in ("no", "bf16", "fp16"):
            fail("train.mixed_precision", f"expected no, bf16 or fp16, got {run.mixed_precision!r}")
        for i, spec in enumerate(self.dataset_specs()):
            if not _exists(spec.path, "file", f"data.datasets[{i}].path", where):
                fail(
                    f"data.datasets[{i}].path",
                    f"file not found: {spec.path} (relative paths start at data_root {self.data_root}; "
                    "set it with --set data_root=DIR)",
                )
            if not _exists(spec.media_root, "dir", f"data.datasets[{i}].media_root", where):
                fail(f"data.datasets[{i}].media_root", f"folder not found: {spec.media_root}")
            embeddings = spec.embedding_root
            if embeddings is not None and not _exists(embeddings, "dir", f"data.datasets[{i}].embedding_root", where):
                fail(f"data.datasets[{i}].embedding_root", f"folder not found: {spec.embedding_root}")
        names = [spec.name for spec in self.dataset_specs()]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            fail("data.datasets", f"dataset names must be unique (they key the feature cache); repeated: {dupes}")


# ---------------------------------------------------------------------------------------------- loading
def load_config(
    path: str | Path | None = None,
    *,
    data: dict[str, Any] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    stage: int | None = None,
) -> TrainConfig:
    """Read a YAML config (or a dict), apply ``key=value`` overrides, resolve paths and validate.

    Args:
        path: the YAML file. Relative paths inside it resolve against its folder.
        data: a dict instead of a file (relative paths then resolve against the working directory).
        overrides: ``["train.max_steps=10", "optim.lr=1e-4"]``; values are parsed as YAML.
        stage: the stage asked on the command line; must agree with the file's ``stage`` (which may be omitted).

    Raises:
        ConfigError: unknown keys, wrong types, bad values, missing files; the message names the file and the key.
    """
    if path is not None:
        path = _usable_path(path, "config file", "config file")
        if not _exists(path, "file", "config file", "config file"):
            raise ConfigError(f"config file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}); save the file as UTF-8") from None
        except OSError as err:
            raise ConfigError(f"{path}: cannot be read ({err.strerror or err})") from None
        try:
            data = yaml.safe_load(text)
        except Exception as err:  # noqa: BLE001 - PyYAML's own errors and its constructors' (2001-02-30, !!timestamp x)
            raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(err)})") from None
        base, source = path.parent, str(path)
    else:
        base, source = Path.cwd(), "<config>"
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys at the top level, got {type(data).__name__}")
    _check_plain(data, source)  # before anything walks it: aliases of aliases, deep nesting, dates
    data = copy.deepcopy(data)
    for item in overrides:
        _apply_override(data, item, source)
    _check_plain(data, source)
    for key in ("input_projector", "output_projector"):
        if isinstance(data.get(key), str):  # a bare registry name
            data[key] = {"name": data[key]}
    if stage is not None:
        if data.get("stage") not in (None, stage):
            raise ConfigError(f"{source}: stage: the file is for stage {data['stage']}, --stage asks for {stage}")
        data["stage"] = stage
    if "stage" not in data:
        raise ConfigError(f"{source}: stage: missing (0, 1, 2 or 3; or pass --stage)")
    default_output = data.get("output_dir") is None
    if default_output:
        data["output_dir"] = str(Path.cwd() / "runs" / f"stage{data['stage']}")
    config = _build(TrainConfig, data, "", source)
    config.source = source
    _resolve_paths(config, base)
    config.validate()
    return config


def _check_range(owner: Any, key: str, bounds: tuple, fail) -> None:
    """Check the number at dotted ``key`` of ``owner`` (or ``owner`` itself when it is a number) against ``bounds``."""
    kind, low, high, low_in, high_in = bounds
    value = owner
    if dataclasses.is_dataclass(owner):
        for part in key.split("."):
            value = getattr(value, part)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and not isinstance(value, int)):
        fail(key, f"expected {'an integer' if kind is int else 'a number'}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        fail(key, f"must be a finite number, got {value!r}")
    show = {2**32 - 1: "2**32-1", 10**12: "10**12", 10**8: "10**8", 10**6: "10**6", 10**4: "10**4"}
    interval = f"{'[' if low_in else '('}{show.get(low, low)}, {show.get(high, high)}{']' if high_in else ')'}"
    if value < low or (value == low and not low_in):
        fail(key, f"must be {'>=' if low_in else '>'} {low} (range {interval}), got {value!r}")
    if value > high or (value == high and not high_in):
        fail(key, f"must be {'<=' if high_in else '<'} {show.get(high, high)} (range {interval}), got {value!r}")


def _check_options(value: Any, key: str, fail) -> None:
    """Free-form model options: finite numbers, integers within ``MAX_OPTION_INT``, no number written as text."""
    if isinstance(value, dict):
        for name, item in value.items():
            _check_options(item, f"{key}.{name}", fail)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_options(item, f"{key}[{i}]", fail)
    elif isinstance(value, float) and not math.isfinite(value):
        fail(key, f"must be a finite number, got {value!r}")
    elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_OPTION_INT:
        fail(key, f"must be an integer of at most {MAX_OPTION_INT} (2**20: a model size) in size, got {value!r}")
    elif isinstance(value, float) and abs(value) > MAX_OPTION_INT:
        fail(key, f"must be a number of at most {MAX_OPTION_INT} (2**20) in size, got {value!r}")
    elif isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return
        fail(key, f"expected a number, got the text {value!r} (YAML reads 1e9 as text: write 1.0e+9 or an integer)")


def _yaml_problem(err: BaseException) -> str:
    """One line saying what YAML could not read, and where."""
    if isinstance(err, RecursionError):
        return "nested too deeply"
    if isinstance(err, yaml.MarkedYAMLError):
        text = "; ".join(part for part in (err.context, err.problem) if part) or type(err).__name__
        mark = err.problem_mark or err.context_mark
        if mark is not None:
            text += f" at line {mark.line + 1}, column {mark.column + 1}"
        return " ".join(text.split())
    if isinstance(err, yaml.YAMLError):
        return " ".join(str(err).split()) or type(err).__name__
    return f"a value YAML cannot build: {' '.join(str(err).split())}"


_PLAIN = (str, int, float, bool, type(None))


def _check_plain(data: Any, source: str) -> None:
    """Refuse what no stage config holds, naming the key: values that are not plain YAML data (dates, bytes, sets:
    the config is written into every checkpoint as JSON), nesting deeper than ``MAX_CONFIG_DEPTH`` and more than
    ``MAX_CONFIG_VALUES`` values (an alias counts each time it is used). Iterative: a deep document cannot overflow
    the stack here."""
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    count = 0
    while stack:
        value, key, depth = stack.pop()
        count += 1
        if count > MAX_CONFIG_VALUES:
            raise ConfigError(
                f"{source}: more than {MAX_CONFIG_VALUES:,} values (YAML aliases that repeat a value many times?); a "
                "stage config holds a few hundred"
            )
        if depth > MAX_CONFIG_DEPTH:
            raise ConfigError(f"{source}: {key}: nested more than {MAX_CONFIG_DEPTH} levels deep")
        if isinstance(value, dict):
            for name, item in value.items():
                if not isinstance(name, _PLAIN) or isinstance(name, float) and not math.isfinite(name):
                    raise ConfigError(f"{source}: {_join(key, name)}: a key must be a name, got {_short(name)}")
                stack.append((item, _join(key, name), depth + 1))
        elif isinstance(value, list | tuple):
            stack.extend((item, f"{key}[{i}]", depth + 1) for i, item in enumerate(value))
        elif not isinstance(value, _PLAIN):
            hint = " (YAML reads an unquoted date as a date: quote it)" if isinstance(value, datetime.date) else ""
            raise ConfigError(
                f"{source}: {key or 'config'}: expected a string, number, true/false, null, list or mapping, got "
                f"{type(value).__name__} {_short(value)}{hint}"
            )


def _join(key: str, name: Any) -> str:
    name = name if isinstance(name, str) else repr(name)
    return f"{key}.{name}" if key else name


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"


def _usable_path(value: Any, key: str, source: str, base: Path | None = None) -> Path:
    """``value`` as a path (``~`` expanded; a relative one resolved against ``base``, or the working folder when
    ``base`` is None), or a ``ConfigError`` naming ``key`` when no file can be named so (a NUL, a character the file
    system's encoding cannot hold, a symbolic link loop)."""
    text = os.fspath(value) if isinstance(value, os.PathLike) else str(value)
    where = f"{key}: " if key == "config file" else f"{source}: {key}: "
    if "\0" in text:
        raise ConfigError(f"{where}not a usable path (it holds a NUL character): {_short(text)}")
    try:
        os.fsencode(text)
    except UnicodeEncodeError as err:
        raise ConfigError(
            f"{where}not a usable path ({text[err.start]!r} at position {err.start} cannot be in a file name)"
        ) from None
    try:
        path = Path(text).expanduser()
        if path.is_absolute() and base is not None:
            return path
        return ((base / path) if base is not None else path).resolve()
    except (OSError, RuntimeError, ValueError) as err:  # a symbolic link loop; no home folder for ~
        raise ConfigError(f"{where}not a usable path ({err}): {_short(text)}") from None


def _exists(path: Path, kind: str, key: str, source: str) -> bool:
    """Whether ``path`` is a file (``kind`` "file") or a folder; a path the system cannot look up (a name too long)
    is a ``ConfigError`` naming ``key``."""
    try:
        return path.is_file() if kind == "file" else path.is_dir()
    except OSError as err:
        where = f"{key}: " if key == "config file" else f"{source}: {key}: "
        raise ConfigError(f"{where}cannot look up {_short(str(path))} ({err.strerror or err})") from None


def _apply_override(data: dict, item: str, source: str) -> None:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.max_steps=10")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except Exception:  # noqa: BLE001 - not YAML, or nothing YAML can build (2001-02-30): the text itself
        value = raw
    parts = key.strip().split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if i == 0 and part in ("input_projector", "output_projector") and isinstance(child, str):
            child = node[part] = {"name": child}  # a bare name set before, now given options
        if not isinstance(child, dict):
            raise ConfigError(f"--set {item!r}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def _resolve_paths(config: TrainConfig, base: Path) -> None:
    def resolve(value: str | None, key: str, folder: Path = base) -> str | None:
        return None if value is None else str(_usable_path(value, key, config.source, folder))

    config.output_dir = resolve(config.output_dir, "output_dir")
    config.cache_dir = resolve(config.cache_dir, "cache_dir")
    config.data_root = resolve(config.data_root, "data_root") or str(base)
    if config.model not in list_presets():
        config.model = resolve(config.model, "model")
    data_base = Path(config.data_root)
    for index, entry in enumerate(config.data.datasets):
        if not isinstance(entry, dict):
            continue  # reported by dataset_specs()
        for key in ("path", "media_root", "embedding_root"):
            if entry.get(key) is not None:
                entry[key] = resolve(entry[key], f"data.datasets[{index}].{key}", data_base)


def _dataset_spec(entry: Any, index: int, source: str) -> DatasetSpec:
    key = f"data.datasets[{index}]"
    if not isinstance(entry, dict):
        raise ConfigError(f"{source}: {key}: expected a mapping, got {type(entry).__name__}")
    known = {f.name for f in dataclasses.fields(DatasetSpec)}
    unknown = sorted(set(entry) - known)
    if unknown:
        raise ConfigError(f"{source}: {key}: unknown key(s) {unknown}; valid keys are {sorted(known)}")
    if "path" not in entry:
        raise ConfigError(f"{source}: {key}.path: missing (the dataset's JSON file)")
    try:
        spec = DatasetSpec(**entry)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{source}: {key}: {err}") from None

    def fail(name: str, message: str) -> None:
        raise ConfigError(f"{source}: {name}: {message}")

    _check_range(spec.weight, f"{key}.weight", (float, 0, 10**6, False, True), fail)
    _check_range(spec.max_samples, f"{key}.max_samples", (int, 1, 10**12, True, True), fail)
    return spec


def _build(cls: type, data: Any, prefix: str, source: str):
    """Build dataclass ``cls`` from ``data`` with unknown-key and type checks."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    unknown = sorted(prefix + (k if isinstance(k, str) else repr(k)) for k in data if k not in fields)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}; valid keys here are {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, prefix + name, source)
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{source}: missing key(s) {[prefix + m for m in missing]}")
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key, source)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".", source)
    if hint is Any:
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key}: expected a list, got {value!r}")
        (arg,) = typing.get_args(hint) or (Any,)
        return [_coerce(arg, v, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key}: expected a mapping, got {value!r}")
        _, arg = typing.get_args(hint) or (str, Any)
        return {str(k): _coerce(arg, v, f"{key}.{k}", source) for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: {key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: {key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 4e-4 as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{source}: {key}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{source}: {key}: expected a string, got {value!r}")
    return value
