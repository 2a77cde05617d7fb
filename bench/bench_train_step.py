"""Training-step speed and memory of the recipes, against the contrastive-only baseline in the same run.

Prints a table: ms per step, images/s (source images, not crops) and peak memory for
  contrastive only      TIPS's contrastive loss alone (experiments/ablate_contrastive.yaml)
  full recipe, head EMA contrastive + DINO + iBOT++ + KoLeo, multi-crop and masks, head-only EMA
  full recipe, full EMA the same with a second, EMA backbone as teacher (TIPS v1 / DINOv2)
  + act. ckpt           the head-EMA recipe with activation checkpointing on every block
Each variant runs in its own process (peak memory is its own), on real batches of the
experiment's data settings (multi-crop, masks) from the built-in scenes.
Run: .venv/bin/python bench/bench_train_step.py [--steps 5 --batch 32 --size tiny --img 112 --device cpu]
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

from tipslab.platform.config import load_config  # noqa: E402
from tipslab.platform.ema import ema_update_  # noqa: E402
from tipslab.platform.system import PretrainingSystem  # noqa: E402

VARIANTS = {
    "contrastive only": ("ablate_contrastive", []),
    "full recipe, head EMA": ("ablate_head_ema", []),
    "full recipe, full EMA": ("ablate_full_ema", []),
    "full, head EMA + act. ckpt": ("ablate_head_ema", ["trainer.activation_checkpointing=true"]),
}


def _with_checkpointing(system):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    from tipslab.platform.parallelize import _replace_block, transformer_blocks

    for block in transformer_blocks(system):
        _replace_block(system, block, checkpoint_wrapper(block))
    return system


def _batch(cfg):
    from tipslab.datamodules.datamodule import PretrainDataModule
    from tipslab.modules.tokenizers import build_tokenizer

    module = PretrainDataModule(cfg.data, build_tokenizer(**cfg.model.tokenizer), seed=0)
    return next(iter(module.train_dataloader()))


def time_steps(system, batch, steps: int, device: str) -> float:
    optimizer = torch.optim.AdamW([p for _, p in system.trainable_parameters()], lr=1e-4)
    for i in range(steps + 2):
        if i == 2:  # two warm-up steps
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        loss, _ = system(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema_update_(system.momentum_pairs(), 0.99)
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def run_variant(name: str, args) -> None:
    """One variant in this process; prints 'seconds peak_mb trained_params' for the parent to read."""
    torch.manual_seed(0)
    exp, extra = VARIANTS[name]
    cfg = load_config(exp, [f"model.vision.size={args.size}", f"model.text.size={args.size}",
                            f"model.vision.img_size={args.img}", f"data.batch_size={args.batch}",
                            "data.num_train=" + str(max(args.batch, 64)), *extra])
    system = PretrainingSystem(cfg)
    if cfg.trainer.activation_checkpointing:
        system = _with_checkpointing(system)
    system = system.to(args.device).train()
    batch = _batch(cfg).to(args.device)
    seconds = time_steps(system, batch, args.steps, args.device)
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{seconds} {peak} {system.parameter_counts()['params/trained']}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--img", type=int, default=112)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        run_variant(args.variant, args)
        return
    rows = []
    for name in VARIANTS:
        # A process per variant, so each peak is its own.
        out = subprocess.run(
            [sys.executable, __file__, "--variant", name, "--steps", str(args.steps), "--batch", str(args.batch),
             "--size", args.size, "--img", str(args.img), "--device", args.device],
            capture_output=True, text=True, check=True,
        )
        seconds, peak, trained = map(float, out.stdout.split()[-3:])
        rows.append((name, seconds, peak, trained))
    base_s, base_peak = rows[0][1], rows[0][2]
    memory = "peak GPU MB" if args.device == "cuda" else "peak RSS MB"
    print(f"\ntrain step, {args.size} towers, batch {args.batch}, {args.img}px, {args.device}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'variant':28s} {'ms/step':>9s} {'images/s':>9s} {'vs base':>8s} {memory:>12s} {'vs base':>8s} "
          f"{'trained params':>15s}")
    for name, seconds, peak, trained in rows:
        print(f"{name:28s} {seconds * 1e3:9.1f} {args.batch / seconds:9.1f} {seconds / base_s:7.2f}x"
              f" {peak:12.0f} {peak / base_peak:7.2f}x {trained:15,.0f}")


if __name__ == "__main__":
    main()
