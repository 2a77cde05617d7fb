import pytest
from omegaconf import OmegaConf

from tipslab.errors import TipslabError
from tipslab.platform.config import (
    available_experiments,
    flatten_for_logging,
    load_config,
)


def test_experiment_layers_on_defaults_and_overrides_apply():
    cfg = load_config("tipsv2_tiny", ["trainer.max_steps=7", "optim.lr=0.5"])
    assert cfg.experiment == "tipsv2_tiny"
    assert cfg.trainer.max_steps == 7 and cfg.optim.lr == 0.5
    # Interpolations are resolved: data follows the model's image size.
    assert cfg.data.image_size == cfg.model.vision.img_size == 112
    assert OmegaConf.is_struct(cfg)


def test_mistyped_override_names_nearest_key():
    with pytest.raises(TipslabError, match=r"trainer\.max_step'.*did you mean 'trainer\.max_steps'"):
        load_config("tipsv2_tiny", ["trainer.max_step=3"])


def test_mistyped_key_in_experiment_file_names_file_and_key(tmp_path):
    exp = tmp_path / "mine.yaml"
    exp.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(TipslabError, match=r"optim\.learning_rate.*mine\.yaml"):
        load_config(str(exp))


def test_unknown_experiment_lists_available():
    with pytest.raises(TipslabError, match=r"unknown experiment 'tipsv2_tny'.*Did you mean 'tipsv2_tiny'"):
        load_config("tipsv2_tny")


def test_override_without_equals_is_explained():
    with pytest.raises(TipslabError, match="key=value"):
        load_config("tipsv2_tiny", ["trainer.max_steps"])


def test_every_experiment_resolves():
    names = available_experiments()
    assert {"tipsv2_tiny", "tipsv2_b"} <= set(names)
    for name in names:
        cfg = load_config(name)
        assert cfg.model.vision.img_size % 14 == 0, name


def test_flatten_for_logging_has_dotted_keys():
    flat = flatten_for_logging(load_config("tipsv2_tiny"))
    assert flat["model.vision.size"] == "tiny"
    assert flat["data.caption_granularities"] == "['short', 'long']"


def test_value_of_the_wrong_type_names_key_and_expected_type():
    with pytest.raises(TipslabError, match=r"'trainer.max_steps'.*expects an integer, got 'abc'"):
        load_config("tipsv2_tiny", ["trainer.max_steps=abc"])
    with pytest.raises(TipslabError, match=r"'tracking.pictures'.*expects true/false"):
        load_config("tipsv2_tiny", ["tracking.pictures=3"])
    # An integer where a number is expected is fine.
    assert load_config("tipsv2_tiny", ["optim.lr=1"]).optim.lr == 1


def test_experiment_can_build_on_another_with_base(tmp_path):
    cfg = load_config("tipsv2_l")
    assert cfg.experiment == "tipsv2_l" and cfg.model.vision.size == "l"
    assert cfg.components.ibot.enabled and cfg.data.local_crops.count == 8  # from tipsv2_b
    (tmp_path / "a.yaml").write_text("base: " + str(tmp_path / "b.yaml") + "\ntrainer: {max_steps: 3}\n")
    (tmp_path / "b.yaml").write_text("base: " + str(tmp_path / "a.yaml") + "\n")
    with pytest.raises(TipslabError, match="cycle"):
        load_config(str(tmp_path / "a.yaml"))
    (tmp_path / "c.yaml").write_text("base: tipsv2_tiny\ntrainer: {max_step: 3}\n")
    with pytest.raises(TipslabError, match="did you mean 'trainer.max_steps'"):
        load_config(str(tmp_path / "c.yaml"))


def test_every_experiments_components_build_and_accept_its_data():
    """Each shipped experiment's components construct and their start-up data checks pass
    (at a small width: the point is the settings, not the size)."""
    from tipslab.modules.components import build_components
    from tipslab.platform.system import data_views

    for name in available_experiments():
        cfg = load_config(name)
        small = OmegaConf.to_container(cfg.components)
        for block in (small["dino"], small["ibot"]):  # head sizes do not change what is checked
            block.update(prototypes=8, hidden_dim=8, bottleneck_dim=4)
        components = build_components(small, embed_dim=16, distill_dim=32)
        for component in components.values():
            component.check_data(data_views(cfg.data))
        if name.startswith("ablate_"):
            assert cfg.trainer.max_steps == load_config("ablate_contrastive").trainer.max_steps, name  # one budget


@pytest.mark.parametrize("text, problem", [
    (b"trainer:\n  max_steps: [1\n", r"line 3.*"),                       # syntax error
    (b"trainer:\n\tmax_steps: 3\n", r"tab\? YAML indents with spaces.*line 2"),
    (b"trainer:\n  max_steps: 3\n  max_steps: 4\n", r"duplicate key max_steps at line 3"),
    (bytes(range(256)) * 4, r"not a text YAML file"),                    # a binary file
    (b"- a list\n- not keys\n", r"must be a mapping of keys"),
])
def test_broken_experiment_file_is_one_line_naming_the_file(tmp_path, text, problem):
    exp = tmp_path / "broken.yaml"
    exp.write_bytes(text)
    with pytest.raises(TipslabError, match=r"broken\.yaml: .*" + problem) as info:
        load_config(str(exp))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("override, message", [
    ("trainer.max_steps=[1,2", r"cannot parse override 'trainer\.max_steps=\[1,2'"),
    ("trainer=5", r"'trainer' .* is a group of keys, not a value: got 5"),
    ("trainer.max_steps=-5", r"'trainer\.max_steps' .* must be >= 1 .*got -5"),
    ("checkpoint.every_n_steps=0", r"'checkpoint\.every_n_steps' .* must be >= 1 .*got 0"),
    ("data.batch_size=0", r"'data\.batch_size' .* must be >= 1"),
    ("checkpoint.keep_last=0", r"'checkpoint\.keep_last' .* must be >= 1"),
])
def test_malformed_or_out_of_range_override_names_the_key(override, message):
    with pytest.raises(TipslabError, match=message) as info:
        load_config("tipsv2_tiny", [override])
    assert "\n" not in str(info.value)


def test_group_replaced_by_a_scalar_in_a_file_is_refused(tmp_path):
    exp = tmp_path / "flat.yaml"
    exp.write_text("optim: 0.1\n")
    with pytest.raises(TipslabError, match=r"'optim' in .*flat\.yaml is a group of keys"):
        load_config(str(exp))


def test_probes_may_still_run_without_checkpoints():
    cfg = load_config("probe_seg_scenes", ["encoder.path=x", "checkpoint.every_n_steps=0"], defaults="defaults_probe")
    assert cfg.checkpoint.every_n_steps == 0


def test_cli_prints_one_line_and_exits_2_for_a_broken_override(capsys):
    from tipslab.platform.cli import main

    assert main(["config", "tipsv2_tiny", "trainer.max_steps=[1,2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "trainer.max_steps" in err and "Traceback" not in err
