"""Metrics of dense probes: mIoU for segmentation; RMSE, AbsRel and delta1 for depth.

Segmentation (as mmsegmentation / DINOv2's linear probes): one confusion matrix accumulated
over the whole set, pixels labelled `ignore_index` left out; IoU_c = TP / (TP + FP + FN) for
every class that occurs in the labels or the predictions (a class absent from both has no IoU
and does not count); mIoU is their mean.

Normals: mean angle in degrees between predicted and true unit normals, and the share of
pixels within 11.25 degrees (the usual surface-normal measures), over all pixels.

Depth (the NYU protocol of the monocular-depth literature, as DINOv2): per image over pixels
with valid ground truth (gt > 0: NYU stores missing depth as 0), predictions clipped to the
decoder's range; RMSE = sqrt(mean (p - g)^2), AbsRel = mean |p - g| / g, delta1 = share of
pixels with max(p / g, g / p) < 1.25; each is averaged over images.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = 255


class SegmentationMeter:
    """Accumulates a `[C, C]` confusion matrix (rows: labels, columns: predictions)."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.long)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """`pred` and `target`: integer label maps of the same shape."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and labels {tuple(target.shape)} differ in shape")
        pred, target = pred.reshape(-1).long().cpu(), target.reshape(-1).long().cpu()
        keep = target != self.ignore_index
        pred, target = pred[keep], target[keep]
        if ((target < 0) | (target >= self.num_classes)).any():
            raise ValueError(f"labels outside [0, {self.num_classes}) other than {self.ignore_index}")
        pred = pred.clamp(0, self.num_classes - 1)
        self.confusion += torch.bincount(target * self.num_classes + pred,
                                         minlength=self.num_classes**2).reshape(self.num_classes, -1)

    def iou(self) -> torch.Tensor:
        """Per-class IoU, NaN for classes in neither labels nor predictions."""
        c = self.confusion.double()
        tp = c.diag()
        union = c.sum(0) + c.sum(1) - tp
        return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))

    def compute(self) -> dict[str, float]:
        iou = self.iou()
        total = self.confusion.sum().item()
        return {
            "miou": float(iou.nanmean()) if (~iou.isnan()).any() else float("nan"),
            "pixel_acc": float(self.confusion.diag().sum() / total) if total else float("nan"),
        }


def depth_errors(pred: torch.Tensor, gt: torch.Tensor, min_depth: float = 1e-3,
                 max_depth: float = 10.0) -> dict[str, float] | None:
    """RMSE, AbsRel and delta1 of one image (`[H, W]` metres); None when no pixel is valid."""
    pred, gt = pred.reshape(-1).double(), gt.reshape(-1).double()
    valid = gt > 0
    if not valid.any():
        return None
    p, g = pred[valid].clamp(min_depth, max_depth), gt[valid]
    ratio = torch.maximum(p / g, g / p)
    return {
        "rmse": float(((p - g) ** 2).mean().sqrt()),
        "abs_rel": float(((p - g).abs() / g).mean()),
        "delta1": float((ratio < 1.25).double().mean()),
    }


class DepthMeter:
    """Averages `depth_errors` over images (images without valid pixels are skipped)."""

    def __init__(self, min_depth: float = 1e-3, max_depth: float = 10.0):
        self.min_depth, self.max_depth = float(min_depth), float(max_depth)
        self.sums = {"rmse": 0.0, "abs_rel": 0.0, "delta1": 0.0}
        self.images = 0

    def update(self, pred: torch.Tensor, gt: torch.Tensor) -> None:
        """`pred`, `gt`: `[B, H, W]` (or `[B, 1, H, W]`) metres."""
        pred, gt = pred.reshape(gt.shape[0], -1), gt.reshape(gt.shape[0], -1)
        for p, g in zip(pred, gt):
            errors = depth_errors(p, g, self.min_depth, self.max_depth)
            if errors is not None:
                self.images += 1
                for key, value in errors.items():
                    self.sums[key] += value

    def compute(self) -> dict[str, float]:
        if not self.images:
            return {key: float("nan") for key in self.sums}
        return {key: value / self.images for key, value in self.sums.items()}


class NormalsMeter:
    """Mean angular error (degrees) and the share of pixels within 11.25 degrees, pooled over pixels."""

    def __init__(self):
        self.angle_sum, self.within, self.pixels = 0.0, 0, 0

    def update(self, pred: torch.Tensor, gt: torch.Tensor) -> None:
        """`pred`, `gt`: `[B, 3, H, W]` (normalised here)."""
        cos = (torch.nn.functional.normalize(pred.double(), dim=1)
               * torch.nn.functional.normalize(gt.double(), dim=1)).sum(1).clamp(-1, 1)
        angles = torch.rad2deg(torch.acos(cos))
        self.angle_sum += float(angles.sum())
        self.within += int((angles < 11.25).sum())
        self.pixels += angles.numel()

    def compute(self) -> dict[str, float]:
        if not self.pixels:
            return {"mean_angle": float("nan"), "within_11": float("nan")}
        return {"mean_angle": self.angle_sum / self.pixels, "within_11": self.within / self.pixels}
