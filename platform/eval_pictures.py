"""Pictures of an evaluation, written as PNGs (and logged to MLflow by the caller):

- `pca_picture`: the first three principal components of the patch features as RGB, one PCA fitted
  over all the shown images together (as on the TIPSv2 project page), beside each image;
- `segmentation_picture`: image, ground truth and zero-shot prediction, coloured by class, with a
  legend of the classes that appear;
- `query_heatmaps`: a grid of patch-text heatmaps (`pictures.heatmap_grid`) for each image's objects;
- `curves_picture`: the loss and the evaluation metrics of an MLflow run over training steps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tipslab.atomic import atomic_write_bytes
from tipslab.platform.pictures import _figure_bytes


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _rgb(image: torch.Tensor) -> np.ndarray:
    return image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()


@torch.no_grad()
def pca_rgb(patches: torch.Tensor) -> torch.Tensor:
    """[B, h, w, D] features -> [B, h, w, 3] in [0, 1]: a joint 3-component PCA, each component
    min-max scaled over all images (so colours mean the same thing across the row)."""
    b, h, w, d = patches.shape
    flat = F.normalize(patches.reshape(-1, d).float(), dim=-1)
    flat = flat - flat.mean(dim=0, keepdim=True)
    _, _, v = torch.pca_lowrank(flat, q=min(3, d), center=False, niter=4)
    proj = flat @ v[:, :3]
    lo, hi = proj.quantile(0.01, dim=0), proj.quantile(0.99, dim=0)
    proj = ((proj - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)
    return proj.reshape(b, h, w, -1)


@torch.no_grad()
def pca_picture(encoder, images: torch.Tensor, path: str | Path, title: str = "") -> Path:
    """Each image above the PCA colouring of its final patch features (and of the dense ones)."""
    plt = _plt()
    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    rows = []
    for dense in (False, True):
        out = encoder.encode_image(images.to(device), dense=dense)
        rows.append(pca_rgb(out.patches.reshape(len(images), *out.grid, -1)).cpu())
    encoder.train(was_training)
    n = len(images)
    fig, axes = plt.subplots(3, n, figsize=(2.2 * n, 6.9), squeeze=False)
    for i in range(n):
        axes[0, i].imshow(_rgb(images[i]))
        axes[1, i].imshow(rows[0][i].numpy(), interpolation="bilinear")
        axes[2, i].imshow(rows[1][i].numpy(), interpolation="bilinear")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_ylabel("image")
    axes[1, 0].set_ylabel("PCA, final patches")
    axes[2, 0].set_ylabel("PCA, dense (value path)")
    fig.suptitle(title or "patch features: first 3 principal components as RGB", fontsize=10)
    path = Path(path)
    atomic_write_bytes(path, _figure_bytes(fig))
    return path


def _palette(count: int) -> np.ndarray:
    """`count` colours that stay apart: tab20 up to 20, else evenly spaced hues."""
    plt = _plt()
    if count <= 20:
        cmap = plt.get_cmap("tab20")
        order = list(range(0, 20, 2)) + list(range(1, 20, 2))  # the strong shades first
        return np.array([cmap(order[i])[:3] for i in range(count)], dtype=np.float32)
    return np.array([plt.get_cmap("hsv")(i / count)[:3] for i in range(count)], dtype=np.float32)


def segmentation_picture(examples, class_names: list[str], ignore_index: int, path: str | Path,
                         title: str = "") -> Path:
    """Rows of (image, ground truth, prediction) with the classes that appear in a legend.

    Colours are given only to the classes in the picture, so they stay distinguishable. Ground
    truth is drawn in flat colours over a darkened image (ignored pixels stay dark); the
    prediction covers every pixel, ignored ones included, since the model is asked about them too.
    """
    plt = _plt()
    from matplotlib.patches import Patch

    shown = sorted({int(v) for _, label, pred in examples for values in (label, pred)
                    for v in torch.unique(values).tolist() if v != ignore_index})
    colour_of = dict(zip(shown, _palette(len(shown))))
    lut = np.zeros((max(shown + [0]) + 1, 3), dtype=np.float32)
    for c, colour in colour_of.items():
        lut[c] = colour
    fig, axes = plt.subplots(len(examples), 3, figsize=(9.5, 3.1 * len(examples)), squeeze=False)
    for row, (image, label, pred) in enumerate(examples):
        picture = _rgb(image)
        if picture.shape[:2] != tuple(label.shape):  # labels keep their size; show the image at it
            picture = _rgb(F.interpolate(image[None], size=tuple(label.shape), mode="bilinear")[0])
        gt = label.numpy()
        valid = gt != ignore_index
        axes[row, 0].imshow(picture)
        axes[row, 1].imshow(np.where(valid[..., None], 0.15 * picture + 0.85 * lut[np.where(valid, gt, 0)],
                                     0.4 * picture))
        p = pred.numpy()
        axes[row, 2].imshow(0.3 * picture + 0.7 * lut[p])
        for col, name in enumerate(("image", "ground truth", "zero-shot prediction")):
            axes[row, col].set_title(name, fontsize=9)
    for ax in axes.flat:
        ax.axis("off")
    handles = [Patch(color=colour_of[c], label=class_names[c]) for c in shown]
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False,
               title="classes", ncol=1 if len(handles) <= 30 else 2)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    atomic_write_bytes(path, _figure_bytes(fig))
    return path


def query_heatmaps(encoder, tokenizer, scenes, path: str | Path) -> Path:
    """Patch-text heatmaps for the objects of a few scenes (each object's class name)."""
    from tipslab.platform.pictures import heatmap_grid, patch_text_heatmaps

    device = next(encoder.parameters()).device
    images = torch.stack([s.to_tensor() for s in scenes]).to(device)
    labels = [list(dict.fromkeys(s.class_names))[:3] for s in scenes]
    maps = patch_text_heatmaps(encoder, tokenizer, images, labels)
    return heatmap_grid(images, labels, maps, path)


# The evaluation panel shows one headline number per suite (all in %), not every metric.
HEADLINE_METRICS = {
    ("zeroshot_seg", "dense", "mIoU"): "zero-shot seg mIoU",
    ("retrieval", "cls2", "t2i_R1"): "retrieval CLS2 t2i R@1",
    ("classification", "cls1", "top1"): "zero-shot cls top-1 (CLS1)",
    ("knn", "cls1", "top1"): "k-NN top-1 (CLS1)",
    ("regions", "index_Flat", "R5"): "region search R@5 (exact)",
}


def _headline(key: str) -> str | None:
    """The legend label of a headline metric name (`EvalReport.metrics()` naming), else None."""
    if key == "eval/pointing_acc_dense":
        return "pointing game (dense) x100"
    parts = key.split("/")
    if len(parts) != 5:
        return None
    _, suite, data, variant, metric = parts
    label = HEADLINE_METRICS.get((suite, variant, metric))
    return label if label is None or data == "scenes" else f"{label} ({data})"


def curves_picture(tracking_uri: str, run_id: str, path: str | Path) -> Path | None:
    """Training losses and the headline evaluation numbers of an MLflow run against the step;
    None when the run logged no training loss."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    keys = sorted(client.get_run(run_id).data.metrics)
    loss_keys = [k for k in keys if k.startswith("train/") and "loss" in k]
    eval_keys = {k: _headline(k) for k in keys if k.startswith("eval/") and _headline(k)}
    if not loss_keys:
        return None
    plt = _plt()
    panels = 1 + bool(eval_keys)
    fig, axes = plt.subplots(1, panels, figsize=(6.0 * panels, 3.8), squeeze=False)
    for key in loss_keys:
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        axes[0, 0].plot([s for s, _ in history], [v for _, v in history], label=key.removeprefix("train/"), lw=1.2)
    axes[0, 0].set_xlabel("step")
    axes[0, 0].set_title("training losses", fontsize=10)
    axes[0, 0].legend(fontsize=7)
    if eval_keys:
        ax = axes[0, 1]
        for key, label in eval_keys.items():
            scale = 100.0 if key.startswith("eval/pointing") else 1.0
            history = sorted((m.step, m.value * scale) for m in client.get_metric_history(run_id, key))
            ax.plot([s for s, _ in history], [v for _, v in history], "o-", label=label, ms=4, lw=1)
        ax.set_xlim(axes[0, 0].get_xlim())  # the same steps as the losses: a lone end point sits at the end
        ax.set_xlabel("step")
        ax.set_ylabel("%")
        ax.set_title("evaluation (scenes val)", fontsize=10)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    path = Path(path)
    atomic_write_bytes(path, _figure_bytes(fig))
    return path
