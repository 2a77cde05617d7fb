"""One owner of the bf16 cast (platform/precision.py): FSDP2's policy or autocast, never both.
Decided by a pure function of the config, so the GPU configs are checked here without a GPU."""

import lightning as L
import pytest
import torch

from tipslab.errors import TipslabError
from tipslab.platform.config import load_config
from tipslab.platform.precision import precision_plan


def _autocast_in_step(lightning_precision: str) -> bool:
    """Whether the Trainer's precision plugin turns autocast on around a step (built on CPU)."""
    trainer = L.Trainer(accelerator="cpu", devices=1, precision=lightning_precision, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with trainer.precision_plugin.forward_context():
        return torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")


def test_under_fsdp2_the_policy_casts_and_lightning_does_not_autocast():
    cfg = load_config("tipsv2_b", ["trainer.devices=8"])  # FSDP2 is its strategy
    assert cfg.trainer.strategy == "fsdp" and cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
    plan = precision_plan(cfg.trainer.strategy, cfg.trainer.precision)
    assert (plan.param_dtype, plan.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert plan.lightning == "32-true" and not plan.autocast
    assert not _autocast_in_step(plan.lightning)


def test_without_fsdp2_autocast_casts_and_no_policy_exists():
    cfg = load_config("tipsv2_b", ["trainer.strategy=auto"])  # DDP
    assert cfg.trainer.strategy == "auto" and cfg.trainer.precision == "bf16-mixed"
    plan = precision_plan(cfg.trainer.strategy, cfg.trainer.precision)
    assert plan.lightning == "bf16-mixed" and plan.autocast and plan.param_dtype is None
    assert _autocast_in_step(plan.lightning)  # the plugin Lightning builds agrees with the plan


@pytest.mark.parametrize("strategy, precision", [("fsdp", "32-true"), ("fsdp", 32), ("auto", "32-true")])
def test_full_precision_casts_nothing(strategy, precision):
    plan = precision_plan(strategy, precision)
    assert plan.lightning == "32-true" and not plan.autocast and plan.param_dtype is None


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-true"])
def test_a_precision_fsdp2_cannot_own_is_a_one_line_error(precision):
    with pytest.raises(TipslabError, match=rf"trainer.precision={precision} with trainer.strategy=fsdp: expected "
                                           r"one of bf16-mixed, 32-true") as err:
        precision_plan("fsdp", precision)
    assert "\n" not in str(err.value)
