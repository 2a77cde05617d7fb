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
        if name.startswith("ablate_") or name == "tipsv2_tiny":
            assert cfg.trainer.max_steps == load_config("tipsv2_tiny").trainer.max_steps, name  # one budget
