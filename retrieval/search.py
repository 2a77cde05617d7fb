"""Region search: "find regions matching X" over an index directory.

query text -> text embedding (prompt templates averaged, as in the official zero-shot method)
-> FAISS top-K patches (K >> k) -> candidate images -> each candidate's full patch score map,
computed exactly from the stored float16 vectors (so compressed FAISS codes only pick the
candidates, never the final scores) -> connected regions -> hits ranked by region score.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tipslab.errors import TipslabError
from tipslab.retrieval.index_dir import IndexDirectory
from tipslab.retrieval.regions import box_iou, find_regions

# A small prompt ensemble in the spirit of TCL's set used by the official TIPS zero-shot
# segmentation notebook (which averages 9 templates); the exact official list was not checked.
DEFAULT_TEMPLATES = (
    "{}",
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
    "a photo of many {}.",
    "there is a {} in the scene.",
    "a cropped photo of the {}.",
    "a close-up photo of a {}.",
)


@dataclass
class Hit:
    """One region that matches a query."""

    rank: int  # 1-based, per query
    query: str
    image_id: int
    image_key: str
    image_path: str  # absolute path of the image file
    box: tuple[int, int, int, int]  # (x0, y0, x1, y1) in original-image pixels, x1/y1 exclusive
    score: float  # region score: cosine similarity of the best member patch (or mean, see reduce)
    patch_mask: np.ndarray = field(repr=False)  # bool [grid_h, grid_w]
    heatmap: np.ndarray = field(repr=False)  # float32 [grid_h, grid_w]: the image's patch scores
    image_size: tuple[int, int] = (0, 0)  # original (width, height)
    num_patches: int = 0


@torch.inference_mode()
def embed_text(loaded, queries: Sequence[str], templates: Sequence[str] | None = DEFAULT_TEMPLATES) -> np.ndarray:
    """L2-normalised text embeddings ``[Q, D]`` float32.

    With ``templates``, each query is written into every template, each embedding normalised,
    their mean renormalised (the official zero-shot recipe). ``None`` embeds the raw text.
    """
    texts = [str(q).strip() for q in queries]
    if not texts or any(not t for t in texts):
        raise TipslabError("query: expected non-empty text")
    templates = list(templates) if templates else ["{}"]
    if any("{}" not in t for t in templates):
        raise TipslabError(f"templates: every template needs a '{{}}' for the query, got {templates}")
    prompts = [t.format(q) for q in texts for t in templates]
    encoder = loaded.encoder
    encoder.eval()
    device = next(encoder.parameters()).device
    ids = loaded.tokenizer(prompts).to(device)
    emb = torch.nn.functional.normalize(encoder.encode_text(ids).float(), dim=-1)
    emb = emb.reshape(len(texts), len(templates), -1).mean(dim=1)
    return torch.nn.functional.normalize(emb, dim=-1).cpu().numpy()


def score_map(index: IndexDirectory, image_id: int, query: np.ndarray) -> np.ndarray:
    """Exact cosine score of every patch of one image, ``[grid_h, grid_w]`` float32."""
    info = index.image_info(image_id)
    scores = index.image_vectors(image_id) @ query.astype(np.float32)
    return scores.reshape(int(info["grid_h"]), int(info["grid_w"]))


def search_by_vectors(index, query_vectors, k: int = 5, *, queries: Sequence[str] | None = None,
                      candidates: int | None = None, max_images: int | None = None, per_image: int = 2,
                      fraction: float | None = 0.75, margin: float | None = None, reduce: str = "max",
                      min_patches: int = 1, dedupe_iou: float = 0.5, params: str | None = None,
                      gpu: bool | None = None) -> list[Hit]:
    """Hits for query vectors ``[Q, D]`` (normalised like the index's); top ``k`` per query.

    ``candidates`` patches are fetched from FAISS (default ``max(100, 20 k)``); at most
    ``max_images`` distinct images among them are re-scored (default ``max(16, 4 k)``); each
    gives at most ``per_image`` regions. Within one image a region whose box overlaps a better
    one's by more than ``dedupe_iou`` is dropped (a ring around a blob is the same thing found
    twice). Results for several queries are concatenated in query order.
    """
    if not isinstance(index, IndexDirectory):
        index = IndexDirectory.open(index)
    q = np.atleast_2d(np.asarray(query_vectors, dtype=np.float32))
    labels = list(queries) if queries is not None else [f"query {i}" for i in range(len(q))]
    if len(labels) != len(q):
        raise TipslabError(f"queries: {len(labels)} labels for {len(q)} query vectors")
    if k <= 0:
        raise TipslabError(f"--k: expected a positive integer, got {k}")
    if per_image <= 0:
        raise TipslabError(f"per_image: expected a positive integer, got {per_image}")
    candidates = candidates or max(100, 20 * k)
    max_images = max_images or max(16, 4 * k)
    hits: list[Hit] = []
    for qi in range(len(q)):
        image_ids = _candidate_images(index, q[qi : qi + 1], candidates, max_images, k, params, gpu)
        found = []
        for image_id in image_ids:
            info = index.image_info(image_id)
            heat = score_map(index, image_id, q[qi])
            size = (int(info["image_width"]), int(info["image_height"]))
            kept = []
            for region in find_regions(heat, size, fraction=fraction, margin=margin, reduce=reduce,
                                       min_patches=min_patches):
                if any(box_iou(region.box, other.box) > dedupe_iou for other in kept):
                    continue
                kept.append(region)
                if len(kept) == per_image:
                    break
            found.extend((region, image_id, info, heat) for region in kept)
        found.sort(key=lambda item: (-item[0].score, item[1], item[0].peak))
        for rank, (region, image_id, info, heat) in enumerate(found[:k], start=1):
            hits.append(Hit(
                rank=rank, query=labels[qi], image_id=image_id, image_key=info["key"],
                image_path=str(index.resolve_image_path(info["image_path"])), box=region.box,
                score=region.score, patch_mask=region.mask, heatmap=heat,
                image_size=(int(info["image_width"]), int(info["image_height"])), num_patches=region.num_patches,
            ))
    return hits


def _candidate_images(index, query, candidates: int, max_images: int, k: int, params, gpu) -> list[int]:
    """Distinct images owning the query's nearest patches, best first. A peaked model can put
    all of the first `candidates` patches in a few images; then fetch more (x4 each time) until
    there are enough images for k hits or the whole index has been seen."""
    wanted = min(max_images, max(k, 1), index.num_images)
    while True:
        _, ids = index.search_vectors(query, min(candidates, index.num_vectors), params=params, gpu=gpu)
        image_ids: list[int] = []
        for image_id in index.image_ids_of(ids)[0]:
            if image_id >= 0 and int(image_id) not in image_ids:
                image_ids.append(int(image_id))
            if len(image_ids) == max_images:
                break
        if len(image_ids) >= wanted or candidates >= index.num_vectors:
            return image_ids
        candidates *= 4


class Searcher:
    """An opened index plus its model, for running many text queries without reloading."""

    def __init__(self, index_dir, *, loaded=None, device: str | None = None):
        self.index = index_dir if isinstance(index_dir, IndexDirectory) else IndexDirectory.open(index_dir)
        self._loaded = loaded
        self._device = device

    @property
    def loaded(self):
        if self._loaded is None:
            self._loaded = self.index.load_model(self._device)
        return self._loaded

    def embed(self, queries: Sequence[str], templates: Sequence[str] | None = DEFAULT_TEMPLATES) -> np.ndarray:
        vectors = embed_text(self.loaded, queries, templates)
        if vectors.shape[1] != self.index.dim:
            raise TipslabError(f"{self.index.path}: the model's text embeddings have dim {vectors.shape[1]}, "
                               f"the index's patches {self.index.dim}")
        return vectors

    def search(self, query: str | Sequence[str], k: int = 5, *,
               templates: Sequence[str] | None = DEFAULT_TEMPLATES, **options) -> list[Hit]:
        queries = [query] if isinstance(query, str) else list(query)
        return search_by_vectors(self.index, self.embed(queries, templates), k, queries=queries, **options)


def search(index_dir: str | Path | IndexDirectory, query: str | Sequence[str], k: int = 5, *,
           templates: Sequence[str] | None = DEFAULT_TEMPLATES, loaded=None, device: str | None = None,
           **options) -> list[Hit]:
    """Top ``k`` regions matching ``query`` (several queries: ``k`` each, in query order).

    ``templates=None`` embeds the raw query text instead of the prompt-template average.
    ``options`` go to `search_by_vectors` (candidates, per_image, fraction, margin, reduce, ...).
    """
    return Searcher(index_dir, loaded=loaded, device=device).search(query, k, templates=templates, **options)
