"""Training-step speed, MFU and memory: what tipslab's layers cost against a bare PyTorch loop doing
the same math, measured in the same run (issue 8's table).

Default table (contrastive only, ablate_contrastive):
  bare loop                  the encoder's towers, open_clip ClipLoss on both CLS/text pairs, AdamW
                             (fused on CUDA), bf16 autocast on CUDA: no Lightning, no system
  system, plain loop         PretrainingSystem's forward in the same hand-written loop
  Lightning, strategy auto   Trainer.fit on the system
  Lightning, FSDP2           ModelParallelStrategy on one device (the sharding code path)
  FSDP2 + act. ckpt          activation checkpointing on every block
  FSDP2 + selective AC       every 2nd block, only the MLPs, or DINOv3's op policy (keep matmul and
                             attention outputs): the middle grounds between memory and compute
  ... compiled               per-block torch.compile rows (CUDA, or --compile), against the compiled bare loop
Columns: ms/step, images/s, ratio to the bare loop, achieved TFLOP/s and MFU (FLOPs of one step
counted once with torch's FlopCounterMode; peak from platform/throughput.py: a GPU data-sheet
table, on CPU a measured fp32 matmul), peak memory.
`--recipes` prints the older table instead: the recipes (contrastive, whole recipe with head or
full EMA, + activation checkpointing) against the contrastive-only baseline.
Each variant runs in its own process (peak memory is its own), on a real batch of the built-in scenes,
--rounds times in alternating order after an untimed warm-up process; the fastest round is kept.
Run: .venv/bin/python bench/bench_train_step.py [--steps 20 --rounds 2 --batch 32 --size tiny --img 112 --device cpu|cuda]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from tipslab.modules.vision import VISION_SIZES  # noqa: E402
from tipslab.platform.config import load_config  # noqa: E402
from tipslab.platform.ema import ema_update_  # noqa: E402
from tipslab.platform.parallelize import parallelize_system  # noqa: E402
from tipslab.platform.precision import precision_plan  # noqa: E402
from tipslab.platform.system import PretrainingSystem  # noqa: E402

RECIPES = {
    "contrastive only": ("ablate_contrastive", []),
    "contrastive + hard negatives": ("ablate_contrastive", [
        "components.contrastive.hard_negative_weight=1.0",
        "data.hard_negatives.words=[[circle,square,triangle,star,cross,ring,diamond]]"]),
    "contrastive + dense term": ("ablate_contrastive", ["components.contrastive.dense_weight=1.0",
                                                        "components.contrastive.dense_pool=mean"]),
    "full recipe, head EMA": ("ablate_head_ema", []),
    "full recipe, full EMA": ("ablate_full_ema", []),
    "full, head EMA + act. ckpt": ("ablate_head_ema", ["trainer.activation_checkpointing=full"]),
}
FSDP = ["trainer.strategy=fsdp"]
SELECTIVE = ["trainer.activation_checkpointing=full", "trainer.activation_checkpointing_every=2"]
OVERHEAD = {  # name: (loop, overrides); rows with trainer.compile=true compare to the compiled bare loop
    "bare loop": ("bare", []),
    "system, plain loop": ("system", []),
    "Lightning, strategy auto": ("lightning", []),
    "Lightning, FSDP2 (1 device)": ("lightning", FSDP),
    "FSDP2 + act. ckpt": ("lightning", [*FSDP, "trainer.activation_checkpointing=full"]),
    "FSDP2 + AC every 2nd block": ("lightning", [*FSDP, *SELECTIVE]),
    "FSDP2 + AC on MLPs": ("lightning", [*FSDP, "trainer.activation_checkpointing=mlp"]),
    "FSDP2 + AC, keep matmuls": ("lightning", [*FSDP, "trainer.activation_checkpointing=ops"]),
    "bare loop, blocks compiled": ("bare", ["trainer.compile=true"]),
    "FSDP2 + compile": ("lightning", [*FSDP, "trainer.compile=true"]),
    "FSDP2 + compile + act. ckpt": ("lightning", [*FSDP, "trainer.compile=true", "trainer.activation_checkpointing=full"]),
    "FSDP2 + compile + selective AC": ("lightning", [*FSDP, "trainer.compile=true", *SELECTIVE]),
}


def _batch(cfg):
    from tipslab.datamodules.datamodule import PretrainDataModule
    from tipslab.modules.tokenizers import build_tokenizer

    module = PretrainDataModule(cfg.data, build_tokenizer(**cfg.model.tokenizer), seed=0)
    return next(iter(module.train_dataloader()))


def _autocast(device: str):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _clip(cfg, params) -> None:
    """The recipe's gradient clipping (optim.grad_clip), as open_clip's and DINOv2's loops clip:
    Lightning's rows clip (PretrainingSystem.optimizer_step), so the hand-written loops do too."""
    if float(cfg.optim.grad_clip or 0) > 0:
        torch.nn.utils.clip_grad_norm_(list(params), float(cfg.optim.grad_clip))


def time_steps(system, batch, steps: int, device: str) -> float:
    optimizer = torch.optim.AdamW([p for _, p in system.trainable_parameters()], lr=1e-4, fused=device == "cuda")
    for i in range(steps + 2):
        if i == 2:  # two warm-up steps
            _sync(device)
            start = time.perf_counter()
        with _autocast(device):
            loss, _ = system(batch)
        loss.backward()
        _clip(system.cfg, [p for _, p in system.trainable_parameters()])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema_update_(system.momentum_pairs(), 0.99)
    _sync(device)
    return (time.perf_counter() - start) / steps


def time_bare_loop(cfg, batch, steps: int, device: str) -> float:
    """The same contrastive math by hand: towers, ClipLoss on (CLS1, alt) and (CLS2, caption), AdamW."""
    import torch.nn.functional as F
    from open_clip.loss import ClipLoss

    from tipslab.modules.encoder import build_encoder

    encoder = build_encoder(cfg.model).to(device).train()
    if cfg.trainer.compile:
        for block in [*encoder.vision.blocks, *encoder.text.blocks]:
            block.compile()
    clip = ClipLoss()
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=1e-4, fused=device == "cuda")
    texts = torch.cat([batch.alt_ids, batch.caption_ids])
    for i in range(steps + 2):
        if i == 2:
            _sync(device)
            start = time.perf_counter()
        with _autocast(device):
            image = encoder.vision(batch.images)
            alt, caption = encoder.text(texts).chunk(2)
            scale = encoder.logit_scale.exp().clamp(max=100.0).squeeze()
            loss = clip(F.normalize(image.cls1, dim=-1), F.normalize(alt, dim=-1), scale) + \
                clip(F.normalize(image.cls2, dim=-1), F.normalize(caption, dim=-1), scale)
        loss.backward()
        _clip(cfg, encoder.parameters())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    _sync(device)
    return (time.perf_counter() - start) / steps


def time_lightning(cfg, batch, steps: int, device: str) -> float:
    """Trainer.fit over the same batch, timed between batch ends after two warm-up steps."""
    import lightning as L

    from tipslab.platform.train import build_strategy

    ends: list[float] = []

    class StepEnds(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            _sync(device)
            ends.append(time.perf_counter())

    trainer = L.Trainer(max_steps=steps + 2, accelerator="gpu" if device == "cuda" else "cpu", devices=1,
                        strategy=build_strategy(cfg),
                        precision=precision_plan(cfg.trainer.strategy, cfg.trainer.precision).lightning,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[StepEnds()], limit_val_batches=0)
    class SameBatch:  # an iterable of batches (a plain list would be read as a list of loaders)
        def __iter__(self):
            return iter([batch] * (steps + 2))

        def __len__(self):
            return steps + 2

    trainer.fit(PretrainingSystem(cfg), train_dataloaders=SameBatch())
    return (ends[-1] - ends[1]) / steps


def _cfg(exp: str, extra: list[str], args):
    return load_config(exp, [f"model.vision.size={args.size}", f"model.text.size={args.size}",
                             f"model.vision.img_size={args.img}", f"data.batch_size={args.batch}",
                             "data.num_train=" + str(max(args.batch, 64)),
                             # bf16 on CUDA: autocast, or under FSDP2 its policy alone (platform/precision.py)
                             f"trainer.precision={'bf16-mixed' if args.device == 'cuda' else '32-true'}", *extra])


def run_variant(name: str, args) -> None:
    """One variant in this process; prints 'seconds peak_mb' for the parent to read."""
    torch.manual_seed(0)
    if args.recipes:
        exp, extra = RECIPES[name]
        loop = "system"
    else:
        exp, (loop, extra) = "ablate_contrastive", OVERHEAD[name]
    cfg = _cfg(exp, extra, args)
    batch = _batch(cfg)
    if loop == "bare":
        seconds = time_bare_loop(cfg, batch.to(args.device), args.steps, args.device)
    elif loop == "lightning":
        seconds = time_lightning(cfg, batch, args.steps, args.device)
    else:
        system = PretrainingSystem(cfg)
        parallelize_system(system, None, cfg)  # activation checkpointing and compile as configured
        seconds = time_steps(system.to(args.device).train(), batch.to(args.device), args.steps, args.device)
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{seconds} {peak}")


def step_flops(args) -> float:
    """FLOPs of one training step (forward + backward) of the contrastive system, counted once."""
    from tipslab.platform.throughput import count_flops

    cfg = _cfg("ablate_contrastive", [], args)
    system = PretrainingSystem(cfg).to(args.device).train()
    batch = _batch(cfg).to(args.device)

    def step():
        with _autocast(args.device):
            loss, _ = system(batch)
        loss.backward()

    return count_flops(step)[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", default="tiny", choices=list(VISION_SIZES), help="tower size")
    parser.add_argument("--img", type=int, default=112)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="also the compiled rows on CPU (slow to compile)")
    parser.add_argument("--recipes", action="store_true", help="the recipes table instead of the overhead table")
    parser.add_argument("--rounds", type=int, default=2, help="runs of every variant, in alternating order; the fastest is kept")
    parser.add_argument("--only", nargs="+", default=None, metavar="NAME", help="run only these rows (the first is the base)")
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        run_variant(args.variant, args)
        return
    names = list(RECIPES) if args.recipes else [
        n for n in OVERHEAD if args.device == "cuda" or args.compile or "compile" not in n]
    if args.only:
        unknown = [n for n in args.only if n not in names]
        if unknown:
            parser.error(f"--only: unknown rows {unknown}; expected some of {names}")
        names = list(args.only)
    runs: dict[str, list[tuple[float, float]]] = {}  # name: (seconds, peak) of each round
    # On a shared 2-core VM the first child process after the parent's imports ran 10-30% slower than
    # the same variant later (the bare loop, always first, read 1.2x slower than the system in the
    # table and 0.98x when the two alternated by hand). So one untimed warm-up child, then rounds in
    # alternating order (forward, reversed, ...), each row keeping its fastest round.
    order = [names[0]] + [n for r in range(args.rounds) for n in (names if r % 2 == 0 else names[::-1])]
    for i, name in enumerate(order):
        # A process per variant, so each peak is its own.
        out = subprocess.run(
            [sys.executable, __file__, "--variant", name, "--steps", str(args.steps), "--batch", str(args.batch),
             "--size", args.size, "--img", str(args.img), "--device", args.device,
             *(["--recipes"] if args.recipes else [])],
            capture_output=True, text=True,
        )
        if out.returncode:
            last = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"
            print(f"{name}: failed: {last[:300]}")
            continue
        if i == 0:
            continue  # the warm-up
        runs.setdefault(name, []).append(tuple(map(float, out.stdout.split()[-2:])))
    rows = {name: (min(s for s, _ in runs[name]), max(p for _, p in runs[name])) for name in names if name in runs}
    spread = max((max(s for s, _ in r) / min(s for s, _ in r) - 1 for r in runs.values()), default=0)
    memory = "peak GPU MB" if args.device == "cuda" else "peak RSS MB"
    print(f"\ntrain step, {args.size} towers, batch {args.batch}, {args.img}px, {args.device}, "
          f"{torch.get_num_threads()} threads, fastest of {args.rounds} rounds, alternating order "
          f"(largest spread {spread:.0%})")
    if args.recipes:
        base_s, base_peak = rows[names[0]]
        print(f"{'variant':28s} {'ms/step':>9s} {'images/s':>9s} {'vs base':>8s} {memory:>12s} {'vs base':>8s}")
        for name, (seconds, peak) in rows.items():
            print(f"{name:28s} {seconds * 1e3:9.1f} {args.batch / seconds:9.1f} {seconds / base_s:7.2f}x"
                  f" {peak:12.0f} {peak / base_peak:7.2f}x")
        return
    from tipslab.platform.throughput import device_peak_flops

    flops = step_flops(args)
    peak_flops, source = device_peak_flops(torch.device(args.device))
    print(f"one step: {flops / 1e9:.1f} GFLOP (FlopCounterMode); peak {peak_flops / 1e12:.2f} TFLOP/s ({source})")
    print(f"{'variant':30s} {'ms/step':>9s} {'images/s':>9s} {'vs bare':>8s} {'TFLOP/s':>8s} {'MFU':>6s} {memory:>12s}")
    for name, (seconds, peak) in rows.items():
        base = rows.get("bare loop, blocks compiled" if "compile" in name else "bare loop", (seconds, 0))[0]
        achieved = flops / seconds
        print(f"{name:30s} {seconds * 1e3:9.1f} {args.batch / seconds:9.1f} {seconds / base:7.2f}x"
              f" {achieved / 1e12:8.3f} {achieved / peak_flops:6.3f} {peak:12.0f}")


if __name__ == "__main__":
    main()
