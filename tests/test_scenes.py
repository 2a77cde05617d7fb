"""The built-in scenes: seeded, truthful captions, masks where the colour is, disjoint splits."""

import re

import numpy as np
import pytest
from PIL import Image

from tipslab.datamodules.manifest import ManifestDataset
from tipslab.datamodules.scenes import (
    _BACKGROUND_MAX,
    COLOURS,
    TEXTURE_SHADE,
    ScenesDataset,
    generate_scene,
    position_name,
    scene_class_names,
)
from tipslab.datamodules.scenes_export import (
    read_scene_objects,
    rle_decode,
    rle_encode,
    write_scene_folder,
)
from tipslab.errors import TipslabError

SCENES = [generate_scene(7, i) for i in range(24)]


def test_same_seed_and_index_give_the_same_scene():
    a, b = generate_scene(3, 5), generate_scene(3, 5)
    assert np.array_equal(a.image, b.image)
    assert a.captions == b.captions
    assert [o.class_name for o in a.objects] == [o.class_name for o in b.objects]
    assert all(np.array_equal(x.mask, y.mask) for x, y in zip(a.objects, b.objects))


def test_other_index_or_seed_gives_another_scene():
    base = generate_scene(3, 5).image
    assert not np.array_equal(base, generate_scene(3, 6).image)
    assert not np.array_equal(base, generate_scene(4, 5).image)


@pytest.mark.parametrize("size", [56, 70, 112])
def test_any_image_size(size):
    scene = generate_scene(0, 1, image_size=size)
    assert scene.image.shape == (size, size, 3) and scene.image.dtype == np.uint8
    assert all(o.mask.shape == (size, size) for o in scene.objects)


def test_one_to_four_distinct_objects():
    counts = [len(s.objects) for s in SCENES]
    assert min(counts) >= 1 and max(counts) <= 4
    assert len(set(counts)) >= 3  # the generator does vary the count
    for scene in SCENES:
        names = [o.class_name for o in scene.objects]
        assert len(names) == len(set(names))


def test_masks_are_where_the_colour_is():
    for scene in SCENES:
        union = np.zeros(scene.image.shape[:2], dtype=bool)
        for obj in scene.objects:
            assert obj.mask.any()
            assert not (obj.mask & union).any(), "visible masks must not overlap"
            union |= obj.mask
            rgb = np.asarray(COLOURS[obj.colour])
            shade = np.round(rgb * TEXTURE_SHADE)
            pixels = scene.image[obj.mask].astype(int)
            is_colour = (np.abs(pixels - rgb) <= 1).all(axis=1)
            is_shade = (np.abs(pixels - shade) <= 1).all(axis=1)
            if obj.texture == "solid":
                assert is_colour.all()
            else:
                assert (is_colour | is_shade).all()
                assert is_colour.any() and is_shade.any()  # the pattern is visible
        # Outside every object only background: dark, never an object's bright colour.
        assert scene.image[~union].max() <= _BACKGROUND_MAX


def test_bbox_is_the_extent_of_the_mask():
    for scene in SCENES:
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.bbox
            ys, xs = np.nonzero(obj.mask)
            assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


def test_class_vocabulary():
    names = scene_class_names()
    assert len(names) == len(set(names)) == 49
    assert "red circle" in names and "white star" in names
    assert all(o.class_name in names for s in SCENES for o in s.objects)
    assert all(o.class_name == f"{o.colour} {o.shape}" for s in SCENES for o in s.objects)


def test_captions_mention_every_object_at_each_granularity():
    for scene in SCENES:
        caps = scene.captions
        assert set(caps) == {"alt", "short", "long"}
        assert len(caps["alt"]) < len(caps["short"]) < len(caps["long"])
        for obj in scene.objects:
            for text in caps.values():
                assert obj.class_name in text.lower()
            # The long caption has every attribute of the object in one phrase.
            assert f"{obj.size} {obj.texture} {obj.class_name}" in caps["long"].lower()
            position_words = obj.position if obj.position != "center" else "center"
            assert re.search(rf"{obj.size} {obj.texture} {obj.class_name} (in|at|on) the {position_words}",
                             caps["long"].lower())


def test_positions_by_hand():
    assert position_name(5, 5, 112) == "top left"
    assert position_name(56, 56, 112) == "center"
    assert position_name(110, 56, 112) == "right"
    assert position_name(56, 111, 112) == "bottom"


def test_relations_in_long_captions_match_the_masks():
    checked = 0
    for scene in SCENES:
        centroid = {o.class_name: (np.nonzero(o.mask)[1].mean(), np.nonzero(o.mask)[0].mean()) for o in scene.objects}
        for a, rel, b in re.findall(r"the (\w+ \w+) is (left of|right of|above|below) the (\w+ \w+)",
                                    scene.captions["long"].lower()):
            (ax, ay), (bx, by) = centroid[a], centroid[b]
            assert {"left of": ax < bx, "right of": ax > bx, "above": ay < by, "below": ay > by}[rel]
            checked += 1
    assert checked > 10


def test_dataset_samples_and_disjoint_splits():
    train = ScenesDataset("train", 30, image_size=56, seed=0)
    val = ScenesDataset("val", 30, image_size=56, seed=0)
    sample = train[3]
    assert sample["id"] == "train/000003" and set(sample["captions"]) == {"alt", "short", "long"}
    image = sample["image"]
    assert image.shape == (3, 56, 56) and image.dtype.is_floating_point
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert np.array_equal((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), train.scene(3).image)
    train_images = {train.scene(i).image.tobytes() for i in range(len(train))}
    assert not train_images & {val.scene(i).image.tobytes() for i in range(len(val))}
    # Disjoint for any pair of seeds: another seed's val is not this seed's train either.
    assert not train_images & {ScenesDataset("val", 30, 56, seed=1).scene(i).image.tobytes() for i in range(30)}
    assert val.class_names == scene_class_names()


def test_bad_arguments_raise_tipslab_errors():
    with pytest.raises(TipslabError, match="split 'test'"):
        ScenesDataset("test", 4)
    with pytest.raises(TipslabError, match="num_images=0"):
        ScenesDataset("train", 0)
    with pytest.raises(IndexError):
        ScenesDataset("val", 2).scene(2)


@pytest.mark.parametrize("mask", [
    np.zeros((4, 5), bool), np.ones((4, 5), bool),
    np.array([[1, 0, 0], [1, 1, 0]], bool), np.array([[0, 1, 1], [0, 0, 1]], bool),
])
def test_rle_round_trip(mask):
    runs = rle_encode(mask)
    assert sum(runs) == mask.size
    assert np.array_equal(rle_decode(runs, *mask.shape), mask)


def test_rle_of_a_scene_mask_and_bad_runs():
    mask = SCENES[0].objects[0].mask
    assert np.array_equal(rle_decode(rle_encode(mask), *mask.shape), mask)
    with pytest.raises(TipslabError, match="sum to"):
        rle_decode([1, 2], 3, 3)


def test_write_scene_folder(tmp_path):
    out = write_scene_folder(tmp_path / "val", num_images=4, image_size=56, seed=2)
    dataset = ScenesDataset("val", 4, image_size=56, seed=2)
    objects = read_scene_objects(out)
    assert objects.height == sum(len(dataset.scene(i).objects) for i in range(4))
    for i in range(4):
        scene = dataset.scene(i)
        png = np.asarray(Image.open(out / "images" / f"val_{i:06d}.png"))
        assert np.array_equal(png, scene.image)
        rows = objects.filter(objects["id"] == scene.id).sort("object").to_dicts()
        assert [r["class_name"] for r in rows] == [o.class_name for o in scene.objects]
        for row, obj in zip(rows, scene.objects):
            assert tuple(row["bbox"]) == obj.bbox
            assert np.array_equal(rle_decode(row["mask_rle"], row["height"], row["width"]), obj.mask)
    # The caption manifest is a ManifestDataset source.
    manifest = ManifestDataset(out / "manifest.parquet")
    assert len(manifest) == 4 and manifest[1]["captions"] == dataset.scene(1).captions
    with pytest.raises(TipslabError, match="not empty"):
        write_scene_folder(out, num_images=2, image_size=56)


@pytest.mark.parametrize("granularity, stored", [("short", False), ("long", False), ("long", True)])
def test_captions_of_a_crop_name_exactly_the_objects_it_shows(granularity, stored, tmp_path):
    import numpy as np

    from tipslab.datamodules.scene_captions import CROP_VISIBLE_SHARE
    from tipslab.datamodules.scenes import ScenesDataset
    from tipslab.datamodules.shards import ShardDataset, write_scene_shards
    from tipslab.datamodules.streams import SampleProcessor
    from tipslab.datamodules.transforms import GlobalCrop, crop_params

    dataset = ScenesDataset("train", num_images=40, image_size=112, seed=1)
    samples = [dataset[i] for i in range(len(dataset))]
    if stored:  # read back from shards: the objects' masks travel in the json
        write_scene_shards(dataset, tmp_path)
        by_id = {s["id"]: s for s in ShardDataset(tmp_path, shuffle=False)}
        samples = [by_id[s["id"]] for s in samples]
    processor = SampleProcessor(GlobalCrop(56, scale=(0.1, 0.6)), (granularity,))
    differs = 0
    for index in range(len(dataset)):
        sample, scene = samples[index], dataset.scene(index)
        item = processor(sample, np.random.default_rng(index))
        top, left, h, w = crop_params(112, 112, np.random.default_rng(index), (0.1, 0.6))  # the same draw
        shown = sorted(o.class_name for o in scene.objects
                       if o.mask[top:top + h, left:left + w].sum() >= CROP_VISIBLE_SHARE * o.mask.sum())
        named = [] if item["alt"] == "background" else sorted(item["alt"].split(", "))
        assert named == shown, (index, item["alt"], shown)
        assert item["granularity"] == granularity
        for name in scene.class_names:
            assert (name in item["caption"].lower()) == (name in shown)
        differs += named != sorted(scene.class_names)
    assert differs > 5  # the crops do cut objects out, so the check means something


def test_crop_captions_can_be_turned_off():
    import numpy as np

    from tipslab.datamodules.scenes import ScenesDataset
    from tipslab.datamodules.streams import SampleProcessor
    from tipslab.datamodules.transforms import GlobalCrop

    sample = ScenesDataset("train", num_images=3, image_size=112, seed=1)[2]
    item = SampleProcessor(GlobalCrop(56, scale=(0.05, 0.1)), ("short",), crop_captions=False)(
        sample, np.random.default_rng(0))
    assert item["alt"] == sample["captions"]["alt"]
