"""Overlay pictures: the box is drawn where the hit is, the heat sits on the best patches."""

import numpy as np
from PIL import Image

from tipslab.retrieval.overlay import (
    BOX_COLOR,
    MIN_SIDE,
    render_hit,
    slugify,
    write_overlays,
)
from tipslab.retrieval.search import Hit


def make_hit(path, rank=1, query="a red circle"):
    heat = np.zeros((4, 5), dtype=np.float32)
    heat[1, 2:4] = 1.0  # hot patches: x 40-80, y 20-40 in a 100 x 80 image
    return Hit(rank=rank, query=query, image_id=0, image_key=str(path), image_path=str(path),
               box=(40, 20, 80, 40), score=0.5, patch_mask=heat > 0.5, heatmap=heat, image_size=(100, 80),
               num_patches=2)


def test_render_hit_places_box_and_heat(tmp_path):
    path = tmp_path / "grey.png"
    Image.new("RGB", (100, 80), (128, 128, 128)).save(path)
    picture = np.asarray(render_hit(make_hit(path)))
    scale = MIN_SIDE / 80  # small images are enlarged so the short side is MIN_SIDE
    assert picture.shape[1] == round(100 * scale) and picture.shape[0] > round(80 * scale)  # + caption
    # the box's left edge, halfway down the box
    x, y = round(40 * scale) + 1, round(30 * scale)
    assert tuple(picture[y, x]) == BOX_COLOR
    # heat: the centre of the hot patches is strongly tinted, a far corner keeps its grey
    hot = picture[round(30 * scale), round(60 * scale)].astype(int)
    cold = picture[round(75 * scale), round(5 * scale)].astype(int)
    assert abs(cold - 128).max() <= 2
    assert abs(hot - 128).max() > 40


def test_write_overlays_files_and_missing_image(tmp_path):
    path = tmp_path / "grey.png"
    Image.new("RGB", (100, 80), (128, 128, 128)).save(path)
    hits = [make_hit(path, rank=r) for r in (1, 2)] + [make_hit(tmp_path / "gone.png", rank=3)]
    written = write_overlays(hits, tmp_path / "out")["a red circle"]
    assert [p.name for p in written] == ["hit-01.png", "hit-02.png", "hit-03.png", "hits.png"]
    sheet = Image.open(written[-1])
    assert sheet.size[0] == 3 * 320 + 4 * 8
    missing = np.asarray(Image.open(written[2]))
    assert missing.shape[1] == round(100 * MIN_SIDE / 80)  # placeholder keeps the image's size


def test_several_queries_get_their_own_folders(tmp_path):
    path = tmp_path / "grey.png"
    Image.new("RGB", (100, 80), (128, 128, 128)).save(path)
    written = write_overlays([make_hit(path, query="Red circle!"), make_hit(path, query="blue/square")], tmp_path)
    assert written["Red circle!"][-1] == tmp_path / "red-circle" / "hits.png"
    assert written["blue/square"][0] == tmp_path / "blue-square" / "hit-01.png"
    assert slugify("   ") == "query"
