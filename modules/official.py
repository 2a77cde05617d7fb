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
The key and shape tables, size inference, validation and name conversion are in `official_layout`.
"""

from __future__ import annotations

import math
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from tipslab.atomic import atomic_write
from tipslab.errors import TipslabError
from tipslab.modules.official_layout import (
    DEFAULT_TEMPERATURE,
    official_text_state,
    official_vision_state,
    split_temperature,
    text_size,
    tipslab_vision_state,
    vision_size_and_grid,
)
from tipslab.modules.text import TextTower
from tipslab.modules.vision import PATCH_SIZE, VisionTower

HF_VISION, HF_TEXT = "vision_encoder.", "text_encoder."
OFFICIAL_CONTEXT = 64
TOKENIZER_FILE = "tokenizer.model"

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


# ------------------------------------------------------------------------------ towers
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


def text_from_official(state: dict[str, torch.Tensor], source: str = "text weights",
                       size: str | None = None) -> tuple[TextTower, float | None]:
    state, temperature = split_temperature(state)
    size, vocab = text_size(state, source, size)
    with torch.device("meta"):
        tower = TextTower(size, vocab_size=vocab, context_length=OFFICIAL_CONTEXT)
    converted = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state.items()}
    tower.load_state_dict(converted, strict=True, assign=True)
    return tower, temperature


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
