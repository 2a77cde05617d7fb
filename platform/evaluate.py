"""Patch-text alignment on the built-in scenes: does a class name light up its own object?

The pointing game: for every object of every validation scene, take the patch most similar to
the object's class name ("red circle"); a hit is when that patch's centre lies on the object's
mask. Chance level is the mean share of the image each object covers, reported beside it, and
so is the share of best patches that land on *any* object of the scene: a model that finds
objects but not the named one scores high there and low on accuracy (an untrained ViT already
prefers the bright objects over the dark background).
This is the quantity TIPSv2's recipe (iBOT++, head-only EMA, distillation) is meant to raise.

`calibrated` plays the same game on scores relative to background prompts, as `tipslab search`
scores: each patch's cosine to a name minus its mean cosine to `retrieval.search.NULL_PROMPTS`.
Text embeddings share a direction, and a patch that is merely close to it (often the background)
otherwise wins for every name; segmentation's argmax over classes is blind to that offset, the
raw pointing game is not. Both are reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class PointingResult:
    accuracy: float
    chance: float
    any_object: float
    objects: int
    calibrated: float = float("nan")  # the same with scores relative to the background prompts


def patch_centres(grid: tuple[int, int], image_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Pixel (row, col) of each patch centre of an h×w grid laid over an H×W image."""
    (h, w), (height, width) = grid, image_size
    rows = ((np.arange(h) + 0.5) * height / h).astype(int)
    cols = ((np.arange(w) + 0.5) * width / w).astype(int)
    return rows, cols


def pointing_hit(similarity: np.ndarray, mask: np.ndarray) -> bool:
    """similarity [h, w] over patches, mask [H, W] of the object: is the best patch on it?"""
    rows, cols = patch_centres(similarity.shape, mask.shape)
    r, c = np.unravel_index(int(similarity.argmax()), similarity.shape)
    return bool(mask[rows[r], cols[c]])


@torch.no_grad()
def pointing_game(encoder, tokenizer, scenes, dense: bool = True, batch_size: int = 16,
                  null_prompts=None) -> PointingResult:
    """Pointing accuracy of `encoder` over a list of scenes (datamodules.scenes.Scene); `null_prompts`
    (default: the search's background prompts) are what `calibrated` scores are relative to."""
    from tipslab.retrieval.search import NULL_PROMPTS

    was_training = encoder.training
    encoder.eval()
    device = next((p.device for p in encoder.parameters()), torch.device("cpu"))
    names = sorted({obj.class_name for scene in scenes for obj in scene.objects})
    text = F.normalize(encoder.encode_text(tokenizer(names).to(device)), dim=-1)
    nulls = list(NULL_PROMPTS if null_prompts is None else null_prompts)
    null_mean = F.normalize(encoder.encode_text(tokenizer(nulls).to(device)), dim=-1).mean(dim=0)
    column = {name: i for i, name in enumerate(names)}
    hits, areas, any_hits, calibrated_hits = [], [], [], []
    for start in range(0, len(scenes), batch_size):
        chunk = scenes[start : start + batch_size]
        images = torch.stack([s.to_tensor() for s in chunk]).to(device)
        out = encoder.encode_image(images, dense=dense)
        patches = F.normalize(out.patches, dim=-1)
        sims = (patches @ text.T).reshape(len(chunk), *out.grid, len(names))
        background = (patches @ null_mean).reshape(len(chunk), *out.grid, 1)
        for scene, sim, base in zip(chunk, sims.cpu().numpy(), background.cpu().numpy()):
            union = np.logical_or.reduce([obj.mask for obj in scene.objects])
            relative = sim - base
            for obj in scene.objects:
                hits.append(pointing_hit(sim[..., column[obj.class_name]], obj.mask))
                calibrated_hits.append(pointing_hit(relative[..., column[obj.class_name]], obj.mask))
                any_hits.append(pointing_hit(sim[..., column[obj.class_name]], union))
                areas.append(float(obj.mask.mean()))
    encoder.train(was_training)
    if not hits:
        return PointingResult(accuracy=float("nan"), chance=float("nan"), any_object=float("nan"), objects=0)
    return PointingResult(accuracy=float(np.mean(hits)), chance=float(np.mean(areas)),
                          any_object=float(np.mean(any_hits)), objects=len(hits),
                          calibrated=float(np.mean(calibrated_hits)))
