"""Loss components: the registry and the contract every component follows.

A component is a LightningModule that owns its heads, EMA copies and hyper-parameters, declares
which features it needs, what it trains (`learnable_params`) and what it EMA-updates
(`momentum_pairs`), and returns named loss terms. The pretraining system does the rest: it
computes the union of the features, sums the weighted terms, and runs the EMA updates.
Adding a loss means adding one file that registers a component and one config block.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import lightning as L
import torch
from torch import nn

from tipslab.errors import TipslabError
from tipslab.modules.features import FEATURE_NAMES, Features, LossOutput

_REGISTRY: dict[str, type[LossComponent]] = {}


class LossComponent(L.LightningModule):
    """Base class: subclasses set `name` and `needs` and implement `forward`."""

    name: ClassVar[str]
    needs: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, weight: float = 1.0):
        super().__init__()
        self.weight = float(weight)

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
        unknown = set(cls.needs) - FEATURE_NAMES
        if unknown:
            raise TypeError(f"component {name!r} needs unknown features {sorted(unknown)}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def registered_components() -> dict[str, type[LossComponent]]:
    _import_builtin_components()
    return dict(_REGISTRY)


def _import_builtin_components() -> None:
    # Importing a component module registers it.
    from tipslab.modules import contrastive  # noqa: F401


def build_components(components_cfg, embed_dim: int) -> nn.ModuleDict:
    """The enabled components of a `components:` config block, in config order."""
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
        built[name] = registry[name](embed_dim=embed_dim, **options)
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
