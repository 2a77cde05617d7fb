"""The TIPS text tower against a reference written here from the published architecture."""

import math

import pytest
import torch

from tipslab.errors import TipslabError
from tipslab.modules.text import TEXT_SIZES, TextTower, sinusoidal_positions


def reference_text_embedding(state: dict, ids: torch.Tensor, heads: int) -> torch.Tensor:
    """The official TextEncoder's computation in plain torch ops, from its state dict.

    Sequence-first like the official code, attention mask of -inf on padded keys, ReLU MLP masked
    twice, LayerNorm eps 1e-5, pooled with torch.where + eps 1e-8 as GlobalAvgPooling.
    """
    b, length = ids.shape
    d = state["token_embedding.weight"].shape[1]
    paddings = (ids == 0).float()
    keep = 1.0 - paddings
    x = state["token_embedding.weight"][ids] * d**0.5
    half = d // 2
    inv = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / max(half - 1, 1)))
    t = torch.arange(length, dtype=torch.float32)[:, None] * inv[None]
    x = x + torch.cat([t.sin(), t.cos()], dim=1)[None]
    x = x.permute(1, 0, 2)  # L, B, D
    n_layers = len({k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")})
    hd = d // heads
    for i in range(n_layers):
        p = lambda name: state[f"transformer.resblocks.{i}.{name}"]  # noqa: E731
        h = torch.nn.functional.layer_norm(x, (d,), p("ln_1.weight"), p("ln_1.bias"), 1e-5)
        qkv = h @ p("attn.in_proj_weight").T + p("attn.in_proj_bias")
        q, k, v = qkv.split(d, dim=-1)
        q = q.reshape(length, b, heads, hd).permute(1, 2, 0, 3)
        k = k.reshape(length, b, heads, hd).permute(1, 2, 0, 3)
        v = v.reshape(length, b, heads, hd).permute(1, 2, 0, 3)
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
        scores = scores.masked_fill(paddings[:, None, None, :] > 0, float("-inf"))
        att = scores.softmax(-1) @ v  # B, H, L, hd
        att = att.permute(2, 0, 1, 3).reshape(length, b, d)
        x = x + att @ p("attn.out_proj.weight").T + p("attn.out_proj.bias")
        h = torch.nn.functional.layer_norm(x, (d,), p("ln_2.weight"), p("ln_2.bias"), 1e-5)
        m = keep.T[..., None]
        h = torch.relu(h @ p("mlp.c_fc.weight").T + p("mlp.c_fc.bias")) * m
        x = x + (h @ p("mlp.c_proj.weight").T + p("mlp.c_proj.bias")) * m
    x = x.permute(1, 0, 2)
    x = torch.nn.functional.layer_norm(x, (d,), state["ln_final.weight"], state["ln_final.bias"], 1e-5)
    x = torch.where(paddings[..., None] > 0, torch.zeros_like(x), x)
    return x.sum(1) / (keep.sum(1, keepdim=True) + 1e-8)


def random_ids(b: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (b, length), generator=g)
    lengths = torch.randint(1, length + 1, (b,), generator=g)
    ids[torch.arange(length)[None] >= lengths[:, None]] = 0
    return ids


@pytest.fixture(scope="module")
def tower():
    torch.manual_seed(0)
    model = TextTower("tiny", vocab_size=100, context_length=16).eval()
    with torch.no_grad():  # non-trivial norms and biases
        for name, param in model.named_parameters():
            if "ln" in name or "bias" in name:
                param.add_(0.3 * torch.randn_like(param))
    return model


def test_matches_reference_from_published_architecture(tower):
    ids = random_ids(5, 16, 100)
    ids[0] = torch.arange(1, 17)  # one text with no padding at all
    with torch.no_grad():
        ours = tower(ids)
        ref = reference_text_embedding(tower.state_dict(), ids, heads=TEXT_SIZES["tiny"]["heads"])
    assert ours.shape == (5, 192)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_training_mode_matches_eval_mode(tower):
    # No dropout in the tower: training mode must compute the same (the SDPA kernel may differ).
    ids = random_ids(3, 16, 100, seed=1)
    with torch.no_grad():
        evaluated = tower(ids)
        tower.train()
        trained = tower(ids)
        tower.eval()
    torch.testing.assert_close(trained, evaluated, rtol=1e-5, atol=1e-5)


def test_extra_padding_changes_nothing(tower):
    ids = random_ids(3, 10, 100, seed=2)
    longer = torch.cat([ids, torch.zeros(3, 6, dtype=torch.long)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(tower(ids), tower(longer), rtol=1e-5, atol=1e-5)


def test_word_order_matters_through_positions(tower):
    ids = torch.tensor([[5, 6, 7, 0], [7, 6, 5, 0]])
    with torch.no_grad():
        out = tower(ids)
    assert (out[0] - out[1]).abs().max() > 1e-3


def test_empty_text_is_finite_and_has_finite_gradients(tower):
    ids = torch.tensor([[0, 0, 0], [3, 4, 0]])
    out = tower(ids)
    assert torch.isfinite(out).all() and out[0].abs().max() == 0
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in tower.parameters() if p.grad is not None)
    tower.zero_grad()


def test_state_dict_uses_official_names():
    model = TextTower("tiny", vocab_size=50)
    keys = set(model.state_dict())
    block = "transformer.resblocks.1."
    expected = {
        "token_embedding.weight", "ln_final.weight", "ln_final.bias",
        block + "ln_1.weight", block + "attn.in_proj_weight", block + "attn.in_proj_bias",
        block + "attn.out_proj.weight", block + "attn.out_proj.bias", block + "ln_2.bias",
        block + "mlp.c_fc.weight", block + "mlp.c_proj.bias",
    }
    assert expected <= keys
    assert not any("pos" in k for k in keys)  # positions are computed, never stored
    assert len({k for k in keys if k.startswith("transformer.resblocks.")}) == 2 * 12
    assert model.width == 192 and len(model.blocks) == 2


def test_sinusoids_sines_then_cosines():
    pos = sinusoidal_positions(5, 8)
    assert pos.shape == (5, 8)
    torch.testing.assert_close(pos[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    # The first timescale is 1: position p has sin(p) in column 0.
    torch.testing.assert_close(pos[:, 0], torch.arange(5.0).sin())
    assert sinusoidal_positions(3, 7).shape == (3, 7)


def test_size_table_and_errors():
    assert TEXT_SIZES["so400m"]["layers"] == 27
    with torch.device("meta"):
        so = TextTower("so400m")
    assert len(so.blocks) == 27 and so.width == 1152
    with pytest.raises(TipslabError, match="not known"):
        TextTower("xl")
    with pytest.raises(TipslabError, match="integer tensor"):
        TextTower("tiny", vocab_size=10)(torch.rand(2, 3))


@pytest.mark.parametrize("padded", [False, True])
def test_sdpa_attention_matches_nn_multihead_attention(padded):
    """The fused-SDPA attention against the previous path (nn.MultiheadAttention with a
    key-padding mask) given the same weights, outputs and input gradients within 1e-5."""
    from tipslab.modules.text import PaddedSelfAttention

    torch.manual_seed(0)
    ours = PaddedSelfAttention(192, 3)
    previous = torch.nn.MultiheadAttention(192, 3, batch_first=True)
    assert previous.load_state_dict(ours.state_dict()) is not None  # the same keys and shapes
    ids = random_ids(4, 12, 100, seed=3) if padded else torch.randint(1, 100, (4, 12))
    padding = ids == 0
    assert bool(padding.any()) == padded
    for mode in ("train", "eval"):
        ours.train(mode == "train")
        previous.train(mode == "train")
        x = torch.randn(4, 12, 192, requires_grad=True)
        got = ours(x, ~padding)
        (grad_got,) = torch.autograd.grad(got.square().sum(), x)
        want = previous(x, x, x, key_padding_mask=padding, need_weights=False)[0]
        (grad_want,) = torch.autograd.grad(want.square().sum(), x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        if mode == "train":
            torch.testing.assert_close(grad_got, grad_want, rtol=1e-5, atol=1e-5)
