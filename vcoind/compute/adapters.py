"""LoRA adapters on the inference side: an adapter file's bytes parsed and checked, and
merged into a model's weights (``load_model`` with an adapter).

Adapters are safetensors bytes (fp32 weights, ``vcoin-lora/1`` metadata: r, alpha,
target modules, the base model) of PEFT's LoRA ``A``/``B`` pairs. Training and writing
them is the training side's (``train/lora.py``, with peft, which imports these);
this side needs only torch and safetensors, and raises ``AdapterError``, a
``ModelError``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import torch
from safetensors.torch import load as st_load

from vcoind.compute.models import ModelError

FORMAT = "vcoin-lora/1"
PEFT_PREFIX = "base_model.model."
MAX_ADAPTER_BYTES = 64 << 20
_A, _B = ".lora_A.weight", ".lora_B.weight"


class AdapterError(ModelError):
    """Adapter bytes or weights that are corrupt or do not fit."""


def check_adapter(
    state: Mapping[str, torch.Tensor], meta: Mapping[str, str]
) -> tuple[list[str], float]:
    """Check an adapter; returns the module prefixes (sorted) and the scale alpha / r."""
    if meta.get("format") != FORMAT:
        raise AdapterError(f"not a {FORMAT} adapter (format {meta.get('format')!r})")
    try:
        r, alpha = int(meta["r"]), int(meta["alpha"])
    except (KeyError, ValueError):
        raise AdapterError("adapter metadata needs integer r and alpha") from None
    if r < 1 or alpha < 1:
        raise AdapterError(f"bad r={r} / alpha={alpha}")
    prefixes = sorted({k[: -len(_A)] for k in state if k.endswith(_A)})
    if not prefixes or set(state) != {p + s for p in prefixes for s in (_A, _B)}:
        raise AdapterError("adapter keys must be pairs of ...lora_A.weight / ...lora_B.weight")
    for p in prefixes:
        a, b = state[p + _A], state[p + _B]
        if not (a.is_floating_point() and b.is_floating_point()):
            raise AdapterError(f"{p}: weights must be floating point")
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
            raise AdapterError(f"{p}: shapes {tuple(a.shape)} / {tuple(b.shape)} do not fit r={r}")
        if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
            raise AdapterError(f"{p}: non-finite weights")
    return prefixes, alpha / r


def adapter_from_bytes(
    data: bytes, *, max_bytes: int = MAX_ADAPTER_BYTES
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Parse and check adapter bytes: fp32 weights and the metadata."""
    if len(data) > max_bytes:
        raise AdapterError(f"adapter of {len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        n = int.from_bytes(data[:8], "little")
        if len(data) < 8 or n > len(data) - 8:
            raise ValueError("truncated header")
        meta = json.loads(data[8 : 8 + n]).get("__metadata__") or {}
        state = st_load(bytes(data))
    except Exception as exc:  # any parse failure: JSON, safetensors, short data
        raise AdapterError(f"not a valid safetensors adapter: {exc}") from None
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise AdapterError("adapter metadata must map strings to strings")
    check_adapter(state, meta)
    return {k: v.to(torch.float32).contiguous() for k, v in state.items()}, dict(meta)


def merge_lora(
    model: torch.nn.Module, state: Mapping[str, torch.Tensor], meta: Mapping[str, str]
) -> int:
    """Merge an adapter into a plain HF model in place (W += alpha/r * B @ A); returns the
    number of merged modules."""
    prefixes, scale = check_adapter(state, meta)
    targets = []
    for p in prefixes:
        if not p.startswith(PEFT_PREFIX):
            raise AdapterError(f"{p}: not a PEFT key ({PEFT_PREFIX}...)")
        path = p.removeprefix(PEFT_PREFIX)
        try:
            weight = model.get_submodule(path).get_parameter("weight")
        except AttributeError:
            raise AdapterError(f"the model has no module {path!r} to merge into") from None
        a, b = state[p + _A], state[p + _B]
        if tuple(weight.shape) != (b.shape[0], a.shape[1]):
            raise AdapterError(f"{p}: does not fit the model's {path} {tuple(weight.shape)}")
        targets.append((weight, a, b))
    with torch.no_grad():
        for weight, a, b in targets:
            delta = (
                b.to(weight.device, torch.float32) @ a.to(weight.device, torch.float32)
            ) * scale
            weight.copy_((weight.float() + delta).to(weight.dtype))
    return len(targets)
