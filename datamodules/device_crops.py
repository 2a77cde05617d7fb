"""Crops cut on the device: a worker ships each decoded picture with its views' boxes, and the
device cuts all of a batch's views in one `torchvision.ops.roi_align` call per view size.

Why: DINOv2's multi-crop (2 global + 8 local views a sample) costs a CPU worker ten antialiased
resizes, more than decoding the JPEG (docs/SCALE.md, "Data loading"); on a GPU they are two
kernel calls a batch. The boxes and flips are drawn in the worker exactly as for CPU crops
(`GlobalCrop.draw`), so seeds, captions and masks are the same either way. The pixels differ
from the CPU path's antialiased resize by resampling detail: roi_align averages
``ceil(box / output)`` bilinear samples per output pixel and axis, an area filter when it
shrinks and plain bilinear when it enlarges, as the antialiased resize is.

What travels is each picture at its decoded size: a JPEG larger than its views need is
DCT-scaled (``data.decode_draft``) to within 2x of what its smallest possible view needs: with
DINOv2's ViT-B views a JPEG of 1 to 64 Mpx decodes to 0.26-1.02 Mpx (a 400 x 300 picture is
360 KB, its ten uint8 crops 531 KB); other formats travel at full size. The device holds a
batch's canvas as float for the cut (4 bytes a pixel, freed after).

``data.crops_on_device`` (auto: on a CUDA trainer, multi-crop) turns it on;
`Batch.with_float_pixels` renders the views after the transfer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from tipslab.datamodules.encoded_jpeg import EncodedJpeg, decode_jpegs
from tipslab.datamodules.transforms import CropPlan, as_float


@dataclass
class DeferredViews:
    """A batch's views before they are cut (``V = num_global + num_local`` per sample)."""

    # uint8 (float for scenes) [B, 3, H, W]: each picture at the top left, its right and bottom edges
    # repeated one pixel, zeros beyond (`paste`); None while some pictures are still JPEG bytes
    sources: torch.Tensor | None
    boxes: torch.Tensor  # float32 [B, V, 4]: (x1, y1, x2, y2) of each view in its picture's pixels
    flips: torch.Tensor  # bool [B, V]
    global_size: int
    local_size: int
    num_global: int
    num_local: int
    # With ``sources`` None: each sample's `EncodedJpeg` (decoded on the device, its bytes stay in
    # host memory, where the decoder reads them) or decoded uint8 [3, h, w] picture.
    pictures: list | None = None

    def map(self, fn) -> DeferredViews:
        """A copy with ``fn`` applied to every tensor (`Batch.to`, `Batch.pin_memory`)."""
        pictures = None if self.pictures is None else [
            p if isinstance(p, EncodedJpeg) else fn(p) for p in self.pictures]
        sources = None if self.sources is None else fn(self.sources)
        return replace(self, sources=sources, boxes=fn(self.boxes), flips=fn(self.flips), pictures=pictures)


def pack_views(sources: list, plans: list[list[CropPlan]], num_global: int) -> DeferredViews:
    """One `DeferredViews` from each sample's decoded picture ``[3, h, w]`` (uint8, or float in
    [0, 1]) or `EncodedJpeg` and its views' plans (global views first, then local), all samples
    with the same views. Decoded pictures are pasted on one canvas here, unless a JPEG waits for
    the device: then all are pasted there, after it is decoded (`render_views`)."""
    encoded = any(isinstance(s, EncodedJpeg) for s in sources)
    boxes = torch.tensor([[(p.left, p.top, p.left + p.width, p.top + p.height) for p in views] for views in plans],
                         dtype=torch.float32)
    flips = torch.tensor([[p.flipped for p in views] for views in plans], dtype=torch.bool)
    first = plans[0]
    local = first[num_global:]
    return DeferredViews(None if encoded else paste(sources), boxes, flips, global_size=first[0].size,
                         local_size=local[0].size if local else 0, num_global=num_global, num_local=len(local),
                         pictures=list(sources) if encoded else None)


def paste(sources: list[torch.Tensor]) -> torch.Tensor:
    """``[B, 3, H, W]`` (channels-last strides) of pictures ``[3, h, w]`` of any sizes, on their
    device: each at the top left, its right and bottom edges repeated one pixel, zeros beyond."""
    height = max(int(s.shape[-2]) for s in sources)
    width = max(int(s.shape[-1]) for s in sources)
    # Channels last: a decoded picture is height x width x 3 in memory (`to_tensor` gives a permuted
    # view of it), so each copy below is contiguous rows, not a transpose (5x faster at 800 x 600).
    canvas = torch.empty(len(sources), height, width, 3, dtype=sources[0].dtype,  # uint8, or float (scenes)
                         device=sources[0].device)
    for i, pixels in enumerate(sources):
        h, w = pixels.shape[-2:]
        canvas[i, :h, :w] = pixels.permute(1, 2, 0)
        # The edge repeated one pixel into the padding: a view at a picture's bottom or right edge has
        # its last bilinear samples between the edge pixel and the next one (weight < 1/2; never
        # further, see `_cut`), which must be the edge again, as the CPU resize repeats its crop's
        # edge. One row and one column, not the whole padding: repeating a pixel across a wide
        # margin is a broadcast copy torch runs 3 bytes at a time (50 ms a batch of 800 x 600
        # pictures with half of them 400 x 300, against 1 ms for the pictures themselves).
        if w < width:
            canvas[i, :h, w] = canvas[i, :h, w - 1]
            canvas[i, :h, w + 1:] = 0  # never read: zeros, not whatever the memory held
        if h < height:
            canvas[i, h, :min(w + 1, width)] = canvas[i, h - 1, :min(w + 1, width)]
            canvas[i, h, w + 1:] = 0
            canvas[i, h + 1:] = 0
    return canvas.permute(0, 3, 1, 2)  # [B, 3, H, W] with channels-last strides


def render_views(views: DeferredViews) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(global_crops [G, B, 3, S, S], local_crops [L, B, 3, s, s] or None)``, float in [0, 1],
    on the device the views are on; JPEGs left encoded are decoded there first, in one call."""
    sources = views.sources
    if sources is None:
        device = views.boxes.device
        decoded = iter(decode_jpegs([p for p in views.pictures if isinstance(p, EncodedJpeg)], device))
        sources = paste([next(decoded) if isinstance(p, EncodedJpeg) else p.to(device) for p in views.pictures])
    pixels = as_float(sources.contiguous())  # NCHW before the float copy: roi_align wants it
    global_crops = _cut(pixels, views.boxes[:, :views.num_global], views.flips[:, :views.num_global], views.global_size)
    local_crops = None
    if views.num_local:
        local_crops = _cut(pixels, views.boxes[:, views.num_global:], views.flips[:, views.num_global:],
                           views.local_size)
    return global_crops, local_crops


def _cut(pixels: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, size: int) -> torch.Tensor:
    from torchvision.ops import roi_align

    batch, count = boxes.shape[:2]
    owner = torch.arange(batch, device=boxes.device, dtype=boxes.dtype).repeat_interleave(count)
    rois = torch.cat([owner[:, None], boxes.reshape(-1, 4)], dim=1)
    # aligned=True: a box (x1, y1, x2, y2) covers pixels x1..x2-1 whole (pixel i spans [i, i+1)), as a
    # crop of the same box would; sampling_ratio=-1: ceil(box / size) samples per output pixel. The
    # samples lie strictly inside the box, so in pixel-centre coordinates below x2 - 1/2: bilinear
    # weights then reach column x2 at most (the one-pixel border `pack_views` repeats).
    out = roi_align(pixels, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    out = torch.where(flips.reshape(-1, 1, 1, 1), out.flip(-1), out)
    return out.view(batch, count, *out.shape[1:]).transpose(0, 1).contiguous()  # crop-major, as `collate`'s
