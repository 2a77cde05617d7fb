"""The pretraining system: one LightningModule that holds the encoder, the teachers and the
enabled loss components, computes the features they need once, and sums their weighted terms.

The forward is DINOv2/DINOv3's meta-architecture made explicit (modules/features.py):

- **student**: the vision tower on the global crops (masked where the batch has masks) and on
  the local crops, with gradients;
- **teacher**: for head-only EMA (TIPSv2, ``ema.mode=head``) the *same* vision tower without
  gradients, in eval mode, on the unmasked global crops; for full EMA (``ema.mode=full``, TIPS
  v1 / DINOv2) a second, EMA-updated vision tower the system owns; the components' heads have
  their own EMA copies either way;
- **distill**: a frozen model (``distill_teacher.path``), run without gradients on the global
  crops; kept out of the module tree, so it is never trained nor written into checkpoints;
- **text**: the text tower, one pass over both caption slots.

One backbone pass per (role, view), whatever kinds (cls1, cls2, patches) the components ask.

Everything a step computes goes through `forward` (Lightning calls `training_step`, which calls
`self(batch)`): under FSDP2 the root module's forward hooks are what unshard the parameters that
are not inside a sharded block (see platform/parallelize.py).
"""

from __future__ import annotations

import copy
import math

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from tipslab.errors import TipslabError
from tipslab.modules.components import DataViews, build_components, weighted_total
from tipslab.modules.encoder import build_encoder
from tipslab.modules.features import TEXT_VIEWS, FeatureKey, Features, LossOutput
from tipslab.platform.ema import cosine_momentum, ema_update_
from tipslab.platform.grad_clip import clip_grad_norm_
from tipslab.platform.resolution_switch import follow_resolution_stage, match_checkpoint

_NO_DECAY_NAMES = frozenset({"cls_token", "reg_token", "mask_token", "pos_embed", "logit_scale"})
EMA_MODES = ("head", "full")


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up to 1, then cosine decay to `min_ratio` at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def data_views(data_cfg) -> DataViews:
    """What the batches of a ``data:`` config block carry (crop counts, masks)."""
    def get(block, name, default):
        value = block.get(name, default) if block is not None and hasattr(block, "get") else default
        return default if value is None else value

    return DataViews(
        num_global=int(get(get(data_cfg, "global_crops", None), "count", 1)),
        num_local=int(get(get(data_cfg, "local_crops", None), "count", 0)),
        masks=bool(get(get(data_cfg, "masking", None), "enabled", False)),
        negatives=bool(get(get(data_cfg, "hard_negatives", None), "words", [])),
    )


class PretrainingSystem(L.LightningModule):
    def __init__(self, cfg: DictConfig | dict):
        super().__init__()
        cfg = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
        # Saved into every Lightning checkpoint, so a checkpoint rebuilds its own system.
        # (logger=False: the tracker logs the flattened config itself, once per run, see tracking.py)
        self.save_hyperparameters({"cfg": OmegaConf.to_container(cfg, resolve=True)}, logger=False)
        self.cfg = cfg
        self.encoder = build_encoder(cfg.model)
        self.ema_mode = str(cfg.ema.get("mode", "head")) if "ema" in cfg else "head"
        if self.ema_mode not in EMA_MODES:
            raise TipslabError(f"ema.mode={self.ema_mode!r}; expected head (TIPSv2) or full (TIPS v1 / DINOv2)")
        distill = load_distill_teacher(cfg)
        # Not a registered submodule: never trained, never in the state dict (checkpoints) nor in
        # the optimizer; moved to the device in `on_fit_start`.
        object.__setattr__(self, "distill_teacher", distill)
        self.components = build_components(
            cfg.components, embed_dim=self.encoder.vision.embed_dim,
            **({"distill_dim": distill.embed_dim} if distill is not None else {}),
        )
        ibot = self.components["ibot"] if "ibot" in self.components else None
        if ibot is not None and ibot.share_dino_head:
            if "dino" not in self.components:
                raise TipslabError("components.ibot.share_dino_head=true needs components.dino.enabled=true")
            ibot.share_head(self.components["dino"])
        self.needed: frozenset[FeatureKey] = frozenset().union(*(c.needs for c in self.components.values()))
        self.views = data_views(cfg.data)
        for component in self.components.values():
            component.check_data(self.views)
        if self.ema_mode == "full" and self._wants("teacher"):
            # A second backbone, EMA of the student's (TIPS v1); head-only EMA has none.
            self.teacher_vision = copy.deepcopy(self.encoder.vision).requires_grad_(False)
        else:
            self.teacher_vision = None

    def _wants(self, role: str, view: str | None = None) -> set[str]:
        return {k.kind for k in self.needed if k.role == role and (view is None or k.view == view)}

    # -- one step ---------------------------------------------------------------------------
    def forward(self, batch) -> tuple[torch.Tensor, dict[str, LossOutput]]:
        features = self.compute_features(batch)
        outputs = {name: component(features) for name, component in self.components.items()}
        weights = {name: component.weight for name, component in self.components.items()}
        return weighted_total(outputs, weights), outputs

    def compute_features(self, batch) -> Features:
        """Only what the enabled components asked for, each backbone pass once."""
        batch_size = batch.images.shape[0]
        global_images = batch.images if batch.global_crops is None else batch.global_crops.flatten(0, 1)
        masks = None if batch.masks is None else batch.masks.flatten(0, 1)
        features = Features(
            logit_scale=self.encoder.logit_scale, batch_size=batch_size, num_global=batch.num_global,
            num_local=batch.num_local, masks=masks, negative_valid=batch.negative_valid, step=int(self.global_step),
            max_steps=int(self.cfg.trainer.max_steps),
        )
        store = features.values

        def keep(role: str, view: str, out, kinds: set[str]) -> None:
            for kind in kinds - {"dense"}:
                store[FeatureKey(role, view, kind)] = getattr(out, kind)

        def keep_global(role: str, tower, kinds: set[str], mask=None) -> None:
            """``kinds`` of ``tower`` on the global crops, the dense readout among them."""
            if "dense" in kinds and kinds != {"dense"} and mask is None:
                # Both from one pass through the shared blocks (the dense readout differs in the last only).
                out, dense = tower.forward_with_dense(global_images)
                keep(role, "global", out, kinds)
                store[FeatureKey(role, "global", "dense")] = dense.patches
                return
            if kinds - {"dense"}:
                keep(role, "global", tower(global_images, mask=mask), kinds)
            if "dense" in kinds:  # the dense readout sees unmasked crops
                store[FeatureKey(role, "global", "dense")] = tower.forward_dense(global_images).patches

        keep_global("student", self.encoder.vision, self._wants("student", "global"), masks)
        kinds = self._wants("student", "local")
        if kinds:
            if batch.local_crops is None:
                raise TipslabError("a component needs local crops but the batch has none (data.local_crops.count=0)")
            keep("student", "local", self.encoder.vision(batch.local_crops.flatten(0, 1)), kinds)
        kinds = self._wants("teacher")
        if kinds:
            keep("teacher", "global", self.teacher_forward(global_images), kinds)
        kinds = self._wants("distill")
        if kinds:
            with torch.no_grad():
                keep_global("distill", self.distill_teacher, kinds)
        self._text_features(batch, store)
        return features

    def teacher_forward(self, images: torch.Tensor):
        """The self-distillation teacher's backbone pass: no gradients, eval mode (no drop path),
        unmasked views; the student's own tower (head-only EMA) or the EMA tower (full EMA)."""
        tower = self.teacher_vision if self.teacher_vision is not None else self.encoder.vision
        was_training = tower.training
        tower.eval()
        try:
            with torch.no_grad():
                return tower(images)
        finally:
            tower.train(was_training)

    def _text_features(self, batch, store) -> None:
        views = [v for v in TEXT_VIEWS if FeatureKey("text", v, "pooled") in self.needed]
        if not views:
            return
        ids = [getattr(batch, f"{v}_ids") for v in views]
        if any(t is None for t in ids):
            missing = [v for v, t in zip(views, ids) if t is None]
            raise TipslabError(f"a component needs the {', '.join(missing)} texts but the batch has none "
                               "(hard negatives: set data.hard_negatives.words)")
        # One text pass over every text slot asked for.
        text = self.encoder.encode_text(torch.cat(ids))
        for view, part in zip(views, text.chunk(len(views))):
            store[FeatureKey("text", view, "pooled")] = part

    def training_step(self, batch, batch_idx):
        total, outputs = self(batch)
        batch_size = batch.images.shape[0]
        logs = {"train/loss": total.detach()}
        for name, out in outputs.items():
            # Under the component's name: two components never collide.
            logs.update({f"train/{name}/{term}": value.detach() for term, value in out.losses.items()})
            logs.update({f"train/{name}/{key}": value for key, value in out.metrics.items()})
        self.log_dict(logs, batch_size=batch_size, prog_bar=False)
        self.log("loss", total.detach(), batch_size=batch_size, prog_bar=True, logger=False)
        return total

    def on_train_batch_start(self, batch, batch_idx) -> None:
        # data.resolution_stages: the stored position table moves to the new grid once (resolution_switch.py).
        follow_resolution_stage(self, batch.images, self.trainer.optimizers)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        match_checkpoint(self, checkpoint)  # a checkpoint from after a stage switch holds the new grid

    def on_fit_start(self) -> None:
        if self.distill_teacher is not None:
            self.distill_teacher.to(self.device)

    def parameter_counts(self) -> dict[str, int]:
        """Trained parameters, EMA-only parameters (teacher heads, full-EMA backbone) and the frozen
        teacher's: what head-only EMA saves shows here."""
        trained = sum(p.numel() for _, p in self.trainable_parameters())
        ema = sum(p.numel() for _, teacher in self.momentum_pairs() for p in teacher.parameters())
        frozen = sum(p.numel() for p in self.distill_teacher.parameters()) if self.distill_teacher is not None else 0
        return {"params/trained": trained, "params/ema": ema, "params/frozen_teacher": frozen}

    # -- optimisation -----------------------------------------------------------------------
    def trainable_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """(name, parameter) of the encoder and of what each component declares it trains."""
        params = [(f"encoder.{n}", p) for n, p in self.encoder.named_parameters() if p.requires_grad]
        seen = {id(p) for _, p in params}
        for name, component in self.components.items():
            names = {id(p): n for n, p in component.named_parameters()}
            for i, p in enumerate(component.learnable_params()):
                if id(p) not in seen:  # a shared head is trained once
                    seen.add(id(p))
                    params.append((f"components.{name}.{names.get(id(p), i)}", p))
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
            # One kernel for every parameter on GPU (as the bench's bare loop); foreach elsewhere.
            fused=True if self.device.type == "cuda" else None,
        )
        total = int(self.cfg.trainer.max_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: warmup_cosine(step, int(opt_cfg.warmup_steps), total, float(opt_cfg.min_lr_ratio)),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def momentum_pairs(self):
        # A head shared by two components (ibot.share_dino_head) is updated once.
        pairs = list({id(pair[1]): pair for component in self.components.values()
                      for pair in component.momentum_pairs()}.values())
        if self.teacher_vision is not None:
            pairs.append((self.encoder.vision, self.teacher_vision))
        return pairs

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        max_norm = float(self.cfg.optim.grad_clip or 0)

        def closure():
            # After backward, before the update: clip here, one DTensor-aware path for every
            # strategy (Lightning's own clipping is off, as it is unsupported under FSDP2).
            loss = optimizer_closure() if optimizer_closure is not None else None
            if max_norm > 0:
                norm = clip_grad_norm_([p for _, p in self.trainable_parameters()], max_norm)
                self.log("train/grad_norm", norm, batch_size=1)
            return loss

        optimizer.step(closure=closure)
        # Once per optimizer step (not per micro-batch), after the student moved.
        pairs = self.momentum_pairs()
        if pairs:
            ema_cfg = self.cfg.ema
            momentum = cosine_momentum(
                self.global_step, int(self.cfg.trainer.max_steps), ema_cfg.momentum, ema_cfg.final_momentum
            )
            ema_update_(pairs, momentum)
            self.log("train/ema_momentum", momentum, batch_size=1)
        for component in self.components.values():
            component.on_optimizer_step()

    def configure_model(self):
        # Called by Lightning under every strategy; under ModelParallelStrategy (FSDP2) with the
        # device mesh set. Activation checkpointing and compile apply either way.
        from tipslab.platform.parallelize import parallelize_system

        parallelize_system(self, getattr(self, "device_mesh", None), self.cfg)


def load_distill_teacher(cfg):
    """The frozen distillation teacher's vision tower (``distill_teacher.path``), or None."""
    block = cfg.get("distill_teacher") if hasattr(cfg, "get") else None
    path = block.get("path") if block is not None else None
    if not path:
        return None
    from tipslab.modules.api import load_model

    img_size = block.get("img_size") or None
    tower = load_model(path, img_size=img_size).encoder.vision
    return tower.eval().requires_grad_(False)
