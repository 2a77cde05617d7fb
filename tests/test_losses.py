"""The recipe's loss functions (modules/losses.py) against hand-computed cases."""

import math

import pytest
import torch
import torch.nn.functional as F

from tipslab.modules.losses import (
    centered_teacher_probs,
    cosine_distillation_loss,
    cross_entropy_soft,
    dino_loss,
    ibot_loss,
    koleo_loss,
    sinkhorn_knopp,
)


def test_centered_teacher_probs_subtracts_centre_then_sharpens():
    logits = torch.tensor([[1.0, 2.0]])
    center = torch.tensor([[1.0, 0.0]])
    # (logits - center) / 0.5 = [0, 4] -> softmax = [1, e^4] / (1 + e^4)
    expected = torch.tensor([[1.0, math.exp(4)]]) / (1 + math.exp(4))
    assert torch.allclose(centered_teacher_probs(logits, center, 0.5), expected)


def test_cross_entropy_soft_by_hand():
    # student logits [0, ln 3] at temp 1 -> softmax [1/4, 3/4]; teacher [1/2, 1/2]
    got = cross_entropy_soft(torch.tensor([[0.0, math.log(3)]]), torch.tensor([[0.5, 0.5]]), 1.0)
    assert got.item() == pytest.approx(-(0.5 * math.log(0.25) + 0.5 * math.log(0.75)))


def test_dino_loss_skips_each_teacher_crops_own_student_crop():
    # 3 student crops (2 global + 1 local), 2 teacher crops, batch 1, K = 2.
    student = torch.tensor([[[0.0, 0.0]], [[0.0, math.log(3)]], [[math.log(3), 0.0]]])
    teacher = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    # Pairs (t, s): (0,1): -log 1/4; (0,2): -log 3/4; (1,0): -log 1/2; (1,2): -log 1/4
    expected = (-math.log(0.25) - math.log(0.75) - math.log(0.5) - math.log(0.25)) / 4
    assert dino_loss(student, teacher, student_temp=1.0).item() == pytest.approx(expected, rel=1e-6)


def test_dino_loss_needs_two_crops():
    with pytest.raises(ValueError, match="two crops"):
        dino_loss(torch.zeros(1, 2, 4), torch.full((1, 2, 4), 0.25), 0.1)


def _ibot_case():
    # Batch 2, 3 patches, K = 2. Student at temp 1: per patch CE against the teacher.
    student = torch.tensor([[[0.0, 0.0], [0.0, math.log(3)], [math.log(3), 0.0]],
                            [[0.0, 0.0], [0.0, 0.0], [0.0, math.log(3)]]])
    teacher = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]],
                            [[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]]])
    masks = torch.tensor([[True, True, False], [False, False, False]])
    ce = [[-math.log(0.5), -math.log(0.75), -math.log(0.25)],
          [-math.log(0.5), -math.log(0.5), -math.log(0.25)]]
    return student, teacher, masks, ce


def test_ibot_loss_averages_masked_patches_per_image_over_masked_images():
    student, teacher, masks, ce = _ibot_case()
    # Only image 0 has masked patches: mean of its two masked CEs.
    expected = (ce[0][0] + ce[0][1]) / 2
    assert ibot_loss(student, teacher, masks, 1.0, visible_weight=0.0).item() == pytest.approx(expected)


def test_ibot_plus_plus_adds_visible_part_normalised_per_image():
    student, teacher, masks, ce = _ibot_case()
    masked = (ce[0][0] + ce[0][1]) / 2
    visible = (ce[0][2] + sum(ce[1]) / 3) / 2  # image 0: its one visible patch; image 1: all three
    got = ibot_loss(student, teacher, masks, 1.0, visible_weight=0.5)
    assert got.item() == pytest.approx(masked + 0.5 * visible)


def test_ibot_with_visible_weight_zero_equals_ibot_on_masked_tokens_only():
    torch.manual_seed(0)
    student, teacher = torch.randn(4, 9, 16), torch.softmax(torch.randn(4, 9, 16), -1)
    masks = torch.rand(4, 9) < 0.4
    masks[0] = False
    reference = []
    for b in range(4):
        if masks[b].any():
            reference.append(cross_entropy_soft(student[b][masks[b]], teacher[b][masks[b]], 0.1).mean())
    assert ibot_loss(student, teacher, masks, 0.1, 0.0).item() == pytest.approx(torch.stack(reference).mean().item(),
                                                                               rel=1e-5)


def test_sinkhorn_knopp_balances_prototypes_and_normalises_rows():
    torch.manual_seed(0)
    q = sinkhorn_knopp(torch.randn(64, 8) * 3, teacher_temp=0.5, n_iterations=50)
    assert torch.allclose(q.sum(dim=1), torch.ones(64), atol=1e-3)
    assert torch.allclose(q.sum(dim=0), torch.full((8,), 64 / 8), atol=1e-2)


def test_sinkhorn_knopp_one_iteration_by_hand():
    logits = torch.log(torch.tensor([[1.0, 3.0], [1.0, 1.0]]))
    # exp(logits) = [[1,3],[1,1]]; /6; rows of Q^T (prototypes): [2/6, 4/6] -> /(row*2);
    # then columns (samples) normalised and times B = 2.
    q = torch.tensor([[1.0, 3.0], [1.0, 1.0]]).T / 6
    q = q / (q.sum(1, keepdim=True) * 2)
    q = q / (q.sum(0, keepdim=True) * 2)
    expected = (q * 2).T
    assert torch.allclose(sinkhorn_knopp(logits, 1.0, 1), expected, atol=1e-6)


def test_koleo_loss_by_hand_on_three_points():
    # Unit vectors at angles 0, 90 and 180 degrees: nearest neighbour distance is sqrt(2) for each.
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    assert koleo_loss(x).item() == pytest.approx(-math.log(math.sqrt(2)), rel=1e-5)
    # Spreading points apart lowers the loss.
    close = torch.tensor([[1.0, 0.0], [0.99, 0.14], [0.0, 1.0]])
    assert koleo_loss(close) > koleo_loss(x)


def test_cosine_distillation_loss_by_hand():
    s = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    t = torch.tensor([[0.0, 2.0], [3.0, 3.0]])
    # cos = 0 and 1 -> (1 - 0 + 1 - 1) / 2
    assert cosine_distillation_loss(s, t).item() == pytest.approx(0.5)
    assert cosine_distillation_loss(s, F.normalize(s) * 7).item() == pytest.approx(0.0, abs=1e-6)
