"""The pretraining system: one LightningModule that holds the encoder and the enabled loss
components, computes the features they need in one forward, and sums their weighted terms.

Everything a step computes goes through `forward` (Lightning calls `training_step`, which calls
`self(batch)`): under FSDP2 the root module's forward hooks are what unshard the parameters that
are not inside a sharded block (see platform/parallelize.py).
"""

from __future__ import annotations

import math

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from tipslab.modules.components import build_components, weighted_total
from tipslab.modules.encoder import build_encoder
from tipslab.modules.features import Features, LossOutput
from tipslab.platform.ema import cosine_momentum, ema_update_

_NO_DECAY_NAMES = frozenset({"cls_token", "reg_token", "mask_token", "pos_embed", "logit_scale"})


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up to 1, then cosine decay to `min_ratio` at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class PretrainingSystem(L.LightningModule):
    def __init__(self, cfg: DictConfig | dict):
        super().__init__()
        cfg = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
        # Saved into every Lightning checkpoint, so a checkpoint rebuilds its own system.
        # (logger=False: the tracker logs the flattened config itself, once per run, see tracking.py)
        self.save_hyperparameters({"cfg": OmegaConf.to_container(cfg, resolve=True)}, logger=False)
        self.cfg = cfg
        self.encoder = build_encoder(cfg.model)
        self.components = build_components(cfg.components, embed_dim=self.encoder.vision.embed_dim)
        self.needed = frozenset().union(*(c.needs for c in self.components.values()))

    # -- one step ---------------------------------------------------------------------------
    def forward(self, batch) -> tuple[torch.Tensor, dict[str, LossOutput]]:
        features = self.compute_features(batch)
        outputs = {name: component(features) for name, component in self.components.items()}
        weights = {name: component.weight for name, component in self.components.items()}
        return weighted_total(outputs, weights), outputs

    def compute_features(self, batch) -> Features:
        """Only what the enabled components asked for."""
        need = self.needed
        features = Features(logit_scale=self.encoder.logit_scale)
        if need & {"cls1", "cls2", "patches"}:
            vision = self.encoder.encode_image(batch.images, mask=getattr(batch, "masks", None))
            features.cls1, features.cls2, features.patches = vision.cls1, vision.cls2, vision.patches
        wants_alt, wants_caption = "text_alt" in need, "text_caption" in need
        if wants_alt and wants_caption:
            # One text pass over both caption slots instead of two.
            text = self.encoder.encode_text(torch.cat([batch.alt_ids, batch.caption_ids]))
            features.text_alt, features.text_caption = text.chunk(2)
        elif wants_alt:
            features.text_alt = self.encoder.encode_text(batch.alt_ids)
        elif wants_caption:
            features.text_caption = self.encoder.encode_text(batch.caption_ids)
        return features

    def training_step(self, batch, batch_idx):
        total, outputs = self(batch)
        batch_size = batch.images.shape[0]
        logs = {"train/loss": total.detach()}
        for name, out in outputs.items():
            logs.update({f"train/{term}": value.detach() for term, value in out.losses.items()})
            logs.update({f"train/{name}/{key}": value for key, value in out.metrics.items()})
        self.log_dict(logs, batch_size=batch_size, prog_bar=False)
        self.log("loss", total.detach(), batch_size=batch_size, prog_bar=True, logger=False)
        return total

    # -- optimisation -----------------------------------------------------------------------
    def trainable_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """(name, parameter) of the encoder and of what each component declares it trains."""
        params = [(f"encoder.{n}", p) for n, p in self.encoder.named_parameters() if p.requires_grad]
        for name, component in self.components.items():
            params.extend((f"components.{name}.{i}", p) for i, p in enumerate(component.learnable_params()))
        return params

    def configure_optimizers(self):
        opt_cfg = self.cfg.optim
        decay, no_decay = [], []
        for name, param in self.trainable_parameters():
            # Norms, biases, learned tokens, position tables and the temperature are not decayed
            # (as DINOv2 and open_clip do).
            is_token = name.rsplit(".", 1)[-1] in _NO_DECAY_NAMES
            (no_decay if param.ndim <= 1 or is_token else decay).append(param)
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": opt_cfg.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=opt_cfg.lr,
            betas=tuple(opt_cfg.betas),
        )
        total = int(self.cfg.trainer.max_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: warmup_cosine(step, int(opt_cfg.warmup_steps), total, float(opt_cfg.min_lr_ratio)),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def momentum_pairs(self):
        return [pair for component in self.components.values() for pair in component.momentum_pairs()]

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # Once per optimizer step (not per micro-batch), after the student moved.
        pairs = self.momentum_pairs()
        if pairs:
            ema_cfg = self.cfg.ema
            momentum = cosine_momentum(
                self.global_step, int(self.cfg.trainer.max_steps), ema_cfg.momentum, ema_cfg.final_momentum
            )
            ema_update_(pairs, momentum)
            self.log("train/ema_momentum", momentum, batch_size=1)

    def configure_model(self):
        # Called by Lightning under ModelParallelStrategy (FSDP2) with the device mesh set.
        if getattr(self, "device_mesh", None) is not None:
            from tipslab.platform.parallelize import parallelize_system

            parallelize_system(self, self.device_mesh, self.cfg)
