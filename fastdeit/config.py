"""Typed, strict configuration: YAML + `key.sub=value` overrides -> a tree of dataclasses.

Each component owns the dataclass of its section (``DataConfig`` lives in ``fastdeit.data``,
``OptimConfig`` in ``fastdeit.optim``, ...); this module only composes them, loads YAML into them
strictly (unknown keys and wrong types are errors that name the key and the file), applies
command-line overrides, and writes the resolved tree next to the run.

We deliberately do not use OmegaConf/Hydra: the whole job is ~150 lines over ``dataclasses`` and
PyYAML, and keeping it here avoids a dependency whose merge semantics (interpolation, implicit
key creation) are looser than we want.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import yaml

from fastdeit.checkpoint import CheckpointConfig
from fastdeit.data.config import DataConfig
from fastdeit.data.augment.mixing import MixingConfig
from fastdeit.distributed import DistributedConfig
from fastdeit.threads import RuntimeConfig
from fastdeit.ema import EmaConfig
from fastdeit.engine import EngineConfig
from fastdeit.errors import ConfigError  # noqa: F401  (also imported from here)
from fastdeit.losses import DistillConfig, LossConfig
from fastdeit.metrics import LoggingConfig
from fastdeit.models import ModelConfig, TeacherConfig
from fastdeit.optim import OptimConfig, ScheduleConfig
from fastdeit.trainer import TrainerConfig


@dataclass
class Config:
    """The whole run. Each attribute is one component's section and goes to that component only."""

    data: DataConfig = field(default_factory=DataConfig)
    mixing: MixingConfig = field(default_factory=MixingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


# --------------------------------------------------------------------------- type checking


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted (lists -> tuples, int -> float)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Union or (types.UnionType is not None and isinstance(tp, types.UnionType)):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} does not fit {tp}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for section {tp.__name__}, got {value!r}")
        return _build(tp, value, where)
    if origin in (tuple, Tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)} ({value!r})")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported config type {tp}")  # a bug in a section's annotation


def _build(cls: type, values: Dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        hint = _close_match(unknown[0], names)
        raise ConfigError(
            f"unknown key '{prefix}{unknown[0]}'{hint}; {cls.__name__} accepts: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in values.items()}
    return cls(**kwargs)


def _close_match(key: str, names: Sequence[str]) -> str:
    import difflib

    match = difflib.get_close_matches(key, list(names), n=1)
    return f" (did you mean '{match[0]}'?)" if match else ""


# --------------------------------------------------------------------------- loading


def parse_override(text: str) -> Tuple[List[str], Any]:
    """``'optim.lr=1e-3'`` -> ``(['optim', 'lr'], 0.001)``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override {text!r} has an empty key")
    return path, (_yaml(raw) if raw.strip() else "")


def _set_path(tree: Dict[str, Any], path: List[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(path)}: '{part}' is a value, not a section")
        node = child
    node[path[-1]] = value


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``5e-4`` as a float (YAML 1.2); PyYAML's 1.1 rules make it a string."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def load_yaml(path: Union[str, Path]) -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    with open(path) as f:
        try:
            tree = yaml.load(f, Loader=_Loader) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return tree


def from_dict(tree: Dict[str, Any], source: str = "<dict>") -> Config:
    try:
        return _build(Config, tree, "")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def load_config(path: Optional[Union[str, Path]] = None, overrides: Sequence[str] = ()) -> Config:
    """Load ``path`` (or the built-in defaults), apply ``key=value`` overrides, validate strictly."""
    tree = load_yaml(path) if path else {}
    source = str(path) if path else "<defaults>"
    for text in overrides:
        key_path, value = parse_override(text)
        _set_path(tree, key_path, value)
    if overrides:
        source += " with overrides " + " ".join(overrides)
    return from_dict(tree, source)


def to_dict(cfg: Any) -> Dict[str, Any]:
    """The resolved config as plain YAML-safe data (tuples become lists)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def save_config(cfg: Config, path: Union[str, Path]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    tmp.replace(path)
