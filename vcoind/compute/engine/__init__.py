"""Inference engine: static KV cache slots, prefill/decode split, CUDA-graph decode,
prefix reuse.

``Engine`` runs a stack of Qwen2 decoder layers (a whole model, or one shard's span:
embeddings on the first, norm + LM head on the last) with its own forward pass over
transformers' modules (their weights, their norms and MLPs) instead of the model's
``forward``:

* **Static cache.** K/V tensors of shape ``[slots, kv_heads, max_context + 1, head_dim]``
  per layer, allocated once. A request owns a slot; its length is the next position.
  Position ``max_context`` is scratch: rows of a decode batch that are not taking part
  write there, and no real query ever attends to it.
* **Prefill** runs one slot's chunk of tokens (or hidden states) from any start
  position (a pipeline replays a prefix this way), eagerly; on CUDA a whole model's
  prompt of up to 512 tokens from position 0 replays a graph instead, padded to 32, 64,
  .. 512 tokens (captured by ``warm_up``), since its eager pass is bound by launching
  kernels.
* **Decode** runs one token for several slots at once. On CUDA the step for slots
  ``0..B-1`` reading the first ``W`` positions is captured once per batch bucket ``B``
  (1, 2, 4, .., slots) and width bucket ``W`` (256, 512, .., the context) in a CUDA graph
  and replayed (no Python or launch overhead per layer); attention masks positions past
  each row's length, so a step reads the cache up to the longest row rounded up to a
  power of two, not the whole context. Elsewhere it runs eagerly over the rows asked
  for, reading only the positions in use (or, with ``static_shapes``, padded exactly as
  the graph is: how the graph path is tested on a CPU).
* **Fused step** (the default on CUDA, where a batch-1 step is bound by its kernel
  count): q/k/v and gate/up are one matmul each; RMSNorm is one kernel; the rotary step
  of a decode is one batched matmul by each row's rotation matrix; the residual adds
  ride in the o_proj and down_proj matmuls (``addmm_``); attention is one SDPA kernel.
  Where triton is there (CUDA builds of torch bring it) two kernels of our own
  (``vcoind.compute.kernels``) cut it further: the rotary step of q and k with both
  cache writes is one kernel, SiLU * up another, each rounding as transformers' ops do.
* **Numerics.** fp16 on CUDA, with fp32 softmax and fp32 logits; RMSNorm statistics in
  fp32 (transformers' own module). fp32 on CPU. The unfused step (``fused=False``, the
  CPU's default) runs transformers' own order of operations and calls SDPA as it does:
  with eager steps its logits are ``generate``'s to the bit, in fp32 and in fp16 (tested
  on the CPU). The fused step and the graphs' padded cache widths round differently in
  fp16, so greedy output parts from ``generate``'s where two tokens' logits all but tie.
* **Prefix reuse.** A slot's cache outlives its request: ``alloc(prompt)`` copies the
  K/V of a prompt's start from whichever slot holds it (``REUSE_MIN`` tokens at least;
  each slot's cached token ids are kept through prefill and decode).

``vcoind.compute.batcher`` serves many requests at once on an engine (continuous
batching); ``vcoind.compute.sampling`` holds the sampler and a request's stop conditions.

The package, split where the engine's concerns part (each a layer of ``Engine``):

* ``stack``: what an engine runs (``Stack``) and its errors;
* ``cache``: the slots of the static cache and prefix reuse;
* ``fused``: the fused step's weights, matmuls and triton kernels;
* ``forward``: the forward passes (embeddings, q/k/v and rotary, attention, MLP, head);
* ``graphs``: CUDA-graph capture and replay of the padded decode and prefill steps;
* ``core``: ``Engine`` itself (its set-up, ``prefill``, ``prefill_batch``, ``decode``)
  and ``generate_ids``.

Free of the daemon (no trio, no network): only torch and transformers.
"""

from vcoind.compute.engine.cache import REUSE_MIN, common_prefix
from vcoind.compute.engine.core import DEFAULT_MAX_CONTEXT, STATIC_ROPE, Engine, generate_ids
from vcoind.compute.engine.forward import SDPA_BACKENDS, sdpa_backends
from vcoind.compute.engine.graphs import MIN_WIDTH, PREFILL_GRAPH_TOKENS
from vcoind.compute.engine.stack import EngineError, Stack, UnsupportedModel
from vcoind.compute.rotary import apply_rotary

__all__ = [
    "DEFAULT_MAX_CONTEXT",
    "MIN_WIDTH",
    "PREFILL_GRAPH_TOKENS",
    "REUSE_MIN",
    "SDPA_BACKENDS",
    "STATIC_ROPE",
    "Engine",
    "EngineError",
    "Stack",
    "UnsupportedModel",
    "apply_rotary",
    "common_prefix",
    "generate_ids",
    "sdpa_backends",
]
