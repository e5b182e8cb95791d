"""Chain writes and reorganisations, on anvil: a write counts as done only once it is
``chain.confirmations`` blocks deep, and one that a reorganisation drops before then is
sent again and lands exactly once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio
from eth_account import Account
from web3 import Web3

from devnet.chain import fund_nodes
from tests.conftest import Chain
from vcoind.chain.service import ChainService
from vcoind.config import ChainConfig
from vcoind.store import Store

E18 = 10**18


async def test_a_write_dropped_by_a_reorg_is_sent_again_and_lands_once(
    chain: Chain, tmp_path: Path
) -> None:
    key = bytes(Account.create().key)
    me = Account.from_key(key).address
    await trio.to_thread.run_sync(lambda: fund_nodes(chain.anvil.url, chain.deployment, [me]))
    w3 = Web3(Web3.HTTPProvider(chain.anvil.url))

    def rpc(method: str, *params: Any) -> Any:
        return w3.provider.make_request(method, list(params))  # type: ignore[arg-type]

    store = Store(tmp_path / "node.db")
    await store.open()
    cfg = ChainConfig(rpc=chain.anvil.url, contracts=str(chain.path), confirmations=3,
                      retry_max_s=0.5)  # fmt: skip
    svc = ChainService(cfg, store, network="testnet", key=key)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(svc.run)

            async def miner() -> None:  # a chain that keeps making blocks
                while True:
                    await trio.sleep(0.3)
                    await trio.to_thread.run_sync(rpc, "anvil_mine", 1)

            nursery.start_soon(miner)
            # Room for two deposits: one landing twice would take both.
            approve = await svc.enqueue("approve", {"amount": str(20 * E18),
                                                    "spender": "TaskAnchor"})  # fmt: skip
            op = await svc.wait(approve, 60)
            assert op is not None and op.status == "done", op
            head = await trio.to_thread.run_sync(lambda: w3.eth.block_number)
            assert head - int(op.block or 0) + 1 >= 3  # done only 3 blocks deep

            deposit = await svc.enqueue("deposit", {"amount": str(10 * E18)})
            with trio.fail_after(30):  # mined, not yet confirmed: a reorg drops its block
                while (op := await svc.queue.ops.get(deposit)) is None or not op.tx_hash or (
                    await trio.to_thread.run_sync(svc.link.signer.receipt, op.tx_hash)  # type: ignore[union-attr]
                ) is None:  # fmt: skip
                    await trio.sleep(0.05)
            first = await trio.to_thread.run_sync(w3.eth.get_transaction_receipt, op.tx_hash)
            head = await trio.to_thread.run_sync(lambda: w3.eth.block_number)
            assert op.status == "pending"  # not counted yet
            await trio.to_thread.run_sync(rpc, "anvil_reorg", head - first["blockNumber"] + 1, [])
            assert await trio.to_thread.run_sync(svc.link.signer.receipt, op.tx_hash) is None  # type: ignore[union-attr]

            op = await svc.wait(deposit, 60)
            assert op is not None and op.status == "done", op
            final = await trio.to_thread.run_sync(w3.eth.get_transaction_receipt, op.tx_hash)
            assert final["blockHash"] != first["blockHash"] and op.block == final["blockNumber"]
            held = await trio.to_thread.run_sync(
                lambda: chain.c.anchor.functions.depositOf(me).call())  # fmt: skip
            assert held[0] == 10 * E18, held  # once: not lost, not twice
            reorged = svc.link.metrics.chain_writes.labels(kind="deposit", outcome="reorged")
            assert reorged._value.get() == 1
            nursery.cancel_scope.cancel()
    finally:
        await store.close()
