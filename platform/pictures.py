"""Pictures a person would rather look at than read: a training batch with its captions, and
patch-text heatmaps (where in each image the model finds each object's name).
"""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tipslab.atomic import atomic_write_bytes


def _figure_bytes(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def batch_preview(images: torch.Tensor, captions: list[str], path: str | Path, limit: int = 8) -> Path:
    """A grid of the first training images with the caption each was contrasted with."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(limit, len(images))
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        ax = axes.flat[i]
        ax.imshow(images[i].detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy())
        ax.set_title("\n".join(textwrap.wrap(captions[i], 34)[:4]), fontsize=7)
    path = Path(path)
    atomic_write_bytes(path, _figure_bytes(fig))
    return path


@torch.no_grad()
def patch_text_heatmaps(encoder, tokenizer, images: torch.Tensor, labels: list[list[str]]) -> list[list[np.ndarray]]:
    """Each image's dense patch features scored against each of its labels as search scores them
    (cosine to the label minus mean cosine to the background prompts: raw cosines light up the
    background for every name), upsampled to the image size: [image][label] -> HxW array."""
    from tipslab.retrieval.search import NULL_PROMPTS

    was_training = encoder.training
    encoder.eval()
    out = encoder.encode_image(images, dense=True)
    patches = F.normalize(out.patches, dim=-1)
    h, w = out.grid
    nulls = F.normalize(encoder.encode_text(tokenizer(list(NULL_PROMPTS)).to(images.device)), dim=-1).mean(dim=0)
    maps = []
    for i, names in enumerate(labels):
        text = F.normalize(encoder.encode_text(tokenizer(names).to(images.device)), dim=-1) - nulls
        sims = (patches[i] @ text.T).T.reshape(len(names), 1, h, w)
        sims = F.interpolate(sims, size=images.shape[-2:], mode="bilinear", align_corners=False)
        maps.append([m[0].cpu().numpy() for m in sims])
    encoder.train(was_training)
    return maps


def heatmap_grid(images: torch.Tensor, labels: list[list[str]], maps, path: str | Path) -> Path:
    """One row per image: the image, then one heatmap per label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 1 + max(len(names) for names in labels)
    fig, axes = plt.subplots(len(images), cols, figsize=(2.6 * cols, 2.6 * len(images)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, names in enumerate(labels):
        picture = images[i].detach().float().permute(1, 2, 0).cpu().numpy()
        axes[i, 0].imshow(picture)
        axes[i, 0].set_title("image", fontsize=8)
        for j, name in enumerate(names):
            axes[i, j + 1].imshow(picture)
            axes[i, j + 1].imshow(maps[i][j], cmap="jet", alpha=0.5)
            axes[i, j + 1].set_title(name, fontsize=8)
    path = Path(path)
    atomic_write_bytes(path, _figure_bytes(fig))
    return path
