"""Bad samples counted by kind, carried from data-loader workers to the run, logged and policed.

Every source counts what it read into a `SkipCounter`: samples seen, skipped by kind (an image
that does not decode, a missing caption, ...: `image_io.UNREADABLE_KINDS` and the caption kinds
of `caption_fields`) and converted by kind (16-bit, CMYK, EXIF-rotated, invalid UTF-8, ...). A
worker hands its counts since the last batch to the batch it makes (``Batch.data_counts``); the
loader in the main process adds them to a `QualityGate`, which stops the run with a clear error
once more than ``max_share`` of the samples seen are bad (after ``min_seen``, so a few bad
samples at the start do not), and gives the metrics logged to MLflow (``data/...``).
"""

from __future__ import annotations

from collections import Counter

from tipslab.errors import TipslabError


class SkipCounter:
    """Samples seen, skipped and converted, by kind; mergeable across workers and batches."""

    def __init__(self):
        self.seen = 0
        self.skipped: Counter = Counter()
        self.converted: Counter = Counter()

    def skip(self, kind: str) -> None:
        self.seen += 1
        self.skipped[kind] += 1

    def ok(self, conversions=()) -> None:
        self.seen += 1
        self.converted.update(conversions)

    def take(self) -> dict:
        """The counts since the last ``take`` (a plain dict), then reset: what a batch carries."""
        out = {"seen": self.seen, "skipped": dict(self.skipped), "converted": dict(self.converted)}
        self.seen, self.skipped, self.converted = 0, Counter(), Counter()
        return out

    def add(self, counts: dict | None) -> None:
        if counts:
            self.seen += int(counts.get("seen", 0))
            self.skipped.update(counts.get("skipped", {}))
            self.converted.update(counts.get("converted", {}))

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        """``"3 skipped (truncated 2, no_caption 1)"``: a line for logs and errors."""
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items()))
        return f"{self.total_skipped} skipped" + (f" ({kinds})" if kinds else "")


class QualityGate(SkipCounter):
    """Counts of a whole run (all workers) with the ``data.bad_samples`` limit applied on `add`."""

    def __init__(self, max_share: float = 0.1, min_seen: int = 1000):
        super().__init__()
        if not 0.0 <= float(max_share) <= 1.0:
            raise TipslabError(f"data.bad_samples.max_share={max_share}; expected a share between 0 and 1")
        if int(min_seen) < 1:
            raise TipslabError(f"data.bad_samples.min_seen={min_seen}; expected a positive number")
        self.max_share, self.min_seen = float(max_share), int(min_seen)

    def add(self, counts: dict | None) -> None:
        super().add(counts)
        if self.seen >= self.min_seen and self.total_skipped > self.max_share * self.seen:
            raise TipslabError(
                f"data: {self.total_skipped} of {self.seen} samples read are bad "
                f"({self.total_skipped / self.seen:.1%} > data.bad_samples.max_share={self.max_share:g}): "
                f"{self.summary()}; the warnings above name them. Fix the data, or raise "
                "data.bad_samples.max_share if this share is expected")

    def metrics(self) -> dict[str, float]:
        """``data/seen``, ``data/skipped``, ``data/skipped_share``, ``data/skipped/<kind>``, ``data/converted/<kind>``."""
        out = {"data/seen": float(self.seen), "data/skipped": float(self.total_skipped),
               "data/skipped_share": self.total_skipped / self.seen if self.seen else 0.0}
        out.update({f"data/skipped/{k}": float(v) for k, v in self.skipped.items()})
        out.update({f"data/converted/{k}": float(v) for k, v in self.converted.items()})
        return out
