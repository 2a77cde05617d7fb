"""The zero-shot segmentation pipeline (windows, strides, templates) and the segmentation folders."""

import numpy as np
import pytest
import torch
from PIL import Image

from tipslab.datamodules.seg_folder import ScenesSegmentation, open_seg_folder
from tipslab.errors import TipslabError
from tipslab.platform.zeroshot_seg import (
    TCL_TEMPLATES,
    class_text_embeddings,
    evaluate_segmentation,
    predict_slide,
    short_side_resize,
    window_cosines,
    window_origins,
)


@pytest.fixture(scope="module")
def tiny():
    from tipslab.modules.encoder import build_encoder
    from tipslab.modules.tokenizers import build_tokenizer
    from tipslab.platform.config import load_config

    torch.manual_seed(0)
    cfg = load_config("tipsv2_tiny", ["model.vision.img_size=56", "model.text.context_length=16"])
    return build_encoder(cfg.model).eval(), build_tokenizer(**cfg.model.tokenizer)


def test_windows_cover_the_paper_sizes_like_the_notebook():
    # ADE20K at short side 448: a 448 x 597 image gets windows at x = 0 and 149 (the last one
    # shifted back to end at the border), one row.
    assert window_origins(448, 448, 336) == [0]
    assert window_origins(597, 448, 336) == [0, 149]
    assert window_origins(1000, 448, 336) == [0, 336, 552]
    assert window_origins(100, 448, 336) == [0]  # smaller than the window: one window, the whole side


def test_sliding_windows_cover_every_pixel_and_average_the_overlaps(tiny):
    encoder, tokenizer = tiny
    torch.manual_seed(1)
    image = torch.rand(3, 70, 126)  # non-square, larger than the window on both sides
    text = class_text_embeddings(encoder, tokenizer, ["red circle", "blue square", "green star"])
    window, stride = 56, 42
    probs = predict_slide(encoder, image, text, window, stride)
    assert probs.shape == (3, 70, 126)
    # Every pixel is covered (an uncovered one would be 0/0 = nan) and holds a distribution.
    assert torch.allclose(probs.sum(0), torch.ones(70, 126), atol=1e-5)
    ys, xs = window_origins(70, window, stride), window_origins(126, window, stride)
    assert ys == [0, 14] and xs == [0, 42, 70]
    # Pixel (20, 50) lies in the 4 windows with y0 in {0, 14} and x0 in {0, 42}: their mean.
    parts = [window_cosines(encoder, image[:, y : y + window, x : x + window], text).softmax(0)[:, 20 - y, 50 - x]
             for y in (0, 14) for x in (0, 42)]
    assert torch.allclose(probs[:, 20, 50], torch.stack(parts).mean(0), atol=1e-5)
    # Pixel (5, 5) is in one window only.
    alone = window_cosines(encoder, image[:, :window, :window], text).softmax(0)[:, 5, 5]
    assert torch.allclose(probs[:, 5, 5], alone, atol=1e-5)


def test_short_side_resize_keeps_the_aspect_like_the_notebook():
    assert short_side_resize(torch.rand(3, 100, 150), 56).shape == (3, 56, 84)
    assert short_side_resize(torch.rand(3, 150, 100), 56).shape == (3, 84, 56)


def test_class_embeddings_average_the_nine_tcl_templates(tiny):
    encoder, tokenizer = tiny
    assert len(TCL_TEMPLATES) == 9 and all("{}" in t for t in TCL_TEMPLATES)
    emb = class_text_embeddings(encoder, tokenizer, ["red circle", "blue square"])
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    one = torch.nn.functional.normalize(encoder.encode_text(tokenizer([t.format("red circle") for t in TCL_TEMPLATES])),
                                        dim=-1)
    assert torch.allclose(emb[0], torch.nn.functional.normalize(one.mean(0), dim=0), atol=1e-5)


def _write_plain_folder(root, count=3, size=(56, 84)):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / "images" / f"{i:03d}.jpg")
        Image.fromarray(rng.integers(0, 3, size, dtype=np.uint8)).save(root / "masks" / f"{i:03d}.png")
    (root / "classes.txt").write_text("red circle\nblue square\ngreen star\n")
    return root


def test_a_segmentation_folder_is_evaluated_with_windows(tiny, tmp_path):
    encoder, tokenizer = tiny
    data = open_seg_folder(_write_plain_folder(tmp_path / "plain"))
    assert data.class_names == ["red circle", "blue square", "green star"] and len(data) == 3
    image, label = data[0]
    assert image.shape == (3, 56, 84) and label.shape == (56, 84) and int(label.max()) <= 2
    out = evaluate_segmentation(encoder, tokenizer, data, short_side=42, window=42, stride=28, keep=1)
    assert 0 <= out["miou"] <= 100 and out["images"] == 3
    assert out["examples"][0][2].shape == (56, 84)  # predictions at the label's size


def test_a_mask_of_another_size_than_its_image_is_a_one_line_error(tmp_path):
    root = _write_plain_folder(tmp_path / "bad")
    Image.fromarray(np.zeros((40, 40), dtype=np.uint8)).save(root / "masks" / "001.png")
    with pytest.raises(TipslabError, match=r"masks/001.png: size 40x40 differs from its image 001.jpg \(84x56\)"):
        open_seg_folder(root)


def test_class_names_that_do_not_cover_the_mask_values_are_an_error(tmp_path):
    root = _write_plain_folder(tmp_path / "few")
    (root / "classes.txt").write_text("red circle\nblue square\n")
    data = open_seg_folder(root)
    with pytest.raises(TipslabError, match=r"masks/000.png: label value 2 has no class name \(2 names"):
        data[0]


def test_ade20k_layout_ignores_label_zero_and_shifts_the_rest(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    (root / "images" / "validation").mkdir(parents=True)
    (root / "annotations" / "validation").mkdir(parents=True)
    Image.fromarray(np.zeros((28, 42, 3), dtype=np.uint8)).save(root / "images" / "validation" / "a.jpg")
    Image.fromarray(np.array([[0, 1, 2]], dtype=np.uint8).repeat(28, 0).repeat(14, 1)).save(
        root / "annotations" / "validation" / "a.png")
    data = open_seg_folder(root, class_names=["wall", "building"])
    _, label = data[0]
    assert label[0, 0] == 255 and label[0, 20] == 0 and label[0, 40] == 1
    # Without classes.txt: the 150 names the official notebook prompts with.
    default = open_seg_folder(root)
    assert len(default.class_names) == 150 and default.class_names[:3] == ["wall", "building", "sky"]


def test_voc_layout_keeps_background_and_ignores_255(tmp_path):
    root = tmp_path / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    Image.fromarray(np.zeros((28, 28, 3), dtype=np.uint8)).save(root / "JPEGImages" / "x.jpg")
    Image.fromarray(np.array([[0, 1], [255, 1]], dtype=np.uint8).repeat(14, 0).repeat(14, 1)).save(
        root / "SegmentationClass" / "x.png")
    (root / "ImageSets/Segmentation/val.txt").write_text("x\n")
    (root / "classes.txt").write_text("background\naeroplane\n")
    data = open_seg_folder(root)
    _, label = data[0]
    assert sorted(torch.unique(label).tolist()) == [0, 1, 255]


def test_scenes_segmentation_labels_object_pixels_and_ignores_the_background():
    data = ScenesSegmentation("val", num_images=2, image_size=56, seed=0)
    scene = data.scenes.scene(0)
    _, label = data[0]
    for obj in scene.objects:
        assert (label[torch.from_numpy(obj.mask)] == data.class_names.index(obj.class_name)).all()
    background = ~np.logical_or.reduce([o.mask for o in scene.objects])
    assert (label[torch.from_numpy(background)] == 255).all()
