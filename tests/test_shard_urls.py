"""Shard lists given as URLs: read through fsspec (memory:// here), brace patterns and folders too."""

import fsspec
import pytest

from tipslab.datamodules.datamodule import PretrainDataModule
from tipslab.datamodules.scenes import ScenesDataset
from tipslab.datamodules.shard_urls import resolve_shards
from tipslab.datamodules.shards import ShardDataset, write_scene_shards
from tipslab.errors import TipslabError
from tipslab.modules.tokenizers import build_tokenizer

TOKENIZER = build_tokenizer(context_length=16)


@pytest.fixture()
def shards(tmp_path):
    """The same three shards on disk and in fsspec's in-memory filesystem (a folder per test)."""
    paths = write_scene_shards(ScenesDataset("train", 12, 42, seed=0), tmp_path / "local", samples_per_shard=4)
    memory = fsspec.filesystem("memory")
    root = f"/{tmp_path.name}/shards"
    for path in paths:
        memory.pipe(f"{root}/{path.name}", path.read_bytes())
    memory.pipe(f"{root}/notes.txt", b"not a shard")
    yield tmp_path / "local", f"memory://{root}"
    memory.rm(f"/{tmp_path.name}", recursive=True)


def ids_of(source, **overrides) -> list[str]:
    cfg = {"source": "shards", "path": source, "image_size": 42, "batch_size": 4, "num_workers": 0,
           "shuffle_buffer": 4, **overrides}
    loader = PretrainDataModule(cfg, TOKENIZER, seed=1).train_dataloader()
    return [i for batch, _ in zip(loader, range(3)) for i in batch.ids]


def test_memory_urls_read_like_local_files(shards):
    local, url = shards
    listed = resolve_shards(url)  # a URL folder: its *.tar, sorted
    assert listed == [f"{url}/shard-00000{i}.tar" for i in range(3)]
    assert resolve_shards(f"{url}/shard-{{000000..000002}}.tar") == listed  # braces expand on URLs
    expected = ids_of(str(local))
    assert len(set(expected)) == 12
    assert ids_of(url) == expected
    assert ids_of(f"{url}/shard-{{000000..000002}}.tar") == expected
    assert ids_of(f"file://{local}") == expected  # file:// goes through fsspec too


def test_url_sources_mix_and_count(shards):
    local, url = shards
    dataset = ShardDataset(None, sources=[{"path": f"{url}/shard-{{000000..000001}}.tar", "weight": 1.0},
                                          {"path": str(local / "shard-000002.tar"), "weight": 1.0}])
    samples = list(dataset.samples(0, 1, 0))
    counts = dataset.counts.take()
    assert len({s["id"] for s in samples}) == 12 and counts["seen"] == 12 and counts["skipped"] == {}


def test_url_errors_name_the_url(shards):
    _, url = shards
    with pytest.raises(TipslabError, match=r"1 shard\(s\) not found, first memory://.*shard-000003.tar"):
        resolve_shards(f"{url}/shard-{{000001..000003}}.tar")
    with pytest.raises(TipslabError, match=r"no \*\.tar shards in memory://"):
        resolve_shards(_empty_folder(url))
    with pytest.raises(TipslabError, match="cannot open nosuchfs://x/y.tar"):
        resolve_shards("nosuchfs://x/y.tar")


def _empty_folder(url: str) -> str:
    fs = fsspec.filesystem("memory")
    folder = url.replace("memory://", "") + "-empty"
    fs.pipe(f"{folder}/readme.txt", b"no shards here")
    return f"memory://{folder}"
