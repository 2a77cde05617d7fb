"""What the official TIPS / TIPSv2 tower files must hold: the expected keys and shapes of each
model size, the size a file looks like, a key-by-key description of a mismatch, validation of a
vision or text dict, and the conversion of names between the official layout and tipslab's towers
(see `official` for the layouts themselves, loading and exporting)."""

from __future__ import annotations

import math
import re

import torch

from tipslab.errors import TipslabError
from tipslab.modules.checkpoint import describe_mismatch
from tipslab.modules.text import TEXT_SIZES, TextTower
from tipslab.modules.vision import PATCH_SIZE, VISION_SIZES, VisionTower

TEMPERATURE_KEYS = ("temperature", "temperature_contrastive")
OFFICIAL_VOCAB = 32000
DEFAULT_TEMPERATURE = 0.07  # only when a file carries none (documented in official.load_hf_safetensors)


# ------------------------------------------------------------------------------ key checks
def _shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in state.items()}


def _block_count(keys, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = [int(m.group(1)) for k in keys if (m := pattern.match(k))]
    return max(indices) + 1 if indices else 0


def _looks_like_text(keys) -> bool:
    return any(k.startswith(("token_embedding.", "transformer.resblocks.", "ln_final.")) for k in keys)


def _looks_like_vision(keys) -> bool:
    return any(k.startswith(("patch_embed.", "blocks.", "register_tokens", "cls_token")) for k in keys)


def _first_dim(state, candidates: list[tuple[str, int]]):
    for key, axis in candidates:
        if key in state and state[key].ndim > axis:
            return int(state[key].shape[axis])
    return None


def infer_vision_size(state: dict[str, torch.Tensor]) -> tuple[str | None, str]:
    """(size or None, a description such as 'width 768, 12 blocks') from an official vision dict."""
    width = _first_dim(state, [("norm.weight", 0), ("patch_embed.proj.weight", 0), ("cls_token", 2), ("mask_token", 1)])
    depth = _block_count(state, "blocks.")
    description = f"width {width}, {depth} blocks"
    for size, arch in VISION_SIZES.items():
        if arch["embed_dim"] == width and arch["depth"] == depth:
            return size, description
    for size, arch in VISION_SIZES.items():  # a truncated file: the width still tells
        if arch["embed_dim"] == width:
            return size, description
    return None, description


def infer_text_size(state: dict[str, torch.Tensor]) -> tuple[str | None, str]:
    width = _first_dim(state, [("ln_final.weight", 0), ("token_embedding.weight", 1)])
    layers = _block_count(state, "transformer.resblocks.")
    description = f"width {width}, {layers} layers"
    for size, arch in TEXT_SIZES.items():
        if arch["width"] == width and arch["layers"] == layers:
            return size, description
    for size, arch in TEXT_SIZES.items():
        if arch["width"] == width:
            return size, description
    return None, description


def _looks(size: str | None, description: str) -> str:
    return f"the file looks like size {size!r} ({description})" if size else f"the file matches no known size ({description})"


# ------------------------------------------------------------------------------ vision
def _is_swiglu(size: str) -> bool:
    return bool(VISION_SIZES[size].get("swiglu"))


def official_vision_state(tower: VisionTower) -> dict[str, torch.Tensor]:
    """The tower's weights in the official (DINOv2) layout."""
    if tower.stem != "patch":
        raise TipslabError(f"a vision tower with model.vision.stem={tower.stem!r} has no official layout (the "
                           "official towers have a 14-px linear patch embedding); save it as a tipslab checkpoint")
    out: dict[str, torch.Tensor] = {}
    swiglu = _is_swiglu(tower.size)
    for key, value in tower.state_dict().items():
        if key == "mask_token":
            out["mask_token"] = value
        elif key == "vit.cls_token":
            out["cls_token"] = value
        elif key == "vit.reg_token":
            out["register_tokens"] = value
        elif key == "vit.pos_embed":
            # The CLS position is already inside cls_token (folded on load): a zero row keeps
            # official code, which adds pos_embed[:, 0] to the CLS, computing the same thing.
            out["pos_embed"] = torch.cat([torch.zeros_like(value[:, :1]), value], dim=1)
        elif key.startswith("vit."):
            name = key[len("vit.") :]
            if swiglu:
                name = name.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3.")
            out[name] = value
        else:  # pragma: no cover - a new parameter the layout does not know
            raise TipslabError(f"vision tower key {key} has no place in the official layout")
    return out


def expected_vision_shapes(size: str, pos_grid: int) -> dict[str, tuple]:
    with torch.device("meta"):
        tower = VisionTower(size, img_size=pos_grid * PATCH_SIZE)
    return _shapes(official_vision_state(tower))


def _chosen_size(source: str, tower: str, size: str | None, known, guess: str | None, description: str) -> str:
    """The size asked for (if known) or the one the file's shapes point to; else a clear error."""
    if size is not None and size not in known:
        raise TipslabError(f"{source}: {tower} size {size!r} is not known; expected one of {', '.join(known)}")
    size = size or guess
    if size is None:
        raise TipslabError(f"{source}: not a TIPS {tower} tower of a known size; {_looks(guess, description)}")
    return size


def vision_size_and_grid(state: dict[str, torch.Tensor], source: str, size: str | None = None) -> tuple[str, int]:
    """Validate an official vision dict; return its size and position grid side."""
    keys = list(state)
    if _looks_like_text(keys) and not _looks_like_vision(keys):
        raise TipslabError(f"{source}: this is a TIPS text tower file (has token_embedding / transformer.resblocks), "
                           "expected the vision file")
    guess, description = infer_vision_size(state)
    size = _chosen_size(source, "vision", size, VISION_SIZES, guess, description)
    pos = state.get("pos_embed")
    tokens = int(pos.shape[1]) - 1 if pos is not None and pos.ndim == 3 else None
    grid = int(round(math.sqrt(tokens))) if tokens and tokens > 0 else 0
    if pos is not None and (grid * grid != tokens):
        raise TipslabError(f"{source}: pos_embed {tuple(pos.shape)} is not 1 + a square grid of patch positions")
    if grid == 0:
        grid = 32  # pos_embed missing: compare against the TIPSv2 grid so the message lists it
    problems = describe_mismatch(expected_vision_shapes(size, grid), _shapes(state))
    if problems:
        raise TipslabError(f"{source}: not a TIPS vision tower of size {size!r}: {problems}; {_looks(guess, description)}")
    return size, grid


def tipslab_vision_state(state: dict[str, torch.Tensor], size: str) -> dict[str, torch.Tensor]:
    """An official vision dict (already validated) converted to VisionTower's names."""
    out = {}
    swiglu = _is_swiglu(size)
    for key, value in state.items():
        if key == "cls_token":
            out["vit.cls_token"] = value + state["pos_embed"][:, :1]
        elif key == "pos_embed":
            out["vit.pos_embed"] = value[:, 1:]
        elif key == "register_tokens":
            out["vit.reg_token"] = value
        elif key == "mask_token":
            out["mask_token"] = value
        else:
            if swiglu:
                key = key.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2.")
            out["vit." + key] = value
    return out


# ------------------------------------------------------------------------------ text
def expected_text_shapes(size: str, vocab_size: int) -> dict[str, tuple]:
    with torch.device("meta"):
        tower = TextTower(size, vocab_size=vocab_size)
    return _shapes(tower.state_dict())


def split_temperature(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], float | None]:
    """(weights without the temperature, temperature or None)."""
    state = dict(state)
    temperature = None
    for key in TEMPERATURE_KEYS:
        if key in state:
            value = state.pop(key)
            if value.numel() != 1:
                raise TipslabError(f"text weights: {key} has shape {tuple(value.shape)}, expected a scalar")
            temperature = float(value.reshape(()).double()) if not value.is_meta else DEFAULT_TEMPERATURE
    return state, temperature


def text_size(state: dict[str, torch.Tensor], source: str, size: str | None = None) -> tuple[str, int]:
    """Validate an official text dict (temperature removed); return its size and vocabulary."""
    keys = list(state)
    if _looks_like_vision(keys) and not _looks_like_text(keys):
        raise TipslabError(f"{source}: this is a TIPS vision tower file (has patch_embed / blocks), expected the text file")
    guess, description = infer_text_size(state)
    size = _chosen_size(source, "text", size, TEXT_SIZES, guess, description)
    embedding = state.get("token_embedding.weight")
    vocab = int(embedding.shape[0]) if embedding is not None and embedding.ndim == 2 else OFFICIAL_VOCAB
    problems = describe_mismatch(expected_text_shapes(size, vocab), _shapes(state))
    if problems:
        raise TipslabError(f"{source}: not a TIPS text tower of size {size!r}: {problems}; {_looks(guess, description)}")
    return size, vocab


def official_text_state(tower: TextTower, temperature: torch.Tensor | float | None = None) -> dict[str, torch.Tensor]:
    out = dict(tower.state_dict())  # module names are the official ones
    if temperature is not None:
        # float64: log(1 / temperature) then gives back the float32 logit_scale exactly.
        out["temperature"] = torch.as_tensor(temperature, dtype=torch.float64).reshape(())
    return out
