"""`Batch`: what the pretraining system receives each step, and `collate` that builds one.

Fields follow the contract in docs/ARCHITECTURE.md: images are float ``[B, 3, H, W]`` in
``[0, 1]`` (raw pixels, no mean/std), ``alt_ids`` are CLS1's alt-text tokens, ``caption_ids``
CLS2's caption tokens (one granularity sampled per sample per step), pad id 0.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass
class Batch:
    images: torch.Tensor  # float [B, 3, H, W] in [0, 1]
    alt_ids: torch.Tensor  # long [B, L]: CLS1's text (alt-text)
    caption_ids: torch.Tensor  # long [B, L]: CLS2's text (sampled richer caption)
    ids: list[str]  # sample ids, as the source names them
    masks: torch.Tensor | None = None  # bool [B, N] patches to mask (iBOT); None: no masking
    captions: list[str] | None = None  # CLS2's caption texts, as sampled
    alt_texts: list[str] | None = None  # CLS1's texts
    granularities: list[str] | None = None  # which granularity each caption came from

    def to(self, device, non_blocking: bool = False) -> Batch:
        """A copy with every tensor on ``device`` (lists of strings stay as they are)."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device, non_blocking=non_blocking)
        return replace(self, **moved)

    def pin_memory(self) -> Batch:
        # DataLoader(pin_memory=True) calls this on custom batch types.
        return replace(self, **{f.name: getattr(self, f.name).pin_memory() for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})


def collate(items: list[dict], tokenizer) -> Batch:
    """A Batch of processed items (``image``, ``alt``, ``caption``, ``granularity``, ``id``)."""
    alts = [item["alt"] for item in items]
    captions = [item["caption"] for item in items]
    return Batch(
        images=torch.stack([item["image"] for item in items]),
        alt_ids=tokenizer(alts).long(),
        caption_ids=tokenizer(captions).long(),
        ids=[item["id"] for item in items],
        captions=captions,
        alt_texts=alts,
        granularities=[item["granularity"] for item in items],
    )
