"""platform/parallelize.py on one CPU process: which modules selective activation checkpointing
wraps, that checkpointing changes neither the loss nor the gradients, and that a bad choice is a
one-line config error."""

import copy

import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

from tipslab.datamodules.batch import Batch
from tipslab.errors import TipslabError
from tipslab.platform.config import load_config
from tipslab.platform.parallelize import parallelize_system
from tipslab.platform.system import PretrainingSystem

# Recomputation replays the same float32 ops on the same inputs (the RNG state of drop path is
# restored), so only the order in which autograd sums a few gradients may differ.
GRAD_ATOL = 1e-6


def _cfg(*overrides):
    return load_config("ablate_contrastive", ["model.vision.img_size=56", "model.text.context_length=8",
                                              "model.vision.drop_path_rate=0.1", *overrides])


def _batch(n=4, size=56, length=8):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 500, (2, n, length), generator=g)
    ids[:, :2, 5:] = 0  # padded texts next to full ones
    return Batch(images=torch.rand(n, 3, size, size, generator=g), alt_ids=ids[0], caption_ids=ids[1],
                 ids=[str(i) for i in range(n)])


def _wrapped(system) -> dict[str, set[int]]:
    """Per tower and part, the indices of the blocks that are checkpoint-wrapped."""
    out = {}
    for tower in ("vision", "text"):
        blocks = getattr(system.encoder, tower).blocks
        out[f"{tower} block"] = {i for i, b in enumerate(blocks) if isinstance(b, CheckpointWrapper)}
        out[f"{tower} mlp"] = {i for i, b in enumerate(blocks) if isinstance(getattr(b, "mlp", None), CheckpointWrapper)}
    return out


@pytest.mark.parametrize("mode, every, blocks, mlps", [
    ("none", 1, (set(), set()), (set(), set())),
    ("full", 1, ({0, 1, 2, 3}, {0, 1}), (set(), set())),
    ("full", 2, ({0, 2}, {0}), (set(), set())),
    ("ops", 3, ({0, 3}, {0}), (set(), set())),
    ("mlp", 1, (set(), set()), ({0, 1, 2, 3}, {0, 1})),
    ("mlp", 2, (set(), set()), ({0, 2}, {0})),
])
def test_selective_checkpointing_wraps_the_chosen_blocks_and_only_those(mode, every, blocks, mlps):
    system = PretrainingSystem(_cfg(f"trainer.activation_checkpointing={mode}",
                                    f"trainer.activation_checkpointing_every={every}"))
    assert len(system.encoder.vision.blocks) == 4 and len(system.encoder.text.blocks) == 2  # tiny
    parallelize_system(system, None, system.cfg)
    parallelize_system(system, None, system.cfg)  # configure_model may run twice: no double wrapping
    assert _wrapped(system) == {"vision block": blocks[0], "text block": blocks[1],
                                "vision mlp": mlps[0], "text mlp": mlps[1]}
    assert not any(isinstance(m._checkpoint_wrapped_module, CheckpointWrapper)
                   for m in system.modules() if isinstance(m, CheckpointWrapper))


def _loss_and_grads(system, batch):
    torch.manual_seed(1)  # drop path draws
    loss, _ = system(batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in system.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode, every", [("full", 1), ("full", 2), ("mlp", 1), ("ops", 2)])
def test_checkpointed_model_has_the_losses_and_gradients_of_the_plain_one(mode, every):
    torch.manual_seed(0)
    plain = PretrainingSystem(_cfg(f"trainer.activation_checkpointing={mode}",
                                   f"trainer.activation_checkpointing_every={every}")).train()
    checkpointed = copy.deepcopy(plain)
    parallelize_system(checkpointed, None, checkpointed.cfg)
    assert any(isinstance(m, CheckpointWrapper) for m in checkpointed.modules())
    # The state dict keys do not change: checkpoints load either way.
    assert checkpointed.state_dict().keys() == plain.state_dict().keys()
    batch = _batch()
    want_loss, want = _loss_and_grads(plain, batch)
    got_loss, got = _loss_and_grads(checkpointed, batch)
    torch.testing.assert_close(got_loss, want_loss, rtol=0, atol=GRAD_ATOL)
    renamed = {n.replace("._checkpoint_wrapped_module", ""): g for n, g in got.items()}
    assert renamed.keys() == want.keys() and len(want) > 20
    for name, grad in want.items():
        torch.testing.assert_close(renamed[name], grad, rtol=1e-5, atol=GRAD_ATOL, msg=name)


@pytest.mark.parametrize("override, expected", [
    ("trainer.activation_checkpointing=sometimes", "must be one of none, full, mlp, ops, got 'sometimes'"),
    ("trainer.activation_checkpointing=true", "must be one of none, full, mlp, ops, got True"),
    ("trainer.activation_checkpointing_every=0", "must be >= 1"),
])
def test_bad_activation_checkpointing_is_a_one_line_config_error(override, expected):
    with pytest.raises(TipslabError) as err:
        _cfg(override)
    message = str(err.value)
    assert expected in message and "trainer.activation_checkpointing" in message and "\n" not in message


@pytest.fixture
def one_process_mesh(tmp_path):
    """A real 1-process gloo group and its device mesh: fully_shard runs as it does under Lightning."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,), mesh_dim_names=("data_parallel",))
    finally:
        dist.destroy_process_group()


def test_fsdp2_casts_to_bf16_alone_and_prefetches_along_each_tower(one_process_mesh):
    from torch.distributed.fsdp import FSDPModule

    system = PretrainingSystem(_cfg("trainer.strategy=fsdp", "trainer.precision=bf16-mixed",
                                    "trainer.activation_checkpointing=full", "trainer.activation_checkpointing_every=2"))
    parallelize_system(system, one_process_mesh, system.cfg)
    for tower in ("vision", "text"):
        blocks = list(getattr(system.encoder, tower).blocks)
        states = [b._get_fsdp_state() for b in blocks]
        assert all(isinstance(b, FSDPModule) for b in blocks)
        for state in [*states, system._get_fsdp_state()]:
            assert (state._mp_policy.param_dtype, state._mp_policy.reduce_dtype) == (torch.bfloat16, torch.float32)
        # DINOv3's chain: forward to the next block, backward to the previous one, per tower.
        for i, state in enumerate(states):
            assert getattr(state, "_states_to_forward_prefetch", []) == states[i + 1:i + 2]
            assert getattr(state, "_states_to_backward_prefetch", []) == states[max(i - 1, 0):i]

    # The step as Lightning runs it under FSDP2 (precision 32-true: no autocast): the blocks compute
    # in bf16 from FSDP2's cast alone, the loss in fp32, the gradients land in fp32 shards.
    seen = []
    system.encoder.text.blocks[1].register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    system.encoder.vision.blocks[3].register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    assert not torch.is_autocast_enabled("cpu")
    loss, _ = system.train()(_batch())
    assert seen == [torch.bfloat16, torch.bfloat16] and loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in system.encoder.parameters() if p.grad is not None]
    assert len(grads) > 20 and all(type(g).__name__ == "DTensor" and g.dtype == torch.float32 for g in grads)
