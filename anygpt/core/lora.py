"""Several LoRA adapters on one LLM, through peft's multi-adapter support (per-modality adapters).

``LoraSettings.adapters`` names them after the output modality each one serves (``["text", "image", "video",
"audio"]``); None keeps one adapter named ``"default"`` (peft's name, the single-adapter layout). All of them live in
the one ``PeftModel``: switching is ``set_adapter`` (no reload, no copy), and a combination is a further adapter that
peft's ``add_weighted_adapter(combination_type="cat")`` builds: its update is exactly ``sum_i w_i * B_i A_i * s_i``.

peft's ``set_adapter`` also turns ``requires_grad`` on for the adapters it activates and off for the others; every
switch here keeps each parameter's flag as it was, so a training recipe decides what trains (all adapters: the
optimizer holds them all) and a frozen model stays frozen.

Files: a single-adapter model writes ``lora/adapter_model.safetensors`` and ``lora/adapter_config.json`` (peft's
format; the index says ``"lora": "lora"``); a multi-adapter model writes one such pair per adapter in ``lora/<name>/``
and the index says ``"lora": {"text": "lora/text", ...}``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from anygpt.base.errors import CheckpointError
from anygpt.core.index import read_weights, resolve_part
from anygpt.core.llm import LoraSettings

logger = logging.getLogger(__name__)

DEFAULT_ADAPTER = "default"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
COMBINED_PREFIX = "combined_"
MAX_COMBINED = 4  # combinations kept in the model; the oldest is deleted beyond this


def adapter_names(settings: LoraSettings | None) -> list[str]:
    """The adapters a LoRA setting makes: ``[]`` (no LoRA), ``["default"]`` or the per-modality names."""
    if settings is None:
        return []
    return list(settings.adapters) if settings.adapters is not None else [DEFAULT_ADAPTER]


def apply_lora(llm: nn.Module, settings: LoraSettings, *, seed: int) -> nn.Module:
    """Wrap ``llm`` in a ``PeftModel`` holding every adapter of ``settings`` (the first one active).

    The LoRA A matrices start random; they are drawn from ``seed`` (one adapter after the other), the same for every
    build whatever the global RNG.
    """
    from peft import get_peft_model

    names = adapter_names(settings)
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        torch.manual_seed(seed)  # LoRA A matrices start random: the same for every build
        if settings.adapters is None:
            return get_peft_model(llm, settings.to_peft())  # one adapter, "default": the single-adapter layout
        llm = get_peft_model(llm, settings.to_peft(), adapter_name=names[0])
        for name in names[1:]:
            llm.add_adapter(name, settings.to_peft())
    activate_adapters(llm, names[:1])
    return llm


def lora_parameters(llm: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """The parameters of adapter ``name`` (its LoRA A and B matrices), by their names in ``llm``."""
    return {n: p for n, p in llm.named_parameters() if "lora_" in n and f".{name}." in n}


@contextlib.contextmanager
def keep_requires_grad(module: nn.Module) -> Iterator[None]:
    """Restore every parameter's ``requires_grad`` on exit (peft's ``set_adapter`` changes them)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        yield
    finally:
        for param, flag in flags:
            if param.requires_grad != flag:
                param.requires_grad_(flag)


def active_adapters(llm: nn.Module) -> list[str]:
    return list(llm.active_adapters)


def activate_adapters(llm: nn.Module, names: Sequence[str]) -> None:
    """Make ``names`` the active adapters of the ``PeftModel`` (several: their outputs add up), keeping every
    parameter's ``requires_grad``."""
    names = list(names)
    if active_adapters(llm) == names:
        return
    with keep_requires_grad(llm):
        llm.base_model.set_adapter(names[0] if len(names) == 1 else names)


@contextlib.contextmanager
def using_adapters(llm: nn.Module, names: Sequence[str]) -> Iterator[None]:
    """Run the block with ``names`` active, then make the previous adapters active again."""
    previous = active_adapters(llm)
    activate_adapters(llm, names)
    try:
        yield
    finally:
        activate_adapters(llm, previous)


def checkpoint_context_fn(llm: nn.Module, cross_attention: nn.Module | None = None) -> Callable[[], tuple]:
    """A ``context_fn`` for non-reentrant activation checkpointing: a layer's recomputation (in the backward pass)
    runs with the adapters that were active when the layer ran forward, as several forwards with different adapters
    may run before one backward (``forward_per_adapter``), and with the gated cross-attention media context of the
    rows it ran on (``anygpt.core.fusion.GatedCrossAttentionLayers``, if the model has it)."""

    def context_fn() -> tuple:
        media = cross_attention.context if cross_attention is not None else None
        return contextlib.nullcontext(), _as_in_forward(llm, active_adapters(llm), cross_attention, media)

    return context_fn


@contextlib.contextmanager
def _as_in_forward(llm: nn.Module, adapters: list[str], cross_attention, media) -> Iterator[None]:
    with using_adapters(llm, adapters):
        if cross_attention is None:
            yield
            return
        now = cross_attention.context
        cross_attention.set_context(*(media or (None,)))
        try:
            yield
        finally:
            cross_attention.set_context(*(now or (None,)))


def forward_per_adapter(
    llm: nn.Module,
    adapters: Sequence[str],
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    output_hidden_states: bool,
    rows: Callable[[torch.Tensor | None], contextlib.AbstractContextManager] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One LLM forward per adapter over the batch rows that use it, the results put back in row order.

    Args:
        adapters: the adapter of each row (B names).
        inputs_embeds: (B, T, H). attention_mask: (B, T).
        output_hidden_states: also return the last layer's hidden states.
        rows: narrows per-row state the LLM reads to a group's rows while it runs (``rows(index)``, a context
            manager; e.g. ``GatedCrossAttentionLayers.rows``); index None: every row.

    Returns:
        logits (B, T, V) and the last hidden states (B, T, H) or None. A row's results depend on its own adapter
        only, so only that adapter receives gradients from it.
    """
    if len(adapters) != inputs_embeds.shape[0]:
        raise ValueError(f"{len(adapters)} adapter names for a batch of {inputs_embeds.shape[0]} rows")
    groups: dict[str, list[int]] = {}
    for row, name in enumerate(adapters):
        groups.setdefault(name, []).append(row)
    logits, hidden, order = [], [], []
    for name, members in groups.items():
        index = None if len(groups) == 1 else torch.tensor(members, device=inputs_embeds.device)
        narrowed = rows(index) if rows is not None else contextlib.nullcontext()
        with using_adapters(llm, [name]), narrowed:
            out = llm(
                inputs_embeds=inputs_embeds if index is None else inputs_embeds[index],
                attention_mask=attention_mask if index is None else attention_mask[index],
                output_hidden_states=output_hidden_states,
                use_cache=False,
            )
        logits.append(out.logits)
        hidden.append(out.hidden_states[-1] if output_hidden_states else None)
        order.extend(members)
    if len(groups) == 1:
        return logits[0], hidden[0]
    inverse = torch.argsort(torch.tensor(order, device=inputs_embeds.device))
    return torch.cat(logits)[inverse], (torch.cat(hidden)[inverse] if output_hidden_states else None)


# ---------------------------------------------------------------------------------------------- combinations
def check_selection(
    available: Sequence[str], names: str | Sequence[str], weights: Sequence[float] | None
) -> tuple[list[str], list[float] | None]:
    """Validate a choice of adapters: known and unique names, one finite weight >= 0 per name (not all 0).

    Raises:
        ValueError: naming the problem and the model's adapters.
    """
    if not available:
        raise ValueError("this model has no LoRA adapter (llm.lora is null)")
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise ValueError(f"name at least one LoRA adapter; this model has {', '.join(available)}")
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(f"unknown LoRA adapter {unknown[0]!r}: this model has {', '.join(available)}")
    if len(set(names)) != len(names):
        raise ValueError(f"LoRA adapters named twice: {names}")
    if weights is None:
        return names, None
    weights = [float(w) for w in weights]
    if len(weights) != len(names):
        raise ValueError(f"{len(weights)} weights for {len(names)} LoRA adapters {names}")
    if not all(math.isfinite(w) and w >= 0 for w in weights) or not any(weights):
        raise ValueError(f"LoRA adapter weights must be finite and >= 0, not all 0; got {weights}")
    return names, weights


def combine_adapters(llm: nn.Module, names: list[str], weights: list[float], cache: dict[tuple, str]) -> str:
    """The name of an adapter whose update is ``sum_i weights[i] * delta_W(names[i])``, built once per choice.

    peft's ``add_weighted_adapter`` with ``combination_type="cat"`` stacks the adapters' (scaled, weighted) A and B
    matrices into one adapter of rank ``sum r_i``: exact, unlike ``"linear"``. ``cache`` maps a choice to its adapter
    (kept in the model, frozen); beyond ``MAX_COMBINED`` the oldest one is deleted.
    """
    key = (tuple(names), tuple(weights))
    if key in cache:
        return cache[key]
    used = set(cache.values())
    name = next(f"{COMBINED_PREFIX}{i}" for i in range(len(used) + 1) if f"{COMBINED_PREFIX}{i}" not in used)
    with keep_requires_grad(llm):
        llm.add_weighted_adapter(names, weights, name, combination_type="cat")
    for param in lora_parameters(llm, name).values():
        param.requires_grad_(False)
    cache[key] = name
    logger.info("LoRA adapter %s = %s", name, " + ".join(f"{w:g} * {n}" for n, w in zip(names, weights, strict=True)))
    while len(cache) > MAX_COMBINED:
        old_key = next(iter(cache))
        old = cache.pop(old_key)
        if old in active_adapters(llm):
            activate_adapters(llm, names[:1])
        with keep_requires_grad(llm):
            llm.delete_adapter(old)
    return name


def drop_combined(llm: nn.Module, cache: dict[tuple, str], fallback: Sequence[str]) -> None:
    """Delete every combined adapter (their parts changed, e.g. after loading); ``fallback`` becomes active if one
    of them was."""
    if not cache:
        return
    if set(active_adapters(llm)) & set(cache.values()):
        activate_adapters(llm, fallback)
    with keep_requires_grad(llm):
        for name in cache.values():
            llm.delete_adapter(name)
    cache.clear()


# ---------------------------------------------------------------------------------------------- files
def save_adapters(llm: nn.Module, settings: LoraSettings, folder: str | os.PathLike) -> str | dict[str, str]:
    """Write the adapters into ``folder/lora``; returns the index entry (``"lora"`` or ``{name: "lora/name"}``)."""
    from peft import get_peft_model_state_dict

    folder = Path(folder)
    entry: dict[str, str] = {}
    for name in adapter_names(settings):
        rel = "lora" if settings.adapters is None else f"lora/{name}"
        where = folder / rel
        where.mkdir(parents=True, exist_ok=True)
        state = get_peft_model_state_dict(llm, adapter_name=name, save_embedding_layers=False)
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, where / ADAPTER_WEIGHTS_FILE)
        llm.peft_config[name].save_pretrained(where)
        entry[name] = rel
    return entry[DEFAULT_ADAPTER] if settings.adapters is None else entry


def load_adapters(llm: nn.Module, settings: LoraSettings, folder: str | os.PathLike, entry: str | dict) -> None:
    """Load what ``save_adapters`` wrote (a single-adapter entry ``"lora"`` or ``{name: path}``).

    Each file is checked first (``anygpt.core.index.read_weights``): inside ``folder``, readable, exactly the
    adapter's keys (peft's saved names) with the model's shapes, finite values.

    Raises:
        CheckpointError: the saved adapters are not the config's, or a file is damaged or does not fit the model
            (naming the file, the key and both shapes).
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    names = adapter_names(settings)
    saved = {DEFAULT_ADAPTER: entry} if isinstance(entry, str) else dict(entry)
    if sorted(saved) != sorted(names):
        raise CheckpointError(
            f"{folder}: the saved LoRA adapters are {sorted(saved)}, the config declares {sorted(names)} "
            "(lora.adapters)"
        )
    for name, rel in saved.items():
        what = "lora" if isinstance(entry, str) else f"lora.{name}"
        path = resolve_part(folder, rel, what) / ADAPTER_WEIGHTS_FILE
        expected = get_peft_model_state_dict(llm, adapter_name=name, save_embedding_layers=False)
        state = read_weights(path, folder=folder, expected=expected, what=f"{what} adapter")
        try:
            result = set_peft_model_state_dict(llm, state, adapter_name=name)
        except RuntimeError as err:
            raise CheckpointError(
                f"{path}: does not fit the model ({str(err).strip().splitlines()[-1].strip()})"
            ) from None
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise CheckpointError(f"{path}: key {unexpected[0]!r} is not in the model")
        if settings.adapters is not None:
            missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k and f".{name}." in k]
            if missing:
                raise CheckpointError(f"{path}: adapter {name!r} lacks the model's key {missing[0]!r}")
