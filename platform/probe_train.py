"""`tipslab probe EXP`: train a dense head (linear probe or DPT) on a frozen encoder, then score it.

The run is a Lightning fit like pretraining's: config from experiments/probe_*.yaml over
experiments/defaults_probe.yaml, a seed that fixes the head's initialisation and the batch
order, MLflow tracking (params, loss curve, final metrics, the head as an artifact), checkpoints
of the head every `checkpoint.every_n_steps` and `checkpoint.resume=last`.

The encoder is frozen and kept out of the LightningModule's children on purpose: checkpoints
hold only the head (a ViT-g would otherwise be copied into every one), `module.train()` never
switches the encoder out of eval mode, and the optimizer cannot see it. Resuming therefore needs
the same `encoder.path`, which the saved config records.

Outputs in `run_dir`: `config.yaml`, `head.safetensors` (the head's state), `decoder.npz` for a
DPT head (the official decoder layout, for `tipslab predict --decoder`), `metrics.json`.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig

from tipslab.atomic import atomic_write_text
from tipslab.errors import TipslabError
from tipslab.modules.dense_metrics import DepthMeter, NormalsMeter, SegmentationMeter
from tipslab.modules.patch_oracle import patch_oracle
from tipslab.modules.probes import build_head, probe_loss
from tipslab.modules.vision import VisionOutput


@dataclass
class ProbeResult:
    run_dir: Path
    metrics: dict[str, float]  # seg/{miou,pixel_acc} | depth/{rmse,abs_rel,delta1} | normals/{mean_angle,within_11}
    first_loss: float | None
    last_loss: float | None
    run_id: str | None


class ProbeSystem(L.LightningModule):
    """A trainable head over a frozen vision tower's intermediate layers."""

    def __init__(self, cfg: DictConfig, encoder, num_outputs: int | None):
        super().__init__()
        self.cfg = cfg
        self._frozen = [encoder.eval().requires_grad_(False)]  # a list: not a registered child (see above)
        vision = encoder.vision
        depth = len(vision.blocks)
        kind = cfg.head.kind
        if cfg.encoder.layers is not None:
            self.layers = [int(i) for i in cfg.encoder.layers]
        else:
            from tipslab.modules.vision import default_dense_layers

            self.layers = list(default_dense_layers(depth)) if kind == "dpt" else [depth - 1]
        self.head = build_head(kind, cfg.head.task, vision.embed_dim,
                               num_outputs={"seg": num_outputs, "depth": cfg.head.depth_bins}.get(cfg.head.task),
                               channels=int(cfg.head.dpt_channels),
                               depth_range=(float(cfg.head.min_depth), float(cfg.head.max_depth)),
                               num_layers=len(self.layers))
        self.losses: list[float] = []

    @property
    def encoder(self):
        return self._frozen[0]

    def on_fit_start(self) -> None:
        self.encoder.to(self.device).eval()

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> list[VisionOutput]:
        return self.encoder.vision.intermediate_layers(images, self.layers, norm=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.encode(images), tuple(images.shape[-2:]))

    def predict_batch(self, batch: dict) -> torch.Tensor:
        """The head's prediction at the target's resolution, from images or cached features."""
        if "patches" in batch:
            outputs = cached_outputs(batch)
        else:
            outputs = self.encode(batch["image"])
        return self.head(outputs, tuple(batch["target"].shape[-2:]))

    def training_step(self, batch, batch_idx):
        size = self.cfg.head.loss_size
        if size and size < batch["target"].shape[-1]:
            # Nearest-neighbour subsampling of the labels: the loss costs pixels x classes, and at
            # full size it dominates a CPU probe's step; evaluation stays at full size.
            rows = (torch.arange(int(size)) * batch["target"].shape[-2] // int(size)).to(batch["target"].device)
            cols = (torch.arange(int(size)) * batch["target"].shape[-1] // int(size)).to(batch["target"].device)
            batch = {**batch, "target": batch["target"][..., rows, :][..., cols]}
        loss = probe_loss(self.cfg.head.task, self.predict_batch(batch), batch["target"])
        self.log("probe/loss", loss, prog_bar=True)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        optim = self.cfg.optim
        opt = torch.optim.AdamW(self.head.parameters(), lr=float(optim.lr), weight_decay=float(optim.weight_decay))
        total, warmup, floor = int(self.cfg.trainer.max_steps), int(optim.warmup_steps), float(optim.min_lr_ratio)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, factor),
                                                    "interval": "step"}}


# ------------------------------------------------------------------------------ data
class CachedFeatures(torch.utils.data.Dataset):
    """The frozen encoder's outputs of every item, computed once (`data.cache_features`).

    The probes use no augmentation, so an image always gives the same tokens: caching turns a
    probe's steps into a small head's steps. Items: `{"cls": [L, D], "patches": [L, N, D],
    "grid": (h, w), "target"}`. Memory is items x layers x tokens x D floats: meant for the
    small models and sets of the CPU suites, not for ViT-g at 448 px."""

    def __init__(self, dataset, system: ProbeSystem, batch_size: int = 32):
        cls, patches, targets = [], [], []
        device = next(system.head.parameters()).device
        system.encoder.to(device)
        for batch in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
            outputs = system.encode(batch["image"].to(device))
            cls.append(torch.stack([o.cls1 for o in outputs], 1).cpu())
            patches.append(torch.stack([o.patches for o in outputs], 1).cpu())
            targets.append(batch["target"])
            self.grid = outputs[0].grid
        self.cls, self.patches, self.targets = torch.cat(cls), torch.cat(patches), torch.cat(targets)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> dict:
        return {"cls": self.cls[index], "patches": self.patches[index], "grid": torch.tensor(self.grid),
                "target": self.targets[index]}


def cached_outputs(batch: dict) -> list[VisionOutput]:
    grid = tuple(int(g) for g in batch["grid"][0])
    # cls2 is not cached: no head reads it.
    return [VisionOutput(cls1=batch["cls"][:, i], cls2=None, patches=batch["patches"][:, i], grid=grid)
            for i in range(batch["cls"].shape[1])]


def build_datasets(cfg: DictConfig, image_size: int):
    """(train, val) datasets of `cfg.data` for `cfg.head.task`."""
    from tipslab.datamodules.dense_folders import DepthFolder, ScenesDense, SegFolder

    data, task = cfg.data, cfg.head.task
    if task not in ("seg", "depth", "normals"):
        raise TipslabError(f"head.task={task!r}; probes are trained for seg, depth or normals")
    if task == "normals" and data.source != "scenes":
        raise TipslabError("head.task=normals trains on the scenes only (data.source=scenes)")
    if data.source == "scenes":
        make = lambda split, n: ScenesDense(task, split, int(n), image_size, int(cfg.seed), str(data.scene_labels))  # noqa: E731
        return make("train", data.num_train), make("val", data.num_val)
    if data.source in ("seg_folder", "depth_folder"):
        wanted = "seg" if data.source == "seg_folder" else "depth"
        if task != wanted:
            raise TipslabError(f"data.source={data.source} holds {wanted} labels but head.task={task}")
        if not data.path or not Path(data.path).is_dir():
            raise TipslabError(f"data.source={data.source} reads data.path, which is {data.path!r} (not a folder)")
        cls = SegFolder if wanted == "seg" else DepthFolder
        return cls(data.path, data.train_split, image_size), cls(data.path, data.val_split, image_size)
    raise TipslabError(f"data.source={data.source!r}; expected scenes, seg_folder or depth_folder")


def _loader(dataset, cfg: DictConfig, shuffle: bool):
    return torch.utils.data.DataLoader(
        dataset, batch_size=int(cfg.data.batch_size), shuffle=shuffle, drop_last=shuffle,
        num_workers=int(cfg.data.num_workers),
        generator=torch.Generator().manual_seed(int(cfg.seed)) if shuffle else None)


# ------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate_probe(system: ProbeSystem, dataset, batch_size: int = 16) -> dict[str, float]:
    """Metrics of the head over `dataset` at its resolution: seg/{miou,pixel_acc} or depth/{rmse,abs_rel,delta1}
    (normals/{mean_angle,within_11}), and the same metrics of the per-patch oracle as
    `{task}/patch_oracle_{metric}`: the ceiling the patch grid sets (modules/patch_oracle.py)."""
    task = system.cfg.head.task
    was_training = system.training
    system.eval()
    device = next(system.head.parameters()).device
    system.encoder.to(device)
    num_classes = system.head.num_outputs if hasattr(system.head, "num_outputs") else system.head.decoder.num_outputs

    def new_meter():
        if task == "seg":
            return SegmentationMeter(num_classes)
        if task == "depth":
            return DepthMeter(float(system.cfg.head.min_depth), float(system.cfg.head.max_depth))
        return NormalsMeter()

    meter, oracle = new_meter(), new_meter()
    patch = system.encoder.vision.patch_size
    for batch in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
        batch = {k: (v.to(device) if k != "id" else v) for k, v in batch.items()}
        pred = system.predict_batch(batch).cpu()
        pred = {"seg": lambda p: p.argmax(1), "depth": lambda p: p[:, 0], "normals": lambda p: p}[task](pred)
        target = batch["target"].cpu()
        meter.update(pred, target)
        grid = (tuple(int(g) for g in batch["grid"][0]) if "grid" in batch
                else (batch["image"].shape[-2] // patch, batch["image"].shape[-1] // patch))
        oracle.update(patch_oracle(task, target, grid, num_classes), target)
    system.train(was_training)
    return {**{f"{task}/{key}": value for key, value in meter.compute().items()},
            **{f"{task}/patch_oracle_{key}": value for key, value in oracle.compute().items()}}


# ------------------------------------------------------------------------------ the run
def train_probe(cfg: DictConfig, loaded=None) -> ProbeResult:
    """Train the head of `cfg` on the frozen encoder (`loaded`, or `cfg.encoder.path`), then evaluate it."""
    from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar

    from tipslab.modules.api import load_model
    from tipslab.modules.official_decoders import export_decoder
    from tipslab.platform.tracking import build_logger
    from tipslab.platform.train import start_run

    if loaded is None:
        loaded = load_model(cfg.encoder.path, img_size=cfg.encoder.img_size)
    image_size = int(cfg.encoder.img_size or loaded.preprocess.img_size)
    run_dir, checkpoint_dir, ckpt_path = start_run(cfg)
    train_set, val_set = build_datasets(cfg, image_size)
    system = ProbeSystem(cfg, loaded.encoder, getattr(train_set, "num_classes", None))
    if cfg.data.cache_features:
        train_set = CachedFeatures(train_set, system, int(cfg.data.batch_size))
        val_set = CachedFeatures(val_set, system, int(cfg.data.batch_size))
    logger = build_logger(cfg, resume=ckpt_path is not None) if cfg.tracking.enabled else False
    callbacks = []
    if int(cfg.checkpoint.every_n_steps) > 0:
        callbacks.append(ModelCheckpoint(dirpath=checkpoint_dir, every_n_train_steps=int(cfg.checkpoint.every_n_steps),
                                         save_last=True, save_top_k=-1, filename="step{step:07d}",
                                         auto_insert_metric_name=False))
    if cfg.trainer.progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=10))
    trainer = L.Trainer(
        max_steps=int(cfg.trainer.max_steps), accelerator=cfg.trainer.accelerator, devices=1,
        precision=cfg.trainer.precision, log_every_n_steps=int(cfg.trainer.log_every_n_steps),
        logger=logger, callbacks=callbacks, enable_checkpointing=bool(int(cfg.checkpoint.every_n_steps) > 0),
        enable_progress_bar=bool(cfg.trainer.progress_bar), enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=str(run_dir))
    trainer.fit(system, train_dataloaders=_loader(train_set, cfg, shuffle=True), ckpt_path=ckpt_path)

    metrics = evaluate_probe(system, val_set, int(cfg.data.batch_size))
    _save_head(system, run_dir)
    if cfg.head.kind == "dpt":
        export_decoder(system.head.decoder, run_dir / "decoder.npz")
    atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    run_id = None
    if logger:
        logger.log_metrics(metrics, step=int(trainer.global_step))
        run_id = logger.run_id
        for name in ("config.yaml", "metrics.json", "head.safetensors", "decoder.npz"):
            if (run_dir / name).exists():
                logger.experiment.log_artifact(run_id, str(run_dir / name), artifact_path="probe")
        logger.finalize("success")
    return ProbeResult(run_dir=run_dir, metrics=metrics, first_loss=system.losses[0] if system.losses else None,
                       last_loss=system.losses[-1] if system.losses else None, run_id=run_id)


def _save_head(system: ProbeSystem, run_dir: Path) -> None:
    from safetensors.torch import save_file

    from tipslab.atomic import atomic_write

    state = {k: v.detach().cpu().contiguous() for k, v in system.head.state_dict().items()}
    atomic_write(run_dir / "head.safetensors", lambda tmp: save_file(state, tmp))


def temporary_run_dir() -> tempfile.TemporaryDirectory:
    """A scratch run directory (the eval suites keep nothing)."""
    return tempfile.TemporaryDirectory(prefix="tipslab-probe-")
