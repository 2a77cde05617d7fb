import pytest
import torch

from tipslab.datamodules.batch import Batch
from tipslab.platform.config import load_config
from tipslab.platform.system import PretrainingSystem, warmup_cosine


def _system(*overrides):
    return PretrainingSystem(load_config("ablate_contrastive", ["model.vision.img_size=56", "model.text.context_length=8", *overrides]))


def _batch(n=4, size=56, length=8):
    g = torch.Generator().manual_seed(0)
    return Batch(
        images=torch.rand(n, 3, size, size, generator=g),
        alt_ids=torch.randint(1, 500, (n, length), generator=g),
        caption_ids=torch.randint(1, 500, (n, length), generator=g),
        ids=[str(i) for i in range(n)],
    )


def test_warmup_then_cosine_schedule():
    assert warmup_cosine(0, 10, 110, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 110, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(60, 10, 110, 0.1) == pytest.approx(0.55)
    assert warmup_cosine(500, 10, 110, 0.1) == pytest.approx(0.1)


def test_forward_sums_named_terms_of_enabled_components():
    system = _system("components.contrastive.cls2_weight=0.0")
    total, outputs = system(_batch())
    assert set(outputs["contrastive"].losses) == {"cls1_loss"}
    assert total.item() == pytest.approx(outputs["contrastive"].losses["cls1_loss"].item())


def test_fused_text_pass_equals_two_separate_passes():
    system = _system().eval()
    batch = _batch()
    features = system.compute_features(batch)
    assert torch.allclose(features["text/alt/pooled"], system.encoder.encode_text(batch.alt_ids), atol=1e-5)
    assert torch.allclose(features["text/caption/pooled"], system.encoder.encode_text(batch.caption_ids), atol=1e-5)


def test_optimizer_decays_matrices_but_not_norms_tokens_or_temperature():
    system = _system()
    optimizer = system.configure_optimizers()["optimizer"]
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] > 0 and no_decay["weight_decay"] == 0
    no_decay_ids = {id(p) for p in no_decay["params"]}
    vit = system.encoder.vision.vit
    for param in (system.encoder.logit_scale, vit.cls_token, vit.reg_token, system.encoder.vision.mask_token,
                  vit.norm.weight):
        assert id(param) in no_decay_ids
    assert id(vit.blocks[0].attn.qkv.weight) in {id(p) for p in decay["params"]}
    counted = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    assert counted == sum(p.numel() for p in system.parameters() if p.requires_grad)


def test_dense_term_shares_one_pass_with_the_cls_tokens_and_keeps_its_block_in_the_fsdp2_root():
    from tipslab.platform.parallelize import blocks_read_outside_forward

    system = _system("components.contrastive.dense_weight=1.0").eval()
    batch = _batch()
    features = system.compute_features(batch)
    vision = system.encoder.vision
    assert torch.allclose(features["student/global/cls1"], vision(batch.images).cls1, atol=1e-5)
    assert torch.allclose(features["student/global/dense"], vision.forward_dense(batch.images).patches, atol=1e-5)
    total, outputs = system(batch)
    assert "dense_loss" in outputs["contrastive"].losses
    total.backward()
    assert vision.vit.blocks[-1].attn.qkv.weight.grad.abs().sum() > 0
    assert blocks_read_outside_forward(system) == [vision.blocks[-1]]
    assert blocks_read_outside_forward(_system()) == []
