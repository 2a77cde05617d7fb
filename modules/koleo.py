"""KoLeo regulariser (DINOv2) on the student's CLS tokens: spreads them over the sphere.

Applied to each global crop's batch of CLS tokens separately and summed, as DINOv2 does, on
the backbone's CLS (before any head).
"""

from __future__ import annotations

from tipslab.errors import TipslabError
from tipslab.modules.components import LossComponent, register_component
from tipslab.modules.features import Features, LossOutput
from tipslab.modules.losses import koleo_loss


@register_component("koleo")
class KoleoComponent(LossComponent):
    def __init__(self, embed_dim: int, weight: float = 0.1, cls: str = "cls1"):
        super().__init__(weight=weight)
        if cls not in ("cls1", "cls2"):
            raise TipslabError(f"components.koleo.cls={cls!r}; expected cls1 or cls2")
        self.cls = cls
        self.need(f"student/global/{cls}")

    def forward(self, features: Features) -> LossOutput:
        crops = features.by_view(f"student/global/{self.cls}")
        return LossOutput(losses={"loss": sum(koleo_loss(crop) for crop in crops)})
