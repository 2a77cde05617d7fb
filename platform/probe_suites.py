"""The dense-probe evaluation suites: train a probe on a frozen encoder for a fixed budget, score it.

Plain functions over a `LoadedModel` (`tipslab.modules.api.load_model`), meant to be
registered in `tipslab eval` as the suites `linear_seg` and `depth`:

- `linear_seg_suite`: a linear segmentation probe (BatchNorm + Linear on the last block's patch
  tokens) on the built-in scenes' masks -> `linear_seg/miou`, `linear_seg/pixel_acc`;
- `depth_suite`: a linear depth probe (256 bins, patch + CLS tokens) on the scenes' depth maps
  -> `depth/rmse`, `depth/abs_rel`, `depth/delta1` (metres).

Both run the same training path as `tipslab probe` (platform/probe_train.py) with tracking and
checkpoints off, in a scratch directory; a seed fixes the data, the head and the batch order.
`data_source`/`data_path` point them at a VOC/ADE or NYU-style folder instead of the scenes.
"""

from __future__ import annotations

from tipslab.platform.config import load_config
from tipslab.platform.probe_train import temporary_run_dir, train_probe


def _run(experiment: str, loaded, overrides: list[str]) -> dict[str, float]:
    with temporary_run_dir() as run_dir:
        cfg = load_config(experiment, ["encoder.path=(loaded)", f"run_dir={run_dir}", "tracking.enabled=false",
                                       "checkpoint.every_n_steps=0", "trainer.progress_bar=false",
                                       "data.cache_features=true", "head.loss_size=28", *overrides],
                          defaults="defaults_probe")
        return train_probe(cfg, loaded=loaded).metrics


def _common(steps, num_train, num_val, batch_size, lr, seed, data_source, data_path) -> list[str]:
    overrides = [f"trainer.max_steps={int(steps)}", f"data.num_train={int(num_train)}", f"data.num_val={int(num_val)}",
                 f"data.batch_size={int(batch_size)}", f"optim.lr={float(lr)}", f"seed={int(seed)}",
                 f"data.source={data_source}", "trainer.accelerator=auto"]
    if data_path:
        overrides.append(f"data.path={data_path}")
    return overrides


def linear_seg_suite(loaded, *, steps: int = 300, num_train: int = 512, num_val: int = 64, batch_size: int = 16,
                     lr: float = 1e-2, seed: int = 0, labels: str = "class", data_source: str = "scenes",
                     data_path: str | None = None) -> dict[str, float]:
    """mIoU and pixel accuracy of a linear segmentation probe trained for `steps` steps."""
    overrides = _common(steps, num_train, num_val, batch_size, lr, seed, data_source, data_path)
    metrics = _run("probe_seg_scenes", loaded, [*overrides, f"data.scene_labels={labels}"])
    return {f"linear_seg/{key.split('/', 1)[1]}": value for key, value in metrics.items()}


def depth_suite(loaded, *, steps: int = 300, num_train: int = 512, num_val: int = 64, batch_size: int = 16,
                lr: float = 1e-2, seed: int = 0, data_source: str = "scenes",
                data_path: str | None = None) -> dict[str, float]:
    """RMSE, AbsRel and delta1 of a linear depth probe trained for `steps` steps."""
    overrides = _common(steps, num_train, num_val, batch_size, lr, seed, data_source, data_path)
    return _run("probe_depth_scenes", loaded, overrides)
