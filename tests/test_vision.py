"""The vision tower: shapes at any multiple of 14, the mask token, official position resizing,
the dense (value-path) output, and agreement of the size table with timm's TIPSv2 models."""

import math

import pytest
import torch
import torch.nn.functional as F

from tipslab.errors import TipslabError
from tipslab.modules.vision import TIMM_NAMES, VISION_SIZES, VisionTower


@pytest.fixture(scope="module")
def tower():
    torch.manual_seed(0)
    model = VisionTower("tiny", img_size=56).eval()
    # Random, non-trivial tokens so that every path matters (zeros would hide bugs).
    with torch.no_grad():
        for name in ("mask_token",):
            getattr(model, name).normal_()
        model.vit.pos_embed.normal_(std=0.5)
        model.vit.reg_token.normal_()
    return model


def test_shapes_at_native_and_odd_sizes(tower):
    images = torch.rand(2, 3, 56, 56)
    out = tower(images)
    assert out.cls1.shape == (2, 192) and out.cls2.shape == (2, 192)
    assert out.patches.shape == (2, 16, 192) and out.grid == (4, 4)
    odd = tower(torch.rand(1, 3, 126, 98))
    assert odd.grid == (9, 7) and odd.patches.shape == (1, 63, 192)
    assert torch.isfinite(odd.patches).all()
    assert tower.embed_dim == 192 and tower.patch_size == 14 and tower.img_size == 56


def test_outputs_are_after_final_norm(tower):
    out = tower(torch.rand(1, 3, 56, 56))
    norm = tower.vit.norm
    # LayerNorm output minus its affine part has zero mean and unit variance per token.
    for token in (out.cls1, out.cls2, out.patches[:, 5]):
        plain = (token - norm.bias) / norm.weight
        assert plain.mean().abs().item() < 1e-4
        assert plain.var(unbiased=False).item() == pytest.approx(1.0, abs=1e-3)


def test_cls_tokens_are_distinct_slots(tower):
    out = tower(torch.rand(2, 3, 56, 56))
    assert not torch.allclose(out.cls1, out.cls2)


def test_masked_patch_ignores_its_pixels(tower):
    images = torch.rand(1, 3, 56, 56)
    changed = images.clone()
    changed[:, :, 14:28, 28:42] = torch.rand(1, 3, 14, 14)  # patch row 1, col 2 -> index 6
    mask = torch.zeros(1, 16, dtype=torch.bool)
    mask[0, 6] = True
    with torch.no_grad():
        a, b = tower(images, mask=mask), tower(changed, mask=mask)
        c = tower(changed)
        plain = tower(images)
        all_false = tower(images, mask=torch.zeros_like(mask))
    # With the patch masked its pixels no longer reach any output...
    torch.testing.assert_close(a.patches, b.patches, rtol=0, atol=1e-6)
    torch.testing.assert_close(a.cls1, b.cls1, rtol=0, atol=1e-6)
    # ...without the mask they do, and masking changes the masked position itself.
    assert (c.patches[0, 6] - plain.patches[0, 6]).abs().max() > 1e-3
    assert (a.patches[0, 6] - plain.patches[0, 6]).abs().max() > 1e-3
    torch.testing.assert_close(all_false.patches, plain.patches)


def test_mask_token_is_added_before_positions(tower):
    # Two masked patches share the mask token but not their positions, so they differ.
    mask = torch.zeros(1, 16, dtype=torch.bool)
    mask[0, [0, 15]] = True
    with torch.no_grad():
        out = tower(torch.rand(1, 3, 56, 56), mask=mask)
    assert (out.patches[0, 0] - out.patches[0, 15]).abs().max() > 1e-3


def test_position_embedding_follows_official_bilinear_antialias(tower):
    grid = (9, 3)
    pos = tower.vit.pos_embed.detach()  # [1, 16, D] for the 4x4 grid
    d = pos.shape[-1]
    # Official interpolate_pos_encoding (interpolate_offset=0, interpolate_antialias=True).
    ref = F.interpolate(pos.reshape(1, 4, 4, d).permute(0, 3, 1, 2), size=grid, mode="bilinear", antialias=True)
    ref = ref.permute(0, 2, 3, 1).reshape(1, -1, d)
    torch.testing.assert_close(tower.position_embedding(grid), ref)
    bicubic = F.interpolate(pos.reshape(1, 4, 4, d).permute(0, 3, 1, 2), size=grid, mode="bicubic", antialias=True)
    assert (bicubic.permute(0, 2, 3, 1).reshape(1, -1, d) - ref).abs().max() > 1e-3
    torch.testing.assert_close(tower.position_embedding((4, 4)), pos)


def test_dense_output_is_last_block_value_path(tower):
    images = torch.rand(2, 3, 70, 42)
    with torch.no_grad():
        dense = tower.forward_dense(images)
        normal = tower(images)
        # The official notebook's formula, on the tower's own tokens and blocks.
        x, grid = tower.tokens(images)
        for block in list(tower.blocks)[:-1]:
            x = block(x)
        blk = tower.blocks[-1]
        h = blk.norm1(x)
        b, n, c = h.shape
        heads = blk.attn.num_heads
        qkv = blk.attn.qkv(h).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        v = qkv[2].transpose(1, 2).reshape(b, n, c)
        value = blk.ls1(blk.attn.proj(v))
        value_only_ref = tower.vit.norm(value)[:, 2:]
        x = x + value
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
        ref = tower.vit.norm(x)[:, 2:]
        value_only = tower.forward_dense(images, readout="value")
    assert dense.grid == grid == (5, 3)
    torch.testing.assert_close(dense.patches, ref, rtol=1e-5, atol=1e-5)
    assert (dense.patches - normal.patches).abs().max() > 1e-3
    # ClearCLIP's readout: the value path alone, without the residual and the MLP.
    torch.testing.assert_close(value_only.patches, value_only_ref, rtol=1e-5, atol=1e-5)
    assert (value_only.patches - dense.patches).abs().max() > 1e-3


def test_dense_readout_is_a_model_setting_with_a_clear_error():
    from tipslab.modules.encoder import build_encoder

    encoder = build_encoder({"vision": {"size": "tiny", "img_size": 56, "dense_readout": "value"},
                             "text": {"size": "tiny", "vocab_size": 64, "context_length": 8}})
    images = torch.rand(1, 3, 56, 56)
    with torch.no_grad():
        default = encoder.encode_image(images, dense=True).patches
        explicit = encoder.vision.forward_dense(images, readout="value").patches
        residual = encoder.vision.forward_dense(images, readout="residual").patches
    torch.testing.assert_close(default, explicit)
    assert (default - residual).abs().max() > 1e-3
    with pytest.raises(TipslabError, match="dense_readout='mlp'.*residual, value"):
        VisionTower("tiny", img_size=56, dense_readout="mlp")


def test_bad_inputs_are_clear_errors(tower):
    with pytest.raises(TipslabError, match="multiple of the patch size"):
        tower(torch.rand(1, 3, 50, 56))
    with pytest.raises(TipslabError, match=r"bool tensor of shape \[1, 16\]"):
        tower(torch.rand(1, 3, 56, 56), mask=torch.zeros(1, 15, dtype=torch.bool))
    with pytest.raises(TipslabError, match="not known"):
        VisionTower("huge")
    with pytest.raises(TipslabError, match="multiple of 14"):
        VisionTower("tiny", img_size=100)


def test_drop_path_rate_reaches_the_blocks():
    model = VisionTower("tiny", img_size=28, drop_path_rate=0.2)
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)


@pytest.mark.parametrize("size", sorted(TIMM_NAMES))
def test_size_table_matches_timm_tipsv2(size):
    import timm

    with torch.device("meta"):
        ours = VisionTower(size, img_size=448)
        theirs = timm.create_model(TIMM_NAMES[size], pretrained=False, num_classes=0)
    ours_shapes = {k: tuple(v.shape) for k, v in ours.vit.state_dict().items()}
    theirs_shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert ours_shapes == theirs_shapes
    assert ours.mask_token.shape == (1, VISION_SIZES[size]["embed_dim"])
    assert ours.vit.patch_embed.grid_size == (32, 32)


def test_pos_grid_decouples_table_from_resolution():
    model = VisionTower("tiny", img_size=56, pos_grid=2)
    assert model.vit.pos_embed.shape[1] == 4 and model.img_size == 56
    assert math.isfinite(model(torch.rand(1, 3, 56, 56)).cls1.sum().item())


def test_unmasked_training_step_gives_mask_token_a_zero_gradient():
    # Every trained parameter must take part in the graph (DDP, FSDP2 checkpoint resume).
    torch.manual_seed(0)
    model = VisionTower("tiny", img_size=28)
    images = torch.rand(2, 3, 28, 28)
    with torch.no_grad():
        evaluated = model.eval()(images).patches
    out = model.train()(images)
    torch.testing.assert_close(out.patches, evaluated, rtol=0, atol=0)
    out.patches.sum().backward()
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().max() == 0
    assert all(p.grad is not None for p in model.parameters())


def test_intermediate_layers_as_the_official_get_intermediate_layers(tower):
    from tipslab.modules.vision import dpt_inputs

    images = torch.rand(2, 3, 70, 42)
    with torch.no_grad():
        final = tower(images)
        normed = tower.intermediate_layers(images, [1, 3])
        raw = tower.intermediate_layers(images, [3, 1], norm=False)
        # by hand: the blocks one by one from the same input tokens
        x, _ = tower.tokens(images)
        by_hand = []
        for block in tower.vit.blocks:
            x = block(x)
            by_hand.append(x)
    assert [o.grid for o in normed] == [(5, 3), (5, 3)]
    # the last block through the final norm is the ordinary output
    torch.testing.assert_close(normed[1].patches, final.patches)
    torch.testing.assert_close(normed[1].cls1, final.cls1)
    torch.testing.assert_close(normed[1].cls2, final.cls2)
    torch.testing.assert_close(raw[1].patches, by_hand[1][:, 2:])  # order as asked, raw residual stream
    torch.testing.assert_close(tower.vit.norm(raw[0].patches), final.patches)
    torch.testing.assert_close(normed[0].cls1, tower.vit.norm(by_hand[1])[:, 0])
    assert (normed[0].patches - final.patches).abs().max() > 1e-3
    cls, patch_map = dpt_inputs(normed)[0]
    assert patch_map.shape == (2, 192, 5, 3)
    torch.testing.assert_close(patch_map[:, :, 4, 1], normed[0].patches[:, 4 * 3 + 1])  # row-major patches
    with pytest.raises(TipslabError, match=r"block indices in \[0, 4\)"):
        tower.intermediate_layers(images, [4])


def test_default_dense_layers_reproduce_the_official_tables():
    from tipslab.modules.vision import OFFICIAL_DENSE_LAYERS, default_dense_layers

    for depth, layers in OFFICIAL_DENSE_LAYERS.items():
        assert default_dense_layers(depth) == layers
    assert {VISION_SIZES[s]["depth"] for s in ("b", "l", "so400m", "g")} == set(OFFICIAL_DENSE_LAYERS)
    assert default_dense_layers(VISION_SIZES["tiny"]["depth"]) == (0, 1, 2, 3)


def test_fresh_tower_starts_with_two_distinct_cls_tokens():
    """CLS1 and CLS2 must be able to specialise (alt-text vs synthetic captions) from the start."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    tower = VisionTower("tiny", img_size=56).eval()
    cls, reg = tower.vit.cls_token.flatten(), tower.vit.reg_token.flatten()
    assert cls.std() > 0.01 and reg.std() > 0.01
    assert F.cosine_similarity(cls, reg, dim=0) < 0.5
    with torch.no_grad():
        out = tower(torch.rand(2, 3, 56, 56))
    assert F.cosine_similarity(out.cls1, out.cls2, dim=-1).max() < 0.99


def test_extra_registers_are_neither_cls_nor_patches():
    torch.manual_seed(0)
    plain, more = VisionTower("tiny", img_size=56), VisionTower("tiny", img_size=56, registers=3)
    assert plain.vit.reg_token.shape[1] == 1 and more.vit.reg_token.shape[1] == 4
    with torch.no_grad():
        out = more.eval()(torch.rand(2, 3, 56, 56))
        x, grid = more.tokens(torch.rand(2, 3, 56, 56))
    assert out.patches.shape == (2, 16, 192) and x.shape[1] == 2 + 3 + 16
    # The patches are the last 16 tokens, whatever the register count.
    with torch.no_grad():
        images = torch.rand(1, 3, 56, 56)
        tokens, _ = more.tokens(images)
        final = more.vit.norm(more.vit.blocks(tokens))
        assert torch.allclose(more(images).patches, final[:, 5:], atol=1e-6)
    with pytest.raises(TipslabError, match="registers"):
        VisionTower("tiny", img_size=56, registers=-1)
