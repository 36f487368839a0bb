"""Token merging (``projectors.token_merge``, ToMe's bipartite soft matching): against a brute-force O(n^2) reference,
token mass, the documented counts, the option's checks, and the model applying it to a connector's output."""

from __future__ import annotations

import math

import pytest
import torch

from anygpt.base.errors import ConfigError
from anygpt.base.modality import Modality
from projectors.token_merge import TokenMerge, merge_once, merge_tokens, parse_token_merge


# ---------------------------------------------------------------------------------------------- the reference
def _reference_round(x: list[list[float]], sizes: list[float], r: int) -> tuple[list[list[float]], list[float]]:
    """One round of bipartite soft matching written out with loops: A = even positions, B = odd ones; each A token's
    best B token by cosine similarity (the first on ties); the r A tokens with the strongest links join their B token
    as size-weighted means; the rest keep their places."""
    n = len(x)
    r = min(r, n // 2)
    a_pos, b_pos = list(range(0, n, 2)), list(range(1, n, 2))

    def cosine(u, v):
        dot = sum(p * q for p, q in zip(u, v, strict=True))
        return dot / (max(math.sqrt(sum(p * p for p in u)), 1e-12) * max(math.sqrt(sum(q * q for q in v)), 1e-12))

    links = []
    for ai, a in enumerate(a_pos):
        best, best_j = -math.inf, -1
        for bj, b in enumerate(b_pos):
            score = cosine(x[a], x[b])
            if score > best:
                best, best_j = score, bj
        links.append((best, ai, best_j))
    links.sort(key=lambda link: (-link[0], link[1]))
    merged = links[:r]
    total = [[v * sizes[i] for v in x[i]] for i in range(n)]
    size = list(sizes)
    removed = set()
    for _, ai, bj in merged:
        a, b = a_pos[ai], b_pos[bj]
        total[b] = [p + q for p, q in zip(total[b], total[a], strict=True)]
        size[b] += size[a]
        removed.add(a)
    kept = [i for i in range(n) if i not in removed]
    return [[v / size[i] for v in total[i]] for i in kept], [size[i] for i in kept]


def _reference(x: torch.Tensor, target: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows, row_sizes = [], []
    for seq in x.double().tolist():
        sizes = [1.0] * len(seq)
        while len(seq) > target:
            seq, sizes = _reference_round(seq, sizes, min(len(seq) - target, len(seq) // 2))
        rows.append(seq)
        row_sizes.append(sizes)
    return torch.tensor(rows, dtype=torch.float64), torch.tensor(row_sizes, dtype=torch.float64)


@pytest.mark.parametrize(("batch", "n", "channels", "r"), [(1, 2, 3, 1), (2, 9, 4, 3), (3, 16, 5, 8), (2, 17, 6, 5)])
def test_one_round_equals_the_brute_force_reference(batch, n, channels, r):
    x = torch.randn(batch, n, channels, generator=torch.Generator().manual_seed(n * 31 + r))
    out, sizes = merge_once(x.double(), r)
    want, want_sizes = _reference(x, n - min(r, n // 2))
    assert out.shape == (batch, n - min(r, n // 2), channels)
    torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(sizes.double(), want_sizes)


@pytest.mark.parametrize(("n", "target"), [(8, 1), (17, 3), (33, 9), (40, 40), (12, 50)])
def test_rounds_down_to_a_target_equal_the_reference(n, target):
    x = torch.randn(2, n, 7, generator=torch.Generator().manual_seed(n + target))
    out, sizes = merge_tokens(x.double(), target)
    want, want_sizes = _reference(x, target)
    assert out.shape == (2, min(n, target), 7)
    torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(sizes.double(), want_sizes)


def test_a_constant_sequence_merges_to_the_constant_and_the_sizes_count_every_token():
    value = torch.tensor([0.25, -3.0, 7.5])
    x = value.expand(2, 23, 3).clone()
    for target in (1, 5, 12, 22):
        out, sizes = merge_tokens(x, target)
        assert out.shape == (2, target, 3)
        torch.testing.assert_close(out, value.expand(2, target, 3))
        assert sizes.sum(dim=1).tolist() == [23.0, 23.0]


def test_merging_preserves_the_token_mass():
    """Every output is the size-weighted mean of the inputs it holds: sizes x outputs add up to the inputs' sum."""
    x = torch.randn(3, 31, 8, generator=torch.Generator().manual_seed(5))
    out, sizes = merge_tokens(x.double(), 6)
    torch.testing.assert_close((out * sizes[..., None]).sum(dim=1), x.double().sum(dim=1))
    assert sizes.min() >= 1 and sizes.sum(dim=1).tolist() == [31.0] * 3


def test_the_most_similar_tokens_merge_and_the_order_is_kept():
    # tokens 0 and 1 point the same way, every other pair is orthogonal: one merge joins exactly 0 into 1
    x = torch.eye(6)[None].clone()
    x[0, 1] = x[0, 0] * 2.0
    out, sizes = merge_once(x, 1)
    assert sizes.tolist() == [[2.0, 1.0, 1.0, 1.0, 1.0]]
    torch.testing.assert_close(out[0, 0], (x[0, 0] + x[0, 1]) / 2)  # the merged token sits where token 1 was
    torch.testing.assert_close(out[0, 1:], x[0, 2:])  # the others in their order


def test_gradients_flow_through_the_merge():
    x = torch.randn(2, 10, 4, requires_grad=True)
    out, _ = merge_tokens(x, 4)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- the option
@pytest.mark.parametrize(
    ("option", "n", "count"),
    [
        ({"ratio": 0.5}, 8, 4),
        ({"ratio": 0.5}, 257, 129),
        ({"ratio": 0.75}, 8, 2),  # 4x fewer
        ({"ratio": 0.0}, 8, 8),
        ({"ratio": 0.99}, 8, 1),  # at least one token is kept
        ({"target": 3}, 8, 3),
        ({"target": 16}, 8, 8),  # fewer tokens than the target: unchanged
        ({"target": 1}, 1, 1),
    ],
)
def test_ratio_and_target_give_the_documented_counts(option, n, count):
    merge = parse_token_merge(option)
    assert merge.count(n) == count
    assert merge(torch.randn(2, n, 5)).shape == (2, count, 5)
    assert parse_token_merge(merge.to_dict()) == merge


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([0.5], "expected {ratio: r} or {target: n}"),
        ({}, "exactly one of 'ratio'"),
        ({"ratio": 0.5, "target": 4}, "exactly one of 'ratio'"),
        ({"rate": 0.5}, "exactly one of 'ratio'"),
        ({"ratio": 1.0}, r"ratio: expected a number in \[0, 1\)"),
        ({"ratio": -0.1}, r"ratio: expected a number in \[0, 1\)"),
        ({"ratio": float("nan")}, r"ratio: expected a number in \[0, 1\)"),
        ({"ratio": True}, r"ratio: expected a number in \[0, 1\)"),
        ({"target": 0}, "target: expected an integer in 1"),
        ({"target": 2.0}, "target: expected an integer in 1"),
    ],
)
def test_bad_options_are_config_errors_naming_the_option(value, message):
    with pytest.raises(ConfigError, match=message):
        parse_token_merge(value, "input_projector.options.token_merge")
    with pytest.raises(ConfigError, match="input_projector.options.token_merge"):
        parse_token_merge(value, "input_projector.options.token_merge")


def test_merge_tokens_refuses_a_target_below_one():
    with pytest.raises(ValueError, match="target must be >= 1"):
        merge_tokens(torch.randn(1, 4, 2), 0)


# ---------------------------------------------------------------------------------------------- in the model
PERCEIVER = {"num_latents": 8, "hidden_dim": 32, "depth": 1, "num_heads": 2}


def _model(options: dict, name: str = "perceiver"):
    from anygpt.core.config import ProjectorConfig, config_from_preset
    from anygpt.core.pipeline import AnyGPTPipeline

    config = config_from_preset("tiny")
    config.input_projector = ProjectorConfig(name, options)
    return AnyGPTPipeline.from_config(config).model


def test_the_model_merges_each_connectors_output_and_counts_it():
    model = _model({**PERCEIVER, "token_merge": {"ratio": 0.5}})
    plain = _model(PERCEIVER)  # the same seed: the same connector weights
    assert "token_merge" not in model.input_projectors["image"].config  # the model's option, not the connector's
    assert model.num_media_tokens(Modality.IMAGE) == 4 and plain.num_media_tokens(Modality.IMAGE) == 8
    assert model.num_media_tokens(Modality.AUDIO) == 4  # every modality's connector
    encoder = model.encoder
    out = encoder.encode("image", [torch.zeros(40, 40, 3, dtype=torch.uint8).numpy()])
    with torch.no_grad():
        merged = model.project_media(Modality.IMAGE, out.embeds, out.tokens)
        full = plain.project_media(Modality.IMAGE, out.embeds, out.tokens)
    assert merged.shape == (1, 4, model.hidden_size)
    torch.testing.assert_close(merged, merge_tokens(full, 4)[0])


def test_token_merge_on_a_one_token_connector_is_refused():
    with pytest.raises(ConfigError, match="token_merge: the linear connector gives one token per"):
        _model({"token_merge": {"target": 2}}, name="linear")


def test_a_bad_token_merge_option_fails_the_system_config():
    from anygpt.core.config import AnyGPTConfig, config_from_preset

    data = config_from_preset("tiny").to_dict()
    data["input_projector"] = {"name": "perceiver", "options": {**PERCEIVER, "token_merge": {"ratio": 2}}}
    with pytest.raises(ConfigError, match=r"input_projector.options.token_merge.ratio"):
        AnyGPTConfig.from_dict(data)


def test_token_merge_is_a_frozen_value():
    assert TokenMerge(target=4) == TokenMerge(target=4)
    with pytest.raises(ConfigError):
        TokenMerge()
