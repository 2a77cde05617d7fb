"""mIoU and depth metrics on cases worked out by hand."""

import math

import pytest
import torch

from tipslab.modules.dense_metrics import DepthMeter, SegmentationMeter, depth_errors


def test_miou_of_a_hand_counted_case():
    # labels / predictions over 6 pixels, one ignored (255); 4 classes, class 3 absent from both.
    labels = torch.tensor([[0, 0, 1], [1, 2, 255]])
    pred = torch.tensor([[0, 1, 1], [1, 0, 2]])
    meter = SegmentationMeter(4)
    meter.update(pred, labels)
    # class 0: TP 1, FP 1 (a 2 read as 0), FN 1 (a 0 read as 1) -> 1/3
    # class 1: TP 2, FP 1, FN 0 -> 2/3;  class 2: TP 0, FN 1 -> 0;  class 3: no pixels -> not counted
    iou = meter.iou()
    assert iou[:3].tolist() == pytest.approx([1 / 3, 2 / 3, 0.0]) and math.isnan(iou[3])
    out = meter.compute()
    assert out["miou"] == pytest.approx(1 / 3) and out["pixel_acc"] == pytest.approx(3 / 5)


def test_miou_accumulates_over_images_not_per_image_means():
    meter = SegmentationMeter(2)
    meter.update(torch.tensor([0, 0, 0, 1]), torch.tensor([0, 0, 0, 0]))  # image 1: IoU0 = 3/4, class 1 FP
    meter.update(torch.tensor([1, 1]), torch.tensor([1, 1]))  # image 2: perfect
    # pooled: class 0 TP 3, FN 1 -> 3/4; class 1 TP 2, FP 1 -> 2/3; mean 17/24
    assert meter.compute()["miou"] == pytest.approx(17 / 24)


def test_depth_errors_by_hand():
    gt = torch.tensor([[1.0, 2.0], [0.0, 4.0]])  # 0 = no measurement, left out
    pred = torch.tensor([[1.5, 2.0], [9.0, 2.0]])
    out = depth_errors(pred, gt)
    # errors 0.5, 0, -2 -> RMSE sqrt(4.25 / 3); AbsRel (0.5 + 0 + 0.5) / 3; ratios 1.5, 1, 2 -> delta1 1/3
    assert out["rmse"] == pytest.approx(math.sqrt(4.25 / 3))
    assert out["abs_rel"] == pytest.approx(1 / 3)
    assert out["delta1"] == pytest.approx(1 / 3)
    assert depth_errors(pred, torch.zeros(2, 2)) is None


def test_depth_meter_clips_to_the_range_and_averages_per_image():
    meter = DepthMeter(min_depth=0.001, max_depth=10.0)
    gt = torch.tensor([[[1.0, 2.0], [0.0, 4.0]], [[10.0, 10.0], [10.0, 10.0]], [[0.0, 0.0], [0.0, 0.0]]])
    pred = torch.tensor([[[1.5, 2.0], [9.0, 2.0]], [[20.0, 20.0], [20.0, 20.0]], [[1.0, 1.0], [1.0, 1.0]]])
    meter.update(pred, gt)  # image 2: 20 m clipped to 10 -> exact; image 3 has no valid pixel
    out = meter.compute()
    assert meter.images == 2
    assert out["rmse"] == pytest.approx(math.sqrt(4.25 / 3) / 2)
    assert out["abs_rel"] == pytest.approx(1 / 6)
    assert out["delta1"] == pytest.approx((1 / 3 + 1) / 2)
