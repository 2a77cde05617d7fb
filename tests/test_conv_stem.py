"""The convolutional stem (``model.vision.stem: conv``): the 14-px patch grid at any multiple of 14,
each patch token built from its own neighbourhood, batch-independent outputs, clear errors."""

import pytest
import torch

from tipslab.errors import TipslabError
from tipslab.modules.conv_stem import ConvStem
from tipslab.modules.official_layout import official_vision_state
from tipslab.modules.vision import VisionTower


@pytest.mark.parametrize("size", [(56, 56), (42, 70)])
def test_stem_gives_the_patch_grid(size):
    stem = ConvStem(embed_dim=24, patch_size=14)
    out = stem(torch.rand(2, 3, *size))
    assert out.shape == (2, 24, size[0] // 14, size[1] // 14)


def test_a_patch_token_sees_its_neighbours_but_not_far_pixels():
    torch.manual_seed(0)
    stem = ConvStem(embed_dim=16).eval()
    images = torch.rand(1, 3, 112, 112)
    base = stem(images)
    near, far = images.clone(), images.clone()
    near[..., 0:14, 14:28] = 1.0 - near[..., 0:14, 14:28]  # the patch right of patch (0, 0)
    far[..., 98:112, 98:112] = 1.0 - far[..., 98:112, 98:112]  # the opposite corner
    with torch.no_grad():
        assert not torch.allclose(stem(near)[..., 0, 0], base[..., 0, 0])  # a linear patch embedding would not change
        # Group norm spans the whole image, so far pixels move every token a little; locality is
        # the scale of the change.
        moved_far = (stem(far)[..., 0, 0] - base[..., 0, 0]).abs().max()
        moved_near = (stem(near)[..., 0, 0] - base[..., 0, 0]).abs().max()
        assert moved_near > 5 * moved_far


def test_outputs_do_not_depend_on_the_batch():
    torch.manual_seed(0)
    tower = VisionTower("tiny", img_size=56, stem="conv").train()
    images = torch.rand(3, 3, 56, 56)
    together = tower(images).patches
    alone = tower(images[:1]).patches
    torch.testing.assert_close(together[:1], alone, atol=1e-5, rtol=1e-5)


def test_tower_with_conv_stem_trains_the_stem_and_keeps_token_layout():
    torch.manual_seed(0)
    plain, conv = VisionTower("tiny", img_size=56), VisionTower("tiny", img_size=56, stem="conv")
    images = torch.rand(2, 3, 56, 56)
    out = conv(images)
    assert out.patches.shape == plain(images).patches.shape == (2, 16, plain.embed_dim)
    out.patches.sum().backward()
    first = conv.vit.patch_embed.proj.features[0].weight
    assert first.grad is not None and first.grad.abs().sum() > 0


def test_unknown_stem_and_official_export_are_clear_errors():
    with pytest.raises(TipslabError, match="model.vision.stem='cnn'.*patch, conv"):
        VisionTower("tiny", img_size=56, stem="cnn")
    with pytest.raises(TipslabError, match="no official layout"):
        official_vision_state(VisionTower("tiny", img_size=56, stem="conv"))
