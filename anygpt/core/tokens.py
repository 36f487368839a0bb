"""Added tokens, splicing media features into the LLM input, and reading signal-token hidden states back out.

Each media modality has one placeholder token (``<image>``, ``<video>``, ``<audio>``) that is repeated once per
projected feature vector, and a group of signal tokens (``[IMG0..3]``, ``[VID0..23]``, ``[AUD0..7]`` by default)
that the LLM emits to request that modality as output.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from transformers import LogitsProcessor

from anygpt.base.modality import MEDIA_MODALITIES, Modality

DEFAULT_SIGNAL_COUNTS = {"image": 4, "video": 24, "audio": 8}
SIGNAL_PREFIX = {Modality.IMAGE: "IMG", Modality.VIDEO: "VID", Modality.AUDIO: "AUD"}
PLACEHOLDER = {Modality.IMAGE: "<image>", Modality.VIDEO: "<video>", Modality.AUDIO: "<audio>"}
# Words whose embeddings initialise the new rows of each modality.
DESCRIPTION = {Modality.IMAGE: "image picture", Modality.VIDEO: "video clip", Modality.AUDIO: "audio sound"}


@dataclass
class SignalTokenConfig:
    """How many signal tokens each output modality has (NExT-GPT: image 4, video 24, audio 8)."""

    counts: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_SIGNAL_COUNTS))

    def __post_init__(self):
        counts = {}
        for name, n in self.counts.items():
            modality = Modality.parse(name)
            if modality not in MEDIA_MODALITIES:
                raise ValueError(f"signal tokens: {name!r} is not an output media modality")
            if int(n) < 1:
                raise ValueError(f"signal tokens: count for {name} must be >= 1, got {n}")
            counts[modality.value] = int(n)
        self.counts = counts

    def count(self, modality: Modality) -> int:
        return self.counts[modality.value]

    def to_dict(self) -> dict:
        return asdict(self)


def signal_token_strings(modality: Modality, count: int) -> list[str]:
    return [f"[{SIGNAL_PREFIX[modality]}{i}]" for i in range(count)]


@dataclass
class ModalityTokens:
    """The ids of the added tokens in one tokenizer."""

    placeholder: dict[Modality, int]
    signal: dict[Modality, list[int]]

    @property
    def all_added_ids(self) -> list[int]:
        ids = list(self.placeholder.values())
        for group in self.signal.values():
            ids.extend(group)
        return sorted(ids)

    @property
    def all_signal_ids(self) -> set[int]:
        return {i for group in self.signal.values() for i in group}

    def modality_of_signal(self, token_id: int) -> Modality | None:
        for modality, group in self.signal.items():
            if token_id in group:
                return modality
        return None


def add_modality_tokens(tokenizer, config: SignalTokenConfig) -> ModalityTokens:
    """Add placeholder and signal tokens to ``tokenizer`` (a no-op for tokens it already has) and return their ids."""
    strings = list(PLACEHOLDER.values())
    for name, n in config.counts.items():
        strings += signal_token_strings(Modality(name), n)
    tokenizer.add_tokens(strings, special_tokens=True)
    vocab = tokenizer.get_vocab()
    placeholder = {m: vocab[s] for m, s in PLACEHOLDER.items()}
    signal = {
        Modality(name): [vocab[s] for s in signal_token_strings(Modality(name), n)] for name, n in config.counts.items()
    }
    return ModalityTokens(placeholder=placeholder, signal=signal)


@torch.no_grad()
def init_added_token_rows(model, tokenizer, tokens: ModalityTokens, *, num_old: int, seed: int = 0) -> None:
    """Resize the LLM's embeddings for the added tokens and initialise their rows sensibly.

    Every new row of the input embedding and of the LM head starts at the mean of the rows of the words describing
    its modality ("image picture", ...), plus a small seeded perturbation so the rows of one group differ.
    """
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    generator = torch.Generator().manual_seed(seed)
    for matrix in _embedding_matrices(model):
        if matrix.is_meta:  # built for its sizes only (anygpt.core.memory): no values to initialise
            continue
        scale = matrix[:num_old].float().std().item()
        for modality in MEDIA_MODALITIES:
            new_ids = [tokens.placeholder[modality]] + tokens.signal.get(modality, [])
            new_ids = [i for i in new_ids if i >= num_old]
            if not new_ids:
                continue
            word_ids = [i for i in tokenizer(DESCRIPTION[modality], add_special_tokens=False).input_ids if i < num_old]
            base = matrix[word_ids].float().mean(0) if word_ids else matrix[:num_old].float().mean(0)
            noise = torch.randn(len(new_ids), matrix.shape[1], generator=generator) * 0.02 * scale
            matrix[new_ids] = (base + noise).to(matrix.dtype)


def _embedding_matrices(model) -> list[torch.Tensor]:
    matrices = [model.get_input_embeddings().weight]
    out = model.get_output_embeddings()
    if out is not None and out.weight.data_ptr() != matrices[0].data_ptr():
        matrices.append(out.weight)
    return matrices


def splice_features(
    inputs_embeds: torch.Tensor, input_ids: torch.Tensor, placeholder_id: int, features: torch.Tensor
) -> torch.Tensor:
    """Write ``features`` into ``inputs_embeds`` at the positions where ``input_ids == placeholder_id``.

    Args:
        inputs_embeds: (B, T, H) token embeddings.
        input_ids: (B, T).
        placeholder_id: the placeholder token of one modality.
        features: (M, K, H) or (M*K, H) projected media features, in the order the placeholders appear
            (row-major over the batch).

    Returns:
        (B, T, H) embeddings with the placeholder positions replaced.

    Raises:
        ValueError: when the number of placeholder positions differs from the number of feature vectors.
    """
    features = features.reshape(-1, inputs_embeds.shape[-1])
    mask = input_ids == placeholder_id
    n_positions = int(mask.sum())
    if n_positions != features.shape[0]:
        raise ValueError(
            f"placeholder token {placeholder_id} appears {n_positions} times in the input but "
            f"{features.shape[0]} feature vectors were given"
        )
    if n_positions == 0:
        return inputs_embeds
    mask = mask.unsqueeze(-1).expand_as(inputs_embeds)
    return inputs_embeds.masked_scatter(mask, features.to(inputs_embeds.dtype))


def reply_text(tokenizer, ids: list[int], signal_ids) -> str:
    """The text of a generated reply without its signal tokens.

    The spaces on both sides of a removed signal group would meet (``"Here is a red circle.  Here is ..."``): where
    they do, one is kept. Everything else is the tokenizer's own decoding of the kept tokens.
    """
    signal_ids = set(signal_ids)
    runs: list[list[int]] = [[]]
    for token in ids:
        if token in signal_ids:
            if runs[-1]:
                runs.append([])
        else:
            runs[-1].append(token)
    kept: list[int] = []
    raw = text = ""
    for run in runs:
        kept += run
        full = tokenizer.decode(kept, skip_special_tokens=True)
        if not full.startswith(raw):  # a decoder that rewrote the earlier text: take its decoding as it is
            raw = text = full
            continue
        new = full[len(raw) :]
        if text.endswith(" ") and new.startswith(" "):
            new = new.lstrip(" ")
        raw, text = full, text + new
    return text.strip()


def find_signal_groups(ids: list[int] | torch.Tensor, group_ids: list[int]) -> list[int]:
    """Start positions of complete, in-order signal groups ``group_ids`` in the sequence ``ids``.

    Raises:
        ValueError: when a group is incomplete or out of order (the caller is expected to repair groups first).
    """
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    n = len(group_ids)
    members = set(group_ids)
    starts, pos = [], 0
    while pos < len(ids):
        if ids[pos] in members:
            if ids[pos : pos + n] != group_ids:
                raise ValueError(
                    f"incomplete or out-of-order signal group at position {pos}: expected {group_ids}, "
                    f"found {ids[pos : pos + n]}"
                )
            starts.append(pos)
            pos += n
        else:
            pos += 1
    return starts


def gather_signal_hidden_states(
    hidden_states: torch.Tensor, input_ids: torch.Tensor, group_ids: list[int]
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """The mirror image of ``splice_features``: the hidden states at every complete signal group.

    The hidden state of a signal token is read at the position where that token is the *input* (the same
    position in training and generation).

    Args:
        hidden_states: (B, T, H) last-layer hidden states.
        input_ids: (B, T).
        group_ids: the signal-token ids of one modality, in order.

    Returns:
        (G, N, H) one row per group found, and the (batch index, start position) of each group.
    """
    rows, where = [], []
    n = len(group_ids)
    for b in range(input_ids.shape[0]):
        for start in find_signal_groups(input_ids[b], group_ids):
            rows.append(hidden_states[b, start : start + n])
            where.append((b, start))
    if not rows:
        return hidden_states.new_zeros((0, n, hidden_states.shape[-1])), []
    return torch.stack(rows), where


def repair_signal_groups(ids: list[int], tokens: ModalityTokens) -> list[int]:
    """Return ``ids`` with every signal group complete and in order.

    A group is identified by its first member seen; missing members are filled in, stray or shuffled members
    are dropped. Used on generated sequences, so a cut-off generation never fails.
    """
    out: list[int] = []
    pos = 0
    while pos < len(ids):
        modality = tokens.modality_of_signal(ids[pos])
        if modality is None:
            out.append(ids[pos])
            pos += 1
            continue
        group = tokens.signal[modality]
        # consume a run of this modality's signal tokens, whatever their order, until a token repeats (that starts
        # the next group) or the group is full, then emit the whole group in order
        seen: set[int] = set()
        while pos < len(ids) and ids[pos] in group and ids[pos] not in seen and len(seen) < len(group):
            seen.add(ids[pos])
            pos += 1
        out.extend(group)
    return out


class SignalTokenProcessor(LogitsProcessor):
    """Keeps signal groups whole during generation.

    Once the first token of a group is produced, the rest of the group is forced in order. Members other than the
    first can never start on their own. Groups of modalities not in ``allowed`` are never started; those in it may
    start wherever the model puts them (None: every group). With forced outputs the pipeline allows exactly the
    forced modalities (an empty set for a text-only reply) and appends a forced group the model did not write
    (``AnyGPTPipeline._complete_reply``). Media placeholders are input-only and never generated (an imported model's
    vocabulary stays the one it was trained with).
    """

    def __init__(self, tokens: ModalityTokens, allowed: set[Modality] | None = None):
        self.next_of: dict[int, int] = {}
        banned: set[int] = set(tokens.placeholder.values())
        for modality, group in tokens.signal.items():
            for a, b in zip(group, group[1:], strict=False):
                self.next_of[a] = b
            banned.update(group[1:])
            if allowed is not None and modality not in allowed:
                banned.add(group[0])
        self.banned = sorted(banned)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        if self.banned:
            scores[:, self.banned] = float("-inf")
        if input_ids.shape[1] == 0:
            return scores
        last = input_ids[:, -1].tolist()
        for row, token in enumerate(last):
            forced = self.next_of.get(token)
            if forced is not None:
                scores[row] = float("-inf")
                scores[row, forced] = 0.0
        return scores
