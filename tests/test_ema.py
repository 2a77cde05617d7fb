import pytest
import torch
from torch import nn

from tipslab.platform.ema import cosine_momentum, ema_update_


def test_ema_update_moves_teacher_toward_student_by_one_minus_momentum():
    student, teacher = nn.Linear(2, 1, bias=False), nn.Linear(2, 1, bias=False)
    student.weight.data = torch.tensor([[1.0, 3.0]])
    teacher.weight.data = torch.tensor([[0.0, 1.0]])
    ema_update_([(student, teacher)], momentum=0.75)
    # 0.75 * [0, 1] + 0.25 * [1, 3] = [0.25, 1.5]
    assert torch.allclose(teacher.weight, torch.tensor([[0.25, 1.5]]))
    assert torch.allclose(student.weight, torch.tensor([[1.0, 3.0]]))


def test_ema_update_rejects_mismatched_pairs():
    with pytest.raises(ValueError, match="student"):
        ema_update_([(nn.Linear(2, 2), nn.Linear(2, 2, bias=False))], momentum=0.9)


def test_cosine_momentum_runs_from_base_to_final():
    assert cosine_momentum(0, 100, 0.992) == pytest.approx(0.992)
    assert cosine_momentum(50, 100, 0.992) == pytest.approx(0.996)
    assert cosine_momentum(100, 100, 0.992) == pytest.approx(1.0)
