"""Name-keyed registries of input and output projectors.

Every projector class is a diffusers ``ModelMixin`` + ``ConfigMixin`` so it saves to and loads from a folder
(``config.json`` + safetensors) by itself. The registries map lowercase names to classes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch.nn as nn

T = TypeVar("T", bound=type)

INPUT_PROJECTORS: dict[str, type[nn.Module]] = {}
OUTPUT_PROJECTORS: dict[str, type[nn.Module]] = {}


def _register(registry: dict[str, type[nn.Module]], side: str, name: str) -> Callable[[T], T]:
    key = name.lower()

    def decorator(cls: T) -> T:
        if key in registry and registry[key] is not cls:
            raise ValueError(f"{side} projector {key!r} is already registered to {registry[key].__name__}")
        registry[key] = cls
        cls.projector_name = key
        return cls

    return decorator


def register_input_projector(name: str) -> Callable[[T], T]:
    """Class decorator: register an input projector under ``name`` (lowercase)."""
    return _register(INPUT_PROJECTORS, "input", name)


def register_output_projector(name: str) -> Callable[[T], T]:
    """Class decorator: register an output projector under ``name`` (lowercase)."""
    return _register(OUTPUT_PROJECTORS, "output", name)


def _lookup(registry: dict[str, type[nn.Module]], side: str, name: str) -> type[nn.Module]:
    key = str(name).lower()
    if key not in registry:
        valid = ", ".join(sorted(registry))
        raise ValueError(f"unknown {side} projector {name!r}: registered {side} projectors are {valid}")
    return registry[key]


def get_input_projector_class(name: str) -> type[nn.Module]:
    return _lookup(INPUT_PROJECTORS, "input", name)


def get_output_projector_class(name: str) -> type[nn.Module]:
    return _lookup(OUTPUT_PROJECTORS, "output", name)


def list_input_projectors() -> list[str]:
    return sorted(INPUT_PROJECTORS)


def list_output_projectors() -> list[str]:
    return sorted(OUTPUT_PROJECTORS)


def describe_projectors(side: str) -> dict[str, str]:
    """``{name: the first sentence of the class's docstring}`` of the ``input`` or ``output`` registry."""
    registry = {"input": INPUT_PROJECTORS, "output": OUTPUT_PROJECTORS}[side]
    summaries = {}
    for name in sorted(registry):
        doc = " ".join((registry[name].__doc__ or "").replace("``", "").split())
        summaries[name] = doc.split(". ")[0].rstrip(".") + "." if doc else ""
    return summaries


def build_input_projector(name: str, *, in_dim: int, token_dim: int, out_dim: int, **options) -> nn.Module:
    """Build the input projector registered as ``name``.

    Args:
        name: registry name (``anygpt info projectors`` lists them).
        in_dim: size of the encoder's pooled embedding (D).
        token_dim: size of the encoder's token sequence (D_tok).
        out_dim: the LLM's hidden size (H).
        **options: projector-specific options (see each class).
    """
    cls = _lookup(INPUT_PROJECTORS, "input", name)
    return cls(in_dim=in_dim, token_dim=token_dim, out_dim=out_dim, **options)


def build_output_projector(
    name: str, *, in_dim: int, out_dim: int, num_queries: int, num_signal_tokens: int, **options
) -> nn.Module:
    """Build the output projector registered as ``name``.

    Args:
        name: registry name.
        in_dim: the LLM's hidden size (H).
        out_dim: the decoder's conditioning size (D_cond).
        num_queries: how many conditioning tokens to produce (L; 1 for a pooled conditioning).
        num_signal_tokens: how many signal tokens feed it (N).
        **options: projector-specific options.
    """
    cls = _lookup(OUTPUT_PROJECTORS, "output", name)
    return cls(
        in_dim=in_dim,
        out_dim=out_dim,
        num_queries=num_queries,
        num_signal_tokens=num_signal_tokens,
        **options,
    )
