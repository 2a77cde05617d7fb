"""Activation checkpointing, compile and FSDP2 sharding, applied in one place and one order.

The order matters (as in DINOv3's `ac_compile_parallelize`):
1. activation checkpointing wraps each *trained* transformer block, so recomputation happens
   inside the block that is later compiled and sharded (teachers run without gradients: nothing
   to recompute);
2. compile each block (trained and teacher), so graphs stay small and identical across blocks;
3. `fully_shard` the teachers as inference-only models: the full-EMA tower's blocks (its
   remaining parameters join the root unit) and the frozen distillation tower (its own root: it
   is outside the system's module tree). They reshard after every forward and, not being in the
   optimizer, hold no optimizer state;
4. `fully_shard` each trained block, then the root: the root unit holds what no block owns
   (embeddings, final norms, the temperature, the components' heads) and its forward is the
   system's forward.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


def transformer_blocks(system) -> list[nn.Module]:
    """The repeated blocks of both trained towers: the units of checkpointing, compile and sharding."""
    blocks = list(system.encoder.vision.blocks)
    blocks.extend(system.encoder.text.blocks)
    return blocks


def teacher_towers(system) -> list[nn.Module]:
    """Vision towers that only run without gradients: the full-EMA teacher, the frozen one."""
    towers = [getattr(system, "teacher_vision", None), getattr(system, "distill_teacher", None)]
    return [tower for tower in towers if tower is not None]


def _replace_block(system, old: nn.Module, new: nn.Module) -> None:
    for container in (system.encoder.vision.blocks, system.encoder.text.blocks):
        for index, block in enumerate(container):
            if block is old:
                container[index] = new
                return


def parallelize_system(system, device_mesh, cfg) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    trainer_cfg = cfg.trainer
    # 1. activation checkpointing
    if trainer_cfg.activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
            checkpoint_wrapper,
        )

        for block in transformer_blocks(system):
            _replace_block(system, block, checkpoint_wrapper(block))
    # 2. compile
    if trainer_cfg.compile:
        for block in transformer_blocks(system):
            block.compile()
        for tower in teacher_towers(system):
            for block in tower.blocks:
                block.compile()

    mesh = device_mesh["data_parallel"] if "data_parallel" in (device_mesh.mesh_dim_names or ()) else device_mesh
    precision = str(trainer_cfg.precision)
    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if precision.startswith("bf16") else None,
        reduce_dtype=torch.float32,
    )
    # 3. inference-only teachers
    distill = getattr(system, "distill_teacher", None)
    if distill is not None:
        distill.to(system.device if system.device.type != "meta" else "cpu")
    for tower in teacher_towers(system):
        for block in tower.blocks:
            fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    if distill is not None:
        fully_shard(distill, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    # 4. trained blocks, then the root
    for block in transformer_blocks(system):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(system, mesh=mesh, mp_policy=policy)


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
