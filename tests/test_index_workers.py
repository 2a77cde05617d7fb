"""`tipslab index --workers N`: several extraction processes over disjoint parts of the source,
merged into one index equal to a one-process build; a rank killed mid-extraction leaves the last
committed index, and running the command again finishes (reusing the finished ranks)."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
from test_search import cli, save_tiny

from tipslab.retrieval.index_dir import IndexDirectory
from tipslab.retrieval.shard_parts import STARTED, share_dir, staging_dir

CLI = [sys.executable, "-m", "tipslab.platform.cli"]


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("model") / "tiny")


def assert_same_index(merged: IndexDirectory, single: IndexDirectory):
    assert merged.images["key"].to_list() == single.images["key"].to_list()
    assert merged.images["first_vector_id"].to_list() == single.images["first_vector_id"].to_list()
    assert merged.num_vectors == single.num_vectors
    a, b = merged.store.take(np.arange(merged.num_vectors)), single.store.take(np.arange(single.num_vectors))
    np.testing.assert_allclose(a, b, atol=1e-5)
    queries = b[::37][:12] + 0.05  # off the stored vectors: no exact ties to break differently
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    sa, ia = merged.search_vectors(queries, 5)
    sb, ib = single.search_vectors(queries, 5)
    np.testing.assert_array_equal(ia, ib)
    np.testing.assert_allclose(sa, sb, atol=1e-5)
    for key in ("counts", "preprocessing", "feature", "dim", "factory", "pooling"):
        assert merged.manifest[key] == single.manifest[key], key
    assert merged.manifest["model"]["sha256"] == single.manifest["model"]["sha256"]


@pytest.mark.slow
def test_two_workers_merge_into_the_index_one_process_builds(tiny_model, tmp_path):
    assert cli("index", tiny_model, "scenes:val:30", "--out", tmp_path / "one", "--factory", "Flat", "--quiet") == 0
    run = subprocess.run([*CLI, "index", str(tiny_model), "scenes:val:30", "--out", str(tmp_path / "two"),
                          "--factory", "Flat", "--workers", "2", "--quiet"],
                         capture_output=True, text=True, timeout=300, env=env())
    assert run.returncode == 0, run.stderr
    assert "30 images, 1920 patch vectors" in run.stdout
    merged, single = IndexDirectory.open(tmp_path / "two"), IndexDirectory.open(tmp_path / "one")
    assert_same_index(merged, single)
    # one directory: one manifest and FAISS index, generated scenes saved inside it, no staging left
    assert len(list((tmp_path / "two" / "images").iterdir())) == 30
    assert not staging_dir(tmp_path / "two").exists()
    for image_id in (0, 17, 29):  # the saved scenes are the very images one process saved
        path = merged.resolve_image_path(merged.image_info(image_id)["image_path"])
        other = single.resolve_image_path(single.image_info(image_id)["image_path"])
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(other)))


@pytest.mark.slow
def test_folder_with_an_unreadable_file_merges_in_source_order(tiny_model, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(7):
        Image.fromarray(rng.integers(0, 255, (40 + 3 * i, 50, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    (folder / "p3.png").write_bytes(b"not a png")  # rank 1's second image (items 1, 3, 5)
    assert cli("index", tiny_model, folder, "--out", tmp_path / "one", "--factory", "Flat", "--quiet") == 0
    # Each of the 3 extraction processes decodes in 2 processes of its own: the same index.
    assert cli("index", tiny_model, folder, "--out", tmp_path / "three", "--factory", "Flat", "--workers", "3",
               "--decode-workers", "2", "--quiet") == 0
    merged, single = IndexDirectory.open(tmp_path / "three"), IndexDirectory.open(tmp_path / "one")
    assert_same_index(merged, single)
    assert [e["path"] for e in merged.manifest["skipped"]] == [str(folder / "p3.png")]
    assert merged.images["image_id"].to_list() == list(range(6))


@pytest.mark.slow
def test_sigkill_of_a_worker_keeps_the_last_index_and_a_rerun_finishes(tiny_model, tmp_path):
    out = tmp_path / "idx"
    assert cli("index", tiny_model, "scenes:val:6", "--out", out, "--factory", "Flat", "--quiet") == 0
    command = [*CLI, "index", str(tiny_model), "scenes:val:40", "--out", str(out), "--factory", "Flat",
               "--workers", "2", "--batch-size", "2", "--overwrite", "--quiet"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    started = share_dir(staging_dir(out.resolve()), 1, 2) / STARTED
    deadline = time.monotonic() + 240
    while not started.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert started.exists(), proc.communicate()
    pid = json.loads(started.read_text())["pid"]
    os.kill(pid, signal.SIGKILL)  # rank 1, as it starts writing its share
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 2, stderr
    # one error line (multiprocessing may add a note on what the killed process left behind)
    errors = [line for line in stderr.splitlines() if line.startswith("tipslab index: error:")]
    assert len(errors) == 1, stderr
    assert "rank 1 was killed by signal 9" in errors[0] and "run the same command again" in errors[0]
    assert "Traceback" not in stderr
    before = IndexDirectory.open(out)  # the last committed index, whole
    assert (before.num_images, before.num_vectors) == (6, 6 * 64)

    rerun = subprocess.run(command[:-1], capture_output=True, text=True, timeout=300, env=env())
    assert rerun.returncode == 0, rerun.stderr
    assert "rank 0/2: reusing its finished share (20 images)" in rerun.stdout
    after = IndexDirectory.open(out)
    assert after.images["key"].to_list() == [f"scenes:val/{i:06d}" for i in range(40)]
    assert after.num_vectors == 40 * 64
    one = IndexDirectory.open(out)
    scores, ids = one.search_vectors(one.store.take(np.array([64 * 33 + 5])), 1)
    assert ids[0, 0] == 64 * 33 + 5 and scores[0, 0] == pytest.approx(1.0, abs=2e-3)


@pytest.mark.slow
def test_torchrun_ranks_merge_into_the_index_one_process_builds(tiny_model, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    run = subprocess.run([*torchrun, "-m", "tipslab.platform.cli", "index", str(tiny_model), "scenes:val:10",
                          "--out", str(tmp_path / "two"), "--factory", "Flat", "--quiet"],
                         capture_output=True, text=True, timeout=300, env=env())
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("10 images, 640 patch vectors") == 1  # rank 0 merges and reports
    assert cli("index", tiny_model, "scenes:val:10", "--out", tmp_path / "one", "--factory", "Flat", "--quiet") == 0
    assert_same_index(IndexDirectory.open(tmp_path / "two"), IndexDirectory.open(tmp_path / "one"))
