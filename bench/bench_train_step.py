"""Training-step speed of the pretraining system on this machine, against a baseline in the same run.

Prints a table: ms per step, images/s and peak RSS growth for
  baseline        the text tower run twice (alt-text, then the sampled caption)
  fused text      one text pass over both caption slots (what PretrainingSystem does)
  + act. ckpt     activation checkpointing on every block (memory for compute)
Run: .venv/bin/python bench/bench_train_step.py [--steps 10 --batch 32 --size tiny --img 112]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from tipslab.datamodules.batch import Batch  # noqa: E402
from tipslab.modules.features import Features  # noqa: E402
from tipslab.platform.config import load_config  # noqa: E402
from tipslab.platform.system import PretrainingSystem  # noqa: E402


class TwoPassText(PretrainingSystem):
    """The baseline: encode alt-text and caption in separate passes."""

    def compute_features(self, batch):
        vision = self.encoder.encode_image(batch.images)
        return Features(
            logit_scale=self.encoder.logit_scale, cls1=vision.cls1, cls2=vision.cls2, patches=vision.patches,
            text_alt=self.encoder.encode_text(batch.alt_ids), text_caption=self.encoder.encode_text(batch.caption_ids),
        )


def _with_checkpointing(system):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        checkpoint_wrapper,
    )

    from tipslab.platform.parallelize import _replace_block, transformer_blocks

    for block in transformer_blocks(system):
        _replace_block(system, block, checkpoint_wrapper(block))
    return system


VARIANTS = {
    "baseline (two text passes)": lambda cfg: TwoPassText(cfg),
    "fused text pass": lambda cfg: PretrainingSystem(cfg),
    "fused + activation ckpt": lambda cfg: _with_checkpointing(PretrainingSystem(cfg)),
}


def time_steps(system, batch, steps: int) -> float:
    optimizer = torch.optim.AdamW(system.parameters(), lr=1e-4)
    for i in range(steps + 2):
        if i == 2:  # two warm-up steps
            start = time.perf_counter()
        loss, _ = system(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / steps


def run_variant(name: str, args) -> None:
    """One variant in this process; prints 'seconds peak_rss_mb' for the parent to read."""
    torch.manual_seed(0)
    cfg = load_config(
        "tipsv2_tiny",
        [f"model.vision.size={args.size}", f"model.text.size={args.size}", f"model.vision.img_size={args.img}"],
    )
    length = int(cfg.model.text.context_length)
    batch = Batch(
        images=torch.rand(args.batch, 3, args.img, args.img),
        alt_ids=torch.randint(1, 1000, (args.batch, length)),
        caption_ids=torch.randint(1, 1000, (args.batch, length)),
        ids=[str(i) for i in range(args.batch)],
    )
    system = VARIANTS[name](cfg).train()
    seconds = time_steps(system, batch, args.steps)
    print(f"{seconds} {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--img", type=int, default=112)
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        run_variant(args.variant, args)
        return
    rows = []
    for name in VARIANTS:
        # A process per variant, so each peak RSS is its own.
        out = subprocess.run(
            [sys.executable, __file__, "--variant", name, "--steps", str(args.steps), "--batch", str(args.batch),
             "--size", args.size, "--img", str(args.img)],
            capture_output=True, text=True, check=True,
        )
        seconds, rss = map(float, out.stdout.split()[-2:])
        rows.append((name, seconds, rss))
    base_s, base_rss = rows[0][1], rows[0][2]
    print(f"\ntrain step, {args.size} towers, batch {args.batch}, {args.img}px, {torch.get_num_threads()} threads")
    print(f"{'variant':30s} {'ms/step':>9s} {'images/s':>9s} {'speed':>7s} {'peak RSS MB':>12s} {'RSS':>6s}")
    for name, seconds, rss in rows:
        print(f"{name:30s} {seconds * 1e3:9.1f} {args.batch / seconds:9.1f} {base_s / seconds:6.2f}x"
              f" {rss:12.0f} {rss / base_rss:5.2f}x")


if __name__ == "__main__":
    main()
