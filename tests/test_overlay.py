"""Overlay pictures: the box is drawn where the hit is, the heat sits on the best patches."""

import numpy as np
from PIL import Image

from tipslab.retrieval.overlay import (
    BAR_LABELS,
    BAR_WIDTH,
    BOX_COLOR,
    GAP,
    MIN_SIDE,
    colormap,
    render_hit,
    slugify,
    write_overlays,
)
from tipslab.retrieval.scenes_truth import hit_or_miss
from tipslab.retrieval.search import Hit


def make_hit(path, rank=1, query="a red circle"):
    heat = np.zeros((4, 5), dtype=np.float32)
    heat[1, 2:4] = 1.0  # hot patches: x 40-80, y 20-40 in a 100 x 80 image
    return Hit(rank=rank, query=query, image_id=0, image_key=str(path), image_path=str(path),
               box=(40, 20, 80, 40), score=0.5, patch_mask=heat > 0.5, heatmap=heat, image_size=(100, 80),
               num_patches=2)


def test_render_hit_puts_image_and_heatmap_side_by_side(tmp_path):
    path = tmp_path / "grey.png"
    Image.new("RGB", (100, 80), (128, 128, 128)).save(path)
    picture = np.asarray(render_hit(make_hit(path)))
    scale = MIN_SIDE / 80  # small images are enlarged so the short side is MIN_SIDE
    width = round(100 * scale)
    assert picture.shape[1] == 2 * width + 2 * GAP + BAR_WIDTH + BAR_LABELS and picture.shape[0] > round(80 * scale)
    # the box's left edge, halfway down the box, on the image and on the heatmap
    x, y = round(40 * scale) + 1, round(30 * scale)
    assert tuple(picture[y, x]) == BOX_COLOR and tuple(picture[y, width + GAP + x]) == BOX_COLOR
    # the image panel keeps its pixels: no heat is blended into it, even on the hot patches
    assert abs(picture[round(30 * scale), round(60 * scale)].astype(int) - 128).max() <= 2
    # the heatmap panel: hot patches in turbo's top colour, cold ones in its bottom colour
    hot = picture[round(30 * scale), width + GAP + round(60 * scale)]
    cold = picture[round(75 * scale), width + GAP + round(5 * scale)]
    assert tuple(hot) == tuple(colormap(np.array([1.0]))[0]) and tuple(cold) == tuple(colormap(np.array([0.0]))[0])
    # the colour bar: high at the top, low at the bottom
    bar_x = 2 * width + 2 * GAP + BAR_WIDTH // 2
    assert tuple(picture[1, bar_x]) == tuple(hot) and tuple(picture[round(80 * scale) - 1, bar_x]) == tuple(cold)


def test_scenes_hits_are_marked_against_ground_truth():
    from tipslab.datamodules.scenes import generate_scene, split_seed

    scene = generate_scene(split_seed(0, "val"), 3, 112)
    obj = scene.objects[0]
    hit = make_hit("scene.png", query=f"a {obj.class_name}")
    hit.image_key, hit.image_size, hit.box = "scenes:val/000003", (112, 112), obj.bbox
    assert hit_or_miss(hit) == (True, 1.0)
    x0, y0, x1, y1 = obj.bbox
    hit.box = (x1, y1, min(112, x1 + 20), min(112, y1 + 20))  # beside the object
    verdict, iou = hit_or_miss(hit)
    assert not verdict and iou < 0.5
    hit.query = "a dog"  # not a scenes class: no ground truth
    assert hit_or_miss(hit) is None
    hit.image_key = "/photos/x.jpg"
    hit.query = obj.class_name
    assert hit_or_miss(hit) is None


def test_write_overlays_files_and_missing_image(tmp_path):
    path = tmp_path / "grey.png"
    Image.new("RGB", (100, 80), (128, 128, 128)).save(path)
    hits = [make_hit(path, rank=r) for r in (1, 2)] + [make_hit(tmp_path / "gone.png", rank=3)]
    written = write_overlays(hits, tmp_path / "out")["a red circle"]
    assert [p.name for p in written] == ["hit-01.png", "hit-02.png", "hit-03.png", "hits.png"]
    sheet = Image.open(written[-1])
    assert sheet.size[0] == 3 * 480 + 4 * 8
    missing = np.asarray(Image.open(written[2]))
    assert missing.shape[1] == 2 * round(100 * MIN_SIDE / 80) + 2 * GAP + BAR_WIDTH + BAR_LABELS  # placeholder


def test_several_queries_get_their_own_folders(tmp_path):
    path = tmp_path / "grey.png"
    Image.new("RGB", (100, 80), (128, 128, 128)).save(path)
    written = write_overlays([make_hit(path, query="Red circle!"), make_hit(path, query="blue/square")], tmp_path)
    assert written["Red circle!"][-1] == tmp_path / "red-circle" / "hits.png"
    assert written["blue/square"][0] == tmp_path / "blue-square" / "hit-01.png"
    assert slugify("   ") == "query"
