"""The numbers of `tipslab eval`, kept apart from the models so they can be checked by hand.

- `SegmentationMeter`: dataset-level mIoU from one confusion matrix accumulated over all images
  (torchmetrics' `MulticlassJaccardIndex`, macro average). A class counts only when it occurs in
  the labels or the predictions: torchmetrics' macro weights drop classes whose union is empty,
  which is exactly the official TIPS notebook's `iou[union > 0].mean()`. Pixels labelled with
  the ignore index count nowhere.
- `retrieval_recalls`: image->text and text->image R@k from a similarity matrix and the image
  each text belongs to (several captions per image, as in the Karpathy splits).
- `knn_accuracy`: the weighted k-NN classifier of DINO / TIPS (cosine similarity, votes weighted
  by exp(sim / T), T = 0.07) on L2-normalised features.
"""

from __future__ import annotations

import torch

from tipslab.errors import TipslabError


class SegmentationMeter:
    """Accumulates predicted and true label maps; `miou()` in percent (0-100)."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        from torchmetrics.classification import MulticlassJaccardIndex

        if 0 <= ignore_index < num_classes:
            raise TipslabError(f"ignore_index {ignore_index} is a class id (there are {num_classes} classes)")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        # validate_args off: it would reject label values outside [0, C) that are the ignore index.
        # sync_on_compute off: one process evaluates (rank zero under DDP/FSDP); torchmetrics would
        # otherwise wait for the other ranks' states inside a distributed run.
        self.metric = MulticlassJaccardIndex(num_classes, average="macro", ignore_index=ignore_index,
                                             validate_args=False, sync_on_compute=False)
        self.pixels = 0

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """pred, target: integer label maps of the same shape (target may hold the ignore index)."""
        if pred.shape != target.shape:
            raise TipslabError(f"prediction {tuple(pred.shape)} and label map {tuple(target.shape)} differ in size")
        target = target.long()
        bad = (target != self.ignore_index) & ((target < 0) | (target >= self.num_classes))
        if bool(bad.any()):
            value = int(target[bad][0])
            raise TipslabError(f"label value {value} is neither a class id in [0, {self.num_classes}) "
                               f"nor the ignore index {self.ignore_index}")
        self.metric.update(pred.long().flatten(), target.flatten())
        self.pixels += int((target != self.ignore_index).sum())

    def miou(self) -> float:
        if self.pixels == 0:
            return float("nan")
        return 100.0 * float(self.metric.compute())

    def pixel_accuracy(self) -> float:
        confmat = self.metric.confmat.float()
        return 100.0 * float(confmat.diag().sum() / confmat.sum().clamp_min(1))


def retrieval_recalls(similarity: torch.Tensor, text_image: torch.Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    """R@k in percent for both directions.

    similarity: [num_images, num_texts]; text_image: [num_texts] index of each text's image.
    Image->text: an image is found at k when any of its texts is among its k best texts.
    Text->image: a text is found at k when its image is among its k best images.
    Ties are broken against the query (a tied wrong item ranks first), so a constant model scores
    no better than chance.
    """
    # Ranks by counting strictly-better-or-tied wrong items: a one-line rule torchmetrics'
    # per-query retrieval metrics would need a grouped long-format table for.
    similarity = similarity.float()
    num_images, num_texts = similarity.shape
    if text_image.shape != (num_texts,):
        raise TipslabError(f"text_image must give one image per text ({num_texts}), got {tuple(text_image.shape)}")
    own = torch.zeros_like(similarity, dtype=torch.bool)
    own[text_image, torch.arange(num_texts)] = True
    # image -> text: the best score among the image's own texts, against all other texts.
    best_own = similarity.masked_fill(~own, float("-inf")).max(dim=1).values
    i2t_rank = (similarity.masked_fill(own, float("-inf")) >= best_own[:, None]).sum(dim=1)
    # text -> image: the text's image score against all other images.
    own_score = similarity[text_image, torch.arange(num_texts)]
    t2i_rank = (similarity.masked_fill(own, float("-inf")) >= own_score[None, :]).sum(dim=0)
    out = {f"i2t_R@{k}": 100.0 * float((i2t_rank < k).float().mean()) for k in ks}
    out.update({f"t2i_R@{k}": 100.0 * float((t2i_rank < k).float().mean()) for k in ks})
    return out


def retrieval_chance(text_image: torch.Tensor, num_images: int, ks=(1, 5, 10)) -> dict[str, float]:
    """Expected R@k of a model that ranks at random, computed for this set's caption counts."""
    from math import comb

    num_texts = int(text_image.numel())
    counts = torch.bincount(text_image, minlength=num_images).tolist()
    out = {}
    for k in ks:
        # i2t: P(at least one of the image's c texts among k random picks from num_texts).
        i2t = [1 - comb(num_texts - c, k) / comb(num_texts, k) if k < num_texts else 1.0 for c in counts]
        out[f"i2t_R@{k}"] = 100.0 * sum(i2t) / len(i2t)
    out.update({f"t2i_R@{k}": 100.0 * min(k, num_images) / num_images for k in ks})
    return out


def knn_accuracy(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor,
                 num_classes: int, k: int = 20, temperature: float = 0.07) -> float:
    """Top-1 accuracy (percent) of the weighted k-NN classifier (DINO's eval_knn)."""
    # Written out: a dozen lines of torch; scikit-learn's KNeighborsClassifier has no exp(sim/T) vote.
    train = torch.nn.functional.normalize(train.float(), dim=-1)
    test = torch.nn.functional.normalize(test.float(), dim=-1)
    k = min(k, len(train))
    sims, idx = (test @ train.T).topk(k, dim=1)
    votes = torch.zeros(len(test), num_classes)
    votes.scatter_add_(1, train_labels[idx], (sims / temperature).exp())
    return 100.0 * float((votes.argmax(dim=1) == test_labels).float().mean())
