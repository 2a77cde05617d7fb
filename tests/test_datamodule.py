"""PretrainDataModule: the Batch contract, seeded batches (any worker count), exact mid-epoch resume."""

import lightning as L
import numpy as np
import pytest
import torch
from batch_recorder import BatchRecorder
from omegaconf import OmegaConf
from PIL import Image

from tipslab.datamodules.batch import Batch
from tipslab.datamodules.datamodule import PretrainDataModule
from tipslab.datamodules.scenes import ScenesDataset
from tipslab.datamodules.shards import write_scene_shards
from tipslab.datamodules.transforms import GlobalCrop, crop_params
from tipslab.errors import TipslabError
from tipslab.modules.tokenizers import build_tokenizer

TOKENIZER = build_tokenizer(context_length=32)
# 24 scenes, batches of 4: 6 batches per epoch. 56 px keeps every test fast.
SCENES = {"source": "scenes", "num_train": 24, "num_val": 8, "image_size": 56, "batch_size": 4, "num_workers": 0}


def loader(cfg=None, seed=0, **overrides):
    return PretrainDataModule({**(cfg or SCENES), **overrides}, TOKENIZER, seed=seed).train_dataloader()


def take(iterable, n):
    out = []
    for batch in iterable:
        out.append(batch)
        if len(out) == n:
            break
    return out


def same(a: Batch, b: Batch) -> bool:
    return (a.ids == b.ids and torch.equal(a.images, b.images) and torch.equal(a.alt_ids, b.alt_ids)
            and torch.equal(a.caption_ids, b.caption_ids))


def test_batch_contract():
    batch = next(iter(loader(caption_probs=[0.5, 0.5])))
    assert isinstance(batch, Batch)
    assert batch.images.shape == (4, 3, 56, 56) and batch.images.dtype == torch.float32
    assert 0.0 <= float(batch.images.min()) and float(batch.images.max()) <= 1.0
    assert float(batch.images.max()) > 0.5  # raw pixels, not mean/std normalised
    assert batch.alt_ids.dtype == batch.caption_ids.dtype == torch.long
    assert batch.alt_ids.shape == batch.caption_ids.shape == (4, 32)
    assert torch.equal(batch.alt_ids, TOKENIZER(batch.alt_texts))
    assert torch.equal(batch.caption_ids, TOKENIZER(batch.captions))
    assert len(set(batch.ids)) == 4 and all(i.startswith("train/") for i in batch.ids)
    assert set(batch.granularities) <= {"short", "long"} and batch.masks is None
    scenes = ScenesDataset("train", 24, 56, seed=0)
    for sample_id, alt, caption in zip(batch.ids, batch.alt_texts, batch.captions):
        # Captions of the crop: they name some of the scene's objects (or the background).
        names = scenes.scene(int(sample_id.split("/")[1])).class_names
        assert alt == "background" or set(alt.split(", ")) <= set(names)
    whole = next(iter(loader(caption_probs=[0.5, 0.5], crop_captions=False)))
    for sample_id, alt, caption, granularity in zip(whole.ids, whole.alt_texts, whole.captions, whole.granularities):
        captions = scenes.scene(int(sample_id.split("/")[1])).captions
        assert alt == captions["alt"] and caption == captions[granularity]
    moved = batch.to("cpu")
    assert isinstance(moved, Batch) and torch.equal(moved.images, batch.images) and moved.ids == batch.ids


def test_a_seed_fixes_the_batches_and_epochs_differ():
    dl = loader(seed=5)
    first, second = list(dl), list(dl)  # two epochs
    assert len(first) == len(second) == 6 == len(dl)
    assert all(same(a, b) for a, b in zip(first, list(loader(seed=5))))
    assert not same(first[0], next(iter(loader(seed=6))))
    assert first[0].ids != second[0].ids
    assert sorted(i for b in first for i in b.ids) == sorted(i for b in second for i in b.ids)  # a permutation
    # The same scene is cropped differently in another epoch.
    one = {i: img for b in first for i, img in zip(b.ids, b.images)}
    two = {i: img for b in second for i, img in zip(b.ids, b.images)}
    assert not torch.equal(one["train/000000"], two["train/000000"])


def test_worker_processes_give_the_same_batches():
    plain = list(loader(seed=2))
    workers = list(loader(seed=2, num_workers=2))
    assert len(workers) == len(plain) and all(same(a, b) for a, b in zip(plain, workers))


@pytest.mark.parametrize("stop", [2, 6, 9])  # mid-epoch, at the epoch's end, in the second epoch
def test_resuming_a_plain_loop_continues_with_the_next_batch(stop):
    reference = take(_two_epochs(loader(seed=1)), 12)
    dl = loader(seed=1)
    take(_two_epochs(dl), stop)
    state = dl.state_dict()
    resumed = loader(seed=1)
    resumed.load_state_dict(state)
    rest = take(_two_epochs(resumed), 12 - stop)
    assert len(rest) == 12 - stop and all(same(a, b) for a, b in zip(reference[stop:], rest))


def _two_epochs(dl):
    for _ in range(2):
        yield from dl


class _Recorder(BatchRecorder):
    """Records which batches its training steps received: their ids and a copy of their images."""

    def training_step(self, batch, batch_idx):
        self.seen.append((tuple(batch.ids), batch.images.clone()))
        return self.weight * batch.images.mean()


def _fit(tmp_path, max_steps, num_workers, ckpt_path=None, save_every=None):
    from lightning.pytorch.callbacks import ModelCheckpoint

    callbacks = [ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=save_every, save_top_k=-1,
                                 filename="step{step}", auto_insert_metric_name=False)] if save_every else []
    model = _Recorder()
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=bool(save_every), callbacks=callbacks,
                        default_root_dir=tmp_path, limit_val_batches=0)
    datamodule = PretrainDataModule({**SCENES, "num_workers": num_workers}, TOKENIZER, seed=3)
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    return model.seen


@pytest.mark.parametrize("num_workers", [0, 2])
def test_lightning_resume_mid_epoch_trains_on_exactly_the_following_batches(tmp_path, num_workers):
    full = _fit(tmp_path, max_steps=9, num_workers=num_workers, save_every=4)
    assert len(full) == 9
    # step4: mid-epoch 0 (4 of 6 batches); step8: mid-epoch 1. Lightning prefetches a batch
    # ahead and workers prefetch more; the resumed run must still start at batch k.
    for k in (4, 8):
        resumed = _fit(tmp_path / f"r{k}", max_steps=9, num_workers=num_workers, ckpt_path=tmp_path / f"step{k}.ckpt")
        assert [ids for ids, _ in resumed] == [ids for ids, _ in full[k:]]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(resumed, full[k:]))


def test_shards_source_resumes_with_workers(tmp_path):
    write_scene_shards(ScenesDataset("train", 20, 56, seed=0), tmp_path, samples_per_shard=4)
    cfg = {**SCENES, "source": "shards", "path": str(tmp_path), "num_workers": 2, "shuffle_buffer": 8}
    reference = take(loader(cfg), 9)  # endless: 20 samples / 4 = 5 batches a pass, so this crosses a pass
    assert len({i for b in reference[:5] for i in b.ids}) == 20
    dl = loader(cfg)
    dl.load_state_dict({"epoch": 0, "consumed": 3})
    rest = take(dl, 6)
    assert all(same(a, b) for a, b in zip(reference[3:], rest))


def test_manifest_source_replaces_a_corrupt_image(tmp_path):
    import polars as pl

    for i in range(4):
        Image.new("RGB", (30, 30), (60 * i, 0, 0)).save(tmp_path / f"{i}.png")
    (tmp_path / "2.png").write_bytes(b"broken")
    pl.DataFrame({"image_path": [f"{i}.png" for i in range(4)], "id": list("abcd"), "alt": list("wxyz"),
                  "short": ["one.", None, "three.", "four."]}).write_parquet(tmp_path / "m.parquet")
    cfg = {**SCENES, "source": "manifest", "path": str(tmp_path / "m.parquet"), "batch_size": 4}
    (batch,) = list(loader(cfg))
    assert batch.images.shape[0] == 4 and "c" not in batch.ids  # skipped, replaced by a readable one
    for sample_id, caption, granularity in zip(batch.ids, batch.captions, batch.granularities):
        assert granularity == ("alt" if sample_id == "b" else "short")  # b has no short caption


def test_val_loader_gives_whole_unaugmented_scenes():
    datamodule = PretrainDataModule(SCENES, TOKENIZER, seed=4)
    batches = list(datamodule.val_loader(batch_size=4))
    val = ScenesDataset("val", 8, 56, seed=4)
    assert [i for b in batches for i in b.ids] == [f"val/{i:06d}" for i in range(8)]
    for k, image in enumerate(torch.cat([b.images for b in batches])):
        assert torch.allclose(image, val.scene(k).to_tensor(), atol=1e-6)
    assert all(same(a, b) for a, b in zip(batches, datamodule.val_loader(batch_size=4)))


def test_accepts_an_omegaconf_block():
    cfg = OmegaConf.create({**SCENES, "caption_granularities": ["long"], "caption_probs": None})
    batch = next(iter(PretrainDataModule(cfg, TOKENIZER, seed=0).train_dataloader()))
    assert set(batch.granularities) == {"long"}


@pytest.mark.parametrize("overrides, message", [
    ({"source": "shards", "path": None}, r"data path is missing.*make train EXP=tipsv2_tiny"),
    ({"source": "manifest", "path": "/no/such/file.parquet"}, r"data path is missing.*make train EXP=tipsv2_tiny"),
    ({"source": "laion"}, "data.source='laion'"),
    ({"image_size": 100}, "multiple of the patch size 14"),
    ({"caption_probs": [1.0]}, "caption_probs has 1 values"),
    ({"num_train": 3}, "no full batch"),
])
def test_bad_config_raises_a_clear_error(overrides, message):
    with pytest.raises(TipslabError, match=message):
        loader(**overrides)


def test_global_crop_is_seeded_and_within_scale():
    image = torch.rand(3, 60, 80)
    crop = GlobalCrop(28)
    a, flipped = crop(image, np.random.default_rng(1))
    b, _ = crop(image, np.random.default_rng(1))
    c, _ = crop(image, np.random.default_rng(2))
    assert a.shape == (3, 28, 28) and torch.equal(a, b) and not torch.equal(a, c) and flipped is False
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = crop_params(60, 80, rng)
        assert 0 <= top and top + h <= 60 and 0 <= left and left + w <= 80
        assert 0.32 * 0.9 <= h * w / (60 * 80) <= 1.0 + 1e-9


def test_flip_mirrors_image_and_captions_together():
    from tipslab.datamodules.streams import SampleProcessor

    sample = {"image": torch.rand(3, 56, 56), "id": "s", "captions": {"alt": "star on the left",
                                                                       "long": "A star on the left."}}
    plain = SampleProcessor(GlobalCrop(28), ("long",))
    flipping = SampleProcessor(GlobalCrop(28, flip=True), ("long",))
    seed = next(s for s in range(50) if GlobalCrop(28, flip=True)(sample["image"], np.random.default_rng(s))[1])
    a = plain(sample, np.random.default_rng(seed))
    b = flipping(sample, np.random.default_rng(seed))  # same crop, then mirrored
    assert torch.equal(b["image"], a["image"].flip(-1))
    assert b["alt"] == "star on the right" and b["caption"] == "A star on the right."


def test_long_captions_get_near_full_crops_on_user_data():
    from tipslab.datamodules.streams import SampleProcessor

    image = torch.rand(3, 80, 80)
    processor = SampleProcessor(GlobalCrop(28, scale=(0.05, 0.2)), ("short", "long"),
                                caption_crop_scale={"long": (0.9, 1.0)})
    drawn = set()
    for seed in range(20):
        rng = np.random.default_rng(seed)
        item = processor({"image": image, "id": "x", "captions": {"short": "s", "long": "A long caption."}}, rng)
        top, left, h, w = item["box"]
        drawn.add(item["granularity"])
        share = h * w / (80 * 80)
        if item["granularity"] == "long":
            assert share >= 0.9 * 0.95, share  # rounding of the box sides
        else:
            assert share <= 0.2 * 1.1, share
    assert drawn == {"short", "long"}
    with pytest.raises(TipslabError, match="data.caption_crop_scale.long"):
        SampleProcessor(GlobalCrop(28), ("long",), caption_crop_scale={"long": [0.5, 2.0]})


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resolution_stage_switches_the_image_size_and_resumes_in_it(num_workers, tmp_path):
    cfg = {**SCENES, "num_workers": num_workers, "resolution_stages": [{"step": 8, "image_size": 84}]}
    if num_workers:  # the shard stream (endless) under two worker processes
        write_scene_shards(ScenesDataset("train", 24, image_size=56, seed=0), tmp_path, samples_per_shard=6)
        cfg = {**cfg, "source": "shards", "path": str(tmp_path)}
    data = PretrainDataModule(cfg, TOKENIZER, seed=0)
    loader = data.train_dataloader()
    batches = take((b for _ in range(2) for b in loader), 11)  # scenes: two epochs of 6 batches
    assert [b.images.shape[-1] for b in batches] == [56] * 8 + [84] * 3
    assert data.image_size_at(7) == 56 and data.image_size_at(8) == 84
    resumed = PretrainDataModule(cfg, TOKENIZER, seed=0).train_dataloader()
    resumed.load_state_dict({"epoch": 1, "consumed": 3} if not num_workers else {"epoch": 0, "consumed": 9})
    again = next(iter(resumed))
    assert again.images.shape[-1] == 84 and same(again, batches[9])
    with pytest.raises(TipslabError, match="resolution_stages\\[0\\].image_size=85"):
        PretrainDataModule({**SCENES, "resolution_stages": [{"step": 3, "image_size": 85}]}, TOKENIZER)
