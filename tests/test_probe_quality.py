"""Does pretraining help the dense probes? The linear segmentation and depth suites on a tiny
encoder trained here against the same suites on the untrained encoder (a test that can fail).

Measured on this CPU (see the xfail reason): with the current recipe and a CPU budget the
trained tiny encoder does not beat random features. The scenes' classes are colour + shape and
a random ViT's patch tokens keep each patch's colour (linearly readable), while a few hundred
steps of image-text training do not yet put the object's shape into its patch tokens; the
untrained tower even keeps the row position better (the wall's depth depends on it). Reading all
four blocks (DINOv2's lin. 4, `encoder.layers=[0,1,2,3]`) does not change that (docs/RECIPE.md,
"Dense probes on the demo's model"). The mark is strict: the day a recipe makes the test pass,
the suite fails and says so, and the mark goes.
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


@pytest.mark.xfail(strict=True, reason="measured 2026-11-26, 120 pretraining steps: linear_seg/miou 0.082 trained "
                   "vs 0.095 untrained; depth/rmse 1.18 m trained vs 0.87 m untrained (see module docstring)")
def test_probes_on_a_trained_tiny_encoder_beat_an_untrained_one(tmp_path):
    cfg = load_config("tipsv2_tiny", [f"run_dir={tmp_path / 'run'}", "trainer.max_steps=120", "tracking.pictures=false",
                                      "eval.pointing_game=false", "trainer.progress_bar=false",
                                      "checkpoint.every_n_steps=1000"])
    trained = load_model(train(cfg).model_dir)
    torch.manual_seed(0)
    save_checkpoint(build_encoder(cfg.model), cfg.model, tmp_path / "untrained")
    untrained = load_model(tmp_path / "untrained")

    seg_t, seg_u = linear_seg_suite(trained, **SUITE), linear_seg_suite(untrained, **SUITE)
    depth_t, depth_u = depth_suite(trained, **SUITE), depth_suite(untrained, **SUITE)
    print("trained", seg_t, depth_t, "untrained", seg_u, depth_u)
    assert seg_t["linear_seg/miou"] > seg_u["linear_seg/miou"] + 0.05
    assert depth_t["depth/rmse"] < 0.8 * depth_u["depth/rmse"]
