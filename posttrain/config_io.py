"""Configs from YAML: one file plus dotted ``key=value`` overrides into a config dataclass, checked
key by key, and the hash of what a config computes.

An unknown key is an error that suggests the closest valid one; a value of the wrong type is an
error that names the key. Override values are parsed as YAML, so ``packing=true``,
``max_steps=200``, ``learning_rate=2e-5`` and ``datasets.0.count=100`` all do what they say.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from posttrain.config import TrainConfig
from posttrain.errors import UserError


# Keys that change how a run is watched, not what it computes: a resumed run may change them.
NON_SEMANTIC_KEYS = {"save_steps", "save_total_limit", "logging_steps", "report_to", "overwrite_output_dir",
                     "per_device_eval_batch_size", "eval_steps", "decontaminate_against",
                     "vllm_servers"}  # where rollouts are drawn, not what they are: a resumed run may use others
# How a run is laid out over processes and memory, not what it computes (the same up to float rounding):
# a resumed run may change them as long as the global batch, which the hash counts, stays the same.
LAYOUT_KEYS = {"per_device_train_batch_size", "gradient_accumulation_steps", "parallel", "fsdp_reshard_after_forward",
               "fsdp_cpu_offload", "deepspeed_zero_stage", "gradient_checkpointing"}


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                base: dict | None = None):
    """Build ``cls`` from ``base``, then the YAML file at ``path``, then ``key=value`` overrides."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        data.update(read_yaml(path))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r}: expected key=value")
        set_dotted(data, key.strip(), parse_value(raw))
    cfg = build(cls, data, "config")
    cfg.validate()
    return cfg


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f":{mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}{at}: not valid YAML ({getattr(e, 'problem', e)})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of config keys at the top level")
    return data


def parse_value(raw: str):
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def set_dotted(data: dict, key: str, value) -> None:
    """``a.b.0.c`` walks dicts by name and lists by index, creating dicts where missing."""
    parts = key.split(".")
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise UserError(f"override {key}: '{part}' is not an index of a list of {len(node)}")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        else:
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
                if not isinstance(node, (dict, list)):
                    raise UserError(f"override {key}: '{part}' is not a mapping or a list")


def build(cls: type, data: Any, where: str):
    """Make a ``cls`` dataclass from a mapping, checking keys and types."""
    if dataclasses.is_dataclass(data):
        return data
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise UserError(f"{where}: unknown key '{key}'{hint}")
        kwargs[key] = coerce(value, hints[key], f"{where}.{key}")
    return cls(**kwargs)


def coerce(value: Any, tp: Any, where: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0], where)
    if origin is Literal:
        if value not in args:
            raise UserError(f"{where}: expected one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            if isinstance(value, str) and (args[0] is str or typing.get_origin(args[0]) is Literal):
                value = [v.strip() for v in str(value).split(",") if v.strip()]
            else:
                raise UserError(f"{where}: expected a list, got {type(value).__name__}")
        return [coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {type(value).__name__}")
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool):
            raise UserError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)  # PyYAML reads 2e-5 (no dot) as a string
        except (TypeError, ValueError):
            raise UserError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise UserError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def world_size() -> int:
    """The number of processes of this job (set by torchrun and accelerate launch), 1 without a launcher."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def semantic(cls: type, data: dict) -> dict:
    """The keys of a config (class ``cls``, values ``data``) that change what a run computes: without
    ``NON_SEMANTIC_KEYS``; a training config's ``LAYOUT_KEYS`` replaced by its global batch
    (per-device batch x accumulation x processes)."""
    d = {k: v for k, v in data.items() if k not in NON_SEMANTIC_KEYS}
    if issubclass(cls, TrainConfig):
        default = {f.name: f.default for f in dataclasses.fields(cls)}
        batch = math.prod(d.get(k, default[k]) for k in ("per_device_train_batch_size", "gradient_accumulation_steps"))
        d = {k: v for k, v in d.items() if k not in LAYOUT_KEYS}
        d["global_batch_size"] = batch * world_size()
    return d


def config_hash(cfg) -> str:
    """A hash of everything that changes what a run computes (not how it is logged, saved or laid out)."""
    d = semantic(type(cfg), to_dict(cfg))
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]
