"""The official TIPS / TIPSv2 checkpoint layouts: load them into tipslab encoders, export back.

Two layouts (google-deepmind/tips, Hugging Face `google/tipsv2-*`):

- one `.npz` per tower, keys named as the official PyTorch modules. Vision (DINOv2 names):
  `cls_token (1,1,D)`, `pos_embed (1,1+N,D)` (its first row is the CLS position),
  `register_tokens (1,1,D)`, `mask_token (1,D)`, `patch_embed.proj.*`,
  `blocks.i.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1|w12, mlp.fc2|w3, ls2.gamma}`,
  `norm.*`. Text: `token_embedding.weight`, `transformer.resblocks.i.*`, `ln_final.*` and a
  scalar `temperature` (Scenic exports: `temperature_contrastive`).
- one `.safetensors` with the same names under `vision_encoder.` / `text_encoder.` and the
  temperature as `temperature`.

Conversion to timm's layout (what our VisionTower holds) is the one timm's
`_convert_dinov2` does: the CLS position row is folded into `cls_token` (timm adds no position to
prefix tokens), `register_tokens` becomes `reg_token`, SwiGLU `w12`/`w3` become `fc1`/`fc2`.
Export writes the folded CLS with a zero CLS position row: the outputs are identical, and
official -> tipslab -> official -> tipslab is bit-exact. The temperature is written as float64 so
`logit_scale = log(1 / temperature)` survives the round trip exactly.

Every file is validated key by key and shape by shape before anything is loaded; a mismatch
names the missing, unexpected and mis-shaped keys and the model size the file looks like.
Files are read without pickle (`np.load(allow_pickle=False)`, safetensors) and written atomically.
"""

from __future__ import annotations

import math
import os
import re
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from tipslab.atomic import atomic_write
from tipslab.errors import TipslabError
from tipslab.modules.checkpoint import describe_mismatch
from tipslab.modules.text import TEXT_SIZES, TextTower
from tipslab.modules.vision import PATCH_SIZE, VISION_SIZES, VisionTower

TEMPERATURE_KEYS = ("temperature", "temperature_contrastive")
HF_VISION, HF_TEXT = "vision_encoder.", "text_encoder."
OFFICIAL_VOCAB = 32000
OFFICIAL_CONTEXT = 64
TOKENIZER_FILE = "tokenizer.model"
DEFAULT_TEMPERATURE = 0.07  # only when a file carries none (documented in load_hf_safetensors)

# Release names -> files expected in $TIPSLAB_WEIGHTS_DIR/<name>/ (pytorch .npz pair) and the
# resolution the official demos run them at (README: 448, 224 for low-res models).
RELEASES: dict[str, dict] = {
    "tipsv2-b14": dict(stem="tips_v2_oss_b14", size="b", img_size=448),
    "tipsv2-l14": dict(stem="tips_v2_oss_l14", size="l", img_size=448),
    "tipsv2-so400m14": dict(stem="tips_v2_oss_so14", size="so400m", img_size=448),
    "tipsv2-g14": dict(stem="tips_v2_oss_g14", size="g", img_size=448),
    "tips-s14": dict(stem="tips_oss_s14_highres_distilled", size="s", img_size=448),
    "tips-b14": dict(stem="tips_oss_b14_highres_distilled", size="b", img_size=448),
    "tips-l14": dict(stem="tips_oss_l14_highres_distilled", size="l", img_size=448),
    "tips-so400m14": dict(stem="tips_oss_so400m14_highres_largetext_distilled", size="so400m", img_size=448),
    "tips-g14-highres": dict(stem="tips_oss_g14_highres", size="g", img_size=448),
    "tips-g14-lowres": dict(stem="tips_oss_g14_lowres", size="g", img_size=224),
}


# ------------------------------------------------------------------------------ file i/o
def read_npz(path: Path, role: str) -> dict[str, torch.Tensor]:
    """All arrays of an `.npz`, read eagerly (a truncated member fails here, not later)."""
    path = Path(path)
    if not path.is_file():
        raise TipslabError(f"{role} file {path}: no such file")
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise TipslabError(f"{role} file {path}: a single .npy array, expected an .npz archive of named weights")
        with data:
            # Each data[key] is a fresh, writable array read from the archive: no copy needed.
            return {key: torch.from_numpy(np.ascontiguousarray(data[key])) for key in data.files}
    except (zipfile.BadZipFile, EOFError, zlib.error, OSError, ValueError, KeyError) as err:
        raise TipslabError(
            f"{role} file {path}: not a readable .npz (truncated or not an npz: {str(err).splitlines()[0] or type(err).__name__})"
        ) from None


def read_safetensors(path: Path, role: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise TipslabError(f"{role} file {path}: no such file")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise TipslabError(
            f"{role} file {path}: not a readable safetensors file (truncated or corrupt: {str(err).splitlines()[0]})"
        ) from None


def write_npz(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    arrays = {k: v.detach().cpu().contiguous().numpy() for k, v in tensors.items()}

    def write(tmp):
        # A file handle, not a name: np.savez would append ".npz" to the temp name.
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)

    return atomic_write(path, write)


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))


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


def vision_size_and_grid(state: dict[str, torch.Tensor], source: str, size: str | None = None) -> tuple[str, int]:
    """Validate an official vision dict; return its size and position grid side."""
    keys = list(state)
    if _looks_like_text(keys) and not _looks_like_vision(keys):
        raise TipslabError(f"{source}: this is a TIPS text tower file (has token_embedding / transformer.resblocks), "
                           "expected the vision file")
    guess, description = infer_vision_size(state)
    if size is not None and size not in VISION_SIZES:
        raise TipslabError(f"{source}: vision size {size!r} is not known; expected one of {', '.join(VISION_SIZES)}")
    size = size or guess
    if size is None:
        raise TipslabError(f"{source}: not a TIPS vision tower of a known size; {_looks(guess, description)}")
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


def vision_from_official(state: dict[str, torch.Tensor], source: str = "vision weights", size: str | None = None,
                         img_size: int | None = None) -> VisionTower:
    """A VisionTower holding an official vision dict (meta tensors give a meta tower)."""
    size, grid = vision_size_and_grid(state, source, size)
    # Built on the meta device and given the file's tensors: no random init of weights that
    # are overwritten anyway, and no second copy of a large model in memory.
    with torch.device("meta"):
        tower = VisionTower(size, img_size=img_size or grid * PATCH_SIZE, pos_grid=grid)
    converted = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in tipslab_vision_state(state, size).items()}
    tower.load_state_dict(converted, strict=True, assign=True)
    return tower


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
    if size is not None and size not in TEXT_SIZES:
        raise TipslabError(f"{source}: text size {size!r} is not known; expected one of {', '.join(TEXT_SIZES)}")
    size = size or guess
    if size is None:
        raise TipslabError(f"{source}: not a TIPS text tower of a known size; {_looks(guess, description)}")
    embedding = state.get("token_embedding.weight")
    vocab = int(embedding.shape[0]) if embedding is not None and embedding.ndim == 2 else OFFICIAL_VOCAB
    problems = describe_mismatch(expected_text_shapes(size, vocab), _shapes(state))
    if problems:
        raise TipslabError(f"{source}: not a TIPS text tower of size {size!r}: {problems}; {_looks(guess, description)}")
    return size, vocab


def text_from_official(state: dict[str, torch.Tensor], source: str = "text weights",
                       size: str | None = None) -> tuple[TextTower, float | None]:
    state, temperature = split_temperature(state)
    size, vocab = text_size(state, source, size)
    with torch.device("meta"):
        tower = TextTower(size, vocab_size=vocab, context_length=OFFICIAL_CONTEXT)
    converted = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state.items()}
    tower.load_state_dict(converted, strict=True, assign=True)
    return tower, temperature


def official_text_state(tower: TextTower, temperature: torch.Tensor | float | None = None) -> dict[str, torch.Tensor]:
    out = dict(tower.state_dict())  # module names are the official ones
    if temperature is not None:
        # float64: log(1 / temperature) then gives back the float32 logit_scale exactly.
        out["temperature"] = torch.as_tensor(temperature, dtype=torch.float64).reshape(())
    return out


# ------------------------------------------------------------------------------ encoders
def _model_cfg(encoder, tokenizer: str | None) -> dict:
    vision, text = encoder.vision, encoder.text
    return {
        "vision": {"size": vision.size, "img_size": vision.img_size, "drop_path_rate": 0.0, "pos_grid": vision.pos_grid},
        "text": {"size": text.size, "vocab_size": text.vocab_size, "context_length": OFFICIAL_CONTEXT},
        "tokenizer": {"kind": "sentencepiece", "path": str(tokenizer) if tokenizer else None,
                      "context_length": OFFICIAL_CONTEXT},
        "temperature": float(encoder.temperature.double().item()) if not encoder.logit_scale.is_meta else None,
    }


def encoder_from_official(vision_state, text_state, *, vision_source="vision weights", text_source="text weights",
                          size: str | None = None, img_size: int | None = None, temperature: float | None = None,
                          tokenizer: str | None = None):
    """(ImageTextEncoder, model_cfg) from official vision and text dicts."""
    from tipslab.modules.encoder import ImageTextEncoder

    vision = vision_from_official(vision_state, vision_source, size=size, img_size=img_size)
    text, file_temperature = text_from_official(text_state, text_source, size=size)
    if vision.embed_dim != text.width:
        raise TipslabError(f"{vision_source} (width {vision.embed_dim}) and {text_source} (width {text.width}) "
                           "are towers of different model sizes")
    temperature = temperature or file_temperature or DEFAULT_TEMPERATURE
    meta = vision.mask_token.is_meta
    with torch.device("meta" if meta else "cpu"):
        encoder = ImageTextEncoder(vision, text, temperature=0.07)
    if not meta:
        with torch.no_grad():
            # In float64, so the temperature written on export comes back bit-exact.
            encoder.logit_scale.copy_(torch.tensor([math.log(1.0 / temperature)], dtype=torch.float64))
    return encoder, _model_cfg(encoder, tokenizer)


def load_official_npz(vision_path, text_path, *, size=None, img_size=None, tokenizer=None):
    vision_path, text_path = Path(vision_path), Path(text_path)
    vision_state = read_npz(vision_path, "vision")
    text_state = read_npz(text_path, "text")
    return encoder_from_official(vision_state, text_state, vision_source=str(vision_path), text_source=str(text_path),
                                 size=size, img_size=img_size, tokenizer=tokenizer)


def split_hf(state: dict[str, torch.Tensor], source: str) -> tuple[dict, dict, float | None]:
    vision = {k[len(HF_VISION) :]: v for k, v in state.items() if k.startswith(HF_VISION)}
    text = {k[len(HF_TEXT) :]: v for k, v in state.items() if k.startswith(HF_TEXT)}
    rest = {k: v for k, v in state.items() if not k.startswith((HF_VISION, HF_TEXT))}
    if not vision or not text:
        found = ", ".join(sorted({k.split(".")[0] for k in state})[:5]) or "nothing"
        raise TipslabError(f"{source}: not a TIPSv2 Hugging Face file (expected keys under {HF_VISION!r} and "
                           f"{HF_TEXT!r}; found {found})")
    temperature = None
    for key in ("temperature", "text_encoder.temperature", "temperature_contrastive", "logit_scale"):
        holder = text if key.startswith(HF_TEXT) else rest
        name = key[len(HF_TEXT) :] if key.startswith(HF_TEXT) else key
        if name in holder:
            value = holder.pop(name)
            if value.numel() != 1:
                raise TipslabError(f"{source}: {key} has shape {tuple(value.shape)}, expected a scalar")
            scalar = float(value.reshape(()).double())
            temperature = math.exp(-scalar) if key == "logit_scale" else scalar
    if rest:
        raise TipslabError(f"{source}: unexpected keys outside {HF_VISION!r}/{HF_TEXT!r}: {', '.join(sorted(rest)[:3])}")
    return vision, text, temperature


def load_hf_safetensors(path, *, size=None, img_size=None, tokenizer=None):
    """(encoder, model_cfg) from a Hugging Face TIPSv2 `model.safetensors`.

    The temperature is read from `temperature` (or `logit_scale`); a file with neither gets
    DEFAULT_TEMPERATURE, which only scales similarity probabilities, not rankings.
    """
    path = Path(path)
    state = read_safetensors(path, "model")
    vision, text, temperature = split_hf(state, str(path))
    return encoder_from_official(vision, text, vision_source=f"{path} [{HF_VISION}*]", text_source=f"{path} [{HF_TEXT}*]",
                                 size=size, img_size=img_size, temperature=temperature, tokenizer=tokenizer)


def export_official_npz(encoder, vision_path, text_path) -> tuple[Path, Path]:
    """Write the encoder as the official `.npz` pair (atomically, each file)."""
    vision = write_npz(Path(vision_path), official_vision_state(encoder.vision))
    text = write_npz(Path(text_path), official_text_state(encoder.text, encoder.temperature.detach().double()))
    return vision, text


def hf_state(encoder) -> dict[str, torch.Tensor]:
    out = {HF_VISION + k: v for k, v in official_vision_state(encoder.vision).items()}
    out.update({HF_TEXT + k: v for k, v in official_text_state(encoder.text).items()})
    out["temperature"] = encoder.temperature.detach().double().reshape(())
    return out


def export_hf_safetensors(encoder, path) -> Path:
    return write_safetensors(Path(path), hf_state(encoder))


# ------------------------------------------------------------------------------ finding files
def weights_dir() -> Path | None:
    value = os.environ.get("TIPSLAB_WEIGHTS_DIR")
    return Path(value).expanduser() if value else None


def _release_files(name: str) -> tuple[Path, dict]:
    release = RELEASES[name]
    root = weights_dir()
    stem = release["stem"]
    wanted = f"{stem}_vision.npz, {stem}_text.npz and {TOKENIZER_FILE} (or a Hugging Face model.safetensors + {TOKENIZER_FILE})"
    if root is None:
        raise TipslabError(f"model {name!r} is an official release: set TIPSLAB_WEIGHTS_DIR and put {wanted} "
                           f"in $TIPSLAB_WEIGHTS_DIR/{name}/ (downloads: github.com/google-deepmind/tips)")
    folder = root / name
    if not folder.is_dir():
        raise TipslabError(f"model {name!r}: {folder} does not exist; put {wanted} there "
                           "(downloads: github.com/google-deepmind/tips)")
    return folder, release


def _find_tokenizer(folder: Path, given) -> Path:
    if given:
        path = Path(given).expanduser()
        if not path.is_file():
            raise TipslabError(f"tokenizer {path}: no such SentencePiece model file")
        return path
    path = folder / TOKENIZER_FILE
    if not path.is_file():
        raise TipslabError(f"{folder}: no {TOKENIZER_FILE} beside the official weights; put the SentencePiece "
                           "tokenizer there or pass tokenizer=PATH (--tokenizer)")
    return path


def _pair_in(folder: Path, stem: str | None = None) -> tuple[Path, Path] | None:
    if stem:
        vision, text = folder / f"{stem}_vision.npz", folder / f"{stem}_text.npz"
        return (vision, text) if vision.is_file() and text.is_file() else None
    visions = sorted(folder.glob("*_vision.npz"))
    if len(visions) > 1:
        raise TipslabError(f"{folder}: holds several *_vision.npz files ({', '.join(p.name for p in visions[:3])}); "
                           "give the vision file itself")
    if not visions:
        return None
    text = visions[0].with_name(visions[0].name[: -len("_vision.npz")] + "_text.npz")
    if not text.is_file():
        raise TipslabError(f"{folder}: {visions[0].name} has no matching {text.name}")
    return visions[0], text


def is_official_path(path) -> bool:
    path = Path(path)
    if path.is_dir():
        return bool(list(path.glob("*_vision.npz"))) or (path / "model.safetensors").is_file()
    return path.suffix in (".npz", ".safetensors")


def load_official_model(name_or_path, *, text=None, tokenizer=None, size=None, img_size=None):
    """(encoder, model_cfg) from a release name, an official directory, a vision `.npz` (with
    `text=`), or a Hugging Face `.safetensors` file. The tokenizer is `tokenizer=` or the
    `tokenizer.model` beside the weights."""
    name = str(name_or_path)
    release = None
    if name in RELEASES:
        folder, release = _release_files(name)
        path = folder
        size = size or release["size"]
        img_size = img_size or release["img_size"]
    else:
        path = Path(name).expanduser()
        if not path.exists():
            known = ", ".join(RELEASES)
            raise TipslabError(f"model {name!r}: no such file or directory, and not a release name ({known})")
    if path.is_dir():
        pair = _pair_in(path, release["stem"] if release else None)
        if pair is not None:
            vision_path, text_path = pair
        elif (path / "model.safetensors").is_file():
            return load_hf_safetensors(path / "model.safetensors", size=size, img_size=img_size,
                                       tokenizer=_find_tokenizer(path, tokenizer))
        else:
            what = f"{release['stem']}_vision.npz / _text.npz" if release else "*_vision.npz + *_text.npz"
            raise TipslabError(f"{path}: holds neither a tipslab checkpoint (model.yaml + model.safetensors), "
                               f"official TIPS weights ({what}) nor a Hugging Face model.safetensors")
    elif path.suffix == ".safetensors":
        return load_hf_safetensors(path, size=size, img_size=img_size, tokenizer=_find_tokenizer(path.parent, tokenizer))
    elif path.suffix == ".npz":
        vision_path = path
        if text:
            text_path = Path(text).expanduser()
        elif path.name.endswith("_vision.npz"):
            text_path = path.with_name(path.name[: -len("_vision.npz")] + "_text.npz")
            if not text_path.is_file():
                raise TipslabError(f"{path}: the text tower file {text_path.name} is not beside it; pass text=PATH (--text)")
        else:
            raise TipslabError(f"{path}: give the text tower file too: text=PATH (--text)")
    else:
        raise TipslabError(f"{path}: not a model: expected a tipslab checkpoint directory, official .npz files, "
                           "a Hugging Face .safetensors file or a release name")
    return load_official_npz(vision_path, text_path, size=size, img_size=img_size,
                             tokenizer=_find_tokenizer(vision_path.parent, tokenizer))
