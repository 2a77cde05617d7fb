"""Small durable-file helpers for index directories: files written and fsynced before they are
renamed into place, an atomic exchange of two directories, a journal (``.commit.json``) that
replaces several files of a directory as one unit and is redone by whoever finds it, and the
writer lock (``.lock``) that keeps one writer at a time."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
from pathlib import Path

import numpy as np

from tipslab.errors import TipslabError
from tipslab.retrieval.faiss_backend import to_cpu

JOURNAL = ".commit.json"
LOCK = ".lock"


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=False)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())


def atomic_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write_json(tmp, data)
    os.replace(tmp, path)
    fsync_path(path.parent)


def write_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        np.save(handle, array)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_parquet(path: Path, frame) -> None:
    frame.write_parquet(path)
    fsync_path(path)


def write_faiss(path: Path, index) -> None:
    import faiss

    faiss.write_index(to_cpu(index), str(path))
    fsync_path(path)


def swap_dirs(a: Path, b: Path) -> bool:
    """Exchange two directories in one atomic step (Linux renameat2); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0


def commit(root: Path, renames: dict[str, str]) -> None:
    """Replace several files of ``root`` as one unit: journal first, then the renames."""
    atomic_json(root / JOURNAL, {"renames": renames})
    redo_journal(root)


def redo_journal(root: Path) -> None:
    """Finish an interrupted commit. Idempotent: a rename already done has no source left."""
    journal = root / JOURNAL
    if not journal.exists():
        return
    try:
        renames = json.loads(journal.read_text(encoding="utf-8"))["renames"]
    except FileNotFoundError:
        return  # another process finished it a moment ago
    except (ValueError, KeyError, TypeError) as err:  # JSON, UTF-8 and shape errors alike
        raise TipslabError(f"{journal}: not a commit journal ({type(err).__name__}); delete it to open the index "
                           "as last committed") from None
    # A journal only ever renames "<file>.pending" to "<file>" inside the directory: refuse anything else.
    if not isinstance(renames, dict) or not all(
            isinstance(f, str) and isinstance(p, str) and p == f + ".pending" and "/" not in f and f not in ("", ".", "..")
            for f, p in renames.items()):
        raise TipslabError(f"{journal}: not a commit journal (unexpected renames); delete it to open the index "
                           "as last committed")
    for final, pending in renames.items():
        # A rename already done has no source left; another process may be redoing it too.
        with contextlib.suppress(FileNotFoundError):
            os.replace(root / pending, root / final)
    fsync_path(root)
    journal.unlink(missing_ok=True)
    fsync_path(root)


@contextlib.contextmanager
def locked(root: Path):
    """One writer at a time per index directory (readers need no lock: commits are atomic)."""
    import fcntl

    with open(root / LOCK, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TipslabError(f"{root}: another process is adding to this index; try again when it is done") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
