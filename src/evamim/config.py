"""Typed configs: dataclass defaults, a YAML file of deltas, then ``key=value`` overrides from the command line.

One source of defaults (the dataclasses, each section defined next to the code that uses it), small YAML
recipes, and overrides such as ``optim.lr=5e-4 data.root=/data/in1k``. Unknown or mistyped keys and values
of the wrong type are errors that name the key, the valid keys and the file or override they came from.
The resolved config is saved next to every run's checkpoints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from evamim import atomic

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message says what to change."""


def _valid_keys(schema: Any, full_key: str) -> list[str]:
    """Keys of the section that ``full_key``'s parent names (the top level for a bare key)."""
    parent = full_key.rsplit(".", 1)[0] if "." in full_key else ""
    node = OmegaConf.structured(schema)
    if parent:
        node = OmegaConf.select(node, parent, default=None)
    return sorted(str(k) for k in node.keys()) if isinstance(node, DictConfig) else []


def _explain(error: OmegaConfBaseException, schema: Any, origin: str) -> ConfigError:
    full_key = getattr(error, "full_key", None) or ""
    first_line = str(error).splitlines()[0]
    message = f"{origin}: {first_line}"
    if isinstance(error, ConfigKeyError):
        keys = _valid_keys(schema, full_key)
        if keys:
            parent = full_key.rsplit(".", 1)[0] if "." in full_key else "the top level"
            message += f"\n  valid keys under {parent}: {', '.join(keys)}"
    elif full_key:
        message += f"\n  (key: {full_key})"
    return ConfigError(message)


def load_config(schema: type[T], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Defaults of ``schema`` <- YAML file at ``path`` <- ``overrides`` (``a.b=value``), validated; returns a dataclass."""
    base = OmegaConf.structured(schema)
    layers: list[tuple[DictConfig, str]] = []
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file not found: {path}")
        if path.is_dir():
            saved = path / "config.yaml"  # a run directory holds its resolved config there
            hint = f", e.g. {saved}" if saved.is_file() else ""
            raise ConfigError(f"config file {path} is a directory; give a YAML file{hint}")
        try:
            file_config = OmegaConf.load(path)
        except yaml.YAMLError as error:
            raise ConfigError(f"{path} is not valid YAML: {error}") from None
        except (OSError, UnicodeDecodeError) as error:  # unreadable (permissions), or not a text file
            reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
            raise ConfigError(f"cannot read config file {path}: {reason}") from None
        if not isinstance(file_config, DictConfig):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
        layers.append((file_config, str(path)))
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected key=value, e.g. optim.lr=5e-4")
        try:
            layers.append((OmegaConf.from_dotlist([item]), f"override {item!r}"))
        except yaml.YAMLError as error:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({str(error).splitlines()[0]}); "
                              f"quote it for the shell, e.g. 'model.options={{depth: 6}}'") from None
    merged = base
    for layer, origin in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as error:
            raise _explain(error, schema, origin) from None
    try:
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        raise _explain(error, schema, "config") from None
    except (TypeError, ValueError) as error:  # raised by a section's __post_init__ checks
        raise ConfigError(f"config: {error}") from None


def to_dict(config: Any) -> dict:
    """A plain dict of a config dataclass (nested sections as dicts), for JSON/YAML and checkpoints."""
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)


def to_yaml(config: Any) -> str:
    """The YAML text of a config dataclass: every key, loadable again as a recipe (``--config``)."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def save_config(config: Any, path: str | Path) -> None:
    atomic.write_text(path, to_yaml(config))
