"""The node's one connection to the chain: made on first use, checked, and watched.

web3.py is synchronous: every call runs on a worker thread, one at a time (``call``).
The embedded chain (py-evm through eth-tester) is deployed and funded on connect; an
external chain's deployment file is read and checked against what the RPC serves.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import trio
from eth_account import Account
from eth_typing import ChecksumAddress
from web3 import Web3
from web3.types import Wei

from vcoind.chain.contracts import (
    DEVNET_PARAMS,
    E18,
    ChainError,
    Contracts,
    Deployment,
    KeyHolder,
    Signer,
    deploy,
)
from vcoind.chain.typed import Domain
from vcoind.chain.views import wei
from vcoind.config import ChainConfig
from vcoind.metrics import NodeMetrics

log = logging.getLogger("vcoind.chain")
T = TypeVar("T")


class ChainLink:
    def __init__(
        self, cfg: ChainConfig, *, network: str, key: bytes | KeyHolder, metrics: NodeMetrics
    ) -> None:
        self.cfg = cfg
        self.network = network
        self.metrics = metrics
        self.embedded = not cfg.rpc
        # The node's key holder (vcoind.signer.Signer): transactions are signed through it.
        self._key: KeyHolder = Account.from_key(key) if isinstance(key, bytes) else key
        self.address: ChecksumAddress = Web3.to_checksum_address(self._key.address)
        self._limiter = trio.CapacityLimiter(1)
        self.connected = trio.Event()
        self._connecting = False
        self.deployment: Deployment | None = None
        self.contracts: Contracts | None = None
        self.signer: Signer | None = None
        self.w3: Web3 | None = None
        self.reachable: bool | None = None
        self.last_error: str | None = None
        self._chain_checked = False
        self._last_tick = time.monotonic()

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the chain thread, connecting first if need be."""
        await self.ensure_connected()
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    async def ensure_connected(self) -> None:
        """Connect on first use. The embedded chain deploys then (about a second of pure
        Python that would otherwise compete with a starting node's first tasks)."""
        if self.connected.is_set():
            return
        if self._connecting:
            await self.connected.wait()
            return
        self._connecting = True
        t0 = time.monotonic()
        try:
            await trio.to_thread.run_sync(self._connect, limiter=self._limiter)
        finally:
            self._connecting = False
        d = self.deployment
        assert d is not None
        if self.embedded:
            log.info("embedded chain (py-evm, state lives with this process): contracts "
                     "deployed in %.1f s, TaskAnchor %s", time.monotonic() - t0,
                     d.addresses["TaskAnchor"])  # fmt: skip
        else:
            log.info("chain %s (chain id %d), TaskAnchor %s", self.cfg.rpc, d.chain_id,
                     d.addresses["TaskAnchor"])  # fmt: skip
        self.connected.set()

    def _connect(self) -> None:
        if self.embedded:
            from web3 import EthereumTesterProvider

            w3 = Web3(EthereumTesterProvider())
            faucet = w3.eth.accounts[0]
            w3.eth.wait_for_transaction_receipt(w3.eth.send_transaction(
                {"from": faucet, "to": self.address, "value": Wei(1000 * E18)}))  # fmt: skip
            signer = Signer(w3, self._key)
            d = deploy(w3, signer, self.network, DEVNET_PARAMS)
            c = Contracts.at(w3, d.addresses)
            stake = wei(self.cfg.embedded_stake)
            if stake:  # as much deposited (its own tickets are covered) and as much again
                # unstaked: voting power for governance
                t = c.token.functions
                signer.send(t.mint(self.address, 3 * stake))
                signer.send(t.approve(c.staking.address, stake))
                signer.send(c.staking.functions.stake(stake))
                signer.send(t.approve(c.anchor.address, stake))
                signer.send(c.anchor.functions.deposit(stake))
                signer.send(t.delegate(self.address))
            self._chain_checked = True
        else:
            path = Path(self.cfg.contracts).expanduser()
            d = Deployment.read(path)
            if d.network != self.network:
                raise ChainError(
                    f"{path} was deployed for network {d.network!r}, this node is on "
                    f"{self.network!r}: their signatures would not verify"
                )
            provider = Web3.HTTPProvider(
                self.cfg.rpc, request_kwargs={"timeout": self.cfg.timeout_s},
                exception_retry_configuration=None,
            )  # fmt: skip
            w3 = Web3(provider)
            c = Contracts.at(w3, d.addresses)
            signer = Signer(w3, self._key)
        self.w3, self.signer, self.contracts, self.deployment = w3, signer, c, d

    def domain(self) -> Domain | None:
        """Where this node's signatures count (network, chain id, TaskAnchor), once the
        deployment is known: an external chain's from its start, the embedded chain's once
        it exists."""
        d = self.deployment
        if d is None:
            return None
        return Domain(self.network, d.chain_id, Web3.to_checksum_address(d.addresses["TaskAnchor"]))

    def check_chain(self) -> None:
        """On first contact: the RPC serves the chain the deployment file names. The
        embedded chain's clock only moves when it mines (one second or more per block): mine
        an empty block each second, so timed rules (the governor's voting delay and period,
        the unstake delay) pass at least as fast as on a real chain. Chain thread only."""
        if self.embedded:
            assert self.w3 is not None
            if time.monotonic() - self._last_tick >= 1:
                cast(Any, self.w3.provider).ethereum_tester.mine_blocks(1)
                self._last_tick = time.monotonic()
        if self._chain_checked:
            return
        assert self.w3 is not None and self.deployment is not None
        got = self.w3.eth.chain_id
        if got != self.deployment.chain_id:
            raise ChainError(f"{self.cfg.rpc} serves chain id {got}, the deployment file says "
                             f"{self.deployment.chain_id}")  # fmt: skip
        anchor = Web3.to_checksum_address(self.deployment.addresses["TaskAnchor"])
        if not self.w3.eth.get_code(anchor):
            raise ChainError(f"no TaskAnchor contract at {self.deployment.addresses['TaskAnchor']}"
                             f" on {self.cfg.rpc} (a fresh chain? deploy again)")  # fmt: skip
        self._chain_checked = True

    def mark(self, ok: bool, error: str | None = None) -> None:
        """Record whether the last contact reached the chain (logged when it changes)."""
        self.metrics.chain_reachable.set(int(ok))
        was = self.reachable
        self.reachable = ok
        if not ok:
            self.last_error = error
        if was is not None and was != ok:
            log.warning("chain %s", "reachable again" if ok else f"unreachable: {error}")
