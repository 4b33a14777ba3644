"""What a model knows to draw, for models that say so: a `vocabulary.json` beside the weights (the embedded family
writes one when it is trained) lists the words its captions used, by kind. A prompt's other words are words the
model never saw: they do not steer it (at most they nudge it at random), so the studio says which they are
instead of failing silently.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

VOCABULARY_FILE = "vocabulary.json"
# A1111's prompt syntax is not words: "(red:1.2)", "[a|b]", numbers, "<lora:name:0.8>", and the keywords
# "BREAK" and "AND" (upper case only: "and" in lower case is a word).
_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")
_TAG = re.compile(r"<[^>]*>")
_SYNTAX_WORDS = {"BREAK", "AND"}


@dataclass(frozen=True)
class Vocabulary:
    groups: dict[str, tuple[str, ...]]  # kind ("colours", "shapes", ...) -> words or phrases

    @cached_property  # asked on every keystroke in the prompt
    def words(self) -> frozenset[str]:
        return frozenset(word for phrases in self.groups.values() for phrase in phrases for word in phrase.split())

    def unknown_words(self, prompt: str) -> list[str]:
        """The words of `prompt` the model never saw, in order, each once."""
        known, unknown = self.words, []
        for word in _WORD.findall(_TAG.sub(" ", prompt)):
            if word in _SYNTAX_WORDS:
                continue
            word = word.lower()
            if word not in known and word not in unknown:
                unknown.append(word)
        return unknown

    def summary(self) -> str:
        """One line per kind, for the place where the user types."""
        shown = {kind: phrases for kind, phrases in self.groups.items() if kind != "other"}
        return "; ".join(f"{kind}: {', '.join(_distinct_first_words(kind, phrases))}" for kind, phrases in shown.items())


def _distinct_first_words(kind: str, phrases: tuple[str, ...]) -> list[str]:
    # positions come in several phrasings ("at the top left", "in the top left corner"): show the places
    if kind != "positions":
        return list(phrases)
    places = []
    for phrase in phrases:
        place = re.sub(r"^(in|at|on|near) (the )?|( corner| side| center)$", "", phrase)
        if place and place not in places:
            places.append(place)
    return places


def load_vocabulary(folder: Path | str | None) -> Vocabulary | None:
    """The vocabulary a model folder declares, or None (Hub models know far more than a list could say)."""
    if folder is None:
        return None
    path = Path(folder) / VOCABULARY_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return Vocabulary({kind: tuple(words) for kind, words in data.items()})


def unknown_words_warning(vocabulary: Vocabulary | None, prompt: str, model_label: str) -> str | None:
    if vocabulary is None:
        return None
    unknown = vocabulary.unknown_words(prompt)
    if not unknown:
        return None
    listed = ", ".join(f"“{word}”" for word in unknown)
    return (f"{model_label} has never seen {listed}, so {'they do' if len(unknown) > 1 else 'it does'} not steer it. "
            f"It knows {vocabulary.summary()}.")
