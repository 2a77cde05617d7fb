"""`tipslab serve`: an HTTP API and a web page over one or more index directories.

The API (JSON unless said otherwise; errors are 4xx ``{"error": "one line"}``)::

    GET  /api/health                      {"status": "ok", "indexes": [...]}
    GET  /api/indexes                     what each index holds (images, vectors, model, filters)
    POST /api/search                      {"index", "query" | "region": {"image_id", "box"}, "k",
                                           "threshold", "filters": {...}} -> ranked hits + notes
    GET  /api/image/{index}/{image_id}    the image file
    GET  /api/crop/{index}/{image_id}?box=x0,y0,x1,y1
    GET  /api/heatmap/{index}/{image_id}?query=... | ?region=ID,x0,y0,x1,y1   RGBA PNG, image size
    GET  /                                the search page (retrieval/page/)

Models are loaded once per set of weights and shared by every index built with them; a lock per
model serialises the forward passes (torch modules are not safe to call from several threads at
once) and a lock per index serialises its FAISS calls (search parameters are set on the index
object), so concurrent requests never race. FastAPI runs these blocking handlers in its thread pool.
"""

from __future__ import annotations

import functools
import io
import threading
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

from tipslab.errors import TipslabError
from tipslab.retrieval.search import (
    DEFAULT_THRESHOLD,
    Searcher,
    fills_text_context,
    logit_scale_of,
    region_vector,
    score_map,
    search_by_vectors,
    text_context_length,
)
from tipslab.retrieval.search_filters import FILTERS, allowed_images

PAGE_DIR = Path(__file__).with_name("page")
MAX_QUERY_CHARS = 20_000  # longer bodies are refused outright; shorter ones are truncated by the tokenizer
MAX_K = 200


class LoadedIndex:
    """One served index: its searcher, its name in URLs, and the locks its calls take."""

    def __init__(self, name: str, searcher: Searcher, model_lock: threading.Lock):
        self.name = name
        self.searcher = searcher
        self.model_lock = model_lock
        self.index_lock = threading.Lock()
        self._query_vectors: OrderedDict[str, np.ndarray] = OrderedDict()  # heatmap requests repeat queries

    @property
    def index(self):
        return self.searcher.index

    def query_vector(self, query: str) -> np.ndarray:
        """The query's text embedding (cached: the page asks for a heatmap per hit)."""
        with self.model_lock:
            cached = self._query_vectors.get(query)
            if cached is None:
                cached = self.searcher.embed([query])[0]
                self._query_vectors[query] = cached
                while len(self._query_vectors) > 256:
                    self._query_vectors.popitem(last=False)
            return cached

    def info(self) -> dict:
        manifest = self.index.manifest
        return {"name": self.name, "path": str(self.index.path), "images": self.index.num_images,
                "vectors": self.index.num_vectors, "dim": self.index.dim, "feature": self.index.feature,
                "factory": manifest.get("factory"), "model": manifest["model"].get("source"),
                "filters": sorted(FILTERS), "created": manifest.get("created")}


def load_indexes(paths, *, model=None, device: str | None = None) -> dict[str, LoadedIndex]:
    """Open each index directory and its model; indexes of the same weights share one model."""
    from tipslab.retrieval.index_dir import IndexDirectory

    loaded: dict[str, LoadedIndex] = {}
    models: dict[str, tuple] = {}
    for path in paths:
        index = IndexDirectory.open(path)
        name = index.path.name
        suffix = 2
        while name in loaded:
            name, suffix = f"{index.path.name}-{suffix}", suffix + 1
        identity = index.manifest["model"].get("sha256") or str(index.path)
        if identity not in models:
            models[identity] = (index.load_model(device, model=model), threading.Lock())
        searcher = Searcher(index, loaded=models[identity][0])
        _ = searcher.null_vectors, index.index, index.images  # load now: lazy loads would race
        loaded[name] = LoadedIndex(name, searcher, models[identity][1])
    return loaded


def run_search(served: LoadedIndex, request: dict) -> dict:
    """The JSON answer to a search request (already validated for types by the API layer)."""
    started = time.perf_counter()
    searcher, index = served.searcher, served.index
    k, notes = request["k"], []
    filters = request.get("filters") or {}
    allowed = allowed_images(index.images, filters) if filters else None
    options = {"allowed_images": allowed, "per_image": request.get("per_image") or 2}
    if request.get("region") is not None:
        region = request["region"]
        threshold = request.get("threshold")
        with served.index_lock:
            hits = searcher.search_region(region["image_id"], region["box"], k, threshold=threshold, **options)
        query = hits[0].query if hits else f"region {tuple(region['box'])} of image {region['image_id']}"
    else:
        query = " ".join(request["query"].split())
        if not query:
            raise TipslabError("query: expected non-empty text")
        threshold = DEFAULT_THRESHOLD if request.get("threshold") is None else request["threshold"]
        vector = served.query_vector(query)
        with served.model_lock:
            if fills_text_context(searcher.loaded, query):
                notes.append(f"the query fills the text tower's context of {text_context_length(searcher.loaded)} "
                             "tokens; the rest was cut off")
        with served.index_lock:
            hits = search_by_vectors(index, vector[None], k, queries=[query], null_vectors=searcher.null_vectors,
                                     logit_scale=logit_scale_of(searcher.loaded), threshold=threshold or None,
                                     **options)
    if len(hits) < k:
        if allowed is not None and not allowed:
            notes.append("no image matches the filters")
        elif threshold:
            notes.append(f"only {len(hits)} of the {k} regions asked for reach the threshold {threshold:g}")
        else:
            notes.append(f"only {len(hits)} of the {k} regions asked for exist")
    return {
        "index": served.name, "query": query, "k": k, "threshold": threshold, "notes": notes,
        "took_ms": round((time.perf_counter() - started) * 1000, 2),
        "results": [_hit_json(served.name, hit, request) for hit in hits],
    }


def _hit_json(name: str, hit, request: dict) -> dict:
    from urllib.parse import quote

    box = [int(v) for v in hit.box]
    base = f"/api/{{}}/{quote(name)}/{hit.image_id}"
    if request.get("region") is not None:
        r = request["region"]
        heat = "?region=" + ",".join(str(int(v)) for v in [r["image_id"], *r["box"]])
    else:
        heat = "?query=" + quote(hit.query)
    confidence = None if np.isnan(hit.confidence) else round(float(hit.confidence), 5)
    return {"rank": hit.rank, "image_id": hit.image_id, "image_key": hit.image_key, "image": hit.image_path,
            "image_size": list(hit.image_size), "box": box, "score": round(float(hit.score), 5),
            "confidence": confidence, "image_url": base.format("image"),
            "crop_url": base.format("crop") + "?box=" + ",".join(map(str, box)),
            "heatmap_url": base.format("heatmap") + heat}


def heatmap_png(served: LoadedIndex, image_id: int, query: str | None, region: list[int] | None) -> bytes:
    """The image's patch scores for a query as an RGBA PNG of the image's size (turbo colours,
    opacity rising with the score, normalised per image) to lay over the picture."""
    from PIL import Image

    from tipslab.retrieval.overlay import colormap

    index = served.index
    _check_image_id(index, image_id)
    if region is not None:
        if len(region) != 5:
            raise TipslabError("region: expected image_id,x0,y0,x1,y1")
        vector = region_vector(index, region[0], region[1:])
    elif query and query.strip():
        vector = served.query_vector(" ".join(query.split()))
    else:
        raise TipslabError("heatmap: expected ?query=TEXT or ?region=image_id,x0,y0,x1,y1")
    heat = score_map(index, image_id, vector)
    span = float(heat.max() - heat.min())
    norm = (heat - heat.min()) / span if span > 0 else np.ones_like(heat)
    info = index.image_info(image_id)
    size = (int(info["image_width"]), int(info["image_height"]))
    up = np.clip(np.asarray(Image.fromarray(norm.astype(np.float32), mode="F").resize(size, Image.Resampling.BILINEAR)),
                 0, 1)
    rgba = np.concatenate([colormap(up), (255 * (0.15 + 0.7 * up))[..., None].astype(np.uint8)], axis=-1)
    return _png(Image.fromarray(rgba, mode="RGBA"))


def image_file(served: LoadedIndex, image_id: int) -> Path:
    index = served.index
    _check_image_id(index, image_id)
    path = index.resolve_image_path(index.image_info(image_id)["image_path"])
    if not path.is_file():
        raise FileNotFoundError(f"image {image_id}: its file {path} is gone")
    return path


def crop_png(served: LoadedIndex, image_id: int, box: list[int]) -> bytes:
    from PIL import Image

    path = image_file(served, image_id)
    with Image.open(path) as handle:
        image = handle.convert("RGB")
    if len(box) != 4 or not (0 <= box[0] < box[2] <= image.width and 0 <= box[1] < box[3] <= image.height):
        raise TipslabError(f"box: expected x0,y0,x1,y1 inside the {image.width}x{image.height} image, got {box}")
    return _png(image.crop(tuple(box)))


def _check_image_id(index, image_id: int) -> None:
    if not 0 <= int(image_id) < index.num_images:
        raise TipslabError(f"image_id: expected 0..{index.num_images - 1}, got {image_id}")


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@functools.cache
def page_file(name: str) -> bytes:
    return (PAGE_DIR / name).read_bytes()
