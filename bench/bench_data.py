"""Data-loader benchmark: images/s of the pretraining loader per worker against raw JPEG decoding.

Writes JPEG shards with `tipslab shards` (photo-like pictures at ``--size``; several sizes, comma
separated, are taken in turn, as a real collection mixes them), then, in the same
run, measures:

- ``decode``: the raw rate of PIL opening and fully decoding those JPEG bytes (the baseline);
- ``loader tiny``: `PretrainDataModule` batches in one process (= one worker) with the tiny
  experiment's views (one 112 px global crop, no local crops, no masks);
- ``loader ViT-B``: the ViT-B recipe's views (2 global crops at 224, 8 local crops at 98, block
  masks), DINOv2's multi-crop.

Each loader row runs twice: as a plain loop gets it (``data.decode_draft=false``: every JPEG
decoded at full size; float views), and as a worker inside a Trainer makes it (``draft``: JPEGs
decoded at 1/2..1/8 by DCT scaling when every crop keeps at least its output size, i.e. pictures
larger than the crops need; ``uint8 out``: views leave the worker as uint8 and become float on
the device, not counted here). The ViT-B views run a third time with ``data.crops_on_device``: the
worker ships the decoded pictures and the views' boxes and the device cuts the crops
(`datamodules/device_crops.py`, auto on a CUDA trainer); that row is the worker's part, and the
cutting (roi_align) on this CPU is printed under the table. Each setting runs once more with
``data.decode_on_device``: plain JPEGs leave the worker as bytes and the device decodes them
(nvJPEG on a GPU; `datamodules/encoded_jpeg.py`), pastes and cuts; that row is again the
worker's part, and what the device does is timed on this CPU under the table (the decoder is
torchvision's libjpeg-turbo, whose raw rate is the second baseline row). The loader numbers include reading
the tar, the one image reader, crops, captions and tokenizing. Ratios are against ``decode`` (target: the loader within 80% of decode, ratio >= 0.8).
The CPUs of a shared machine make every number noisy: compare ratios from one run, not runs.
Never asserted in tests.

    python bench/bench_data.py                      # ~30 s: 96 images of 400 x 300
    python bench/bench_data.py --size 800x600
    python bench/bench_data.py --size 800x600,400x300,600x800   # mixed sizes
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

VIEWS = {
    "tiny": {"image_size": 112, "global_crops": {"count": 1}, "local_crops": {"count": 0}},
    "ViT-B": {"image_size": 224, "global_crops": {"count": 2, "scale": [0.32, 1.0]},
              "local_crops": {"count": 8, "size": 98, "scale": [0.05, 0.32]},
              "masking": {"enabled": True, "probability": 0.5, "ratio": [0.1, 0.5]}},
}


def photo(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """A smooth picture with some texture: JPEG sizes and decode costs close to a photo's."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 6.28, size=3)
    channels = [127 + 90 * np.sin(xs / rng.uniform(20, 80) + ys / rng.uniform(20, 80) + p) for p in phase]
    pixels = np.stack(channels, -1) + rng.normal(0, 12, size=(height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_source(folder: Path, count: int, sizes: list[tuple[int, int]]) -> Path:
    from tipslab.platform.cli import main

    images = folder / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        photo(*sizes[i % len(sizes)], rng).save(images / f"{i:05d}.jpg", quality=90)
        (images / f"{i:05d}.json").write_text('{"captions": {"alt": "a photo", "short": "A photo of waves.", '
                                              '"long": "A photo of coloured waves with fine grain all over it."}}')
    out = folder / "shards"
    main(["shards", str(out), "--images", str(images), "--samples-per-shard", "64"])
    return images


def decode_rate(images: Path, repeats: int) -> float:
    blobs = [p.read_bytes() for p in sorted(images.glob("*.jpg"))]
    start = time.perf_counter()
    for _ in range(repeats):
        for blob in blobs:
            with Image.open(io.BytesIO(blob)) as image:
                image.convert("RGB")
    return repeats * len(blobs) / (time.perf_counter() - start)


def torchvision_decode_rate(images: Path, repeats: int) -> float:
    """The same JPEGs through the decoder ``data.decode_on_device`` calls (here on the CPU)."""
    from tipslab.datamodules.encoded_jpeg import EncodedJpeg, decode_jpegs

    encoded = []
    for path in sorted(images.glob("*.jpg")):
        with Image.open(path) as image:
            encoded.append(EncodedJpeg(path.read_bytes(), *image.size))
    decode_jpegs(encoded[:1], "cpu")  # warm-up: the first call imports torchvision's decoder
    start = time.perf_counter()
    for _ in range(repeats):
        for image in encoded:
            decode_jpegs([image], "cpu")
    return repeats * len(encoded) / (time.perf_counter() - start)


def loader_rate(shards: Path, views: dict, batch_size: int, images: int, training_path: bool = True,
                crops_on_device: bool = False, cut: list | None = None, decode_on_device: bool = False,
                device: str = "cpu") -> float:
    """Images/s of the loader's batches in this process; ``cut`` (a list) gets the seconds per
    image of what the device does to deferred views (``crops_on_device``: cutting them;
    ``decode_on_device``: decoding the JPEGs, pasting and cutting) here, outside the measured loop."""
    from tipslab.datamodules.datamodule import PretrainDataModule
    from tipslab.modules.tokenizers import build_tokenizer

    cfg = {"source": "shards", "path": str(shards), "batch_size": batch_size, "num_workers": 0,
           "caption_granularities": ["short", "long"], "decode_draft": training_path,
           "crops_on_device": crops_on_device, "decode_on_device": decode_on_device, **views}
    loader = PretrainDataModule(cfg, build_tokenizer(context_length=64), seed=0).train_dataloader()
    # Inside a Trainer the views leave the worker as uint8 and become float on the device.
    loader.stream.float_pixels = not training_path
    iterator = iter(loader)
    next(iterator)  # warm-up: opening the first shard, first allocations
    # Batches are dropped as they come, as a worker hands each one on: holding them all would grow
    # the process and make every new batch's memory fresh pages (page faults that a worker in
    # steady state does not pay). A few are kept for timing the cut below.
    done, start, batches = 0, time.perf_counter(), []
    while done < images:
        batch = next(iterator)
        done += len(batch.ids)
        if cut is not None and crops_on_device and len(batches) < 4:
            batches.append(batch)
        del batch
    rate = done / (time.perf_counter() - start)
    if batches:
        import torch

        done = sum(len(batch.ids) for batch in batches)
        batches[0].to(device).with_float_pixels()  # warm-up: kernels, the decoder's first call
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        sync()
        start = time.perf_counter()
        for batch in batches:
            batch.to(device, non_blocking=True).with_float_pixels()
        sync()
        cut.append((time.perf_counter() - start) / done)
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=96, help="pictures in the shards (and per measurement)")
    parser.add_argument("--size", default="400x300", help="picture size WxH, or several: WxH,WxH,...")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu", help="where the deferred views' work is timed (cuda: on a GPU)")
    args = parser.parse_args()
    sizes = [tuple(int(v) for v in size.lower().split("x")) for size in args.size.split(",")]
    import torch

    torch.set_num_threads(1)  # one worker is one thread of work
    with tempfile.TemporaryDirectory() as tmp:
        images = write_source(Path(tmp), args.images, sizes)
        rows = [("raw JPEG decode (PIL)", decode_rate(images, repeats=2)),
                ("raw JPEG decode (torchvision, data.decode_on_device's decoder)",
                 torchvision_decode_rate(images, repeats=2))]
        cut: list[tuple[str, float]] = []
        shards = Path(tmp) / "shards"
        for name, views in VIEWS.items():
            for training_path in (False, True):
                label = f"loader {name} ({_describe(views)}){', draft, uint8 out' if training_path else ''}"
                rows.append((label, loader_rate(shards, views, args.batch_size, args.images, training_path)))
            if views["local_crops"]["count"]:
                label = f"loader {name} ({_describe(views)}), draft, crops on the device"
                seconds: list[float] = []
                rows.append((label, loader_rate(shards, views, args.batch_size, args.images, True,
                                                crops_on_device=True, cut=seconds, device=args.device)))
                cut += [(f"{name}: cutting the views (roi_align, float)", s) for s in seconds]
            label = f"loader {name} ({_describe(views)}), draft, JPEGs decoded and cut on the device"
            seconds = []
            rows.append((label, loader_rate(shards, views, args.batch_size, args.images, True, crops_on_device=True,
                                            decode_on_device=True, cut=seconds, device=args.device)))
            cut += [(f"{name}: decoding the JPEGs, pasting and cutting", s) for s in seconds]
    base = rows[0][1]
    print(f"\n{args.images} JPEGs of {args.size}, one process (= one data-loader worker), 1 thread; "
          "shared CPUs: numbers are noisy, compare the ratios")
    print(f"{'measure':82s} {'images/s':>10s} {'/ decode':>9s}")
    for name, rate in rows:
        print(f"{name:82s} {rate:10.1f} {rate / base:9.2f}")
    where = "this CPU, 1 thread (a GPU decodes with nvJPEG: --device cuda)" if args.device == "cpu" else args.device
    print(f"\nWhat the device does instead, timed on {where}, a batch at a time:")
    for what, seconds in cut:
        print(f"  {what}: {1e3 * seconds:.2f} ms per image")


def _describe(views: dict) -> str:
    g = views["global_crops"]["count"]
    loc = views["local_crops"]["count"]
    text = f"{g} x {views['image_size']}"
    if loc:
        text += f" + {loc} x {views['local_crops']['size']}"
    return text + (", masks" if views.get("masking", {}).get("enabled") else "")


if __name__ == "__main__":
    main()
