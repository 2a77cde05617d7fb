"""Which model an index was built with: the weights file of a model path, its sha256 and the
identity block kept in the manifest, a copy of the model kept inside the index (``model/``), and
loading that model again for queries, refusing weights that changed since the index was built."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from tipslab.errors import TipslabError
from tipslab.retrieval.index_layout import MANIFEST


def _weights_file(model_path: Path) -> Path | None:
    if model_path.is_file():
        return model_path
    candidate = model_path / "model.safetensors"
    return candidate if candidate.is_file() else None


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def model_identity(model_path: str | os.PathLike) -> dict:
    """Where the model is and which weights it holds (sha256 of model.safetensors)."""
    path = Path(model_path).expanduser()
    if not path.exists():
        # A release name (resolved by load_model); nothing on disk to hash.
        return {"source": str(model_path), "path": None, "weights": None, "sha256": None}
    path = path.resolve()
    weights = _weights_file(path)
    info = {"source": str(model_path), "path": str(path), "weights": None, "sha256": None}
    if weights is not None:
        stat = weights.stat()
        info.update(weights=weights.name, sha256=sha256_file(weights), bytes=stat.st_size, mtime_ns=stat.st_mtime_ns)
    return info


def model_cfg_dict(model_cfg) -> dict | None:
    if model_cfg is None:
        return None
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(model_cfg, DictConfig):
            return OmegaConf.to_container(model_cfg, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is part of the stack
        pass
    return json.loads(json.dumps(model_cfg, default=str))


BUNDLED_MODEL = "model"  # the index's own copy of a tipslab checkpoint directory


def bundle_model(model_path, index_root: Path) -> bool:
    """Put the files of a tipslab checkpoint directory under ``index_root/model``, so the index
    still answers text queries after the model moves or is retrained. Hard links when the
    filesystem allows (checkpoints are replaced by rename, never rewritten in place, so a link
    keeps the old weights), copies otherwise. Official files and release names are not copied."""
    import shutil

    from tipslab.modules.checkpoint import is_checkpoint_dir

    source = Path(model_path).expanduser()
    if not is_checkpoint_dir(source):
        return False
    target = index_root / BUNDLED_MODEL
    target.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.is_file():
            try:
                os.link(item, target / item.name)
            except OSError:
                shutil.copy2(item, target / item.name)
    return True


def _check_weights(info: dict, path: Path, where: Path, what: str) -> None:
    weights = _weights_file(path)
    if info.get("sha256") and weights is not None:
        stat = weights.stat()
        # Hash only when the file looks changed: hashing GBs of weights on every query is slow.
        if stat.st_size != info.get("bytes") or stat.st_mtime_ns != info.get("mtime_ns"):
            if sha256_file(weights) != info["sha256"]:
                raise TipslabError(f"{what} {weights} does not match the model the index at {where} was built with "
                                   f"(sha256 {info['sha256'][:12]}...); give that model or rebuild the index")


def load_indexed_model(manifest: dict, where: Path, device: str | None = None, model=None):
    """The model the index was built with: ``model`` when given (a path or release name, e.g.
    `tipslab search --model`), else the index's own copy, else the manifest's path. Weights that
    differ from the ones the index was built with are refused."""
    from tipslab.modules.api import load_model

    info = manifest["model"]
    source = info.get("path") or info.get("source")
    if model is not None:
        source = str(model)
        path = Path(source).expanduser()
        if path.exists():
            _check_weights(info, path, where, "--model")
        elif info.get("sha256"):
            raise TipslabError(f"--model {model}: does not exist (expected the model directory the index "
                               f"at {where} was built with)")
    elif (where / BUNDLED_MODEL).is_dir():
        source = str(where / BUNDLED_MODEL)
        _check_weights(info, where / BUNDLED_MODEL, where, "the index's copy of its model,")
    elif info.get("path"):
        path = Path(info["path"])
        if not path.exists():
            raise TipslabError(f"{where}/{MANIFEST}: model.path {path} does not exist any more "
                               "(the index needs the model it was built with to embed queries; "
                               "pass it with --model)")
        _check_weights(info, path, where, "model.path")
    loaded = load_model(source)
    if device is not None:
        loaded.encoder.to(device)
    return loaded


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
