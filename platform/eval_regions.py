"""Region retrieval on scenes val, through the real search path: the split is indexed with the
`tipslab index` code (`retrieval.index_dir.write_index`), once exact (Flat) and once compressed
(SQ4 by default), and every object class present is queried by name with `retrieval.search`,
scored relative to the background prompts as `tipslab search` scores (no threshold: R@k).

A query is found at k when one of its first k hits is a box of an object of the queried class in
that image with IoU >= 0.5. R@k is the share of queries found. Chance is measured, not assumed:
the same search with seeded random unit vectors as queries (a text tower that knows nothing).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from tipslab.retrieval.regions import box_iou

IOU_THRESHOLD = 0.5


def recall_of_hits(hits_per_query: list[list], truth: dict[str, dict[str, list]], ks) -> dict[str, float]:
    """hits_per_query[q]: ranked hits (`.query`, `.image_key`, `.box`); truth[class][image_key]:
    boxes of that class. R@k in percent."""
    found = {k: 0 for k in ks}
    for hits in hits_per_query:
        first = None
        for rank, hit in enumerate(hits, start=1):
            boxes = truth.get(hit.query, {}).get(hit.image_key, [])
            if any(box_iou(hit.box, box) >= IOU_THRESHOLD for box in boxes):
                first = rank
                break
        for k in ks:
            found[k] += first is not None and first <= k
    return {f"R@{k}": 100.0 * found[k] / max(len(hits_per_query), 1) for k in ks}


@torch.no_grad()
def evaluate_regions(loaded, *, num_images: int, image_size: int, seed: int, factories=("Flat", "SQ4"),
                     ks=(1, 5, 10), workdir: str | Path | None = None, keep_index: bool = False) -> dict:
    """{factory: {"R@1": ..., ...}, "chance": {...}, "queries": n, "index": path of the exact index}."""
    from tipslab.datamodules.scenes import ScenesDataset
    from tipslab.retrieval.extract import extract_patches, open_source
    from tipslab.retrieval.index_dir import write_index
    from tipslab.retrieval.model_identity import model_cfg_dict
    from tipslab.retrieval.search import NULL_PROMPTS, embed_text, logit_scale_of, search_by_vectors

    encoder = loaded.encoder
    was_training = encoder.training
    encoder.eval()
    spec = f"scenes:val:{num_images}"
    source = open_source(spec, image_size, scenes_seed=seed, workers=0)  # a few scenes, maybe mid-training: no processes
    records = list(extract_patches(encoder, source, feature="dense", batch_size=16, total=num_images, progress=False))
    val = ScenesDataset("val", num_images=num_images, image_size=image_size, seed=seed)
    truth: dict[str, dict[str, list]] = {}
    for i in range(len(val)):
        for obj in val.scene(i).objects:
            truth.setdefault(obj.class_name, {}).setdefault(f"scenes:val/{i:06d}", []).append(obj.bbox)
    queries = sorted(truth)
    vectors = embed_text(loaded, queries)
    # As `tipslab search` does: scored relative to the background prompts, every hit kept (R@k).
    calibration = dict(null_vectors=embed_text(loaded, NULL_PROMPTS, None), logit_scale=logit_scale_of(loaded),
                       threshold=None)
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(vectors.shape).astype(np.float32)
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    k = max(ks)
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="tipslab-eval-regions-"))
    model = {"source": "in-memory model under evaluation", "path": None, "weights": None, "sha256": None,
             "model_cfg": model_cfg_dict(loaded.model_cfg)}
    out: dict = {"queries": len(queries)}
    for factory in factories:
        index = write_index(iter(records), root / f"index-{factory.replace(',', '_')}", factory=factory,
                            image_size=image_size, model=model, source=None, overwrite=True, progress=False,
                            seed=seed)
        hits = search_by_vectors(index, vectors, k, queries=queries, **calibration)
        out[factory] = recall_of_hits(_per_query(hits, queries), truth, ks)
        if factory == factories[0]:
            chance_hits = search_by_vectors(index, noise, k, queries=queries, **calibration)
            out["chance"] = recall_of_hits(_per_query(chance_hits, queries), truth, ks)
            out["index"] = str(index.path)
    encoder.train(was_training)
    if not keep_index and workdir is None:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
        out.pop("index", None)
    return out


def _per_query(hits, queries) -> list[list]:
    grouped: dict[str, list] = {q: [] for q in queries}
    for hit in hits:
        grouped[hit.query].append(hit)
    return [grouped[q] for q in queries]
