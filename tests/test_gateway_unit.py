"""The gateway's parts without a daemon: request checks, reasoning split, streamed text."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio

from vcoind.compute.params import GenerationParams, model_defaults, with_defaults
from vcoind.gateway.openai import ThinkSplitter, parse_request, split_text
from vcoind.gateway.service import _covered
from vcoind.market.chat import (
    ChatError,
    check_messages,
    final_answer,
    messages_json,
    parse_messages,
)
from vcoind.market.deltas import StreamedText, TextDeltas
from vcoind.market.messages import Progress
from vcoind.presence.messages import LayerSpan


def test_a_chat_request_becomes_the_submit_parameters() -> None:
    req = parse_request({
        "model": "tiny-qwen2", "messages": [{"role": "developer", "content": "Be brief."},
                                            {"role": "user", "content": [{"type": "text",
                                                                          "text": "Hi"}]}],
        "max_completion_tokens": 9, "temperature": 0, "seed": -1, "stop": "\n",
        "stream": True, "stream_options": {"include_usage": True}, "user": "me",
        "vcoin": {"mode": "single", "priority": 3},
    }, chat=True)  # fmt: skip
    assert req.stream and req.include_usage and req.chat
    assert req.submit == {
        "model": "tiny-qwen2",
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "Hi"}],
        "parameters": {"max_new_tokens": 9, "temperature": 0, "defaults": ["top_p"],
                       "seed": (1 << 63) - 1, "stop": ["\n"]},
        "mode": "single", "priority": 3, "stream": True,
    }  # fmt: skip
    # Left out: both sampling settings come from the model; consensus does not stream.
    req = parse_request({"model": "m", "prompt": ["Hello"], "stream": True,
                         "vcoin": {"mode": "consensus"}}, chat=False)  # fmt: skip
    assert req.submit["parameters"] == {"max_new_tokens": 256,
                                        "defaults": ["temperature", "top_p"]}  # fmt: skip
    assert req.submit["input"] == "Hello" and req.submit["stream"] is False


HI = [{"role": "user", "content": "x"}]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ([], None),
        ({"messages": HI}, "model"),
        ({"model": "m"}, "messages"),
        ({"model": "m", "messages": [{"role": "tool", "content": "x"}]}, "messages"),
        ({"model": "m", "messages": HI, "n": 2}, "n"),
        ({"model": "m", "messages": HI, "temperature": 3}, "temperature"),
        ({"model": "m", "messages": HI, "max_tokens": 0}, "max_tokens"),
        ({"model": "m", "messages": HI, "logprobs": True}, "logprobs"),
        ({"model": "m", "messages": HI, "tools": [{}]}, "tools"),
        ({"model": "m", "messages": HI, "wat": 1}, "wat"),
        ({"model": "m", "messages": HI, "vcoin": {"x": 1}}, "vcoin"),
        ({"model": "m", "messages": HI, "stop": [""]}, "stop"),
    ],
)
def test_bad_requests_name_what_is_wrong(body: object, param: str | None) -> None:
    from vcoind.gateway.openai import APIError

    with pytest.raises(APIError) as info:
        parse_request(body, chat=True)
    assert info.value.status == 400 and info.value.param == param
    assert info.value.body()["error"]["type"] == "invalid_request_error"


def test_messages_round_trip_and_refuse_what_is_not_a_chat() -> None:
    msgs = [{"role": "user", "content": "héllo"}]
    assert parse_messages(messages_json(msgs)) == msgs
    for bad in ([], "hi", [{"role": "user"}], [{"role": "user", "content": 3}], [1]):
        with pytest.raises(ChatError):
            check_messages(bad)
    with pytest.raises(ChatError, match="not JSON"):
        parse_messages("{")


def test_reasoning_splits_the_same_streamed_or_whole() -> None:
    text = "Let me think.\nA GPU has many cores.\n</think>\n\nA processor."
    assert split_text(text, True) == ("Let me think.\nA GPU has many cores.\n", "A processor.")
    assert split_text(text, False) == (None, text)
    assert split_text("still thinking", True) == ("still thinking", "")
    for size in (1, 2, 3, 7, 100):
        for reasoning in (True, False):
            sp = ThinkSplitter(reasoning)
            deltas = [d for i in range(0, len(text), size) for d in sp.feed(text[i : i + size])]
            deltas += sp.flush()
            thought = "".join(d.get("reasoning_content", "") for d in deltas)
            answer = "".join(d.get("content", "") for d in deltas)
            want = split_text(text, reasoning)
            assert (thought or None, answer) == want, (size, reasoning)
    # "</" could start "</think>": kept back until it is known not to
    sp = ThinkSplitter(True)
    assert sp.feed("a </") == [{"reasoning_content": "a "}]
    assert sp.feed("b>") == [{"reasoning_content": "</b>"}]


def test_streamed_text_shows_a_retry_only_past_what_clients_have() -> None:
    st = StreamedText()
    assert st.add(1, 0, "Hello") and st.shown == "Hello"
    assert not st.add(1, 9, "gap") and not st.add(1, 0, "Hello")  # out of order, repeated
    # attempt 2 replays the same tokens: nothing new until it passes what was shown
    assert not st.add(2, 0, "Hel")
    assert st.add(2, 3, "lo, world") and st.shown == "Hello, world" and st.restarts == 0
    assert not st.add(1, 5, " late")  # the failed attempt's last words
    # attempt 3 diverges: the stream restarts from its text
    assert st.add(3, 0, "Goodbye, all of you") and st.restarts == 1
    assert st.shown == "Goodbye, all of you"
    assert st.finish("Goodbye, all of you!") and st.shown.endswith("!")


async def test_text_deltas_hold_back_stop_strings_and_partial_characters() -> None:
    sent: list[Progress] = []
    gate = trio.Event()

    async def send(p: Progress) -> None:
        sent.append(p)
        await gate.wait()  # one in flight: what grows meanwhile goes in the next

    d = TextDeltas("ab" * 16, 1, send, stop=["##", "#"])  # the longest: 2 characters
    async with trio.open_nursery() as nursery:
        nursery.start_soon(d.run)
        d.update("Hello")  # "Hel" may go: "lo" could still begin a stop string
        await trio.testing.wait_all_tasks_blocked()
        d.update("Hello wor")
        d.update("Hello w\ufffd\ufffdab")  # a character still decoding is not sent
        gate.set()
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert [(p.offset, p.text) for p in sent] == [(0, "Hel"), (3, "lo w")]


def test_model_defaults_come_from_generation_config(tmp_path: Path) -> None:
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20.0})
    )
    d = model_defaults(tmp_path)
    assert d == {"temperature": 0.6, "top_p": 0.95, "top_k": 20.0}
    p = with_defaults(GenerationParams(temperature=0.0), ("temperature", "top_k"), d)
    assert (p.temperature, p.top_p, p.top_k) == (0.6, 1.0, 20)
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    assert model_defaults(tmp_path) == {"temperature": 0.0}
    assert model_defaults(tmp_path / "none") == {}


def test_chat_template_of_the_test_model_is_the_reference_form(models_dir: Path) -> None:
    from transformers import AutoTokenizer

    from vcoind.compute.generate import encode_text

    tok = AutoTokenizer.from_pretrained(str(models_dir / "tiny-qwen2"))
    ids = encode_text(tok, [{"role": "system", "content": "Be brief."},
                            {"role": "assistant", "content": "old</think>kept"},
                            {"role": "user", "content": "What is a GPU?"}])  # fmt: skip
    assert tok.decode(ids) == ("<｜begin▁of▁sentence｜>Be brief.<｜Assistant｜>kept"
                               "<｜end▁of▁sentence｜><｜User｜>What is a GPU?"
                               "<｜Assistant｜><think>\n")  # fmt: skip
    assert encode_text(tok, "Hi") == encode_text(tok, [{"role": "user", "content": "Hi"}])


def test_spans_cover_a_model_only_when_they_join_up() -> None:
    def spans(*pairs: tuple[int, int]) -> list[LayerSpan]:
        return [LayerSpan("m", a, b) for a, b in pairs]

    assert _covered(spans((0, 1), (2, 3)))
    assert _covered(spans((2, 3), (0, 2)))
    assert not _covered(spans((1, 3)))
    assert not _covered(spans((0, 1), (3, 4)))
    assert not _covered([])


def test_consensus_compares_a_reasoning_models_final_answers() -> None:
    assert final_answer("I think A.\n</think>\n\nParis.") == "Paris."
    assert final_answer("Paris.") == "Paris."
    assert final_answer("cut off while thinking </think>  ") == "cut off while thinking </think>  "


async def test_replicas_that_reason_differently_but_answer_alike_agree() -> None:
    from vcoind.consensus.tally import Revealed
    from vcoind.market.consensus import tally_async

    def bag(text: str) -> tuple[float, ...]:  # a word-count embedding: alike words, alike
        words = ["paris", "capital", "france", "rome", "think", "maybe", "london"]
        counts = [float(text.lower().count(w)) for w in words]
        norm = sum(c * c for c in counts) ** 0.5 or 1.0
        return tuple(c / norm for c in counts)

    async def embed(texts: Sequence[str]) -> list[tuple[float, ...]]:
        return [bag(t) for t in texts]

    results = [
        Revealed("a", 1, "think think maybe rome maybe london\n</think>\nParis, capital of France",
                 (1,), "eos"),
        Revealed("b", 2, "think france capital\n</think>\nParis, capital of France", (1,), "eos"),
        Revealed("c", 3, "think\n</think>\nRome rome", (1,), "eos"),
    ]  # fmt: skip
    o = await tally_async("capital of France?", results, [1.0, 1.0, 1.0], embed)
    assert o.agreed == (True, True, False), o


def test_every_eos_id_of_the_generation_config_ends_a_reply(tmp_path: Path) -> None:
    from vcoind.compute.params import eos_ids
    from vcoind.compute.sampling import TokenStream

    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    assert eos_ids(tmp_path, 3) == {3, 7, 9} and eos_ids(tmp_path / "none", 3) == {3}

    class Tok:
        eos_token_id = 3
        vcoin_eos_ids = eos_ids(tmp_path, 3)

    stream = TokenStream([1, 2], GenerationParams(max_new_tokens=5), Tok())
    assert stream.accept(5) == 5 and stream.accept(9) is None and stream.finish == "eos"
    assert stream.out == [5]
