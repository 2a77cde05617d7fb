"""Does pretraining help the dense probes? The linear segmentation and depth suites on a tiny
encoder trained here against the same suites on the untrained encoder (a test that can fail).

"Clearly above" is measured against the room the patch grid leaves: each suite also scores the
per-patch oracle (modules/patch_oracle.py), the best a prediction made per 14-px patch can do,
and the trained encoder must close a quarter of the untrained one's distance to it. On the
scenes at 112 px that room is wide for segmentation (untrained mIoU 0.09, oracle 0.49) and
narrow for depth (untrained RMSE 0.88 m, oracle 0.73 m): a random tower's patch tokens keep each
patch's colour and row, which is most of what a per-patch depth can know. (An earlier version
asked for 0.8x the untrained RMSE, 0.70 m, about the oracle itself: only a perfect
per-patch encoder could have passed.)

Measured on this CPU (docs/RECIPE.md, "Dense probes on the demo's model"): every tiny encoder
trained here, 120 to 1500 steps of the demo's recipe and 300 steps of the whole recipe, probes
near the level of colour alone (mIoU 0.08-0.09, a colour-only oracle 0.04, the full one 0.49: the
classes are colour + shape, and the patches do not learn shape at this budget), and for depth
about what the row alone gives (RMSE 1.17-1.19 m against 1.22 for one mean per row), where the
random tower also tells object from wall (0.88 m), from the first block on. The mark is strict:
the day a recipe makes the test pass, the suite fails and says so, and the mark goes.
"""

import pytest
import torch

from tipslab.modules.api import load_model
from tipslab.modules.checkpoint import save_checkpoint
from tipslab.modules.encoder import build_encoder
from tipslab.platform.config import load_config
from tipslab.platform.probe_suites import depth_suite, linear_seg_suite
from tipslab.platform.train import train

pytestmark = pytest.mark.slow

SUITE = dict(steps=300, num_train=256, num_val=64, seed=0)


def untrained_encoder(path):
    torch.manual_seed(0)
    cfg = load_config("tipsv2_tiny", [])
    save_checkpoint(build_encoder(cfg.model), cfg.model, path)
    return load_model(path)


def test_the_patch_grid_leaves_room_above_an_untrained_tower(tmp_path):
    """The bar below is reachable: the oracle sits above the untrained tower on both suites."""
    untrained = untrained_encoder(tmp_path / "untrained")
    seg, depth = linear_seg_suite(untrained, **SUITE), depth_suite(untrained, **SUITE)
    assert seg["linear_seg/patch_oracle_miou"] > seg["linear_seg/miou"] + 0.2
    assert depth["depth/patch_oracle_rmse"] < depth["depth/rmse"]


@pytest.mark.xfail(strict=True, reason="measured 2026-12-06, 120 pretraining steps: linear_seg/miou 0.080 trained "
                   "vs 0.093 untrained; depth/rmse 1.17 m trained vs 0.88 m untrained (per-patch oracle, "
                   "2026-12-06: 0.49 and 0.73 m)")
def test_probes_on_a_trained_tiny_encoder_beat_an_untrained_one(tmp_path):
    cfg = load_config("tipsv2_tiny", [f"run_dir={tmp_path / 'run'}", "trainer.max_steps=120", "tracking.pictures=false",
                                      "eval.pointing_game=false", "trainer.progress_bar=false",
                                      "checkpoint.every_n_steps=1000"])
    trained = load_model(train(cfg).model_dir)
    untrained = untrained_encoder(tmp_path / "untrained")

    seg_t, seg_u = linear_seg_suite(trained, **SUITE), linear_seg_suite(untrained, **SUITE)
    depth_t, depth_u = depth_suite(trained, **SUITE), depth_suite(untrained, **SUITE)
    print("trained", seg_t, depth_t, "untrained", seg_u, depth_u)
    seg_room = seg_t["linear_seg/patch_oracle_miou"] - seg_u["linear_seg/miou"]
    depth_room = depth_u["depth/rmse"] - depth_t["depth/patch_oracle_rmse"]
    assert seg_t["linear_seg/miou"] > seg_u["linear_seg/miou"] + seg_room / 4
    assert depth_t["depth/rmse"] < depth_u["depth/rmse"] - depth_room / 4
