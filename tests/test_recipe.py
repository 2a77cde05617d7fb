"""The TIPSv2 recipe in the pretraining system: features computed once and shared, gradients
reaching exactly what they should, EMA and centres once per optimizer step, start-up checks."""

import lightning as L
import pytest
import torch

from tipslab.errors import TipslabError
from tipslab.modules.checkpoint import save_checkpoint
from tipslab.modules.encoder import build_encoder
from tipslab.platform.config import load_config
from tipslab.platform.grad_clip import clip_grad_norm_
from tipslab.platform.system import PretrainingSystem

SMALL = ["model.vision.img_size=56", "model.text.context_length=16", "data.batch_size=4", "data.num_train=16",
         "data.global_crops.count=2", "data.local_crops.count=2", "data.local_crops.size=28",
         "data.masking.enabled=true", "data.masking.probability=1.0"]
HEADS = [f"components.{c}.{k}={v}" for c in ("dino", "ibot")
         for k, v in (("enabled", "true"), ("prototypes", 64), ("hidden_dim", 32), ("bottleneck_dim", 16))]
RECIPE = [*SMALL, *HEADS, "components.koleo.enabled=true"]


def _cfg(*extra):
    return load_config("tipsv2_tiny", [*RECIPE, *extra])


def _batch(cfg):
    from tipslab.datamodules.datamodule import PretrainDataModule
    from tipslab.modules.tokenizers import build_tokenizer

    tokenizer = build_tokenizer(**cfg.model.tokenizer)
    return next(iter(PretrainDataModule(cfg.data, tokenizer, seed=0).train_dataloader()))


def test_each_backbone_pass_runs_once_per_role_and_view():
    cfg = _cfg()
    system = PretrainingSystem(cfg)
    calls = []
    system.encoder.vision.register_forward_hook(lambda m, args, out: calls.append(tuple(args[0].shape)))
    system(_batch(cfg))
    # student global (2 crops x 4), student local (2 x 4 at 28 px), teacher global (no grad)
    assert sorted(calls) == sorted([(8, 3, 56, 56), (8, 3, 28, 28), (8, 3, 56, 56)])


def test_gradients_reach_students_and_heads_never_ema_heads_centre_or_teacher_pass():
    cfg = _cfg()
    system = PretrainingSystem(cfg)
    batch = _batch(cfg)
    features = system.compute_features(batch)
    assert not features["teacher/global/patches"].requires_grad
    assert features["student/global/patches"].requires_grad
    total, _ = system(batch)
    total.backward()
    for name in ("dino", "ibot"):
        component = system.components[name]
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in component.head.parameters())
        assert all(p.grad is None and not p.requires_grad for p in component.teacher_head.parameters())
        assert not component.centering.center.requires_grad
    assert system.encoder.vision.vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert system.encoder.vision.mask_token.grad.abs().sum() > 0  # masks were used


def test_teacher_pass_sees_unmasked_views_in_eval_mode():
    cfg = _cfg("model.vision.drop_path_rate=0.5")
    system = PretrainingSystem(cfg).train()
    batch = _batch(cfg)
    features = system.compute_features(batch)
    with torch.no_grad():
        expected = system.encoder.vision.eval()(batch.global_crops.flatten(0, 1)).patches
    assert torch.allclose(features["teacher/global/patches"], expected, atol=1e-5)
    assert system.encoder.vision.train().training


def test_head_only_ema_holds_no_second_backbone_full_ema_does():
    head = PretrainingSystem(_cfg("ema.mode=head"))
    full = PretrainingSystem(_cfg("ema.mode=full"))
    assert head.teacher_vision is None and full.teacher_vision is not None
    vision = sum(p.numel() for p in head.encoder.vision.parameters())
    assert full.parameter_counts()["params/ema"] - head.parameter_counts()["params/ema"] == vision
    assert head.parameter_counts()["params/trained"] == full.parameter_counts()["params/trained"]
    assert not any(p.requires_grad for p in full.teacher_vision.parameters())
    # The full-EMA teacher starts as the student's copy, and is what the teacher pass runs.
    cfg = _cfg("ema.mode=full")
    batch = _batch(cfg)
    with torch.no_grad():
        full.teacher_vision.vit.blocks[0].attn.qkv.weight.normal_()  # (a constant vanishes after LayerNorm)
    features = full.compute_features(batch)
    with torch.no_grad():
        own = full.encoder.vision.eval()(batch.global_crops.flatten(0, 1)).patches
    assert not torch.allclose(features["teacher/global/patches"], own, atol=1e-3)


class _Snapshots(L.Callback):
    """Teacher head and centre after every micro-batch."""

    def __init__(self):
        self.heads, self.centres = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        component = pl_module.components["dino"]
        self.heads.append(component.teacher_head.prototypes.detach().clone())
        self.centres.append(component.centering.center.detach().clone())


@pytest.mark.slow
def test_ema_and_centre_move_once_per_optimizer_step_under_accumulation():
    from tipslab.datamodules.datamodule import PretrainDataModule
    from tipslab.modules.tokenizers import build_tokenizer

    cfg = _cfg("trainer.max_steps=2", "trainer.accumulate_grad_batches=2", "ema.momentum=0.5")
    system = PretrainingSystem(cfg)
    start_head = system.components["dino"].teacher_head.prototypes.detach().clone()
    snaps = _Snapshots()
    trainer = L.Trainer(max_steps=2, accumulate_grad_batches=2, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, callbacks=[snaps],
                        enable_model_summary=False)
    trainer.fit(system, datamodule=PretrainDataModule(cfg.data, build_tokenizer(**cfg.model.tokenizer), seed=0))
    assert len(snaps.heads) == 4
    heads = [start_head, *snaps.heads]
    changed = [not torch.equal(a, b) for a, b in zip(heads[:-1], heads[1:])]
    assert changed == [False, True, False, True]  # only after micro-batches 2 and 4
    centres = [torch.zeros_like(snaps.centres[0]), *snaps.centres]
    assert [not torch.equal(a, b) for a, b in zip(centres[:-1], centres[1:])] == [False, True, False, True]


def test_data_that_cannot_feed_a_component_fails_at_start_up():
    with pytest.raises(TipslabError, match="data.local_crops.count"):
        PretrainingSystem(_cfg("data.local_crops.count=0"))
    with pytest.raises(TipslabError, match="data.masking.enabled"):
        PretrainingSystem(_cfg("data.masking.enabled=false"))
    with pytest.raises(TipslabError, match="global_crops.count=2"):
        PretrainingSystem(_cfg("data.local_crops.count=0", "components.dino.local_crops=false",
                               "data.global_crops.count=1"))
    with pytest.raises(TipslabError, match="distill_teacher.path"):
        PretrainingSystem(_cfg("components.distill.enabled=true"))


def test_unknown_component_option_names_the_block():
    with pytest.raises(TipslabError, match="components.dino"):
        from tipslab.modules.components import build_components

        build_components({"dino": {"enabled": True, "protoypes": 3}}, embed_dim=8)


def test_frozen_distillation_teacher_supervises_through_a_projection_and_stays_out_of_checkpoints(tmp_path):
    teacher_cfg = {"vision": {"size": "s", "img_size": 56}, "text": {"size": "s", "context_length": 16},
                   "tokenizer": {"kind": "bpe", "context_length": 16}}
    teacher = build_encoder(teacher_cfg)
    save_checkpoint(teacher, teacher_cfg, tmp_path / "teacher")
    cfg = load_config("ablate_contrastive", [*SMALL, f"distill_teacher.path={tmp_path / 'teacher'}",
                                      "components.distill.enabled=true", "data.masking.enabled=false"])
    system = PretrainingSystem(cfg)
    assert isinstance(system.components["distill"].project, torch.nn.Linear)  # 192 -> 384
    total, outputs = system(_batch(cfg))
    assert set(outputs["distill"].losses) == {"patch_loss", "cls_loss"}
    total.backward()
    assert system.components["distill"].project.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in system.distill_teacher.parameters())
    assert not any(k.startswith("distill_teacher") for k in system.state_dict())
    trained = {id(p) for _, p in system.trainable_parameters()}
    assert not any(id(p) in trained for p in system.distill_teacher.parameters())


def test_distilling_the_dense_readout_pulls_the_students_dense_patches_to_the_teachers(tmp_path):
    from tipslab.modules.losses import cosine_distillation_loss

    teacher_cfg = {"vision": {"size": "tiny", "img_size": 56, "dense_readout": "value"},
                   "text": {"size": "tiny", "context_length": 16}, "tokenizer": {"kind": "bpe", "context_length": 16}}
    torch.manual_seed(1)
    save_checkpoint(build_encoder(teacher_cfg), teacher_cfg, tmp_path / "teacher")
    common = [*SMALL, f"distill_teacher.path={tmp_path / 'teacher'}", "components.distill.enabled=true",
              "components.distill.cls_weight=0", "data.masking.enabled=false"]
    cfg = load_config("ablate_contrastive", [*common, "components.distill.patch_kind=dense"])
    system = PretrainingSystem(cfg)
    batch = _batch(cfg)
    features = system.compute_features(batch)
    images = batch.global_crops.flatten(0, 1)
    with torch.no_grad():
        teacher_dense = system.distill_teacher.forward_dense(images).patches
        teacher_patches = system.distill_teacher(images).patches
    assert torch.equal(features["distill/global/dense"], teacher_dense)
    student_dense = system.encoder.vision.forward_dense(images).patches
    torch.testing.assert_close(features["student/global/dense"], student_dense)
    _, outputs = system(batch)
    expected = cosine_distillation_loss(student_dense, teacher_dense)
    torch.testing.assert_close(outputs["distill"].losses["patch_loss"], expected)
    # The default (the paper's) meets the last block's tokens: another target, another loss.
    default = PretrainingSystem(load_config("ablate_contrastive", common))
    default.load_state_dict(system.state_dict())
    _, outputs = default(batch)
    student_patches = default.encoder.vision(images).patches
    torch.testing.assert_close(outputs["distill"].losses["patch_loss"],
                               cosine_distillation_loss(student_patches, teacher_patches))
    assert not torch.allclose(outputs["distill"].losses["patch_loss"], expected)
    with pytest.raises(TipslabError, match="components.distill.patch_kind"):
        PretrainingSystem(load_config("ablate_contrastive", [*common, "components.distill.patch_kind=value"]))


def test_clip_grad_norm_scales_to_max_norm_and_reports_the_norm_before():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])
    norm = clip_grad_norm_([a, b], max_norm=1.0)
    assert norm.item() == pytest.approx(5.0)
    assert torch.allclose(a.grad, torch.tensor([0.6, 0.0]), atol=1e-5) and b.grad.item() == pytest.approx(0.8, 1e-5)
    clip_grad_norm_([a, b], max_norm=10.0)  # under the limit: untouched
    assert b.grad.item() == pytest.approx(0.8, 1e-5)


def test_clip_grad_norm_on_dtensor_shards(tmp_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        p = torch.nn.Parameter(distribute_tensor(torch.zeros(4), mesh, [Shard(0)]))
        p.grad = distribute_tensor(torch.tensor([3.0, 4.0, 0.0, 0.0]), mesh, [Shard(0)])
        norm = clip_grad_norm_([p], max_norm=2.5)
        assert norm.item() == pytest.approx(5.0)
        assert torch.allclose(p.grad.full_tensor(), torch.tensor([1.5, 2.0, 0.0, 0.0]), atol=1e-5)
    finally:
        dist.destroy_process_group()


def test_ibot_can_share_the_dino_head_trained_and_ema_updated_once():
    separate = PretrainingSystem(_cfg("components.ibot.share_dino_head=false"))
    shared = PretrainingSystem(_cfg("components.ibot.share_dino_head=true"))
    dino, ibot = shared.components["dino"], shared.components["ibot"]
    assert ibot.head is dino.head and ibot.teacher_head is dino.teacher_head
    assert ibot.centering is not dino.centering  # patch logits keep their own centre
    head = sum(p.numel() for p in dino.head.parameters())
    counts, separate_counts = shared.parameter_counts(), separate.parameter_counts()
    assert separate_counts["params/trained"] - counts["params/trained"] == head
    assert separate_counts["params/ema"] - counts["params/ema"] == head
    assert len(shared.momentum_pairs()) == 1
    ids = [id(p) for _, p in shared.trainable_parameters()]
    assert len(ids) == len(set(ids))
    # Both losses reach the shared head.
    batch = _batch(_cfg())
    _, outputs = shared(batch)
    outputs["ibot"].losses["loss"].backward()
    assert dino.head.prototypes.grad.abs().sum() > 0
    with pytest.raises(TipslabError, match="dino.enabled"):
        PretrainingSystem(_cfg("components.ibot.share_dino_head=true", "components.dino.enabled=false"))
