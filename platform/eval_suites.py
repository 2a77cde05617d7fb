"""`evaluate_model`: every evaluation suite of `tipslab eval` behind one call, for the CLI, the
training callback and ablation scripts.

    from tipslab.platform.eval_suites import evaluate_model
    report = evaluate_model("runs/tipsv2_tiny/latest/model", suites=["zeroshot_seg", "regions"])
    report.table      # polars: suite, data, variant, metric, value, chance
    report.metrics()  # {"eval/zeroshot_seg/scenes/dense/mIoU": ..., ...} for MLflow

Suites (see their modules): `zeroshot_seg` (platform/zeroshot_seg.py), `retrieval`
(eval_retrieval.py), `classification` and `knn` (eval_classification.py), `regions`
(eval_regions.py). Each runs on the built-in scenes val split unless `data` names a dataset for it:
a segmentation folder (ADE20K / VOC / plain layout), a Karpathy JSON file, a class folder, a
folder with train/ and val/ class folders. Settings default to `experiments/defaults.yaml`'s
`eval:` block. Every number is in percent beside the chance level computed for the same data.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import torch

from tipslab.errors import TipslabError

SUITES = ("zeroshot_seg", "retrieval", "classification", "knn", "regions")
# Dense probes (platform/probe_suites.py): they *train* a head for `eval.probes.steps` steps, so
# they run when named, not as part of "all".
PROBE_SUITES = ("linear_seg", "depth")
KNOWN = SUITES + PROBE_SUITES
SCENES = "scenes"


def parse_suites(suites, where: str = "--suite") -> list[str]:
    """"all", a comma-separated string or a list -> known suite names in the given order;
    `where` names the option or config key in errors."""
    if isinstance(suites, str):
        suites = [s.strip() for s in suites.split(",") if s.strip()]
    suites = list(suites or [])
    if suites == ["all"]:
        return list(SUITES)
    unknown = [s for s in suites if s not in KNOWN]
    if unknown:
        raise TipslabError(f"{where} {unknown[0]!r}: unknown suite; expected some of {', '.join(KNOWN)} (or all)")
    if not suites:
        raise TipslabError(f"{where}: no suite given; expected some of {', '.join(KNOWN)} (or all)")
    return list(dict.fromkeys(suites))


def default_settings():
    """The `eval:` block of experiments/defaults.yaml (one place for every default)."""
    from omegaconf import OmegaConf

    from tipslab.platform.config import experiments_dir

    return OmegaConf.load(experiments_dir() / "defaults.yaml").eval


def _settings(overrides):
    from omegaconf import OmegaConf

    base = default_settings()
    if overrides is None:
        return base
    OmegaConf.set_struct(base, True)  # a mistyped setting is an error, not silently ignored
    given = OmegaConf.to_container(overrides, resolve=True) if OmegaConf.is_config(overrides) else dict(overrides)
    try:
        return OmegaConf.merge(base, given)
    except Exception as err:  # omegaconf's ConfigKeyError / ValidationError
        raise TipslabError(f"eval settings: {str(err).splitlines()[0]}") from None


def as_loaded(model, device=None):
    """A `LoadedModel` from a path / release name, or the LoadedModel given."""
    from tipslab.modules.api import LoadedModel, load_model

    if isinstance(model, LoadedModel):
        return model
    return load_model(model, device or ("cuda" if torch.cuda.is_available() else "cpu"))


@dataclass
class EvalReport:
    table: pl.DataFrame
    pictures: dict[str, Path] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def metrics(self, prefix: str = "eval") -> dict[str, float]:
        """Flat names for MLflow: eval/<suite>/<data>/<variant>/<metric>, with the characters MLflow
        refuses in names dropped ('@' of R@k: R@5 -> R5; spaces -> '_')."""
        def clean(text: str) -> str:
            return "".join(c for c in text.replace(" ", "_") if c.isalnum() or c in "_-./")

        return {prefix + "/" + "/".join(clean(r[k]) for k in ("suite", "data", "variant", "metric")):
                float(r["value"]) for r in self.table.iter_rows(named=True)}

    def value(self, suite: str, metric: str, variant: str | None = None, data: str | None = None) -> float:
        rows = self.table.filter((pl.col("suite") == suite) & (pl.col("metric") == metric))
        if variant is not None:
            rows = rows.filter(pl.col("variant") == variant)
        if data is not None:
            rows = rows.filter(pl.col("data") == data)
        if rows.height != 1:
            raise KeyError(f"{suite}/{variant}/{metric}: {rows.height} rows")
        return float(rows["value"][0])

    def markdown(self) -> str:
        with pl.Config(tbl_formatting="MARKDOWN", tbl_hide_column_data_types=True, tbl_hide_dataframe_shape=True,
                       tbl_rows=-1, float_precision=2, tbl_width_chars=200):
            return str(self.table)

    def write(self, out: str | Path) -> dict[str, Path]:
        """eval.csv, eval.json and eval.md in `out`."""
        from tipslab.atomic import atomic_write_text

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"csv": out / "eval.csv", "json": out / "eval.json", "md": out / "eval.md"}
        atomic_write_text(paths["csv"], self.table.write_csv())
        atomic_write_text(paths["json"], json.dumps({"rows": self.table.to_dicts(),
                                                     "pictures": {k: str(v) for k, v in self.pictures.items()}},
                                                    indent=1))
        atomic_write_text(paths["md"], self.markdown() + "\n")
        return paths


def _rows(suite: str, data: str, variant: str, values: dict, chance: dict | float | None) -> list[dict]:
    rows = []
    for metric, value in values.items():
        c = chance.get(metric) if isinstance(chance, dict) else chance
        rows.append({"suite": suite, "data": data, "variant": variant, "metric": metric, "value": float(value),
                     "chance": None if c is None else float(c)})
    return rows


def _seg_chance(dataset, seed: int) -> float:
    """mIoU of a seeded, uniformly random prediction on the same labels: chance, measured."""
    from tipslab.platform.eval_metrics import SegmentationMeter

    meter = SegmentationMeter(len(dataset.class_names), dataset.ignore_index)
    generator = torch.Generator().manual_seed(seed)
    for i in range(len(dataset)):
        label = dataset.label(i) if hasattr(dataset, "label") else dataset[i][1]
        meter.update(torch.randint(len(dataset.class_names), label.shape, generator=generator), label)
    return meter.miou()


def evaluate_model(model, suites=SUITES, data: dict[str, str] | None = None, *, settings=None,
                   out: str | Path | None = None, pictures: bool = True, seed: int = 0, device=None,
                   log=print) -> EvalReport:
    """Run `suites` on `model` (a path, release name or `LoadedModel`) and return an `EvalReport`.

    `data`: {suite: dataset path} ("scenes" or absent: the built-in scenes val split).
    `settings`: overrides of the `eval:` config block (dict or DictConfig).
    `out`: folder for the pictures (and nothing else; `EvalReport.write` writes the table).
    Runs under its own RNG seeded with `seed`: the same call gives the same table and pictures,
    and the caller's random stream (a training run's) is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _evaluate(model, suites, data, settings=settings, out=out, pictures=pictures, seed=seed,
                         device=device, log=log)


def _evaluate(model, suites, data, *, settings, out, pictures, seed, device, log) -> EvalReport:
    from tipslab.datamodules.seg_folder import ScenesSegmentation, open_seg_folder
    from tipslab.platform import eval_classification as cls
    from tipslab.platform import eval_retrieval as ret
    from tipslab.platform.eval_regions import evaluate_regions
    from tipslab.platform.zeroshot_seg import TCL_TEMPLATES, evaluate_segmentation

    suites = parse_suites(suites)
    data = {k: v for k, v in (data or {}).items() if v not in (None, "", SCENES)}
    unknown = [k for k in data if k not in KNOWN]
    if unknown:
        raise TipslabError(f"--data {unknown[0]}=...: unknown suite; expected one of {', '.join(KNOWN)}")
    if "regions" in data:
        raise TipslabError("--data regions=...: region retrieval runs on the scenes (it needs object boxes)")
    cfg = _settings(settings)
    loaded = as_loaded(model, device)
    img = int(loaded.preprocess.img_size)
    n = int(cfg.num_scenes)
    templates = list(cfg.templates) if cfg.templates else list(TCL_TEMPLATES)
    rows: list[dict] = []
    seconds: dict[str, float] = {}
    pics: dict[str, Path] = {}
    out = Path(out) if out else None
    seg_examples = None

    for suite in suites:
        start = time.perf_counter()
        name = Path(data[suite]).name if suite in data else SCENES
        if suite == "zeroshot_seg":
            if suite in data:
                dataset = open_seg_folder(data[suite], limit=cfg.seg.limit, ignore_index=cfg.seg.ignore_index,
                                          reduce_zero_label=cfg.seg.reduce_zero_label)
                short = int(cfg.seg.short_side or img)
            else:
                dataset = ScenesSegmentation("val", num_images=n, image_size=img, seed=seed)
                short = None  # scenes are generated at the model's size
            window = int(cfg.seg.window or img)
            stride = int(cfg.seg.stride or window * 3 // 4)
            result = evaluate_segmentation(loaded.encoder, loaded.tokenizer, dataset, short_side=short,
                                           window=window, stride=stride, templates=templates, keep=4)
            seg_examples = (result["examples"], dataset.class_names, dataset.ignore_index, name)
            rows += _rows(suite, name, "dense", {"mIoU": result["miou"], "pixel_acc": result["pixel_acc"]},
                          {"mIoU": _seg_chance(dataset, seed)})
            if suite not in data:  # the scenes know every object: the pointing game beside mIoU
                from tipslab.platform.evaluate import pointing_game

                scenes = [dataset.scenes.scene(i) for i in range(len(dataset.scenes))]
                point = pointing_game(loaded.encoder, loaded.tokenizer, scenes)
                chance = 100.0 * point.chance
                rows += _rows(suite, name, "pointing", {"acc": 100.0 * point.accuracy,
                                                        "calibrated": 100.0 * point.calibrated,
                                                        "any_object": 100.0 * point.any_object},
                              {"acc": chance, "calibrated": chance})
        elif suite == "retrieval":
            if suite in data:
                paths, texts, owner = ret.load_karpathy(data[suite], split=str(cfg.retrieval.split),
                                                        limit=cfg.retrieval.limit)
                images = ret.read_images(paths, loaded.preprocess)
            else:
                images, texts, owner = ret.scenes_captions(n, img, seed, tuple(cfg.retrieval.scenes_captions))
            result = ret.evaluate_retrieval(loaded, images, texts, owner)
            for variant in ("cls1", "cls2"):
                rows += _rows(suite, name, variant, result[variant], result["chance"])
        elif suite == "classification":
            if suite in data:
                paths, labels, names = cls.class_folder(data[suite])
                images = ret.read_images(paths, loaded.preprocess)
            else:
                from tipslab.datamodules.scenes import scene_class_names

                images, labels = cls.scene_crops("val", n, img, seed)
                names = scene_class_names()
            result = cls.zero_shot_classification(loaded, images, labels, names, templates)
            for variant in ("cls1", "cls2"):
                rows += _rows(suite, name, variant, {"top1": result[variant]}, result["chance"])
        elif suite == "knn":
            if suite in data:
                root = Path(data[suite])
                tr_paths, tr_labels, names = cls.class_folder(root / "train")
                te_paths, te_labels, _ = cls.class_folder(root / "val")
                train_images = ret.read_images(tr_paths, loaded.preprocess)
                test_images = ret.read_images(te_paths, loaded.preprocess)
            else:
                from tipslab.datamodules.scenes import scene_class_names

                train_images, tr_labels = cls.scene_crops("train", int(cfg.knn.train_scenes), img, seed)
                test_images, te_labels = cls.scene_crops("val", n, img, seed)
                names = scene_class_names()
            result = cls.knn_classification(loaded, train_images, tr_labels, test_images, te_labels, len(names),
                                            k=int(cfg.knn.k))
            for variant in ("cls1", "cls2"):
                rows += _rows(suite, name, variant, {"top1": result[variant]}, result["chance"])
        elif suite == "regions":
            result = evaluate_regions(loaded, num_images=n, image_size=img, seed=seed,
                                      factories=tuple(cfg.regions.factories), ks=tuple(cfg.regions.ks))
            for factory in cfg.regions.factories:
                rows += _rows(suite, name, f"index {factory}", result[factory], result["chance"])
        elif suite in PROBE_SUITES:
            from tipslab.platform.probe_suites import depth_suite, linear_seg_suite

            run = linear_seg_suite if suite == "linear_seg" else depth_suite
            where = {}
            if suite in data:  # a VOC / ADE20K folder for linear_seg, an NYU-style folder for depth
                where = {"data_source": "seg_folder" if suite == "linear_seg" else "depth_folder",
                         "data_path": str(data[suite])}
            result = run(loaded, steps=int(cfg.probes.steps), seed=seed, **where)
            # Shares in % as the other rows; depth errors keep their units (metres, a ratio).
            names = {"miou": ("mIoU", 100.0), "pixel_acc": ("pixel_acc", 100.0), "delta1": ("delta1", 100.0),
                     "rmse": ("RMSE_m", 1.0), "abs_rel": ("AbsRel", 1.0)}
            # The per-patch oracle's rows beside the probe's: the best any encoder can do on the patch
            # grid (modules/patch_oracle.py), so a probe's distance to that ceiling can be read.
            by_variant = {"linear probe": {}, "per-patch oracle": {}}
            for key, value in result.items():
                metric = key.split("/", 1)[1]
                variant = "per-patch oracle" if metric.startswith("patch_oracle_") else "linear probe"
                label, scale = names[metric.removeprefix("patch_oracle_")]
                by_variant[variant][label] = value * scale
            for variant, metrics in by_variant.items():
                rows += _rows(suite, name, variant, metrics, None)
        seconds[suite] = time.perf_counter() - start
        if log:
            log(f"eval {suite} on {name}: {seconds[suite]:.1f} s")

    if pictures and out is not None:
        pics = write_pictures(loaded, out, seed=seed, num_scenes=n, seg_examples=seg_examples)
    table = pl.DataFrame(rows, schema={"suite": pl.String, "data": pl.String, "variant": pl.String,
                                       "metric": pl.String, "value": pl.Float64, "chance": pl.Float64})
    return EvalReport(table=table, pictures=pics, seconds=seconds)


def write_pictures(loaded, out: Path, *, seed: int = 0, num_scenes: int = 4, seg_examples=None,
                   count: int = 4) -> dict[str, Path]:
    """PCA of patch features, patch-text heatmaps (scenes val) and, when zero-shot segmentation
    ran, its overlays: {name: path}."""
    from tipslab.datamodules.scenes import ScenesDataset
    from tipslab.platform.eval_pictures import pca_picture, query_heatmaps, segmentation_picture

    out = Path(out)
    img = int(loaded.preprocess.img_size)
    val = ScenesDataset("val", num_images=max(num_scenes, count), image_size=img, seed=seed)
    scenes = [val.scene(i) for i in range(count)]
    images = torch.stack([s.to_tensor() for s in scenes])
    pics = {
        "pca": pca_picture(loaded.encoder, images, out / "pca.png"),
        "query_heatmaps": query_heatmaps(loaded.encoder, loaded.tokenizer, scenes, out / "query_heatmaps.png"),
    }
    if seg_examples is not None and seg_examples[0]:
        examples, names, ignore, data_name = seg_examples
        pics["zeroshot_seg"] = segmentation_picture(examples, names, ignore, out / "zeroshot_seg.png",
                                                    title=f"zero-shot segmentation on {data_name}")
    return pics
