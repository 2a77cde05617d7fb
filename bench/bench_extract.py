"""Extraction benchmark: images/s of `tipslab index`'s extraction against the bare forward pass.

All in one run, one model (random weights: speed only), one image size:

- bare forward: ``encode_image`` over batches already stacked on the device, nothing copied back
  (fp32 on CPU; bf16 autocast on a GPU) - the model's speed, the ceiling;
- bare forward + results on the host: the same, patches normalised and copied to the host (fp16
  on a GPU), synchronously;
- extraction (in memory): `extract_patches` over preprocessed images held in memory - the
  pipeline's own cost (stacking, prefetch thread, copies, records);
- the same + index vectors written: what `tipslab index` then does with them (`ingest` into float16
  part files under ``--tmp``): where the disk binds;
- extraction (scenes source): `extract_patches` over ``scenes:val`` as `tipslab index` reads it,
  images generated on the fly (the data side included);
- extraction (JPEG folder): `tipslab index DIR`'s path over a folder of JPEGs the bench writes
  first (scenes images, ``--jpeg-size`` px), decoded inline and in ``decode_workers()`` processes,
  at full size and reduced (``tipslab index --decode reduced``: DCT-scaled when twice the input size).

Ratios are against the bare forward. For the extraction rows, ``data wait`` is the share of the
time the loop waited for pixels and ``device wait`` for the GPU's forward and copy back
(`ExtractionStats`): a row far below 1.00 with a large data wait is bound by decoding. Nothing
here is asserted in tests.

    python bench/bench_extract.py                       # tiny model, 112 px, CPU
    python bench/bench_extract.py --size b --image-size 224 --images 2048 --device cuda
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def timed(fn, images: int, repeats: int) -> float:
    """Best images/s of ``repeats`` runs after one warm-up (a shared machine is noisy; best = least disturbed)."""
    best = 0.0
    for attempt in range(repeats + 1):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if attempt:
            best = max(best, images / (time.perf_counter() - t0))
    return best


class NullEncoder(torch.nn.Module):
    """Patches of the right shape and no compute: what the pipeline costs on its own, the ceiling
    it sets for a model of any speed."""

    def __init__(self, shape, grid):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the pipeline a device to read
        self.shape, self.grid = tuple(shape), grid

    def encode_image(self, pixels, dense=True):
        from types import SimpleNamespace

        patches = self.anchor.expand(pixels.shape[0], *self.shape) + pixels.flatten(1)[:, :1, None]
        return SimpleNamespace(patches=patches, grid=self.grid)


def write_jpegs(folder: Path, count: int, side: int) -> None:
    """``count`` scenes images as JPEGs (quality 90) of ``side`` px: what a photo folder holds, decoded for real."""
    from PIL import Image

    from tipslab.datamodules.scenes import ScenesDataset
    from tipslab.retrieval.extract import _scene_pixels

    dataset = ScenesDataset(split="val", num_images=min(count, 256), image_size=side)
    for i in range(count):
        pixels = _scene_pixels(dataset[i % len(dataset)])
        array = pixels.mul(255).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(array).save(folder / f"{i:07d}.jpg", quality=90)


def main() -> None:
    from tipslab.modules.encoder import build_encoder
    from tipslab.retrieval.extract import SourceImage, decode_workers, extract_patches, open_source
    from tipslab.retrieval.extract_pipeline import ExtractionStats, plan_for

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny", help="vision tower size (tiny, s, b, l, ...)")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the device's plan")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--jpeg-size", type=int, default=None, help="side of the folder's JPEGs (default: --image-size)")
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: decode_workers())")
    parser.add_argument("--tmp", default=None, help="folder for the index vectors the bench writes (default: the system's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = {"vision": {"size": args.size, "img_size": args.image_size, "drop_path_rate": 0.0},
           "text": {"size": args.size, "vocab_size": 49408, "context_length": 32},
           "tokenizer": {"kind": "bpe", "path": None, "context_length": 32}, "temperature": 0.07}
    torch.manual_seed(0)
    encoder = build_encoder(cfg).to(args.device).eval()
    plan = plan_for(args.device, args.batch_size)
    bs, n = plan.batch_size, args.images
    # uint8, as a folder source gives them (float on the device, as extraction makes them there)
    pixels = torch.randint(0, 256, (n, 3, args.image_size, args.image_size), dtype=torch.uint8)
    on_device = [pixels[i:i + bs].to(args.device).float().div_(255) for i in range(0, n, bs)]
    autocast = dict(device_type=torch.device(args.device).type, dtype=torch.bfloat16, enabled=plan.autocast)
    with torch.inference_mode():
        probe = encoder.encode_image(on_device[0][:1], dense=True)
    null = NullEncoder(probe.patches.shape[1:], probe.grid)

    def bare(copy_back: bool):
        with torch.inference_mode(), torch.autocast(**autocast):
            for batch in on_device:
                out = encoder.encode_image(batch, dense=True)
                if copy_back:
                    torch.nn.functional.normalize(out.patches.float(), dim=-1).to(plan.host_dtype).cpu()

    # A path set, so writing the index's vectors does not also save the in-memory pictures as PNGs.
    images = [SourceImage(key=f"k{i}", path=f"/in-memory/k{i}.png", size=(args.image_size,) * 2, pixels=pixels[i])
              for i in range(n)]

    last: dict = {}  # the latest extraction's stats and wall time

    def extract(source, model=encoder):
        stats, start = ExtractionStats(), time.perf_counter()
        for _ in extract_patches(model, source, plan=plan, progress=False, stats=stats):
            pass
        last.update(stats=stats, wall=time.perf_counter() - start)

    def extract_and_write(source):
        """What `tipslab index` adds after extraction: the float16 vector parts (`ingest`), on disk."""
        from tipslab.retrieval.build_steps import ingest
        from tipslab.retrieval.vector_store import PartWriter

        with tempfile.TemporaryDirectory(dir=args.tmp) as root:
            stats, start = ExtractionStats(), time.perf_counter()
            records = extract_patches(encoder, source, plan=plan, progress=False, stats=stats)
            ingest(records, Path(root), PartWriter(Path(root) / "vectors", first_part=0), 0, 0, None)
            last.update(stats=stats, wall=time.perf_counter() - start)

    workers = decode_workers() if args.workers is None else args.workers
    folder = Path(tempfile.mkdtemp(prefix="bench_extract_"))
    write_jpegs(folder, n, args.jpeg_size or args.image_size)

    r = args.repeats
    print(f"{args.size} tower, {args.image_size} px, {n} images, batch {bs}, device {args.device} "
          f"({'bf16 autocast' if plan.autocast else 'fp32'}), torch threads {torch.get_num_threads()}")
    print(f"{'path':<40}{'images/s':>10}{'x bare':>8}{'data wait':>11}{'device wait':>13}", flush=True)
    runs = [("bare forward", lambda: bare(False)),
            ("bare forward + results on host", lambda: bare(True)),
            ("pipeline alone (no model, in memory)", lambda: extract(iter(images), null)),
            ("extraction (in memory)", lambda: extract(iter(images))),
            ("  the same + index vectors written", lambda: extract_and_write(iter(images))),
            ("extraction (scenes source)", lambda: extract(open_source(f"scenes:val:{n}", args.image_size))),
            ("extraction (JPEG folder, inline)", lambda: extract(open_source(folder, args.image_size, workers=0))),
            ("  the same, reduced decode", lambda: extract(open_source(folder, args.image_size, workers=0,
                                                                         decode="reduced")))]
    if workers:
        runs.append((f"extraction (JPEG folder, {workers} proc.)",
                     lambda: extract(open_source(folder, args.image_size, workers=workers))))
        runs.append(("  the same, reduced decode",
                     lambda: extract(open_source(folder, args.image_size, workers=workers, decode="reduced"))))
    base = None
    for name, fn in runs:  # each row as it is measured: a slow data path still leaves the rows before it
        last.clear()
        rate = timed(fn, n, r)
        base = base or rate
        waits = ""
        if last:  # shares of the last run's wall time: what bounds the pipeline
            stats, wall = last["stats"], last["wall"]
            waits = f"{stats.data_wait_s / wall:>11.0%}{stats.device_wait_s / wall:>13.0%}"
        print(f"{name:<40}{rate:>10.1f}{rate / base:>8.2f}{waits}", flush=True)
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
