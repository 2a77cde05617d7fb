"""Several shard sources: split over ranks x workers without duplicates, seeded, mixed by weight."""

import numpy as np
import pytest
import torch
from PIL import Image

from tipslab.datamodules.datamodule import PretrainDataModule
from tipslab.datamodules.shards import ShardDataset
from tipslab.errors import TipslabError
from tipslab.modules.tokenizers import build_tokenizer
from tipslab.platform.cli import main

TOKENIZER = build_tokenizer(context_length=16)


def make_source(root, name, count, per_shard):
    """``count`` tiny captioned images of source ``name``, written to shards by `tipslab shards`."""
    images = root / f"{name}_images"
    images.mkdir()
    for i in range(count):
        Image.new("RGB", (14, 14), (i % 256, 40, 90)).save(images / f"{name}{i:03d}.png")
        (images / f"{name}{i:03d}.txt").write_text(f"picture {i} of {name}")
    out = root / name
    assert main(["shards", str(out), "--images", str(images), "--samples-per-shard", str(per_shard)]) == 0
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    return make_source(root, "a", 60, 20), make_source(root, "b", 30, 10)  # 3 + 3 shards


def read_rank(rank, world, workers, **kwargs):
    dataset = ShardDataset(rank=rank, world_size=world, seed=5, shuffle_buffer=16, **kwargs)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=lambda s: s)
    return [sample["id"] for sample in loader]


@pytest.mark.parametrize("spec", ["folders", "brace"])
def test_two_ranks_by_two_workers_read_every_sample_once(sources, spec):
    a, b = sources
    if spec == "folders":
        kwargs = {"urls_or_dir": None, "sources": [{"path": str(a)}, {"path": str(b), "weight": 1.0}]}
    else:  # one brace pattern over both: 6 shards for 4 slots
        kwargs = {"urls_or_dir": f"{a.parent}/{{a,b}}/shard-{{000000..000002}}.tar"}
    ids = [i for rank in range(2) for i in read_rank(rank, 2, 2, **kwargs)]
    assert len(ids) == len(set(ids)) == 90


def test_fewer_shards_than_slots_still_split_by_sample(sources):
    a, _ = sources
    first = sorted((a).glob("*.tar"))[:1]  # 1 shard, 4 slots
    ids = [i for rank in range(2) for i in read_rank(rank, 2, 2, urls_or_dir=[str(p) for p in first])]
    assert len(ids) == len(set(ids)) == 20


def mixed_cfg(a, b, **overrides):
    return {"source": "shards", "path": None, "image_size": 14, "batch_size": 10, "num_workers": 0,
            "sources": [{"path": str(a), "weight": 3.0}, {"path": str(b), "weight": 1.0}],
            "resampled": True, "epoch_samples": 400, "shuffle_buffer": 32, **overrides}


def first_ids(cfg, seed, batches=6):
    loader = PretrainDataModule(cfg, TOKENIZER, seed=seed).train_dataloader()
    out = []
    for batch in loader:
        out.append(tuple(batch.ids))
        if len(out) == batches:
            return out


def test_a_seed_fixes_the_mixed_stream_with_any_worker_count(sources):
    a, b = sources
    cfg = mixed_cfg(a, b)
    assert first_ids(cfg, seed=1) == first_ids(cfg, seed=1)
    assert first_ids(cfg, seed=1) != first_ids(cfg, seed=2)
    # Worker processes make the same batches as the main process (the batch stream's contract).
    assert first_ids({**cfg, "num_workers": 2}, seed=1, batches=4) == first_ids({**cfg, "num_workers": 2}, seed=1, batches=4)


def test_the_mix_follows_the_weights(sources):
    a, b = sources
    n = 3000
    dataset = ShardDataset(None, sources=[{"path": str(a), "weight": 3.0}, {"path": str(b), "weight": 1.0}],
                           resampled=True, epoch_samples=n, seed=0, shuffle_buffer=64)
    drawn = [sample["source"] for sample in dataset]
    assert len(drawn) == n
    share = drawn.count(str(a)) / n
    # A multinomial draw: 0.75 within 4 standard deviations (sqrt(0.75 * 0.25 / 3000) = 0.008).
    assert abs(share - 0.75) < 4 * np.sqrt(0.75 * 0.25 / n), share
    # Passes differ (a new draw each), and every shard of a source gets drawn.
    dataset.set_epoch(1)
    assert [s["id"] for s in dataset][:50] != [s["id"] for s in ShardDataset(
        None, sources=[{"path": str(a), "weight": 3.0}, {"path": str(b), "weight": 1.0}],
        resampled=True, epoch_samples=n, seed=0, shuffle_buffer=64)][:50]
    assert len({i for i in (s["id"] for s in dataset) if i.startswith("b")}) > 25


def test_mixing_config_errors(sources):
    a, b = sources
    with pytest.raises(TipslabError, match="different weights but data.resampled=false"):
        PretrainDataModule(mixed_cfg(a, b, resampled=False), TOKENIZER).train_dataloader()
    with pytest.raises(TipslabError, match="needs data.epoch_samples"):
        PretrainDataModule(mixed_cfg(a, b, epoch_samples=None), TOKENIZER).train_dataloader()
    with pytest.raises(TipslabError, match=r"data.sources\[1\].weight=-1"):
        PretrainDataModule(mixed_cfg(a, b, sources=[{"path": str(a)}, {"path": str(b), "weight": -1}]),
                           TOKENIZER).train_dataloader()
