"""Target construction: alignment, ignored positions, extra-head shifts, and the validator."""

import pytest
import torch

from vlm_dist.text import (
    IGNORE_INDEX,
    add_turns,
    build_example,
    collate_examples,
    get_tokenizer,
    make_targets,
    prompt_tokens,
    validate_targets,
)

tok = get_tokenizer()


def test_tokenizer_round_trip_and_special_ids():
    ids = tok.encode("A small red circle on the left.")
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id, tok.pad_id]) == "a small red circle on the left ."
    assert {tok.bos_id, tok.eos_id} == {49406, 49407} and tok.vocab_size == 49408


def test_caption_example_masks_only_caption_and_end():
    ex = build_example(tok, "a red circle", 16)
    assert ex.tokens[0] == tok.bos_id and ex.tokens[-1] == tok.eos_id
    assert ex.loss_mask == [False] + [True] * (len(ex.tokens) - 1)


def test_qa_example_masks_prompt():
    ex = build_example(tok, "red", 32, question="what colour is the circle?")
    n_prompt = len(prompt_tokens(tok, "what colour is the circle?"))
    assert ex.tokens[:n_prompt] == prompt_tokens(tok, "what colour is the circle?")
    assert ex.loss_mask == [False] * n_prompt + [True, True]  # "red", <eot>
    assert ex.tokens[n_prompt:] == tok.encode("red") + [tok.eos_id]


def test_truncation_drops_end_token_and_flags_it():
    ex = build_example(tok, "one two three four five six seven", 5)
    assert len(ex.tokens) == 5 and ex.truncated and tok.eos_id not in ex.tokens


def test_bad_examples_raise_clear_errors():
    with pytest.raises(ValueError, match="empty caption"):
        build_example(tok, "   ", 16)
    with pytest.raises(ValueError, match="max_text_len"):
        build_example(tok, "red", 4, question="what colour is the big circle on the left?")


def test_make_targets_alignment_ignore_and_head_shifts():
    examples = [build_example(tok, "a red circle", 12), build_example(tok, "blue", 12, question="what colour?")]
    tokens, mask = collate_examples(examples, tok.pad_id)  # (2, L), right padded
    inputs, targets = make_targets(tokens, mask, n_future=3)
    B, L = tokens.shape
    assert inputs.shape == (B, L - 1) and targets.shape == (B, 3, L - 1)
    for b in range(B):
        for k in range(3):
            for j in range(L - 1):
                src = j + 1 + k
                want = tokens[b, src].item() if src < L and mask[b, src] else IGNORE_INDEX
                assert targets[b, k, j].item() == want
    # prompt and padding positions never carry a target
    qa_prompt = len(prompt_tokens(tok, "what colour?"))
    assert (targets[1, 0, : qa_prompt - 1] == IGNORE_INDEX).all()
    assert (targets[1, 0, len(examples[1].tokens) - 1 :] == IGNORE_INDEX).all()
    # head k is head 0 shifted left by k
    assert torch.equal(targets[:, 2, :-2], targets[:, 0, 2:])
    validate_targets(inputs, targets, tok.vocab_size)


def test_validate_targets_catches_misalignment():
    tokens, mask = collate_examples([build_example(tok, "a red circle on the left", 16)], tok.pad_id)
    inputs, targets = make_targets(tokens, mask, n_future=2)
    unshifted = targets.clone()
    unshifted[:, 0] = torch.where(targets[:, 0] != IGNORE_INDEX, inputs, IGNORE_INDEX)  # forgot the shift
    with pytest.raises(ValueError, match="misaligned targets: sample 0"):
        validate_targets(inputs, unshifted, tok.vocab_size)
    bad_head = targets.clone()
    bad_head[:, 1] = targets[:, 0]  # extra head not shifted
    with pytest.raises(ValueError, match="head 1"):
        validate_targets(inputs, bad_head, tok.vocab_size)
    with pytest.raises(ValueError, match="no next-token target"):
        validate_targets(inputs, torch.full_like(targets, IGNORE_INDEX), tok.vocab_size)
    with pytest.raises(ValueError, match="need \\(B, n_future, T\\)"):
        validate_targets(inputs, targets[:, :, :-1], tok.vocab_size)


def test_dialogue_appends_whole_turns_that_fit_and_masks_only_answers():
    first = build_example(tok, "red", 30, question="what colour is the circle?")
    long_q = ("what colour is the shape on the left of the large square?", "blue")
    ex, added = add_turns(tok, first, [long_q, ("how many?", "2")], 30)
    turn = tok.encode("question: how many? answer:")
    assert added == 1  # the long turn does not fit in 30 tokens: skipped whole, the short one after it added
    assert ex.tokens == first.tokens + turn + tok.encode("2") + [tok.eos_id]
    assert ex.loss_mask == first.loss_mask + [False] * len(turn) + [True, True]
    assert add_turns(tok, first, [long_q], 64)[1] == 1 and add_turns(tok, first, [], 30) == (first, 0)
    cut = build_example(tok, "one two three four five six seven", 12, question="what?")
    assert cut.truncated and add_turns(tok, cut, [("how many?", "2")], 64) == (cut, 0)  # nothing after a cut answer
    with pytest.raises(ValueError, match="empty answer"):
        add_turns(tok, first, [("how many?", " ")], 64)
