"""Training end to end on CPU: tracked in MLflow, exported, resumable, sharded (FSDP2 on gloo)."""

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from tipslab.platform.config import load_config
from tipslab.platform.train import train

pytestmark = pytest.mark.slow

TINY = [
    "data.num_train=32",
    "data.num_val=8",
    "data.batch_size=8",
    "model.vision.img_size=56",
    "model.text.context_length=16",
    "checkpoint.every_n_steps=3",
    "trainer.progress_bar=false",
    "optim.warmup_steps=2",
    "trainer.log_every_n_steps=1",
    # For WHOLE (the whole TIPSv2 recipe: multi-crop, masks, DINO, iBOT++ through the DINO head,
    # KoLeo, head-only EMA) at test size: small crops and heads.
    "data.local_crops.count=2",
    "data.local_crops.size=28",
    "data.num_workers=0",
    *[f"components.{c}.{k}={v}" for c in ("dino", "ibot") for k, v in
      (("prototypes", 64), ("hidden_dim", 32), ("bottleneck_dim", 16))],
]


WHOLE = "ablate_head_ema"


def _tipslab(*args, env_extra=None, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **(env_extra or {}))
    exe = Path(sys.executable).parent / "tipslab"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_tiny_run_is_tracked_exported_and_resumes(tmp_path):
    run_dir = tmp_path / "runs" / "tiny"
    cfg = load_config("tipsv2_tiny", [*TINY, f"run_dir={run_dir}", "trainer.max_steps=6", "eval.suites=[]"])
    result = train(cfg)

    assert (result.model_dir / "model.safetensors").is_file()
    assert result.run_dir.parent == run_dir and (result.run_dir / "config.yaml").is_file()
    assert (result.checkpoint_dir / "last.ckpt").is_file()

    mlflow.set_tracking_uri(result.tracking_uri)
    runs = mlflow.search_runs(experiment_names=["tipslab"], output_format="list")
    assert [r.info.run_id for r in runs] == [result.run_id]
    run = runs[0]
    assert run.data.params["model.vision.size"] == "tiny"
    assert run.data.params["trainer.max_steps"] == "6"
    assert "train/loss" in run.data.metrics and "lr-AdamW" in "".join(run.data.metrics)
    assert 0.0 <= run.data.metrics["eval/pointing_acc_dense"] <= 1.0
    assert 0.0 < run.data.metrics["eval/pointing_chance"] < 0.5
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(result.run_id)}
    assert {"model", "config.yaml"} <= artifacts

    # Resume from the last checkpoint and go on to step 9, in the same MLflow run.
    cfg2 = load_config("tipsv2_tiny", [*TINY, f"run_dir={run_dir}", "trainer.max_steps=9", "checkpoint.resume=last",
                                       "eval.suites=[]"])
    result2 = train(cfg2)
    assert result2.run_id == result.run_id
    history = mlflow.MlflowClient().get_metric_history(result.run_id, "train/loss")
    assert max(m.step for m in history) >= 8


def test_loss_goes_down_on_a_small_training_set(tmp_path):
    overrides = [*TINY, f"run_dir={tmp_path / 'r'}", "trainer.max_steps=40", "data.num_train=16",
                 "optim.lr=2e-3", "tracking.pictures=false", "checkpoint.every_n_steps=100", "eval.suites=[]"]
    # The contrastive loss alone: the self-distillation terms rise while the teacher sharpens.
    result = train(load_config("tipsv2_tiny", overrides))
    assert result.last_loss < 0.85 * result.first_loss, (result.first_loss, result.last_loss)


def test_paper_experiment_without_gpus_or_data_stops_at_once():
    out = _tipslab("train", "tipsv2_b", timeout=120)
    assert out.returncode == 2
    message = out.stderr.strip()
    assert "GPU" in message and "data.path" in message and "EXP=tipsv2_tiny" in message
    assert "Traceback" not in out.stderr


def test_cli_reports_mistyped_key_without_traceback():
    out = _tipslab("train", "tipsv2_tiny", "trainer.max_step=3", timeout=120)
    assert out.returncode == 2
    assert "did you mean 'trainer.max_steps'" in out.stderr and "Traceback" not in out.stderr


def test_fsdp2_on_two_cpu_processes_trains_checkpoints_and_resumes(tmp_path):
    run_dir = tmp_path / "fsdp"
    # The whole recipe: EMA heads and centres on DTensor shards, gradient clipping across ranks.
    common = [*TINY, f"run_dir={run_dir}", "trainer.strategy=fsdp", "trainer.devices=2",
              "trainer.accelerator=cpu", "tracking.pictures=false", "optim.grad_clip=0.5",
              "eval.suites=[zeroshot_seg]", "eval.num_scenes=8"]
    first = _tipslab("train", WHOLE, *common, "trainer.max_steps=3")
    assert first.returncode == 0, first.stderr[-3000:]
    (run,) = [p for p in run_dir.iterdir() if p.name != "latest"]  # both ranks wrote into one run folder
    assert (run / "model" / "model.safetensors").is_file()
    assert (run / "checkpoints" / "last.ckpt" / "meta.pt").is_file()
    # The end-of-run evaluation gathered the shards instead of skipping the sharded encoder.
    assert "| zeroshot_seg" in (run / "eval" / "eval.md").read_text()
    second = _tipslab("train", WHOLE, *common, "trainer.max_steps=5", "checkpoint.resume=last")
    assert second.returncode == 0, second.stderr[-3000:]


def test_fsdp2_full_ema_teacher_and_frozen_distillation_teacher_on_two_processes(tmp_path):
    """Teachers sharded as inference-only models: a full-EMA tower inside the system, a frozen
    tower outside it, read through its dense readout (`forward_dense`, not `forward`: registered
    with FSDP2); the frozen one stays out of the checkpoint."""
    from tipslab.modules.checkpoint import save_checkpoint
    from tipslab.modules.encoder import build_encoder

    teacher_cfg = {"vision": {"size": "tiny", "img_size": 56}, "text": {"size": "tiny", "context_length": 16},
                   "tokenizer": {"kind": "bpe", "context_length": 16}}
    save_checkpoint(build_encoder(teacher_cfg), teacher_cfg, tmp_path / "teacher")
    run_dir = tmp_path / "fsdp"
    out = _tipslab("train", WHOLE, *TINY, f"run_dir={run_dir}", "trainer.strategy=fsdp", "trainer.devices=2",
                   "trainer.accelerator=cpu", "tracking.pictures=false", "eval.pointing_game=false", "eval.suites=[]",
                   "ema.mode=full", "components.distill.enabled=true", f"distill_teacher.path={tmp_path / 'teacher'}",
                   "components.distill.patch_kind=dense", "trainer.max_steps=3")
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = run_dir / "latest"
    assert (run_dir / "model" / "model.safetensors").is_file()
    saved = " ".join(p.name for p in (run_dir / "checkpoints" / "last.ckpt").rglob("*"))
    metadata = (run_dir / "checkpoints" / "last.ckpt" / ".metadata").read_bytes()
    assert b"teacher_vision" in metadata and b"distill_teacher" not in metadata, saved


def _weights(model_dir):
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


@pytest.mark.parametrize("recipe", ["contrastive", "full"])
def test_run_resumed_from_a_mid_run_checkpoint_ends_with_the_same_weights(tmp_path, recipe):
    """As if the run had been killed after step 3: resume from that checkpoint in a new run
    directory and finish; the weights (EMA heads and centres included) must match the
    uninterrupted run's."""
    common = [*TINY, "tracking.pictures=false", "eval.pointing_game=false", "eval.suites=[]", "trainer.max_steps=6",
              ]
    exp = WHOLE if recipe == "full" else "ablate_contrastive"
    straight = train(load_config(exp, [*common, f"run_dir={tmp_path / 'a'}"]))
    (step3,) = [p for p in straight.checkpoint_dir.glob("*.ckpt") if "0000003" in p.name]
    resumed = train(load_config(exp, [*common, f"run_dir={tmp_path / 'b'}", f"checkpoint.resume={step3}"]))
    a, b = _weights(straight.model_dir), _weights(resumed.model_dir)
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5, worst
    # The last three steps did move the weights, so the comparison means something.
    import torch

    state = torch.load(step3, map_location="cpu", weights_only=True)["state_dict"]
    moved = max((a[k] - state[f"encoder.{k}"]).abs().max().item() for k in a)
    assert moved > 1e-4
    if recipe == "full":
        # The teacher heads and centres (not exported with the model) match too.
        ends = [torch.load(sorted(r.checkpoint_dir.glob("step*.ckpt"))[-1], map_location="cpu",
                           weights_only=True)["state_dict"] for r in (straight, resumed)]
        teacher_keys = [k for k in ends[0] if "teacher_head" in k or k.endswith("centering.center")]
        assert len(teacher_keys) >= 4
        assert max((ends[0][k] - ends[1][k]).abs().max().item() for k in teacher_keys) < 1e-5
        assert max((ends[0][k] - state[k]).abs().max().item() for k in teacher_keys) > 0  # they moved


def test_training_reads_webdataset_shards(tmp_path):
    from tipslab.datamodules.scenes import ScenesDataset
    from tipslab.datamodules.shards import write_scene_shards

    shards = tmp_path / "shards"
    write_scene_shards(ScenesDataset("train", num_images=24, image_size=56, seed=3), shards, samples_per_shard=8)
    result = train(load_config("tipsv2_tiny", [*TINY, f"run_dir={tmp_path / 'r'}", "data.source=shards",
                                               f"data.path={shards}", "trainer.max_steps=3",
                                               "tracking.pictures=false", "eval.pointing_game=false",
                                               "eval.suites=[]"]))
    assert (result.model_dir / "model.safetensors").is_file()
    assert result.last_loss is not None


def test_two_runs_starting_together_share_a_new_tracking_store(tmp_path):
    """Both create the sqlite tables of a new store at once: neither may die of the race."""
    import concurrent.futures

    from tipslab.platform.tracking import prepare_store

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    script = ("import sys; from tipslab.platform.tracking import prepare_store; prepare_store(sys.argv[1])")
    procs = [subprocess.Popen([sys.executable, "-c", script, uri], stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    with concurrent.futures.ThreadPoolExecutor() as pool:
        results = list(pool.map(lambda p: (p.wait(timeout=300), p.stderr.read()), procs))
    assert all(code == 0 for code, _ in results), [err[-500:] for _, err in results]
    prepare_store(uri)  # and an existing store is left as it is
