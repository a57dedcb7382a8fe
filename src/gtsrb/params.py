"""params.yaml, read into typed sections.

params.yaml is the single source of truth: every key must be there, no key may be unknown,
and every value must have the declared type and range. Errors name the key
(``params.yaml: train.lr: must be > 0, got -0.1``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from gtsrb.errors import ParamsError

PARAMS_FILE = "params.yaml"


def _range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> Any:
    return field(metadata={"lo": lo, "hi": hi, "lo_open": lo_open})


@dataclass(frozen=True)
class Archive:
    name: str
    md5: str


@dataclass(frozen=True)
class Archives:
    train: Archive
    test_images: Archive
    test_gt: Archive

    def all(self) -> list[Archive]:
        return [self.train, self.test_images, self.test_gt]


@dataclass(frozen=True)
class SyntheticParams:
    tracks_per_class: int = _range(2)
    frames_per_track: int = _range(1)
    test_per_class: int = _range(1)
    seed: int = _range(0)


@dataclass(frozen=True)
class FetchParams:
    source: Literal["official", "synthetic"]
    url: str
    archives: Archives
    retries: int = _range(0)
    timeout: float = _range(0, lo_open=True)
    synthetic: SyntheticParams


@dataclass(frozen=True)
class PrepareParams:
    image_size: int = _range(8, 512)
    roi_margin: float = _range(0, 1)
    val_fraction: float = _range(0, 0.9)
    seed: int = _range(0)
    workers: int = _range(0)


@dataclass(frozen=True)
class TrainParams:
    arch: Literal["fast_sign_net", "micronnet", "stn_sign_net", "traffic_sign_net"]
    epochs: int = _range(1)
    batch_size: int = _range(1)
    optimizer: Literal["adam", "adamw", "sgd"]
    lr: float = _range(0, lo_open=True)
    schedule: Literal["onecycle", "cosine", "constant"]
    warmup: float = _range(0, 0.9)
    weight_decay: float = _range(0)
    dropout: float = _range(0, 0.9)
    label_smoothing: float = _range(0, 0.5)
    augment: float = _range(0, 1)
    framing: float = _range(0, 1)
    seed: int = _range(0)
    threads: int = _range(0)


@dataclass(frozen=True)
class EvaluateParams:
    inference: Literal["eager", "jit", "compile"]
    batch_sizes: tuple[int, ...] = _range(1, 4096)
    min_run_time: float = _range(0, lo_open=True)
    warmup: int = _range(0)
    threads: int = _range(0)


@dataclass(frozen=True)
class ExportParams:
    opset: int = _range(13, 20)
    tolerance: float = _range(0, 1)


@dataclass(frozen=True)
class CompareParams:
    tolerance: float = _range(0, 1)
    bootstrap: int = _range(100)
    seed: int = _range(0)


SECTIONS: dict[str, type] = {
    "fetch": FetchParams,
    "prepare": PrepareParams,
    "train": TrainParams,
    "export": ExportParams,
    "evaluate": EvaluateParams,
    "compare": CompareParams,
}


def _convert(value: Any, tp: Any, key: str, meta: typing.Mapping[str, Any]) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ParamsError(f"{key}: must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if origin in (tuple, list):
        (item_tp, *_rest) = typing.get_args(tp)
        if not isinstance(value, list) or not value:
            raise ParamsError(f"{key}: expected a non-empty list, got {value!r}")
        return tuple(_convert(v, item_tp, f"{key}[{i}]", meta) for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(value, inner, key, meta)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ParamsError(f"{key}: expected a number, got {value!r}")
        value = float(value)
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{key}: expected an integer, got {value!r}")
    elif tp is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{key}: expected true or false, got {value!r}")
    elif tp is str:
        if not isinstance(value, str) or not value:
            raise ParamsError(f"{key}: expected a non-empty string, got {value!r}")
    else:  # pragma: no cover - a schema bug, not a user error
        raise TypeError(f"unsupported param type {tp!r} for {key}")
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and (value <= lo if meta.get("lo_open") else value < lo):
        raise ParamsError(f"{key}: must be {'>' if meta.get('lo_open') else '>='} {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise ParamsError(f"{key}: must be <= {hi}, got {value!r}")
    return value


def _build(cls: type, data: Any, key: str) -> Any:
    if not isinstance(data, dict):
        raise ParamsError(f"{key}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ParamsError(f"{key}.{unknown[0]}: unknown key (known keys of {key}: {', '.join(fields)})")
    values = {}
    for name, f in fields.items():
        if name not in data:
            raise ParamsError(f"{key}.{name}: missing key")
        values[name] = _convert(data[name], hints[name], f"{key}.{name}", f.metadata)
    return cls(**values)


def load_raw(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found (run from the project root or pass --params)") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ParamsError(f"{path}: {unknown[0]}: unknown section (known: {', '.join(SECTIONS)})")
    return data


def load(section: str, path: str | Path = PARAMS_FILE) -> Any:
    """Read and validate one section of params.yaml (the one a stage lists in dvc.yaml)."""
    data = load_raw(path)
    if section not in data:
        raise ParamsError(f"{path}: {section}: missing section")
    try:
        return _build(SECTIONS[section], data[section], section)
    except ParamsError as exc:
        raise ParamsError(f"{path}: {exc}") from None


def as_dict(params: Any) -> dict[str, Any]:
    return dataclasses.asdict(params)
