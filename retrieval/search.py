"""Region search: "find regions matching X" over an index directory.

query text -> text embedding (prompt templates averaged, as in the official zero-shot method)
-> FAISS top-K patches (K >> k) -> candidate images -> each candidate's full patch score map,
computed exactly from the stored float16 vectors (so compressed FAISS codes only pick the
candidates, never the final scores) -> connected regions -> hits ranked by region score.

Calibration (`null_vectors`): a cosine score means nothing on its own (an absent "purple
diamond" can out-score a present "blue square"). Each patch's query score is set against the
same model's scores for a fixed set of background prompts (`NULL_PROMPTS`): ``confidence`` =
softmax over [query, nulls] at the model's temperature, the query's share, in [0, 1]. A region's
confidence is its best patch's; hits below ``threshold`` (default 0.5: the query beats all the
background prompts together) are dropped, so a search may return fewer than ``k`` hits, or none.
With background prompts the patches are also *found and scored* relative to them: the query
vector becomes ``query - mean(nulls)``, so a patch's score is its cosine to the query minus its
mean cosine to the background prompts (one vector, so FAISS still does the search). Text
embeddings share a direction that background patches lie close to; the raw cosine makes those
patches the best match of every query (on scenes val, 150-step tiny model: pointing 0.17 raw,
0.52 relative).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tipslab.errors import TipslabError
from tipslab.retrieval.index_dir import IndexDirectory
from tipslab.retrieval.regions import REGION_FRACTION, REGION_UPSAMPLE, box_iou, find_regions

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


# Background prompts: what a patch "is" when it is not the query. Phrases, not templates.
NULL_PROMPTS = (
    "a photo.", "an image.", "background.", "a plain dark background.", "a blurry photo.",
    "a texture.", "something.", "an object.", "a pattern.", "nothing in particular.",
)
DEFAULT_THRESHOLD = 0.5
 # confidence: the query's share against all background prompts together
_ARTICLE = re.compile(r"^(a|an|the)\s+", re.IGNORECASE)
# A query already written as a caption ("a photo of a dog", "an image showing ...") is used as is.
_SENTENCE = re.compile(r"^(a|an|the)?\s*(photo|picture|image|close-up|drawing|painting)\b|[.!?]$", re.IGNORECASE)


def prompts_for(query: str, templates: Sequence[str] | None = None) -> list[str]:
    """The prompts a query is written into: each template filled with the query's noun phrase.

    A leading article is taken off first, so "a red circle" gives "a photo of a red circle."
    (not "a photo of a a red circle."), and "a" before a vowel becomes "an". A query that is
    already a caption is used alone.
    """
    text = " ".join(str(query).split())
    templates = list(DEFAULT_TEMPLATES if templates is None else templates) or ["{}"]
    if _SENTENCE.search(text):
        return [text]
    noun = _ARTICLE.sub("", text) or text
    prompts = []
    for template in templates:
        filled = template.format(noun)
        if template.startswith("{}"):  # the bare query keeps the user's own words
            filled = template.format(text)
        prompts.append(re.sub(r"\ba (?=[aeiou])", "an ", filled, flags=re.IGNORECASE) if "a {}" in template else filled)
    return list(dict.fromkeys(prompts))


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
    # Calibrated score in [0, 1] (see the module docstring); NaN when no background prompts were given.
    confidence: float = float("nan")


@torch.inference_mode()
def embed_text(loaded, queries: Sequence[str], templates: Sequence[str] | None = DEFAULT_TEMPLATES) -> np.ndarray:
    """L2-normalised text embeddings ``[Q, D]`` float32.

    With ``templates``, each query is written into every template (`prompts_for`), each
    embedding normalised, their mean renormalised (the official zero-shot recipe). ``None``
    embeds the raw text.
    """
    texts = [" ".join(str(q).split()) for q in queries]
    if not texts or any(not t for t in texts):
        raise TipslabError("query: expected non-empty text")
    if templates is not None and any("{}" not in t for t in templates):
        raise TipslabError(f"templates: every template needs a '{{}}' for the query, got {list(templates)}")
    groups = [prompts_for(t, templates) if templates else [t] for t in texts]
    prompts = [p for group in groups for p in group]
    encoder = loaded.encoder
    encoder.eval()
    device = next(encoder.parameters()).device
    ids = loaded.tokenizer(prompts).to(device)
    emb = torch.nn.functional.normalize(encoder.encode_text(ids).float(), dim=-1)
    out, start = [], 0
    for group in groups:
        out.append(emb[start : start + len(group)].mean(dim=0))
        start += len(group)
    return torch.nn.functional.normalize(torch.stack(out), dim=-1).cpu().numpy()


def fills_text_context(loaded, query: str) -> bool:
    """Whether ``query`` reaches the end of the text tower's context (so its tail was cut off).

    Both tokenizers pad with id 0 and truncate to the context length, so a non-zero last id means
    the text filled (or overflowed) the context.
    """
    ids = loaded.tokenizer([" ".join(str(query).split())])
    return bool(ids.shape[-1] and int(ids[0, -1]) != 0)


def text_context_length(loaded) -> int:
    return int(loaded.tokenizer(["x"]).shape[-1])


def logit_scale_of(loaded) -> float:
    """1 / temperature of the model (the scale its contrastive softmax uses)."""
    return float(loaded.encoder.logit_scale.detach().exp().item())


def confidence_map(index: IndexDirectory, image_id: int, query: np.ndarray, null_vectors: np.ndarray,
                   logit_scale: float) -> np.ndarray:
    """Per patch, the query's softmax share against the background prompts, ``[grid_h, grid_w]``."""
    info = index.image_info(image_id)
    vectors = index.image_vectors(image_id)
    logits = vectors @ np.concatenate([query[None], null_vectors]).astype(np.float32).T * logit_scale
    logits -= logits.max(axis=1, keepdims=True)
    share = np.exp(logits[:, 0]) / np.exp(logits).sum(axis=1)
    return share.reshape(int(info["grid_h"]), int(info["grid_w"])).astype(np.float32)


def relative_query(query: np.ndarray, null_vectors: np.ndarray) -> np.ndarray:
    """The query vector whose inner product with a normalised patch is the patch's cosine to the
    query minus its mean cosine to the background prompts, ``[D]`` float32."""
    return (np.asarray(query, dtype=np.float32) - np.atleast_2d(null_vectors).astype(np.float32).mean(axis=0))


def score_map(index: IndexDirectory, image_id: int, query: np.ndarray) -> np.ndarray:
    """Exact score (inner product with the stored, normalised patches: a cosine for a unit query)
    of every patch of one image, ``[grid_h, grid_w]`` float32."""
    info = index.image_info(image_id)
    scores = index.image_vectors(image_id) @ query.astype(np.float32)
    return scores.reshape(int(info["grid_h"]), int(info["grid_w"]))


def search_by_vectors(index, query_vectors, k: int = 5, *, queries: Sequence[str] | None = None,
                      candidates: int | None = None, max_images: int | None = None, per_image: int = 2,
                      fraction: float | None = REGION_FRACTION, margin: float | None = None, reduce: str = "max",
                      upsample: int = REGION_UPSAMPLE, min_patches: int = 1, dedupe_iou: float = 0.5, params: str | None = None,
                      gpu: bool | None = None, null_vectors: np.ndarray | None = None,
                      logit_scale: float = 1.0 / 0.07, threshold: float | None = None,
                      exclude: Sequence[tuple[int, tuple[int, int, int, int]]] = (),
                      allowed_images: set[int] | None = None) -> list[Hit]:
    """Hits for query vectors ``[Q, D]`` (normalised like the index's); top ``k`` per query.

    ``candidates`` patches are fetched from FAISS (default ``max(100, 20 k)``); at most
    ``max_images`` distinct images among them are re-scored (default ``max(16, 4 k)``); each
    gives at most ``per_image`` regions. Within one image a region whose box overlaps a better
    one's by more than ``dedupe_iou`` is dropped (a ring around a blob is the same thing found
    twice). Results for several queries are concatenated in query order.

    With ``null_vectors`` (background prompts' embeddings) each hit gets a ``confidence`` and
    hits are ranked by it; ``threshold`` (on confidence, or on the raw score without nulls)
    drops weaker hits, so fewer than ``k`` may come back. ``exclude`` lists (image_id, box)
    pairs not to return (a region query's own region); ``allowed_images`` (image ids, e.g. from
    a metadata filter) restricts the search to those images.
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
    if threshold is not None and not np.isfinite(threshold):
        raise TipslabError(f"threshold: expected a number, got {threshold}")
    nulls = None if null_vectors is None else np.atleast_2d(np.asarray(null_vectors, dtype=np.float32))
    candidates = candidates or max(100, 20 * k)
    max_images = max_images or max(16, 4 * k)
    hits: list[Hit] = []
    for qi in range(len(q)):
        if allowed_images is not None and not allowed_images:
            continue
        # Relative to the background prompts (module docstring): found and scored by q - mean(nulls).
        wanted = q[qi] if nulls is None else relative_query(q[qi], nulls)
        image_ids = _candidate_images(index, wanted[None], candidates, max_images, k, params, gpu, allowed_images)
        found = []
        for image_id in image_ids:
            info = index.image_info(image_id)
            heat = score_map(index, image_id, wanted)
            size = (int(info["image_width"]), int(info["image_height"]))
            share = None if nulls is None else confidence_map(index, image_id, q[qi], nulls, logit_scale)
            kept = []
            for region in find_regions(heat, size, fraction=fraction, margin=margin, reduce=reduce,
                                       min_patches=min_patches, upsample=upsample):
                if any(box_iou(region.box, other.box) > dedupe_iou for other in kept):
                    continue
                if any(image_id == ex_id and box_iou(region.box, ex_box) > dedupe_iou for ex_id, ex_box in exclude):
                    continue
                kept.append(region)
                if len(kept) == per_image:
                    break
            for region in kept:
                confidence = float("nan") if share is None else float(share[region.mask].max())
                found.append((region, image_id, info, heat, confidence))
        if nulls is not None:
            found.sort(key=lambda item: (-item[4], -item[0].score, item[1], item[0].peak))
        else:
            found.sort(key=lambda item: (-item[0].score, item[1], item[0].peak))
        if threshold is not None:
            # Confidence must beat the threshold (0.5: the query beats the background prompts together;
            # a tie is no match); a raw score must reach it.
            found = [item for item in found
                     if (item[4] > threshold if nulls is not None else item[0].score >= threshold)]
        for rank, (region, image_id, info, heat, confidence) in enumerate(found[:k], start=1):
            hits.append(Hit(
                rank=rank, query=labels[qi], image_id=image_id, image_key=info["key"],
                image_path=str(index.resolve_image_path(info["image_path"])), box=region.box,
                score=region.score, patch_mask=region.mask, heatmap=heat,
                image_size=(int(info["image_width"]), int(info["image_height"])), num_patches=region.num_patches,
                confidence=confidence,
            ))
    return hits


def _candidate_images(index, query, candidates: int, max_images: int, k: int, params, gpu,
                      allowed: set[int] | None = None) -> list[int]:
    """Distinct images owning the query's nearest patches, best first. A peaked model can put
    all of the first `candidates` patches in a few images; then fetch more (x4 each time) until
    there are enough images for k hits or the whole index has been seen."""
    wanted = min(max_images, max(k, 1), index.num_images if allowed is None else len(allowed))
    while True:
        _, ids = index.search_vectors(query, min(candidates, index.num_vectors), params=params, gpu=gpu)
        image_ids: list[int] = []
        for image_id in index.image_ids_of(ids)[0]:
            if image_id >= 0 and int(image_id) not in image_ids and (allowed is None or int(image_id) in allowed):
                image_ids.append(int(image_id))
            if len(image_ids) == max_images:
                break
        if len(image_ids) >= wanted or candidates >= index.num_vectors:
            return image_ids
        candidates *= 4


def region_vector(index: IndexDirectory, image_id: int, box: Sequence[int]) -> np.ndarray:
    """The query vector of a box of an indexed image ("more like this"): the normalised mean of
    the patches whose cells the box overlaps, ``[D]`` float32."""
    if not 0 <= int(image_id) < index.num_images:
        raise TipslabError(f"image_id: expected 0..{index.num_images - 1}, got {image_id}")
    if len(box) != 4:
        raise TipslabError(f"box: expected [x0, y0, x1, y1], got {list(box)}")
    info = index.image_info(int(image_id))
    width, height = int(info["image_width"]), int(info["image_height"])
    gh, gw = int(info["grid_h"]), int(info["grid_w"])
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise TipslabError(f"box: expected 0 <= x0 < x1 <= {width} and 0 <= y0 < y1 <= {height} "
                           f"(the image's size), got {[x0, y0, x1, y1]}")
    cols = range(int(x0 * gw // width), min(gw, int(np.ceil(x1 * gw / width))))
    rows = range(int(y0 * gh // height), min(gh, int(np.ceil(y1 * gh / height))))
    grid = index.image_vectors(int(image_id)).reshape(gh, gw, -1)
    mean = grid[rows.start:rows.stop, cols.start:cols.stop].reshape(-1, grid.shape[-1]).mean(axis=0)
    return (mean / max(float(np.linalg.norm(mean)), 1e-12)).astype(np.float32)


class Searcher:
    """An opened index plus its model, for running many queries without reloading.

    ``model`` overrides where the model is loaded from (default: the index's copy, else the
    manifest's path). The model loads on the first text query; region queries need none.
    """

    def __init__(self, index_dir, *, loaded=None, device: str | None = None, model=None,
                 null_prompts: Sequence[str] = NULL_PROMPTS):
        self.index = index_dir if isinstance(index_dir, IndexDirectory) else IndexDirectory.open(index_dir)
        self._loaded = loaded
        self._device = device
        self._model = model
        self._null_prompts = tuple(null_prompts)
        self._nulls = None

    @property
    def loaded(self):
        if self._loaded is None:
            self._loaded = self.index.load_model(self._device, model=self._model)
        return self._loaded

    def embed(self, queries: Sequence[str], templates: Sequence[str] | None = DEFAULT_TEMPLATES) -> np.ndarray:
        vectors = embed_text(self.loaded, queries, templates)
        if vectors.shape[1] != self.index.dim:
            raise TipslabError(f"{self.index.path}: the model's text embeddings have dim {vectors.shape[1]}, "
                               f"the index's patches {self.index.dim}")
        return vectors

    @property
    def null_vectors(self) -> np.ndarray:
        """The background prompts' embeddings (computed once, raw text: they are phrases)."""
        if self._nulls is None:
            self._nulls = self.embed(self._null_prompts, None)
        return self._nulls

    def search(self, query: str | Sequence[str], k: int = 5, *, templates: Sequence[str] | None = DEFAULT_TEMPLATES,
               threshold: float | None = DEFAULT_THRESHOLD, calibrate: bool = True, **options) -> list[Hit]:
        """Top ``k`` regions per text query; with ``calibrate`` (default) only those whose
        confidence reaches ``threshold`` (None keeps all k), so fewer or none may come back."""
        queries = [query] if isinstance(query, str) else list(query)
        vectors = self.embed(queries, templates)
        if calibrate:
            options.update(null_vectors=self.null_vectors, logit_scale=logit_scale_of(self.loaded),
                           threshold=threshold)
        return search_by_vectors(self.index, vectors, k, queries=queries, **options)

    def search_region(self, image_id: int, box: Sequence[int], k: int = 5, *, threshold: float | None = None,
                      **options) -> list[Hit]:
        """Regions like ``box`` of indexed image ``image_id`` (its own region left out);
        ``threshold`` is on the raw cosine score here (no text, so no calibration)."""
        vector = region_vector(self.index, image_id, box)
        label = f"region {tuple(int(v) for v in box)} of image {int(image_id)}"
        exclude = [(int(image_id), tuple(int(v) for v in box))]
        return search_by_vectors(self.index, vector[None], k, queries=[label], threshold=threshold,
                                 exclude=exclude, **options)


def search(index_dir: str | Path | IndexDirectory, query: str | Sequence[str], k: int = 5, *,
           templates: Sequence[str] | None = DEFAULT_TEMPLATES, loaded=None, device: str | None = None,
           model=None, threshold: float | None = DEFAULT_THRESHOLD, calibrate: bool = True,
           **options) -> list[Hit]:
    """Top ``k`` regions matching ``query`` (several queries: ``k`` each, in query order).

    ``templates=None`` embeds the raw query text instead of the prompt-template average.
    ``options`` go to `search_by_vectors` (candidates, per_image, fraction, margin, reduce, ...).
    """
    searcher = Searcher(index_dir, loaded=loaded, device=device, model=model)
    return searcher.search(query, k, templates=templates, threshold=threshold, calibrate=calibrate, **options)
