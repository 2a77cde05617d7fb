"""WebDataset shards and parquet manifests: round trip, seeded order, splits, corrupt samples skipped."""

import io
import json
import logging

import numpy as np
import polars as pl
import pytest
import webdataset as wds
from PIL import Image

from tipslab.datamodules.manifest import ManifestDataset
from tipslab.datamodules.sample import CorruptSample
from tipslab.datamodules.scenes import ScenesDataset
from tipslab.datamodules.scenes_export import rle_decode
from tipslab.datamodules.shards import ShardDataset, write_scene_shards, write_shards
from tipslab.errors import TipslabError


@pytest.fixture(scope="module")
def scenes():
    return ScenesDataset("train", 12, image_size=42, seed=0)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, scenes):
    out = tmp_path_factory.mktemp("shards")
    write_scene_shards(scenes, out, samples_per_shard=5)
    return out


def png(color=(200, 10, 10), size=16) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def caption_json(text="a red square") -> bytes:
    return json.dumps({"captions": {"alt": text, "short": f"A {text}."}}).encode()


def test_round_trip(shard_dir, scenes):
    names = sorted(p.name for p in shard_dir.iterdir())
    assert names == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]  # 5 + 5 + 2, no temp files
    samples = {s["id"]: s for s in ShardDataset(shard_dir, shuffle=False)}
    assert sorted(samples) == [f"train/{i:06d}" for i in range(12)]
    for i in (0, 7, 11):
        scene, sample = scenes.scene(i), samples[f"train/{i:06d}"]
        assert np.array_equal(np.asarray(sample["image"]), scene.image)  # PNG is lossless
        assert sample["captions"] == scene.captions
        assert [o["class_name"] for o in sample["objects"]] == [o.class_name for o in scene.objects]
        first = sample["objects"][0]
        assert np.array_equal(rle_decode(first["mask_rle"], 42, 42), scene.objects[0].mask)


def test_shuffle_is_seeded(shard_dir):
    order = lambda seed, epoch=0: [s["id"] for s in ShardDataset(shard_dir, seed=seed, shuffle_buffer=8, epoch=epoch)]
    assert order(1) == order(1)
    assert order(1) != order(2)
    assert order(1, epoch=0) != order(1, epoch=1)
    assert sorted(order(1)) == sorted(order(2))


@pytest.mark.parametrize("world", [2, 5])  # 5 ranks > 3 shards: split by sample instead of by shard
def test_ranks_read_disjoint_parts_that_cover_everything(shard_dir, world):
    parts = [[s["id"] for s in ShardDataset(shard_dir, seed=3, rank=r, world_size=world)] for r in range(world)]
    flat = [i for part in parts for i in part]
    assert len(flat) == len(set(flat)) == 12
    assert all(parts)


def test_corrupt_samples_are_skipped_and_counted(tmp_path, caplog):
    shard = tmp_path / "mixed.tar"
    with wds.TarWriter(str(shard), encoder=False) as writer:
        writer.write({"__key__": "good1", "png": png(), "json": caption_json()})
        writer.write({"__key__": "badimage", "png": b"\x89PNG\r\n\x1a\n not really a png", "json": caption_json()})
        writer.write({"__key__": "truncimage", "png": png(size=64)[:60], "json": caption_json()})
        writer.write({"__key__": "nojson", "png": png()})
        writer.write({"__key__": "badjson", "png": png(), "json": b"{'captions': oops"})
        writer.write({"__key__": "nocaptions", "png": png(), "json": b'{"captions": {"alt": ""}}'})
        writer.write({"__key__": "txtonly", "jpg": png(), "txt": b"a red square"})  # PIL sniffs the format
        writer.write({"__key__": "good2", "png": png((0, 0, 250)), "json": caption_json("a blue square")})
    dataset = ShardDataset(shard, shuffle=False)
    with caplog.at_level(logging.WARNING, logger="tipslab.datamodules.shards"):
        samples = list(dataset)
    assert [s["key"] for s in samples] == ["good1", "txtonly", "good2"]
    assert samples[1]["captions"] == {"alt": "a red square"}
    assert samples[2]["image"].getpixel((0, 0)) == (0, 0, 250)
    assert dataset.skipped == 5
    assert dataset.counts.skipped == {"not_image": 1, "truncated": 1, "no_caption": 1, "bad_json": 1,
                                      "empty_caption": 1}
    skipped = dict(dataset.skipped_samples)
    for key, reason in [("badimage", "cannot read image: not image"), ("truncimage", "cannot read image: truncated"),
                        ("nojson", "no .json or .txt caption member"), ("badjson", "not valid json"),
                        ("nocaptions", "no caption text")]:
        where = next(w for w in skipped if f"sample {key} " in w)
        assert reason in skipped[where]
        assert key in caplog.text


def test_a_truncated_shard_yields_what_it_can(tmp_path, shard_dir):
    data = (shard_dir / "shard-000000.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) * 2 // 3])
    dataset = ShardDataset(tmp_path, shuffle=False)
    samples = list(dataset)
    assert 1 <= len(samples) < 5
    assert dataset.skipped >= 1
    assert any(where.endswith("cut.tar") and "unreadable tar data" in why for where, why in dataset.skipped_samples)


def test_missing_or_empty_shard_folder(tmp_path):
    with pytest.raises(TipslabError, match="does not exist"):
        ShardDataset(tmp_path / "nope")
    with pytest.raises(TipslabError, match=r"no \*\.tar shards in"):
        ShardDataset(tmp_path)
    with pytest.raises(TipslabError, match="not found"):
        ShardDataset([str(tmp_path / "a.tar")])


def test_writing_is_atomic(tmp_path):
    def samples():
        for i in range(7):
            yield {"id": f"s{i}", "image": np.zeros((8, 8, 3), np.uint8), "captions": {"alt": "black"}}
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError, match="source broke"):
        write_shards(samples(), tmp_path, samples_per_shard=5)
    # The complete shard stays; the half-written one leaves neither a shard nor a temp file.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-000000.tar"]
    assert len(list(ShardDataset(tmp_path, shuffle=False))) == 5


def test_write_shards_rejects_bad_samples(tmp_path):
    with pytest.raises(TipslabError, match="lacks 'captions'"):
        write_shards([{"id": "a", "image": np.zeros((4, 4, 3), np.uint8)}], tmp_path)
    twice = [{"id": "a.b", "image": np.zeros((4, 4, 3), np.uint8), "captions": {"alt": "x"}},
             {"id": "a/b", "image": np.zeros((4, 4, 3), np.uint8), "captions": {"alt": "y"}}]
    with pytest.raises(TipslabError, match="twice"):
        write_shards(twice, tmp_path / "b")


def test_manifest_source(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (10, 8), (9, 200, 9)).save(tmp_path / "img" / "a.png")
    (tmp_path / "img" / "broken.png").write_bytes(b"not an image")
    pl.DataFrame({"image_path": ["img/a.png", "img/broken.png"], "alt": ["green", "x"],
                  "long": [None, "y"]}).write_parquet(tmp_path / "m.parquet")
    dataset = ManifestDataset(tmp_path / "m.parquet")
    sample = dataset[0]
    assert sample["image"].size == (10, 8) and sample["captions"] == {"alt": "green"}  # null long dropped
    with pytest.raises(CorruptSample, match="broken.png"):
        dataset[1]


def test_manifest_errors_name_the_problem(tmp_path):
    with pytest.raises(TipslabError, match="no such file"):
        ManifestDataset(tmp_path / "none.parquet")
    pl.DataFrame({"path": ["a.png"], "alt": ["x"]}).write_parquet(tmp_path / "a.parquet")
    with pytest.raises(TipslabError, match="missing column 'image_path'"):
        ManifestDataset(tmp_path / "a.parquet")
    pl.DataFrame({"image_path": ["a.png"], "title": ["x"]}).write_parquet(tmp_path / "b.parquet")
    with pytest.raises(TipslabError, match="no caption column"):
        ManifestDataset(tmp_path / "b.parquet")
    (tmp_path / "c.parquet").write_text("image_path,alt\n")
    with pytest.raises(TipslabError, match="not a readable parquet"):
        ManifestDataset(tmp_path / "c.parquet")
