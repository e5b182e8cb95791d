"""Sign only your own work (issue 22, item 3: training and oracle).

A hostile peer pushes training finishes and oracle confirmations to a real daemon,
unsolicited or on terms the daemon did not compute, and gets a ``sign_refused`` error
and no signature; each refusal is counted in ``vcoin_sign_refused_total``.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import pytest
import trio

from devnet.__main__ import DevNode
from devnet.replay import RecordedAPI
from tests.adversary.hostile import Hostile, hostile, in_thread, metrics_text
from tests.conftest import Cluster
from tests.test_tasks import MODEL, serving
from tests.test_training import local_train_host
from vcoind.chain.typed import MODES, Ticket
from vcoind.compute.models import ModelStore
from vcoind.market.messages import Ack
from vcoind.market.protocol import task_stream
from vcoind.oracle.replicated import (
    OracleConfirm,
    OracleQuery,
    OracleReport,
    OracleSignature,
    query_model_id,
    result_hash,
)
from vcoind.p2p.streams import StreamProtocolError
from vcoind.train.adapters import blob_part
from vcoind.train.service import TRAIN_STREAM
from vcoind.train.spec import LoraSettings, canonical_jsonl, sha256_hex, total_steps
from vcoind.train.wire import (
    BlobGet,
    RoundDone,
    TrainAbort,
    TrainFinish,
    TrainJoin,
    TrainProgress,
    TrainRound,
    TrainSigned,
)

pytestmark = pytest.mark.slow

ORACLE_STREAM = task_stream((OracleQuery, OracleConfirm))
MAX_ASKED_PER_PEER = 32  # vcoind.oracle.replicated: pending answers kept for one origin
NO_POLLS = "quote_poll_s = 0\nnews_poll_s = 0\nmin_interval_s = 0.1\nretries = 1\n"


async def beat(h: Hostile, node: DevNode, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """The hostile's heartbeats (its Ethereum address bound to its peer id): started once
    the node lists it, then kept up so that it stays listed."""
    listed = False
    for _ in range(200):
        await h.publish("heartbeat", h.heartbeat())
        if not listed:
            peers = await in_thread(node.rpc.call, "vcoin_peers")
            if any(p["peer_id"] == h.peer_id for p in peers):
                listed = True
                task_status.started()
        await trio.sleep(0.3)
    raise AssertionError("the node never listed the hostile peer")


async def test_training_finishes_the_node_did_not_train_are_not_signed(
    cluster: Cluster, models_dir: Path
) -> None:
    node = await in_thread(lambda: cluster.start(1, extra=serving(models_dir)))
    store = ModelStore(models_dir)
    store.scan()
    model_id = store.resolve(MODEL).model_id
    settings = LoraSettings(batch_size=2, epochs=1, max_length=16)
    shard = canonical_jsonl([{"text": "one two three"}, {"text": "four five six"}])
    steps = total_steps(2, settings)
    assert steps == 1

    async def serve(peer: Any, r: Any) -> Any:  # the hostile as an origin: blobs, progress
        if isinstance(r, TrainProgress):
            return Ack()
        assert isinstance(r, BlobGet)
        return blob_part(shard if r.hash == sha256_hex(shard) else None, r)

    async with hostile() as h, trio.open_nursery() as nursery:
        h.streams.serve(TRAIN_STREAM, serve)
        target = await h.join(node.p2p_addr, "heartbeat", "tasks")
        await nursery.start(beat, h, node)

        async def ask(record: Any, reply: type[Any]) -> Any:
            return await h.request(target, TRAIN_STREAM, record, reply, timeout_s=120)

        task = secrets.token_hex(16)

        def finish(ticket_hash: bytes, adapter: str = "ab" * 32) -> TrainFinish:
            return TrainFinish(task, adapter, 1000, model_id, ticket_hash, 1)

        honest_ticket = Ticket(task, h.eth_address, model_id, MODES["lora_training"], 1,
                               False, 0, 0, 0, 0).hash()  # fmt: skip
        # 1. Unsolicited: a finish for a task the node never joined.
        with pytest.raises(StreamProtocolError, match="sign_refused: not signed: this node "
                           "trains no shard"):  # fmt: skip
            await ask(finish(honest_ticket), TrainSigned)
        # 2. A join for a task the node did not offer to train: refused.
        join = TrainJoin(task, 0, MODEL, json.dumps(settings.as_dict()), sha256_hex(shard),
                         len(shard), 2)  # fmt: skip
        with pytest.raises(StreamProtocolError, match="sign_refused: not signed: this node "
                           "did not offer to train"):  # fmt: skip
            await ask(join, Ack)
        # 3. Offered and joined, but nothing trained: no work of its own to sign.
        await h.offered_training(target, MODEL, task)
        assert isinstance(await ask(join, Ack), Ack)
        with pytest.raises(StreamProtocolError, match=r"sign_refused: .* not trained"):
            await ask(finish(honest_ticket), TrainSigned)
        # 4. Trained to the end, but the finish names a ticket the node does not compute
        # for this origin's task (another requester's, another replica count).
        done = await ask(TrainRound(task, 0, 0, 0, steps), RoundDone)
        assert isinstance(done, RoundDone)
        forged = Ticket(task, "0x" + "11" * 20, model_id, MODES["lora_training"], 1,
                        False, 0, 0, 0, 0).hash()  # fmt: skip
        for ticket_hash, replicas in ((forged, 1), (honest_ticket, 3)):
            f = TrainFinish(task, done.adapter, done.adapter_bytes, model_id, ticket_hash,
                            replicas)  # fmt: skip
            with pytest.raises(StreamProtocolError, match=r"sign_refused: .* ticket hash"):
                await ask(f, TrainSigned)
        # ... or another model than the one it trained.
        with pytest.raises(StreamProtocolError, match=r"sign_refused: .* on model"):
            await ask(TrainFinish(task, done.adapter, done.adapter_bytes, "sha256:" + "0" * 64,
                                  honest_ticket, 1), TrainSigned)  # fmt: skip
        nursery.cancel_scope.cancel()

    text = await in_thread(metrics_text, node)
    for reason, n in (("not_joined", 1), ("not_bid", 1), ("not_trained", 1), ("ticket", 2),
                      ("model", 1)):  # fmt: skip
        assert f'vcoin_sign_refused_total{{kind="training",reason="{reason}"}} {n}.0' in text
    assert (await in_thread(node.rpc.call, "vcoin_nodeInfo"))["peer_id"] == target


async def test_oracle_confirmations_only_for_the_asker_and_its_own_ticket(
    cluster: Cluster,
) -> None:
    api = RecordedAPI()
    try:
        (cluster.base / "node1").mkdir(parents=True, exist_ok=True)
        (cluster.base / "node1" / "config.toml").write_text(api.oracle_toml(NO_POLLS))
        node = await in_thread(lambda: cluster.start(1))
        async with hostile() as h, hostile() as other, trio.open_nursery() as nursery:
            target = await h.join(node.p2p_addr, "heartbeat")
            await nursery.start(beat, h, node)
            await other.connect(node.p2p_addr)

            def confirm(q: OracleQuery, values: tuple[float, ...], requester: str,
                        replicas: int = 2) -> OracleConfirm:  # fmt: skip
                model_id = query_model_id(q)
                ticket = Ticket(q.task_id, requester, model_id, MODES["oracle"], replicas,
                                False, 0, 0, 0, 0).hash()  # fmt: skip
                return OracleConfirm(q, values, result_hash(q, values), model_id,
                                     "majority", ticket, replicas)  # fmt: skip

            # 1. Unsolicited: a confirmation of a query nobody asked the node.
            q = OracleQuery(secrets.token_hex(16), "price", "QUBIC", "1h")
            with pytest.raises(StreamProtocolError, match="not signed: this node "
                               "computed no answer"):  # fmt: skip
                await h.request(target, ORACLE_STREAM, confirm(q, (1.0, 50.0, 1.0),
                                                               h.eth_address),
                                OracleSignature)  # fmt: skip

            # The hostile asks a real query: the node computes its own answer.
            rep = await h.request(target, ORACLE_STREAM, q, OracleReport, timeout_s=60)
            assert isinstance(rep, OracleReport) and not rep.error, rep
            values = rep.values
            # 2. Another peer confirms the query it did not ask.
            with pytest.raises(StreamProtocolError, match="asked by another node"):
                c = confirm(q, values, other.eth_address)
                await other.request(target, ORACLE_STREAM, c, OracleSignature)
            # 3. The asker names a ticket that is not its own unpaid one.
            with pytest.raises(StreamProtocolError, match="not signed: the ticket hash"):
                await h.request(target, ORACLE_STREAM, confirm(q, values, "0x" + "22" * 20),
                                OracleSignature)  # fmt: skip
            # 4. Other terms than the query asked.
            q2 = OracleQuery(q.task_id, "price", "BTC", "1h")
            with pytest.raises(StreamProtocolError, match="asked with other terms"):
                await h.request(target, ORACLE_STREAM, confirm(q2, values, h.eth_address),
                                OracleSignature)  # fmt: skip
            # The asker's own query, under its own ticket: signed, once.
            ok = await h.request(target, ORACLE_STREAM, confirm(q, values, h.eth_address),
                                 OracleSignature)  # fmt: skip
            assert isinstance(ok, OracleSignature) and len(ok.signature) == 65
            with pytest.raises(StreamProtocolError, match="signed already"):
                await h.request(target, ORACLE_STREAM, confirm(q, values, h.eth_address),
                                OracleSignature)  # fmt: skip
            # A flood of queries from one peer evicts only its own pending answers.
            first = OracleQuery(secrets.token_hex(16), "price", "QUBIC", "1h")
            mine = await other.request(target, ORACLE_STREAM, first, OracleReport)
            flood = [OracleQuery(secrets.token_hex(16), "price", "QUBIC", "1h")
                     for _ in range(MAX_ASKED_PER_PEER + 1)]  # fmt: skip
            for q3 in flood:
                rep3 = await h.request(target, ORACLE_STREAM, q3, OracleReport)
            with pytest.raises(StreamProtocolError, match="computed no answer"):
                c = confirm(flood[0], rep3.values, h.eth_address)
                await h.request(target, ORACLE_STREAM, c, OracleSignature)
            with pytest.raises(StreamProtocolError, match="no Ethereum address of yours"):
                c = confirm(first, mine.values, other.eth_address)  # still there: checked on
                await other.request(target, ORACLE_STREAM, c, OracleSignature)
            nursery.cancel_scope.cancel()
        text = await in_thread(metrics_text, node)
        for reason, n in (("not_asked", 3), ("other_origin", 1), ("ticket", 1),
                          ("other_query", 1), ("unknown_origin", 1)):  # fmt: skip
            assert f'vcoin_sign_refused_total{{kind="oracle",reason="{reason}"}} {n}.0' in text
    finally:
        api.close()


async def test_a_peer_that_joins_another_origins_task_first_blocks_nothing(
    models_dir: Path, tmp_path: Path
) -> None:
    """Task ids are public (announced on gossip): a hostile peer that joins a shard of an
    honest origin's task before the origin does neither blocks the origin's join nor gets
    anything of it (the host side alone; its peers plain functions)."""

    shard = canonical_jsonl([{"text": "one two three"}, {"text": "four five six"}])

    async def peer(who: str, record: Any, reply: type[Any], *_: Any) -> Any:
        assert isinstance(record, BlobGet)  # both serve the shard they name
        return blob_part(shard if record.hash == sha256_hex(shard) else None, record)

    host = local_train_host(models_dir, tmp_path / "adapters", peer)
    settings = json.dumps(LoraSettings(batch_size=1, max_length=16).as_dict())
    task = secrets.token_hex(16)
    join = TrainJoin(task, 0, MODEL, settings, sha256_hex(shard), len(shard), 2)
    host.offered(task, "origin")  # the node bid on the honest origin's task
    host.offered(task, "hostile")  # and on the same task id re-announced by a hostile
    assert isinstance(await host.handle("hostile", join), Ack)
    assert isinstance(await host.handle("origin", join), Ack)
    assert host.active == 2
    with pytest.raises(StreamProtocolError, match="not joined by this origin"):
        await host.handle("hostile", TrainRound("ef" * 16, 0, 0, 0, 1))
    await host.handle("hostile", TrainAbort(task))  # drops only the hostile's own
    assert host.active == 1
