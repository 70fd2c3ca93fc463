"""Tokenizer, prompt formats and target construction.

A sample's text is one token sequence that follows the image tokens:

    caption:  <sot> a red circle on the left <eot>
    Q&A:      <sot> question : what colour is the circle ? answer : red <eot>
    dialogue: <sot> question : what colour is the circle ? answer : red <eot> question : how many ... <eot>

(a dialogue is several Q&A turns about one image in one sequence, as LLaVA trains; its first turn is
the Q&A sequence exactly, which is the prompt that generation and evaluation use.)

The loss covers only the caption / answer tokens and the end token (`loss_mask`). For next-token
prediction the model reads `inputs = tokens[:-1]` and head k (k = 0 .. n_future-1) is trained to
predict `tokens[j + 1 + k]` at input position j; every other position (prompt, padding, past the end)
holds IGNORE_INDEX. Image positions never carry targets: the model prepends them itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index
QA_PROMPT = "question: {question} answer:"


class Tokenizer:
    """open_clip's BPE tokenizer (ships with the package, works offline) with the ids we need."""

    name = "open_clip:SimpleTokenizer"

    def __init__(self) -> None:
        from open_clip.tokenizer import SimpleTokenizer

        self._tok = SimpleTokenizer()
        self.bos_id: int = self._tok.sot_token_id
        self.eos_id: int = self._tok.eot_token_id
        self.pad_id: int = 0  # a real BPE id; pads sit after <eot>, never attended to by real tokens, never targets
        self.vocab_size: int = self._tok.vocab_size

    def encode(self, text: str) -> list[int]:
        """BPE ids of `text` without begin/end tokens (open_clip lower-cases and cleans whitespace)."""
        return self._tok.encode(text)

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        """Text of `ids`, stopping at the first end token; begin and pad tokens after it are dropped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        out: list[int] = []
        for i in ids:
            if i == self.eos_id:
                break
            if i != self.bos_id:
                out.append(i)
        return self._tok.decode(out).strip()


@lru_cache(maxsize=1)
def get_tokenizer() -> Tokenizer:
    return Tokenizer()


@dataclass
class Example:
    """One tokenized sample: `tokens` starts with <sot>; `loss_mask[i]` says whether tokens[i] is a target."""

    tokens: list[int]
    loss_mask: list[bool]
    truncated: bool = False


def prompt_tokens(tok: Tokenizer, question: str | None = None) -> list[int]:
    """The tokens a generation starts from: <sot>, plus the Q&A prompt when a question is given."""
    ids = [tok.bos_id]
    if question is not None:
        ids += tok.encode(QA_PROMPT.format(question=question.strip()))
    return ids


def build_example(tok: Tokenizer, target: str, max_len: int, question: str | None = None) -> Example:
    """Tokens and loss mask for a caption (question=None) or for an answer to `question`.

    Targets longer than `max_len` are cut and lose their end token (so the model never learns to stop
    early on a cut caption); a prompt that leaves no room for one target token is an error.
    """
    if not target or not target.strip():
        raise ValueError("empty caption/answer: every sample needs a non-empty target text")
    prompt = prompt_tokens(tok, question)
    body = tok.encode(target) + [tok.eos_id]
    room = max_len - len(prompt)
    if room < 1:
        raise ValueError(
            f"the question prompt takes {len(prompt)} tokens, leaving no room in data.max_text_len={max_len}; "
            f"raise data.max_text_len or shorten the question"
        )
    truncated = len(body) > room
    body = body[:room]
    return Example(prompt + body, [False] * len(prompt) + [True] * len(body), truncated)


def add_turns(tok: Tokenizer, first: Example, turns: list[tuple[str, str]], max_len: int) -> tuple[Example, int]:
    """A dialogue: the Q&A example `first` (build_example) followed by more (question, answer) turns about
    the same image; returns (example, turns added).

    `first` is kept token for token, and attention is causal: its answer is still predicted from exactly the
    one-question prompt that generation and evaluation use; the later turns add answers to train on. Each
    turn is appended whole, its prompt without <sot> and its answer closed by <eot>, if it fits in
    `max_len`; one that does not fit is skipped, never cut. The loss covers every answer and its end
    token, and no prompt.
    """
    if first.truncated:  # its answer lost the end token: nothing may follow it
        return first, 0
    tokens, mask, added = list(first.tokens), list(first.loss_mask), 0
    for question, answer in turns:
        if not answer or not answer.strip():
            raise ValueError(f"empty answer to {question!r}: every Q&A pair needs a non-empty answer")
        prompt = prompt_tokens(tok, question)[1:]  # a later turn's prompt: no <sot>
        body = tok.encode(answer) + [tok.eos_id]
        if len(tokens) + len(prompt) + len(body) <= max_len:
            tokens += prompt + body
            mask += [False] * len(prompt) + [True] * len(body)
            added += 1
    return Example(tokens, mask), added


def collate_examples(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest example: tokens (B, L) long, loss_mask (B, L) bool."""
    length = max(len(e.tokens) for e in examples)
    tokens = torch.full((len(examples), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.bool)
    for i, e in enumerate(examples):
        tokens[i, : len(e.tokens)] = torch.tensor(e.tokens, dtype=torch.long)
        mask[i, : len(e.loss_mask)] = torch.tensor(e.loss_mask, dtype=torch.bool)
    return tokens, mask


def make_targets(tokens: torch.Tensor, loss_mask: torch.Tensor, n_future: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (B, L-1) and per-head targets (B, n_future, L-1) from tokens (B, L) and loss_mask (B, L).

    targets[:, k, j] = tokens[:, j+1+k] where loss_mask[:, j+1+k], else IGNORE_INDEX (also past the end).
    """
    B, L = tokens.shape
    inputs = tokens[:, :-1]
    labelled = torch.where(loss_mask, tokens, torch.full_like(tokens, IGNORE_INDEX))  # (B, L)
    targets = torch.full((B, n_future, L - 1), IGNORE_INDEX, dtype=torch.long)
    for k in range(n_future):
        span = labelled[:, 1 + k :]  # what position j sees k+1 steps ahead, (B, L-1-k)
        targets[:, k, : span.shape[1]] = span
    return inputs.contiguous(), targets


def validate_targets(inputs: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> None:
    """Check that targets line up with inputs; raise ValueError naming the first broken invariant."""
    if inputs.dim() != 2 or targets.dim() != 3:
        raise ValueError(f"expected inputs (B, T) and targets (B, n_future, T); got {tuple(inputs.shape)} and {tuple(targets.shape)}")
    B, T = inputs.shape
    if targets.shape[0] != B or targets.shape[2] != T:
        raise ValueError(f"targets {tuple(targets.shape)} do not match inputs {tuple(inputs.shape)}: need (B, n_future, T)")
    if inputs.min() < 0 or inputs.max() >= vocab_size:
        raise ValueError(f"input ids must lie in [0, {vocab_size}); got [{inputs.min()}, {inputs.max()}]")
    valid = targets != IGNORE_INDEX
    if ((targets[valid] < 0) | (targets[valid] >= vocab_size)).any():
        raise ValueError(f"target ids must lie in [0, {vocab_size}) or be IGNORE_INDEX={IGNORE_INDEX}")
    # Head 0 at position j predicts the token read at position j+1.
    head0 = targets[:, 0, :-1]
    bad = (head0 != IGNORE_INDEX) & (head0 != inputs[:, 1:])
    if bad.any():
        b, j = bad.nonzero()[0].tolist()
        raise ValueError(
            f"misaligned targets: sample {b} position {j} targets {head0[b, j].item()} but the next input is "
            f"{inputs[b, j + 1].item()}; targets must be the inputs shifted left by one (use make_targets)"
        )
    # Head k at position j predicts what head 0 predicts at position j+k.
    for k in range(1, targets.shape[1]):
        ahead = targets[:, k, : T - k]
        bad = (ahead != IGNORE_INDEX) & (ahead != targets[:, 0, k:])
        if bad.any() or (targets[:, k, T - k :] != IGNORE_INDEX).any():
            raise ValueError(
                f"misaligned targets for head {k} (token t+{k + 1}): it must equal head 0's targets shifted "
                f"left by {k}, with the last {k} positions ignored (use make_targets)"
            )
    if not valid[:, 0].any(dim=1).all():
        b = int((~valid[:, 0].any(dim=1)).nonzero()[0])
        raise ValueError(f"sample {b} has no next-token target: every sample needs a caption or answer token")
