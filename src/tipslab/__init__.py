"""tipslab: train, track, index and search patch-aligned image-text encoders (TIPSv2 recipe).

The card's folders (platform/, modules/, datamodules/, retrieval/, experiments/) live at the
repository root and install as ``tipslab.<folder>``.
"""

from pathlib import Path as _Path

_checkout = _Path(__file__).resolve().parents[2]
if (_checkout / "pyproject.toml").is_file() and (_checkout / "platform").is_dir():
    # In a source checkout, let `tipslab.platform` and `tipslab.experiments` resolve from the root:
    # setuptools' default (lenient) editable finder cannot see these namespace folders, and
    # platform/ must stay without __init__.py so it never shadows the standard `platform` module.
    __path__.append(str(_checkout))  # noqa: F821 (package __path__)

__version__ = "0.1.0"


def load_model(name_or_path, **kwargs):
    """Encoders + tokenizer + preprocessing from a tipslab checkpoint or an official release."""
    from tipslab.modules.api import load_model as _load_model

    return _load_model(name_or_path, **kwargs)


def search(index_dir, query, k: int = 5, **kwargs):
    """Top ``k`` regions of an index directory matching a text query, as a polars DataFrame
    (image, box, score, confidence; ``heatmap=True`` adds the heatmaps). See
    `tipslab.retrieval.hits_frame.search`."""
    from tipslab.retrieval.hits_frame import search as _search

    return _search(index_dir, query, k, **kwargs)


__all__ = ["load_model", "search", "__version__"]
