"""The evaluation metrics against cases computed by hand."""

import pytest
import torch

from tipslab.errors import TipslabError
from tipslab.platform.eval_metrics import SegmentationMeter, knn_accuracy, retrieval_chance, retrieval_recalls


def test_a_perfect_prediction_is_100_miou():
    label = torch.randint(0, 5, (3, 17, 23), generator=torch.Generator().manual_seed(0))
    label[:, :2] = 255
    meter = SegmentationMeter(num_classes=5, ignore_index=255)
    for image in label:
        meter.update(image.clone(), image)
    assert meter.miou() == pytest.approx(100.0)
    assert meter.pixel_accuracy() == pytest.approx(100.0)


def test_a_known_confusion_matrix_gives_its_miou_with_the_ignore_index_respected():
    # Non-ignored (target, pred) pairs: (0,0) x2, (0,1), (1,1), (1,2), (2,2).
    # IoU: class 0 = 2/3, class 1 = 1/(1+1+1) = 1/3, class 2 = 1/2 -> mean 1/2. Class 3 never occurs
    # (no label, no prediction) and is not averaged. The two ignored pixels are predicted 0 and 1:
    # counted, they would lower classes 0 and 1.
    target = torch.tensor([0, 0, 0, 1, 1, 2, 255, 255])
    pred = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])
    meter = SegmentationMeter(num_classes=4, ignore_index=255)
    meter.update(pred, target)
    assert meter.miou() == pytest.approx(50.0)
    assert meter.pixel_accuracy() == pytest.approx(100 * 4 / 6)


def test_miou_is_accumulated_over_the_dataset_not_averaged_per_image():
    meter = SegmentationMeter(num_classes=2)
    meter.update(torch.tensor([0, 0, 0, 1]), torch.tensor([0, 0, 0, 0]))  # class 0: 3/4, class 1: 0/1
    meter.update(torch.tensor([1]), torch.tensor([1]))  # class 1 now 1/2 over the dataset
    assert meter.miou() == pytest.approx(100 * (3 / 4 + 1 / 2) / 2)


def test_a_label_value_that_is_no_class_is_an_error():
    meter = SegmentationMeter(num_classes=3, ignore_index=255)
    with pytest.raises(TipslabError, match="label value 7"):
        meter.update(torch.tensor([0, 1]), torch.tensor([0, 7]))
    with pytest.raises(TipslabError, match="is a class id"):
        SegmentationMeter(num_classes=3, ignore_index=2)


def test_retrieval_recall_at_k_from_known_ranks():
    # 3 images, texts 0,1 -> image 0, text 2 -> image 1, text 3 -> image 2.
    owner = torch.tensor([0, 0, 1, 2])
    sim = torch.tensor([
        [0.1, 0.9, 0.5, 0.0],  # image 0: its best own text (0.9) ranks 1st
        [0.2, 0.3, 0.1, 0.8],  # image 1: its text (0.1) ranks 4th
        [0.7, 0.1, 0.2, 0.6],  # image 2: its text (0.6) ranks 2nd
    ])
    r = retrieval_recalls(sim, owner, ks=(1, 2, 5))
    assert r["i2t_R@1"] == pytest.approx(100 / 3)
    assert r["i2t_R@2"] == pytest.approx(200 / 3)
    assert r["i2t_R@5"] == pytest.approx(100)
    # text -> image ranks: text0 column [0.1,0.2,0.7] -> 3rd; text1 [0.9,.3,.1] -> 1st;
    # text2 [0.5,0.1,0.2] -> 3rd; text3 [0,0.8,0.6] -> 2nd.
    assert r["t2i_R@1"] == pytest.approx(25)
    assert r["t2i_R@2"] == pytest.approx(50)
    assert r["t2i_R@5"] == pytest.approx(100)


def test_ties_do_not_help_a_constant_model():
    owner = torch.arange(4)
    r = retrieval_recalls(torch.zeros(4, 4), owner, ks=(1,))
    assert r["i2t_R@1"] == 0 and r["t2i_R@1"] == 0


def test_retrieval_chance_matches_counting():
    # 4 images with 2 texts each (8 texts): i2t R@1 = 2/8; t2i R@1 = 1/4; R@2 i2t = 1 - C(6,2)/C(8,2).
    owner = torch.arange(4).repeat_interleave(2)
    c = retrieval_chance(owner, 4, ks=(1, 2))
    assert c["i2t_R@1"] == pytest.approx(25.0)
    assert c["t2i_R@1"] == pytest.approx(25.0)
    assert c["i2t_R@2"] == pytest.approx(100 * (1 - 15 / 28))
    # A Monte Carlo check of the same number with random similarity matrices.
    g = torch.Generator().manual_seed(0)
    runs = [retrieval_recalls(torch.rand(4, 8, generator=g), owner, ks=(2,))["i2t_R@2"] for _ in range(1000)]
    assert sum(runs) / len(runs) == pytest.approx(c["i2t_R@2"], abs=2.5)


def test_knn_votes_by_neighbours():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 0, 1, 1])
    test = torch.tensor([[1.0, 0.05], [0.05, 1.0]])
    assert knn_accuracy(train, labels, test, torch.tensor([0, 1]), num_classes=2, k=2) == 100.0
    assert knn_accuracy(train, labels, test, torch.tensor([1, 0]), num_classes=2, k=2) == 0.0
