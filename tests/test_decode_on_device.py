"""JPEGs decoded on the device (``data.decode_on_device``): plain JPEGs leave the worker as bytes,
everything else as before, and the views cut after decoding are the worker-decoded path's exactly
(on a CPU the decoder is PIL's libjpeg-turbo)."""

import io
import logging
import pickle

import numpy as np
import pytest
import torch
from awkward_images import base_pixels, cmyk_jpeg, encode, exif_rotated_jpeg
from batch_recorder import BatchRecorder
from PIL import Image

from tipslab.datamodules.datamodule import PretrainDataModule
from tipslab.datamodules.encoded_jpeg import EncodedJpeg, decode_jpegs, plain_jpeg
from tipslab.datamodules.image_io import read_image, read_image_reduced
from tipslab.errors import TipslabError
from tipslab.modules.tokenizers import build_tokenizer

TOKENIZER = build_tokenizer(context_length=32)


def photo(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# What each picture of the folder is, and whether it may travel encoded.
PICTURES = {
    "plain_a": (lambda: encode(photo(40, 60, 0), "JPEG", quality=90), True),
    "plain_b": (lambda: encode(photo(64, 48, 1), "JPEG", quality=75, subsampling=2), True),
    "plain_c": (lambda: encode(photo(50, 70, 2), "JPEG", quality=95, subsampling=0), True),
    "zero_padded": (lambda: encode(photo(44, 52, 3), "JPEG") + b"\x00" * 16, True),  # padding after the end marker
    "progressive": (lambda: encode(photo(48, 48, 4), "JPEG", progressive=True), False),
    "grey": (lambda: encode(Image.fromarray(base_pixels(40, 56)[..., 0]), "JPEG"), False),
    "cmyk": (lambda: cmyk_jpeg()[0], False),
    "rotated": (lambda: exif_rotated_jpeg()[0], False),
    "png": (lambda: encode(photo(36, 60, 5), "PNG"), False),
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from tipslab.platform.cli import main

    root = tmp_path_factory.mktemp("decode")
    folder = root / "images"
    folder.mkdir()
    for name, (make, _) in PICTURES.items():
        (folder / f"{name}.{'png' if name == 'png' else 'jpg'}").write_bytes(make())
        (folder / f"{name}.json").write_text('{"captions": {"alt": "a picture", "short": "a %s picture"}}' % name)
    main(["shards", str(root / "shards"), "--images", str(folder), "--samples-per-shard", "5"])
    return root / "shards"


def batches(path, count=3, **overrides):
    cfg = {"source": "shards", "path": str(path), "image_size": 28, "batch_size": 3, "num_workers": 0,
           "shuffle_buffer": 4, "decode_draft": False, "flip": True, "global_crops": {"count": 2},
           "local_crops": {"count": 2, "size": 14}, "masking": {"enabled": True, "probability": 1.0},
           "crops_on_device": True, **overrides}
    module = PretrainDataModule(cfg, TOKENIZER, seed=3)
    return module, [batch for batch, _ in zip(module.train_dataloader(), range(count))]


def test_plain_jpegs_travel_as_bytes_and_cut_to_the_worker_decoded_views(shards):
    module, encoded = batches(shards, decode_on_device=True)
    assert module.decode_on_device()
    _, decoded = batches(shards, decode_on_device=False)
    kinds = {}
    for mine, theirs in zip(encoded, decoded, strict=True):
        assert mine.ids == theirs.ids and mine.captions == theirs.captions and torch.equal(mine.masks, theirs.masks)
        assert theirs.deferred.pictures is None  # the worker decoded everything and pasted the canvas
        # A batch with a plain JPEG is pasted on the device; one without, in the worker as before.
        pictures = mine.deferred.pictures or [None] * len(mine.ids)
        assert (mine.deferred.sources is None) == (mine.deferred.pictures is not None) and len(pictures) == len(mine.ids)
        for caption, picture in zip(mine.captions, pictures):
            kinds[caption.split()[1]] = isinstance(picture, EncodedJpeg)
        # Through a worker's queue (pickled), then cut: the same floats as the worker-decoded batch's.
        cut, want = pickle.loads(pickle.dumps(mine)).with_float_pixels(), theirs.with_float_pixels()
        assert torch.equal(cut.global_crops, want.global_crops) and torch.equal(cut.local_crops, want.local_crops)
        assert torch.equal(cut.images, want.images)
    assert kinds == {name: plain for name, (_, plain) in PICTURES.items()}


def test_a_trainer_steps_on_pictures_decoded_after_the_transfer(shards, tmp_path):
    import lightning as L

    cfg = {"source": "shards", "path": str(shards), "image_size": 28, "batch_size": 3, "num_workers": 0,
           "shuffle_buffer": 4, "decode_draft": False, "global_crops": {"count": 1},
           "local_crops": {"count": 0}, "crops_on_device": True}
    want = [b.with_float_pixels() for b, _ in zip(PretrainDataModule(cfg, TOKENIZER, seed=3).train_dataloader(),
                                                  range(3))]

    model = BatchRecorder()
    data = PretrainDataModule({**cfg, "decode_on_device": True}, TOKENIZER, seed=3)
    L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
              enable_checkpointing=False, default_root_dir=tmp_path).fit(model, datamodule=data)
    assert data.decode_on_device() and len(model.seen) == 3
    for got, theirs in zip(model.seen, want, strict=True):
        assert got.ids == theirs.ids and got.deferred is None and got.images.dtype == torch.float32
        assert torch.equal(got.images, theirs.images)


def test_the_reader_keeps_only_plain_jpegs_that_would_decode_at_full_size():
    blob = encode(photo(40, 60, 0), "JPEG")
    kept, size = read_image_reduced(blob, None, keep_jpeg=True)
    assert isinstance(kept, EncodedJpeg) and kept.size == size == (60, 40) and kept.data == blob
    assert isinstance(read_image_reduced(blob, lambda w, h: 0.6, keep_jpeg=True)[0], EncodedJpeg)
    shrunk, size = read_image_reduced(blob, lambda w, h: 0.3, keep_jpeg=True)  # DCT scaling wins: decoded here
    assert isinstance(shrunk, Image.Image) and shrunk.size == (30, 20) and size == (60, 40)
    assert isinstance(read_image_reduced(blob, None)[0], Image.Image)  # off unless asked
    (pixels,) = decode_jpegs([kept], "cpu")
    assert torch.equal(pixels.permute(1, 2, 0), torch.from_numpy(np.array(read_image(blob))))


def test_a_picture_that_fails_on_the_device_trains_black_and_is_named(caplog):
    good = encode(photo(40, 60, 0), "JPEG")
    # A Huffman table whose code counts sum past 256: the header parses and the end marker is
    # there (the worker's checks pass), the decoder refuses it (PIL too: "broken data stream").
    at = good.index(b"\xff\xc4")
    data = good[:at + 5] + b"\xff" * 16 + good[at + 21:]
    with Image.open(io.BytesIO(data)) as opened:
        assert plain_jpeg(data, opened)
    broken = EncodedJpeg(data, 60, 40, "sample broken in s-000.tar")
    with caplog.at_level(logging.WARNING):
        first, second = decode_jpegs([EncodedJpeg(good, 60, 40), broken], "cpu")
    assert torch.equal(first.permute(1, 2, 0), torch.from_numpy(np.array(read_image(good))))
    assert second.shape == (3, 40, 60) and int(second.abs().sum()) == 0
    assert "sample broken in s-000.tar" in caplog.text and "black picture" in caplog.text
    with pytest.raises(RuntimeError, match="header says 61x40"):
        decode_jpegs([EncodedJpeg(good, 61, 40, "liar")], "cpu")


def test_decode_on_device_is_checked_and_auto_is_off_without_a_cuda_trainer(shards):
    module, (batch,) = batches(shards, count=1, crops_on_device="auto", decode_on_device="auto")
    assert not module.decode_on_device() and batch.deferred is None  # no trainer: the worker decodes and cuts
    module, got = batches(shards, count=2, crops_on_device="auto", decode_on_device=True)
    assert module.crops_on_device() and got[1].deferred.pictures is not None  # true turns device crops on
    with pytest.raises(TipslabError, match="data.decode_on_device=true needs the views cut on the device"):
        batches(shards, crops_on_device=False, decode_on_device=True)
    with pytest.raises(TipslabError, match="data.decode_on_device='gpu'"):
        batches(shards, decode_on_device="gpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nvJPEG needs a CUDA device")
def test_gpu_decodes_a_batch_close_to_the_cpu(shards):
    _, (_, batch) = batches(shards, count=2, decode_on_device=True)
    assert batch.deferred.pictures is not None  # this batch holds plain JPEGs
    on_cpu = batch.with_float_pixels()
    on_gpu = batch.to("cuda", non_blocking=True).with_float_pixels()
    assert on_gpu.global_crops.is_cuda
    # nvJPEG's IDCT and chroma upsampling may differ from libjpeg-turbo's by a few levels.
    assert float((on_gpu.global_crops.cpu() - on_cpu.global_crops).abs().mean()) < 2 / 255


def test_manifest_jpegs_travel_encoded_too(tmp_path):
    (tmp_path / "a.jpg").write_bytes(encode(photo(40, 60, 0), "JPEG"))
    (tmp_path / "b.png").write_bytes(encode(photo(40, 60, 1), "PNG"))
    (tmp_path / "m.csv").write_text("image_path,short\na.jpg,a picture\nb.png,another picture\n")
    cfg = {"source": "manifest", "path": str(tmp_path / "m.csv"), "image_size": 28, "batch_size": 2,
           "decode_draft": False, "crops_on_device": True}
    (batch,) = [b for b, _ in zip(PretrainDataModule({**cfg, "decode_on_device": True}, TOKENIZER).train_dataloader(),
                                  range(1))]
    (want,) = [b for b, _ in zip(PretrainDataModule(cfg, TOKENIZER).train_dataloader(), range(1))]
    kinds = {caption: type(p).__name__ for caption, p in zip(batch.captions, batch.deferred.pictures)}
    assert kinds == {"a picture": "EncodedJpeg", "another picture": "Tensor"}
    assert "row 0" in next(p for p in batch.deferred.pictures if isinstance(p, EncodedJpeg)).name
    assert torch.equal(batch.with_float_pixels().images, want.with_float_pixels().images)
