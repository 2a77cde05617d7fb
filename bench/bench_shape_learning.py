"""Shape-learning probe: how many steps does the tiny vision tower need to see shape in its patches?

The CPU recipes stall below the region-recall target because the scenes' classes are colour +
shape and, at the demo's budget, the patches carry colour but not shape (docs/RECIPE.md, "Why 50%
region recall is out of reach here"). This script asks the question with the most direct signal
there is: the tower and a linear head trained with *supervised per-patch labels* (the shape and
the colour of the object covering each 14-px patch, from the scenes' masks), then per-patch
accuracy on held-out scenes, on the patches that lie on an object, against the majority class.

Each run is ``stem:steps``. ``patch`` is the tower as the official architecture builds it (timm's
14-px patch embedding); ``conv`` the tower with ``model.vision.stem: conv`` (modules/conv_stem.py);
``cnn`` no transformer at all, a plain CNN (a deeper, full-resolution relative of that stem, with
batch norm), the reference for how fast shape can be learned from these labels. Built here only: ``overlap`` a 28-px kernel
at stride 14 (each token sees its neighbours' borders) and ``convstem`` three convolutions down to
stride 14, a single 7x7 at stride 7 last (Xiao et al., "Early convolutions help transformers see
better").

    python bench/bench_shape_learning.py                          # ~15 min on 2 cores
    python bench/bench_shape_learning.py --runs patch:300 --threads 1

Never asserted in tests; the numbers move a few points with the seed.
"""

from __future__ import annotations

import argparse
import os
import time
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

COVERAGE = 0.3  # a patch belongs to the object covering the largest share of it, if at least this
BACKGROUND = 7  # the label after the seven shapes / seven colours


def patch_labels(scene, grid: int, patch: int) -> tuple[np.ndarray, np.ndarray]:
    """``(shape, colour)`` label per patch, row-major, `BACKGROUND` where no object covers enough."""
    from tipslab.datamodules.scenes import COLOURS, SHAPES

    shape = np.full((grid, grid), BACKGROUND)
    colour = np.full((grid, grid), BACKGROUND)
    best = np.zeros((grid, grid))
    for obj in scene.objects:
        cover = obj.mask.reshape(grid, patch, grid, patch).mean((1, 3))
        wins = (cover > best) & (cover >= COVERAGE)
        shape[wins], colour[wins], best[wins] = SHAPES.index(obj.shape), list(COLOURS).index(obj.colour), cover[wins]
    return shape.reshape(-1), colour.reshape(-1)


def scenes_batch(seed: int, start: int, count: int, image_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from tipslab.datamodules.scenes import generate_scene
    from tipslab.modules.vision import PATCH_SIZE

    scenes = [generate_scene(seed, i, image_size) for i in range(start, start + count)]
    labels = [patch_labels(s, image_size // PATCH_SIZE, PATCH_SIZE) for s in scenes]
    return (torch.stack([s.to_tensor() for s in scenes]), torch.from_numpy(np.stack([lab[0] for lab in labels])),
            torch.from_numpy(np.stack([lab[1] for lab in labels])))


def tower(stem: str, image_size: int) -> nn.Module:
    from tipslab.modules.vision import VisionTower

    model = VisionTower("tiny", image_size)
    width = model.embed_dim
    if stem == "overlap":
        model.vit.patch_embed.proj = nn.Conv2d(3, width, kernel_size=28, stride=14, padding=7)
    elif stem == "convstem":
        model.vit.patch_embed.proj = nn.Sequential(
            nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(32, 64, 3, stride=1, padding=1), nn.GELU(),
            nn.Conv2d(64, width, 7, stride=7))
    elif stem == "conv":
        model = VisionTower("tiny", image_size, stem="conv")
    elif stem == "cnn":
        model = PlainCNN(width)
    elif stem != "patch":
        raise SystemExit(f"unknown stem {stem!r}; expected patch, conv, cnn, overlap or convstem")
    return model


class PlainCNN(nn.Module):
    """Six 3x3 convolutions to stride 4 with batch norm, pooled to the 14-px grid, one more 3x3:
    per-patch features with a CNN's locality and nothing else."""

    def __init__(self, width: int):
        super().__init__()

        def conv(inputs: int, outputs: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(inputs, outputs, 3, stride=stride, padding=1), nn.BatchNorm2d(outputs), nn.ReLU()]

        self.embed_dim = width
        self.features = nn.Sequential(*conv(3, 32, 1), *conv(32, 64, 2), *conv(64, 96, 1), *conv(96, 128, 2),
                                      *conv(128, width, 1), *conv(width, width, 1))
        self.mix = nn.Sequential(*conv(width, width, 1))

    def forward(self, images: torch.Tensor) -> SimpleNamespace:
        from tipslab.modules.vision import PATCH_SIZE

        grid = (images.shape[-2] // PATCH_SIZE, images.shape[-1] // PATCH_SIZE)
        pooled = nn.functional.adaptive_avg_pool2d(self.features(images), grid)
        return SimpleNamespace(patches=self.mix(pooled).flatten(2).transpose(1, 2))  # as VisionOutput.patches


def train_and_score(stem: str, steps: int, args) -> dict:
    torch.manual_seed(args.seed)
    model = tower(stem, args.image_size)
    head = nn.Linear(model.embed_dim, 2 * (BACKGROUND + 1))  # shape logits, then colour logits
    params = [*model.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    k = BACKGROUND + 1
    start = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:  # the demo's linear warm-up, then constant
            group["lr"] = args.lr * min(1.0, (step + 1) / args.warmup)
        images, shapes, colours = scenes_batch(args.seed + 1, step * args.batch, args.batch, args.image_size)
        logits = head(model(images).patches)
        loss = (nn.functional.cross_entropy(logits[..., :k].reshape(-1, k), shapes.reshape(-1))
                + nn.functional.cross_entropy(logits[..., k:].reshape(-1, k), colours.reshape(-1)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    images, shapes, colours = scenes_batch(args.seed + 1000, 0, args.val, args.image_size)
    model.eval()
    with torch.no_grad():
        logits = head(model(images).patches)
    on_object = shapes != BACKGROUND
    return {
        "shape": (logits[..., :k].argmax(-1) == shapes)[on_object].float().mean().item(),
        "shape_majority": max((shapes[on_object] == c).float().mean().item() for c in range(BACKGROUND)),
        "colour": (logits[..., k:].argmax(-1) == colours)[on_object].float().mean().item(),
        "colour_majority": max((colours[on_object] == c).float().mean().item() for c in range(BACKGROUND)),
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="patch:300,conv:300,cnn:300,patch:1000",
                        help="comma-separated stem:steps")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=15)
    parser.add_argument("--val", type=int, default=256, help="held-out scenes scored")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runs = [(stem, int(steps)) for stem, steps in (r.split(":") for r in args.runs.split(","))]
    print(f"tiny tower, {args.image_size} px, batch {args.batch}, AdamW lr {args.lr}; per-patch accuracy on "
          f"the object patches of {args.val} held-out scenes (%)")
    print(f"{'stem':9s} {'steps':>5s} {'shape':>6s} {'majority':>8s} {'colour':>6s} {'majority':>8s} {'train s':>7s}")
    for stem, steps in runs:
        r = train_and_score(stem, steps, args)
        print(f"{stem:9s} {steps:5d} {100 * r['shape']:6.1f} {100 * r['shape_majority']:8.1f} "
              f"{100 * r['colour']:6.1f} {100 * r['colour_majority']:8.1f} {r['seconds']:7.0f}", flush=True)


if __name__ == "__main__":
    main()
