"""`tipslab shards`: shards from a folder and from a manifest, read back with their captions and counts."""

import json

import awkward_images as awk
import numpy as np
import polars as pl
import pytest
from PIL import Image

from tipslab.datamodules.datamodule import PretrainDataModule
from tipslab.datamodules.shard_cli import parse_size
from tipslab.datamodules.shards import ShardDataset
from tipslab.modules.tokenizers import build_tokenizer
from tipslab.platform.cli import main


def picture(seed):
    return Image.fromarray(awk.base_pixels(28, 28, seed=seed))


@pytest.fixture()
def folder(tmp_path):
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    for i in range(5):
        picture(i).save(root / f"p{i}.png")
        (root / f"p{i}.txt").write_text(f"photo number {i}")
    picture(5).save(root / "sub" / "q.jpg", quality=95)
    (root / "sub" / "q.json").write_text(json.dumps({"captions": {"alt": "q", "long": "A long caption of q."}}))
    picture(6).save(root / "nocaption.png")
    (root / "broken.jpg").write_bytes(awk.truncated_jpeg())
    (root / "broken.txt").write_text("broken")
    (root / "deep.png").write_bytes(awk.png16_grey()[0])
    (root / "deep.txt").write_text("a 16-bit picture")
    return root


def test_folder_to_shards_and_back(folder, tmp_path, capsys):
    out = tmp_path / "shards"
    assert main(["shards", str(out), "--images", str(folder), "--samples-per-shard", "3"]) == 0
    summary = capsys.readouterr().out
    assert "wrote 7 samples in 3 shard(s)" in summary and "2 skipped (no_caption 1, truncated 1)" in summary
    written = sum(p.stat().st_size for p in out.glob("*.tar"))
    assert f"{written} bytes" in summary
    samples = {s["id"]: s for s in ShardDataset(out, shuffle=False)}
    assert sorted(samples) == ["deep.png", "p0.png", "p1.png", "p2.png", "p3.png", "p4.png", "sub/q.jpg"]
    assert samples["p3.png"]["captions"] == {"alt": "photo number 3"}
    assert np.array_equal(np.asarray(samples["p3.png"]["image"]), np.asarray(picture(3)))  # bytes kept as they were
    assert samples["sub/q.jpg"]["captions"] == {"alt": "q", "long": "A long caption of q."}
    assert np.array_equal(np.asarray(samples["deep.png"]["image"]), awk.png16_grey()[1])
    assert main(["shards", str(out), "--images", str(folder)]) == 2  # never mixes into old shards


def test_target_shard_size(folder, tmp_path, capsys):
    out = tmp_path / "small"
    assert main(["shards", str(out), "--images", str(folder), "--shard-size", "4KB"]) == 0
    shards = sorted(out.glob("*.tar"))
    assert len(shards) > 1 and all(p.stat().st_size >= 4000 for p in shards[:-1])
    assert sum(1 for _ in ShardDataset(out, shuffle=False)) == 7
    assert parse_size("1.5MiB") == 1572864 and parse_size("2GB") == 2 * 10**9
    assert main(["shards", str(tmp_path / "x"), "--images", str(folder), "--shard-size", "lots"]) == 2
    assert "--shard-size 'lots'" in capsys.readouterr().err


def test_manifest_to_shards_with_mapped_columns(tmp_path, capsys):
    images = tmp_path / "data" / "img"
    images.mkdir(parents=True)
    for i in range(6):
        picture(i).save(images / f"{i}.png")
    (images / "5.png").write_bytes(b"")  # zero bytes: skipped
    table = pl.DataFrame({"file": [f"img/{i}.png" for i in range(6)] + [None],
                          "title": [f"title {i}" for i in range(6)] + ["x"],
                          "description": [f"A long description of picture {i}." if i % 2 else None for i in range(6)] + [None]})
    manifest = tmp_path / "meta" / "m.csv"
    manifest.parent.mkdir()
    table.write_csv(manifest)
    out = tmp_path / "shards"
    args = ["shards", str(out), "--manifest", str(manifest), "--root", str(tmp_path / "data"),
            "--image-column", "file", "--alt", "title", "--long", "description"]
    assert main(args) == 0
    summary = capsys.readouterr().out
    assert "wrote 5 samples" in summary and "2 skipped (empty_file 1, missing_file 1)" in summary
    samples = sorted(ShardDataset(out, shuffle=False), key=lambda s: s["id"])
    assert [s["captions"] for s in samples[:2]] == [
        {"alt": "title 0"}, {"alt": "title 1", "long": "A long description of picture 1."}]
    bad = args[:-1] + ["nope"]
    assert main(["shards", str(tmp_path / "other")] + bad[2:]) == 2
    assert "--long nope: not a column" in capsys.readouterr().err


def test_csv_manifest_trains_with_a_root_and_mapped_captions(tmp_path):
    (tmp_path / "data").mkdir()
    for i in range(4):
        picture(i).save(tmp_path / "data" / f"{i}.png")
    manifest = tmp_path / "m.csv"
    pl.DataFrame({"image_path": [f"{i}.png" for i in range(4)], "title": [f"t{i}" for i in range(4)],
                  "words": [f"A picture numbered {i}." for i in range(4)]}).write_csv(manifest)
    cfg = {"source": "manifest", "path": str(manifest), "root": str(tmp_path / "data"), "image_size": 28,
           "batch_size": 2, "caption_granularities": ["short"], "captions": {"alt": "title", "short": "words"}}
    batch = next(iter(PretrainDataModule(cfg, build_tokenizer(context_length=16)).train_dataloader()))
    assert all(a.startswith("t") for a in batch.alt_texts) and set(batch.granularities) == {"short"}
    with pytest.raises(Exception, match=r"data.captions.short='wordz' is not a column"):
        PretrainDataModule({**cfg, "captions": {"short": "wordz"}}, build_tokenizer(context_length=16)).train_dataloader()
