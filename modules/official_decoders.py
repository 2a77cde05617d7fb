"""The official DPT decoder files: read (every key and shape checked), build, export.

The released decoders (`tips_v2_<size>_{segmentation,depth,normals}_dpt.zip`, an `.npz`
archive) use the **Scenic/Flax layout**: `/`-separated names such as
`decoder/dpt/reassemble_blocks/out_projection_0/kernel`, conv kernels HWIO, dense kernels
`(in, out)`, and the task head at the top level (`pixel_segmentation`, `pixel_depth_classif`,
`pixel_normals`). Flax's transposed conv does not flip its kernel where PyTorch's does, so the
4x / 2x ConvTranspose kernels are flipped 180 degrees on the way in (and out).

The official loader also reads a **PyTorch layout** (`dpt.reassemble...`, `head.weight`, or
the older flat names `reassemble...`, `pixel_depth_classif...`); it flips the ConvTranspose
kernels of those files too, so such files hold them in Flax orientation. We read them the same
way, so a file means the same thing to both loaders.

The decoder's size is read from the file (widths of the readout, the four reassembled maps, the
fusion channels and the head) and every other key is then checked against that size; a file
for another encoder width, a missing or extra key, or a truncated archive is a one-line
`TipslabError` naming the file. Export writes the Scenic layout, the one the releases use.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tipslab.errors import TipslabError
from tipslab.modules.checkpoint import describe_mismatch
from tipslab.modules.dpt import DEFAULT_DEPTH_RANGE, TASKS, DPTDecoder
from tipslab.modules.official import read_npz, write_npz

# Scenic head names -> task; the first of each task is what export writes.
HEAD_NAMES: dict[str, str] = {
    "pixel_segmentation": "seg",
    "segmentation_head": "seg",
    "pixel_depth_classif": "depth",
    "pixel_depth_regress": "depth",
    "pixel_normals": "normals",
}
EXPORT_HEAD = {"seg": "pixel_segmentation", "depth": "pixel_depth_classif", "normals": "pixel_normals"}
_TORCH_LEGACY_PREFIXES = {
    "reassemble.": "dpt.reassemble.", "convs.": "dpt.convs.", "fusion_blocks.": "dpt.fusion_blocks.",
    "project.": "dpt.project.", **{f"{name}.": "head." for name in HEAD_NAMES},
}
_FLIPPED = ("dpt.reassemble.resize_layers.0.weight", "dpt.reassemble.resize_layers.1.weight")
ROLE = "decoder"


# ------------------------------------------------------------------------------ key tables
def scenic_table(decoder: DPTDecoder, head_name: str) -> dict[str, tuple[str, str]]:
    """Scenic key (without the `decoder/` prefix) -> (tipslab parameter, conversion kind).

    Kinds: `conv` HWIO <-> OIHW, `convT` HWIO <-> (in, out, H, W) with a 180-degree flip,
    `dense` (in, out) <-> (out, in), `bias` as is."""
    table: dict[str, tuple[str, str]] = {}
    rb, t = "dpt/reassemble_blocks", "dpt.reassemble"
    for i in range(4):
        table[f"{rb}/out_projection_{i}/kernel"] = (f"{t}.out_projections.{i}.weight", "conv")
        table[f"{rb}/out_projection_{i}/bias"] = (f"{t}.out_projections.{i}.bias", "bias")
        table[f"{rb}/readout_projects_{i}/kernel"] = (f"{t}.readout_projects.{i}.weight", "dense")
        table[f"{rb}/readout_projects_{i}/bias"] = (f"{t}.readout_projects.{i}.bias", "bias")
        table[f"dpt/convs_{i}/kernel"] = (f"dpt.convs.{i}.weight", "conv")
    for i, kind in ((0, "convT"), (1, "convT"), (3, "conv")):
        table[f"{rb}/resize_layers_{i}/kernel"] = (f"{t}.resize_layers.{i}.weight", kind)
        table[f"{rb}/resize_layers_{i}/bias"] = (f"{t}.resize_layers.{i}.bias", "bias")
    for i in range(4):
        fb = f"dpt/fusion_blocks_{i}"
        # Flax numbers the units in creation order: the skip unit (blocks 1-3) comes first.
        units = [("PreActResidualConvUnit_0", "main_unit")] if i == 0 else [
            ("PreActResidualConvUnit_0", "residual_unit"), ("PreActResidualConvUnit_1", "main_unit")]
        for flax_name, torch_name in units:
            for conv in ("conv1", "conv2"):
                table[f"{fb}/{flax_name}/{conv}/kernel"] = (f"dpt.fusion_blocks.{i}.{torch_name}.{conv}.weight", "conv")
        table[f"{fb}/Conv_0/kernel"] = (f"dpt.fusion_blocks.{i}.out_conv.weight", "conv")
        table[f"{fb}/Conv_0/bias"] = (f"dpt.fusion_blocks.{i}.out_conv.bias", "bias")
    table["dpt/project/kernel"] = ("dpt.project.weight", "conv")
    table["dpt/project/bias"] = ("dpt.project.bias", "bias")
    table[f"{head_name}/kernel"] = ("head.weight", "dense")
    table[f"{head_name}/bias"] = ("head.bias", "bias")
    return table


def _to_torch(array: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "conv":
        return array.permute(3, 2, 0, 1)
    if kind == "convT":
        return array.flip(0, 1).permute(2, 3, 0, 1)
    if kind == "dense":
        return array.t()
    return array


def _to_scenic(tensor: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "conv":
        return tensor.permute(2, 3, 1, 0)
    if kind == "convT":
        return tensor.permute(2, 3, 0, 1).flip(0, 1)
    if kind == "dense":
        return tensor.t()
    return tensor


def _scenic_shape(shape: tuple, kind: str) -> tuple:
    return tuple(_to_scenic(torch.empty(shape, device="meta"), kind).shape)


# ------------------------------------------------------------------------------ reading
def _normalise_scenic_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the optional `decoder/` prefix; accept `out_conv` for Flax's `Conv_0` (both occur)."""
    out = {}
    for key, value in state.items():
        key = key[len("decoder/"):] if key.startswith("decoder/") else key
        if not key.startswith("dpt/") and key.split("/")[0] not in HEAD_NAMES:
            key = "dpt/" + key  # the official loader also takes the DPT tree at the top level
        out[key.replace("/out_conv/", "/Conv_0/")] = value
    return out


def _normalise_torch_names(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str | None]:
    out, head_task = {}, None
    for key, value in state.items():
        for old, new in _TORCH_LEGACY_PREFIXES.items():
            if key.startswith(old):
                if new == "head.":
                    head_task = HEAD_NAMES[old[:-1]]
                key = new + key[len(old):]
                break
        out[key] = value
    return out, head_task


def _need(state: dict, key: str, axis: int, path: Path) -> int:
    if key not in state or state[key].ndim <= axis:
        raise TipslabError(f"{ROLE} file {path}: not a DPT decoder file: no key {key!r} of the expected rank "
                           f"(found {len(state)} keys, e.g. {', '.join(sorted(state)[:3]) or 'none'})")
    return int(state[key].shape[axis])


def _check_task(task: str | None, found: str | None, path: Path) -> str:
    if task is not None and task not in TASKS:
        raise TipslabError(f"unknown dense task {task!r}; expected one of {', '.join(TASKS)}")
    if task and found and task != found:
        raise TipslabError(f"{ROLE} file {path}: holds a {found} head, but --task {task} was asked for")
    if not (task or found):
        raise TipslabError(f"{ROLE} file {path}: its head does not say which task it is for; give the task "
                           f"(one of {', '.join(TASKS)})")
    return task or found


def _check_width(path: Path, width: int, embed_dim: int | None) -> None:
    if embed_dim is not None and width != int(embed_dim):
        from tipslab.modules.vision import VISION_SIZES

        sizes = [name for name, arch in VISION_SIZES.items() if arch["embed_dim"] == width]
        like = f" (a {'/'.join(sizes)}-size decoder)" if sizes else ""
        raise TipslabError(f"{ROLE} file {path}: reads {width}-wide features{like}, but the encoder's vision width "
                           f"is {embed_dim}; use the decoder made for this encoder")


def load_decoder(path, task: str | None = None, embed_dim: int | None = None,
                 depth_range: tuple[float, float] = DEFAULT_DEPTH_RANGE) -> DPTDecoder:
    """A `DPTDecoder` (eval mode) from an official-layout `.npz` (Scenic or PyTorch names).

    `task` may be left out for Scenic files (the head names it); `embed_dim` is the encoder's
    vision width, checked against the file's."""
    path = Path(path)
    state = read_npz(path, ROLE)
    if any("/" in key for key in state):
        state = _normalise_scenic_names(state)
        heads = sorted({key.split("/")[0] for key in state if key.split("/")[0] in HEAD_NAMES})
        if len(heads) != 1:
            raise TipslabError(f"{ROLE} file {path}: expected one task head ({', '.join(HEAD_NAMES)}); "
                               f"found {', '.join(heads) or 'none'}")
        task = _check_task(task, HEAD_NAMES[heads[0]], path)
        rb = "dpt/reassemble_blocks"
        width = _need(state, f"{rb}/readout_projects_0/kernel", 1, path)
        _check_width(path, width, embed_dim)
        decoder = DPTDecoder(
            task, width, num_outputs=_need(state, f"{heads[0]}/kernel", 1, path),
            channels=_need(state, "dpt/convs_0/kernel", 3, path),
            out_channels=[_need(state, f"{rb}/out_projection_{i}/kernel", 3, path) for i in range(4)],
            depth_range=depth_range)
        table = scenic_table(decoder, heads[0])
        params = dict(decoder.state_dict())
        expected = {key: _scenic_shape(tuple(params[name].shape), kind) for key, (name, kind) in table.items()}
        _raise_mismatch(path, expected, state)
        converted = {name: _to_torch(state[key], kind) for key, (name, kind) in table.items()}
    else:
        state, head_task = _normalise_torch_names(state)
        task = _check_task(task, head_task, path)
        width = _need(state, "dpt.reassemble.readout_projects.0.weight", 0, path)
        _check_width(path, width, embed_dim)
        decoder = DPTDecoder(
            task, width, num_outputs=_need(state, "head.weight", 0, path),
            channels=_need(state, "dpt.convs.0.weight", 0, path),
            out_channels=[_need(state, f"dpt.reassemble.out_projections.{i}.weight", 0, path) for i in range(4)],
            depth_range=depth_range)
        expected = {name: tuple(value.shape) for name, value in decoder.state_dict().items()}
        _raise_mismatch(path, expected, state)
        converted = {name: (value.flip(2, 3) if name in _FLIPPED else value) for name, value in state.items()}
    decoder.load_state_dict({k: v.float() for k, v in converted.items()}, strict=True)
    return decoder.eval()


def _raise_mismatch(path: Path, expected: dict[str, tuple], state: dict[str, torch.Tensor]) -> None:
    problems = describe_mismatch(expected, {k: tuple(v.shape) for k, v in state.items()})
    if problems:
        raise TipslabError(f"{ROLE} file {path}: not the DPT decoder its widths describe; {problems}")


# ------------------------------------------------------------------------------ writing
def scenic_state(decoder: DPTDecoder) -> dict[str, torch.Tensor]:
    """The decoder's weights under the released (Scenic) names, `decoder/`-prefixed."""
    params = dict(decoder.state_dict())
    return {f"decoder/{key}": _to_scenic(params[name].detach().float().cpu(), kind).contiguous()
            for key, (name, kind) in scenic_table(decoder, EXPORT_HEAD[decoder.task]).items()}


def export_decoder(decoder: DPTDecoder, path) -> Path:
    """Write `decoder` as an official-layout `.npz` (atomically); `load_decoder` reads it back."""
    return write_npz(Path(path), scenic_state(decoder))

