"""Writing webdataset tar shards: ``shard-000000.tar``..., each complete before it is visible.

Per sample ``{key}``: ``{key}.png`` or ``.jpg`` and ``{key}.json`` = ``{"id", "captions",
"objects"?}`` (the layout `shards.ShardDataset` reads). `tipslab shards` (`shard_cli.py`) writes
them from folders and manifests; tests and the scenes export write them from samples.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from tipslab.errors import TipslabError

SHARD_PATTERN = "shard-{:06d}.tar"


def _image_bytes(image, fmt: str) -> bytes:
    """PNG/JPEG bytes of a PIL image, a uint8 [H,W,3] array or a float [3,H,W] tensor in [0,1]."""
    if isinstance(image, torch.Tensor):
        image = (image.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TipslabError(f"write_shards: image of type {type(image).__name__}; expected PIL, uint8 array or tensor")
    buffer = io.BytesIO()
    if fmt == "png":
        image.convert("RGB").save(buffer, format="PNG")
    else:
        image.convert("RGB").save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _tar_key(sample_id: str) -> str:
    # webdataset splits a member name at the first dot of its basename: keys must have none.
    return re.sub(r"[^A-Za-z0-9_\-]", "_", sample_id)


def write_shards(samples: Iterable[dict], out_dir: str | os.PathLike, samples_per_shard: int = 1000,
                 image_format: str = "png") -> list[Path]:
    """Write ``samples`` (dicts with ``id``, ``image``, ``captions`` and optional ``objects``) as shards.

    Each shard is written to a temporary name and renamed when complete, so a reader never sees a
    partial shard. Returns the shard paths in order.
    """
    if image_format not in ("png", "jpg"):
        raise TipslabError(f"write_shards: image_format={image_format!r}; expected 'png' or 'jpg'")
    if samples_per_shard < 1:
        raise TipslabError(f"write_shards: samples_per_shard={samples_per_shard}; expected at least 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    writer, tmp, count = None, None, 0
    seen: set[str] = set()

    def close() -> None:
        nonlocal writer
        if writer is not None:
            writer.close()
            final = out / SHARD_PATTERN.format(len(paths))
            os.replace(tmp, final)
            paths.append(final)
            writer = None

    try:
        for sample in samples:
            for field in ("id", "image", "captions"):
                if field not in sample:
                    raise TipslabError(f"write_shards: a sample lacks {field!r}; expected id, image and captions")
            key = _tar_key(str(sample["id"]))
            if key in seen:
                raise TipslabError(f"write_shards: sample id {sample['id']!r} gives key {key!r} twice; "
                                   "ids must be unique")
            seen.add(key)
            if writer is None:
                tmp = out / f".{SHARD_PATTERN.format(len(paths))}.tmp"
                # mtime fixed: the same samples give byte-identical shards.
                writer = wds.TarWriter(str(tmp), encoder=False, mtime=0)
                count = 0
            meta = {"id": str(sample["id"]), "captions": sample["captions"]}
            if sample.get("objects") is not None:
                meta["objects"] = sample["objects"]
            writer.write({
                "__key__": key,
                image_format: _image_bytes(sample["image"], image_format),
                "json": json.dumps(meta).encode("utf-8"),
            })
            count += 1
            if count >= samples_per_shard:
                close()
        close()
    finally:
        if writer is not None:  # an error mid-shard: leave no temporary file behind
            writer.close()
            Path(tmp).unlink(missing_ok=True)
    return paths


def write_scene_shards(dataset, out_dir: str | os.PathLike, samples_per_shard: int = 1000,
                       with_objects: bool = True, image_format: str = "png") -> list[Path]:
    """Write a `ScenesDataset` as shards, with per-object metadata (class, box, mask runs) if asked."""
    from tipslab.datamodules.scenes_export import rle_encode

    def samples():
        for index in range(len(dataset)):
            scene = dataset.scene(index)
            objects = None
            if with_objects:
                objects = [{"class_name": o.class_name, "bbox": list(o.bbox), "position": o.position,
                            "size": o.size, "texture": o.texture, "mask_rle": rle_encode(o.mask)}
                           for o in scene.objects]
            yield {"id": scene.id, "image": scene.image, "captions": scene.captions, "objects": objects}

    return write_shards(samples(), out_dir, samples_per_shard=samples_per_shard, image_format=image_format)
