"""Image-text retrieval R@1/5/10 in both directions, for CLS1 and CLS2 (TIPSv2 reports CLS2 for
long captions): Karpathy-split JSON files (Flickr30k, COCO) and the built-in scenes captions.

A Karpathy file is `{"images": [{"filename", "filepath"?, "split", "sentences": [{"raw"}]}]}`;
images are looked up as `<root>/<filepath>/<filename>`, `<root>/<filename>` or
`<root>/images/<filename>`, root being `images_root` or the JSON file's folder. The `test` split
(1000 Flickr30k / 5000 COCO images, 5 captions each) is the paper's.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from tipslab.errors import TipslabError


def _device(encoder) -> torch.device:
    return next((p.device for p in encoder.parameters()), torch.device("cpu"))


@torch.no_grad()
def image_features(encoder, images, batch_size: int = 32) -> dict[str, torch.Tensor]:
    """Normalised CLS1 / CLS2 [N, D] of an iterable of preprocessed [3, S, S] tensors."""
    cls1, cls2, batch = [], [], []

    def flush():
        out = encoder.encode_image(torch.stack(batch).to(_device(encoder)), dense=False)
        cls1.append(F.normalize(out.cls1.float(), dim=-1).cpu())
        cls2.append(F.normalize(out.cls2.float(), dim=-1).cpu())
        batch.clear()

    for image in images:
        batch.append(image)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    return {"cls1": torch.cat(cls1), "cls2": torch.cat(cls2)}


@torch.no_grad()
def text_features(encoder, tokenizer, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    device = _device(encoder)
    chunks = [encoder.encode_text(tokenizer(texts[i : i + batch_size]).to(device)).float()
              for i in range(0, len(texts), batch_size)]
    return F.normalize(torch.cat(chunks), dim=-1).cpu()


def load_karpathy(path: str | Path, split: str = "test", images_root: str | Path | None = None,
                  limit: int | None = None) -> tuple[list[Path], list[str], torch.Tensor]:
    """(image paths, captions, caption -> image index) of one split of a Karpathy JSON file."""
    path = Path(path).expanduser()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        entries = [e for e in data["images"] if e.get("split") == split]
    except FileNotFoundError:
        raise TipslabError(f"retrieval data {path}: does not exist (expected a Karpathy-split JSON file)") from None
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise TipslabError(f"retrieval data {path}: not a Karpathy-split JSON file "
                           "(expected {\"images\": [{\"filename\", \"split\", \"sentences\": [{\"raw\"}]}]})") from None
    if not entries:
        raise TipslabError(f"retrieval data {path}: no images in split {split!r}")
    entries = entries[:limit] if limit else entries
    root = Path(images_root).expanduser() if images_root else path.parent
    paths, texts, owner = [], [], []
    for i, entry in enumerate(entries):
        tries = [root / entry.get("filepath", "") / entry["filename"], root / entry["filename"],
                 root / "images" / entry["filename"]]
        found = next((p for p in tries if p.is_file()), None)
        if found is None:
            raise TipslabError(f"retrieval data {path}: image {entry['filename']} not found under {root}")
        paths.append(found)
        for sentence in entry["sentences"]:
            texts.append(str(sentence["raw"]).strip())
            owner.append(i)
    return paths, texts, torch.tensor(owner)


def read_images(paths, preprocess):
    """Preprocessed tensors of image files, read one at a time (a generator: ImageNet-sized
    folders never sit in memory)."""
    from PIL import Image

    for p in paths:
        with Image.open(p) as image:
            yield preprocess(image.convert("RGB"))


def scenes_captions(num_images: int, image_size: int, seed: int, granularities=("short", "long")):
    """(images [3,S,S] list, captions, caption -> image) of scenes val: one caption per granularity."""
    from tipslab.datamodules.scenes import ScenesDataset

    val = ScenesDataset("val", num_images=num_images, image_size=image_size, seed=seed)
    images, texts, owner = [], [], []
    for i in range(len(val)):
        sample = val[i]
        images.append(sample["image"])
        for g in granularities:
            texts.append(sample["captions"][g])
            owner.append(i)
    return images, texts, torch.tensor(owner)


@torch.no_grad()
def evaluate_retrieval(loaded, images, texts: list[str], owner: torch.Tensor) -> dict[str, dict[str, float]]:
    """{"cls1": {i2t_R@1, ...}, "cls2": {...}, "chance": {...}} for preprocessed images and captions."""
    from tipslab.platform.eval_metrics import retrieval_chance, retrieval_recalls

    encoder = loaded.encoder
    was_training = encoder.training
    encoder.eval()
    feats = image_features(encoder, images)
    text = text_features(encoder, loaded.tokenizer, texts)
    encoder.train(was_training)
    out = {name: retrieval_recalls(feats[name] @ text.T, owner) for name in ("cls1", "cls2")}
    out["chance"] = retrieval_chance(owner, len(feats["cls1"]))
    return out
