"""Hard-negative captions: the word swap, the loss on hand-computed cases, the data that carries
them and the system that encodes them."""

import math

import numpy as np
import pytest
import torch

from tipslab.datamodules.batch import Batch
from tipslab.datamodules.datamodule import PretrainDataModule
from tipslab.datamodules.hard_negatives import WordSwap
from tipslab.datamodules.scenes import SHAPES
from tipslab.errors import TipslabError
from tipslab.modules.components import DataViews
from tipslab.modules.contrastive import ContrastiveComponent, hard_negative_loss
from tipslab.modules.features import Features, key
from tipslab.modules.tokenizers import build_tokenizer
from tipslab.platform.config import load_config
from tipslab.platform.system import PretrainingSystem, data_views

SHAPE_GROUP = [list(SHAPES)]


def test_swap_changes_exactly_one_word_to_another_of_its_group():
    swap = WordSwap([["circle", "square", "star"], ["red", "blue"]])
    text = "Red circle, blue star and a circled square."  # "circled" is not a whole word of a group
    seen = set()
    for seed in range(40):
        out = swap(text, np.random.default_rng(seed))
        before, after = text.split(" "), out.split(" ")
        changed = [(a, b) for a, b in zip(before, after) if a != b]
        assert len(before) == len(after) and len(changed) == 1, out
        (old, new), = changed
        assert "circled" in out
        if old == "Red":
            assert new == "Blue"  # capitalisation kept, other word of the colour group
        seen.add(old.strip(",.").lower())
    assert seen == {"red", "circle", "blue", "star", "square"}  # every occurrence can be the one swapped
    assert swap(text, np.random.default_rng(3)) == swap(text, np.random.default_rng(3))
    assert swap("An empty dark background.", np.random.default_rng(0)) == ""


@pytest.mark.parametrize("groups, message", [
    ("circle", r"expected a list of word lists"),
    ([["circle"]], r"\[0\].*at least two distinct"),
    ([["circle", "square"], ["square", "star"]], r"'square' is in groups 0 and 1"),
    ([["two words", "one"]], r"single words"),
])
def test_bad_word_groups_are_refused_naming_the_key(groups, message):
    with pytest.raises(TipslabError, match=r"data\.hard_negatives\.words.*" + message):
        WordSwap(groups)


def test_hard_negative_loss_matches_hand_computation_and_skips_texts_without_one():
    image = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    negative = torch.tensor([[0.0, 1.0], [3.0, 0.0], [0.0, 1.0]])
    valid = torch.tensor([True, True, False])
    scale = 2.0
    # Rows 0 and 1: cosine 1 to the caption, 0 to the negative -> -log(e^2 / (e^2 + e^0)).
    expected = -math.log(math.exp(2) / (math.exp(2) + 1))
    assert hard_negative_loss(image, text, negative, valid, scale).item() == pytest.approx(expected, rel=1e-6)
    # The third image ties its caption and negative (log 2): counted only when it has a negative.
    all_valid = hard_negative_loss(image, text, negative, torch.ones(3, dtype=torch.bool), scale).item()
    assert all_valid == pytest.approx((2 * expected + math.log(2)) / 3, rel=1e-6)
    image.requires_grad_(True)
    hard_negative_loss(image, text, negative, valid, scale).backward()
    assert image.grad[2].abs().sum() == 0 and image.grad[:2].abs().sum() > 0
    none = hard_negative_loss(image, text, negative, torch.zeros(3, dtype=torch.bool), scale)
    assert none.item() == 0 and none.requires_grad


def test_component_adds_a_named_term_per_slot_and_refuses_data_without_negatives():
    component = ContrastiveComponent(embed_dim=4, hard_negative_weight=0.5)
    assert key("text/alt_negative/pooled") in component.needs and key("text/caption_negative/pooled") in component.needs
    with pytest.raises(TipslabError, match=r"hard_negative_weight > 0.*data\.hard_negatives\.words"):
        component.check_data(DataViews())
    component.check_data(DataViews(negatives=True))
    torch.manual_seed(0)
    b = 4
    values = {key(k): torch.randn(b, 4) for k in ("student/global/cls1", "student/global/cls2", "text/alt/pooled",
                                                  "text/caption/pooled", "text/alt_negative/pooled",
                                                  "text/caption_negative/pooled")}
    valid = torch.tensor([[True, True, False, True], [True, True, True, True]])
    scale = torch.tensor([math.log(10.0)])
    out = component(Features(logit_scale=scale, batch_size=b, values=values, negative_valid=valid))
    assert set(out.losses) == {"cls1_loss", "cls2_loss", "cls1_hard_negative_loss", "cls2_hard_negative_loss"}
    expected = 0.5 * hard_negative_loss(values[key("student/global/cls1")], values[key("text/alt/pooled")],
                                        values[key("text/alt_negative/pooled")], valid[0], 10.0)
    assert out.losses["cls1_hard_negative_loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert 0.0 <= out.metrics["hard_negative_acc_cls1"].item() <= 1.0
    with pytest.raises(TipslabError, match="hard_negative_weight"):
        ContrastiveComponent(embed_dim=4, hard_negative_weight=-1.0)


def test_batches_carry_negatives_of_their_own_texts_seeded():
    tokenizer = build_tokenizer(context_length=32)
    cfg = {"source": "scenes", "num_train": 16, "num_val": 4, "image_size": 56, "batch_size": 8,
           "hard_negatives": {"words": SHAPE_GROUP}}
    batch = next(iter(PretrainDataModule(cfg, tokenizer, seed=0).train_dataloader()))
    again = next(iter(PretrainDataModule(cfg, tokenizer, seed=0).train_dataloader()))
    plain = next(iter(PretrainDataModule({**cfg, "hard_negatives": {"words": []}}, tokenizer, seed=0).train_dataloader()))
    assert torch.equal(batch.alt_negative_ids, again.alt_negative_ids)
    # Negatives are drawn last: the rest of the batch is the batch without them.
    assert torch.equal(batch.images, plain.images) and batch.captions == plain.captions
    assert plain.alt_negative_ids is None and plain.negative_valid is None
    assert batch.negative_valid.shape == (2, 8)
    shape_words = set(SHAPES)
    for i, alt in enumerate(batch.alt_texts):
        has_shape = bool(shape_words & set(alt.replace(",", "").split()))
        assert bool(batch.negative_valid[0, i]) == has_shape  # "background" crops have no negative
        assert not has_shape or not torch.equal(batch.alt_negative_ids[i], batch.alt_ids[i])
    assert batch.negative_valid[0].any() and batch.negative_valid[1].any()


def test_system_encodes_negatives_in_the_one_text_pass_and_config_checks_the_data():
    overrides = ["model.vision.img_size=56", "model.text.context_length=8",
                 "components.contrastive.hard_negative_weight=1.0"]
    cfg = load_config("ablate_contrastive", [*overrides, "data.hard_negatives.words=[[circle,square]]"])
    assert data_views(cfg.data).negatives
    assert not data_views(load_config("ablate_contrastive", overrides).data).negatives
    system = PretrainingSystem(cfg).eval()
    g = torch.Generator().manual_seed(0)
    ids = {name: torch.randint(1, 500, (4, 8), generator=g)
           for name in ("alt_ids", "caption_ids", "alt_negative_ids", "caption_negative_ids")}
    batch = Batch(images=torch.rand(4, 3, 56, 56, generator=g), ids=list("abcd"),
                  negative_valid=torch.ones(2, 4, dtype=torch.bool), **ids)
    features = system.compute_features(batch)
    expected = system.encoder.encode_text(batch.alt_negative_ids)
    assert torch.allclose(features["text/alt_negative/pooled"], expected, atol=1e-5)
    total, outputs = system(batch)
    assert "cls2_hard_negative_loss" in outputs["contrastive"].losses and torch.isfinite(total)
    no_negatives = Batch(images=batch.images, alt_ids=batch.alt_ids, caption_ids=batch.caption_ids, ids=batch.ids)
    with pytest.raises(TipslabError, match="alt_negative, caption_negative texts"):
        system.compute_features(no_negatives)
