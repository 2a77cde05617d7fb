"""Run folders, resume and checkpoints: every run in its own folder, resume says what it continues,
unreadable checkpoints are skipped, old ones are pruned, saves are atomic."""

import logging
import os
import sys
from pathlib import Path

import mlflow
import pytest
import torch

from tipslab.errors import TipslabError
from tipslab.platform.checkpointing import prune, replace_checkpoint
from tipslab.platform.config import load_config
from tipslab.platform.runs import RUN_NAME_ENV, checkpoint_problem, plan_run

sys.path.insert(0, str(Path(__file__).parent))
from test_train_e2e import TINY  # noqa: E402


def _fake_run(root: Path, name: str, steps: list[int], last: int | None) -> Path:
    """A run folder with small torch checkpoints that carry only their global step."""
    run = root / name
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("experiment: tipsv2_tiny\n")
    for step in steps:
        torch.save({"global_step": step}, run / "checkpoints" / f"step{step:07d}.ckpt")
    if last is not None:
        torch.save({"global_step": last}, run / "checkpoints" / "last.ckpt")
    return run


def _cfg(root: Path, *overrides: str):
    return load_config("tipsv2_tiny", [f"run_dir={root}", *overrides])


@pytest.fixture(autouse=True)
def _no_inherited_run_name(monkeypatch):
    monkeypatch.delenv(RUN_NAME_ENV, raising=False)


def test_a_new_run_gets_a_new_folder_and_never_reuses_one_with_checkpoints(tmp_path):
    _fake_run(tmp_path, "old", [5], 5)
    plan = plan_run(_cfg(tmp_path))
    assert plan.checkpoint is None and plan.run_dir.parent == tmp_path and plan.name != "old"
    with pytest.raises(TipslabError, match=r"run .*old already exists: continue it with checkpoint\.resume=old"):
        plan_run(_cfg(tmp_path, "tracking.run_name=old"))


def test_resume_last_continues_the_newest_run_and_says_which(tmp_path):
    older = _fake_run(tmp_path, "a", [2], 2)
    newer = _fake_run(tmp_path, "b", [3], 3)
    os.utime(older / "checkpoints" / "last.ckpt", (1, 1))
    plan = plan_run(_cfg(tmp_path, "checkpoint.resume=last", "trainer.max_steps=10"))
    assert plan.run_dir == newer and plan.checkpoint == newer / "checkpoints" / "last.ckpt" and plan.step == 3
    assert any("continuing run" in n and str(newer) in n and "newest of 2" in n for n in plan.notes)
    by_name = plan_run(_cfg(tmp_path, "checkpoint.resume=a", "trainer.max_steps=10"))
    assert by_name.run_dir == older and by_name.step == 2


def test_a_run_already_at_max_steps_is_refused_instead_of_exporting_old_weights(tmp_path):
    _fake_run(tmp_path, "demo", [150], 150)
    with pytest.raises(TipslabError, match=r"already at step 150 .*trainer\.max_steps is 14: nothing to train"):
        plan_run(_cfg(tmp_path, "checkpoint.resume=last", "trainer.max_steps=14"))


@pytest.mark.parametrize("damage", ["empty", "truncated", "partial_dir"])
def test_unreadable_last_checkpoint_falls_back_to_the_newest_readable_and_says_so(tmp_path, damage):
    run = _fake_run(tmp_path, "r", [3, 6], None)
    last = run / "checkpoints" / "last.ckpt"
    if damage == "empty":
        last.write_bytes(b"")
    elif damage == "truncated":
        torch.save({"global_step": 9, "w": torch.zeros(1000)}, last)
        last.write_bytes(last.read_bytes()[:500])
    else:  # a distributed save killed before rank 0 wrote meta.pt
        last.mkdir()
        (last / ".metadata").write_bytes(b"x")
    plan = plan_run(_cfg(tmp_path, "checkpoint.resume=r", "trainer.max_steps=10"))
    assert plan.checkpoint == run / "checkpoints" / "step0000006.ckpt" and plan.step == 6
    assert any(n.startswith("skipped") and "last.ckpt" in n for n in plan.notes)
    assert checkpoint_problem(last) is not None


def test_a_run_with_no_readable_checkpoint_is_a_one_line_error(tmp_path):
    run = _fake_run(tmp_path, "r", [], None)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    with pytest.raises(TipslabError, match=r"no readable checkpoint \(skipped .*0 bytes"):
        plan_run(_cfg(tmp_path, "checkpoint.resume=r"))


def test_pruning_keeps_the_newest_and_the_pinned(tmp_path):
    for step in range(1, 8):
        (tmp_path / f"step{step:07d}.ckpt").write_bytes(b"x")
    (tmp_path / "last.ckpt").write_bytes(b"x")
    (tmp_path / "keep-me.ckpt").write_bytes(b"x")  # pinned by hand: renamed
    prune(tmp_path, keep_last=2, pin_every=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "keep-me.ckpt", "last.ckpt", "step0000003.ckpt", "step0000006.ckpt", "step0000007.ckpt"]


def test_replacing_a_distributed_checkpoint_leaves_no_mix_of_old_and_new(tmp_path):
    final, partial = tmp_path / "last.ckpt", tmp_path / ".last.ckpt.partial"
    final.mkdir()
    (final / "__0_0.distcp").write_text("old")
    (final / "stale").write_text("old")
    partial.mkdir()
    (partial / "__0_0.distcp").write_text("new")
    replace_checkpoint(partial, final)
    assert sorted(p.name for p in final.iterdir()) == ["__0_0.distcp"]
    assert (final / "__0_0.distcp").read_text() == "new" and not partial.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


@pytest.mark.slow
def test_runs_do_not_clobber_each_other_end_to_end(tmp_path, caplog):
    from tipslab.platform.train import train

    root = tmp_path / "runs" / "tiny"
    common = [*TINY, f"run_dir={root}", "eval.suites=[]", "tracking.pictures=false", "eval.num_scenes=8",
              "checkpoint.every_n_steps=1", "checkpoint.keep_last=2", "checkpoint.pin_every_n_steps=2"]
    first = train(load_config("tipsv2_tiny", [*common, "trainer.max_steps=4", "eval.every_n_steps=2"]))
    model_bytes = (first.model_dir / "model.safetensors").read_bytes()
    assert sorted(p.name for p in first.checkpoint_dir.iterdir()) == [
        "last.ckpt", "step0000002.ckpt", "step0000003.ckpt", "step0000004.ckpt"]  # 1 pruned, 2 pinned

    second = train(load_config("tipsv2_tiny", [*common, "trainer.max_steps=2", "eval.pointing_game=false"]))
    assert second.run_dir != first.run_dir and second.run_dir.parent == first.run_dir.parent == root
    assert (root / "latest").resolve() == second.run_dir
    assert (first.model_dir / "model.safetensors").read_bytes() == model_bytes  # the first run's model is untouched
    assert not list(first.checkpoint_dir.glob("last-v*"))

    client = mlflow.MlflowClient(first.tracking_uri)
    experiment = client.get_experiment_by_name("tipslab")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    names = {r.info.run_id: r.info.run_name for r in client.search_runs([experiment.experiment_id])}
    assert names == {first.run_id: f"tipsv2_tiny/{first.run_dir.name}", second.run_id: f"tipsv2_tiny/{second.run_dir.name}"}
    # Speed is visible: images/s, the step split into data wait and compute, MFU (FLOPs counted on step 1).
    perf = client.get_run(first.run_id).data.metrics
    assert perf["perf/images_per_sec"] > 0 and 0 < perf["perf/mfu"] < 1 and perf["perf/tflops_per_sec_per_device"] > 0
    assert perf["perf/step_ms"] == pytest.approx(perf["perf/data_wait_ms"] + perf["perf/compute_ms"])
    assert 0 <= perf["perf/data_wait_share"] < 1
    # The pointing game is a curve: mid-run and at the end.
    assert [m.step for m in client.get_metric_history(first.run_id, "eval/pointing_acc_dense")] == [2, 4]

    # resume=last continues the newest run (the second), in its MLflow run, and says so.
    with caplog.at_level(logging.INFO):
        third = train(load_config("tipsv2_tiny", [*common, "trainer.max_steps=3", "checkpoint.resume=last",
                                                  "eval.pointing_game=false"]))
    assert third.run_dir == second.run_dir and third.run_id == second.run_id
    assert f"continuing run {second.run_dir}" in caplog.text
    assert max(m.step for m in client.get_metric_history(second.run_id, "train/loss")) >= 2

    # `tipslab export RUN`: the newest checkpoint as a tipslab model, equal to what the run exported.
    from safetensors.torch import load_file

    from tipslab.platform.cli import main

    assert main(["export", str(first.run_dir), "--out", str(tmp_path / "exported")]) == 0
    a, b = load_file(str(first.model_dir / "model.safetensors")), load_file(str(tmp_path / "exported" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert main(["export", str(tmp_path / "nothing.ckpt"), "--out", str(tmp_path / "x")]) == 2


def test_eval_finds_the_store_of_a_run_in_its_own_folder(tmp_path):
    """`tipslab eval runs/<exp>/latest/model --mlflow` logs into the training run: the store is
    two levels up from the run folder now, not beside it."""
    from tipslab.platform.eval_cli import run_info

    run = tmp_path / "runs" / "tipsv2_tiny" / "20261203-101500"
    (run / "model").mkdir(parents=True)
    (run / "config.yaml").write_text("tracking:\n  tracking_uri: null\n")
    (run / "mlflow_run_id.txt").write_text("abc\n")
    (tmp_path / "runs" / "mlflow.db").write_bytes(b"")
    (tmp_path / "runs" / "tipsv2_tiny" / "latest").symlink_to(run.name)
    uri, run_id, found = run_info(str(tmp_path / "runs" / "tipsv2_tiny" / "latest" / "model"))
    assert (uri, run_id, found) == (f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}", "abc", run)
