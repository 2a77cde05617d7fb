"""Caption mapping (``data.captions``): which field of a sample feeds ``alt``, ``short`` and ``long``.

A field is, for shards, ``txt`` (the ``{key}.txt`` member) or ``json:<dotted.path>`` (a field of
the ``{key}.json`` member, e.g. ``json:captions.gemini`` or ``json:caption``); for manifests, a
column name. A value may be a string or a list of strings. ``null`` keeps the source's default:

- shards: the json's ``captions`` object as it is (every granularity it names), else the json's
  ``caption`` string (img2dataset) or the ``.txt`` text as ``alt``;
- manifests: the column named like the granularity.

A sample that lacks a mapped granularity is kept: `captions.sample_caption` falls back to the
granularities it has (weights renormalised) and CLS1 to the tersest caption (`ALT_FALLBACK`).
A sample with no caption text at all is skipped (kinds ``no_caption``: no caption member;
``empty_caption``: members without text; ``bad_json``: json that does not parse). Text that is
not valid UTF-8 is decoded with replacement characters and counted as converted
(``invalid_utf8``). A mapped field that none of the first samples has is a wrong key:
`check_mapping` fails at start-up naming it and the fields the samples do have.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from tipslab.errors import TipslabError

GRANULARITIES = ("alt", "short", "long")
CAPTION_SKIP_KINDS = ("no_caption", "empty_caption", "bad_json")


class CaptionProblem(Exception):
    """A sample whose captions cannot be used; ``kind`` is one of `CAPTION_SKIP_KINDS`."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind


def _text(data: bytes, conversions: list[str]) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        conversions.append("invalid_utf8")
        return data.decode("utf-8", errors="replace")


def _usable(value):
    """A string or list of strings with some text, else None."""
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, (list, tuple)):
        texts = [v for v in value if isinstance(v, str) and v.strip()]
        return texts or None
    return None


def _lookup(tree, path: str):
    for part in path.split("."):
        if not isinstance(tree, Mapping) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _fields(tree, prefix: str = "json:") -> list[str]:
    """The dotted paths of a json object's leaves (for a wrong-key message)."""
    if not isinstance(tree, Mapping):
        return []
    out = []
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.extend(_fields(value, f"{prefix}{key}."))
        else:
            out.append(f"{prefix}{key}")
    return out


class CaptionMapping:
    """``mapping(members) -> captions dict`` for shard samples; ``columns`` for manifests."""

    def __init__(self, mapping: Mapping | None = None, shards: bool = True):
        mapping = dict(mapping or {})
        unknown = sorted(set(mapping) - set(GRANULARITIES))
        if unknown:
            raise TipslabError(f"data.captions has {unknown}; expected keys {', '.join(GRANULARITIES)}")
        self.explicit = {g: str(spec) for g, spec in mapping.items() if spec}
        for granularity, spec in self.explicit.items() if shards else ():  # manifests: any column name
            if spec != "txt" and not (spec.startswith("json:") and len(spec) > 5):
                raise TipslabError(f"data.captions.{granularity}={spec!r}; for shards expected 'txt' or "
                                   "'json:<dotted.path>' (e.g. json:captions.short)")

    def column(self, granularity: str) -> str:
        """The manifest column of a granularity (its mapped name, else its own name)."""
        return self.explicit.get(granularity, granularity)

    def read_members(self, raw: Mapping) -> tuple[dict | None, str | None, list[str]]:
        """``(parsed json or None, txt or None, conversions)`` of a raw shard sample."""
        conversions: list[str] = []
        if "json" not in raw and "txt" not in raw:
            raise CaptionProblem("no_caption", "no .json or .txt caption member")
        meta = None
        if "json" in raw:
            try:
                meta = json.loads(_text(raw["json"], conversions))
            except json.JSONDecodeError as err:
                raise CaptionProblem("bad_json", f"caption json is not valid json ({err})") from None
            if not isinstance(meta, dict):
                raise CaptionProblem("bad_json", f"caption json is a {type(meta).__name__}; expected an object")
        text = _text(raw["txt"], conversions) if "txt" in raw else None
        return meta, text, conversions

    def captions(self, meta: dict | None, text: str | None) -> dict:
        """The captions of one sample (see module docstring); raises `CaptionProblem` when it has none."""
        if self.explicit:
            found = {}
            for granularity, spec in self.explicit.items():
                value = text if spec == "txt" else _lookup(meta, spec[5:])
                if _usable(value) is not None:
                    found[granularity] = _usable(value)
        else:
            nested = meta.get("captions") if meta else None
            if isinstance(nested, Mapping):
                found = {k: _usable(v) for k, v in nested.items() if _usable(v) is not None}
            else:
                alt = _usable(meta.get("caption")) if meta else None
                found = {"alt": alt if alt is not None else _usable(text)}
                found = {k: v for k, v in found.items() if v is not None}
        if not found:
            raise CaptionProblem("empty_caption", "no caption text (" + (
                f"data.captions maps {self.explicit}" if self.explicit else "expected json captions.<granularity>, "
                "json caption or .txt") + ")")
        return found

    def check_mapping(self, samples: list[tuple[dict | None, str | None]], where: str) -> None:
        """Start-up check over the first samples read: a mapped field none of them has is a wrong key."""
        if not self.explicit or not samples:
            return
        for granularity, spec in self.explicit.items():
            hits = sum(_usable(text if spec == "txt" else _lookup(meta, spec[5:])) is not None for meta, text in samples)
            if hits == 0:
                meta, text = samples[0]
                have = _fields(meta) + (["txt"] if text is not None else [])
                raise TipslabError(f"data.captions.{granularity}={spec!r} matches none of the first {len(samples)} "
                                   f"samples of {where}; they have: {', '.join(have) or 'no caption fields'}")
