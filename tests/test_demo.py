"""`make demo`'s job, shortened: train -> track -> index -> search -> pictures, then check each
output the way a user would, from fresh processes."""

import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

pytestmark = pytest.mark.slow


def _run(*args, timeout=900):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_demo_end_to_end(tmp_path):
    runs = tmp_path / "runs"
    out = _run("-m", "tipslab.platform.demo", "--runs", str(runs), "--steps", "30")
    assert out.returncode == 0, out.stderr[-3000:]
    for word in ("MLflow run", "checkpoint", "index", "pictures", "make mlflow-ui"):
        assert word in out.stdout
    # It ends with the run's evaluation table (every suite) and its pictures.
    for suite in ("zeroshot_seg", "retrieval", "classification", "knn", "regions"):
        assert f"| {suite}" in out.stdout
    eval_dir = runs / "tipsv2_tiny" / "latest" / "eval"  # each run in its own folder, the newest linked
    for name in ("eval.md", "eval.csv", "pca.png", "zeroshot_seg.png", "query_heatmaps.png", "curves.png"):
        assert (eval_dir / name).is_file(), name

    # The run is in the default store, with its params and a loss that went down.
    mlflow.set_tracking_uri(f"sqlite:///{runs / 'mlflow.db'}")
    (run,) = mlflow.search_runs(experiment_names=["tipslab"], output_format="list")
    assert run.data.params["experiment"] == "tipsv2_tiny"
    history = sorted(mlflow.MlflowClient().get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)
    assert len(history) >= 5
    first = sum(m.value for m in history[:3]) / 3
    last = sum(m.value for m in history[-3:]) / 3
    assert last < first

    # The index opens in a fresh process and answers with >= 5 boxed hits and PNGs.
    exe = Path(sys.executable).parent / "tipslab"
    pics = tmp_path / "pics"
    # --threshold 0: a 30-step model's confidence is not the point here, the boxes and pictures are.
    search = subprocess.run([str(exe), "search", str(runs / "index"), "a blue square", "--k", "5", "--out", str(pics),
                             "--threshold", "0"],
                            capture_output=True, text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert search.returncode == 0, search.stderr
    rows = re.findall(r"^\s+\d+\s+[-\d.]+\s+[\d.]+\s+\((\d+),(\d+),(\d+),(\d+)\)", search.stdout, flags=re.M)
    assert len(rows) >= 5
    assert all(int(x1) > int(x0) and int(y1) > int(y0) for x0, y0, x1, y1 in rows)
    assert (pics / "hits.png").is_file() and len(list(pics.glob("hit-*.png"))) >= 5
