"""Several shard sources mixed by weight, with resampling (open_clip's ``--dataset-resampled``).

``data.sources`` lists ``{path, weight}``; each path is a folder of ``.tar`` files, a brace
pattern (``a-{000..099}.tar``), one tar, a list, or a URL (``pipe:``, ``http(s)://``, or any
fsspec URL such as ``s3://`` or ``memory://``; see shard_urls.py). Two modes:

- ``data.resampled: false``: the sources' shards are read as one list, every sample once per
  pass, split over ranks and workers without duplicates (`shards.ShardDataset`). Weights other
  than equal are refused: without resampling a pass cannot follow them.
- ``data.resampled: true``: each rank x worker *slot* keeps one stream per source that draws
  shards *with replacement* (seeded by seed, pass, slot and source), and picks the source of
  each next sample by weight (seeded by seed, pass and slot). The mix then follows the weights
  in samples (a multinomial draw: within a few standard deviations, ``sqrt(w(1-w)/n)``), slots
  draw independently, and a pass is ``data.epoch_samples`` samples over all slots (open_clip's
  ``--train-num-samples``). Samples may repeat, as with any sampling with replacement.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from tipslab.datamodules.shard_urls import tar_samples
from tipslab.errors import TipslabError


@dataclass(frozen=True)
class ShardSource:
    urls: tuple[str, ...]
    weight: float
    name: str


def parse_sources(specs: Sequence, resolve: Callable[[object], list[str]]) -> list[ShardSource]:
    """``data.sources`` entries (``{path, weight}`` mappings or bare paths) -> `ShardSource`s."""
    out = []
    for index, spec in enumerate(specs):
        if isinstance(spec, Mapping):
            unknown = sorted(set(spec) - {"path", "weight"})
            if unknown or "path" not in spec:
                raise TipslabError(f"data.sources[{index}]={dict(spec)}; expected {{path: ..., weight: ...}}")
            path, weight = spec["path"], spec.get("weight", 1.0)
        else:
            path, weight = spec, 1.0
        try:
            weight = float(weight)
        except (TypeError, ValueError):
            weight = -1.0
        if not weight > 0:
            raise TipslabError(f"data.sources[{index}].weight={spec.get('weight')!r}; expected a positive number")
        out.append(ShardSource(tuple(resolve(path)), weight, str(path)))
    if not out:
        raise TipslabError("data.sources is empty; expected at least one {path, weight}")
    return out


def check_unweighted(sources: Sequence[ShardSource]) -> None:
    """Without resampling, weights cannot be followed: refuse unequal ones rather than ignore them."""
    if len({s.weight for s in sources}) > 1:
        raise TipslabError("data.sources have different weights but data.resampled=false; weights need "
                           "resampling (data.resampled=true with data.epoch_samples), as open_clip's "
                           "--dataset-resampled")


def _resampled_shards(source: ShardSource, rng: random.Random, handler) -> Iterator[dict]:
    """Samples of ``source``'s shards drawn with replacement, forever (a shard at a time)."""
    empty_draws = 0
    while True:
        url = source.urls[rng.randrange(len(source.urls))]
        got = 0
        for sample in tar_samples([url], handler=handler):
            got += 1
            yield sample
        empty_draws = empty_draws + 1 if got == 0 else 0
        if empty_draws >= 4 * len(source.urls) + 4:
            raise TipslabError(f"data.sources {source.name}: {empty_draws} shards drawn in a row gave no sample; "
                               "its shards are empty or unreadable")


def resampled_samples(sources: Sequence[ShardSource], seed_of: Callable[..., int], slot: int, num_slots: int,
                      pass_index: int, epoch_samples: int, handler) -> Iterator[dict]:
    """The raw samples of one slot in one resampled pass (see module docstring)."""
    streams = [_resampled_shards(s, random.Random(seed_of(pass_index, slot, 1 + i)), handler)
               for i, s in enumerate(sources)]
    pick = random.Random(seed_of(pass_index, slot, 0))
    weights = [s.weight for s in sources]
    count = -(-int(epoch_samples) // int(num_slots))  # ceil: every slot draws the same number
    for _ in range(count):
        index = pick.choices(range(len(sources)), weights)[0] if len(sources) > 1 else 0
        sample = next(streams[index])
        sample["__source__"] = sources[index].name
        yield sample
