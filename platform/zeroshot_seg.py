"""Zero-shot semantic segmentation, step for step as the official TIPS notebook
(`pytorch/TIPS_zeroshot_segmentation.ipynb`, google-deepmind/tips):

1. text: each class name written into the 9 TCL prompt templates, each embedding L2-normalised,
   their mean renormalised;
2. image: short side resized bicubically (PIL) to `short_side` (448 for the real benchmarks);
3. sliding windows of `window` pixels with `stride` (448 / 336): windows start every `stride`
   pixels and the last one is shifted back to end at the border, so every pixel is covered;
4. per window: dense value-path patch features (`encode_image(dense=True)`, the MaskCLIP trick),
   L2-normalised; cosine with every class; bilinear upsampling to the window; softmax over
   classes; summed into the image and divided by the number of windows covering each pixel;
5. the class-probability map upsampled bilinearly to the label map's size, argmax;
6. mIoU from one confusion matrix over the dataset (`eval_metrics.SegmentationMeter`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

# The TCL paper's templates (khanrc/tcl datasets/templates.py), as the official notebook uses them:
# 7 of CLIP's ImageNet prompts plus two plural ones.
TCL_TEMPLATES = (
    "itap of a {}.",
    "a bad photo of a {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
    "a photo of many {}.",
    "a photo of {}s.",
)


def _device(encoder) -> torch.device:
    return next((p.device for p in encoder.parameters()), torch.device("cpu"))


@torch.no_grad()
def class_text_embeddings(encoder, tokenizer, class_names: Sequence[str],
                          templates: Sequence[str] = TCL_TEMPLATES) -> torch.Tensor:
    """[C, D] L2-normalised: the mean of the normalised template embeddings, renormalised."""
    prompts = [t.format(name) for name in class_names for t in templates]
    device = _device(encoder)
    chunks = [encoder.encode_text(tokenizer(prompts[i : i + 256]).to(device)).float()
              for i in range(0, len(prompts), 256)]
    emb = F.normalize(torch.cat(chunks), dim=-1).reshape(len(class_names), len(templates), -1)
    return F.normalize(emb.mean(dim=1), dim=-1)


def short_side_resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """[3, H, W] -> short side `size`, long side int(size * long / short), bicubic on the 8-bit
    picture with PIL, as the notebook's ShortSideResize does before ToTensor (images come from
    8-bit files, so the round trip through uint8 loses nothing)."""
    from PIL import Image

    _, h, w = image.shape
    if min(h, w) == size:
        return image
    new_h, new_w = (int(size * h / w), size) if w < h else (size, int(size * w / h))
    pixels = image.mul(255).round().clamp(0, 255).byte().permute(1, 2, 0).cpu().numpy()
    resized = Image.fromarray(pixels).resize((new_w, new_h), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1).float().div_(255.0)


def window_origins(length: int, window: int, stride: int) -> list[int]:
    """Start offsets of the windows along one side (the notebook's / mmseg's slide rule)."""
    count = max(length - window + stride - 1, 0) // stride + 1
    return [max(min(i * stride + window, length) - window, 0) for i in range(count)]


@torch.no_grad()
def window_cosines(encoder, window: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """[3, h, w] window -> [C, h, w] cosine of the dense patch features with each class,
    upsampled bilinearly. A window whose sides are not multiples of the patch size is first
    resized up to the next multiples (bicubic, as the notebook)."""
    patch = 14
    _, h, w = window.shape
    sized = (-(-h // patch) * patch, -(-w // patch) * patch)
    x = window[None]
    if sized != (h, w):
        x = F.interpolate(x, size=sized, mode="bicubic", align_corners=False)
    out = encoder.encode_image(x, dense=True)
    feats = F.normalize(out.patches[0].float(), dim=-1)  # [N, D]
    cos = (text @ feats.T).reshape(len(text), *out.grid)
    return F.interpolate(cos[None], size=(h, w), mode="bilinear", align_corners=False)[0]


@torch.no_grad()
def predict_slide(encoder, image: torch.Tensor, text: torch.Tensor, window: int, stride: int) -> torch.Tensor:
    """[3, H, W] -> [C, H, W] class probabilities averaged over the windows covering each pixel."""
    _, height, width = image.shape
    probs = torch.zeros(len(text), height, width, device=image.device)
    counts = torch.zeros(height, width, device=image.device)
    for y in window_origins(height, window, stride):
        for x in window_origins(width, window, stride):
            crop = image[:, y : y + window, x : x + window]
            probs[:, y : y + crop.shape[1], x : x + crop.shape[2]] += window_cosines(encoder, crop, text).softmax(0)
            counts[y : y + crop.shape[1], x : x + crop.shape[2]] += 1
    return probs / counts


@torch.no_grad()
def segment(encoder, image: torch.Tensor, text: torch.Tensor, label_size: tuple[int, int], *,
            short_side: int | None, window: int, stride: int) -> torch.Tensor:
    """One image [3, H, W] in [0, 1] -> predicted label map [label_h, label_w] (long)."""
    if short_side:
        image = short_side_resize(image, short_side)
    probs = predict_slide(encoder, image.to(_device(encoder)), text, window, stride)
    probs = F.interpolate(probs[None], size=tuple(label_size), mode="bilinear", align_corners=False)[0]
    return probs.argmax(0).cpu()


@torch.no_grad()
def evaluate_segmentation(encoder, tokenizer, dataset, *, short_side: int | None, window: int, stride: int,
                          templates: Sequence[str] = TCL_TEMPLATES, keep: int = 0) -> dict:
    """mIoU of `dataset` (a `seg_folder` dataset: `.class_names`, `.ignore_index`, items
    `(image [3,H,W] float, label [H', W'] long)`). Returns {"miou", "pixel_acc", "images",
    "examples": the first `keep` (image, label, prediction) triples for pictures}."""
    from tipslab.platform.eval_metrics import SegmentationMeter

    was_training = encoder.training
    encoder.eval()
    text = class_text_embeddings(encoder, tokenizer, dataset.class_names, templates)
    meter = SegmentationMeter(len(dataset.class_names), dataset.ignore_index)
    examples = []
    for i in range(len(dataset)):
        image, label = dataset[i]
        pred = segment(encoder, image, text, label.shape, short_side=short_side, window=window, stride=stride)
        meter.update(pred, label)
        if len(examples) < keep:
            examples.append((image, label, pred))
    encoder.train(was_training)
    return {"miou": meter.miou(), "pixel_acc": meter.pixel_accuracy(), "images": len(dataset), "examples": examples}
