"""`ResumableLoader`: a DataLoader over a batch stream that can stop and resume mid-epoch exactly.

Lightning saves ``state_dict()`` of a training dataloader that has one into every checkpoint and
calls ``load_state_dict()`` on the new loader before iterating it (fit loop, "combined_loader").
The state is ``(epoch, batches consumed in that epoch)``; a loaded state makes the next
``iter()`` start at exactly the next batch. The loader also adds up the bad-sample counts the
batches carry (``quality``, a `sample_quality.QualityGate`).

*Consumed* is not *fetched*: Lightning fetches one batch ahead and worker processes prefetch
more, so counting batches as they leave the data loader would over-count. Two modes:

- ``count_on_yield=True`` (plain loops): a batch counts as consumed when it is yielded;
- ``count_on_yield=False`` (inside a Trainer): the data module calls `mark_consumed(batch)` from
  ``on_before_batch_transfer``, which Lightning calls for the batch a training step is about to
  use. Batches carry their stream's token, so a batch from another loader is not counted.
"""

from __future__ import annotations

import uuid
import warnings

import torch

from tipslab.datamodules.sample_quality import QualityGate


def _as_is(batch):
    # The stream yields finished Batches; module level so spawned workers can pickle it.
    return batch


class ResumableLoader(torch.utils.data.DataLoader):
    def __init__(self, stream, num_workers: int = 0, count_on_yield: bool = True, pin_memory: bool = False,
                 describe: dict | None = None, quality: QualityGate | None = None):
        super().__init__(stream, batch_size=None, num_workers=int(num_workers), collate_fn=_as_is,
                         pin_memory=pin_memory, persistent_workers=False)
        self.stream = stream
        self.count_on_yield = count_on_yield
        self.token = uuid.uuid4().hex
        stream.stream_token = self.token
        self.epoch, self.consumed = 0, 0
        # What must match for a saved position to mean the same batches (checked on load).
        self.describe = dict(describe or {})
        # Bad samples of every batch fetched, added up here in the main process; it raises once
        # the share of bad samples is over the limit (see sample_quality.py).
        self.quality = quality if quality is not None else QualityGate(max_share=1.0, min_seen=1)

    @property
    def batches_per_epoch(self) -> int | None:
        return len(self.stream) if hasattr(type(self.stream), "__len__") else None

    def __iter__(self):
        self.stream.set_position(self.epoch, self.consumed)
        iterator = super().__iter__()
        for batch in iterator:
            self.quality.add(getattr(batch, "data_counts", None))
            if self.count_on_yield:
                self._advance()
            yield batch

    def mark_consumed(self, batch) -> bool:
        """Count ``batch`` as used for training if this loader made it; returns whether it did."""
        if getattr(batch, "stream_token", None) != self.token:
            return False
        self._advance()
        return True

    def _advance(self) -> None:
        self.consumed += 1
        per_epoch = self.batches_per_epoch
        if per_epoch is not None and self.consumed >= per_epoch:
            self.epoch, self.consumed = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, **self.describe}

    def load_state_dict(self, state: dict) -> None:
        changed = {k: (state.get(k), v) for k, v in self.describe.items() if k in state and state[k] != v}
        if changed:
            # A different batch size, seed, rank or worker count means different batches: the
            # position is kept, but the stream after it is not the one the checkpoint continued.
            warnings.warn(f"data loader state from a run with different settings {changed} (saved, now); "
                          "resuming at the saved position but the batches will differ from the original run",
                          stacklevel=2)
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
