import math

import pytest
import torch

from tipslab.errors import TipslabError
from tipslab.modules.components import (
    build_components,
    registered_components,
    weighted_total,
)
from tipslab.modules.contrastive import (
    ContrastiveComponent,
    clip_loss_reference,
    retrieval_accuracy,
)
from tipslab.modules.features import Features, LossOutput, key


def test_two_pair_clip_loss_matches_hand_computation():
    # Orthogonal unit vectors: matching pairs have cosine 1, others 0.
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = image.clone()
    scale = 2.0
    # Each row: softmax over logits [2, 0] -> -log(e^2 / (e^2 + 1)).
    expected = -math.log(math.exp(2) / (math.exp(2) + 1))
    component = ContrastiveComponent(embed_dim=2)
    got = component.pair_loss(image, text, torch.tensor([math.log(scale)]))
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert clip_loss_reference(image, text, scale).item() == pytest.approx(expected, rel=1e-6)


def _features(b=4, d=8, crops=1):
    torch.manual_seed(0)
    values = {
        key("student/global/cls1"): torch.randn(crops * b, d), key("student/global/cls2"): torch.randn(crops * b, d),
        key("text/alt/pooled"): torch.randn(b, d), key("text/caption/pooled"): torch.randn(b, d),
    }
    return Features(logit_scale=torch.tensor([math.log(1 / 0.07)]), batch_size=b, num_global=crops, values=values)


def test_component_returns_named_terms_for_both_cls_tokens():
    feats = _features()
    out = ContrastiveComponent(embed_dim=8, cls2_weight=0.5)(feats)
    assert set(out.losses) == {"cls1_loss", "cls2_loss"}
    full = ContrastiveComponent(embed_dim=8)(feats)
    half = out.losses["cls2_loss"] / full.losses["cls2_loss"]
    assert half.item() == pytest.approx(0.5)
    assert out.metrics["temperature"].item() == pytest.approx(0.07, rel=1e-5)


def test_needs_follow_the_weights_no_text_pass_for_a_zero_weight():
    only_cls1 = ContrastiveComponent(embed_dim=8, cls2_weight=0.0)
    assert {str(k) for k in only_cls1.needs} == {"student/global/cls1", "text/alt/pooled"}
    assert set(only_cls1(_features()).losses) == {"cls1_loss"}


def test_views_first_uses_the_first_crop_global_averages_every_crop():
    feats = _features(crops=2)
    first = ContrastiveComponent(embed_dim=8, cls2_weight=0.0, views="first")(feats).losses["cls1_loss"]
    both = ContrastiveComponent(embed_dim=8, cls2_weight=0.0, views="global")(feats).losses["cls1_loss"]
    crops = feats.by_view("student/global/cls1")
    text = feats["text/alt/pooled"]
    scale = 1 / 0.07
    assert first.item() == pytest.approx(clip_loss_reference(crops[0], text, scale).item(), rel=1e-5)
    mean = (clip_loss_reference(crops[0], text, scale) + clip_loss_reference(crops[1], text, scale)) / 2
    assert both.item() == pytest.approx(mean.item(), rel=1e-5)
    with pytest.raises(TipslabError, match="views"):
        ContrastiveComponent(embed_dim=8, views="local")


def test_sigmoid_kind_has_learnable_bias_and_finite_loss():
    component = ContrastiveComponent(embed_dim=4, kind="sigmoid")
    assert [p.shape for p in component.learnable_params()] == [torch.Size([1])]
    x = torch.randn(3, 4)
    assert torch.isfinite(component.pair_loss(x, x, torch.tensor([math.log(10.0)])))


def test_retrieval_accuracy_counts_own_caption_hits():
    image = torch.eye(3)
    text = torch.stack([torch.eye(3)[0], torch.eye(3)[2], torch.eye(3)[1]])
    assert retrieval_accuracy(image, text).item() == pytest.approx(1 / 3)


def test_registry_builds_enabled_components_and_rejects_unknown():
    assert "contrastive" in registered_components()
    built = build_components({"contrastive": {"enabled": True, "weight": 2.0}}, embed_dim=8)
    assert list(built) == ["contrastive"] and built["contrastive"].weight == 2.0
    with pytest.raises(TipslabError, match="components.ibot_typo"):
        build_components({"ibot_typo": {"enabled": True}}, embed_dim=8)
    with pytest.raises(TipslabError, match="no loss component is enabled"):
        build_components({"contrastive": {"enabled": False}}, embed_dim=8)


def test_weighted_total_sums_weighted_terms():
    outputs = {
        "a": LossOutput(losses={"x": torch.tensor(1.0), "y": torch.tensor(2.0)}),
        "b": LossOutput(losses={"z": torch.tensor(4.0)}),
    }
    assert weighted_total(outputs, {"a": 0.5, "b": 2.0}).item() == pytest.approx(9.5)


def test_patch_max_loss_takes_the_best_patch_per_text():
    from tipslab.modules.contrastive import patch_max_clip_loss

    # Image 0's patches: [1,0] and [0,1]; image 1's: [-1,0] twice. Texts [1,0] and [0,1].
    patches = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[-1.0, 0.0], [-1.0, 0.0]]])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    scale = 2.0
    # Best-patch cosines: image 0 -> (1, 1), image 1 -> (-1, 0).
    e = math.exp
    # Rows (image -> texts): logits [2, 2] and [-2, 0]; columns (text -> images): [2, -2] and [2, 0].
    rows = [-math.log(e(2) / (e(2) + e(2))), -math.log(e(0) / (e(-2) + e(0)))]
    cols = [-math.log(e(2) / (e(2) + e(-2))), -math.log(e(0) / (e(2) + e(0)))]
    expected = 0.5 * (sum(rows) / 2 + sum(cols) / 2)
    assert patch_max_clip_loss(patches, text, scale).item() == pytest.approx(expected, rel=1e-6)
    # Gradient reaches exactly the patches that are some text's best patch of their image.
    torch.manual_seed(0)
    patches, text = torch.randn(3, 5, 4, requires_grad=True), torch.randn(3, 4)
    patch_max_clip_loss(patches, text, scale).backward()
    best = torch.einsum("bnd,td->btn", torch.nn.functional.normalize(patches.detach(), dim=-1),
                        torch.nn.functional.normalize(text, dim=-1)).argmax(-1)  # [B images, B texts]
    for b in range(3):
        chosen = set(best[b].tolist())
        assert all((patches.grad[b, n].abs().sum() > 0) == (n in chosen) for n in range(5))


def test_dense_term_reads_the_dense_patches_and_checks_its_settings():
    component = ContrastiveComponent(embed_dim=8, dense_weight=0.5, dense_pool="mean")
    assert key("student/global/dense") in component.needs
    features = _features()
    features.values[key("student/global/dense")] = torch.randn(4, 6, 8)
    out = component(features)
    expected = 0.5 * component.pair_loss(features["student/global/dense"].mean(1), features["text/alt/pooled"],
                                         features.logit_scale)
    assert out.losses["dense_loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(TipslabError, match="dense_pool='sum'"):
        ContrastiveComponent(embed_dim=8, dense_weight=1.0, dense_pool="sum")
