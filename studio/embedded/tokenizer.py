"""The embedded family's CLIP tokenizer: byte-level BPE with the project's own vocab.json and merges.txt.

Every byte is a token (so any text encodes), and merges turn each caption word into a single token.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from studio.embedded.scenes import vocabulary

MAX_TOKENS = 32  # captions are short; the text encoder's position table has this many slots
START, END = "<|startoftext|>", "<|endoftext|>"


def _word_symbols(word: str) -> list[str]:
    byte_chars = bytes_to_unicode()
    symbols = [byte_chars[b] for b in word.encode("utf-8")]
    symbols[-1] += "</w>"
    return symbols


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Plain BPE training on the word list: merge the most frequent adjacent pair until each word is one token.

    Replaying merges in the order they were learned (which is what the tokenizer does) reproduces these
    segmentations exactly, so every caption word ends up a single token.
    """
    segmented = [_word_symbols(word) for word in words]
    merges: list[tuple[str, str]] = []
    while any(len(symbols) > 1 for symbols in segmented):
        counts: dict[tuple[str, str], int] = {}
        for symbols in segmented:
            for pair in zip(symbols, symbols[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        best = min(counts, key=lambda pair: (-counts[pair], pair))  # ties broken alphabetically: deterministic
        merges.append(best)
        for index, symbols in enumerate(segmented):
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            segmented[index] = merged
    return merges


def vocab_and_merges(words: list[str]) -> tuple[dict[str, int], list[str]]:
    byte_chars = list(bytes_to_unicode().values())
    merges = learn_merges(words)
    tokens = [START, END] + byte_chars + [c + "</w>" for c in byte_chars] + [a + b for a, b in merges]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    return vocab, [f"{a} {b}" for a, b in merges]


def write_tokenizer_files(folder: Path, words: list[str] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = vocab_and_merges(words or vocabulary())
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


def build_tokenizer(folder: Path) -> CLIPTokenizer:
    """Write vocab.json/merges.txt into `folder` and load a CLIPTokenizer from them."""
    write_tokenizer_files(folder)
    return CLIPTokenizer(
        vocab=str(folder / "vocab.json"),
        merges=str(folder / "merges.txt"),
        model_max_length=MAX_TOKENS,
        bos_token=START,
        eos_token=END,
        pad_token=END,
        unk_token=END,
    )
