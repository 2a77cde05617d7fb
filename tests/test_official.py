"""Official TIPS / TIPSv2 layouts: random-weight checkpoints written here in the published layouts,
loaded, compared with independent references (timm's own loader, a plain-torch text tower), and
exported back."""

import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_text import reference_text_embedding

from tipslab.errors import TipslabError
from tipslab.modules import official
from tipslab.modules.vision import TIMM_NAMES

# Published architectures (REFERENCE.md / the official inference scripts), written out here
# independently of tipslab's size tables: width, blocks, MLP hidden, SwiGLU.
VISION_PUBLISHED = {
    "tiny": (192, 4, 768, False),
    "s": (384, 12, 1536, False),
    "b": (768, 12, 3072, False),
    "l": (1024, 24, 4096, False),
    "so400m": (1152, 27, 4304, False),
    "g": (1536, 40, 4096, True),  # SwiGLU: w12 packs 2 x 4096
}
TEXT_PUBLISHED = {  # width, MLP, layers
    "tiny": (192, 768, 2),
    "s": (384, 1536, 12),
    "b": (768, 3072, 12),
    "l": (1024, 4096, 12),
    "so400m": (1152, 4304, 27),
    "g": (1536, 6144, 12),
}


def vision_layout(size: str, grid: int) -> dict[str, tuple]:
    w, depth, hidden, swiglu = VISION_PUBLISHED[size]
    out = {
        "cls_token": (1, 1, w), "pos_embed": (1, 1 + grid * grid, w), "register_tokens": (1, 1, w),
        "mask_token": (1, w), "patch_embed.proj.weight": (w, 3, 14, 14), "patch_embed.proj.bias": (w,),
        "norm.weight": (w,), "norm.bias": (w,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        out.update({
            b + "norm1.weight": (w,), b + "norm1.bias": (w,), b + "attn.qkv.weight": (3 * w, w),
            b + "attn.qkv.bias": (3 * w,), b + "attn.proj.weight": (w, w), b + "attn.proj.bias": (w,),
            b + "ls1.gamma": (w,), b + "norm2.weight": (w,), b + "norm2.bias": (w,), b + "ls2.gamma": (w,),
        })
        if swiglu:
            out.update({b + "mlp.w12.weight": (2 * hidden, w), b + "mlp.w12.bias": (2 * hidden,),
                        b + "mlp.w3.weight": (w, hidden), b + "mlp.w3.bias": (w,)})
        else:
            out.update({b + "mlp.fc1.weight": (hidden, w), b + "mlp.fc1.bias": (hidden,),
                        b + "mlp.fc2.weight": (w, hidden), b + "mlp.fc2.bias": (w,)})
    return out


def text_layout(size: str, vocab: int) -> dict[str, tuple]:
    w, mlp, layers = TEXT_PUBLISHED[size]
    out = {"token_embedding.weight": (vocab, w), "ln_final.weight": (w,), "ln_final.bias": (w,)}
    for i in range(layers):
        b = f"transformer.resblocks.{i}."
        out.update({
            b + "ln_1.weight": (w,), b + "ln_1.bias": (w,), b + "attn.in_proj_weight": (3 * w, w),
            b + "attn.in_proj_bias": (3 * w,), b + "attn.out_proj.weight": (w, w), b + "attn.out_proj.bias": (w,),
            b + "ln_2.weight": (w,), b + "ln_2.bias": (w,), b + "mlp.c_fc.weight": (mlp, w), b + "mlp.c_fc.bias": (mlp,),
            b + "mlp.c_proj.weight": (w, mlp), b + "mlp.c_proj.bias": (w,),
        })
    return out


def fill(layout: dict[str, tuple], seed: int, meta: bool = False) -> dict[str, torch.Tensor]:
    """Random weights of a sensible scale (so 12 random blocks stay finite and non-trivial)."""
    if meta:
        return {k: torch.empty(shape, device="meta") for k, shape in layout.items()}
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in layout.items():
        noise = torch.randn(shape, generator=g)
        if key.endswith("gamma"):
            out[key] = 0.1 + 0.05 * noise
        elif ("norm" in key or "ln_" in key) and key.endswith("weight"):
            out[key] = 1.0 + 0.1 * noise
        elif key in ("cls_token", "pos_embed", "register_tokens", "mask_token"):
            out[key] = 0.5 * noise
        else:
            out[key] = 0.02 * noise
    return out


def write_pair(tmp_path, size, grid=4, vocab=200, temperature=0.01, seed=0, stem="tips_v2_oss_x14"):
    vision = fill(vision_layout(size, grid), seed)
    text = fill(text_layout(size, vocab), seed + 1)
    text_file = dict(text, temperature=torch.tensor(temperature, dtype=torch.float32))
    vpath, tpath = tmp_path / f"{stem}_vision.npz", tmp_path / f"{stem}_text.npz"
    np.savez(vpath, **{k: v.numpy() for k, v in vision.items()})
    np.savez(tpath, **{k: v.numpy() for k, v in text_file.items()})
    return vpath, tpath, vision, text


# ------------------------------------------------------------------------- layouts and round trips
@pytest.mark.parametrize("size", sorted(TIMM_NAMES))
def test_written_layout_is_what_timm_converts(size):
    """Our test layout is the official one: timm's converter maps it onto timm's model exactly."""
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = fill(vision_layout(size, 32), 0, meta=True)
    with torch.device("meta"):
        model = timm.create_model(TIMM_NAMES[size], pretrained=False, num_classes=0)
    converted = checkpoint_filter_fn(dict(state), model)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("size", ["l", "so400m", "g"])
def test_round_trip_key_sets_of_large_sizes_on_meta(size):
    vision = fill(vision_layout(size, 32), 0, meta=True)
    text = fill(text_layout(size, 32000), 0, meta=True)
    encoder, cfg = official.encoder_from_official(vision, text)
    assert cfg["vision"]["size"] == size and cfg["text"]["size"] == size and cfg["vision"]["img_size"] == 448
    exported_vision = official.official_vision_state(encoder.vision)
    assert {k: tuple(v.shape) for k, v in exported_vision.items()} == vision_layout(size, 32)
    hf = official.hf_state(encoder)
    expected = {"vision_encoder." + k: s for k, s in vision_layout(size, 32).items()}
    expected.update({"text_encoder." + k: s for k, s in text_layout(size, 32000).items()})
    expected["temperature"] = ()
    assert {k: tuple(v.shape) for k, v in hf.items()} == expected
    # ...and the exported dict loads again into the same key set.
    again, _ = official.encoder_from_official(exported_vision, official.official_text_state(encoder.text))
    assert {k: tuple(v.shape) for k, v in again.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in encoder.state_dict().items()}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Official-layout files per size, written once per module (b is 86M random weights)."""
    cache = {}

    def get(size):
        if size not in cache:
            cache[size] = write_pair(tmp_path_factory.mktemp(size), size, grid=4, vocab=500, temperature=0.02, seed=3)
        return cache[size]

    return get


@pytest.mark.parametrize("size", ["tiny", "s", "b"])
def test_round_trip_values_npz_and_safetensors(size, pairs, tmp_path):
    vpath, tpath, vision, text = pairs(size)
    encoder, cfg = official.load_official_npz(vpath, tpath)
    assert cfg["vision"]["size"] == size and cfg["text"]["vocab_size"] == 500
    assert cfg["vision"]["pos_grid"] == 4 and cfg["vision"]["img_size"] == 56
    assert encoder.temperature.item() == pytest.approx(0.02, rel=1e-6)

    out_v, out_t = official.export_official_npz(encoder, tmp_path / "out_vision.npz", tmp_path / "out_text.npz")
    exported = dict(np.load(out_v, allow_pickle=False))
    assert set(exported) == set(vision)
    for key, value in vision.items():
        got = torch.from_numpy(exported[key])
        if key == "cls_token":  # the CLS position is folded into the CLS token
            assert torch.equal(got, value + vision["pos_embed"][:, :1])
        elif key == "pos_embed":
            assert torch.equal(got[:, 1:], value[:, 1:]) and got[:, 0].abs().max() == 0
        else:
            assert torch.equal(got, value), key
    exported_text = dict(np.load(out_t, allow_pickle=False))
    assert set(exported_text) == set(text) | {"temperature"}
    assert all(torch.equal(torch.from_numpy(exported_text[k]), v) for k, v in text.items())

    again, cfg_again = official.load_official_npz(out_v, out_t)
    assert cfg_again == cfg
    reference = encoder.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in again.state_dict().items())

    hf = official.export_hf_safetensors(encoder, tmp_path / "model.safetensors")
    from_hf, cfg_hf = official.load_hf_safetensors(hf)
    assert cfg_hf == cfg
    assert all(torch.equal(v, reference[k]) for k, v in from_hf.state_dict().items())


# ------------------------------------------------------------------------- output parity
@pytest.fixture(scope="module")
def b_pair(pairs):
    return pairs("b")


def _timm_reference(vision_state, img_size, interpolation="bicubic"):
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    with torch.device("meta"):  # every weight comes from the checkpoint: skip the random init
        model = timm.create_model(TIMM_NAMES["b"], pretrained=False, num_classes=0, img_size=img_size)
    converted = checkpoint_filter_fn(dict(vision_state), model, interpolation=interpolation, antialias=True)
    model.load_state_dict(converted, assign=True)
    return model.eval()


def test_vision_matches_timm_loader_at_native_size(b_pair):
    vpath, tpath, vision, _ = b_pair
    encoder, _ = official.load_official_npz(vpath, tpath)
    images = torch.rand(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = encoder.eval().encode_image(images)
        ref = _timm_reference(vision, 56).forward_features(images)
    torch.testing.assert_close(ours.cls1, ref[:, 0], rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.cls2, ref[:, 1], rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.patches, ref[:, 2:], rtol=0, atol=1e-5)
    assert ours.patches.std() > 0.1  # not a degenerate comparison


def test_vision_matches_official_resizing_at_odd_size(b_pair):
    # timm resizes a checkpoint's positions with the interpolation we ask for: bilinear +
    # antialias is the official code's (interpolate_pos_encoding), so the outputs agree.
    vpath, tpath, vision, _ = b_pair
    encoder, _ = official.load_official_npz(vpath, tpath)
    images = torch.rand(1, 3, 126, 98, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = encoder.eval().encode_image(images)
        ref = _timm_reference(vision, (126, 98), interpolation="bilinear").forward_features(images)
        bicubic = _timm_reference(vision, (126, 98), interpolation="bicubic").forward_features(images)
    assert ours.grid == (9, 7)
    torch.testing.assert_close(ours.cls1, ref[:, 0], rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.patches, ref[:, 2:], rtol=0, atol=1e-5)
    # timm's default (bicubic) resize is a different model at this size.
    assert (bicubic[:, 2:] - ours.patches).abs().max() > 1e-4


def test_text_matches_reference_from_published_architecture(b_pair):
    vpath, tpath, _, text = b_pair
    encoder, _ = official.load_official_npz(vpath, tpath)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 500, (4, 64), generator=g)
    for row, length in enumerate([64, 10, 3, 1]):
        ids[row, length:] = 0
    with torch.no_grad():
        ours = encoder.eval().encode_text(ids)
        ref = reference_text_embedding(text, ids, heads=12)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_similarity_uses_loaded_temperature(tmp_path):
    vpath, tpath, _, _ = write_pair(tmp_path, "tiny", temperature=0.5)
    encoder, cfg = official.load_official_npz(vpath, tpath)
    assert cfg["temperature"] == pytest.approx(0.5)
    image = torch.zeros(1, 192)
    image[0, 0] = 3.0  # cosine 1 with text 0, 0 with text 1 (orthogonal)
    texts = torch.zeros(2, 192)
    texts[0, 0], texts[1, 1] = 0.2, 5.0
    probs = encoder.similarity(image, texts)
    # softmax([1, 0] / 0.5) = [e^2, 1] / (e^2 + 1)
    expected = torch.tensor([[math.exp(2), 1.0]]) / (math.exp(2) + 1)
    torch.testing.assert_close(probs, expected, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------- bad input
def test_text_file_given_as_vision(tmp_path):
    vpath, tpath, _, _ = write_pair(tmp_path, "tiny")
    with pytest.raises(TipslabError, match="text tower file .* expected the vision file") as err:
        official.load_official_npz(tpath, vpath)
    assert "\n" not in str(err.value)


def test_truncated_file(tmp_path):
    vpath, tpath, _, _ = write_pair(tmp_path, "tiny")
    data = vpath.read_bytes()
    vpath.write_bytes(data[: len(data) // 2])
    with pytest.raises(TipslabError, match="not a readable .npz"):
        official.load_official_npz(vpath, tpath)
    np.save(tmp_path / "one.npy", np.zeros(3))
    with pytest.raises(TipslabError, match="a single .npy array"):
        official.read_npz(tmp_path / "one.npy", "vision")
    (tmp_path / "notes.npz").write_text("hello")
    with pytest.raises(TipslabError, match="not a readable .npz"):
        official.read_npz(tmp_path / "notes.npz", "vision")
    hf = tmp_path / "model.safetensors"
    save_file({"vision_encoder.x": torch.zeros(100)}, str(hf))
    hf.write_bytes(hf.read_bytes()[:-50])
    with pytest.raises(TipslabError, match="not a readable safetensors"):
        official.load_hf_safetensors(hf)


def test_file_of_another_size_names_what_it_looks_like(tmp_path):
    vpath, tpath, _, _ = write_pair(tmp_path, "tiny")
    with pytest.raises(TipslabError) as err:
        official.load_official_npz(vpath, tpath, size="s")
    message = str(err.value)
    assert "size 's'" in message and "looks like size 'tiny' (width 192, 4 blocks)" in message
    assert "mis-shaped" in message and "missing" in message


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    vision = fill(vision_layout("tiny", 3), 0)
    del vision["blocks.2.ls1.gamma"]
    vision["blocks.2.extra"] = torch.zeros(3)
    vision["norm.bias"] = torch.zeros(7)
    with pytest.raises(TipslabError) as err:
        official.vision_from_official(vision, "v.npz")
    message = str(err.value)
    assert "1 missing: blocks.2.ls1.gamma" in message and "1 unexpected: blocks.2.extra" in message
    assert "norm.bias (7,) (expected (192,))" in message and "looks like size 'tiny'" in message


def test_towers_of_different_sizes(tmp_path):
    vision = fill(vision_layout("tiny", 2), 0)
    text = fill(text_layout("s", 50), 0)
    with pytest.raises(TipslabError, match="different model sizes"):
        official.encoder_from_official(vision, text)


def test_hf_file_without_prefixes(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"vision.cls_token": torch.zeros(1, 1, 4)}, str(path))
    with pytest.raises(TipslabError, match="not a TIPSv2 Hugging Face file"):
        official.load_hf_safetensors(path)


# ------------------------------------------------------------------------- finding files
def test_release_names_say_where_to_put_files(tmp_path, monkeypatch):
    monkeypatch.delenv("TIPSLAB_WEIGHTS_DIR", raising=False)
    with pytest.raises(TipslabError, match="set TIPSLAB_WEIGHTS_DIR and put tips_v2_oss_b14_vision.npz"):
        official.load_official_model("tipsv2-b14")
    monkeypatch.setenv("TIPSLAB_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(TipslabError, match=f"{tmp_path}/tipsv2-l14 does not exist; put tips_v2_oss_l14_vision.npz"):
        official.load_official_model("tipsv2-l14")
    (tmp_path / "tipsv2-l14").mkdir()
    with pytest.raises(TipslabError, match="official TIPS weights"):
        official.load_official_model("tipsv2-l14")


def test_release_name_resolves_under_weights_dir(tmp_path, monkeypatch):
    folder = tmp_path / "tips-tiny14"
    folder.mkdir()
    write_pair(folder, "tiny", stem="tips_oss_tiny14")
    (folder / "tokenizer.model").write_bytes(b"placeholder")  # located here, parsed by the API
    monkeypatch.setenv("TIPSLAB_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setitem(official.RELEASES, "tips-tiny14", dict(stem="tips_oss_tiny14", size="tiny", img_size=56))
    encoder, cfg = official.load_official_model("tips-tiny14")
    assert cfg["vision"]["img_size"] == 56 and cfg["vision"]["pos_grid"] == 4
    assert cfg["tokenizer"]["path"] == str(folder / "tokenizer.model")
    assert encoder.vision.img_size == 56
