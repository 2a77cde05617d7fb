"""Which model an index was built with: the weights file of a model path, its sha256 and the
identity block kept in the manifest, and loading that model again for queries, refusing weights
that changed since the index was built."""

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


def load_indexed_model(manifest: dict, where: Path, device: str | None = None):
    """The manifest's model, refusing weights that differ from the ones the index was built with."""
    from tipslab.modules.api import load_model

    info = manifest["model"]
    source = info.get("path") or info.get("source")
    if info.get("path"):
        path = Path(info["path"])
        if not path.exists():
            raise TipslabError(f"{where}/{MANIFEST}: model.path {path} does not exist any more "
                               "(the index needs the model it was built with to embed queries)")
        weights = _weights_file(path)
        if info.get("sha256") and weights is not None:
            stat = weights.stat()
            # Hash only when the file looks changed: hashing GBs of weights on every query is slow.
            if stat.st_size != info.get("bytes") or stat.st_mtime_ns != info.get("mtime_ns"):
                if sha256_file(weights) != info["sha256"]:
                    raise TipslabError(f"{where}/{MANIFEST}: {weights} no longer matches the index's model "
                                       f"(sha256 {info['sha256'][:12]}...); rebuild the index with `tipslab index`")
    loaded = load_model(source)
    if device is not None:
        loaded.encoder.to(device)
    return loaded


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
