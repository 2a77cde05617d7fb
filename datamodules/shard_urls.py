"""Where shards live: resolving a shard list and opening its tars, local or through fsspec.

A shard list (``data.path`` or a ``data.sources`` path) is a folder of ``.tar`` files, one tar,
a brace pattern (``a-{000..099}.tar``, expanded with braceexpand; it works on URLs too) or a
list. A URL with a scheme (``file://``, ``memory://``, ``s3://``, ``gs://``, ``hf://``...) is
resolved and opened through fsspec (a URL folder is listed for its ``*.tar``); ``pipe:``,
``http(s)://`` and plain paths are opened by webdataset's ``gopen``, as before. Remote
filesystems need their fsspec package (``s3fs``, ``gcsfs``...), which start-up asks for by name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import braceexpand
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_expander

from tipslab.errors import TipslabError

SHARD_GLOB = "*.tar"
# Opened by webdataset itself (curl for http: fsspec's needs aiohttp sessions per process).
WEBDATASET_SCHEMES = ("pipe:", "http://", "https://")


def is_fsspec_url(url: str) -> bool:
    return "://" in url and not url.startswith(WEBDATASET_SCHEMES)


def _filesystem(url: str):
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as err:
        raise TipslabError(f"shards: cannot open {url}: {err}") from None


def _listed(url: str) -> list[str] | None:
    """The ``*.tar`` files of a URL folder (sorted, as URLs), or None when ``url`` is no folder."""
    fs, path = _filesystem(url)
    if not fs.isdir(path):
        return None
    found = sorted(fs.glob(f"{path.rstrip('/')}/{SHARD_GLOB}"))
    if not found:
        raise TipslabError(f"shards: no {SHARD_GLOB} shards in {url}")
    return [fs.unstrip_protocol(p) for p in found]


def _missing(url: str) -> bool:
    if url.startswith(WEBDATASET_SCHEMES):
        return False  # asked at read time (a stat per remote shard would cost a request each)
    if is_fsspec_url(url):
        fs, path = _filesystem(url)
        return not fs.exists(path)
    return not Path(url).is_file()


def resolve_shards(urls_or_dir) -> list[str]:
    """The shard list named by a folder, one tar, a brace pattern, a list or a URL (see module docstring)."""
    from tipslab.datamodules.shard_writer import SHARD_PATTERN

    if isinstance(urls_or_dir, (list, tuple)):
        urls = [str(u) for u in urls_or_dir]
        if not urls:
            raise TipslabError("shards: the shard list is empty; expected at least one .tar")
    else:
        spec = str(urls_or_dir)
        path = Path(spec)
        if "{" in spec:
            urls = list(braceexpand.braceexpand(spec))
        elif is_fsspec_url(spec):
            listed = _listed(spec)
            if listed is not None:
                return listed
            urls = [spec]
        elif path.is_dir():
            urls = sorted(str(p) for p in path.glob(SHARD_GLOB))
            if not urls:
                raise TipslabError(f"shards: no {SHARD_GLOB} shards in {path}; expected files like "
                                   f"{SHARD_PATTERN.format(0)}")
            return urls
        elif "://" in spec or spec.startswith("pipe:") or path.is_file():
            urls = [spec]
        else:
            raise TipslabError(f"shards: {spec} does not exist; expected a folder of .tar shards, a .tar or a pattern")
    missing = [u for u in urls if _missing(u)]
    if missing:
        raise TipslabError(f"shards: {len(missing)} shard(s) not found, first {missing[0]}")
    return urls


def _opened(urls, handler: Callable[[Exception], bool]) -> Iterator[dict]:
    """``{"url", "stream"}`` per shard (webdataset's ``url_opener`` protocol), each closed after use."""
    for url in urls:
        try:
            if is_fsspec_url(url):
                fs, path = _filesystem(url)
                stream = fs.open(path, "rb")
            else:
                stream = gopen(url)
        except Exception as exn:  # noqa: BLE001 (webdataset's handler decides; it counts bad tars)
            exn.args = exn.args + (url,)
            if handler(exn):
                continue
            break
        try:
            yield {"url": url, "stream": stream}
        finally:
            stream.close()  # the expander has read the whole shard when it asks for the next


def tar_samples(urls, handler: Callable[[Exception], bool]) -> Iterator[dict]:
    """Raw samples (``{"__key__", "__url__", ext: bytes}``) of the shards ``urls``, in order:
    webdataset's ``tarfile_samples`` with the fsspec-aware opener."""
    return group_by_keys(tar_file_expander(_opened(urls, handler), handler=handler), handler=handler)

