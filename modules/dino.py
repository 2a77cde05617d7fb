"""DINO CLS self-distillation (DINOv2's ``dino_loss``), one of the TIPSv2 recipe's components.

The student's CLS of every crop (global, masked when the batch has masks, and local) goes
through the student head; the teacher's CLS of the unmasked global crops through the EMA head,
centred; every teacher crop supervises every other student crop (modules/losses.dino_loss).
"""

from __future__ import annotations

import torch

from tipslab.errors import TipslabError
from tipslab.modules.components import DataViews, register_component
from tipslab.modules.features import Features, LossOutput
from tipslab.modules.losses import dino_loss
from tipslab.modules.self_distillation import SelfDistillationComponent


@register_component("dino")
class DinoComponent(SelfDistillationComponent):
    def __init__(self, embed_dim: int, weight: float = 1.0, cls: str = "cls1", local_crops: bool = True,
                 prototypes: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256, layers: int = 3,
                 student_temp: float = 0.1, teacher_temp: float = 0.07, warmup_teacher_temp: float = 0.04,
                 teacher_temp_warmup: float = 0.3, centering: str = "ema", center_momentum: float = 0.9,
                 sinkhorn_iterations: int = 3):
        super().__init__(embed_dim, weight, prototypes, hidden_dim, bottleneck_dim, layers, student_temp,
                         teacher_temp, warmup_teacher_temp, teacher_temp_warmup, centering, center_momentum,
                         sinkhorn_iterations)
        if cls not in ("cls1", "cls2"):
            raise TipslabError(f"components.dino.cls={cls!r}; expected cls1 or cls2")
        self.cls, self.local_crops = cls, bool(local_crops)
        self.need(f"student/global/{cls}", f"teacher/global/{cls}")
        if self.local_crops:
            self.need(f"student/local/{cls}")

    def check_data(self, views: DataViews) -> None:
        if self.local_crops and views.num_local == 0:
            raise TipslabError("components.dino.local_crops=true but the data makes no local crops "
                               "(data.local_crops.count=0): set data.local_crops.count (DINOv2: 8) or "
                               "components.dino.local_crops=false")
        if views.num_global + (views.num_local if self.local_crops else 0) < 2:
            raise TipslabError("components.dino compares each teacher crop with the *other* student crops, but "
                               "the data makes one crop: set data.global_crops.count=2 (DINOv2) or add local crops")

    def forward(self, features: Features) -> LossOutput:
        student = features.by_view(f"student/global/{self.cls}")
        if self.local_crops:
            student = torch.cat([student, features.by_view(f"student/local/{self.cls}")])
        teacher_probs = self.teacher_targets(features.by_view(f"teacher/global/{self.cls}"), features.step,
                                             features.max_steps)
        loss = dino_loss(self.head(student), teacher_probs, self.student_temp)
        with torch.no_grad():
            # Entropy of the mean teacher target: low means the teacher collapsed onto few prototypes.
            mean = teacher_probs.float().mean(dim=(0, 1))
            entropy = -(mean * mean.clamp_min(1e-12).log()).sum()
        return LossOutput(losses={"loss": loss},
                          metrics={"teacher_temp": torch.tensor(self.teacher_temperature(features.step,
                                                                                          features.max_steps)),
                                   "teacher_entropy": entropy})
