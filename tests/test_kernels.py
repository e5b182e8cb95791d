"""The engine's triton kernels (rotary + cache write, SiLU * up) under triton's
interpreter on CPU tensors: they round as the torch ops they replace, write only their
rows' cache entries, refuse what they cannot run, and an engine using them gives the
tokens the torch path gives (whole model and graph padding here; span engines in
``tests/test_engine.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.test_engine import PROMPTS, replayed_eagerly, served_as_alone
from vcoind.compute import kernels
from vcoind.compute.engine import Engine, EngineError, Stack, apply_rotary
from vcoind.compute.engine import fused as fused_mod
from vcoind.compute.generate import GenerationParams, encode_prompt, load_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def k() -> kernels.Kernels:
    loaded = kernels.load()
    assert loaded is not None, "triton is part of the test install (pyproject [test])"
    assert loaded.interpreted  # tests/conftest.py sets TRITON_INTERPRET
    return loaded


@pytest.fixture(scope="module")
def lm(models_dir: Path) -> Any:
    return load_model(models_dir / "tiny-qwen2", CPU, torch.float32)


def fresh(models_dir: Path, dtype: torch.dtype = torch.float32) -> Any:
    """A model of its own (a fused engine turns its q/k/v and gate/up into views)."""
    return load_model(models_dir / "tiny-qwen2", CPU, dtype, engine=False).model


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_silu_mul_rounds_as_torch(k: kernels.Kernels, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    gu = (torch.randn(2, 3, 2 * 1500, generator=g) * 6).to(dtype)  # 2 blocks per row, ragged
    want = torch.nn.functional.silu(gu[..., :1500]) * gu[..., 1500:]
    got = k.silu_mul(gu)
    assert got.shape == want.shape and got.dtype == dtype
    # numpy's exp is not the CPU's vectorised one: a unit or two in the last place apart
    # (rounded twice: silu, then the product); in fp16 the rounding hides nearly all of it
    eps = torch.finfo(dtype).eps
    assert torch.allclose(got.float(), want.float(), rtol=4 * eps, atol=0.0)
    if dtype == torch.float16:
        assert (got != want).float().mean() < 0.01
    # a non-contiguous input (a slice of a wider buffer) is read where it lies
    wide = torch.cat([gu, gu], dim=-1)[..., : 2 * 1500]
    assert torch.equal(k.silu_mul(wide), got)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_rope_store_rounds_as_transformers_and_writes_only_its_rows(
    k: kernels.Kernels, dtype: torch.dtype
) -> None:
    g = torch.Generator().manual_seed(2)
    nh, nkv, d, b, slots_n, t = 6, 2, 32, 5, 7, 20
    qkv = (torch.randn(b, (nh + 2 * nkv) * d, generator=g) * 3).to(dtype)
    angle = torch.rand(b, d // 2, generator=g, dtype=torch.float64) * 100
    cos = torch.cat([angle.cos()] * 2, dim=-1).to(dtype)
    sin = torch.cat([angle.sin()] * 2, dim=-1).to(dtype)
    kc = torch.randn(slots_n, nkv, t, d, generator=g).to(dtype)
    vc = torch.randn(slots_n, nkv, t, d, generator=g).to(dtype)
    before_k, before_v = kc.clone(), vc.clone()
    slots = torch.tensor([4, 0, 6, 2, 1])  # any order, not 0..B-1
    pos = torch.tensor([0, 19, 3, 3, 11])
    q = k.rope_store(qkv, cos, sin, pos, slots, kc, vc, nh, nkv)
    heads = qkv.view(b, nh + 2 * nkv, d)
    # transformers' apply_rotary_pos_emb, in the same dtype: bit for bit
    turned = apply_rotary(heads[:, : nh + nkv], cos[:, None], sin[:, None])
    assert q.shape == (b, nh, d) and torch.equal(q, turned[:, :nh])
    assert torch.equal(kc[slots, :, pos], turned[:, nh:])
    assert torch.equal(vc[slots, :, pos], heads[:, nh + nkv :])
    touched = torch.zeros(slots_n, t, dtype=torch.bool)
    touched[slots, pos] = True
    for cache, before in ((kc, before_k), (vc, before_v)):
        assert torch.equal(cache.permute(0, 2, 1, 3)[~touched],
                           before.permute(0, 2, 1, 3)[~touched])  # fmt: skip
    with pytest.raises(ValueError, match="whole heads"):
        k.rope_store(qkv[:, :-1], cos, sin, pos, slots, kc, vc, nh, nkv)


def test_a_wrong_kernel_is_caught_and_the_engine_falls_back(
    k: kernels.Kernels, models_dir: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    assert k.check(CPU, torch.float16) is None and k.check(CPU, torch.float32) is None
    # a verdict is kept per device and dtype: a second engine does not run the check again
    monkeypatch.setattr(kernels, "_check", lambda *a: "ran again")
    assert k.check(CPU, torch.float32) is None
    monkeypatch.undo()
    real = kernels.Kernels.rope_store

    def swapped(self: kernels.Kernels, qkv: torch.Tensor, *args: Any) -> torch.Tensor:
        # k and v written to each other's cache: a layout slip the check must see
        cos, sin, pos, slots, kc, vc, nh, nkv = args
        return real(self, qkv, cos, sin, pos, slots, vc, kc, nh, nkv)

    monkeypatch.setattr(kernels.Kernels, "rope_store", swapped)
    monkeypatch.setattr(k, "_verdicts", {})  # the patched kernels are checked afresh
    assert "k/v" in (k.check(CPU, torch.float32) or "")
    with pytest.raises(EngineError, match="triton kernels cannot run here"):
        Engine(Stack.of_model(fresh(models_dir)), slots=1, max_context=64, fused=True,
               kernels=True)  # fmt: skip
    # where they were only wanted (a CUDA engine's default), the torch ops take over
    assert fused_mod.trusted_kernels(CPU, torch.float32, required=False) is None
    assert "without triton kernels" in caplog.text
    monkeypatch.setattr(kernels.Kernels, "rope_store", real)
    monkeypatch.setattr(kernels.Kernels, "silu_mul", lambda self, gu: gu[..., ::2] * 1.0)
    monkeypatch.setattr(k, "_verdicts", {})
    assert "silu_mul" in (k.check(CPU, torch.float32) or "")
    with pytest.raises(ValueError, match="fused step"):
        Engine(Stack.of_model(fresh(models_dir)), slots=1, fused=False, kernels=True)


def test_engine_with_kernels_gives_the_torch_paths_tokens(
    k: kernels.Kernels, lm: Any, models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batched requests in any slots through the graphs' padded step (replayed eagerly),
    across a cache-width bucket: the same tokens as the plain fp32 engine."""
    eng = Engine(Stack.of_model(fresh(models_dir)), slots=3, max_context=300, fused=True,
                 static_shapes=True, kernels=True)  # fmt: skip
    assert eng.kernels is k and eng._silu_mul
    replayed_eagerly(monkeypatch, eng)
    long_ids = encode_prompt(lm, " ".join(PROMPTS))[:245]  # crosses 256 while decoding
    cases = [(encode_prompt(lm, PROMPTS[i]), GenerationParams(max_new_tokens=6 + 4 * i))
             for i in range(3)] + [(long_ids, GenerationParams(max_new_tokens=16))]  # fmt: skip
    sampled = GenerationParams(max_new_tokens=12, temperature=0.9, top_k=20, seed=3)
    cases.append((encode_prompt(lm, PROMPTS[5]), sampled))
    batcher, _ = served_as_alone(eng, lm, cases)
    # all three slots in one step; the long prompt's rows read past the first width
    assert batcher.peak_batch == 3 and eng._widths == [256, 304]
    assert {b for b, _ in eng._graphs} >= {3} and {w for _, w in eng._graphs} == {256, 304}
