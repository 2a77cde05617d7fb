"""Loss components: the registry and the contract every component follows.

A component is a LightningModule that owns its heads, EMA copies, centring state and
hyper-parameters, declares which features it needs (`needs`, keys of modules/features.py), what
the data must provide (`requires`: local crops, masks), what it trains (`learnable_params`) and
what it EMA-updates (`momentum_pairs`), and returns named loss terms. The pretraining system does
the rest: it computes the union of the features once, sums the weighted terms, logs each term
under the component's name, runs the EMA updates and calls `on_optimizer_step` (centres) once
per optimizer step. Adding a loss means adding one file that registers a component and one
config block.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import lightning as L
import torch
from torch import nn

from tipslab.errors import TipslabError
from tipslab.modules.features import FeatureKey, Features, LossOutput, key

_REGISTRY: dict[str, type[LossComponent]] = {}


@dataclass(frozen=True)
class DataViews:
    """What the training batches carry: crop counts, whether there are block masks and
    hard-negative texts."""

    num_global: int = 1
    num_local: int = 0
    masks: bool = False
    negatives: bool = False


class LossComponent(L.LightningModule):
    """Base class: subclasses set `name`, fill `needs` (and `requires`) in ``__init__`` from their
    settings, and implement `forward`."""

    name: ClassVar[str]

    def __init__(self, weight: float = 1.0):
        super().__init__()
        self.weight = float(weight)
        self.needs: frozenset[FeatureKey] = frozenset()

    def need(self, *specs: str) -> None:
        """Declare features, e.g. ``self.need("student/global/cls1", "text/alt/pooled")``."""
        self.needs = self.needs | {key(spec) for spec in specs}

    def check_data(self, views: DataViews) -> None:
        """Raise a TipslabError naming the config keys when the data cannot give what this needs."""

    def on_optimizer_step(self) -> None:
        """Called once per optimizer step, after the step and the EMA (centre updates)."""

    def forward(self, features: Features) -> LossOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def learnable_params(self) -> list[nn.Parameter]:
        """Parameters the optimizer trains (heads, prototypes). EMA copies are excluded."""
        return [p for p in self.parameters() if p.requires_grad]

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(student, teacher) module pairs whose teacher is an EMA of the student."""
        return []


def register_component(name: str) -> Callable[[type[LossComponent]], type[LossComponent]]:
    def wrap(cls: type[LossComponent]) -> type[LossComponent]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def registered_components() -> dict[str, type[LossComponent]]:
    _import_builtin_components()
    return dict(_REGISTRY)


def _import_builtin_components() -> None:
    # Importing a component module registers it.
    from tipslab.modules import contrastive, dino, distill, ibot, koleo  # noqa: F401


def build_components(components_cfg, embed_dim: int, **context) -> nn.ModuleDict:
    """The enabled components of a `components:` config block, in config order.

    ``context`` (e.g. ``distill_dim``, the frozen teacher's width) goes to the components whose
    constructor takes it."""
    import inspect

    registry = registered_components()
    built = nn.ModuleDict()
    for name, block in components_cfg.items():
        if name not in registry:
            raise TipslabError(
                f"config block components.{name} names no registered loss component; "
                f"known: {', '.join(sorted(registry))}"
            )
        options = dict(block)
        if not options.pop("enabled", True):
            continue
        cls = registry[name]
        accepted = inspect.signature(cls.__init__).parameters
        extra = {k: v for k, v in context.items() if k in accepted}
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise TipslabError(f"components.{name} has no option(s) {unknown}; it takes "
                               f"{sorted(p for p in accepted if p not in ('self', 'embed_dim', *context))}")
        built[name] = cls(embed_dim=embed_dim, **extra, **options)
    if not built:
        raise TipslabError("no loss component is enabled: set components.<name>.enabled=true")
    return built


def weighted_total(outputs: dict[str, LossOutput], weights: dict[str, float]) -> torch.Tensor:
    """Σ_component weight · Σ_terms term."""
    total = None
    for name, out in outputs.items():
        for term in out.losses.values():
            contribution = weights[name] * term
            total = contribution if total is None else total + contribution
    return total
