"""AnyRes (``encoders.anyres``): grid choice against a brute-force search, tile layout for several aspect ratios, the
views' order through the encoder and into the LLM input, the token budget, the system config and per-call options."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anygpt.base.errors import ConfigError, UsageError
from anygpt.base.modality import Modality
from anygpt.core.config import AnyGPTConfig, ImageInputConfig, ProjectorConfig, config_from_preset
from anygpt.core.conversation import Conversation
from anygpt.core.request import GenerationRequest
from encoders.anyres import DEFAULT_GRIDS, PAD_COLOUR, anyres_views, blank_tile, layout_image, select_grid
from encoders.transforms import VISION_MEAN, VISION_STD

PERCEIVER = {"num_latents": 4, "hidden_dim": 32, "depth": 1, "num_heads": 2}
RED, GREEN, BLUE, YELLOW = (220, 40, 40), (40, 180, 60), (40, 80, 220), (230, 200, 40)
GREY, CYAN = (90, 90, 90), (0, 200, 200)


def _pixels(view: torch.Tensor) -> torch.Tensor:
    """A normalised view back to 0..255 RGB values (3, H, W)."""
    mean = torch.tensor(VISION_MEAN)[:, None, None]
    std = torch.tensor(VISION_STD)[:, None, None]
    return (view * std + mean) * 255


def _colour_of(view: torch.Tensor) -> tuple[int, ...]:
    pixels = _pixels(view)
    assert (pixels - pixels[:, :1, :1]).abs().max() < 1.0, "the view is not one flat colour"
    return tuple(int(round(v)) for v in pixels[:, 0, 0].tolist())


def _blocks(rows: int, cols: int, colours: list[tuple[int, int, int]], side: int = 224) -> Image.Image:
    """An image of rows x cols flat blocks of ``side`` pixels, coloured row by row."""
    pixels = np.zeros((rows * side, cols * side, 3), dtype=np.uint8)
    for index, (r, c) in enumerate(itertools.product(range(rows), range(cols))):
        pixels[r * side : (r + 1) * side, c * side : (c + 1) * side] = colours[index]
    return Image.fromarray(pixels)


# ---------------------------------------------------------------------------------------------- grid choice
def _brute_force_grid(width: int, height: int, grids, tile: int = 224) -> tuple[int, int]:
    """Every grid scored with exact fractions: the most effective pixels (the fitted image's, its sides rounded
    down, at most the original's), then the least waste, then the first listed."""
    scored = []
    for index, (rows, cols) in enumerate(grids):
        canvas_w, canvas_h = cols * tile, rows * tile
        scale = min(Fraction(canvas_w, width), Fraction(canvas_h, height))
        effective = min(math.floor(width * scale) * math.floor(height * scale), width * height)
        scored.append((-effective, canvas_w * canvas_h - effective, index, (rows, cols)))
    return min(scored)[3]


GRID_SETS = [DEFAULT_GRIDS, ((1, 1), (1, 2), (2, 1), (2, 2)), ((2, 3), (3, 2), (1, 4), (4, 1), (3, 3), (1, 1))]


@pytest.mark.parametrize("grids", GRID_SETS, ids=["llava-next", "up-to-2x2", "wide-set"])
def test_the_grid_choice_matches_a_brute_force_search(grids):
    rng = np.random.default_rng(0)
    sizes = [(448, 448), (672, 224), (224, 672), (64, 64), (3, 1000), (1000, 3), (225, 224), (800, 600), (1, 1)]
    sizes += [tuple(int(v) for v in rng.integers(1, 1400, 2)) for _ in range(300)]
    for width, height in sizes:
        assert select_grid((width, height), grids) == _brute_force_grid(width, height, grids), (width, height)


def test_the_grid_follows_the_aspect_ratio():
    assert select_grid((448, 448), DEFAULT_GRIDS) == (2, 2)
    assert select_grid((672, 224), DEFAULT_GRIDS) == (1, 3)  # wide: one row of three
    assert select_grid((224, 672), DEFAULT_GRIDS) == (3, 1)  # tall: three rows of one
    assert select_grid((448, 224), DEFAULT_GRIDS) == (1, 2)
    assert select_grid((64, 64), DEFAULT_GRIDS) == (1, 2)  # small: every grid holds it whole, the least waste first
    assert select_grid((64, 64), ((2, 2), (1, 1))) == (1, 1)


# ---------------------------------------------------------------------------------------------- tile layout
@pytest.mark.parametrize(
    ("rows", "cols", "colours"),
    [
        (2, 2, [RED, GREEN, BLUE, YELLOW]),  # 448 x 448
        (1, 3, [RED, GREEN, BLUE]),  # 672 wide x 224 high
        (3, 1, [RED, GREEN, BLUE]),  # 224 wide x 672 high
        (1, 2, [CYAN, GREY]),  # 448 x 224
    ],
)
def test_the_tiles_come_in_row_major_order_after_the_global_view(rows, cols, colours):
    image = _blocks(rows, cols, colours)
    views, layout = anyres_views(image, DEFAULT_GRIDS)
    assert layout.grid == (rows, cols) and layout.resized == image.size and layout.offset == (0, 0)
    assert layout.slots == 4 and views.shape == (5, 3, 224, 224)  # every image: global view + 4 tile slots
    for index, colour in enumerate(colours):
        assert _colour_of(views[1 + index]) == colour, index  # the canvas is the image: each tile one block
    for blank in views[1 + rows * cols :]:
        assert _colour_of(blank) == PAD_COLOUR
        torch.testing.assert_close(blank, blank_tile())
    # the global view first: the whole image fitted into 224 x 224 and centred (letterboxed, not cropped)
    small = (224, round(224 * rows / cols)) if cols >= rows else (round(224 * cols / rows), 224)
    expected = Image.new("RGB", (224, 224), PAD_COLOUR)
    expected.paste(image.resize(small, Image.Resampling.BICUBIC), ((224 - small[0]) // 2, (224 - small[1]) // 2))
    pixels = torch.from_numpy(np.array(expected)).permute(2, 0, 1).float()
    torch.testing.assert_close(_pixels(views[0]), pixels, atol=1e-3, rtol=0)


def test_an_image_off_the_grids_aspect_is_fitted_and_centred_on_the_canvas():
    image = Image.new("RGB", (500, 300), RED)
    views, layout = anyres_views(image, DEFAULT_GRIDS)
    # 2 x 2 keeps 448 x 268 of its pixels, more than a row of two (373 x 224) or of three
    assert layout.grid == _brute_force_grid(500, 300, DEFAULT_GRIDS) == (2, 2)
    assert layout.resized == (448, 269) and layout.offset == (0, 89)  # centred: 89 rows of margin above
    pad, red = torch.tensor(PAD_COLOUR)[:, None, None], torch.tensor(RED)[:, None, None]
    assert _pixels(views[1])[:, :85].sub(pad).abs().max() < 1  # tile (0, 0): the margin, then the image
    assert _pixels(views[1])[:, 95:].sub(red).abs().max() < 1
    assert _pixels(views[3])[:, :130].sub(red).abs().max() < 1  # tile (1, 0): the image ends at row 358 - 224
    assert _pixels(views[3])[:, 140:].sub(pad).abs().max() < 1
    assert layout_image((448, 224), DEFAULT_GRIDS, slots=2).num_views == 3
    with pytest.raises(ValueError, match="2 slots cannot hold a 2 x 2 grid"):
        layout_image((448, 448), DEFAULT_GRIDS, slots=2)


# ---------------------------------------------------------------------------------------------- encoder
@pytest.fixture(scope="module")
def encoder():
    from encoders import build_imagebind_encoder

    return build_imagebind_encoder("tiny", seed=0)


def test_the_encoder_returns_the_views_sequences_in_order(encoder):
    images = [_blocks(2, 2, [RED, GREEN, BLUE, YELLOW]), _blocks(1, 3, [RED, GREEN, BLUE])]
    out = encoder.encode("image", images, resolution="anyres")
    n = encoder.num_tokens("image")
    assert out.tokens.shape == (2, 5 * n, encoder.token_dim("image")) and out.embeds.shape == (2, encoder.embed_dim)
    for row, image in enumerate(images):
        views, _ = anyres_views(image, DEFAULT_GRIDS)
        alone = encoder(Modality.IMAGE, views)  # every view by itself
        torch.testing.assert_close(out.tokens[row], alone.tokens.flatten(0, 1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.embeds[row], alone.embeds[0], atol=1e-5, rtol=1e-5)  # the global view's
    fixed = encoder.encode("image", images)  # the default stays the fixed 224 x 224
    assert fixed.tokens.shape == (2, n, encoder.token_dim("image"))
    assert "anyres_grids_tensor" not in encoder.state_dict()
    encoder.set_image_input("anyres", [[1, 2], [2, 1]])
    try:  # the default now AnyRes with grids of two tiles; the feature cache's fingerprint sees the grids
        assert encoder.encode("image", images[:1]).tokens.shape[1] == 3 * n
        assert encoder.state_dict()["anyres_grids_tensor"].tolist() == [[1, 2], [2, 1]]
    finally:
        encoder.set_image_input("fixed", DEFAULT_GRIDS)
    assert "anyres_grids_tensor" not in encoder.state_dict()


# ---------------------------------------------------------------------------------------------- the system
def _config(connector: str = "perceiver", options: dict | None = None, **image_input) -> AnyGPTConfig:
    config = config_from_preset("tiny")
    config.input_projector = ProjectorConfig(connector, PERCEIVER if options is None else options)
    config.image_input = ImageInputConfig(**image_input)
    return config


def _pipe(config: AnyGPTConfig):
    from anygpt.core.pipeline import AnyGPTPipeline

    return AnyGPTPipeline.from_config(config)


@pytest.fixture(scope="module")
def anyres_pipe():
    return _pipe(_config(resolution="anyres"))


def _placeholder_rows(pipe, conversation: Conversation) -> tuple[torch.Tensor, torch.Tensor]:
    ids, embeds = pipe.build_inputs(conversation)
    mask = ids[0] == pipe.model.tokens.placeholder[Modality.IMAGE]
    return mask, embeds[0, mask]


def test_the_views_are_spliced_into_the_llm_input_in_order(anyres_pipe):
    pipe, model = anyres_pipe, anyres_pipe.model
    image = _blocks(1, 3, [RED, GREEN, BLUE])
    conversation = Conversation(template=pipe.config.llm.template)
    pipe._add_user_turn(conversation, GenerationRequest("what is this?", images=[image]))
    mask, spliced = _placeholder_rows(pipe, conversation)
    k, views = 4, 5
    assert model.num_media_tokens(Modality.IMAGE) == views * k + views - 1 == int(mask.sum())
    # by hand: each view encoded alone, its connector output, the placeholder row between consecutive views
    view_tokens = model.encoder(Modality.IMAGE, anyres_views(image, DEFAULT_GRIDS)[0])
    projector = model.input_projectors["image"]
    separator = model.language_model.get_input_embeddings().weight[model.tokens.placeholder[Modality.IMAGE]]
    with torch.no_grad():
        expected = []
        for v in range(views):
            expected.append(projector(view_tokens.embeds[v : v + 1], view_tokens.tokens[v : v + 1])[0])
            if v < views - 1:
                expected.append(separator[None])
        expected = torch.cat(expected)
    torch.testing.assert_close(spliced, expected, atol=1e-5, rtol=1e-5)
    # the positions form one run, and the global view's tokens come first
    where = mask.nonzero()[:, 0]
    assert (where[1:] - where[:-1]).eq(1).all()
    assert not torch.allclose(spliced[:k], spliced[k + 1 : 2 * k + 1])


def test_a_call_may_read_its_images_at_the_other_resolution(anyres_pipe):
    pipe = anyres_pipe
    image = _blocks(2, 2, [RED, GREEN, BLUE, YELLOW])
    conversation = Conversation(template=pipe.config.llm.template)
    pipe._add_user_turn(conversation, GenerationRequest("first", images=[image]))
    pipe._add_user_turn(conversation, GenerationRequest("second", images=[image], image_resolution="fixed"))
    assert len(conversation.features) == 2  # one image, two readings, two keys
    assert sorted(k.endswith("+anyres") for k in conversation.features) == [False, True]
    mask, _ = _placeholder_rows(pipe, conversation)
    assert int(mask.sum()) == 24 + 4  # 5 views x 4 + 4 separators, then one view of 4


def test_per_call_resolution_is_validated_naming_the_field(tiny_pipe):
    for bad in ("high", "ANYRES", 3, ["anyres"], True):
        with pytest.raises(UsageError, match="image_resolution must be 'fixed', 'anyres' or None"):
            GenerationRequest("x", image_resolution=bad)
    request = GenerationRequest("x", image_resolution="anyres")
    assert GenerationRequest.from_dict(request.to_dict()) == request
    image = Image.new("RGB", (64, 64))
    with pytest.raises(UsageError, match="image_resolution: 'anyres' is not possible with this model: the linear"):
        tiny_pipe.run(GenerationRequest("x", images=[image], max_new_tokens=1, image_resolution="anyres"))


def test_anyres_with_a_pooled_connector_is_a_config_error():
    with pytest.raises(ConfigError, match="image_input.resolution: 'anyres' is not possible: the linear connector"):
        _pipe(_config("linear", {}, resolution="anyres"))
    pipe = _pipe(_config("mlp", {"source": "tokens", "spatial_pool": 4}, resolution="anyres"))  # mlp on the tokens
    assert pipe.model.num_media_tokens(Modality.IMAGE) == 5 * 16 + 4


TOKEN_CONNECTORS = [
    ("group", {}),
    ("qformer", {}),
    ("perceiver", {}),
    ("cabstractor", {}),
    ("linear", {"source": "tokens", "spatial_pool": 4}),
    ("mlp", {"source": "tokens", "spatial_pool": 4, "token_merge": {"ratio": 0.5}}),
]


@pytest.mark.parametrize(("name", "options"), TOKEN_CONNECTORS, ids=[n for n, _ in TOKEN_CONNECTORS])
def test_every_token_sequence_connector_reads_anyres_images(name, options):
    from projectors import get_input_projector_class

    pipe = _pipe(_config(name, {**get_input_projector_class(name).presets["tiny"], **options}, resolution="anyres"))
    model = pipe.model
    k = model.num_media_features(Modality.IMAGE, views=1)
    assert model.num_media_tokens(Modality.IMAGE) == 5 * k + 4
    conversation = Conversation(template=pipe.config.llm.template)
    pipe._add_user_turn(conversation, GenerationRequest("x", images=[_blocks(1, 2, [RED, BLUE])]))
    mask, spliced = _placeholder_rows(pipe, conversation)
    assert int(mask.sum()) == 5 * k + 4 and torch.isfinite(spliced).all()


def test_the_token_budget_is_respected():
    # 4 tokens per view: 2 tiles -> 3 views -> 14 tokens, 3 tiles -> 19, 4 tiles -> 24
    pipe = _pipe(_config(resolution="anyres", max_image_tokens=20))
    model = pipe.model
    assert model.anyres_grids == ((1, 2), (2, 1), (1, 3), (3, 1))  # (2, 2) takes 24 tokens
    assert model.num_media_tokens(Modality.IMAGE) == 19 <= 20
    conversation = Conversation(template=pipe.config.llm.template)
    pipe._add_user_turn(conversation, GenerationRequest("x", images=[_blocks(2, 2, [RED, GREEN, BLUE, YELLOW])]))
    mask, _ = _placeholder_rows(pipe, conversation)
    assert int(mask.sum()) == 19
    merged = _pipe(_config(options={**PERCEIVER, "token_merge": {"ratio": 0.5}}, resolution="anyres",
                           max_image_tokens=14))  # fmt: skip
    assert merged.model.anyres_grids == DEFAULT_GRIDS and merged.model.num_media_tokens(Modality.IMAGE) == 14
    with pytest.raises(ConfigError, match="no grid of image_input.anyres_grids fits image_input.max_image_tokens 13"):
        _pipe(_config(resolution="anyres", max_image_tokens=13))
    with pytest.raises(ConfigError, match="an image takes 4 tokens .* over the budget of 3"):
        _pipe(_config(max_image_tokens=3))
    fixed = _pipe(_config(max_image_tokens=13))  # fixed: fine, but a call cannot ask for AnyRes
    with pytest.raises(UsageError, match="image_resolution: 'anyres' is not possible with this model: no grid"):
        fixed.model.resolve_image_resolution("anyres")


@pytest.mark.parametrize(
    ("image_input", "message"),
    [
        ({"resolution": "high"}, "image_input.resolution: expected 'fixed' or 'anyres'"),
        ({"anyres_grids": []}, "image_input.anyres_grids: expected a non-empty list"),
        ({"anyres_grids": [[0, 2]]}, r"image_input.anyres_grids: each grid is \[rows, cols\]"),
        ({"anyres_grids": [[1, 2, 3]]}, r"image_input.anyres_grids: each grid is \[rows, cols\]"),
        ({"anyres_grids": [[5, 4]]}, "has 20 tiles, at most 16"),
        ({"anyres_grids": [[1, 2], [1, 2]]}, r"grid \[1, 2\] is given twice"),
        ({"max_image_tokens": 0}, "image_input.max_image_tokens: expected an integer"),
        ({"max_image_tokens": 1.5}, "image_input.max_image_tokens: expected an integer"),
        ({"tiles": 4}, r"image_input: unknown keys \['tiles'\]"),
    ],
)
def test_bad_image_input_options_are_config_errors_naming_the_key(image_input, message):
    data = config_from_preset("tiny").to_dict()
    data["image_input"] = image_input
    with pytest.raises(ConfigError, match=message):
        AnyGPTConfig.from_dict(data)


def test_the_options_round_trip_through_save_and_load(tmp_path):
    from anygpt.core.pipeline import AnyGPTPipeline

    config = _config(
        options={**PERCEIVER, "token_merge": {"target": 3}},
        resolution="anyres",
        anyres_grids=[[1, 2], [2, 1], [2, 2]],
        max_image_tokens=40,
    )
    assert AnyGPTConfig.from_dict(config.to_dict()) == config
    assert "image_input" not in config_from_preset("tiny").to_dict()  # the default adds nothing to an index
    pipe = _pipe(config)
    pipe.save_pretrained(tmp_path / "model")
    loaded = AnyGPTPipeline.from_pretrained(tmp_path / "model")
    assert loaded.config.image_input == config.image_input
    assert loaded.config.input_projector.options["token_merge"] == {"target": 3}
    assert loaded.model.num_media_tokens(Modality.IMAGE) == pipe.model.num_media_tokens(Modality.IMAGE) == 5 * 3 + 4
    image = _blocks(1, 2, [RED, BLUE])
    built = []
    for p in (pipe, loaded):
        conversation = Conversation(template=p.config.llm.template)
        p._add_user_turn(conversation, GenerationRequest("x", images=[image]))
        built.append(p.build_inputs(conversation))
    assert torch.equal(built[0][0], built[1][0])
    torch.testing.assert_close(built[0][1], built[1][1])


def test_video_keeps_the_fixed_path(anyres_pipe):
    model = anyres_pipe.model
    assert model.num_media_tokens(Modality.VIDEO) == 4 and model.num_media_tokens(Modality.AUDIO) == 4
    tokens = torch.zeros(1, 5 * model.encoder.num_tokens("video"), model.encoder.token_dim("video"))
    assert model.views_in(Modality.VIDEO, tokens) == 1


# ---------------------------------------------------------------------------------------------- benchmark
@pytest.mark.slow
def test_the_benchmarks_quick_path_runs(tmp_path):
    """``bench_anyres.py --quick``: three variants trained (tiny preset, 2 steps) and scored, within a minute or two."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_anyres.py"
    out = tmp_path / "anyres.json"
    done = subprocess.run(
        [sys.executable, str(script), "--quick", "--out", str(out)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    table = results["toy_world_anyres"]
    assert list(table) == ["fixed 224", "anyres", "anyres + merge 0.5"]
    # the quick connector gives 8 tokens a view: 1 view; 5 views + 4 markers; 5 merged views of 4 + 4 markers
    assert [row["features_per_image"] for row in table.values()] == [8, 44, 24]
    for row in table.values():
        assert 0 <= row["colour"] <= 1 and 0 <= row["shape"] <= 1 and row["s_per_image"] > 0 and row["step_s"] > 0
    assert results["markdown"].count("\n") == 4 and "| anyres + merge 0.5 |" in results["markdown"]
