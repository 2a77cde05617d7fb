"""Resolution stages: the stored position table moves to the new grid once, outputs unchanged, resume exact."""

import copy

import lightning as L
import torch
from omegaconf import OmegaConf

from tipslab.datamodules.datamodule import PretrainDataModule
from tipslab.modules.checkpoint import load_checkpoint, save_checkpoint
from tipslab.modules.tokenizers import build_tokenizer
from tipslab.modules.vision import VisionTower
from tipslab.platform.config import load_config
from tipslab.platform.export import export_checkpoint
from tipslab.platform.system import PretrainingSystem

# 42 px (a 3x3 grid) for two steps, then 56 px (4x4) from step 2.
OVERRIDES = ["model.vision.img_size=42", "model.text.context_length=8", "model.tokenizer.context_length=8",
             "data.num_train=16", "data.batch_size=4", "data.resolution_stages=[{step: 2, image_size: 56}]",
             "optim.warmup_steps=1", "trainer.max_steps=5"]


def test_set_pos_grid_keeps_outputs_and_resizes_the_optimizer_state():
    torch.manual_seed(0)
    tower = VisionTower("tiny", img_size=28).eval()
    with torch.no_grad():
        tower.vit.pos_embed.normal_()  # a table that is not near zero, so the resize matters
    images = torch.rand(2, 3, 56, 56)
    param = tower.vit.pos_embed
    optimizer = torch.optim.AdamW(tower.parameters(), lr=1e-3)
    tower(torch.rand(2, 3, 28, 28)).cls1.sum().backward()
    optimizer.step()
    with torch.no_grad():
        on_the_fly = tower(images)
    tower.set_pos_grid(4, [optimizer])
    assert tower.vit.pos_embed is param and param.shape == (1, 16, tower.embed_dim)
    assert tower.pos_grid == 4 and tower.img_size == 56 and tuple(tower.vit.patch_embed.grid_size) == (4, 4)
    state = optimizer.state[param]
    assert state["exp_avg"].shape == param.shape and (state["exp_avg_sq"] >= 0).all()
    with torch.no_grad():
        stored = tower(images)
    for a, b in [(on_the_fly.cls1, stored.cls1), (on_the_fly.patches, stored.patches)]:
        assert torch.allclose(a, b, atol=1e-5)
    optimizer.zero_grad()
    tower(images).cls1.sum().backward()
    optimizer.step()  # the resized state steps with the resized parameter


def _fit(tmp_path, max_steps, ckpt_path=None, save_every=None):
    from lightning.pytorch.callbacks import ModelCheckpoint

    cfg = load_config("ablate_contrastive", [*OVERRIDES, f"trainer.max_steps={max_steps}"])
    torch.manual_seed(0)
    system = PretrainingSystem(cfg)
    callbacks = [ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=save_every, save_top_k=-1,
                                 filename="step{step}", auto_insert_metric_name=False)] if save_every else []
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=bool(save_every), callbacks=callbacks,
                        default_root_dir=tmp_path, limit_val_batches=0)
    datamodule = PretrainDataModule(cfg.data, build_tokenizer(**cfg.model.tokenizer), seed=int(cfg.seed))
    grids, outputs = [], []

    def patches(module, images):  # the tower's output with the weights of this moment
        tower = module.encoder.vision
        was_training = tower.training
        with torch.no_grad():
            out = tower.eval()(images).patches
        tower.train(was_training)
        return out

    class Watch(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):  # before the system's own hook
            self.images = batch.images
            outputs.append([patches(module, batch.images)])

        def on_before_backward(self, trainer, module, loss):  # after it; the weights are not updated yet
            outputs[-1].append(patches(module, self.images))

        def on_train_batch_end(self, trainer, module, outputs_, batch, batch_idx):
            grids.append((batch.images.shape[-1], module.encoder.vision.pos_grid))

    trainer.callbacks.append(Watch())
    trainer.fit(system, datamodule=datamodule, ckpt_path=ckpt_path)
    return system, grids, outputs


def test_stage_switch_resizes_once_and_a_resume_after_it_is_exact(tmp_path):
    checkpoints = tmp_path / "run" / "checkpoints"
    full, grids, outputs = _fit(checkpoints, max_steps=5, save_every=3)
    assert grids == [(42, 3), (42, 3), (56, 4), (56, 4), (56, 4)]  # the table followed the stage at step 2
    on_the_fly, stored = outputs[2]  # the switch step: interpolated from 3x3 before, the stored 4x4 after
    assert on_the_fly.shape == stored.shape and torch.allclose(on_the_fly, stored, atol=1e-5)
    assert full.encoder.vision.vit.pos_embed.shape[1] == 16
    resumed, grids, _ = _fit(tmp_path / "resumed", max_steps=5, ckpt_path=checkpoints / "step3.ckpt")
    assert grids == [(56, 4), (56, 4)]
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    # The saved model and `tipslab export` of a training checkpoint record the grid it now runs at.
    cfg = load_config("ablate_contrastive", OVERRIDES)
    save_checkpoint(full.encoder, cfg.model, tmp_path / "model")
    OmegaConf.save(cfg, tmp_path / "run" / "config.yaml")
    export_checkpoint(checkpoints / "step3.ckpt", tmp_path / "exported")
    for folder in ("model", "exported"):
        encoder, model_cfg = load_checkpoint(tmp_path / folder)
        assert model_cfg["vision"]["img_size"] == 56 and encoder.vision.pos_grid == 4
    assert torch.equal(load_checkpoint(tmp_path / "model")[0].vision.vit.pos_embed, full.encoder.vision.vit.pos_embed)


def test_no_stages_no_switch():
    cfg = load_config("ablate_contrastive", OVERRIDES[:-3])
    system = PretrainingSystem(cfg)
    from tipslab.platform.resolution_switch import follow_resolution_stage

    assert not follow_resolution_stage(system, torch.rand(1, 3, 56, 56))
    assert system.encoder.vision.pos_grid == 3
    staged = PretrainingSystem(load_config("ablate_contrastive", OVERRIDES))
    before = copy.deepcopy(staged.encoder.vision)
    assert follow_resolution_stage(staged, torch.rand(1, 3, 56, 56))
    assert staged.encoder.vision.pos_grid == 4 and before.pos_grid == 3


def test_a_full_ema_teacher_follows_the_student():
    from tipslab.platform.ema import ema_update_
    from tipslab.platform.resolution_switch import follow_resolution_stage

    system = PretrainingSystem(load_config("ablate_head_ema", [*OVERRIDES[:3], OVERRIDES[5], "ema.mode=full"]))
    assert system.teacher_vision is not None and system.teacher_vision.pos_grid == 3
    assert follow_resolution_stage(system, torch.rand(1, 3, 56, 56))
    assert system.encoder.vision.pos_grid == system.teacher_vision.pos_grid == 4
    ema_update_(system.momentum_pairs(), 0.9)  # the pairs still line up, shape for shape
    assert system.teacher_vision.vit.pos_embed.shape == system.encoder.vision.vit.pos_embed.shape
