"""Experiment configs: experiments/<name>.yaml layered on experiments/defaults.yaml, then overrides.

Struct mode (as DINOv3): every key an experiment or override may set is declared in
defaults.yaml, so a typo fails at once and the error names the nearest valid key.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    OmegaConfBaseException,
)

from tipslab.errors import TipslabError


def experiments_dir() -> Path:
    import tipslab.experiments

    return Path(list(tipslab.experiments.__path__)[0])


PROBE_PREFIX = "probe_"  # experiments over defaults_probe.yaml (dense probes) are named probe_*


def available_experiments(defaults: str = "defaults") -> list[str]:
    """Experiment names of one key set: pretraining (`defaults`) or dense probes (`defaults_probe`)."""
    # defaults*.yaml are the key sets, not experiments.
    names = [p.stem for p in experiments_dir().glob("*.yaml") if not p.stem.startswith("defaults")]
    probes = defaults == "defaults_probe"
    return sorted(n for n in names if n.startswith(PROBE_PREFIX) == probes)


def _all_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for key in cfg.keys():
        full = f"{prefix}{key}"
        keys.append(full)
        node = cfg._get_node(key)
        if isinstance(node, DictConfig):
            keys.extend(_all_keys(node, full + "."))
    return keys


def _unknown_key_error(defaults: DictConfig, bad_key: str, where: str) -> TipslabError:
    valid = _all_keys(defaults)
    close = difflib.get_close_matches(bad_key, valid, n=1, cutoff=0.4)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return TipslabError(f"unknown config key '{bad_key}' in {where}{hint}")


def _flat_keys(container, prefix: str = "") -> list[str]:
    """Dotted keys of a plain (unresolved) dict, leaves and branches."""
    out = []
    if isinstance(container, dict):
        for key, value in container.items():
            full = f"{prefix}{key}"
            out.append(full)
            out.extend(_flat_keys(value, full + "."))
    return out


def _check_keys(defaults: DictConfig, layer: DictConfig, where: str) -> None:
    valid = set(_all_keys(defaults))
    plain = OmegaConf.to_container(layer, resolve=False)
    # Keys come outermost first, so the first unknown one is the one to report.
    for key in _flat_keys(plain):
        if key not in valid:
            raise _unknown_key_error(defaults, key, where)
        group = OmegaConf.select(defaults, key, throw_on_missing=False, throw_on_resolution_failure=False)
        value = OmegaConf.select(layer, key, throw_on_missing=False, throw_on_resolution_failure=False)
        if isinstance(group, DictConfig) and not isinstance(value, DictConfig):
            # `trainer=5` would replace the whole group and crash much later.
            first = next(iter(group.keys()), "key")
            raise TipslabError(f"config key '{key}' in {where} is a group of keys, not a value: got {value!r}; "
                               f"set its keys instead (e.g. {key}.{first}=...)")


# Values Lightning or the data loaders would only reject deep inside a run: (smallest allowed, what it means).
_LOWER_BOUNDS = {
    "trainer.max_steps": (1, "at least one training step"),
    "trainer.num_nodes": (1, "at least one node"),
    "trainer.accumulate_grad_batches": (1, "at least one batch per optimizer step"),
    "trainer.log_every_n_steps": (1, "a positive step interval"),
    "checkpoint.every_n_steps": (1, "a positive step interval"),
    "checkpoint.keep_last": (1, "at least the newest checkpoint"),
    "data.batch_size": (1, "at least one sample per batch"),
    "data.num_workers": (0, "0 (load in the main process) or more"),
    "data.num_train": (1, "at least one training image"),
    "optim.warmup_steps": (0, "0 or more steps"),
    "eval.every_n_steps": (0, "0 (only at the end) or a step interval"),
    "trainer.activation_checkpointing_every": (1, "1 (every block) or more"),
}


def _check_choices(cfg: DictConfig, where: str) -> None:
    from tipslab.platform.parallelize import ACTIVATION_CHECKPOINTING

    for key, choices in {"trainer.activation_checkpointing": ACTIVATION_CHECKPOINTING}.items():
        value = OmegaConf.select(cfg, key, throw_on_missing=False, default=None)
        if value is not None and value not in choices:
            raise TipslabError(f"config key '{key}' in {where} or the overrides must be one of "
                               f"{', '.join(choices)}, got {value!r}")


# Dense probes (defaults_probe.yaml) may run without checkpoints.
_PROBE_LOWER_BOUNDS = {**_LOWER_BOUNDS, "checkpoint.every_n_steps": (0, "0 (no checkpoints) or a step interval")}


def _check_ranges(cfg: DictConfig, where: str, bounds: dict) -> None:
    for key, (lowest, meaning) in bounds.items():
        value = OmegaConf.select(cfg, key, throw_on_missing=False, default=None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < lowest:
            raise TipslabError(f"config key '{key}' in {where} or the overrides must be >= {lowest} "
                               f"({meaning}), got {value!r}")
    devices = OmegaConf.select(cfg, "trainer.devices", default=None)
    if isinstance(devices, int) and not isinstance(devices, bool) and devices < 1 and devices != -1:
        raise TipslabError(f"config key 'trainer.devices' in {where} or the overrides must be a positive number "
                           f"of devices, -1 or 'auto', got {devices!r}")


def _type_name(value) -> str:
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(type(value), type(value).__name__)


def _check_types(defaults: DictConfig, cfg: DictConfig, where: str) -> None:
    """A value must have its default's type (an int is fine where a float is expected).

    defaults.yaml is plain YAML (no schema classes), so this is where `trainer.max_steps=abc`
    is caught, instead of deep inside Lightning."""
    for key in _all_keys(defaults):
        parent, _, leaf = key.rpartition(".")
        parent_node = OmegaConf.select(defaults, parent) if parent else defaults
        if OmegaConf.is_interpolation(parent_node, leaf):
            continue  # its type is its target's
        default = OmegaConf.select(defaults, key, throw_on_missing=False, throw_on_resolution_failure=False)
        if default is None or isinstance(default, (DictConfig, ListConfig)):
            continue
        value = OmegaConf.select(cfg, key, throw_on_missing=False)
        if value is None:
            continue
        ok = isinstance(value, type(default)) and not (isinstance(value, bool) and not isinstance(default, bool))
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if isinstance(default, str) and isinstance(value, (int, float)) and not isinstance(value, bool):
            ok = True  # e.g. devices=auto by default, 8 given; the consumer interprets it
        if default == "auto" and isinstance(value, bool):
            ok = True  # a tri-state key (auto | true | false), e.g. data.crops_on_device
        if not ok:
            raise TipslabError(
                f"config key '{key}' in {where} or the overrides expects {_type_name(default)}, got {value!r}"
            )


def resolve_experiment_path(exp: str, defaults: str = "defaults") -> Path:
    path = Path(exp)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise TipslabError(f"experiment file '{exp}' does not exist")
        return path
    candidate = experiments_dir() / f"{exp}.yaml"
    if not candidate.is_file():
        names = available_experiments(defaults)
        close = difflib.get_close_matches(exp, names, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise TipslabError(
            f"unknown experiment '{exp}': no {candidate}.{hint} Available: {', '.join(names)}"
        )
    return candidate


def _experiment_layers(exp_path: Path, defaults: str = "defaults",
                       seen: tuple[Path, ...] = ()) -> list[tuple[Path, DictConfig]]:
    """The experiment file and, first, the files it builds on: an experiment may say
    ``base: <experiment>`` to start from another one (the ablations start from tipsv2_tiny)."""
    layer = _load_yaml(exp_path)
    if layer is None or not isinstance(layer, DictConfig):
        layer = OmegaConf.create({})
    base = layer.pop("base", None)
    if base is None:
        return [(exp_path, layer)]
    if not isinstance(base, str):
        raise TipslabError(f"{exp_path}: base must name an experiment, got {base!r}")
    base_path = resolve_experiment_path(base, defaults)
    if base_path.resolve() in {p.resolve() for p in (*seen, exp_path)}:
        raise TipslabError(f"{exp_path}: base experiments form a cycle through {base_path}")
    return [*_experiment_layers(base_path, defaults, (*seen, exp_path)), (exp_path, layer)]


def _yaml_problem(err: Exception, lines: bool = True) -> str:
    """One line from a YAML error: what is wrong and where (PyYAML's messages span several lines)."""
    if isinstance(err, yaml.MarkedYAMLError):
        mark = err.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None and lines else ""
        problem = err.problem or err.context or "invalid YAML"
        if "cannot start any token" in problem:
            problem += " (a tab? YAML indents with spaces)"
        return f"{problem}{where}"
    return " ".join(str(err).split())


def _load_yaml(path: Path) -> DictConfig:
    try:
        layer = OmegaConf.load(path)
    except UnicodeDecodeError as err:
        raise TipslabError(f"cannot read experiment file {path}: not a text YAML file "
                           f"(byte {err.start} is not UTF-8)") from err
    except (yaml.YAMLError, OmegaConfBaseException) as err:
        raise TipslabError(f"cannot read experiment file {path}: {_yaml_problem(err)}") from err
    except OSError as err:
        raise TipslabError(f"cannot read experiment file {path}: {err.strerror}") from err
    if layer is not None and not isinstance(layer, DictConfig):
        raise TipslabError(f"cannot read experiment file {path}: it must be a mapping of keys (e.g. 'trainer: {{max_steps: 10}}'), "
                           f"got a list")
    return layer


def _parse_overrides(overrides) -> DictConfig:
    layers = []
    for item in overrides:
        if "=" not in item:
            raise TipslabError(f"override '{item}' is not of the form key=value (e.g. trainer.max_steps=200)")
        try:  # one at a time, so the error names the override that is broken
            layers.append(OmegaConf.from_dotlist([item]))
        except (yaml.YAMLError, OmegaConfBaseException) as err:
            raise TipslabError(f"cannot parse override '{item}': {_yaml_problem(err, lines=False)} "
                               f"(quote a value that is meant as text)") from err
    try:
        return OmegaConf.merge(OmegaConf.create({}), *layers)
    except OmegaConfBaseException as err:
        raise TipslabError(f"cannot combine overrides {list(overrides)}: {err}") from err


def load_config(exp: str, overrides: list[str] | tuple[str, ...] = (), defaults: str = "defaults") -> DictConfig:
    """The resolved, struct-mode config of experiment `exp` with `key=value` overrides applied.

    `defaults` names the key set in experiments/ (`defaults`: pretraining; `defaults_probe`:
    dense probes, `tipslab probe`)."""
    key_set = defaults
    exp_path = resolve_experiment_path(exp, defaults)
    layers = _experiment_layers(exp_path, defaults)
    defaults = OmegaConf.load(experiments_dir() / f"{defaults}.yaml")
    for path, layer in layers:
        _check_keys(defaults, layer, str(path))

    override_layer = _parse_overrides(overrides)
    _check_keys(defaults, override_layer, "the command-line overrides")

    OmegaConf.set_struct(defaults, True)
    try:
        cfg = OmegaConf.merge(defaults, *(layer for _, layer in layers), override_layer)
    except (ConfigKeyError, ConfigAttributeError) as err:  # type mismatches and the like
        raise TipslabError(f"bad config value: {err.msg if hasattr(err, 'msg') else err}") from err
    except OmegaConfBaseException as err:
        raise TipslabError(f"bad config value: {err}") from err
    if OmegaConf.is_missing(cfg, "experiment"):
        cfg.experiment = exp_path.stem
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        raise TipslabError(f"cannot resolve config of {exp_path}: {err}") from err
    _check_choices(cfg, str(exp_path))  # before the types: true/false get the list of choices
    _check_types(defaults, cfg, str(exp_path))
    _check_ranges(cfg, str(exp_path), _PROBE_LOWER_BOUNDS if key_set == "defaults_probe" else _LOWER_BOUNDS)
    return cfg


def save_config(cfg: DictConfig, path: str | Path) -> None:
    """Write the resolved config beside a run (atomically) so the run can be reproduced."""
    from tipslab.atomic import atomic_write_text

    atomic_write_text(path, OmegaConf.to_yaml(cfg, resolve=True))


def flatten_for_logging(cfg: DictConfig) -> dict[str, str]:
    """Dotted key -> value strings, the shape MLflow params want."""
    out: dict[str, str] = {}

    def walk(node, prefix):
        if isinstance(node, (DictConfig, dict)):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        elif isinstance(node, (ListConfig, list)):
            out[prefix[:-1]] = str(list(node))
        else:
            out[prefix[:-1]] = str(node)

    walk(cfg, "")
    return out
