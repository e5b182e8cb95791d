"""Token generation: prefill, then one decode step per token over a KV cache.

Synchronous and free of the daemon (no trio, no network): it runs in a worker
thread of the node, and alone on a GPU box for benchmarks. Greedy when
temperature is 0; otherwise temperature, top-k, top-p sampling with uniforms from a
``random.Random`` seeded per request, so a (model, device, seed) triple always gives
the same tokens (and devices whose probabilities agree draw the same). Progress is
reported after every token and cancellation is checked between tokens.
"""

from __future__ import annotations

import inspect
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
from transformers.utils import logging as hf_logging

from vcoind.compute.adapters import adapter_from_bytes, merge_lora
from vcoind.compute.engine import DEFAULT_MAX_CONTEXT, Engine, Stack, UnsupportedModel, generate_ids
from vcoind.compute.loading import weights_progress
from vcoind.compute.models import ModelError
from vcoind.compute.params import GenerationError, GenerationParams, eos_ids
from vcoind.compute.sampling import GenerationCancelled, GenerationResult, OnToken, decode_loop
from vcoind.progress import BOARD

__all__ = [
    "GenerationCancelled",
    "GenerationError",
    "GenerationParams",
    "GenerationResult",
    "generate",
    "load_model",
    "pick_device",
]
log = logging.getLogger("vcoind.generate")


@dataclass
class LoadedModel:
    model: Any  # a transformers causal LM
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    cache_kwarg: str = field(init=False)
    engine: Engine | None = None  # None: an architecture the engine does not run

    def __post_init__(self) -> None:
        # transformers 5.x renamed past_key_values= to cache=; accept both generations.
        params = inspect.signature(self.model.forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"


def pick_device(prefer: str = "auto") -> tuple[torch.device, torch.dtype]:
    """cuda + fp16 where a GPU is usable (the T4 has no bf16), else cpu + fp32."""
    if prefer == "cpu" or (prefer == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu"), torch.float32
    return torch.device("cuda"), torch.float16


def default_slots(device: torch.device) -> int:
    """Concurrent requests per model: a GPU batches many for nearly the cost of one."""
    return 32 if device.type == "cuda" else 4


def load_model(
    path: Path,
    device: torch.device,
    dtype: torch.dtype,
    *,
    slots: int = 0,
    max_context: int = DEFAULT_MAX_CONTEXT,
    engine: bool = True,
    compile_decode: bool = False,
    kernels: bool | None = None,
    adapter: Path | None = None,
    model_id: str = "",
) -> LoadedModel:
    """Load a model and, where the architecture allows, its engine (``slots`` concurrent
    requests, 0 = the device's default; ``max_context`` positions each). ``adapter``: a
    LoRA adapter file (a training task's result) merged into the weights; it must have been
    trained on ``model_id`` when both name one. ``kernels``: the engine's triton kernels
    (None: where they work, False: never)."""
    hf_logging.disable_progress_bar()
    # On the board: the checkpoint's tensors as they load (``vcoind.compute.loading``).
    with BOARD.step("load", f"{path.name} on {device}", unit="tensors") as step:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        tokenizer.vcoin_eos_ids = eos_ids(path, tokenizer.eos_token_id)
        with weights_progress(step):
            model: Any = AutoModelForCausalLM.from_pretrained(
                str(path), dtype=dtype, attn_implementation="sdpa"
            )
        if adapter is not None:
            state, meta = adapter_from_bytes(adapter.read_bytes())
            base = meta.get("base_model_id", "")
            if base and model_id and base != model_id:
                raise ModelError(f"adapter {adapter.stem[:12]} was trained on {base[:19]}, "
                                 f"not on {model_id[:19]}")  # fmt: skip
            merge_lora(model, state, meta)
        model.to(device)
        model.eval()
    lm = LoadedModel(model=model, tokenizer=tokenizer, device=device, dtype=dtype)
    if engine:
        try:
            lm.engine = Engine(Stack.of_model(model), slots=slots or default_slots(device),
                               max_context=max_context, device=device, dtype=dtype,
                               compile_decode=compile_decode, kernels=kernels)  # fmt: skip
        except UnsupportedModel as exc:
            log.info("%s: generating with transformers (%s)", path.name, exc)
        else:
            warm_up(lm.engine, path.name, compiled=compile_decode)
    return lm


def warm_up(engine: Any, name: str, compiled: bool = False) -> None:
    """Capture an engine's decode graphs while its model loads (CUDA only); a failure
    (out of memory, say) leaves them to be captured on first use. A compiled decode step
    compiles once per shape: those stay lazy."""
    if compiled:
        return
    try:
        engine.warm_up(label=name)
    except Exception as exc:  # the engine still works; its graphs come lazily
        log.warning("%s: capturing decode graphs failed (%s); capturing on first use",
                    name, exc)  # fmt: skip


# A prompt: plain text, or chat messages ({"role", "content"}) for the chat template.
Prompt = str | list[dict[str, str]]


def encode_prompt(lm: LoadedModel, prompt: Prompt) -> list[int]:
    """Token ids of the prompt; chat models get their chat template applied."""
    return encode_text(lm.tokenizer, prompt)


def encode_text(tok: Any, prompt: Prompt) -> list[int]:
    """``encode_prompt`` with a bare tokenizer (a pipeline's origin has no model). Text
    goes to a chat model as one user message; messages to a model without a chat
    template as "role: content" lines, then "assistant:"."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    if not isinstance(prompt, str):
        prompt = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return [int(i) for i in tok(prompt)["input_ids"]]


@torch.inference_mode()
def generate(
    lm: LoadedModel,
    prompt: Prompt,
    params: GenerationParams,
    *,
    on_token: OnToken | None = None,
    cancel: threading.Event | None = None,
) -> GenerationResult:
    """Generate up to ``max_new_tokens`` after ``prompt``; see the module docstring."""
    prompt_ids = encode_prompt(lm, prompt)
    if lm.engine is not None:
        return generate_ids(lm.engine, prompt_ids, params, lm.tokenizer,
                            on_token=on_token, cancel=cancel)  # fmt: skip
    max_pos = int(getattr(lm.model.config, "max_position_embeddings", 1 << 30))
    cache = DynamicCache(config=lm.model.config)
    kw = {lm.cache_kwarg: cache, "use_cache": True}

    def forward(new_ids: list[int]) -> torch.Tensor:
        ids = torch.tensor([new_ids], device=lm.device)
        logits: torch.Tensor = lm.model(input_ids=ids, logits_to_keep=1, **kw).logits[0, -1]
        return logits

    return decode_loop(prompt_ids, params, forward, lm.tokenizer, max_pos,
                       on_token=on_token, cancel=cancel)  # fmt: skip
