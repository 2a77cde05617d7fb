"""Block masks (datamodules/masking.py) and multi-crop batches: seeded, within their ranges."""

import numpy as np
import pytest
import torch

from tipslab.datamodules.masking import BlockMasker
from tipslab.errors import TipslabError


def test_masked_share_follows_the_drawn_ratio_and_blocks_are_contiguous():
    masker = BlockMasker(probability=1.0, ratio=(0.3, 0.3))
    for seed in range(20):
        mask = masker((8, 8), np.random.default_rng(seed))
        assert mask.sum() == round(0.3 * 64)
    # Blocks, not scattered patches: most masked patches have a masked 4-neighbour.
    mask = masker((16, 16), np.random.default_rng(0)).reshape(16, 16)
    padded = np.pad(mask, 1)
    neighbours = padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
    assert (neighbours & mask).sum() >= 0.8 * mask.sum()


def test_probability_sets_the_share_of_masked_views():
    masker = BlockMasker(probability=0.5, ratio=(0.1, 0.5))
    masked = [masker((8, 8), np.random.default_rng(s)).any() for s in range(400)]
    assert 0.4 < np.mean(masked) < 0.6
    assert not BlockMasker(probability=0.0)((8, 8), np.random.default_rng(0)).any()


def test_same_generator_same_mask():
    masker = BlockMasker(probability=1.0)
    a = masker((7, 9), np.random.default_rng([1, 2, 3]))
    b = masker((7, 9), np.random.default_rng([1, 2, 3]))
    assert a.shape == (63,) and (a == b).all()


@pytest.mark.parametrize("kwargs", [{"probability": 1.5}, {"ratio": (0.5, 0.2)}, {"ratio": (0.1, 1.0)},
                                    {"min_block": 0}])
def test_bad_settings_name_the_key(kwargs):
    with pytest.raises(TipslabError, match="data.masking"):
        BlockMasker(**kwargs)


def test_multicrop_batches_are_seeded_and_shaped(tmp_path):
    from omegaconf import OmegaConf

    from tipslab.datamodules.datamodule import PretrainDataModule
    from tipslab.modules.tokenizers import build_tokenizer

    cfg = OmegaConf.create({"source": "scenes", "num_train": 16, "image_size": 56, "batch_size": 4,
                            "global_crops": {"count": 2, "scale": [0.32, 1.0]},
                            "local_crops": {"count": 3, "size": 28, "scale": [0.05, 0.32]},
                            "masking": {"enabled": True, "probability": 0.5, "ratio": [0.1, 0.5], "min_block": 4}})
    tokenizer = build_tokenizer(context_length=16)
    first = next(iter(PretrainDataModule(cfg, tokenizer, seed=5).train_dataloader()))
    again = next(iter(PretrainDataModule(cfg, tokenizer, seed=5).train_dataloader()))
    other = next(iter(PretrainDataModule(cfg, tokenizer, seed=6).train_dataloader()))
    assert first.global_crops.shape == (2, 4, 3, 56, 56) and first.local_crops.shape == (3, 4, 3, 28, 28)
    assert first.masks.shape == (2, 4, 16) and first.masks.dtype == torch.bool
    assert first.images.data_ptr() == first.global_crops[0].data_ptr()  # a view, not a copy
    assert torch.equal(first.global_crops, again.global_crops) and torch.equal(first.masks, again.masks)
    assert torch.equal(first.local_crops, again.local_crops)
    assert not torch.equal(first.global_crops, other.global_crops)
    assert not torch.equal(first.global_crops[0], first.global_crops[1])  # two different crops
    moved = first.to("cpu")
    assert moved.images.data_ptr() == moved.global_crops[0].data_ptr()
