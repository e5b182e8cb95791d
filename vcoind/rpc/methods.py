"""RPC method descriptions, parameter validation and the OpenRPC document."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from vcoind.rpc.errors import INVALID_PARAMS, RPCError

OPENRPC_VERSION = "1.2.6"
DISCOVER = "rpc.discover"

Handler = Callable[[dict[str, Any]], Awaitable[Any]]

_SCHEMA_KEYS = frozenset(
    {
        "type",
        "minimum",
        "maximum",
        "enum",
        "items",
        "minLength",
        "maxLength",
        "pattern",
        "maxItems",
        "description",
        "title",
        "default",
    }
)
_TYPE_CHECKS: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    # bool is an int subclass in Python but not a number in JSON.
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
    "null": lambda v: v is None,
}


@dataclass(frozen=True)
class Param:
    name: str
    schema: dict[str, Any]
    required: bool = False
    description: str = ""
    default: Any = None


@dataclass(frozen=True)
class RPCMethod:
    name: str
    summary: str
    params: tuple[Param, ...]
    result: dict[str, Any]
    handler: Handler


def check_schema(schema: dict[str, Any], where: str) -> None:
    """Reject schema keywords the validator would silently ignore."""
    unknown = sorted(set(schema) - _SCHEMA_KEYS)
    if unknown:
        raise ValueError(f"{where}: unsupported schema keywords {unknown}")
    types = schema.get("type")
    for name in [types] if isinstance(types, str) else (types or []):
        if name not in _TYPE_CHECKS:
            raise ValueError(f"{where}: unknown type {name!r}")
    if "items" in schema:
        check_schema(schema["items"], f"{where}.items")
    if "pattern" in schema:
        re.compile(schema["pattern"])


def check_value(name: str, value: Any, schema: dict[str, Any]) -> None:
    """Validate one value against the supported JSON-schema subset."""

    def fail(requirement: str) -> RPCError:
        return RPCError(INVALID_PARAMS, f"param '{name}' must {requirement}")

    types = schema.get("type")
    if types is not None:
        allowed = [types] if isinstance(types, str) else list(types)
        if not any(_TYPE_CHECKS[t](value) for t in allowed):
            raise fail("be " + " or ".join(allowed))
    # True == 1 in Python; keep booleans and numbers apart as JSON does.
    if "enum" in schema and not any(
        e == value and isinstance(e, bool) == isinstance(value, bool) for e in schema["enum"]
    ):
        raise fail(f"be one of {json.dumps(schema['enum'])}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            raise fail(f"be >= {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            raise fail(f"be <= {schema['maximum']}")
    if isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            raise fail(f"be at least {schema['minLength']} characters")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            raise fail(f"be at most {schema['maxLength']} characters")
        if "pattern" in schema and re.fullmatch(schema["pattern"], value) is None:
            raise fail(f"match {schema['pattern']}")
    if isinstance(value, list):
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            raise fail(f"have at most {schema['maxItems']} items")
        if "items" in schema:
            for index, item in enumerate(value):
                check_value(f"{name}[{index}]", item, schema["items"])


def bind_params(method: RPCMethod, params: list[Any] | dict[str, Any] | None) -> dict[str, Any]:
    """Map positional or named params onto the method's Param list, validated."""
    if params is None:
        given: dict[str, Any] = {}
    elif isinstance(params, list):
        if len(params) > len(method.params):
            raise RPCError(
                INVALID_PARAMS,
                f"too many params: {method.name} takes at most {len(method.params)}, "
                f"got {len(params)}",
            )
        given = {p.name: v for p, v in zip(method.params, params, strict=False)}
    else:
        known = {p.name for p in method.params}
        unknown = sorted(set(params) - known)
        if unknown:
            raise RPCError(INVALID_PARAMS, f"unknown param '{unknown[0][:64]}'")
        given = params
    bound: dict[str, Any] = {}
    for param in method.params:
        # An explicit null for an optional param means "use the default".
        if param.name not in given or (given[param.name] is None and not param.required):
            if param.required:
                raise RPCError(INVALID_PARAMS, f"missing required param '{param.name}'")
            bound[param.name] = copy.deepcopy(param.default)
            continue
        check_value(param.name, given[param.name], param.schema)
        bound[param.name] = given[param.name]
    return bound


class MethodRegistry:
    """The RPC methods a node exposes; services add theirs at start-up."""

    def __init__(self) -> None:
        self._methods: dict[str, RPCMethod] = {}

    def add(self, method: RPCMethod) -> None:
        if method.name in self._methods:
            raise ValueError(f"RPC method {method.name!r} is already registered")
        names = [p.name for p in method.params]
        if len(set(names)) != len(names):
            raise ValueError(f"RPC method {method.name!r} has duplicate param names")
        for param in method.params:
            check_schema(param.schema, f"{method.name}.{param.name}")
        self._methods[method.name] = method

    def get(self, name: str) -> RPCMethod | None:
        return self._methods.get(name)

    def names(self) -> list[str]:
        return sorted(self._methods)

    def openrpc(self, *, title: str, version: str) -> dict[str, Any]:
        methods = [_describe(self._methods[name]) for name in self.names()]
        if DISCOVER not in self._methods:
            methods.append(_describe(discover_method(self, title=title, version=version)))
        return {
            "openrpc": OPENRPC_VERSION,
            "info": {"title": title, "version": version},
            "methods": methods,
        }


def discover_method(registry: MethodRegistry, *, title: str, version: str) -> RPCMethod:
    async def discover(_: dict[str, Any]) -> dict[str, Any]:
        return registry.openrpc(title=title, version=version)

    return RPCMethod(
        name=DISCOVER,
        summary="Returns the OpenRPC document describing this node's API.",
        params=(),
        result={"type": "object"},
        handler=discover,
    )


def _describe(method: RPCMethod) -> dict[str, Any]:
    params = []
    for param in method.params:
        schema = dict(param.schema)
        if param.default is not None:
            schema.setdefault("default", param.default)
        descriptor: dict[str, Any] = {
            "name": param.name,
            "required": param.required,
            "schema": schema,
        }
        if param.description:
            descriptor["description"] = param.description
        params.append(descriptor)
    return {
        "name": method.name,
        "summary": method.summary,
        "paramStructure": "either",
        "params": params,
        "result": {"name": "result", "schema": method.result},
    }
