"""Activation checkpointing, compile and FSDP2 sharding, applied in one place and one order.

`parallelize_system` runs for every strategy (from `PretrainingSystem.configure_model`); without
a device mesh (strategy auto: one process or DDP) it stops after step 2.

The order matters (as in DINOv3's `ac_compile_parallelize`):
1. activation checkpointing (`trainer.activation_checkpointing`, every
   `trainer.activation_checkpointing_every`-th block of each trained tower) wraps whole blocks,
   only their MLPs, or whole blocks saving their matmul and attention outputs (DINOv3's selective
   policy), so recomputation happens inside the block that is later compiled and sharded
   (teachers run without gradients: nothing to recompute);
2. compile each block (trained and teacher), so graphs stay small and identical across blocks;
3. `fully_shard` the teachers as inference-only models: the full-EMA tower's blocks (its
   remaining parameters join the root unit) and the frozen distillation tower (its own root: it
   is outside the system's module tree). They reshard after every forward and, not being in the
   optimizer, hold no optimizer state;
4. `fully_shard` each trained block, then the root: the root unit holds what no block owns
   (embeddings, final norms, the temperature, the components' heads, and the last vision block
   when the dense readout is trained: `blocks_read_outside_forward`) and its forward is the
   system's forward;
5. explicit prefetch along each tower's chain of sharded blocks, forward and backward (DINOv3).

Mixed precision: FSDP2's policy (bf16 parameters, fp32 reduce) is the only cast under FSDP2;
Lightning then runs without autocast (platform/precision.py).
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import torch
from torch import nn

from tipslab.errors import TipslabError
from tipslab.platform.precision import precision_plan

# none: keep every activation; full: recompute whole blocks in backward; mlp: recompute only the
# MLPs (their hidden activations are the largest: 4x the width); ops: recompute whole blocks but
# keep what matmuls and attention produced (DINOv3's selective policy: only cheap ops rerun).
ACTIVATION_CHECKPOINTING = ("none", "full", "mlp", "ops")


def transformer_blocks(system) -> list[nn.Module]:
    """The repeated blocks of both trained towers: the units of checkpointing, compile and sharding."""
    blocks = list(system.encoder.vision.blocks)
    blocks.extend(system.encoder.text.blocks)
    return blocks


def blocks_read_outside_forward(system) -> list[nn.Module]:
    """Blocks that must join their tower's root unit instead of their own: the dense readout
    (`VisionTower.forward_dense`) calls the last vision block's layers outside that block's
    forward, where its own FSDP2 unit would hold them sharded. For the trained tower the root is
    the system, whose parameters stay gathered from its forward through its backward, so reading
    them anywhere in between is safe; the frozen distillation tower is its own root (its dense
    methods are registered with FSDP2). The cost is one block's parameters unsharded."""
    needed = getattr(system, "needed", ())
    blocks = [system.encoder.vision.blocks[-1]] if any(k.kind == "dense" and k.role != "distill" for k in needed) else []
    distill = getattr(system, "distill_teacher", None)
    if distill is not None and any(k.kind == "dense" and k.role == "distill" for k in needed):
        blocks.append(distill.blocks[-1])  # the frozen tower's dense readout: it joins that tower's root
    return blocks


def teacher_towers(system) -> list[nn.Module]:
    """Vision towers that only run without gradients: the full-EMA teacher, the frozen one."""
    towers = [getattr(system, "teacher_vision", None), getattr(system, "distill_teacher", None)]
    return [tower for tower in towers if tower is not None]


def _checkpoint_wrapper(mode: str):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    if mode != "ops":
        return checkpoint_wrapper
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    aten = torch.ops.aten
    saved = [aten.mm.default, aten.addmm.default, aten.bmm.default,
             aten._scaled_dot_product_efficient_attention.default,
             aten._scaled_dot_product_flash_attention.default,
             aten._scaled_dot_product_flash_attention_for_cpu.default,
             aten._scaled_dot_product_cudnn_attention.default]
    return partial(checkpoint_wrapper, context_fn=partial(create_selective_checkpoint_contexts, saved))


def apply_activation_checkpointing(system, mode: str, every: int = 1) -> list[nn.Module]:
    """Wrap blocks 0, k, 2k, ... of each trained tower (k = `every`) as `mode` says; returns the
    wrapped modules (blocks, or their MLPs for `mlp`)."""
    if mode not in ACTIVATION_CHECKPOINTING:
        raise TipslabError(f"trainer.activation_checkpointing={mode!r}; expected one of {', '.join(ACTIVATION_CHECKPOINTING)}")
    if mode == "none":
        return []
    wrap = _checkpoint_wrapper(mode)
    wrapped = []
    for container in (system.encoder.vision.blocks, system.encoder.text.blocks):
        for index in range(0, len(container), int(every)):
            if mode == "mlp":
                container[index].mlp = wrap(container[index].mlp)
                wrapped.append(container[index].mlp)
            else:
                container[index] = wrap(container[index])
                wrapped.append(container[index])
    return wrapped


def parallelize_system(system, device_mesh, cfg) -> None:
    """Steps 1-5 of the module docstring on `system`, once (Lightning may call configure_model
    again in the same process); `device_mesh` None: steps 1 and 2 only."""
    if getattr(system, "_parallelized", False):
        return
    system._parallelized = True
    trainer_cfg = cfg.trainer
    # 1. activation checkpointing
    apply_activation_checkpointing(system, str(trainer_cfg.activation_checkpointing),
                                   int(trainer_cfg.activation_checkpointing_every))
    # 2. compile
    if trainer_cfg.compile:
        for block in transformer_blocks(system):
            block.compile()
        for tower in teacher_towers(system):
            for block in tower.blocks:
                block.compile()
    if device_mesh is None:
        return

    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = device_mesh["data_parallel"] if "data_parallel" in (device_mesh.mesh_dim_names or ()) else device_mesh
    # bf16 params, fp32 reduce; Lightning runs without autocast then (platform/precision.py).
    plan = precision_plan("fsdp", trainer_cfg.precision)
    policy = MixedPrecisionPolicy(param_dtype=plan.param_dtype, reduce_dtype=plan.reduce_dtype)
    # 3. inference-only teachers
    distill = getattr(system, "distill_teacher", None)
    if distill is not None:
        distill.to(system.device if system.device.type != "meta" else "cpu")
    unsharded = blocks_read_outside_forward(system)
    for tower in teacher_towers(system):
        for block in tower.blocks:
            if block not in unsharded:
                fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    if distill is not None:
        fully_shard(distill, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
        if distill.blocks[-1] in unsharded:
            # `components.distill.patch_kind=dense` reads the frozen tower through `forward_dense` or
            # `forward_with_dense`, not its `forward`: registered, they gather the tower's root unit
            # (which holds the last block, read outside that block's forward) as `forward` would.
            from torch.distributed.fsdp import register_fsdp_forward_method

            for method in ("forward_dense", "forward_with_dense"):
                register_fsdp_forward_method(distill, method)
    # 4. trained blocks, then the root (which also takes the blocks left out of sharding)
    for block in transformer_blocks(system):
        if block not in unsharded:
            fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(system, mesh=mesh, mp_policy=policy)
    # 5. prefetch along each tower, as DINOv3 sets it
    for blocks in block_chains(system):
        chain_prefetch([block for block in blocks if block not in unsharded])


def block_chains(system) -> list[list[nn.Module]]:
    """The sharded blocks of each tower in the order they run: trained vision, text, EMA teacher
    (the frozen distillation tower is one unit: nothing to chain)."""
    chains = [list(system.encoder.vision.blocks), list(system.encoder.text.blocks)]
    teacher = getattr(system, "teacher_vision", None)
    if teacher is not None:
        chains.append(list(teacher.blocks))
    return chains


def chain_prefetch(blocks: list[nn.Module]) -> None:
    """Block i all-gathers block i+1's parameters when its forward starts, and block i+1 block
    i's when its backward starts (DINOv3's `fsdp_transformer`): the next all-gather overlaps
    the current block's compute in both directions, instead of FSDP2's default (backward only,
    found by tracing the forward order)."""
    for current, following in zip(blocks, blocks[1:]):
        current.set_modules_to_forward_prefetch([following])
        following.set_modules_to_backward_prefetch([current])


def fsdp2_strategy(world: int):
    """Lightning's ModelParallelStrategy as pure FSDP2 (every device one data-parallel shard) that
    also skips the gradient reduce-scatter on non-final micro-batches of gradient accumulation:
    Lightning's `block_backward_sync` only knows DDP's `no_sync`."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    class FSDP2Strategy(ModelParallelStrategy):
        @contextmanager
        def block_backward_sync(self):
            from torch.distributed.fsdp import FSDPModule

            model = self.model
            if not isinstance(model, FSDPModule):
                yield None
                return
            model.set_requires_gradient_sync(False)  # recurses into every sharded block
            try:
                yield None
            finally:
                model.set_requires_gradient_sync(True)

    return FSDP2Strategy(data_parallel_size=world, tensor_parallel_size=1)
