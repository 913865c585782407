"""Config loading: defaults <- YAML <- overrides, with errors that say what to change."""

from dataclasses import dataclass, field

import pytest

from evamim.config import ConfigError, load_config, save_config, to_dict


@dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int | None = None


@dataclass
class Run:
    optim: Optim = field(default_factory=Optim)
    seed: int = 0
    name: str = "run"

    def __post_init__(self):
        if self.seed < 0:
            raise ValueError("seed must be >= 0")


def test_layers_apply_in_order(tmp_path):
    (tmp_path / "r.yaml").write_text("optim:\n  lr: 5.0e-4\nseed: 3\n")
    config = load_config(Run, tmp_path / "r.yaml", ["seed=4", "optim.betas=[0.9,0.95]"])
    assert config == Run(optim=Optim(lr=5e-4, betas=(0.9, 0.95)), seed=4)
    assert isinstance(config.optim, Optim)


def test_typo_lists_valid_keys_and_origin(tmp_path):
    with pytest.raises(ConfigError) as error:
        load_config(Run, None, ["optim.lrr=1"])
    message = str(error.value)
    assert "override 'optim.lrr=1'" in message and "valid keys under optim: betas, lr, warmup_steps" in message
    (tmp_path / "bad.yaml").write_text("sed: 1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*\n.*valid keys under the top level: name, optim, seed"):
        load_config(Run, tmp_path / "bad.yaml")


def test_wrong_types_and_malformed_overrides_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match="seed"):
        load_config(Run, None, ["seed=abc"])
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Run, None, ["optim.betas=[0.9,"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(Run, None, ["seed"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(Run, tmp_path / "missing.yaml")
    (tmp_path / "broken.yaml").write_text("optim:\n  lr: [1,\n")
    with pytest.raises(ConfigError, match="broken.yaml is not valid YAML"):
        load_config(Run, tmp_path / "broken.yaml")
    with pytest.raises(ConfigError, match="seed must be >= 0"):
        load_config(Run, None, ["seed=-1"])


def test_roundtrip_through_saved_yaml(tmp_path):
    config = load_config(Run, None, ["optim.warmup_steps=10", "name=x"])
    save_config(config, tmp_path / "resolved.yaml")
    assert load_config(Run, tmp_path / "resolved.yaml") == config
    assert list(to_dict(config)["optim"]["betas"]) == [0.9, 0.98]


def test_a_directory_or_a_binary_file_as_config_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="is a directory; give a YAML file$"):
        load_config(Run, tmp_path)
    (tmp_path / "config.yaml").write_text("seed: 1\n")  # a run directory: point at its resolved config
    with pytest.raises(ConfigError, match=f"is a directory; give a YAML file, e.g. {tmp_path / 'config.yaml'}"):
        load_config(Run, tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"\x80\x81\xfe\xff" * 8)
    with pytest.raises(ConfigError, match="weights.bin"):
        load_config(Run, tmp_path / "weights.bin")


@pytest.mark.parametrize("override, key", [
    ("optim.lr=-1", "optim.lr"), ("optim.min_lr=-1", "optim.min_lr"), ("optim.weight_decay=-1", "optim.weight_decay"),
    ("optim.name=adam", "optim.name"), ("optim.schedule=step", "optim.schedule"), ("optim.betas=[0.9,1]", "optim.betas"),
    ("optim.warmup_steps=-1", "optim.warmup_steps"), ("optim.layer_decay=0", "optim.layer_decay"),
    ("optim.momentum=1", "optim.momentum"),
])
def test_optim_settings_are_checked_when_the_config_is_built(override, key):
    from evamim.engine.optim import OptimConfig

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(OptimConfig, None, [override.removeprefix("optim.")])


def test_warmup_is_set_one_way_and_the_edges_are_accepted():
    from evamim.engine.optim import OptimConfig

    with pytest.raises(ConfigError, match="both set"):
        load_config(OptimConfig, None, ["warmup_steps=10", "warmup_epochs=1"])
    load_config(OptimConfig, None, ["warmup_steps=10", "lr=0", "betas=[0,0.999]", "layer_decay=1"])
