"""`tipslab predict MODEL --task depth|normals|seg --decoder FILE --images ...`: run a DPT decoder.

For each image: the encoder (any `load_model` source) reads it at its preprocessing size, the
decoder (an official-layout `.npz`: a released TIPSv2 decoder or one `tipslab probe` trained)
reads four intermediate blocks, and the prediction is resized to the image's own size. Written
to `--out`, per image:

- `<stem>_<task>.png`: the image beside the prediction; depth colour-mapped (turbo, near =
  warm) with a colour bar in metres; normals as RGB ((n + 1) / 2, x right, y up, z towards the
  camera, as the official notebook shows them) with a key sphere; segmentation blended over
  the image with a legend of the classes it found, largest first;
- `<stem>_<task>.npy`: the array (depth float32 [H, W] metres; normals float32 [H, W, 3] unit
  vectors; seg int16 [H, W] class ids).
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
import torch

from tipslab.atomic import atomic_write, atomic_write_bytes
from tipslab.errors import TipslabError

MAX_LEGEND = 12


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("predict", help="depth, surface normals or segmentation with a DPT decoder",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="tipslab checkpoint directory, official TIPS files or a release name")
    parser.add_argument("--task", required=True, choices=["depth", "normals", "seg"], help="what the decoder predicts")
    parser.add_argument("--decoder", required=True, help="decoder .npz (official layout)")
    parser.add_argument("--images", nargs="+", required=True, help="image files and/or folders")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--layers", type=int, nargs=4, help="block indices fed to the decoder (default: official)")
    parser.add_argument("--img-size", type=int, help="encoder input size (default: the model's)")
    parser.add_argument("--classes", help="seg: a text file of class names, one per line (default: ADE20K-150)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.set_defaults(func=run_predict)
    return parser


def run_predict(args) -> int:
    written = predict(args.model, args.task, args.decoder, args.images, args.out, layers=args.layers,
                      img_size=args.img_size, classes=args.classes, device=args.device)
    print(f"wrote {len(written)} {args.task} predictions to {args.out}")
    return 0


def predict(model, task: str, decoder_path, images, out, *, layers=None, img_size=None, classes=None,
            device="cpu") -> list[Path]:
    """Run the decoder over `images`; returns the PNGs written."""
    from PIL import Image

    from tipslab.modules.api import load_model
    from tipslab.modules.dense_labels import class_names
    from tipslab.modules.dpt import normals_to_unit
    from tipslab.modules.official_decoders import load_decoder
    from tipslab.modules.vision import default_dense_layers, dpt_inputs
    from tipslab.platform.embed import collect_images

    paths = collect_images(list(images), None)
    loaded = load_model(model, device, img_size=img_size)
    vision = loaded.encoder.vision
    decoder = load_decoder(decoder_path, task, embed_dim=vision.embed_dim).to(device)
    layers = list(layers) if layers else list(default_dense_layers(len(vision.blocks)))
    names = class_names(decoder.num_outputs, classes) if task == "seg" else None
    out = Path(out)
    written = []
    for path in paths:
        try:
            with Image.open(path) as opened:
                image = opened.convert("RGB")
        except OSError as err:
            raise TipslabError(f"--images {path}: not a readable image ({err})") from None
        size = (image.height, image.width)
        with torch.no_grad():
            x = loaded.preprocess(image)[None].to(device)
            features = dpt_inputs(vision.intermediate_layers(x, layers, norm=True))
            if task == "normals":
                result = normals_to_unit(decoder(features), size)[0].permute(1, 2, 0)
            elif task == "depth":
                result = decoder(features, size)[0, 0]
            else:
                result = decoder(features, size)[0].argmax(0).to(torch.int16)
        array = result.cpu().numpy()
        pixels = np.asarray(image)
        stem = out / f"{path.stem}_{task}"
        atomic_write(stem.with_suffix(".npy"), lambda tmp, a=array: _save_npy(tmp, a))
        png = {"depth": render_depth, "normals": render_normals, "seg": render_seg}[task]
        figure = png(pixels, array, names) if task == "seg" else png(pixels, array)
        written.append(atomic_write_bytes(stem.with_suffix(".png"), figure))
    return written


def _save_npy(tmp: str, array: np.ndarray) -> None:
    with open(tmp, "wb") as handle:  # a handle: np.save would append .npy to the temp name
        np.save(handle, array)


# ------------------------------------------------------------------------------ pictures
def _figure(panels: int, image: np.ndarray, widths=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h, w = image.shape[:2]
    height = 4.0
    fig, axes = plt.subplots(1, panels, figsize=(sum(widths or [1] * panels) * height * w / h + 0.4, height + 0.5),
                             gridspec_kw={"width_ratios": widths} if widths else None)
    axes[0].imshow(image)
    axes[0].set_title("image")
    for ax in axes:
        ax.axis("off")
    return plt, fig, axes


def _png(plt, fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return buffer.getvalue()


def render_depth(image: np.ndarray, depth: np.ndarray) -> bytes:
    """Image | depth in turbo (near warm, far cool: reversed, so what is close stands out) + bar in metres."""
    plt, fig, axes = _figure(2, image)
    low, high = np.percentile(depth, [1, 99]) if depth.size else (0, 1)
    shown = axes[1].imshow(depth, cmap="turbo_r", vmin=float(low), vmax=float(max(high, low + 1e-3)))
    axes[1].set_title(f"depth (m): {depth.min():.2f} to {depth.max():.2f}")
    bar = fig.colorbar(shown, ax=axes[1], fraction=0.046, pad=0.02)
    bar.set_label("metres")
    return _png(plt, fig)


def render_normals(image: np.ndarray, normals: np.ndarray) -> bytes:
    """Image | normals as RGB | a key sphere showing which colour points where."""
    plt, fig, axes = _figure(3, image, widths=[1, 1, 0.3])
    axes[1].imshow(np.clip((normals + 1) / 2, 0, 1))
    axes[1].set_title("surface normals (RGB = xyz)")
    axes[2].imshow(normal_key())
    axes[2].set_title("key", fontsize=9)
    return _png(plt, fig)


def normal_key(size: int = 96) -> np.ndarray:
    """RGB of a sphere's normals seen head on (white outside): the colour of each direction."""
    ys, xs = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    r2 = xs**2 + ys**2
    normals = np.stack([xs, -ys, np.sqrt(np.clip(1 - r2, 0, 1))], -1)
    key = (normals + 1) / 2
    key[r2 > 1] = 1.0
    return key


def render_seg(image: np.ndarray, labels: np.ndarray, names: list[str]) -> bytes:
    """Image | classes blended over it | legend (colour, name, share of the image), largest first.

    A class named "background" is left uncoloured (the image, dimmed), so the objects stand out;
    classes under 0.5% of the image are counted under the legend instead of listed."""
    from matplotlib.patches import Patch

    from tipslab.modules.dense_labels import palette

    colours = palette(len(names)).astype(np.float64)
    plt, fig, axes = _figure(3, image, widths=[1, 1, 0.6])
    ids = labels.astype(np.int64)
    blended = 0.4 * image + 0.6 * colours[ids]
    background = np.isin(ids, [i for i, n in enumerate(names) if n == "background"])
    blended[background] = 0.55 * image[background]
    axes[1].imshow(blended.clip(0, 255).astype(np.uint8))
    axes[1].set_title("segmentation")
    found, counts = np.unique(labels, return_counts=True)
    order = [i for i in np.argsort(-counts) if counts[i] >= 0.005 * labels.size][:MAX_LEGEND]
    handles = [Patch(facecolor=(0.3, 0.3, 0.3) if names[found[i]] == "background" else colours[found[i]] / 255.0,
                     edgecolor="black", label=f"{names[found[i]]} ({100 * counts[i] / labels.size:.0f}%)")
               for i in order]
    rest = len(found) - len(order)
    axes[2].legend(handles=handles, loc="center left", frameon=False, fontsize=9,
                   title=f"{len(found)} classes" + (f"\n({rest} under 0.5% not listed)" if rest else ""))
    return _png(plt, fig)
