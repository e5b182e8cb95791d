"""The OpenAI-compatible API of real daemons, driven by the official ``openai`` client."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trio

from devnet.__main__ import DevNode, stop_all
from tests.conftest import Cluster, wait_until
from tests.test_tasks import knows_model, loaded, serving
from vcoind.cli import ClientError, RPCClient
from vcoind.datadir import DataDir

MODEL = "tiny-qwen2"
ASK = [{"role": "system", "content": "Be brief."},
       {"role": "user", "content": "What is a GPU?"}]  # fmt: skip


def said(chunks: list[Any]) -> str:
    """A streamed chat's text: its reasoning, then its content."""
    deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
    return "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) + "".join(
        d.content or "" for d in deltas
    )


def client(node: DevNode, key: str | None = None) -> openai.OpenAI:
    base = node.info["rpc_url"].rstrip("/") + "/v1"
    return openai.OpenAI(base_url=base, api_key=key or DataDir(node.datadir).read_cookie(),
                         max_retries=0, timeout=120)  # fmt: skip


@pytest.fixture(scope="module")
def two(
    tmp_path_factory: pytest.TempPathFactory, models_dir: Path
) -> Iterator[tuple[DevNode, DevNode]]:
    """Two serving daemons shared by the module's tests (they only submit tasks)."""
    c = Cluster(tmp_path_factory.mktemp("gateway"))
    try:
        n1 = c.start(1, extra=[*serving(models_dir), "--no-chain"])
        n2 = c.start(2, bootstrap=n1, extra=[*serving(models_dir), "--no-chain"])
        wait_until(lambda: knows_model(n1, 1), 20, "node 1 sees node 2's model")
        wait_until(lambda: loaded(n1) and loaded(n2), 60, "models loaded")
        yield n1, n2
    finally:
        stop_all(c.nodes)


def test_openai_client_lists_models_chats_and_streams_the_same_answer(
    two: tuple[DevNode, DevNode],
) -> None:
    n1, _ = two
    c = client(n1)
    models = c.models.list().data
    assert [m.id for m in models] == [MODEL]
    info = models[0].model_extra["vcoin"]
    assert info["nodes"] == 2 and info["reasoning"] and info["model_id"].startswith("sha256:")
    assert c.models.retrieve(MODEL).id == MODEL

    whole = c.chat.completions.create(model=MODEL, messages=ASK, max_tokens=24,
                                      temperature=0)  # fmt: skip
    msg = whole.choices[0].message
    vcoin = whole.model_extra["vcoin"]
    assert vcoin["status"] == "completed" and len(vcoin["workers"]) == 1
    assert whole.usage is not None and whole.usage.completion_tokens >= 1
    assert whole.usage.prompt_tokens > 10  # the chat template's tokens and the messages'
    # The test model opens <think> like DeepSeek-R1: without "</think>" it is all reasoning.
    thought = msg.model_extra.get("reasoning_content")
    assert (thought or "") + msg.content
    # It is a task like any other.
    task = n1.rpc.call("vcoin_getTask", {"task_id": vcoin["task_id"]})
    assert task["parameters"]["chat"] and task["status"] == "completed"

    chunks = list(c.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True}))  # fmt: skip
    deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
    assert deltas[0].role == "assistant"
    streamed_thought = "".join(d.model_extra.get("reasoning_content") or "" for d in deltas)
    streamed = "".join(d.content or "" for d in deltas)
    assert (streamed_thought, streamed) == (thought or "", msg.content)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == (
        whole.usage.completion_tokens)  # fmt: skip
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] in ("stop", "length")

    text = c.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=8,
                                temperature=0)  # fmt: skip
    assert text.choices[0].text and text.model_extra["vcoin"]["mode"] == "single"


def test_tokens_arrive_while_the_worker_is_still_generating(two: tuple[DevNode, DevNode]) -> None:
    n1, _ = two
    c = client(n1)
    first: float | None = None
    task_id = ""
    pieces = 0
    stream = c.completions.create(model=MODEL, prompt="Explain how a blockchain orders",
                                  max_tokens=400, temperature=0, stream=True)  # fmt: skip
    for ch in stream:
        if ch.choices and ch.choices[0].text:
            pieces += 1
            if first is None:
                first = time.time()
        if ch.choices and ch.choices[0].finish_reason:
            task_id = ch.model_extra["vcoin"]["task_id"]
    task = n1.rpc.call("vcoin_getTask", {"task_id": task_id})
    assert task["timings"]["tokens"] >= 100, "the model stopped too early to tell"
    assert first is not None and pieces >= 3
    # The first text came well before the task was done, not all at the end.
    assert first < task["completed_at"] - 0.2 * task["timings"]["decode_s"], (
        first, task["completed_at"], task["timings"])  # fmt: skip


def test_errors_come_as_the_clients_typed_errors(two: tuple[DevNode, DevNode]) -> None:
    n1, _ = two
    c = client(n1)
    with pytest.raises(openai.NotFoundError, match="not served"):
        c.chat.completions.create(model="nope", messages=ASK)
    with pytest.raises(openai.BadRequestError, match="n: only 1"):
        c.chat.completions.create(model=MODEL, messages=ASK, n=2)
    with pytest.raises(openai.BadRequestError, match="messages"):
        c.chat.completions.create(model=MODEL, messages=[{"role": "robot", "content": "x"}])
    with pytest.raises(openai.AuthenticationError):
        client(n1, key="not-the-cookie").models.list()
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("nope")


def test_consensus_answer_carries_its_verdict(two: tuple[DevNode, DevNode]) -> None:
    n1, _ = two
    c = client(n1)
    out = c.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=8, temperature=0,
        extra_body={"vcoin": {"mode": "consensus", "replicas": 2}},
    )  # fmt: skip
    vcoin = out.model_extra["vcoin"]
    assert vcoin["mode"] == "consensus" and len(vcoin["workers"]) == 2, vcoin
    verdict = vcoin["consensus"]
    assert verdict["decision"] and 0 <= verdict["confidence"] <= 1, verdict
    assert sorted(verdict["agreed"]) == sorted(vcoin["workers"])  # greedy: the same answer
    # streamed, a consensus task sends its agreed answer once decided
    chunks = list(c.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=8, temperature=0, stream=True,
        extra_body={"vcoin": {"mode": "consensus", "replicas": 2}}))  # fmt: skip
    text = "".join((ch.choices[0].delta.content or "")
                   + (ch.choices[0].delta.model_extra.get("reasoning_content") or "")
                   for ch in chunks if ch.choices)  # fmt: skip
    whole = out.choices[0].message
    assert text == (whole.model_extra.get("reasoning_content") or "") + (whole.content or "")


def test_vcoin_submit_stream_prints_the_answer_as_it_grows(two: tuple[DevNode, DevNode]) -> None:
    n1, _ = two
    cmd = [
        str(Path(sys.executable).parent / "vcoin"),
        "--datadir",
        str(n1.datadir),
        "submit",
        "--model",
        MODEL,
        "--max-new-tokens",
        "300",
        "--stream",
        "Explain how a blockchain",
    ]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        first = proc.stdout.read(1)  # the first character, while the worker still generates
        running = n1.rpc.call("vcoin_listTasks", {"limit": 1})["tasks"][0]
        out = proc.stdout.read()  # (communicate() would skip what the pipe's buffer holds)
        err = proc.stderr.read()
        proc.wait(120)
    assert proc.returncode == 0, err
    task = n1.rpc.call("vcoin_getTask", {"task_id": running["task_id"]})
    assert first + out == task["result"] + "\n" and task["parameters"]["stream"]
    assert task["timings"]["tokens"] < 100 or running["status"] != "completed"
    assert f"completed: task {task['task_id']}" in err


async def test_task_channel_carries_the_text_deltas(two: tuple[DevNode, DevNode]) -> None:
    from trio_websocket import open_websocket_url

    n1, _ = two
    headers = [(k.encode(), v.encode()) for k, v in n1.rpc.auth.items()]
    url = n1.info["rpc_url"].rstrip("/").replace("http://", "ws://") + "/ws"
    async with open_websocket_url(url, extra_headers=headers) as ws:

        async def call(i: int, method: str, params: dict[str, Any]) -> Any:
            await ws.send_message(json.dumps({"jsonrpc": "2.0", "id": i, "method": method,
                                              "params": params}))  # fmt: skip
            while "id" not in (reply := json.loads(await ws.get_message())):
                pass  # a notification that came first
            return reply["result"]

        req = {"model": MODEL, "input": "Explain how a blockchain", "stream": True,
               "parameters": {"max_new_tokens": 300}}  # fmt: skip
        task_id = (await call(1, "vcoin_submitTask", req))["task_id"]
        await call(2, "vcoin_subscribe", {"channel": f"task:{task_id}"})
        deltas: list[dict[str, Any]] = []
        with trio.fail_after(120):
            while True:
                note = json.loads(await ws.get_message())["params"]["result"]
                if "status" not in note:
                    deltas.append(note)
                elif note["finished"]:
                    break
    task = await trio.to_thread.run_sync(lambda: n1.rpc.call("vcoin_getTask",
                                                             {"task_id": task_id}))  # fmt: skip
    assert len(deltas) >= 2 and all(d["restarts"] == 0 for d in deltas), deltas[:3]
    for a, b in itertools.pairwise(deltas):
        assert b["offset"] == a["offset"] + len(a["text"])  # contiguous, none lost
    for d in deltas:
        assert task["result"][d["offset"] : d["offset"] + len(d["text"])] == d["text"]


def test_the_seeds_rest_paths_answer_their_curl_lines(two: tuple[DevNode, DevNode]) -> None:
    n1, _ = two
    url = n1.info["rpc_url"].rstrip("/")
    auth = f"Authorization: Bearer {DataDir(n1.datadir).read_cookie()}"

    def curl(*args: str) -> Any:
        out = subprocess.run(["curl", "-s", "-H", auth, *args], capture_output=True,
                             text=True, timeout=120, check=True)  # fmt: skip
        return json.loads(out.stdout)

    # The seed's own lines: -d with no Content-Type (curl sends a form type).
    body = '{"model_id": "tiny-qwen2", "input": "介紹人工智慧", "parameters": {"max_length": 8}}'
    task_id = curl("-X", "POST", f"{url}/api/v1/inference", "-d", body)["task_id"]
    wait_until(lambda: curl(f"{url}/api/v1/task/{task_id}/status")["status"] == "completed",
               60, "the seed's task")  # fmt: skip
    status = curl(f"{url}/api/v1/task/{task_id}/status")
    assert set(status) == {"task_id", "status", "progress", "result", "node_id"}
    assert status["progress"] == 8 and status["result"] and status["node_id"]
    single = curl("-X", "POST", f"{url}/api/ai/single_query", "-d",
                  '{"model_id": "tiny-qwen2", "input": "What is a GPU?"}')  # fmt: skip
    assert single["status"] == "completed" and single["mode"] == "single"
    both = curl("-X", "POST", f"{url}/api/ai/consensus_query", "-d",
                '{"model": "tiny-qwen2", "query": "What is a GPU?", '
                '"parameters": {"max_length": 4}}')  # fmt: skip
    assert both["mode"] == "consensus" and both["consensus"]["decision"], both
    assert curl("-X", "POST", f"{url}/api/ai/query", "-d", '{"input": "x"}') == {
        "error": "model_id: the model's name or id"}  # fmt: skip
    assert "no task" in curl(f"{url}/api/v1/task/{'0' * 32}/status")["error"]


def test_api_keys_open_the_gateway_with_limits_and_revocation(
    two: tuple[DevNode, DevNode],
) -> None:
    n1, _ = two
    vcoind = str(Path(sys.executable).parent / "vcoind")

    def apikey(*args: str) -> str:
        out = subprocess.run([vcoind, "apikey", *args, "--datadir", str(n1.datadir)],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
        assert out.returncode == 0, out.stderr
        return out.stdout

    key = json.loads(apikey("create", "app", "--rpm", "3", "--json"))
    assert key["key"].startswith("vk-") and key["rpm"] == 3
    c = client(n1, key=key["key"])
    out = c.completions.create(model=MODEL, prompt="Hello", max_tokens=5, temperature=0)
    assert out.usage is not None and out.usage.completion_tokens == 5
    assert c.models.list().data[0].id == MODEL
    c.completions.create(model=MODEL, prompt="Hello", max_tokens=2, temperature=0)
    with pytest.raises(openai.RateLimitError) as limited:  # a fourth request in the minute
        c.models.list()
    assert int(limited.value.response.headers["retry-after"]) >= 1
    # The key opens the gateway only: JSON-RPC (stake, tasks, keys) still needs the cookie.
    with pytest.raises(ClientError, match=r"401|unauthorized"):
        RPCClient(n1.info["rpc_url"], key["key"], 5).call("vcoin_nodeInfo")
    keys = {k["id"]: k for k in n1.rpc.call("vcoin_apiKeys")["keys"]}
    assert keys[key["id"]]["requests"] == 3 and keys[key["id"]]["tokens"] == 7
    assert "key" not in keys[key["id"]] and "hash" not in keys[key["id"]]
    metrics = httpx.get(n1.info["rpc_url"].rstrip("/") + "/metrics", headers=n1.rpc.auth).text
    assert f'vcoin_gateway_tokens_total{{key="{key["id"]}"}} 7.0' in metrics
    assert f'vcoin_gateway_requests_total{{key="{key["id"]}",outcome="limited"}} 1.0' in metrics
    assert "app" in apikey("list") and "revoked" in apikey("revoke", "app")
    with pytest.raises(openai.AuthenticationError, match="unknown or revoked"):
        client(n1, key=key["key"]).models.list()
