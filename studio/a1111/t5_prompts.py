"""T5 reads prompts in A1111's syntax as Forge reads them (backend/text_processing/t5_engine.py): the weighted
fragments tokenized one by one, one window of the family's length ending in </s>, each token's hidden state
scaled by its weight and the whole scaled back to its mean before weighting (A1111's "Original" emphasis, Forge's
default). T5 has no windows of its own to chain as CLIP does: a prompt longer than the window is cut, and the
caller says so. ComfyUI weights T5 tokens differently (each pushed away from an empty prompt's encoding); the
studio follows Forge because A1111's users wrote their weights for its arithmetic, which CLIP already follows
here (studio.a1111.prompts.a1111_emphasis).

BREAK does nothing to T5's single window (Forge stacks BREAK chunks; diffusers' pipelines have one sequence).
Unweighted, the window is what diffusers' pipelines encode: the tokens, </s>, padding to the window."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from studio.a1111.prompts import a1111_emphasis


@dataclass(frozen=True)
class T5Tokens:
    """A prompt's T5 tokens within a window: ids (ending in </s>, padded), each one's weight, and how many of
    the prompt's tokens did not fit."""

    ids: list[int]
    weights: list[float]
    cut: int

    def encode(self, encoder, device: torch.device) -> torch.Tensor:
        z = encoder(torch.tensor([self.ids], dtype=torch.long, device=device))[0]
        return a1111_emphasis(z, torch.tensor(self.weights))


def t5_tokens(tokenizer, fragments: list[tuple[str, float]], window: int) -> T5Tokens:
    """`fragments` (parse_attention's, BREAKs taken out) as one window of `window` tokens."""
    ids: list[int] = []
    weights: list[float] = []
    kept = [(text, weight) for text, weight in fragments if text and weight != -1]  # -1: a BREAK
    if kept:
        encoded = tokenizer([text for text, _ in kept], add_special_tokens=False).input_ids
        for tokens, (_, weight) in zip(encoded, kept):
            ids += tokens
            weights += [weight] * len(tokens)
    room = window - 1  # the last place is </s>
    cut = max(0, len(ids) - room)
    ids, weights = ids[:room] + [tokenizer.eos_token_id], weights[:room] + [1.0]
    padding = window - len(ids)
    return T5Tokens(ids + [tokenizer.pad_token_id] * padding, weights + [1.0] * padding, cut)


def cut_note(encoder_label: str, window: int, cut: int, negative: bool = False) -> str:
    """What a user is told when their prompt did not fit T5's window."""
    which = "negative prompt" if negative else "prompt"
    return (f"The {which} is longer than {encoder_label}'s window of {window} tokens: its last {cut} "
            f"token{'s' if cut != 1 else ''} were left out. Shorten it, or put what matters first.")
