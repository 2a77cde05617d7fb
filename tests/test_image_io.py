"""The one image reader and the one preprocessing: awkward files read right, every command the same tensor."""

import warnings

import awkward_images as awk
import numpy as np
import pytest
import torch
from PIL import Image

from tipslab.datamodules.image_folder import ImageFolder
from tipslab.datamodules.image_io import UnreadableImage, image_size, read_image
from tipslab.datamodules.preprocess import Preprocessing
from tipslab.datamodules.sample_quality import SkipCounter
from tipslab.datamodules.transforms import Resize
from tipslab.errors import TipslabError


@pytest.mark.parametrize("make, conversion", [
    (awk.png16_grey, "high_bit_depth"), (awk.exif_rotated_png, "exif_rotated"),
    (awk.palette_png, "palette"), (awk.rgba_png, "alpha"), (awk.la_png, "alpha"),
])
def test_awkward_pngs_read_as_their_correct_8bit_image(make, conversion):
    data, expected = make()
    done = []
    image = read_image(data, conversions=done)
    assert image.mode == "RGB"
    assert np.array_equal(np.asarray(image), expected)
    assert conversion in done


def test_16bit_png_is_not_white_as_plain_pil_makes_it():
    data, expected = awk.png16_grey()
    naive = np.asarray(Image.open(__import__("io").BytesIO(data)).convert("RGB"))
    assert (naive == 255).mean() > 0.9  # the bug the reader exists for
    assert (np.asarray(read_image(data)) == 255).mean() < 0.05


def test_exif_rotated_jpeg_and_cmyk_jpeg(tmp_path):
    data, upright = awk.exif_rotated_jpeg()
    image = np.asarray(read_image(data)).astype(int)
    assert image.shape == upright.shape
    assert np.abs(image - upright).mean() < 3  # JPEG: close, and sideways would be far off
    path = tmp_path / "sideways.jpg"
    path.write_bytes(data)
    assert image_size(path) == (upright.shape[1], upright.shape[0])  # the upright size, from the header
    data, expected = awk.cmyk_jpeg()
    done = []
    assert np.abs(np.asarray(read_image(data, conversions=done)).astype(int) - expected).mean() < 3
    assert done == ["cmyk"]


@pytest.mark.parametrize("data, kind", [
    (b"", "empty_file"), (b"this is a caption, not an image", "not_image"),
    (awk.truncated_jpeg(), "truncated"), (awk.bomb_png(), "too_large"),
])
def test_unreadable_bytes_raise_with_a_kind(data, kind):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's DecompressionBombWarning must not escape
        with pytest.raises(UnreadableImage) as err:
            read_image(data, name="x.png")
    assert err.value.kind == kind and "x.png" in str(err.value)


def test_bomb_guard_limit_and_missing_file(tmp_path):
    data = awk.encode(Image.new("RGB", (40, 40)), "PNG")
    with pytest.raises(UnreadableImage, match="over 1000 pixels") as err:
        read_image(data, max_pixels=1000)
    assert err.value.kind == "too_large"
    assert read_image(data, max_pixels=1600).size == (40, 40)
    with pytest.raises(UnreadableImage) as err:
        read_image(tmp_path / "gone.png")
    assert err.value.kind == "missing_file"


def test_skip_counter_takes_and_adds():
    counter, total = SkipCounter(), SkipCounter()
    counter.skip("truncated")
    counter.skip("truncated")
    counter.ok(["alpha"])
    taken = counter.take()
    assert taken == {"seen": 3, "skipped": {"truncated": 2}, "converted": {"alpha": 1}}
    assert counter.take()["seen"] == 0
    total.add(taken)
    total.add(taken)
    assert total.seen == 6 and total.skipped["truncated"] == 4 and total.total_skipped == 4


def write_folder(folder):
    folder.mkdir()
    files = {"a16.png": awk.png16_grey()[0], "b_rot.png": awk.exif_rotated_png()[0],
             "c_rgba.png": awk.rgba_png()[0], "d_plain.png": awk.encode(Image.fromarray(awk.base_pixels(40, 25)), "PNG"),
             "e_bad.jpg": awk.truncated_jpeg(), "f_bomb.png": awk.bomb_png()}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def test_embed_index_api_and_eval_view_give_the_same_tensor(tmp_path):
    from tipslab.modules.api import Preprocess
    from tipslab.platform.embed import read_images
    from tipslab.retrieval.extract import open_source

    folder = write_folder(tmp_path / "images")
    size = 28
    paths = sorted(folder.iterdir())
    counts = SkipCounter()
    embed_paths, embed_pixels = read_images(paths, Preprocess(size), counts)
    assert [p.name for p in embed_paths] == ["a16.png", "b_rot.png", "c_rgba.png", "d_plain.png"]
    assert dict(counts.skipped) == {"truncated": 1, "too_large": 1}
    with pytest.warns(UserWarning) as warned:
        source = open_source(folder, size)
        indexed = {img.path: img for img in source}
    assert sorted(str(w.message).split(":")[0].rsplit("/", 1)[-1] for w in warned) == ["e_bad.jpg", "f_bomb.png"]
    assert source.preprocessing == Preprocessing(size).describe()
    assert [s["path"] for s in source.skipped] == [str(folder / "e_bad.jpg"), str(folder / "f_bomb.png")]
    for path, pixels in zip(embed_paths, embed_pixels):
        torch.testing.assert_close(indexed[str(path)].pixels.float() / 255, pixels, rtol=0, atol=0)
        upright = read_image(path)
        assert indexed[str(path)].size == upright.size  # EXIF-rotated: the upright size
        torch.testing.assert_close(Resize(size)(upright)[0], pixels, rtol=0, atol=0)  # training's eval view
    # A float tensor (the scenes' images) goes the same way as its 8-bit picture.
    array = awk.base_pixels(40, 25)
    as_float = torch.from_numpy(array).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(Preprocessing(size)(as_float), Preprocessing(size)(Image.fromarray(array)), rtol=0, atol=0)


def test_region_crop_is_the_crop_preprocessed():
    array = awk.base_pixels(40, 50)
    prep = Preprocessing(14)
    expected = prep(Image.fromarray(array[5:25, 10:40]))
    torch.testing.assert_close(prep.region(Image.fromarray(array), (10, 5, 40, 25)), expected, rtol=0, atol=0)
    with pytest.raises(Exception, match="empty"):
        prep.region(Image.fromarray(array), (10, 5, 10, 25))


def test_image_folder_counts_by_kind(tmp_path):
    folder = write_folder(tmp_path / "images")
    dataset = ImageFolder(folder, 14)
    with pytest.warns(UserWarning):
        got = [path for path, _ in dataset]
    assert len(got) == 4 and dataset.counts.skipped == {"truncated": 1, "too_large": 1}
    assert dataset.counts.converted["high_bit_depth"] == 1 and dataset.counts.converted["exif_rotated"] == 1


def _smooth_photo(width, height):
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    pixels = np.stack([127 + 100 * np.sin(xs / 37 + c) * np.cos(ys / 23 - c) for c in (0.0, 1.0, 2.0)], -1)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def test_reduced_decode_reads_a_large_jpeg_smaller_with_its_full_upright_size(tmp_path):
    photo = _smooth_photo(600, 460)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: upright it is 460 x 600
    photo.save(tmp_path / "big.jpg", quality=95, exif=exif)
    photo.save(tmp_path / "big.png")
    full, reduced = Preprocessing(112), Preprocessing(112, decode="reduced")
    image, size = reduced.read(tmp_path / "big.jpg")
    assert size == (460, 600) and image.size == (115, 150)  # 1/4 by DCT scaling: both sides still >= 112
    assert full.read(tmp_path / "big.jpg")[0].size == (460, 600)
    a, b = full.uint8(full.read(tmp_path / "big.jpg")[0]), reduced.uint8(image)
    difference = (a.int() - b.int()).abs().float()
    assert not torch.equal(a, b) and difference.mean() < 3  # the same picture, a little different
    # Only JPEGs decode smaller; a PNG is read in full either way, and a small JPEG too.
    png_image, png_size = reduced.read(tmp_path / "big.png")
    assert png_image.size == png_size == (600, 460)
    photo.resize((200, 150)).save(tmp_path / "small.jpg", quality=95)
    assert reduced.read(tmp_path / "small.jpg")[0].size == (200, 150)  # 112/150 > 1/2: no reduction
    with pytest.raises(TipslabError, match="decode='draft'; expected one of full, reduced"):
        Preprocessing(112, decode="draft")


def test_a_folder_source_decoded_reduced_says_so_and_keeps_full_sizes(tmp_path):
    from tipslab.retrieval.extract import open_source

    _smooth_photo(600, 460).save(tmp_path / "a.jpg", quality=95)
    source = open_source(tmp_path, 112, workers=0, decode="reduced")
    (image,) = list(source)
    assert image.size == (600, 460) and image.pixels.shape == (3, 112, 112)
    assert source.preprocessing == Preprocessing(112, decode="reduced").describe()
    assert source.preprocessing["decode"] == "reduced"
