"""`tipslab eval` from the command line: datasets in their real layouts, outputs, bad input."""

import json

import numpy as np
import polars as pl
import pytest
from PIL import Image
from test_official import write_pair
from test_tokenizers import (
    sp_model,  # noqa: F401  (fixture: a tiny SentencePiece model trained there)
)

from tipslab.platform.cli import main


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    import torch
    from omegaconf import OmegaConf

    from tipslab.modules.checkpoint import save_checkpoint
    from tipslab.modules.encoder import build_encoder
    from tipslab.platform.config import load_config

    torch.manual_seed(0)
    cfg = load_config("tipsv2_tiny", ["model.vision.img_size=56", "model.text.context_length=16"])
    out = tmp_path_factory.mktemp("untrained") / "model"
    save_checkpoint(build_encoder(cfg.model), OmegaConf.to_container(cfg.model, resolve=True), out)
    return out


def _datasets(root):
    """A Karpathy JSON, a class folder and a k-NN folder made of scenes pictures."""
    from tipslab.datamodules.scenes import ScenesDataset

    scenes = ScenesDataset("val", num_images=6, image_size=56, seed=0)
    (root / "flickr" / "images").mkdir(parents=True)
    entries = []
    for i in range(len(scenes)):
        scene = scenes.scene(i)
        Image.fromarray(scene.image).save(root / "flickr" / "images" / f"{i}.jpg")
        entries.append({"filename": f"{i}.jpg", "split": "test",
                        "sentences": [{"raw": scene.captions["short"]}, {"raw": scene.captions["long"]}]})
    entries.append({"filename": "not-used.jpg", "split": "train", "sentences": [{"raw": "x"}]})
    (root / "flickr" / "dataset_flickr30k.json").write_text(json.dumps({"images": entries}))
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name, colour in (("red_square", (220, 30, 30)), ("blue_square", (40, 90, 235))):
            folder = root / "knn" / split / name
            folder.mkdir(parents=True)
            for j in range(3):
                pixels = (np.array(colour) * rng.uniform(0.8, 1.0, (40, 40, 1))).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{j}.png")
    return root / "flickr" / "dataset_flickr30k.json", root / "knn" / "val", root / "knn"


def test_eval_prints_a_table_and_writes_it_with_pictures(untrained, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    karpathy, classes, knn = _datasets(tmp_path)
    out = tmp_path / "eval"
    code = main(["eval", str(untrained), "--suite", "zeroshot_seg,retrieval,classification,knn",
                 "--data", f"retrieval={karpathy}", "--data", f"classification={classes}", "--data", f"knn={knn}",
                 "--set", "num_scenes=4", "--out", str(out), "--mlflow"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "| zeroshot_seg" in printed and "mIoU" in printed and "i2t_R@10" in printed
    table = pl.read_csv(out / "eval.csv")
    assert set(table["suite"]) == {"zeroshot_seg", "retrieval", "classification", "knn"}
    assert set(table.filter(pl.col("suite") == "retrieval")["data"]) == {"dataset_flickr30k.json"}
    assert set(table.filter(pl.col("suite") == "knn")["variant"]) == {"cls1", "cls2"}
    # 6 images with 2 captions: t2i R@5 chance is 5/6 of the images.
    chance = table.filter((pl.col("suite") == "retrieval") & (pl.col("metric") == "t2i_R@5"))["chance"][0]
    assert chance == pytest.approx(100 * 5 / 6)
    for name in ("pca.png", "query_heatmaps.png", "zeroshot_seg.png"):
        assert (out / name).stat().st_size > 5000 and f"{out / name}" in printed
    assert json.loads((out / "eval.json").read_text())["rows"]
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("tipslab-eval").experiment_id])
    assert "eval/zeroshot_seg/scenes/dense/mIoU" in run.data.metrics
    assert "eval/retrieval/dataset_flickr30k.json/cls2/t2i_R5" in run.data.metrics


@pytest.mark.parametrize("args, message", [
    (["--suite", "zeroshot_seg,segmentation"], "--suite 'segmentation': unknown suite"),
    (["--data", "zeroshot=/x"], "--data zeroshot=...: unknown suite"),
    (["--data", "zeroshot_seg"], "expected KEY=VALUE"),
    (["--set", "seg.windw=3"], "Did you mean: 'window'?"),
    (["--suite", "zeroshot_seg", "--data", "zeroshot_seg=/no/such/folder"], "/no/such/folder: does not exist"),
])
def test_bad_input_is_a_one_line_error(untrained, capsys, args, message):
    code = main(["eval", str(untrained), "--no-pictures", *args])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_evaluation_is_deterministic_and_leaves_the_global_rng_alone(untrained):
    import torch

    from tipslab.platform.eval_suites import evaluate_model

    torch.manual_seed(123)
    before = torch.get_rng_state()
    settings = {"num_scenes": 4, "knn": {"train_scenes": 8}}
    a = evaluate_model(str(untrained), "all", settings=settings, pictures=False, log=None).table
    b = evaluate_model(str(untrained), "all", settings=settings, pictures=False, log=None).table
    assert a.equals(b)
    assert a.height == 27 and a["value"].is_not_null().all()  # 24 + the pointing game's 3
    assert torch.equal(torch.get_rng_state(), before)


def test_eval_runs_on_official_weights(tmp_path, capsys, sp_model):  # noqa: F811
    import shutil

    folder = tmp_path / "official"
    folder.mkdir()
    write_pair(folder, "tiny", grid=4, vocab=200, temperature=0.03, stem="tips_v2_oss_t14")
    shutil.copy(sp_model, folder / "tokenizer.model")
    code = main(["eval", str(folder / "tips_v2_oss_t14_vision.npz"), "--suite", "zeroshot_seg,regions",
                 "--set", "num_scenes=4", "--out", str(tmp_path / "out"), "--no-pictures"])
    assert code == 0, capsys.readouterr().err
    table = pl.read_csv(tmp_path / "out" / "eval.csv")
    assert set(table["suite"]) == {"zeroshot_seg", "regions"}


def test_probe_suites_run_through_tipslab_eval_when_named(tmp_path):
    """linear_seg and depth are known suites (not part of "all"), reported in the same table."""
    from tipslab.modules.checkpoint import save_checkpoint
    from tipslab.modules.encoder import build_encoder
    from tipslab.platform.eval_suites import PROBE_SUITES, evaluate_model, parse_suites

    assert not set(PROBE_SUITES) & set(parse_suites("all"))
    assert parse_suites("linear_seg,depth") == ["linear_seg", "depth"]
    cfg = {"vision": {"size": "tiny", "img_size": 56}, "text": {"size": "tiny", "context_length": 16},
           "tokenizer": {"kind": "bpe", "context_length": 16}}
    save_checkpoint(build_encoder(cfg), cfg, tmp_path / "m")
    report = evaluate_model(tmp_path / "m", suites=["linear_seg", "depth"], settings={"probes": {"steps": 3},
                                                                                    "num_scenes": 8},
                            pictures=False, log=None)
    assert 0.0 <= report.value("linear_seg", "mIoU", "linear probe") <= 100.0
    assert report.value("depth", "RMSE_m", "linear probe") > 0
    assert 0.0 <= report.value("depth", "delta1", "linear probe") <= 100.0
    # Beside each probe row, the ceiling of the patch grid: a 3-step probe is far below it.
    assert report.value("linear_seg", "mIoU", "per-patch oracle") > report.value("linear_seg", "mIoU", "linear probe")
    assert report.value("depth", "RMSE_m", "per-patch oracle") < report.value("depth", "RMSE_m", "linear probe")
