import pytest
import torch

from projectors import (
    build_input_projector,
    build_output_projector,
    get_input_projector_class,
    get_output_projector_class,
    list_input_projectors,
    list_output_projectors,
)

TINY_INPUT_OPTIONS = {
    "linear": {},
    "mlp": {},
    "group": {"hidden_dim": 32, "num_heads": 4, "num_groups": [16, 8], "depths": [1, 1], "final_depth": 1},
}
# every registered output projector, with its tiny preset
TINY_OUTPUT_OPTIONS = {name: get_output_projector_class(name).presets["tiny"] for name in list_output_projectors()}


def test_registries_list_the_builtin_projectors():
    assert set(list_input_projectors()) >= {"linear", "mlp", "group"}
    assert set(list_output_projectors()) >= {"transformer", "linear"}
    with pytest.raises(ValueError, match="registered input projectors are .*group.*linear.*mlp"):
        get_input_projector_class("nope")
    with pytest.raises(ValueError, match="unknown output projector 'nope'"):
        get_output_projector_class("nope")


@pytest.mark.parametrize("name", sorted(TINY_INPUT_OPTIONS))
@pytest.mark.parametrize("num_tokens", [17, 50])
def test_input_projector_shapes(name, num_tokens):
    proj = build_input_projector(name, in_dim=24, token_dim=20, out_dim=48, **TINY_INPUT_OPTIONS[name])
    out = proj(torch.randn(3, 24), torch.randn(3, num_tokens, 20))
    assert out.shape == (3, proj.num_output_tokens, 48)
    assert proj.num_output_tokens == (8 if name == "group" else 1)


@pytest.mark.parametrize("name", sorted(TINY_INPUT_OPTIONS))
def test_input_projector_round_trip(tmp_path, name):
    proj = build_input_projector(name, in_dim=24, token_dim=20, out_dim=48, **TINY_INPUT_OPTIONS[name]).eval()
    proj.save_pretrained(tmp_path)
    loaded = get_input_projector_class(name).from_pretrained(tmp_path).eval()
    x, t = torch.randn(2, 24), torch.randn(2, 30, 20)
    assert torch.equal(proj(x, t), loaded(x, t))


@pytest.mark.parametrize("name", sorted(TINY_OUTPUT_OPTIONS))
@pytest.mark.parametrize(("num_queries", "num_signal", "dim"), [(77, 4, 768), (77, 24, 1024), (1, 8, 512), (24, 8, 64)])
def test_output_projector_shapes(name, num_queries, num_signal, dim):
    proj = build_output_projector(
        name,
        in_dim=32,
        out_dim=dim,
        num_queries=num_queries,
        num_signal_tokens=num_signal,
        **TINY_OUTPUT_OPTIONS[name],
    )
    out = proj(torch.randn(2, num_signal, 32), torch.randn(2, num_signal, 32))
    assert out.shape == (2, num_queries, dim)


@pytest.mark.parametrize("name", sorted(TINY_OUTPUT_OPTIONS))
def test_output_projector_round_trip_and_gradients(tmp_path, name):
    proj = build_output_projector(
        name, in_dim=32, out_dim=16, num_queries=5, num_signal_tokens=4, **TINY_OUTPUT_OPTIONS[name]
    )
    h, e = torch.randn(2, 4, 32, requires_grad=True), torch.randn(2, 4, 32)
    proj(h, e).pow(2).sum().backward()
    assert h.grad is not None and h.grad.abs().sum() > 0
    assert all(p.grad is not None for p in proj.parameters())
    proj.save_pretrained(tmp_path)
    loaded = get_output_projector_class(name).from_pretrained(tmp_path)
    assert torch.equal(proj.eval()(h, e), loaded.eval()(h, e))


def test_nextgpt_size_output_projector_parameter_count():
    with torch.device("meta"):
        proj = build_output_projector("transformer", in_dim=4096, out_dim=768, num_queries=77, num_signal_tokens=4)
    count = sum(p.numel() for p in proj.parameters())
    assert 30e6 < count < 34e6  # NExT-GPT reports about 32 M per output projector


def test_group_projector_needs_tokens():
    proj = build_input_projector("group", in_dim=8, token_dim=8, out_dim=8, **TINY_INPUT_OPTIONS["group"])
    with pytest.raises(ValueError, match="token sequence"):
        proj(torch.randn(1, 8), None)
