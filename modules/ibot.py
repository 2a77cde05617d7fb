"""iBOT / iBOT++ masked-image patch self-distillation, the patch half of the TIPSv2 recipe.

The student sees the masked global crops, the teacher (the same backbone without gradients, or
the EMA backbone) the unmasked ones; both patch tokens go through their heads and the loss is
`modules/losses.ibot_loss`: iBOT supervises the masked tokens only (``visible_weight=0``, TIPS
v1); iBOT++ also the visible ones (TIPSv2: +14 mIoU zero-shot segmentation in its ablation), each
part normalised per image.
"""

from __future__ import annotations

import torch

from tipslab.errors import TipslabError
from tipslab.modules.components import DataViews, register_component
from tipslab.modules.features import Features, LossOutput
from tipslab.modules.losses import ibot_loss
from tipslab.modules.self_distillation import SelfDistillationComponent


@register_component("ibot")
class IbotComponent(SelfDistillationComponent):
    def __init__(self, embed_dim: int, weight: float = 1.0, visible_weight: float = 1.0, share_dino_head: bool = False,
                 prototypes: int = 65536,
                 hidden_dim: int = 2048, bottleneck_dim: int = 256, layers: int = 3, student_temp: float = 0.1,
                 teacher_temp: float = 0.07, warmup_teacher_temp: float = 0.04, teacher_temp_warmup: float = 0.3,
                 centering: str = "ema", center_momentum: float = 0.9, sinkhorn_iterations: int = 3):
        super().__init__(embed_dim, weight, prototypes, hidden_dim, bottleneck_dim, layers, student_temp,
                         teacher_temp, warmup_teacher_temp, teacher_temp_warmup, centering, center_momentum,
                         sinkhorn_iterations)
        if float(visible_weight) < 0:
            raise TipslabError(f"components.ibot.visible_weight={visible_weight}; expected >= 0 (0 is iBOT)")
        self.visible_weight = float(visible_weight)
        # DINOv2's default (``ibot.separate_head: false``): patches go through the DINO head, so
        # patch and CLS tokens are projected onto the same prototypes; see `share_head`.
        self.share_dino_head = bool(share_dino_head)
        self.need("student/global/patches", "teacher/global/patches")

    def share_head(self, other: SelfDistillationComponent) -> None:
        """Use ``other``'s student head and EMA teacher head (the centre stays this component's:
        patch logits are centred on their own, as DINOv2's)."""
        if other.head.prototypes.shape != self.head.prototypes.shape:
            raise TipslabError("components.ibot.share_dino_head: the dino and ibot heads must have the same "
                               f"prototypes and bottleneck_dim; got {tuple(other.head.prototypes.shape)} and "
                               f"{tuple(self.head.prototypes.shape)}")
        self.head, self.teacher_head = other.head, other.teacher_head

    def check_data(self, views: DataViews) -> None:
        if not views.masks:
            raise TipslabError("components.ibot is on but the data makes no block masks: set "
                               "data.masking.enabled=true (or turn the component off)")

    def forward(self, features: Features) -> LossOutput:
        if features.masks is None:
            raise TipslabError("components.ibot got a batch without masks (data.masking.enabled=false?)")
        teacher_probs = self.teacher_targets(features["teacher/global/patches"], features.step, features.max_steps)
        student_logits = self.head(features["student/global/patches"])
        loss = ibot_loss(student_logits, teacher_probs, features.masks, self.student_temp, self.visible_weight)
        with torch.no_grad():
            masked_share = features.masks.float().mean()
        return LossOutput(losses={"loss": loss}, metrics={"masked_share": masked_share})
