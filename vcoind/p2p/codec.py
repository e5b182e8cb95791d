"""Wire codec: typed frozen message records <-> msgpack bytes.

Wire format (language-neutral, so other implementations can speak it): a msgpack
map ``{"kind": str, "version": int, ...fields}``. Nested records are maps, lists
are arrays, bytes are msgpack bin. Decoding checks, before anything else, the
byte size against the kind's limit; then every field's type and range. A
message that fails is rejected whole (``CodecError``), never half-processed.

A record class declares ``KIND``, ``VERSION`` and ``MAX_BYTES`` and is registered
with ``@message``. Field limits live in ``field(metadata=...)``:
``max_len`` (str/bytes/tuple), ``min_len`` (tuple), ``min``/``max`` (numbers), ``pattern`` (str),
``choices`` (str).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
from typing import Any, ClassVar, TypeVar, Union, get_args, get_origin, get_type_hints

import msgpack

from vcoind.p2p.errors import CodecError

M = TypeVar("M")

# Hard ceiling on anything we decode, whatever the kind says.
ABSOLUTE_MAX_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_STR = 256
DEFAULT_MAX_ITEMS = 64

_ENVELOPE = ("kind", "version")
_REGISTRY: dict[str, type[Any]] = {}
_HINTS: dict[type[Any], dict[str, Any]] = {}


def message(cls: type[M]) -> type[M]:
    """Register a frozen dataclass as a wire message kind."""
    kind = getattr(cls, "KIND", None)
    if not isinstance(kind, str) or kind in _REGISTRY:
        raise TypeError(f"{cls.__name__}: KIND missing or already registered")
    if getattr(cls, "MAX_BYTES", 0) > ABSOLUTE_MAX_BYTES:
        raise TypeError(f"{cls.__name__}: MAX_BYTES above the absolute ceiling")
    _REGISTRY[kind] = cls
    return cls


def kinds() -> dict[str, type[Any]]:
    return dict(_REGISTRY)


def lim(**limits: Any) -> dict[str, Any]:
    """Field limits: ``field(metadata=lim(max_len=64))``."""
    return limits


def _hints(cls: type[Any]) -> dict[str, Any]:
    h = _HINTS.get(cls)
    if h is None:
        h = _HINTS[cls] = get_type_hints(cls)
    return h


# --- encode ---------------------------------------------------------------


def _to_wire(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_wire(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [_to_wire(v) for v in value]
    return value


def encode(msg: Any) -> bytes:
    """Encode a registered record. Raises CodecError if it exceeds its kind's limit."""
    cls = type(msg)
    if _REGISTRY.get(getattr(cls, "KIND", "")) is not cls:
        raise CodecError(f"{cls.__name__} is not a registered message kind")
    body = _to_wire(msg)
    body["kind"] = cls.KIND
    body["version"] = cls.VERSION
    data: bytes = msgpack.packb(body, use_bin_type=True)
    if len(data) > cls.MAX_BYTES:
        raise CodecError(f"{cls.KIND} message is {len(data)} bytes, limit {cls.MAX_BYTES}")
    return data


# --- decode ---------------------------------------------------------------


def _check(cond: bool, path: str, problem: str) -> None:
    if not cond:
        raise CodecError(f"{path}: {problem}")


def _value(tp: Any, raw: Any, path: str, meta: dict[str, Any]) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if raw is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _value(inner, raw, path, meta)
    if origin is tuple:
        _check(isinstance(raw, list), path, "must be an array")
        _check(len(raw) <= meta.get("max_len", DEFAULT_MAX_ITEMS), path, "too many items")
        _check(len(raw) >= meta.get("min_len", 0), path, "too few items")
        item_tp = get_args(tp)[0]
        item_meta = meta.get("items", {})
        return tuple(_value(item_tp, v, f"{path}[{i}]", item_meta) for i, v in enumerate(raw))
    if dataclasses.is_dataclass(tp):
        _check(isinstance(raw, dict), path, "must be a map")
        return _record(tp, raw, path)  # type: ignore[arg-type]
    if tp is bool:
        _check(isinstance(raw, bool), path, "must be a boolean")
        return raw
    if tp is int:
        _check(isinstance(raw, int) and not isinstance(raw, bool), path, "must be an integer")
        _range(raw, path, meta)
        return raw
    if tp is float:
        _check(isinstance(raw, int | float) and not isinstance(raw, bool), path, "must be a number")
        val = float(raw)
        _check(math.isfinite(val), path, "must be finite")
        _range(val, path, meta)
        return val
    if tp is str:
        _check(isinstance(raw, str), path, "must be a string")
        _check(len(raw) <= meta.get("max_len", DEFAULT_MAX_STR), path, "too long")
        if "pattern" in meta:
            _check(re.fullmatch(meta["pattern"], raw) is not None, path, "bad format")
        if "choices" in meta:
            _check(raw in meta["choices"], path, f"must be one of {list(meta['choices'])}")
        return raw
    if tp is bytes:
        _check(isinstance(raw, bytes), path, "must be bytes")
        _check(len(raw) <= meta.get("max_len", DEFAULT_MAX_STR), path, "too long")
        if "exact_len" in meta:
            _check(len(raw) == meta["exact_len"], path, f"must be {meta['exact_len']} bytes")
        return raw
    raise CodecError(f"{path}: unsupported field type {tp!r}")


def _range(val: float, path: str, meta: dict[str, Any]) -> None:
    if "min" in meta:
        _check(val >= meta["min"], path, f"must be >= {meta['min']}")
    if "max" in meta:
        _check(val <= meta["max"], path, f"must be <= {meta['max']}")


def _record(cls: type[M], raw: dict[Any, Any], path: str) -> M:
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = [k for k in raw if k not in fields and not (k in _ENVELOPE and not path)]
    _check(not unknown, path, f"unknown fields {unknown!r}"[:200])
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        sub = f"{path}.{name}" if path else name
        if name not in raw:
            _check(
                f.default is not dataclasses.MISSING
                or f.default_factory is not dataclasses.MISSING,
                sub,
                "missing",
            )
            continue
        kwargs[name] = _value(hints[name], raw[name], sub, dict(f.metadata))
    return cls(**kwargs)


def decode(data: bytes, expect: type[M] | None = None) -> M:
    """Decode and validate one message; ``expect`` restricts the kind."""
    if not isinstance(data, bytes | bytearray):
        raise CodecError("message must be bytes")
    limit = expect.MAX_BYTES if expect is not None else ABSOLUTE_MAX_BYTES  # type: ignore[attr-defined]
    if len(data) > limit:
        raise CodecError(f"message is {len(data)} bytes, limit {limit}")
    try:
        raw = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=limit,
            max_bin_len=limit,
            max_array_len=16384,
            max_map_len=256,
            max_ext_len=0,
        )
    except (ValueError, msgpack.UnpackException, TypeError) as exc:
        raise CodecError(f"not valid msgpack: {exc}") from None
    if not isinstance(raw, dict):
        raise CodecError("message must be a map")
    kind = raw.get("kind")
    cls = _REGISTRY.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise CodecError(f"unknown message kind {kind!r}"[:120])
    if expect is not None and cls is not expect:
        raise CodecError(f"expected {expect.KIND}, got {kind}")  # type: ignore[attr-defined]
    if len(data) > cls.MAX_BYTES:
        raise CodecError(f"{kind} message is {len(data)} bytes, limit {cls.MAX_BYTES}")
    version = raw.get("version")
    if type(version) is not int or version != cls.VERSION:  # True == 1.0 == 1 in Python
        raise CodecError(f"{kind}: unsupported version {version!r}"[:120])
    return _record(cls, raw, "")  # type: ignore[no-any-return]


class Message:
    """Mixin for wire records (declares the class attributes the codec reads)."""

    KIND: ClassVar[str]
    VERSION: ClassVar[int] = 1
    MAX_BYTES: ClassVar[int] = 16 * 1024
