"""Query typos for SFT: a training pair whose query is written with one typo, its gold nodes unchanged.

Why: people misspell, and a misspelled word is another sequence of tokens. The policy reads a form only where training
showed it, and a typo is a form few training queries (if any) wrote: the recipe's seeds misread the listed misspelling
`vaze` as another type, which costs `qs` and with it `ms`, and the value typos `alrge` and `copmact` (both sizes), which
cost `qa` (benchmarks/results/quality.md, sessions 31-32). A typo keeps the query's intent, and the nodes write the catalog's canonical values and
subjects, so they stay as they are.

The typo: one single-letter edit in one word of at least four letters: two adjacent letters swapped, one letter dropped,
one doubled, or one replaced by another lower-case letter (the four edits of Damerau's typo classes; no keyboard model).
"""

from __future__ import annotations

import random
import string
from collections.abc import Sequence

EDITS = ("swap", "drop", "double", "replace")
SHORTEST_WORD = 4  # shorter words ("rug", "red") become other words too easily


def with_typo(text: str, which: float, where: float, edit: str, letter: float) -> str | None:
    """`text` with `edit` applied in its `int(which * n)`-th of the n words of at least SHORTEST_WORD letters, at letter
    `int(where * m)` of the m places the edit has (the swap: the pairs of neighbours); the replacement letter is the
    `int(letter * 25)`-th of the 25 others. None when no word qualifies or the edit leaves the word as it was (two equal
    neighbours swapped)."""
    words = text.split(" ")
    candidates = [index for index, word in enumerate(words) if len(word) >= SHORTEST_WORD and word.isalpha()]
    if not candidates:
        return None
    index = candidates[int(which * len(candidates))]
    word = words[index]
    at = int(where * (len(word) - 1 if edit == "swap" else len(word)))
    if edit == "swap":
        typed = word[:at] + word[at + 1] + word[at] + word[at + 2:]
    elif edit == "drop":
        typed = word[:at] + word[at + 1:]
    elif edit == "double":
        typed = word[:at + 1] + word[at:]
    elif edit == "replace":
        others = [character for character in string.ascii_lowercase if character != word[at].lower()]
        typed = word[:at] + others[int(letter * len(others))] + word[at + 1:]
    else:
        raise ValueError(f"edit: one of {EDITS}, got {edit!r}")
    if typed == word:
        return None
    return " ".join(words[:index] + [typed] + words[index + 1:])


def draw_typos(pairs: Sequence[dict], share: float, generator: random.Random) -> list[dict | None]:
    """For each pair (a micro-batch's), the pair with a typo in its query (`with_typo`), with probability `share`, or
    None (the pair as it is, also where its query has no word to misspell). Five draws per pair whatever the outcome, so
    the draws are a function of the generator's seed and the position alone."""
    drawn: list[dict | None] = []
    for pair in pairs:
        chance, which, where, edit, letter = (generator.random() for _ in range(5))
        typed = with_typo(pair["query"], which, where, EDITS[int(edit * len(EDITS))], letter) if chance < share else None
        drawn.append(None if typed is None else {**pair, "query": typed})
    return drawn
