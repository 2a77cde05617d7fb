"""Extraction benchmark: images/s of `tipslab index`'s extraction against the bare forward pass.

All in one run, one model (random weights: speed only), one image size:

- bare forward: ``encode_image`` over batches already stacked on the device, nothing copied back
  (fp32 on CPU; bf16 autocast on a GPU) - the model's speed, the ceiling;
- bare forward + results on the host: the same, patches normalised and copied to the host (fp16
  on a GPU), synchronously;
- extraction (in memory): `extract_patches` over preprocessed images held in memory - the
  pipeline's own cost (stacking, prefetch thread, copies, records);
- extraction (scenes source): `extract_patches` over ``scenes:val`` as `tipslab index` reads it,
  images generated on the fly (the data side included).

Ratios are against the bare forward. Nothing here is asserted in tests.

    python bench/bench_extract.py                       # tiny model, 112 px, CPU
    python bench/bench_extract.py --size b --image-size 224 --images 2048 --device cuda
"""

from __future__ import annotations

import argparse
import time

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


def main() -> None:
    from tipslab.modules.encoder import build_encoder
    from tipslab.retrieval.extract import SourceImage, extract_patches, open_source
    from tipslab.retrieval.extract_pipeline import plan_for

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny", help="vision tower size (tiny, s, b, l, ...)")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the device's plan")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = {"vision": {"size": args.size, "img_size": args.image_size, "drop_path_rate": 0.0},
           "text": {"size": "tiny", "vocab_size": 49408, "context_length": 32},
           "tokenizer": {"kind": "bpe", "path": None, "context_length": 32}, "temperature": 0.07}
    torch.manual_seed(0)
    encoder = build_encoder(cfg).to(args.device).eval()
    plan = plan_for(args.device, args.batch_size)
    bs, n = plan.batch_size, args.images
    pixels = torch.rand(n, 3, args.image_size, args.image_size)
    on_device = [pixels[i:i + bs].to(args.device) for i in range(0, n, bs)]
    autocast = dict(device_type=torch.device(args.device).type, dtype=torch.bfloat16, enabled=plan.autocast)

    def bare(copy_back: bool):
        with torch.inference_mode(), torch.autocast(**autocast):
            for batch in on_device:
                out = encoder.encode_image(batch, dense=True)
                if copy_back:
                    torch.nn.functional.normalize(out.patches.float(), dim=-1).to(plan.host_dtype).cpu()

    images = [SourceImage(key=f"k{i}", path=None, size=(args.image_size,) * 2, pixels=pixels[i]) for i in range(n)]

    def extract(source):
        for _ in extract_patches(encoder, source, plan=plan, progress=False):
            pass

    r = args.repeats
    rows = [("bare forward", timed(lambda: bare(False), n, r)),
            ("bare forward + results on host", timed(lambda: bare(True), n, r)),
            ("extraction (in memory)", timed(lambda: extract(iter(images)), n, r)),
            ("extraction (scenes source)",
             timed(lambda: extract(open_source(f"scenes:val:{n}", args.image_size)), n, r))]
    print(f"{args.size} tower, {args.image_size} px, {n} images, batch {bs}, device {args.device} "
          f"({'bf16 autocast' if plan.autocast else 'fp32'}), torch threads {torch.get_num_threads()}")
    print(f"{'path':<34}{'images/s':>10}{'x bare':>8}")
    for name, rate in rows:
        print(f"{name:<34}{rate:>10.1f}{rate / rows[0][1]:>8.2f}")


if __name__ == "__main__":
    main()
