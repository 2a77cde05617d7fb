"""A folder of images for indexing: recursive sorted listing, resized tensors, unreadable files skipped."""

import pytest
import torch
from PIL import Image

from tipslab.datamodules.image_folder import ImageFolder
from tipslab.errors import TipslabError


@pytest.fixture()
def folder(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    Image.new("RGB", (40, 30), (255, 0, 0)).save(tmp_path / "b.png")
    Image.new("RGB", (20, 20), (0, 0, 255)).save(tmp_path / "sub" / "a.JPG", quality=100)
    Image.new("L", (16, 16), 128).save(tmp_path / "sub" / "deeper" / "gray.bmp")
    Image.new("RGBA", (16, 16), (0, 255, 0, 10)).save(tmp_path / "sub" / "c.webp", lossless=True)
    (tmp_path / "notes.txt").write_text("not an image")
    Image.new("RGB", (8, 8)).save(tmp_path / "sub" / "._hidden.png")  # macOS resource fork
    return tmp_path


def test_lists_recursively_sorted_and_resizes(folder):
    dataset = ImageFolder(folder, image_size=28)
    names = [p.relative_to(folder).as_posix() for p in dataset.paths]
    assert names == ["b.png", "sub/a.JPG", "sub/c.webp", "sub/deeper/gray.bmp"]
    items = list(dataset)
    assert [path for path, _ in items] == [str(p) for p in dataset.paths]
    for _, pixels in items:
        assert pixels.shape == (3, 28, 28) and pixels.dtype == torch.float32
        assert 0.0 <= float(pixels.min()) and float(pixels.max()) <= 1.0
    red, blue, green, gray = (pixels for _, pixels in items)
    assert torch.allclose(red[:, 14, 14], torch.tensor([1.0, 0.0, 0.0]), atol=1e-3)  # no mean/std
    assert blue[2, 14, 14] > 0.95 and blue[0, 14, 14] < 0.05
    # Alpha composited over white, as img2dataset does (alpha 10 of 255: almost all white).
    expected = torch.tensor([245 / 255, 1.0, 245 / 255])
    assert torch.allclose(green[:, 5, 5], expected, atol=2 / 255)
    assert torch.allclose(gray[:, 3, 3], torch.full((3,), 128 / 255), atol=1e-3)  # grey -> 3 channels
    assert dataset.skipped == []


def test_unreadable_images_are_skipped_with_a_warning(folder):
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    good = (folder / "b.png").read_bytes()
    (folder / "sub" / "truncated.png").write_bytes(good[: len(good) // 2])
    dataset = ImageFolder(folder, image_size=14)
    with pytest.warns(UserWarning) as record:
        items = list(dataset)
    warned = sorted(str(w.message).split(":")[0] for w in record)
    assert warned == [f"skipping unreadable image {folder / name}" for name in ("broken.png", "sub/truncated.png")]
    assert len(items) == 4
    assert sorted(dataset.skipped) == sorted([str(folder / "broken.png"), str(folder / "sub" / "truncated.png")])
    assert "cannot read image" in dataset.errors[str(folder / "broken.png")]


def test_empty_or_missing_folder_names_folder_and_extensions(tmp_path):
    (tmp_path / "only.txt").write_text("x")
    with pytest.raises(TipslabError, match=rf"{tmp_path}: no images found.*\.png .*\.webp \.bmp"):
        ImageFolder(tmp_path, 28)
    with pytest.raises(TipslabError, match="does not exist"):
        ImageFolder(tmp_path / "missing", 28)
    with pytest.raises(TipslabError, match="is not a folder"):
        ImageFolder(tmp_path / "only.txt", 28)


def test_image_size_must_be_a_patch_multiple(folder):
    with pytest.raises(TipslabError, match="multiple of the patch size 14"):
        ImageFolder(folder, 100)


def test_worker_processes_decode_the_same_images_in_the_same_order(folder):
    """`tipslab index` on a GPU decodes in DataLoader workers: same pixels, sizes, order and skips as inline."""
    (folder / "sub" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    Image.new("RGB", (30, 12), (9, 9, 9)).save(folder / "z_wide.png")
    inline, parallel = ImageFolder(folder, 14), ImageFolder(folder, 14)
    with pytest.warns(UserWarning):
        here = list(inline.read(workers=0))
    with pytest.warns(UserWarning, match="broken.png"):
        there = list(parallel.read(workers=2))
    assert [i.path for i in there] == [i.path for i in here] and len(here) == 5
    assert [i.size for i in there] == [i.size for i in here]
    assert here[-1].size == (30, 12)
    for a, b in zip(here, there):
        assert a.pixels.dtype == torch.uint8 and torch.equal(a.pixels, b.pixels)
    assert torch.equal(here[0].pixels.float() / 255, inline.load(0))  # uint8 / 255 is the float image
    assert parallel.skipped == inline.skipped == [str(folder / "sub" / "broken.png")]
    assert parallel.counts.take() == inline.counts.take()
