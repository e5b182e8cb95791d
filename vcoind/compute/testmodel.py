"""A small random-weight model of the real architecture, for tests and the devnet.

DeepSeek-R1-Distill-Qwen-1.5B is a Qwen2 decoder: untied input/output embeddings,
grouped-query attention (12 query heads share 2 KV heads), RMSNorm, SwiGLU MLP and
rotary positions. This writes the same architecture at toy size (hidden 64, 4
layers, 4 heads / 2 KV heads, vocab 1024) as real safetensors files, plus a
byte-level BPE tokenizer trained here on a built-in corpus, so every code path
(loading, tokenising, KV cache, sampling, sharding) is the real one.

Weights are drawn at std 0.2 (instead of the usual 0.02): at toy size that gives
peaked, input-dependent logits, so greedy output varies with the prompt instead of
repeating one token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

CORPUS = """\
A decentralised network of GPU hosts runs language model inference for anyone.
Each node gossips its capabilities, bids for tasks and runs the model it holds.
Proof of stake secures the chain: validators lock tokens and lose them if they cheat.
A Merkle tree hashes pairs of children up to a single root that commits to all leaves.
Consensus compares the answers of several replicas and weights them by reputation.
The origin announces a task, collects bids, picks the best node and waits for the result.
Layers of a transformer can be split across hosts; hidden states travel between them.
Rewards are minted to nodes that agree with the majority; outliers lose reputation.
The quick brown fox jumps over the lazy dog while the network keeps computing.
Explain how a blockchain orders transactions, and why a hash function must be collision resistant.
What is a GPU? A processor with thousands of small cores that multiply matrices in parallel.
Tokens per second measure how fast a model generates text on a given device.
Peers that vanish are dropped from the table and rejoin with their next heartbeat.
"""

# DeepSeek-R1-Distill-Qwen's special tokens and chat template (its tokenizer_config.json,
# less the tool-call branches): a system prompt first, <｜User｜> and <｜Assistant｜>
# turns, an earlier answer's reasoning dropped, and the reply opened with "<think>\n".
BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
THINK, END_THINK = "<think>", "</think>"  # plain added tokens: they survive decoding
CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}"
    "{% endif %}{% set ns = namespace(system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}"
    "{{ bos_token }}{{ ns.system_prompt }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}{%- endif %}"
    "{%- if message['role'] == 'assistant' %}{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}"
    "{% endif %}{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}{%- endif %}"
    "{%- endfor %}{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}"
)
# As the reference model ships it: sampled at 0.6 / 0.95 unless a request says otherwise.
GENERATION_CONFIG = {"do_sample": True, "temperature": 0.6, "top_p": 0.95}


@dataclass(frozen=True)
class TinyModelSpec:
    hidden_size: int = 64
    intermediate_size: int = 176
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    vocab_size: int = 1024
    max_positions: int = 4096
    init_std: float = 0.2
    seed: int = 0


def _train_tokenizer(out: Path, vocab_size: int) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 2,  # <think> and </think> are added after
        special_tokens=[EOS, BOS, USER, ASSISTANT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = CORPUS.splitlines()
    tok.train_from_iterator([*lines, *(ln.lower() for ln in lines)] * 4, trainer=trainer)
    tok.add_tokens([AddedToken(THINK, special=False), AddedToken(END_THINK, special=False)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=BOS, pad_token=EOS, unk_token=EOS
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))


def make_test_model(out: Path, spec: TinyModelSpec | None = None) -> Path:
    """Write config.json, generation_config.json, model.safetensors and the tokenizer
    (with the reference model's chat template) to ``out``."""
    import torch
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    from transformers.utils import logging as hf_logging

    spec = spec or TinyModelSpec()
    out.mkdir(parents=True, exist_ok=True)
    _train_tokenizer(out, spec.vocab_size)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(out))
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    bos_id = tokenizer.convert_tokens_to_ids(BOS)
    config = Qwen2Config(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=False,
        initializer_range=spec.init_std,
        rms_norm_eps=1e-6,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    torch.manual_seed(spec.seed)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                continue  # RMSNorm gains stay at 1
            p.normal_(0.0, spec.init_std)
    hf_logging.disable_progress_bar()
    model.save_pretrained(str(out))
    (out / "generation_config.json").write_text(
        json.dumps({**GENERATION_CONFIG, "bos_token_id": bos_id, "eos_token_id": eos_id}, indent=2)
        + "\n"
    )
    (out / "vcoin-test-model.json").write_text(
        json.dumps({"spec": spec.__dict__, "note": "random weights, for tests only"}, indent=2)
        + "\n"
    )
    return out
