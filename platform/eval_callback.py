"""Evaluation during training: every suite of `eval.suites` on a schedule (`eval.every_n_steps`)
and at the end of training, logged to MLflow as metrics `eval/<suite>/<data>/<variant>/<metric>`;
at the end also the pictures (PCA, zero-shot segmentation, query heatmaps, loss/metric curves) as
artifacts under `eval/`. `evaluate_model` runs under its own seeded RNG, so evaluating mid-run
leaves the training's random stream, and so its resumability, untouched.

Under FSDP2 the encoder's parameters are shards: `gathered_encoder` gathers the full weights on
every rank (a collective, so every rank calls it) and rank zero evaluates a plain copy.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from omegaconf import OmegaConf

log = logging.getLogger(__name__)


def gathered_encoder(pl_module):
    """The encoder with plain tensors on the module's device (a collective under FSDP2: call it
    on every rank); the module's own encoder when it is not sharded."""
    from tipslab.platform.train import _full_encoder

    encoder = _full_encoder(pl_module)
    return encoder if encoder is pl_module.encoder else encoder.to(pl_module.device)


def loaded_for(encoder, tokenizer, cfg):
    """A `LoadedModel` around an encoder being trained (what `evaluate_model` takes)."""
    from tipslab.modules.api import LoadedModel, Preprocess

    return LoadedModel(encoder=encoder, tokenizer=tokenizer, preprocess=Preprocess(int(cfg.model.vision.img_size)),
                       model_cfg=OmegaConf.to_container(cfg.model, resolve=True))


class EvaluationCallback(L.Callback):
    def __init__(self, cfg, tokenizer):
        from tipslab.platform.eval_suites import parse_suites

        self.cfg = cfg
        self.tokenizer = tokenizer
        self.suites = parse_suites(list(cfg.eval.suites), where="eval.suites")
        self.every = int(cfg.eval.every_n_steps)
        self.results: dict[str, float] = {}
        self._last_step = -1

    def _evaluate(self, trainer, pl_module, final: bool) -> None:
        from tipslab.platform.eval_suites import evaluate_model

        encoder = gathered_encoder(pl_module)  # every rank: the gather is a collective
        step = trainer.global_step
        self._last_step = step
        if trainer.is_global_zero:
            out = Path(self.cfg.run_dir) / "eval" if final else None
            report = evaluate_model(loaded_for(encoder, self.tokenizer, self.cfg), self.suites,
                                    settings=self.cfg.eval, out=out, seed=int(self.cfg.eval.seed),
                                    pictures=final and bool(self.cfg.eval.pictures), log=None)
            self.results = report.metrics()
            logger = trainer.logger
            if logger is not None:
                logger.log_metrics(self.results, step=step)
            if final:
                self._write_files(logger, report)
            log.info("evaluation at step %d: %s", step, self.results)
        trainer.strategy.barrier()

    def _write_files(self, logger, report) -> None:
        """<run_dir>/eval: the table, the pictures and the curves; all logged when there is a run."""
        from tipslab.platform.eval_pictures import curves_picture

        out = Path(self.cfg.run_dir) / "eval"
        files = report.write(out)
        if logger is None or not getattr(logger, "run_id", None):
            return
        pictures = dict(report.pictures)
        try:
            curves = curves_picture(logger._tracking_uri, logger.run_id, out / "curves.png")
            if curves is not None:
                pictures["curves"] = curves
        except Exception as err:  # noqa: BLE001 - a tracking store we cannot read only costs the plot
            log.warning("no curves picture: %s", err)
        for path in list(pictures.values()) + [files["csv"], files["md"]]:
            logger.experiment.log_artifact(logger.run_id, str(path), artifact_path="eval")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.every > 0 and step > 0 and step % self.every == 0 and step != self._last_step \
                and step < int(self.cfg.trainer.max_steps):  # the last step is evaluated at the end
            self._evaluate(trainer, pl_module, final=False)

    def on_train_end(self, trainer, pl_module):
        self._evaluate(trainer, pl_module, final=True)
