"""Bad samples: every kind planted in a shard is converted or skipped and counted by kind, logged to
MLflow; a run whose share of bad samples is over the limit stops with a clear error."""

import json

import awkward_images as awk
import lightning as L
import mlflow
import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from tipslab.datamodules.datamodule import PretrainDataModule
from tipslab.errors import TipslabError
from tipslab.modules.tokenizers import build_tokenizer

TOKENIZER = build_tokenizer(context_length=16)
# Plain good samples after the awkward ones: 16 + 7 converted + "last" = 24 readable, three batches
# of 8, so a two-step run (Lightning fetches one batch ahead) reads every sample exactly once.
GOOD = 16
# What each planted sample must count as: ("skipped" | "converted", kind).
PLANTED = {
    "trunc": ("skipped", "truncated"), "zero": ("skipped", "empty_file"), "notimage": ("skipped", "not_image"),
    "bomb": ("skipped", "too_large"), "nocaption": ("skipped", "no_caption"),
    "emptycaption": ("skipped", "empty_caption"), "badjson": ("skipped", "bad_json"),
    "cmyk": ("converted", "cmyk"), "sixteen": ("converted", "high_bit_depth"), "palette": ("converted", "palette"),
    "rgba": ("converted", "alpha"), "exif": ("converted", "exif_rotated"), "utf8": ("converted", "invalid_utf8"),
    "la": ("converted", "alpha"),
}


def meta(text="a small red square"):
    return json.dumps({"captions": {"alt": text, "short": f"A {text}."}}).encode()


def plant(path):
    good = awk.encode(Image.fromarray(awk.base_pixels(28, 28)), "PNG")
    with wds.TarWriter(str(path)) as writer:
        writer.write({"__key__": "trunc", "jpg": awk.truncated_jpeg(), "json": meta()})
        writer.write({"__key__": "zero", "png": b"", "json": meta()})
        writer.write({"__key__": "notimage", "png": b"<html>404 not found</html>", "json": meta()})
        writer.write({"__key__": "bomb", "png": awk.bomb_png(), "json": meta()})
        writer.write({"__key__": "nocaption", "png": good})
        writer.write({"__key__": "emptycaption", "png": good, "json": json.dumps({"captions": {"alt": " "}}).encode()})
        writer.write({"__key__": "badjson", "png": good, "json": b'{"captions": '})
        writer.write({"__key__": "cmyk", "jpg": awk.cmyk_jpeg()[0], "json": meta()})
        writer.write({"__key__": "sixteen", "png": awk.png16_grey()[0], "json": meta()})
        writer.write({"__key__": "palette", "png": awk.palette_png()[0], "json": meta()})
        writer.write({"__key__": "rgba", "png": awk.rgba_png()[0], "json": meta()})
        writer.write({"__key__": "exif", "jpg": awk.exif_rotated_jpeg()[0], "json": meta()})
        writer.write({"__key__": "utf8", "png": good, "txt": b"caf\xe9 sign \xff"})
        writer.write({"__key__": "la", "png": awk.la_png()[0], "json": meta()})
        for i in range(GOOD):
            writer.write({"__key__": f"good{i}", "png": good, "json": meta()})
        writer.write({"__key__": "last", "png": good, "json": meta()})
    return path


def expected(which):
    out = {}
    for what, kind in PLANTED.values():
        if what == which:
            out[kind] = out.get(kind, 0) + 1
    return out


class MeanOfImages(L.LightningModule):
    """The smallest system that trains on Batches: the run under test is the data's."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def training_step(self, batch, _):
        return (self.scale * batch.images.mean() - 0.5) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def data_cfg(folder, **overrides):
    # One shard, no sample shuffling: the planted samples come first, in the order written.
    return {"source": "shards", "path": str(folder), "image_size": 28, "batch_size": 8, "num_workers": 0,
            "shuffle_buffer": 1, "bad_samples": {"max_share": 0.5, "min_seen": 10}, **overrides}


def test_every_planted_kind_is_counted_and_logged_to_mlflow(tmp_path):
    (tmp_path / "shards").mkdir()
    plant(tmp_path / "shards" / "fuzz.tar")
    data = PretrainDataModule(data_cfg(tmp_path / "shards"), TOKENIZER, seed=0)
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = L.pytorch.loggers.MLFlowLogger(experiment_name="fuzz", tracking_uri=tracking)
    trainer = L.Trainer(max_steps=2, logger=logger, log_every_n_steps=1, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(MeanOfImages(), datamodule=data)  # the run finishes: nothing planted stops it
    assert trainer.global_step == 2
    loader = trainer.train_dataloader
    # Every planted sample was read (once) for the first batch.
    assert dict(loader.quality.skipped) == expected("skipped")
    assert {k: loader.quality.converted[k] for k in expected("converted")} == expected("converted")
    client = mlflow.MlflowClient(tracking_uri=tracking)
    logged = client.get_run(logger.run_id).data.metrics
    for kind, count in expected("skipped").items():
        assert logged[f"data/skipped/{kind}"] == count
    assert logged["data/converted/high_bit_depth"] == 1
    assert logged["data/skipped"] == sum(expected("skipped").values())


def test_converted_samples_carry_their_correct_pictures(tmp_path):
    from tipslab.datamodules.shards import ShardDataset

    shard = plant(tmp_path / "fuzz.tar")
    samples = {s["key"]: s for s in ShardDataset(shard, shuffle=False)}
    assert set(samples) == {k for k, (what, _) in PLANTED.items() if what == "converted"} | {
        f"good{i}" for i in range(GOOD)} | {"last"}
    assert np.array_equal(np.asarray(samples["sixteen"]["image"]), awk.png16_grey()[1])
    assert np.array_equal(np.asarray(samples["rgba"]["image"]), awk.rgba_png()[1])
    assert samples["utf8"]["captions"]["alt"] == "caf\ufffd sign \ufffd"


def test_too_many_bad_samples_stop_the_run_with_a_clear_error(tmp_path):
    (tmp_path / "shards").mkdir()
    plant(tmp_path / "shards" / "fuzz.tar")  # 7 bad in the first 15 read
    loader = PretrainDataModule(data_cfg(tmp_path / "shards", bad_samples={"max_share": 0.2, "min_seen": 10}),
                                TOKENIZER, seed=0).train_dataloader()
    with pytest.raises(TipslabError, match=r"7 of \d+ samples read are bad .*max_share=0.2.*truncated 1"):
        for _ in loader:
            pass


def test_a_wrong_caption_key_fails_at_start_up(tmp_path):
    (tmp_path / "shards").mkdir()
    plant(tmp_path / "shards" / "fuzz.tar")
    cfg = data_cfg(tmp_path / "shards", captions={"long": "json:captions.longg"})
    with pytest.raises(TipslabError, match=r"data.captions.long='json:captions.longg' matches none of the first "
                                           r"\d+ samples.*json:captions.alt, json:captions.short"):
        PretrainDataModule(cfg, TOKENIZER, seed=0).train_dataloader()
    ok = data_cfg(tmp_path / "shards", captions={"alt": "txt", "short": "json:captions.short"})
    batch = next(iter(PretrainDataModule(ok, TOKENIZER, seed=0).train_dataloader()))
    assert batch.granularities and set(batch.granularities) <= {"short", "alt"}
