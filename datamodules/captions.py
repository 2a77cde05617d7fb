"""Multi-granularity caption sampling: which text each CLS token is contrasted with, per step.

TIPSv2 pairs CLS1 with the web alt-text and CLS2 with a synthetic caption drawn, per sample and
per step, from the richer granularities (short or long). A source may lack a granularity for
some samples (a shard with alt-text only, a manifest row with a null ``long``): sampling then
falls back to what the sample has instead of failing, so mixed datasets train as they are.

A caption value may be a string or a list of strings (several alt-texts, several captions of the
same granularity); a list gives one of its texts, chosen with the same seeded generator.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from tipslab.errors import TipslabError

# When the alt-text is missing, CLS1 takes the tersest caption the sample has.
ALT_FALLBACK = ("alt", "short", "long")


def _texts(value) -> list[str]:
    if isinstance(value, str):
        return [value] if value.strip() else []
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, str) and v.strip()]
    return []


def _one(texts: list[str], rng: np.random.Generator) -> str:
    return texts[0] if len(texts) == 1 else texts[int(rng.integers(len(texts)))]


def check_probs(granularities: Sequence[str], probs: Sequence[float] | None) -> np.ndarray:
    """Normalised sampling weights (uniform when ``probs`` is None); bad values raise TipslabError."""
    if not granularities:
        raise TipslabError("data.caption_granularities is empty; expected e.g. [short, long]")
    if probs is None:
        return np.full(len(granularities), 1.0 / len(granularities))
    weights = np.asarray(list(probs), dtype=np.float64)
    if weights.shape != (len(granularities),):
        raise TipslabError(f"data.caption_probs has {weights.size} values for {len(granularities)} "
                           f"caption_granularities {list(granularities)}; expected one per granularity")
    if (weights < 0).any() or not np.isfinite(weights).all() or weights.sum() <= 0:
        raise TipslabError(f"data.caption_probs={list(probs)}; expected non-negative numbers with a positive sum")
    return weights / weights.sum()


def alt_caption(captions: Mapping, rng: np.random.Generator, sample_id: str = "?") -> str:
    """CLS1's text: the alt-text, else the tersest caption present."""
    for name in ALT_FALLBACK:
        texts = _texts(captions.get(name))
        if texts:
            return _one(texts, rng)
    for value in captions.values():  # a source with its own granularity names only
        texts = _texts(value)
        if texts:
            return _one(texts, rng)
    raise TipslabError(f"sample {sample_id}: has no caption text; expected at least one of {', '.join(ALT_FALLBACK)}")


def sample_caption(captions: Mapping, rng: np.random.Generator,
                   granularities: Sequence[str] = ("short", "long"), probs: Sequence[float] | None = None,
                   sample_id: str = "?") -> tuple[str, str]:
    """CLS2's text: ``(granularity, text)`` drawn from ``granularities`` with weights ``probs``.

    Granularities the sample lacks are dropped and the weights of the rest renormalised; if it has
    none of them, the alt-text (or the tersest caption present) stands in, reported as ``"alt"``.
    """
    weights = check_probs(granularities, probs)
    present = [(g, w) for g, w in zip(granularities, weights) if w > 0 and _texts(captions.get(g))]
    if not present:
        return "alt", alt_caption(captions, rng, sample_id)
    names = [g for g, _ in present]
    p = np.asarray([w for _, w in present])
    choice = names[0] if len(names) == 1 else names[int(rng.choice(len(names), p=p / p.sum()))]
    return choice, _one(_texts(captions[choice]), rng)
