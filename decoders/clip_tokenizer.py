"""A real CLIP tokenizer built offline from the BPE vocabulary that ``imagebind-unofficial`` ships.

CLIP (and so Stable Diffusion, ZeroScope and ImageBind) tokenises with one byte-level BPE of 49,408 tokens.
Its merges are in ``imagebind/bpe/bpe_simple_vocab_16e6.txt.gz``; the vocabulary is derived from them the way
OpenAI's ``simple_tokenizer.py`` does: the 256 byte symbols, the same with the end-of-word suffix ``</w>``,
one token per merge, then ``<|startoftext|>`` and ``<|endoftext|>``. The ids therefore match ImageBind's
tokenizer and OpenAI CLIP's.
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer

logger = logging.getLogger(__name__)

CLIP_VOCAB_SIZE = 49408
CLIP_MAX_LENGTH = 77
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
_NUM_MERGES = CLIP_VOCAB_SIZE - 2 * 256 - 2  # 48,894 merges, as in CLIP's simple_tokenizer


def clip_bpe_path() -> Path:
    """Return the path of the gzipped CLIP BPE merges inside the installed ``imagebind`` package.

    The package is located without importing it (importing ``imagebind`` pulls in pytorchvideo).

    Raises:
        FileNotFoundError: when ``imagebind-unofficial`` is not installed or lacks the file.
    """
    spec = importlib.util.find_spec("imagebind")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / "bpe" / "bpe_simple_vocab_16e6.txt.gz"
        if path.is_file():
            return path
    raise FileNotFoundError(
        "CLIP BPE vocabulary bpe/bpe_simple_vocab_16e6.txt.gz not found in the imagebind package "
        f"(looked in {locations or 'nowhere: imagebind is not installed'}); install imagebind-unofficial."
    )


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible map from the 256 byte values to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """Derive CLIP's ``vocab.json`` and ``merges.txt`` contents from the BPE file.

    Returns:
        ``(vocab, merges)``: ``vocab`` maps each of the 49,408 tokens to its id; ``merges`` holds the 48,894
        merge pairs in priority order.
    """
    lines = gzip.decompress(clip_bpe_path().read_bytes()).decode("utf-8").split("\n")
    merges = tuple(tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1])  # line 0 is a version header
    byte_symbols = list(_bytes_to_unicode().values())
    tokens = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"derived a CLIP vocabulary of {len(vocab)} tokens, expected {CLIP_VOCAB_SIZE}")
    return vocab, merges  # type: ignore[return-value]


def build_clip_tokenizer(model_max_length: int = CLIP_MAX_LENGTH) -> CLIPTokenizer:
    """Build OpenAI CLIP's tokenizer (as used by Stable Diffusion 1.5) in memory, without any download.

    Args:
        model_max_length: the padded / truncated sequence length (77 for CLIP text encoders).

    Returns:
        A fresh ``CLIPTokenizer`` with 49,408 tokens; pad, unknown and end-of-text are ``<|endoftext|>`` (id
        49407), start-of-text is id 49406.

    Example:
        >>> tok = build_clip_tokenizer()
        >>> tok("a red circle").input_ids
        [49406, 320, 736, 7117, 49407]
    """
    vocab, merges = clip_vocab_and_merges()
    # Pass the contents: in transformers 5, vocab_file=/merges_file= are silently ignored (2-token tokenizer).
    tokenizer = CLIPTokenizer(
        vocab=dict(vocab),
        merges=[tuple(m) for m in merges],
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=model_max_length,
    )
    if len(tokenizer) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"built a CLIP tokenizer of {len(tokenizer)} tokens, expected {CLIP_VOCAB_SIZE}")
    return tokenizer


def restrict_clip_tokenizer(tokenizer: CLIPTokenizer, texts: list[str]) -> tuple[CLIPTokenizer, list[int]]:
    """A CLIP tokenizer that keeps only the tokens and merges that ``texts`` need, and the old id of each new id.

    The 512 single-symbol tokens keep their ids (so any text still tokenises, into smaller pieces where a merge is
    gone), followed by the merges the texts' words use, in CLIP's order, then start- and end-of-text. Each text
    tokenises into the same tokens as before (checked). Use it to shrink a text encoder's 49,408-row embedding
    when it only ever reads a small world's captions: ``embedding[old_ids]`` is the new embedding.

    Raises:
        RuntimeError: a text tokenises differently with the restricted tokenizer.
    """
    vocab, merges = clip_vocab_and_merges()
    ranks = {pair: i for i, pair in enumerate(merges)}
    backend = tokenizer.backend_tokenizer
    used: set[tuple[str, str]] = set()
    for text in texts:
        normalized = backend.normalizer.normalize_str(text) if backend.normalizer else text
        for piece, _ in backend.pre_tokenizer.pre_tokenize_str(normalized):
            symbols = list(piece[:-1]) + [piece[-1] + "</w>"]
            while len(symbols) > 1:  # byte-pair encoding: merge the best-ranked adjacent pair until none is left
                pairs = [
                    (ranks.get((a, b), len(ranks)), i)
                    for i, (a, b) in enumerate(zip(symbols, symbols[1:], strict=False))
                ]
                rank, i = min(pairs)
                if rank == len(ranks):
                    break
                used.add(merges[rank])
                symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    kept_merges = [m for m in merges if m in used]
    tokens = list(vocab)[:512] + ["".join(m) for m in kept_merges] + [BOS_TOKEN, EOS_TOKEN]
    new_vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    old_ids = [vocab[token] for token in new_vocab]
    restricted = CLIPTokenizer(
        vocab=new_vocab,
        merges=[tuple(m) for m in kept_merges],
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=tokenizer.model_max_length,
    )
    for text in texts:
        before = tokenizer(text).input_ids
        after = [old_ids[i] for i in restricted(text).input_ids]
        if before != after:
            raise RuntimeError(f"restricted CLIP tokenizer splits {text!r} differently: {after} != {before}")
    return restricted, old_ids
