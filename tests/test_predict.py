"""`tipslab predict`: a tiny encoder and official-layout decoder files written here; PNGs and
arrays at each image's own size, and one-line errors for a decoder of the wrong width."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tipslab.modules.checkpoint import save_checkpoint
from tipslab.modules.dpt import DPTDecoder
from tipslab.modules.encoder import build_encoder
from tipslab.modules.official_decoders import export_decoder
from tipslab.platform.cli import main
from tipslab.platform.config import load_config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    torch.manual_seed(0)
    model_cfg = load_config("tipsv2_tiny").model
    save_checkpoint(build_encoder(model_cfg), model_cfg, root / "model")
    decoders = {}
    for task, outputs in (("seg", 4), ("depth", 256), ("normals", 3)):
        torch.manual_seed(1)
        decoder = DPTDecoder(task, 192, outputs, channels=16)
        with torch.no_grad():  # lift the depth head's scores so bins get distinct weights
            decoder.head.bias.normal_(0.0, 1.0)
        decoders[task] = export_decoder(decoder, root / f"{task}.npz")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (60, 90, 3), dtype=np.uint8)).save(images / "wide.png")
    Image.fromarray(rng.integers(0, 255, (50, 40, 3), dtype=np.uint8)).save(images / "tall.jpg")
    (root / "classes.txt").write_text("sky\nwall\nfloor\ntree\n")
    return root, decoders


@pytest.mark.parametrize("task", ["depth", "normals", "seg"])
def test_predict_writes_pictures_and_arrays_at_image_size(setup, task, capsys):
    root, decoders = setup
    out = root / f"out-{task}"
    extra = ["--classes", str(root / "classes.txt")] if task == "seg" else []
    assert main(["predict", str(root / "model"), "--task", task, "--decoder", str(decoders[task]),
                 "--images", str(root / "images"), "--out", str(out), *extra]) == 0
    assert "wrote 2" in capsys.readouterr().out
    for stem, size in (("wide", (60, 90)), ("tall", (50, 40))):
        array = np.load(out / f"{stem}_{task}.npy")
        with Image.open(out / f"{stem}_{task}.png") as picture:
            assert picture.width > picture.height / 2 and picture.mode in ("RGB", "RGBA")
        if task == "depth":
            assert array.shape == size and array.dtype == np.float32
            assert 0.001 <= array.min() and array.max() <= 10.0 and array.std() > 0
        elif task == "normals":
            assert array.shape == (*size, 3)
            np.testing.assert_allclose(np.linalg.norm(array, axis=-1), 1.0, atol=1e-4)
        else:
            assert array.shape == size and array.dtype == np.int16 and 0 <= array.min() and array.max() < 4


def test_wrong_width_decoder_is_a_one_line_error(setup, tmp_path):
    root, _ = setup
    export_decoder(DPTDecoder("depth", 384, channels=16), tmp_path / "small.npz")  # an s-size decoder
    exe = Path(sys.executable).parent / "tipslab"
    done = subprocess.run([str(exe), "predict", str(root / "model"), "--task", "depth", "--decoder",
                           str(tmp_path / "small.npz"), "--images", str(root / "images"), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "384-wide" in lines[0] and "(a s-size decoder)" in lines[0] and "192" in lines[0]
