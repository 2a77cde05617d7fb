"""Dense ground truth: the scenes' depth maps and normals, and the folder layouts (VOC, ADE20K,
NYU-style) read from files this test writes."""

import numpy as np
import pytest
import torch
from PIL import Image

from tipslab.datamodules.dense_folders import DepthFolder, ScenesDense, SegFolder
from tipslab.datamodules.scenes import (
    BACKGROUND_DEPTH,
    OBJECT_DEPTHS,
    depth_normals,
    generate_scene,
    segmentation_classes,
    segmentation_labels,
)
from tipslab.errors import TipslabError


def test_scene_depth_follows_drawing_order_and_occlusion():
    for index in range(12):
        scene = generate_scene(5, index, 112)
        depth = scene.depth
        assert depth.shape == (112, 112) and depth.dtype == np.float32
        union = np.logical_or.reduce([o.mask for o in scene.objects])
        # background: the wall, far at the top and nearer at the bottom
        rows = np.linspace(*BACKGROUND_DEPTH, 112)
        np.testing.assert_allclose(depth[~union], np.broadcast_to(rows[:, None], depth.shape)[~union], atol=1e-5)
        for k, obj in enumerate(scene.objects):
            # each visible pixel is at its object's depth; later objects are nearer (they cover earlier ones)
            assert np.all(depth[obj.mask] == OBJECT_DEPTHS[k])
        assert all(OBJECT_DEPTHS[k] > OBJECT_DEPTHS[k + 1] for k in range(len(OBJECT_DEPTHS) - 1))


def test_scene_labels_name_each_visible_object():
    scene = generate_scene(5, 3, 112)
    labels = segmentation_labels(scene)
    names = segmentation_classes("class")
    for obj in scene.objects:
        assert np.all(labels[obj.mask] == names.index(obj.class_name))
    assert np.all(labels[~np.logical_or.reduce([o.mask for o in scene.objects])] == 0)
    shapes = segmentation_labels(scene, "shape")
    assert {segmentation_classes("shape")[i] for i in np.unique(shapes)} == {"background"} | {o.shape for o in scene.objects}


def test_normals_of_a_flat_card_face_the_camera_and_the_wall_leans_back():
    scene = generate_scene(5, 0, 112)
    normals = depth_normals(scene.depth)
    np.testing.assert_allclose(np.linalg.norm(normals, axis=-1), 1.0, atol=1e-5)
    obj = scene.objects[-1].mask  # the last drawn object is whole: its interior is a flat card
    inner = obj & np.roll(obj, 2, 0) & np.roll(obj, -2, 0) & np.roll(obj, 2, 1) & np.roll(obj, -2, 1)
    np.testing.assert_allclose(normals[inner], np.broadcast_to([0, 0, 1], normals[inner].shape), atol=1e-5)
    union = np.logical_or.reduce([o.mask for o in scene.objects])
    near = np.logical_or.reduce([np.roll(union, (dy, dx), (0, 1)) for dy in range(-2, 3) for dx in range(-2, 3)])
    wall = ~near  # away from the depth steps at object rims
    wall[:2], wall[-2:] = False, False
    # the wall's depth grows upwards in the image: a floor-like plane, normal tilted up (+y), towards us (+z)
    assert np.all(normals[wall][:, 1] > 0.2) and np.all(normals[wall][:, 2] > 0.2)
    assert np.abs(normals[wall][:, 0]).max() < 1e-3  # no sideways lean: depth varies along rows only


def test_scenes_dense_items():
    seg = ScenesDense("seg", "val", num_images=3, image_size=56, seed=1)
    item = seg[2]
    assert item["image"].shape == (3, 56, 56) and item["target"].dtype == torch.int64
    assert seg.num_classes == 50 and item["id"] == "val/000002"
    depth = ScenesDense("depth", "val", num_images=3, image_size=56, seed=1)[2]["target"]
    assert depth.shape == (56, 56) and depth.min() >= 1.5 and depth.max() <= 9.0
    normals = ScenesDense("normals", "val", num_images=3, image_size=56, seed=1)[2]["target"]
    assert normals.shape == (3, 56, 56)
    torch.testing.assert_close(seg[2]["image"], item["image"])  # kept scenes give the same item again


def _jpg(path, colour, size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_voc_and_ade_folders(tmp_path):
    voc = tmp_path / "VOC2012"
    for name, value in (("a", 1), ("b", 15)):
        _jpg(voc / "JPEGImages" / f"{name}.jpg", (200, 10, 10))
        labels = np.zeros((30, 40), np.uint8)
        labels[:, 20:] = value
        labels[0] = 255  # VOC's object borders
        label = Image.fromarray(labels, mode="P")
        label.putpalette([0, 0, 0, 128, 0, 0] * 128)
        (voc / "SegmentationClass").mkdir(parents=True, exist_ok=True)
        label.save(voc / "SegmentationClass" / f"{name}.png")
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("b\n")
    ds = SegFolder(voc, "val", image_size=28)
    item = ds[0]
    assert len(ds) == 1 and ds.num_classes == 21 and item["image"].shape == (3, 28, 28)
    assert set(item["target"].unique().tolist()) == {0, 15, 255} and item["target"][5, 27] == 15

    ade = tmp_path / "ADE"
    _jpg(ade / "images" / "validation" / "x.jpg", (0, 0, 200))
    labels = np.zeros((30, 40), np.uint8)
    labels[:, 20:] = 3  # ADE class 3 ("sky") -> id 2; 0 ("other") -> ignored
    (ade / "annotations" / "validation").mkdir(parents=True)
    Image.fromarray(labels).save(ade / "annotations" / "validation" / "x.png")
    target = SegFolder(ade, "val", image_size=28)[0]["target"]
    assert set(target.unique().tolist()) == {2, 255}
    with pytest.raises(TipslabError, match="not a segmentation folder"):
        SegFolder(tmp_path, "val")


def test_nyu_style_depth_folder_in_millimetres(tmp_path):
    root = tmp_path / "nyu"
    _jpg(root / "test" / "rgb" / "kitchen" / "0001.jpg", (90, 90, 90))
    millimetres = np.full((30, 40), 2500, np.uint16)
    millimetres[:, :10] = 0  # no measurement
    (root / "test" / "depth" / "kitchen").mkdir(parents=True)
    Image.fromarray(millimetres).save(root / "test" / "depth" / "kitchen" / "0001.png")
    item = DepthFolder(root, "test", image_size=20)[0]
    assert item["target"].shape == (20, 20)
    assert item["target"][0, 0] == 0 and item["target"][0, 19] == pytest.approx(2.5)

    bts = tmp_path / "bts" / "sync" / "office"
    _jpg(bts / "rgb_00007.jpg", (10, 90, 10))
    Image.fromarray(millimetres).save(bts / "sync_depth_00007.png")
    assert DepthFolder(tmp_path / "bts", "train", image_size=20)[0]["target"].max() == pytest.approx(2.5)
    (bts / "sync_depth_00007.png").unlink()
    with pytest.raises(TipslabError, match="no depth PNG"):
        DepthFolder(tmp_path / "bts", "train")
