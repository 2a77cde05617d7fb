"""Pictures of search hits: the image and its patch-score heatmap side by side, each with the
region's box, a colour bar giving the heatmap's scores, and a caption.

The heatmap is shown beside the image, not blended into it: for a colour query ("a red circle")
heat blended onto pixels cannot be told apart from the object's own colour. Where ground truth
exists (the built-in scenes) the caption marks the hit HIT or MISS. One PNG per hit
(``hit-01.png`` ...) and a contact sheet ``hits.png``. Small images (the 112 px scenes) are
enlarged so the box and heatmap stay readable.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from tipslab.atomic import atomic_write
from tipslab.retrieval.scenes_truth import hit_or_miss
from tipslab.retrieval.search import Hit

MIN_SIDE = 320  # shortest side of a rendered hit, in pixels
MAX_SIDE = 1024  # longest side; big photos are shrunk to keep files small
BOX_COLOR = (0, 255, 64)
CAPTION_BG = (24, 24, 24)
CAPTION_FG = (240, 240, 240)
HIT_FG = (80, 230, 110)
MISS_FG = (255, 110, 90)
GAP = 8  # pixels between the panels
BAR_WIDTH = 16  # the colour bar's ramp; its labels take BAR_LABELS more
BAR_LABELS = 64


def slugify(text: str, max_len: int = 60) -> str:
    """A file-name-safe form of a query ("red circle!" -> "red-circle")."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:max_len].strip("-")
    return slug or "query"


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def _load_image(hit: Hit) -> tuple[Image.Image, bool]:
    """The hit's image as RGB, or a grey placeholder of its size when the file is gone."""
    try:
        with Image.open(hit.image_path) as handle:
            return handle.convert("RGB"), True
    except (OSError, ValueError):
        width, height = hit.image_size if min(hit.image_size) > 0 else (224, 224)
        return Image.new("RGB", (width, height), (96, 96, 96)), False


def colormap(values: np.ndarray) -> np.ndarray:
    """uint8 RGB for values in [0, 1] (matplotlib's 'turbo': dark blue low, red high)."""
    from matplotlib import colormaps

    return (colormaps["turbo"](values)[..., :3] * 255).astype(np.uint8)


def _display_scale(size: tuple[int, int]) -> float:
    """Enlarge small images to MIN_SIDE, shrink big ones to MAX_SIDE (the cap wins)."""
    return min(max(1.0, MIN_SIDE / max(1, min(size))), MAX_SIDE / max(1, max(size)))


def heat_panel(heatmap: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """The patch-score map alone, in turbo colours, normalised per image, at ``size``."""
    heat = np.asarray(heatmap, dtype=np.float32)
    span = float(heat.max() - heat.min())
    norm = (heat - heat.min()) / span if span > 0 else np.ones_like(heat)
    # Nearest: each patch stays a visible cell, so the panel shows what the model scored.
    up = np.asarray(Image.fromarray(norm, mode="F").resize(size, Image.Resampling.NEAREST))
    return Image.fromarray(colormap(np.clip(up, 0.0, 1.0)))


def colour_bar(height: int, low: float, high: float, font) -> Image.Image:
    """A vertical turbo ramp, high at the top, labelled with the scores its ends stand for."""
    ramp = colormap(np.linspace(1.0, 0.0, height)[:, None].repeat(BAR_WIDTH, axis=1))
    bar = Image.new("RGB", (BAR_WIDTH + BAR_LABELS, height), CAPTION_BG)
    bar.paste(Image.fromarray(ramp), (0, 0))
    draw = ImageDraw.Draw(bar)
    draw.text((BAR_WIDTH + 4, 0), f"{high:.3f}", fill=CAPTION_FG, font=font)
    draw.text((BAR_WIDTH + 4, height // 2 - 8), "cos", fill=CAPTION_FG, font=font)
    draw.text((BAR_WIDTH + 4, height - 18), f"{low:.3f}", fill=CAPTION_FG, font=font)
    return bar


def _draw_box(picture: Image.Image, box, original: tuple[int, int]) -> None:
    draw = ImageDraw.Draw(picture)
    # Box in the original image's pixels; x1/y1 are exclusive, PIL's rectangle is inclusive.
    sx, sy = picture.size[0] / original[0], picture.size[1] / original[1]
    x0, y0, x1, y1 = box
    rect = (x0 * sx, y0 * sy, x1 * sx - 1, y1 * sy - 1)
    width = max(2, round(min(picture.size) / 110))
    draw.rectangle(rect, outline=(0, 0, 0), width=width + 2)  # dark rim keeps it visible on any colour
    draw.rectangle(rect, outline=BOX_COLOR, width=width)


def render_hit(hit: Hit, truth: tuple[bool, float] | None = None) -> Image.Image:
    """The picture of one hit: image | heatmap | colour bar, the box on both, a caption under.

    ``truth`` is (hit?, IoU) from ground truth (`scenes_truth.hit_or_miss`), shown as HIT/MISS.
    """
    image, found = _load_image(hit)
    original = image.size
    scale = _display_scale(original)
    size = (round(original[0] * scale), round(original[1] * scale))
    shown = image.resize(size, Image.Resampling.BICUBIC)
    heat = heat_panel(hit.heatmap, size)
    for picture in (shown, heat):
        _draw_box(picture, hit.box, original)
    if not found:
        ImageDraw.Draw(shown).text((8, 8), "image file not found", fill=(255, 255, 255), font=_font(16))

    font_size = max(14, min(22, size[0] // 22))
    font = _font(font_size)
    heatmap = np.asarray(hit.heatmap, dtype=np.float32)
    bar = colour_bar(size[1], float(heatmap.min()), float(heatmap.max()), _font(14))
    width = 2 * size[0] + bar.size[0] + 2 * GAP
    confidence = "" if np.isnan(hit.confidence) else f"  conf {hit.confidence:.2f}"
    lines = [(f"#{hit.rank}  score {hit.score:.3f}{confidence}  \u201c{hit.query}\u201d", CAPTION_FG),
             (f"{Path(hit.image_path).name}  box {tuple(int(v) for v in hit.box)}", CAPTION_FG)]
    if truth is not None:
        lines.append((f"{'HIT' if truth[0] else 'MISS'}: best IoU {truth[1]:.2f} with the query's class "
                       "(scenes ground truth)", HIT_FG if truth[0] else MISS_FG))
    line_h = font_size + 6
    canvas = Image.new("RGB", (width, size[1] + line_h * len(lines) + 8), CAPTION_BG)
    canvas.paste(shown, (0, 0))
    canvas.paste(heat, (size[0] + GAP, 0))
    canvas.paste(bar, (2 * size[0] + 2 * GAP, 0))
    text = ImageDraw.Draw(canvas)
    for i, (line, colour) in enumerate(lines):
        text.text((8, size[1] + 4 + i * line_h), _fit(text, line, font, width - 16), fill=colour, font=font)
    return canvas


def _fit(draw: ImageDraw.ImageDraw, line: str, font, width: int) -> str:
    """``line`` shortened with an ellipsis until it fits ``width`` pixels."""
    if draw.textlength(line, font=font) <= width:
        return line
    while line and draw.textlength(line + "\u2026", font=font) > width:
        line = line[:-1]
    return line + "\u2026"


def contact_sheet(pictures: Sequence[Image.Image], title: str, tile_width: int = 480, columns: int = 3) -> Image.Image:
    """The hit pictures side by side (``columns`` per row) under a title bar."""
    columns = max(1, min(columns, len(pictures)))
    tiles = [p.resize((tile_width, round(p.size[1] * tile_width / p.size[0])), Image.Resampling.LANCZOS)
             for p in pictures]
    rows = [tiles[i:i + columns] for i in range(0, len(tiles), columns)]
    gap, title_h = 8, 40
    heights = [max(t.size[1] for t in row) for row in rows]
    sheet = Image.new("RGB", (columns * tile_width + (columns + 1) * gap, title_h + sum(heights) + (len(rows) + 1) * gap),
                      (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((gap, 10), _fit(draw, title, _font(22), sheet.size[0] - 2 * gap), fill=(0, 0, 0), font=_font(22))
    y = title_h + gap
    for row, height in zip(rows, heights):
        for i, tile in enumerate(row):
            sheet.paste(tile, (gap + i * (tile_width + gap), y))
        y += height + gap
    return sheet


def _save_png(picture: Image.Image, path: Path) -> None:
    atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))


def write_overlays(hits: Sequence[Hit], out_dir) -> dict[str, list[Path]]:
    """PNGs for ``hits``: ``hit-NN.png`` each and ``hits.png``, per query.

    One query writes into ``out_dir``; several write into ``out_dir/<query slug>/``. Returns
    ``{query: [hit pngs..., contact sheet]}``.
    """
    out = Path(out_dir)
    queries = list(dict.fromkeys(hit.query for hit in hits))
    written: dict[str, list[Path]] = {}
    for query in queries:
        folder = out if len(queries) == 1 else out / slugify(query)
        folder.mkdir(parents=True, exist_ok=True)
        mine = [hit for hit in hits if hit.query == query]
        pictures, paths = [], []
        for hit in mine:
            picture = render_hit(hit, hit_or_miss(hit))
            path = folder / f"hit-{hit.rank:02d}.png"
            _save_png(picture, path)
            pictures.append(picture)
            paths.append(path)
        sheet = folder / "hits.png"
        _save_png(contact_sheet(pictures, f"\u201c{query}\u201d: top {len(mine)} regions"), sheet)
        written[query] = paths + [sheet]
    return written
