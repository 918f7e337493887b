"""Words: the unit every text path labels. A text is split into words (runs of letters / digits,
or single punctuation marks) with their character offsets; terms and entities are word sequences,
matched case-insensitively. Subword tokenizers map words to tokens; predictions come back per word."""
from __future__ import annotations

import re
from typing import NamedTuple

WORD = re.compile(r"\w+|[^\w\s]")


class Word(NamedTuple):
    text: str
    start: int  # character offsets in the text
    end: int


def split_words(text: str) -> list[Word]:
    return [Word(m.group(), m.start(), m.end()) for m in WORD.finditer(text)]


def norm(words: list[str]) -> tuple[str, ...]:
    return tuple(w.lower() for w in words)


def term_key(term: str) -> str:
    """How TermEval compares terms: lower case, words joined by one space (punctuation split off),
    so "Heart-failure" and "heart - failure" are the same term."""
    return " ".join(norm([w.text for w in split_words(term)]))


def find_all(words: list[str], phrase: list[str]) -> list[int]:
    """Start indices of every case-insensitive occurrence of `phrase` in `words`."""
    n, target = len(phrase), norm(phrase)
    low = norm(words)
    return [i for i in range(len(words) - n + 1) if n and low[i:i + n] == target]
