import pytest
import torch

from anygpt.base.modality import Modality
from anygpt.core.llm import build_byte_tokenizer
from anygpt.core.tokens import (
    SignalTokenConfig,
    SignalTokenProcessor,
    add_modality_tokens,
    find_signal_groups,
    gather_signal_hidden_states,
    repair_signal_groups,
    reply_text,
    splice_features,
)


@pytest.fixture(scope="module")
def tokenizer_and_tokens():
    tok = build_byte_tokenizer()
    tokens = add_modality_tokens(tok, SignalTokenConfig())
    return tok, tokens


def test_added_tokens_have_the_configured_counts(tokenizer_and_tokens):
    tok, tokens = tokenizer_and_tokens
    assert [len(tokens.signal[m]) for m in (Modality.IMAGE, Modality.VIDEO, Modality.AUDIO)] == [4, 24, 8]
    assert tok.convert_ids_to_tokens(tokens.signal[Modality.IMAGE]) == [
        "[IMG0]",
        "[IMG1]",
        "[IMG2]",
        "[IMG3]",
    ]
    assert tok.convert_ids_to_tokens(tokens.signal[Modality.AUDIO][-1]) == "[AUD7]"
    assert len(set(tokens.all_added_ids)) == 3 + 4 + 24 + 8


def test_custom_signal_counts():
    tok = build_byte_tokenizer()
    tokens = add_modality_tokens(tok, SignalTokenConfig({"image": 77, "audio": 1}))
    assert len(tokens.signal[Modality.IMAGE]) == 77 and len(tokens.signal[Modality.AUDIO]) == 1
    assert Modality.VIDEO not in tokens.signal
    with pytest.raises(ValueError, match="count for video"):
        SignalTokenConfig({"video": 0})
    with pytest.raises(ValueError, match="unknown modality"):
        SignalTokenConfig({"smell": 3})


def test_user_text_cannot_inject_added_tokens(tokenizer_and_tokens):
    tok, tokens = tokenizer_and_tokens
    ids = tok("look <image> [IMG0] <b>", add_special_tokens=False, split_special_tokens=True).input_ids
    assert not set(ids) & set(tokens.all_added_ids)
    assert tok.decode(ids) == "look <image> [IMG0] <b>"


def test_splice_writes_features_at_placeholders_in_order():
    embeds = torch.zeros(2, 6, 4)
    ids = torch.tensor([[1, 9, 9, 2, 3, 4], [9, 9, 5, 6, 7, 8]])
    features = torch.arange(1, 17, dtype=torch.float).reshape(2, 2, 4)  # 2 items x K=2
    out = splice_features(embeds, ids, 9, features)
    assert torch.equal(out[0, 1], features[0, 0]) and torch.equal(out[0, 2], features[0, 1])
    assert torch.equal(out[1, 0], features[1, 0]) and torch.equal(out[1, 1], features[1, 1])
    assert out[0, 0].abs().sum() == 0 and out[1, 5].abs().sum() == 0


def test_splice_count_mismatch_raises():
    ids = torch.tensor([[1, 9, 9, 2]])
    with pytest.raises(ValueError, match="appears 2 times.*3 feature vectors"):
        splice_features(torch.zeros(1, 4, 4), ids, 9, torch.zeros(3, 4))


def test_gather_reads_hidden_states_at_signal_input_positions():
    group = [50, 51, 52]
    ids = torch.tensor([[1, 2, 50, 51, 52, 3, 50, 51, 52]])
    hidden = torch.arange(9, dtype=torch.float).reshape(1, 9, 1).expand(1, 9, 2)
    rows, where = gather_signal_hidden_states(hidden, ids, group)
    assert where == [(0, 2), (0, 6)]
    assert rows.shape == (2, 3, 2)
    assert rows[0, :, 0].tolist() == [2, 3, 4] and rows[1, :, 0].tolist() == [6, 7, 8]


def test_find_signal_groups_rejects_broken_groups():
    with pytest.raises(ValueError, match="incomplete or out-of-order"):
        find_signal_groups([1, 50, 52, 51], [50, 51, 52])


def test_repair_completes_cut_and_shuffled_groups(tokenizer_and_tokens):
    _, tokens = tokenizer_and_tokens
    img = tokens.signal[Modality.IMAGE]
    aud = tokens.signal[Modality.AUDIO]
    assert repair_signal_groups([5, img[0], img[1]], tokens) == [5, *img]  # cut off by max_new_tokens
    assert repair_signal_groups([img[2], img[0], img[1], img[3], 7], tokens) == [*img, 7]  # shuffled
    assert repair_signal_groups([img[0], img[1], img[0]], tokens) == [*img, *img]  # restart = second group
    assert repair_signal_groups([aud[3], 5], tokens) == [*aud, 5]
    assert repair_signal_groups([1, 2, 3], tokens) == [1, 2, 3]


def test_processor_forces_rest_of_group_and_bans_lone_members(tokenizer_and_tokens):
    tok, tokens = tokenizer_and_tokens
    img = tokens.signal[Modality.IMAGE]
    proc = SignalTokenProcessor(tokens)
    scores = torch.zeros(2, len(tok))
    out = proc(torch.tensor([[5, img[1]], [5, 6]]), scores)
    assert out[0].argmax().item() == img[2] and torch.isinf(out[0]).sum() == len(tok) - 1
    assert torch.isinf(out[1, img[1]]) and torch.isinf(out[1, img[3]])  # members never start a group
    assert out[1, img[0]] == 0  # the first member may start one
    empty = proc(torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, len(tok)))  # nothing generated yet
    assert torch.isinf(empty[0, img[1]]) and empty[0, img[0]] == 0


def test_processor_bans_disallowed_modalities(tokenizer_and_tokens):
    tok, tokens = tokenizer_and_tokens
    proc = SignalTokenProcessor(tokens, allowed={Modality.AUDIO})
    out = proc(torch.tensor([[5]]), torch.zeros(1, len(tok)))
    assert torch.isinf(out[0, tokens.signal[Modality.IMAGE][0]])
    assert torch.isinf(out[0, tokens.signal[Modality.VIDEO][0]])
    assert out[0, tokens.signal[Modality.AUDIO][0]] == 0


def test_reply_text_keeps_one_space_where_a_signal_group_was_removed(tokenizer_and_tokens):
    tokenizer, tokens = tokenizer_and_tokens
    group = tokens.signal[Modality.IMAGE]
    first = tokenizer.encode("Here is a red circle. ", add_special_tokens=False)
    second = tokenizer.encode(" Here is a high beep.", add_special_tokens=False)
    ids = first + group + second + tokens.signal[Modality.AUDIO]
    # the plain decoding of the kept tokens has the two spaces that met
    plain = tokenizer.decode([i for i in ids if i not in tokens.all_signal_ids], skip_special_tokens=True)
    assert "circle.  Here" in plain
    assert reply_text(tokenizer, ids, tokens.all_signal_ids) == "Here is a red circle. Here is a high beep."


def test_reply_text_without_signals_is_the_plain_decoding(tokenizer_and_tokens):
    tokenizer, tokens = tokenizer_and_tokens
    ids = tokenizer.encode("  two  spaces stay inside  ", add_special_tokens=False)
    assert reply_text(tokenizer, ids, tokens.all_signal_ids) == "two  spaces stay inside"
    # a group between words that touch keeps them touching
    ids = tokenizer.encode("red", add_special_tokens=False) + tokens.signal[Modality.VIDEO]
    ids += tokenizer.encode(", and blue", add_special_tokens=False)
    assert reply_text(tokenizer, ids, tokens.all_signal_ids) == "red, and blue"
