"""Reduced JPEG decoding (``data.decode_draft``): smaller decodes, same crop boxes and captions, no upsampling."""

import io

import numpy as np
import pytest
import torch
from batch_recorder import BatchRecorder
from PIL import Image

from tipslab.datamodules.batch import collate
from tipslab.datamodules.datamodule import PretrainDataModule
from tipslab.datamodules.image_io import read_image_reduced
from tipslab.datamodules.scenes import ScenesDataset
from tipslab.datamodules.shards import write_scene_shards
from tipslab.datamodules.transforms import GlobalCrop, MultiCropViews, crop_params
from tipslab.modules.tokenizers import build_tokenizer

TOKENIZER = build_tokenizer(context_length=32)


def jpeg(width, height, orientation=None) -> bytes:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90, exif=exif.tobytes())
    return out.getvalue()


@pytest.mark.parametrize("orientation, full", [(None, (400, 300)), (6, (300, 400))])
def test_jpeg_decodes_smaller_and_reports_its_full_upright_size(orientation, full):
    blob = jpeg(400, 300, orientation)
    seen = []
    image, size = read_image_reduced(blob, lambda w, h: seen.append((w, h)) or 0.3)
    assert seen == [full] and size == full
    assert image.size == (full[0] // 2, full[1] // 2)  # 1/2: the largest DCT scale still >= 0.3
    image, size = read_image_reduced(blob, lambda w, h: 0.7)  # more than half is needed: full decode
    assert image.size == full and size == full


def test_png_and_no_scale_decode_at_full_size():
    out = io.BytesIO()
    Image.new("RGB", (400, 300), (9, 9, 9)).save(out, "PNG")
    assert read_image_reduced(out.getvalue(), lambda w, h: 0.1)[0].size == (400, 300)
    assert read_image_reduced(jpeg(400, 300), None)[0].size == (400, 300)


def test_min_decode_scale_keeps_every_crop_at_least_its_output_size():
    views = MultiCropViews(112, count=2, local_count=4, local_size=42, local_scale=(0.05, 0.32))
    rng = np.random.default_rng(0)
    for height, width in [(600, 800), (300, 1200), (1000, 1000)]:
        factor = views.min_decode_scale(height, width)
        for crop, count in [(views.first, 400), (views.local, 400)]:
            for _ in range(count):
                _, _, h, w = crop_params(height, width, rng, crop.scale, crop.ratio)
                assert min(h, w) * factor >= crop.image_size - 1e-6
    assert views.min_decode_scale(600, 800, [(0.9, 1.0)]) == views.min_decode_scale(600, 800)  # a larger range
    assert views.min_decode_scale(600, 800, [(0.01, 0.02)]) > views.min_decode_scale(600, 800)


def test_crop_of_a_smaller_decode_draws_the_same_box():
    full = torch.from_numpy(np.random.default_rng(1).integers(0, 255, (3, 200, 240), dtype=np.uint8))
    half = full[:, ::2, ::2].contiguous()
    crop = GlobalCrop(28)
    a, _, box_a = crop.crop(full, np.random.default_rng(5), to_float=False)
    b, _, box_b = crop.crop(half, np.random.default_rng(5), to_float=False, source_size=(240, 200))
    assert box_a == box_b and a.dtype == b.dtype == torch.uint8 and a.shape == b.shape


def scene_batches(folder, draft: bool):
    cfg = {"source": "shards", "path": str(folder), "image_size": 28, "batch_size": 4, "num_workers": 0,
           "shuffle_buffer": 4, "decode_draft": draft, "global_crops": {"count": 2},
           "local_crops": {"count": 2, "size": 14}}
    module = PretrainDataModule(cfg, TOKENIZER, seed=3)
    loader = module.train_dataloader()
    return module, [batch for batch, _ in zip(loader, range(2))]


def test_draft_changes_pixels_only_a_little_and_never_the_captions(tmp_path):
    # 224 px scenes, 28 px crops: every crop keeps its size at half the decode.
    write_scene_shards(ScenesDataset("train", 8, 224, seed=0), tmp_path, samples_per_shard=4, image_format="jpg")
    module, drafted = scene_batches(tmp_path, True)
    sample = next(iter(module.train_source().samples(0, 1, 0)))
    assert sample["image"].size == (112, 112) and sample["source_size"] == (224, 224)
    _, full = scene_batches(tmp_path, False)
    for a, b in zip(drafted, full):
        assert a.ids == b.ids and a.captions == b.captions and a.alt_texts == b.alt_texts
        assert a.images.dtype == torch.float32 and a.local_crops.shape == b.local_crops.shape
        assert (a.global_crops - b.global_crops).abs().mean() < 0.03
        assert not torch.equal(a.global_crops, b.global_crops)  # the reduced decode was used


def test_collate_turns_uint8_views_into_the_same_floats_as_per_crop():
    views = [torch.randint(0, 256, (3, 14, 14), dtype=torch.uint8) for _ in range(4)]
    items = [{"image": v, "globals": [v, v.flip(-1)], "locals": [], "alt": "a", "caption": "c",
              "granularity": "short", "id": str(i)} for i, v in enumerate(views)]
    batch = collate(items, TOKENIZER)
    assert batch.global_crops.shape == (2, 4, 3, 14, 14) and batch.global_crops.dtype == torch.float32
    assert torch.equal(batch.global_crops[1, 2], views[2].flip(-1).float() / 255)
    assert batch.images.data_ptr() == batch.global_crops[0].data_ptr()


@pytest.mark.parametrize("precision, dtype", [("32-true", torch.float32), ("64-true", torch.float64)])
def test_a_trainer_gets_uint8_from_the_loader_and_the_same_floats_on_the_device(tmp_path, precision, dtype):
    import lightning as L

    write_scene_shards(ScenesDataset("train", 8, 56, seed=0), tmp_path, samples_per_shard=4, image_format="jpg")
    cfg = {"source": "shards", "path": str(tmp_path), "image_size": 28, "batch_size": 4, "num_workers": 0,
           "shuffle_buffer": 4, "global_crops": {"count": 2}, "local_crops": {"count": 2, "size": 14}}
    plain = [b for b, _ in zip(PretrainDataModule(cfg, TOKENIZER, seed=3).train_dataloader(), range(2))]
    assert plain[0].global_crops.dtype == torch.float32

    left_the_loader = []

    class Watched(PretrainDataModule):
        def on_before_batch_transfer(self, batch, dataloader_idx):
            left_the_loader.append(batch.global_crops.dtype)
            return super().on_before_batch_transfer(batch, dataloader_idx)

    model = BatchRecorder()
    L.Trainer(max_steps=2, accelerator="cpu", precision=precision, logger=False, enable_progress_bar=False, enable_model_summary=False,
              enable_checkpointing=False, default_root_dir=tmp_path).fit(
        model, datamodule=Watched(cfg, TOKENIZER, seed=3))
    assert left_the_loader == [torch.uint8, torch.uint8]
    for got, want in zip(model.seen, plain, strict=True):
        assert got.ids == want.ids and got.global_crops.dtype == got.local_crops.dtype == dtype
        assert torch.equal(got.global_crops, want.global_crops.to(dtype))
        assert torch.equal(got.local_crops, want.local_crops.to(dtype)) and torch.equal(got.images, got.global_crops[0])


def test_manifest_jpegs_decode_smaller_too(tmp_path):
    (tmp_path / "big.jpg").write_bytes(jpeg(448, 336))
    (tmp_path / "m.csv").write_text("image_path,short\nbig.jpg,a picture\nbig.jpg,the same picture\n")
    cfg = {"source": "manifest", "path": str(tmp_path / "m.csv"), "image_size": 28, "batch_size": 2}
    sample = PretrainDataModule(cfg, TOKENIZER).train_source()[0]
    assert sample["source_size"] == (448, 336) and sample["image"].size[0] < 448
    full = PretrainDataModule({**cfg, "decode_draft": False}, TOKENIZER).train_source()[0]
    assert full["image"].size == (448, 336) and "source_size" not in full
