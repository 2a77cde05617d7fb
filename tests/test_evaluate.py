import numpy as np
import torch

from tipslab.platform.evaluate import patch_centres, pointing_game, pointing_hit


def test_patch_centres_on_a_2x2_grid_over_8x8_pixels():
    rows, cols = patch_centres((2, 2), (8, 8))
    assert rows.tolist() == [2, 6] and cols.tolist() == [2, 6]


def test_pointing_hit_checks_the_best_patch_centre_against_the_mask():
    mask = np.zeros((8, 8), dtype=bool)
    mask[4:, 4:] = True  # bottom-right quarter
    assert pointing_hit(np.array([[0.0, 0.1], [0.2, 0.9]]), mask)
    assert not pointing_hit(np.array([[0.9, 0.1], [0.2, 0.3]]), mask)


def _colour_tokenizer(texts):
    """A colour's one-hot; a text naming no colour (a background prompt): zeros."""
    from tipslab.datamodules.scenes import COLOURS

    colours = list(COLOURS)
    return torch.stack([torch.nn.functional.one_hot(torch.tensor(colours.index(w)), len(colours)) if w in colours
                        else torch.zeros(len(colours), dtype=torch.long) for w in (t.split()[0] for t in texts)])


class _OracleEncoder(torch.nn.Module):
    """Patch features are closeness to each scene colour; text 'red ...' selects red.
    Not a mock of the code under test: a model whose right answer is known by construction."""

    def __init__(self, colours: dict):
        super().__init__()
        self.refs = torch.tensor(list(colours.values()), dtype=torch.float32) / 255.0

    def encode_image(self, images, dense=True):
        from types import SimpleNamespace

        pooled = torch.nn.functional.avg_pool2d(images, 14)  # one pixel per patch
        b, _, h, w = pooled.shape
        pix = pooled.permute(0, 2, 3, 1).reshape(b, h * w, 3)
        closeness = torch.exp(-8 * torch.cdist(pix, self.refs.expand(b, -1, -1)))
        return SimpleNamespace(patches=closeness, grid=(h, w))

    def encode_text(self, ids):
        return ids.float()


def test_pointing_game_scores_an_oracle_well_above_chance():
    from tipslab.datamodules.scenes import COLOURS, ScenesDataset

    val = ScenesDataset("val", num_images=12, image_size=112, seed=0)
    scenes = [val.scene(i) for i in range(12)]
    result = pointing_game(_OracleEncoder(COLOURS), _colour_tokenizer, scenes)
    assert result.objects == sum(len(s.objects) for s in scenes)
    assert 0 < result.chance < 0.3
    assert result.accuracy > 0.6 > 10 * result.chance
    assert result.any_object >= result.accuracy


class _OffsetEncoder(_OracleEncoder):
    """The oracle, with a direction every text shares (an extra dimension) and one patch (the
    top-left) lying on it: raw scores send every name to that patch, scores relative to the
    background prompts (texts that name no colour: the shared direction alone) do not."""

    def encode_image(self, images, dense=True):
        out = super().encode_image(images, dense)
        common = torch.zeros(*out.patches.shape[:2], 1)
        out.patches = torch.cat([out.patches, common], dim=-1)
        out.patches[:, 0] = 0.0
        out.patches[:, 0, -1] = 1.0
        return out

    def encode_text(self, ids):
        return torch.cat([ids.float(), torch.ones(len(ids), 1)], dim=-1)


def test_calibrated_pointing_ignores_a_patch_close_to_every_text():
    from tipslab.datamodules.scenes import COLOURS, ScenesDataset

    val = ScenesDataset("val", num_images=12, image_size=112, seed=0)
    scenes = [val.scene(i) for i in range(12)]
    tokenizer = _colour_tokenizer
    nulls = ["a photo.", "background."]
    plain = pointing_game(_OracleEncoder(COLOURS), tokenizer, scenes, null_prompts=nulls)
    offset = pointing_game(_OffsetEncoder(COLOURS), tokenizer, scenes, null_prompts=nulls)
    # Patch 0 (the top-left corner) wins every raw query: only objects covering it would be hits.
    assert offset.accuracy < 0.2 < plain.accuracy
    assert offset.calibrated > 0.6
    # Without a shared direction, the background prompts (zero vectors) change nothing.
    assert plain.calibrated == plain.accuracy
