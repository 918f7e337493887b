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


# English function words (articles, prepositions, pronouns, auxiliaries, conjunctions, a few
# quantifiers): never a term on their own. A decoded span made only of these (and punctuation) is
# dropped; inside a span ("quality of life", "difference-in-differences") they stay.
STOP_WORDS = frozenset("""a about above after again against all also although among an and another any are as at
be because been before being below between both but by can could did do does doing during each either et
etc few for from further had has have having he her here hers him his how however i ie if in into is it
its itself may me might more most much must my neither no nor not of off on once only onto or other our
ours out over own per same several she should since so some such than that the their theirs them then
there these they this those though through thus to too under until up upon us very via was we were what
when where whether which while who whom whose why will with within without would yet you your""".split())


def is_stop(word: str) -> bool:
    """A function word (`STOP_WORDS`, any case) or a token without a letter or digit (punctuation)."""
    return word.lower() in STOP_WORDS or not any(c.isalnum() for c in word)


def compounds(words: list[Word]) -> list[tuple[int, int]]:
    """Word spans [start, end) of the hyphenated compounds of a text ("difference-in-differences",
    "state-level", "COVID-19"): runs of letter / digit words joined by "-" with no space on either
    side. `split_words` (and so the model) sees their pieces and hyphens as separate words."""
    out, i, n = [], 0, len(words)
    while i < n:
        j = i
        while (j + 2 < n and words[j + 1].text == "-" and words[j].end == words[j + 1].start
               and words[j + 1].end == words[j + 2].start and words[j].text[-1:].isalnum()
               and words[j + 2].text[:1].isalnum()):
            j += 2
        if j > i:
            out.append((i, j + 1))
        i = j + 1
    return out


def surface(words: list[Word]) -> str:
    """The words as they stand in the text: a space where the text has whitespace between two words,
    nothing where they touch ("state-level", "p53")."""
    return "".join((" " if k and w.start > words[k - 1].end else "") + w.text for k, w in enumerate(words))
