"""Hard-negative captions (NegCLIP's "replace" negatives): a sample's caption with one word
swapped for another of the same kind, so the caption is wrong about exactly one thing.

In-batch negatives of a contrastive batch differ from the true caption in many words, so a model
can match an image to its text by the easiest cue (on the built-in scenes: colour) and never
learn the others (shape). A negative that differs only in the shape of one object is the
cheapest way to make that cue count. Which words are interchangeable is data knowledge, so the
config lists the groups (``data.hard_negatives.words``); an empty list turns negatives off.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from tipslab.errors import TipslabError


def check_word_groups(groups, where: str = "data.hard_negatives.words") -> tuple[tuple[str, ...], ...]:
    """Groups of interchangeable words as tuples; bad values raise naming ``where``."""
    if groups is None:
        return ()
    if isinstance(groups, str) or not isinstance(groups, Sequence):
        raise TipslabError(f"{where}={groups!r}; expected a list of word lists, e.g. [[circle, square, star]]")
    out, seen = [], {}
    for g, group in enumerate(groups):
        if isinstance(group, str) or not isinstance(group, Sequence):
            raise TipslabError(f"{where}[{g}]={group!r}; expected a list of at least two words")
        words = tuple(str(w).strip().lower() for w in group)
        if len(set(words)) < 2 or any(not w or " " in w for w in words):
            raise TipslabError(f"{where}[{g}]={list(group)}; expected at least two distinct single words")
        for w in words:
            if w in seen and seen[w] != g:
                raise TipslabError(f"{where}: {w!r} is in groups {seen[w]} and {g}; a word may be in one group")
            seen[w] = g
        out.append(words)
    return tuple(out)


class WordSwap:
    """``text -> negative``: one whole-word occurrence of a group's word, picked uniformly among
    all occurrences, replaced by another word of its group (uniformly); the capitalisation of
    the replaced word is kept. ``""`` when the text has no word of any group (no negative)."""

    def __init__(self, groups):
        self.groups = check_word_groups(groups)
        self.group_of = {w: g for g, words in enumerate(self.groups) for w in words}
        self.pattern = (re.compile(r"\b(" + "|".join(map(re.escape, sorted(self.group_of, key=len, reverse=True)))
                                   + r")\b", re.IGNORECASE) if self.group_of else None)

    def __bool__(self) -> bool:
        return bool(self.groups)

    def __call__(self, text: str, rng: np.random.Generator) -> str:
        matches = list(self.pattern.finditer(text)) if self.pattern is not None else []
        if not matches:
            return ""
        hit = matches[int(rng.integers(len(matches)))] if len(matches) > 1 else matches[0]
        word = hit.group(0)
        others = [w for w in self.groups[self.group_of[word.lower()]] if w != word.lower()]
        new = others[int(rng.integers(len(others)))]
        if word[0].isupper():
            new = new[0].upper() + new[1:]
        return text[:hit.start()] + new + text[hit.end():]
