"""FSDP2 on two CPU processes (gloo) against one process on the same global batch: parameters
really sharded, the same losses, a SIGKILL mid-run resumed, and a world-size-2 checkpoint resumed
by one process.

The data splits each global batch over the ranks (datamodules/streams.py: batch b of rank r is
global chunk b*W+r, augmentations keyed by sample index), so 2 ranks x 4 samples see exactly the
samples and augmentations 1 rank x 8 does, and `train/global_loss` (the all-reduced
loss, platform/callbacks.py) is the same number up to float32 summation order.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from tipslab.platform.config import load_config
from tipslab.platform.train import train

sys.path.insert(0, str(Path(__file__).parent))
from test_train_e2e import TINY  # noqa: E402

pytestmark = pytest.mark.slow

# float32 on 2 processes vs 1: the gathered logits and the reduce-scattered gradients are summed
# in another order, so the losses agree to float32 rounding, amplified a little by 6 AdamW steps.
LOSS_RTOL = 1e-4
WEIGHT_ATOL = 1e-3
REPLAY_ATOL = 1e-6  # the same world size replaying a step after a kill: bit-for-bit up to this

COMMON = [*TINY, "model.text.context_length=16", "data.local_crops.count=0", "trainer.accelerator=cpu",
          "tracking.pictures=false", "eval.pointing_game=false", "eval.suites=[]", "checkpoint.every_n_steps=2",
          "checkpoint.keep_last=5"]
FSDP = ["trainer.strategy=fsdp", "data.batch_size=4", "trainer.devices=2"]


def _command(*args):
    return [str(Path(sys.executable).parent / "tipslab"), "train", "tipsv2_tiny", *COMMON, *args]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", MLFLOW_ENABLE_ASYNC_LOGGING="false")


def _run_until_killed(command, root: Path, checkpoint: str) -> None:
    """Start a training, SIGKILL all its processes as soon as `checkpoint` is in place."""
    proc = subprocess.Popen(command, env=_env(), start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (root / "latest" / "checkpoints" / checkpoint).exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def _losses(uri, run_id) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for m in mlflow.MlflowClient(uri).get_metric_history(run_id, "train/global_loss"):
        out.setdefault(m.step, []).append(m.value)
    return out


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= LOSS_RTOL * abs(b)


def test_fsdp2_matches_one_process_survives_sigkill_and_resumes_at_world_size_one(tmp_path):
    ref = train(load_config("tipsv2_tiny", [*COMMON, f"run_dir={tmp_path / 'one'}", "data.batch_size=8",
                                            "trainer.max_steps=6"]))
    want = {step: values[0] for step, values in _losses(ref.tracking_uri, ref.run_id).items()}
    assert sorted(want) == [1, 2, 3, 4, 5, 6]

    # Two processes, killed with SIGKILL (the whole process group) once the step-2 checkpoint is in
    # place, then continued at the same world size and killed again after step 4. max_steps stays 6
    # throughout: the learning-rate schedule depends on it.
    root = tmp_path / "two"
    _run_until_killed(_command(f"run_dir={root}", *FSDP, "trainer.max_steps=6"), root, "step0000002.ckpt")
    run = (root / "latest").resolve()
    assert not (run / "model").exists()  # it was killed before the end
    run_id = (run / "mlflow_run_id.txt").read_text().strip()
    assert ref.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"  # one store beside both experiment folders
    assert {1, 2} <= set(_losses(ref.tracking_uri, run_id))
    _run_until_killed(_command(f"run_dir={root}", *FSDP, "trainer.max_steps=6", "checkpoint.resume=last"), root,
                      "step0000004.ckpt")

    # Parameters were DTensor shards: each block weight was saved as one chunk per rank.
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(run / "checkpoints" / "step0000002.ckpt")).read_metadata()
    chunks = {k: len(v.chunks) for k, v in metadata.state_dict_metadata.items()
              if k.startswith("state_dict.") and ".blocks." in k and k.endswith("weight") and hasattr(v, "chunks")
              and len(v.size) == 2}
    assert chunks and set(chunks.values()) == {2}, chunks

    # A sharded checkpoint exports to one plain model, equal to the one-process run's at that step.
    from safetensors.torch import load_file

    from tipslab.platform.export import export_checkpoint

    export_checkpoint(run / "checkpoints" / "step0000004.ckpt", tmp_path / "two_at_4")
    export_checkpoint(ref.checkpoint_dir / "step0000004.ckpt", tmp_path / "one_at_4")
    a, b = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("one_at_4", "two_at_4"))
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < WEIGHT_ATOL

    # Resumed by one process (the sharded checkpoint is resharded on load).
    third = subprocess.run(_command(f"run_dir={root}", "trainer.strategy=fsdp", "trainer.devices=1",
                                    "data.batch_size=8", "trainer.max_steps=6", "checkpoint.resume=last"),
                           env=_env(), capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stderr[-3000:]

    got = _losses(ref.tracking_uri, run_id)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step, values in got.items():
        assert all(_close(v, want[step]) for v in values), (step, values, want[step])
        # A step logged before a kill and again by the 2-process resume: replayed exactly.
        assert max(values) - min(values) <= REPLAY_ATOL or step > 4, (step, values)
    assert "continuing run" in third.stderr and str(run) in third.stderr

    # The exported (consolidated, plain-tensor) model matches the one-process run's.
    a, b = load_file(str(ref.model_dir / "model.safetensors")), load_file(str(run / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < WEIGHT_ATOL, worst


def test_torchrun_two_nodes_on_localhost_with_gradient_accumulation(tmp_path):
    """The multi-node rehearsal: two torchrun agents (nodes) of one process each meet at a c10d
    rendezvous on loopback, agree on one run folder (TIPSLAB_RUN_NAME) and train FSDP2 with 2
    micro-batches per step; the gradient sync skipped on the first micro-batch (parallelize.py)
    must still leave the same weights as one process accumulating the same micro-batches."""
    import socket

    ref = train(load_config("tipsv2_tiny", [*COMMON, f"run_dir={tmp_path / 'one'}", "data.batch_size=4",
                                            "trainer.accumulate_grad_batches=2", "trainer.max_steps=3"]))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root = tmp_path / "nodes"
    torchrun = str(Path(sys.executable).parent / "torchrun")
    command = [torchrun, "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
               f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=rehearsal", "-m", "tipslab.platform.cli",
               "train", "tipsv2_tiny", *COMMON, f"run_dir={root}", "trainer.strategy=fsdp", "trainer.devices=1",
               "trainer.num_nodes=2", "data.batch_size=2", "trainer.accumulate_grad_batches=2", "trainer.max_steps=3"]
    env = dict(_env(), TIPSLAB_RUN_NAME="rehearsal")
    nodes = [subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    errors = [node.communicate(timeout=600)[1] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], errors[0][-3000:] + errors[1][-3000:]
    assert sorted(p.name for p in root.iterdir()) == ["latest", "rehearsal"]

    run = root / "rehearsal"
    want, got = _losses(ref.tracking_uri, ref.run_id), _losses(ref.tracking_uri, (run / "mlflow_run_id.txt").read_text().strip())
    assert sorted(got) == sorted(want)
    for step in want:
        assert all(_close(g, w) for g, w in zip(sorted(got[step]), sorted(want[step]), strict=True)), (step, got, want)
    from safetensors.torch import load_file

    a, b = load_file(str(ref.model_dir / "model.safetensors")), load_file(str(run / "model" / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < WEIGHT_ATOL
