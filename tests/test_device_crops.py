"""Crops cut on the device (``data.crops_on_device``): the same draws as the worker's crops, the
views cut by roi_align after the transfer, a trainer running on them."""

import lightning as L
import pytest
import torch

from tipslab.datamodules.batch import Batch
from tipslab.datamodules.datamodule import PretrainDataModule
from tipslab.datamodules.device_crops import pack_views, render_views
from tipslab.datamodules.transforms import CropPlan, GlobalCrop
from tipslab.errors import TipslabError
from tipslab.modules.tokenizers import build_tokenizer

TOKENIZER = build_tokenizer(context_length=32)
# Multi-crop with flips and masks on the scenes: 2 global crops of 56, 3 local crops of 28.
MULTI = {"source": "scenes", "num_train": 16, "image_size": 56, "batch_size": 4, "flip": True,
         "global_crops": {"count": 2, "scale": [0.32, 1.0]}, "local_crops": {"count": 3, "size": 28},
         "masking": {"enabled": True, "probability": 1.0}}


def first_batch(**overrides) -> Batch:
    return next(iter(PretrainDataModule({**MULTI, **overrides}, TOKENIZER, seed=3).train_dataloader()))


def test_roi_align_views_are_the_hand_computed_crops():
    pixels = torch.arange(2 * 3 * 4 * 6, dtype=torch.uint8).reshape(2, 3, 4, 6)
    small = pixels[1, :, :2, :4].clone()  # a smaller second picture: padded into the canvas
    plans = [[CropPlan(0, 0, 4, 6, 4, False), CropPlan(0, 2, 4, 4, 2, False), CropPlan(0, 2, 4, 4, 2, True)],
             [CropPlan(0, 0, 2, 4, 4, False), CropPlan(0, 0, 2, 4, 2, False), CropPlan(0, 0, 2, 2, 2, True)]]
    views = pack_views([pixels[0], small], plans, num_global=1)
    assert views.sources.shape == (2, 3, 4, 6) and views.num_local == 2 and views.local_size == 2
    global_crops, local_crops = render_views(views)
    assert global_crops.shape == (1, 2, 3, 4, 4) and local_crops.shape == (2, 2, 3, 2, 2)
    p = pixels.float() / 255
    # A 4 x 4 box to 2 x 2: each output pixel is the mean of its 2 x 2 block (roi_align samples the
    # two pixel centres of a bin on each axis).
    block_means = p[0, :, :, 2:].reshape(3, 2, 2, 2, 2).mean((2, 4))
    assert torch.allclose(local_crops[0, 0], block_means, atol=1e-6)
    assert torch.allclose(local_crops[1, 0], block_means.flip(-1), atol=1e-6)  # the flipped view
    # Sample 1's 2 x 4 picture enlarged to 4 x 4 samples past its bottom edge: it meets that edge
    # repeated (as the CPU resize repeats it), never the padding's other pixels.
    assert float(global_crops[0, 1].min()) >= float(small.float().min() / 255) - 1e-6
    assert torch.allclose(global_crops[0, 1, :, -1], small[:, -1].float() / 255, atol=1e-6)
    # A 2 x 2 box to 2 x 2 is the identity, then mirrored.
    assert torch.allclose(local_crops[1, 1], small[:, :, :2].float().flip(-1) / 255, atol=1e-6)


def test_deferred_views_draw_what_the_worker_crops_draw_and_come_out_close():
    cpu = first_batch(crops_on_device=False)
    deferred = first_batch(crops_on_device=True)
    assert deferred.images is None and deferred.global_crops is None and deferred.deferred is not None
    assert deferred.num_global == 2 and deferred.num_local == 3
    # The same draws: ids, texts (mirrored with their flips), masks.
    assert deferred.ids == cpu.ids and deferred.captions == cpu.captions and deferred.alt_texts == cpu.alt_texts
    assert torch.equal(deferred.masks, cpu.masks) and torch.equal(deferred.alt_ids, cpu.alt_ids)
    assert bool(deferred.deferred.flips.any()) and not bool(deferred.deferred.flips.all())
    cut = deferred.to("cpu").with_float_pixels()
    assert cut.deferred is None and cut.images.data_ptr() == cut.global_crops[0].data_ptr()
    for mine, theirs in ((cut.global_crops, cpu.global_crops), (cut.local_crops, cpu.local_crops)):
        assert mine.shape == theirs.shape and mine.dtype == theirs.dtype == torch.float32
        # Another resampling of the same boxes and flips: close everywhere, nowhere the same picture
        # mirrored or shifted (that would differ by tenths).
        assert float((mine - theirs).abs().mean()) < 0.02
        per_view = (mine - theirs).abs().flatten(2).mean(-1)
        assert float(per_view.max()) < 0.05, per_view


def test_a_trainer_trains_on_views_cut_after_the_transfer():
    from tipslab.platform.config import load_config
    from tipslab.platform.system import PretrainingSystem

    cfg = load_config("tipsv2_tiny", [
        "model.vision.img_size=56", "model.text.context_length=16", "data.batch_size=4", "data.num_train=16",
        "data.global_crops.count=2", "data.local_crops.count=2", "data.local_crops.size=28",
        "data.masking.enabled=true", "data.crops_on_device=true",
        *[f"components.{c}.{k}={v}" for c in ("dino", "ibot")
          for k, v in (("enabled", "true"), ("prototypes", 64), ("hidden_dim", 32), ("bottleneck_dim", 16))]])
    seen = []

    class Watch(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            seen.append((batch.deferred, batch.global_crops.shape, batch.local_crops.shape, batch.images.dtype))

    data = PretrainDataModule(cfg.data, build_tokenizer(**cfg.model.tokenizer), seed=0)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Watch()])
    trainer.fit(PretrainingSystem(cfg), datamodule=data)
    assert data.crops_on_device() and trainer.global_step == 2
    assert seen == [(None, (2, 4, 3, 56, 56), (2, 4, 3, 28, 28), torch.float32)] * 2


def test_deferred_batches_cross_worker_processes_unchanged():
    def views(workers):
        data = PretrainDataModule({**MULTI, "crops_on_device": True, "num_workers": workers}, TOKENIZER, seed=3)
        return [b.with_float_pixels() for _, b in zip(range(3), data.train_dataloader())]

    for mine, theirs in zip(views(2), views(0), strict=True):
        assert mine.ids == theirs.ids
        assert torch.equal(mine.global_crops, theirs.global_crops) and torch.equal(mine.local_crops, theirs.local_crops)


def test_crops_on_device_auto_is_off_without_a_cuda_trainer_and_checked():
    assert not PretrainDataModule(MULTI, TOKENIZER).crops_on_device()
    assert first_batch().deferred is None  # auto, no trainer: the worker cuts
    with pytest.raises(TipslabError, match="data.crops_on_device='gpu'"):
        PretrainDataModule({**MULTI, "crops_on_device": "gpu"}, TOKENIZER)


def test_a_draw_and_its_render_are_the_crop():
    import numpy as np

    image = torch.randint(0, 256, (3, 40, 60), dtype=torch.uint8)
    view = GlobalCrop(28, flip=True)
    for seed in range(6):
        out, flipped, box = view.crop(image, np.random.default_rng(seed))
        plan, drawn = view.draw(image.shape[-2:], np.random.default_rng(seed))
        assert drawn == box and plan.flipped == flipped and plan.size == 28
        assert torch.equal(view.render(image, plan), out)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="auto turns device crops on for a CUDA trainer only")
def test_gpu_auto_cuts_on_the_gpu_what_the_cpu_cuts():
    deferred = first_batch(crops_on_device=True)
    on_cpu = deferred.with_float_pixels()
    on_gpu = deferred.to("cuda", non_blocking=True).with_float_pixels()
    assert on_gpu.global_crops.is_cuda and on_gpu.local_crops.is_cuda
    assert torch.allclose(on_gpu.global_crops.cpu(), on_cpu.global_crops, atol=1e-5)
    assert torch.allclose(on_gpu.local_crops.cpu(), on_cpu.local_crops, atol=1e-5)
    trainer = L.Trainer(accelerator="gpu", devices=1, max_steps=1, logger=False)
    data = PretrainDataModule(MULTI, TOKENIZER)
    data.trainer = trainer
    assert data.crops_on_device()
    one_view = PretrainDataModule({**MULTI, "global_crops": {"count": 1}, "local_crops": {"count": 0}}, TOKENIZER)
    one_view.trainer = trainer
    assert not one_view.crops_on_device()  # one crop a sample: the worker cuts it


def test_a_one_pixel_edge_cuts_what_a_fully_repeated_padding_cuts():
    # pack_views repeats each picture's edge one pixel into the canvas, not across the padding:
    # views touching the right or bottom edge, shrunk and enlarged, must not see the difference.
    from dataclasses import replace

    gen = torch.Generator().manual_seed(0)
    sizes = [(37, 50), (20, 13), (50, 29), (9, 41)]
    sources = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen) for h, w in sizes]
    plans = []
    for h, w in sizes:
        views = [CropPlan(0, 0, h, w, 24, False),             # the whole picture, enlarged or shrunk
                 CropPlan(h // 2, w // 2, h - h // 2, w - w // 2, 40, True),  # bottom right, enlarged
                 CropPlan(h - 3, w - 5, 3, 5, 16, False)]     # a sliver at the corner, much enlarged
        plans.append(views)
    views = pack_views(sources, plans, num_global=1)
    height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
    full = torch.stack([torch.nn.functional.pad(s[None].float(), (0, width - s.shape[-1], 0, height - s.shape[-2]),
                                                mode="replicate")[0] for s in sources])
    assert views.sources.shape == full.shape
    expected = render_views(replace(views, sources=full / 255))
    got = render_views(views)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    # Beyond the one-pixel edge the canvas is zero, not left over memory.
    assert int(views.sources[1, :, :, 14:].sum()) == 0 and int(views.sources[0, :, 38:, :].sum()) == 0
