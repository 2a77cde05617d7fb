"""`Batch`: what the pretraining system receives each step, and `collate` that builds one.

Fields follow the contract in docs/ARCHITECTURE.md: images are float ``[B, 3, H, W]`` in
``[0, 1]`` (raw pixels, no mean/std), ``alt_ids`` are CLS1's alt-text tokens, ``caption_ids``
CLS2's caption tokens (one granularity sampled per sample per step), pad id 0.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from tipslab.datamodules.device_crops import DeferredViews, pack_views, render_views
from tipslab.datamodules.transforms import as_float


@dataclass
class Batch:
    # float [B, 3, H, W] in [0, 1] (uint8 0..255 between a trainer's loader and device; None while
    # the views are `deferred`, until `with_float_pixels` cuts them on the device)
    images: torch.Tensor | None
    alt_ids: torch.Tensor  # long [B, L]: CLS1's text (alt-text)
    caption_ids: torch.Tensor  # long [B, L]: CLS2's text (sampled richer caption)
    ids: list[str]  # sample ids, as the source names them
    # Multi-crop views (DINOv2): global crops [G, B, 3, H, W] (global_crops[0] is `images`, the
    # view the captions describe), local crops [L, B, 3, h, w]; None when the data makes none.
    global_crops: torch.Tensor | None = None
    local_crops: torch.Tensor | None = None
    masks: torch.Tensor | None = None  # bool [G, B, N]: patches of each global crop to mask (iBOT)
    captions: list[str] | None = None  # CLS2's caption texts, as sampled
    alt_texts: list[str] | None = None  # CLS1's texts
    granularities: list[str] | None = None  # which granularity each caption came from
    # Hard negatives (data.hard_negatives): each text with one word swapped, [B, L] like the texts
    # they twin; `negative_valid` bool [2, B] (alt, caption): False where a text had no word to swap.
    alt_negative_ids: torch.Tensor | None = None
    caption_negative_ids: torch.Tensor | None = None
    negative_valid: torch.Tensor | None = None
    # Samples read, skipped and converted by kind since the worker's previous batch
    # (`sample_quality.SkipCounter.take()`); the loader adds them up.
    data_counts: dict | None = None
    # ``data.crops_on_device``: the decoded pictures and their views' boxes, cut on the device
    # (`device_crops.py`); images, global_crops and local_crops are None until then.
    deferred: DeferredViews | None = None

    @property
    def num_global(self) -> int:
        if self.deferred is not None:
            return self.deferred.num_global
        return 1 if self.global_crops is None else int(self.global_crops.shape[0])

    @property
    def num_local(self) -> int:
        if self.deferred is not None:
            return self.deferred.num_local
        return 0 if self.local_crops is None else int(self.local_crops.shape[0])

    def to(self, device, non_blocking: bool = False) -> Batch:
        """A copy with every tensor on ``device`` (lists of strings stay as they are)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def _map(self, fn) -> Batch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor) and not (name == "images" and self.global_crops is not None):
                moved[name] = fn(value)
        if self.global_crops is not None:  # `images` stays a view of the first global crop, not a copy
            moved["images"] = moved["global_crops"][0]
        if self.deferred is not None:
            moved["deferred"] = self.deferred.map(fn)
        return replace(self, **moved)

    def with_float_pixels(self) -> Batch:
        """A copy whose uint8 views (a trainer's batches, see `collate`) are float in [0, 1]: done
        on the device, after the transfer (4x fewer bytes to move, no CPU pass over the floats).
        `deferred` views are cut here (`device_crops.render_views`)."""
        batch = self
        if self.deferred is not None:
            global_crops, local_crops = render_views(self.deferred)
            batch = replace(self, images=global_crops[0], global_crops=global_crops, local_crops=local_crops,
                            deferred=None)
        return batch._map(lambda t: as_float(t) if t.dtype == torch.uint8 else t)

    def pin_memory(self) -> Batch:
        # DataLoader(pin_memory=True) calls this on custom batch types.
        return self._map(lambda t: t.pin_memory())


def crop_major(per_item: list[list[torch.Tensor]], to_float: bool = True) -> torch.Tensor:
    """``[V, B, ...]`` of ``B`` items' lists of ``V`` views, in one copy: crop-major, so view ``v``
    of the whole batch is one contiguous slice; uint8 views become float in [0, 1] here, once per
    batch (per crop it cost more than the resize, see bench/bench_data.py), unless ``to_float``
    is False (they stay uint8 for `Batch.with_float_pixels` on the device)."""
    count, size = len(per_item[0]), len(per_item)
    stacked = torch.stack([view for views in zip(*per_item) for view in views])
    stacked = stacked.view(count, size, *stacked.shape[1:])
    return as_float(stacked) if to_float and stacked.dtype != torch.bool else stacked  # masks stay bool


def collate(items: list[dict], tokenizer, to_float: bool = True) -> Batch:
    """A Batch of processed items (``image``, ``alt``, ``caption``, ``granularity``, ``id``, and,
    when the data makes them, ``globals``, ``locals`` and ``masks`` lists per item). Views may be
    uint8 (crops of decoded images) or float in [0, 1]; the batch's are float, or, with
    ``to_float=False``, uint8 views stay uint8 (a trainer converts them on the device)."""
    alts = [item["alt"] for item in items]
    captions = [item["caption"] for item in items]
    global_crops = local_crops = masks = deferred = None
    if "plans" in items[0]:  # crops on the device: pictures and boxes travel, views are cut there
        deferred = pack_views([i["source"] for i in items], [i["plans"] for i in items], items[0]["num_global"])
    elif "globals" in items[0]:
        global_crops = crop_major([i["globals"] for i in items], to_float)
        if items[0]["locals"]:
            local_crops = crop_major([i["locals"] for i in items], to_float)
    if "masks" in items[0]:
        masks = crop_major([i["masks"] for i in items])
    negatives = {}
    if "alt_negative" in items[0]:
        alt_neg, caption_neg = [i["alt_negative"] for i in items], [i["caption_negative"] for i in items]
        negatives = dict(alt_negative_ids=tokenizer(alt_neg).long(), caption_negative_ids=tokenizer(caption_neg).long(),
                         negative_valid=torch.tensor([[bool(t) for t in alt_neg], [bool(t) for t in caption_neg]]))
    if deferred is not None:
        images = None
    elif global_crops is not None:
        images = global_crops[0]
    else:
        images = crop_major([[i["image"]] for i in items], to_float)[0]
    return Batch(
        images=images,
        alt_ids=tokenizer(alts).long(),
        caption_ids=tokenizer(captions).long(),
        ids=[item["id"] for item in items],
        global_crops=global_crops,
        local_crops=local_crops,
        masks=masks,
        captions=captions,
        alt_texts=alts,
        granularities=[item["granularity"] for item in items],
        deferred=deferred,
        **negatives,
    )
