"""`tipslab probe`: a probe run is tracked in MLflow, checkpoints only its head, resumes into the
same run, and a DPT head exports a decoder file that `load_decoder` reads back."""

import mlflow
import pytest
import torch
from safetensors.torch import load_file

from tipslab.errors import TipslabError
from tipslab.modules.checkpoint import save_checkpoint
from tipslab.modules.encoder import build_encoder
from tipslab.modules.official_decoders import load_decoder
from tipslab.platform.config import available_experiments, load_config
from tipslab.platform.probe_train import train_probe

SMALL = ["data.num_train=16", "data.num_val=4", "data.batch_size=4", "trainer.progress_bar=false",
         "trainer.accelerator=cpu", "trainer.log_every_n_steps=1"]


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    torch.manual_seed(0)
    model_cfg = load_config("tipsv2_tiny", ["model.vision.img_size=56"]).model
    path = tmp_path_factory.mktemp("enc") / "model"
    save_checkpoint(build_encoder(model_cfg), model_cfg, path)
    return path


def test_probe_experiments_are_their_own_key_set():
    probes = available_experiments("defaults_probe")
    assert {"probe_seg_scenes", "probe_depth_scenes", "probe_dpt_depth_scenes"} <= set(probes)
    assert not set(probes) & set(available_experiments())
    for name in probes:
        cfg = load_config(name, ["encoder.path=x"], defaults="defaults_probe")
        assert cfg.head.task in ("seg", "depth", "normals")
    with pytest.raises(TipslabError, match="did you mean 'head.depth_bins'"):
        load_config("probe_depth_scenes", ["head.depth_bin=64"], defaults="defaults_probe")


@pytest.mark.slow
def test_probe_run_is_tracked_checkpoints_its_head_and_resumes(tmp_path, encoder_dir):
    run_dir = tmp_path / "runs" / "p"
    common = [*SMALL, f"encoder.path={encoder_dir}", f"run_dir={run_dir}", "checkpoint.every_n_steps=2"]
    first = train_probe(load_config("probe_seg_scenes", [*common, "trainer.max_steps=4"], defaults="defaults_probe"))
    assert 0.0 <= first.metrics["seg/miou"] <= 1.0 and first.run_id
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 4
    assert all(key.startswith("head.") for key in checkpoint["state_dict"])  # the frozen encoder stays out
    assert set(load_file(run_dir / "head.safetensors")) == {k[len("head."):] for k in checkpoint["state_dict"]}

    second = train_probe(load_config("probe_seg_scenes", [*common, "trainer.max_steps=6", "checkpoint.resume=last"],
                                     defaults="defaults_probe"))
    assert second.run_id == first.run_id
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    losses = client.get_metric_history(first.run_id, "probe/loss")
    assert sorted({m.step for m in losses}) == list(range(6))
    run = client.get_run(first.run_id)
    assert "seg/miou" in run.data.metrics and run.data.params["head.kind"] == "linear"
    assert {"probe"} <= {a.path for a in client.list_artifacts(first.run_id)}


@pytest.mark.slow
def test_dpt_probe_exports_an_official_layout_decoder(tmp_path, encoder_dir):
    cfg = load_config("probe_dpt_depth_scenes", [*SMALL, f"encoder.path={encoder_dir}", f"run_dir={tmp_path / 'd'}",
                                                 "trainer.max_steps=2", "head.dpt_channels=16", "tracking.enabled=false",
                                                 "checkpoint.every_n_steps=0"], defaults="defaults_probe")
    result = train_probe(cfg)
    assert set(result.metrics) == {f"depth/{prefix}{key}" for prefix in ("", "patch_oracle_")
                                   for key in ("rmse", "abs_rel", "delta1")}
    decoder = load_decoder(tmp_path / "d" / "decoder.npz", embed_dim=192)
    assert decoder.task == "depth" and decoder.channels == 16


def test_a_linear_probe_over_several_layers_reads_their_concatenated_tokens():
    # DINOv2's "lin. 4": per patch, every layer's tokens side by side (and each layer's CLS for depth).
    from tipslab.modules.probes import LinearProbe
    from tipslab.modules.vision import VisionOutput

    torch.manual_seed(0)
    dim, grid = 4, (2, 3)
    outs = [VisionOutput(cls1=torch.randn(2, dim), cls2=torch.randn(2, dim), patches=torch.randn(2, 6, dim), grid=grid)
            for _ in range(3)]
    probe = LinearProbe("seg", dim, num_outputs=5, num_layers=3).eval()
    assert probe.linear.in_features == 3 * dim
    got = probe(outs, grid)  # at the grid's own size, interpolation is the identity
    tokens = torch.cat([o.patches for o in outs], dim=-1).reshape(12, 3 * dim)
    want = probe.linear(probe.norm(tokens)).reshape(2, *grid, 5).permute(0, 3, 1, 2)
    assert torch.allclose(got, want, atol=1e-6)
    # Depth appends each layer's CLS after its patches: the layer order matters, so a swap changes it.
    depth = LinearProbe("depth", dim, num_layers=2).eval()
    assert depth.linear.in_features == 2 * 2 * dim
    assert not torch.allclose(depth(outs[:2], grid), depth(outs[1::-1], grid))
    with pytest.raises(TipslabError, match="reads 3 layer"):
        probe(outs[:2], grid)


@pytest.mark.slow
def test_encoder_layers_feed_a_linear_probe_every_block_named(tmp_path, encoder_dir):
    run_dir = tmp_path / "runs" / "lin4"
    cfg = load_config("probe_depth_scenes", [*SMALL, f"encoder.path={encoder_dir}", f"run_dir={run_dir}",
                                             "trainer.max_steps=2", "encoder.layers=[0,1,2,3]",
                                             "tracking.enabled=false", "checkpoint.every_n_steps=0"],
                      defaults="defaults_probe")
    result = train_probe(cfg)
    assert result.metrics["depth/rmse"] > 0
    weight = load_file(run_dir / "head.safetensors")["linear.weight"]
    assert weight.shape[1] == 4 * 2 * 192  # four blocks, patch + CLS each, tiny width 192
