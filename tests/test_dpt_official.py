"""DPT decoders against the published architecture: official-layout files written here, read by
`load_decoder`, must give what an independent plain-torch reference computes from the same
arrays (the reference works on the Scenic arrays directly: HWIO kernels, a transposed conv
written as an einsum with the Flax kernel orientation). Also: the PyTorch layouts, export, and
one-line errors for wrong-size and truncated files."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tipslab.errors import TipslabError
from tipslab.modules.official_decoders import export_decoder, load_decoder

D, C = 32, 16  # encoder width and fusion channels: small, the architecture is width-agnostic
POST = (D // 8, D // 4, D // 2, D)
HEADS = {"seg": ("pixel_segmentation", 5), "depth": ("pixel_depth_classif", 256), "normals": ("pixel_normals", 3)}


# ------------------------------------------------------------------------ an official-layout file
def scenic_arrays(task: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights under the released Scenic names, sized like a real file (scaled by fan-in)."""
    rng = np.random.default_rng(seed)
    head, outputs = HEADS[task]
    shapes = {}
    rb = "decoder/dpt/reassemble_blocks"
    for i, ch in enumerate(POST):
        shapes[f"{rb}/readout_projects_{i}/kernel"] = (2 * D, D)
        shapes[f"{rb}/readout_projects_{i}/bias"] = (D,)
        shapes[f"{rb}/out_projection_{i}/kernel"] = (1, 1, D, ch)
        shapes[f"{rb}/out_projection_{i}/bias"] = (ch,)
        shapes[f"decoder/dpt/convs_{i}/kernel"] = (3, 3, ch, C)
    for i, k in ((0, 4), (1, 2), (3, 3)):
        shapes[f"{rb}/resize_layers_{i}/kernel"] = (k, k, POST[i], POST[i])
        shapes[f"{rb}/resize_layers_{i}/bias"] = (POST[i],)
    for i in range(4):
        for unit in ["PreActResidualConvUnit_0"] + (["PreActResidualConvUnit_1"] if i else []):
            for conv in ("conv1", "conv2"):
                shapes[f"decoder/dpt/fusion_blocks_{i}/{unit}/{conv}/kernel"] = (3, 3, C, C)
        shapes[f"decoder/dpt/fusion_blocks_{i}/Conv_0/kernel"] = (1, 1, C, C)
        shapes[f"decoder/dpt/fusion_blocks_{i}/Conv_0/bias"] = (C,)
    shapes["decoder/dpt/project/kernel"] = (3, 3, C, C)
    shapes["decoder/dpt/project/bias"] = (C,)
    shapes[f"decoder/{head}/kernel"] = (C, outputs)
    shapes[f"decoder/{head}/bias"] = (outputs,)
    arrays = {}
    for key, shape in shapes.items():
        fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 10
        arrays[key] = (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
    return arrays


def features(grid, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, D, generator=g), torch.randn(2, D, *grid, generator=g)) for _ in range(4)]


# ------------------------------------------------------------------------ the plain-torch reference
def reference(arrays: dict[str, np.ndarray], task: str, feats, image_size):
    w = {k.removeprefix("decoder/"): torch.from_numpy(v) for k, v in arrays.items()}
    rb = "dpt/reassemble_blocks"

    def conv(x, name, stride=1):  # HWIO kernel, "same" padding
        kernel = w[f"{name}/kernel"].permute(3, 2, 0, 1)
        bias = w.get(f"{name}/bias")
        return F.conv2d(x, kernel, bias, stride=stride, padding=kernel.shape[-1] // 2)

    def conv_transpose(x, name):  # stride == kernel size: each input cell paints a k x k tile
        kernel = w[f"{name}/kernel"]  # [k, k, in, out], Flax orientation: tile cell (m, n) uses [k-1-m, k-1-n]
        k = kernel.shape[0]
        tiles = torch.einsum("bcij,mnco->boimjn", x, kernel.flip(0, 1))
        b, o, h, _, wd, _ = tiles.shape
        return tiles.reshape(b, o, h * k, wd * k) + w[f"{name}/bias"][None, :, None, None]

    def unit(x, name):
        y = conv(F.relu(x), f"{name}/conv1")
        return x + conv(F.relu(y), f"{name}/conv2")

    maps = []
    for i, (cls, x) in enumerate(feats):
        b, d, h, wd = x.shape
        tokens = x.reshape(b, d, h * wd).transpose(1, 2)
        cat = torch.cat([tokens, cls[:, None].expand(b, h * wd, d)], -1)
        proj = cat @ w[f"{rb}/readout_projects_{i}/kernel"] + w[f"{rb}/readout_projects_{i}/bias"]
        proj = 0.5 * proj * (1 + torch.tanh(np.sqrt(2 / np.pi) * (proj + 0.044715 * proj**3)))
        y = proj.transpose(1, 2).reshape(b, d, h, wd)
        y = conv(y, f"{rb}/out_projection_{i}")
        if i < 2:
            y = conv_transpose(y, f"{rb}/resize_layers_{i}")
        elif i == 3:
            y = conv(y, f"{rb}/resize_layers_3", stride=2)
        maps.append(conv(y, f"dpt/convs_{i}"))
    out = None
    for i in range(4):
        fb = f"dpt/fusion_blocks_{i}"
        if i == 0:
            out = unit(maps[3], f"{fb}/PreActResidualConvUnit_0")
        else:
            skip = maps[3 - i]
            if skip.shape[-2:] != out.shape[-2:]:
                skip = F.interpolate(skip, size=out.shape[-2:], mode="bilinear", align_corners=False)
            out = unit(out + unit(skip, f"{fb}/PreActResidualConvUnit_0"), f"{fb}/PreActResidualConvUnit_1")
        out = F.interpolate(out, scale_factor=2, mode="bilinear", align_corners=True)
        out = conv(out, f"{fb}/Conv_0")
    out = conv(out, "dpt/project")
    head, _ = HEADS[task]
    logits = torch.einsum("bchw,co->bohw", out, w[f"{head}/kernel"]) + w[f"{head}/bias"][None, :, None, None]
    if task == "depth":
        weights = F.relu(logits) + 0.001
        weights = weights / weights.sum(1, keepdim=True)
        centres = torch.linspace(0.001, 10.0, logits.shape[1])
        logits = (weights * centres[None, :, None, None]).sum(1, keepdim=True)
    return F.interpolate(logits, size=image_size, mode="bilinear", align_corners=False)


def write(path, arrays):
    np.savez(path, **arrays)
    return path


# ------------------------------------------------------------------------ tests
@pytest.mark.parametrize("task", ["seg", "depth", "normals"])
@pytest.mark.parametrize("grid,image_size", [((4, 4), (56, 56)), ((5, 7), (70, 98))])
def test_decoder_matches_the_reference_of_the_published_architecture(tmp_path, task, grid, image_size):
    arrays = scenic_arrays(task)
    decoder = load_decoder(write(tmp_path / "d.npz", arrays), embed_dim=D)
    assert decoder.task == task and decoder.num_outputs == HEADS[task][1]
    feats = features(grid)
    with torch.no_grad():
        ours = decoder(feats, image_size=image_size)
        ref = reference(arrays, task, feats, image_size)
    assert ours.shape == ref.shape == (2, 1 if task == "depth" else HEADS[task][1], *image_size)
    assert ref.abs().max() > 0.05 and ref.std() > 1e-3  # a live signal, not a near-constant map
    assert (ours - ref).abs().max().item() <= 1e-4


def test_transposed_kernels_are_flipped_as_the_official_loader_does(tmp_path):
    # Without the 180-degree flip the 4x / 2x maps come out mirrored inside each tile.
    arrays = scenic_arrays("seg")
    decoder = load_decoder(write(tmp_path / "d.npz", arrays), embed_dim=D)
    unflipped = dict(arrays)
    for i in (0, 1):
        key = f"decoder/dpt/reassemble_blocks/resize_layers_{i}/kernel"
        unflipped[key] = arrays[key][::-1, ::-1].copy()
    other = load_decoder(write(tmp_path / "u.npz", unflipped), embed_dim=D)
    feats = features((4, 4))
    with torch.no_grad():
        assert (decoder(feats) - other(feats)).abs().max() > 1e-3


def test_pytorch_layouts_and_export_mean_the_same_decoder(tmp_path):
    arrays = scenic_arrays("depth")
    decoder = load_decoder(write(tmp_path / "d.npz", arrays))
    # The official PyTorch layout: tipslab names, transposed-conv kernels in Flax orientation.
    torch_layout = {}
    for name, value in decoder.state_dict().items():
        value = value.numpy()
        if name.startswith("dpt.reassemble.resize_layers.") and name.endswith("weight") and value.shape[-1] in (2, 4):
            value = value[:, :, ::-1, ::-1].copy()
        torch_layout[name] = value
    hierarchical = load_decoder(write(tmp_path / "t.npz", torch_layout), task="depth")
    legacy = {k.replace("dpt.", "", 1).replace("head.", "pixel_depth_classif.", 1): v for k, v in torch_layout.items()}
    flat = load_decoder(write(tmp_path / "l.npz", legacy))  # the legacy head name says "depth"
    export_decoder(decoder, tmp_path / "e.npz")
    with np.load(tmp_path / "e.npz") as exported:
        assert sorted(exported.files) == sorted(arrays)
        for key in arrays:
            np.testing.assert_array_equal(exported[key], arrays[key])
    feats = features((5, 5))
    with torch.no_grad():
        expected = decoder(feats, (70, 70))
        for other in (hierarchical, flat):
            torch.testing.assert_close(other(feats, (70, 70)), expected, rtol=0, atol=1e-6)


def test_wrong_size_truncated_and_incomplete_files_are_one_line_errors(tmp_path):
    path = write(tmp_path / "seg.npz", scenic_arrays("seg"))
    with pytest.raises(TipslabError) as err:
        load_decoder(path, embed_dim=192)
    assert "32-wide" in str(err.value) and "192" in str(err.value) and str(path) in str(err.value)
    with pytest.raises(TipslabError, match="holds a seg head, but --task depth"):
        load_decoder(path, task="depth")

    data = path.read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(TipslabError, match="not a readable .npz") as err:
        load_decoder(tmp_path / "cut.npz")
    assert "\n" not in str(err.value)

    arrays = scenic_arrays("seg")
    del arrays["decoder/dpt/fusion_blocks_2/PreActResidualConvUnit_1/conv2/kernel"]
    arrays["decoder/dpt/project/bias"] = np.zeros(C + 1, np.float32)
    with pytest.raises(TipslabError) as err:
        load_decoder(write(tmp_path / "bad.npz", arrays))
    message = str(err.value)
    assert "1 missing: dpt/fusion_blocks_2/PreActResidualConvUnit_1/conv2/kernel" in message
    assert "dpt/project/bias (17,) (expected (16,))" in message and "\n" not in message
