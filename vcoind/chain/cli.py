"""Command line for the chain: ``vcoind chain deploy|fund`` and the ``vcoin`` chain commands."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

DEPLOYER_KEY_ENV = "VCOIN_DEPLOYER_KEY"


class _Client(Protocol):
    timeout: float

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any: ...


# --- vcoind chain -------------------------------------------------------------


def chain_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vcoind chain",
        description="Deploy the VCoin contracts to an Ethereum JSON-RPC chain (anvil, a "
        "testnet) and fund node addresses. The deployer key is read from the environment "
        f"variable ${DEPLOYER_KEY_ENV} (hex), never from the command line.",
    )
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    d = sub.add_parser("deploy", help="deploy the five contracts, grant roles, write the "
                       "deployment file")  # fmt: skip
    d.add_argument("--rpc", required=True, metavar="URL", help="e.g. http://127.0.0.1:8546")
    d.add_argument("--out", required=True, type=Path, metavar="FILE",
                   help="deployment file to write (the daemons' --contracts)")  # fmt: skip
    d.add_argument("--network", default="devnet", help="the daemons' network name "
                   "(part of the signed anchor payload; default devnet)")  # fmt: skip
    d.add_argument("--params", choices=("devnet", "production"), default="devnet",
                   help="devnet: 60 s unstake delay, 2 min votes; production: 7 days "
                   "(default devnet)")  # fmt: skip
    f = sub.add_parser("fund", help="send ether and mint VCOIN to addresses (deployer only)")
    f.add_argument("--rpc", required=True, metavar="URL")
    f.add_argument("--contracts", required=True, type=Path, metavar="FILE")
    for q in (d, f):
        q.add_argument("--fund", action="append", default=[], metavar="ADDRESS",
                       help="address to fund (repeatable)")  # fmt: skip
        q.add_argument("--vcoin", type=float, default=10_000.0,
                       help="VCOIN minted to each funded address (default 10000)")  # fmt: skip
        q.add_argument("--eth", type=float, default=10.0,
                       help="ether sent to each funded address for gas (default 10)")  # fmt: skip
    return p


def chain_main(args: list[str]) -> int:
    from vcoind.chain.contracts import DEVNET_PARAMS, ChainError, Deployer, Deployment, DeployParams

    ns = chain_parser().parse_args(args)
    key = os.environ.get(DEPLOYER_KEY_ENV, "")
    if not key:
        print(f"vcoind chain: error: set ${DEPLOYER_KEY_ENV} to the deployer's private key",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        deployer = Deployer(ns.rpc, bytes.fromhex(key.removeprefix("0x")))
        if ns.action == "deploy":
            params = DEVNET_PARAMS if ns.params == "devnet" else DeployParams()
            d = deployer.deploy(ns.network, params, ns.out)
            print(f"deployed to chain {d.chain_id} ({ns.rpc}), deployment file {ns.out}")
            for name, addr in d.addresses.items():
                print(f"  {name:<14} {addr}")
        else:
            d = Deployment.read(ns.contracts)
        for addr in ns.fund:
            deployer.fund(d, [addr], vcoin=ns.vcoin, eth=ns.eth)
            print(f"  funded {addr}: {ns.vcoin:g} VCOIN, {ns.eth:g} ETH")
    except (ChainError, ValueError, OSError) as exc:
        print(f"vcoind chain: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # connection refused and the like, from requests/web3
        print(f"vcoind chain: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


# --- vcoin (client) -----------------------------------------------------------


def add_client_commands(sub: Any) -> None:
    ch = sub.add_parser("chain", help="chain: info, balance, rewards, write queue")
    ch.add_argument("view", choices=("info", "balance", "rewards", "ops"))
    ch.add_argument("address", nargs="?", help="address (balance, rewards; default this node)")
    ch.add_argument("--limit", type=int, default=20, help="rows (rewards, ops)")
    for name, help_text in (
        ("stake", "stake VCOIN (eligible for tasks at the minimum stake)"),
        ("unstake", "request to unstake VCOIN (withdraw after the delay)"),
    ):
        s = sub.add_parser(name, help=help_text)
        s.add_argument("amount", type=float, help="VCOIN")
        s.add_argument("--wait", type=float, default=30.0, metavar="SECONDS",
                       help="wait this long for the transaction (default 30)")  # fmt: skip
    w = sub.add_parser("withdraw", help="withdraw unstaked VCOIN after the unstake delay")
    w.add_argument("--wait", type=float, default=30.0, metavar="SECONDS")
    g = sub.add_parser("gov", help="governance: propose, vote, status")
    gs = g.add_subparsers(dest="gov_action", metavar="ACTION", required=True)
    gp = gs.add_parser("propose", help="create a text proposal (needs 1000 VCOIN of votes)")
    gp.add_argument("description")
    gv = gs.add_parser("vote", help="vote on a proposal")
    gv.add_argument("proposal_id")
    gv.add_argument("support", choices=("for", "against", "abstain"))
    gt = gs.add_parser("status", help="a proposal's state and votes")
    gt.add_argument("proposal_id")
    for q in (gp, gv):
        q.add_argument("--wait", type=float, default=30.0, metavar="SECONDS")


CHAIN_COMMANDS = ("chain", "stake", "unstake", "withdraw", "gov")


def fmt_kv(r: dict[str, Any]) -> str:
    return "\n".join(f"{k:<22} {json.dumps(v) if isinstance(v, dict | list) else v}"
                     for k, v in r.items())  # fmt: skip


def _fmt_op(r: dict[str, Any]) -> str:
    head = f"{r['kind']} {r['status']}"
    if r.get("tx_hash"):
        head += f"  tx {r['tx_hash']}  block {r.get('block')}"
    if r.get("result", {}).get("proposal_id"):
        head += f"\nproposal {r['result']['proposal_id']}"
    if r.get("note"):
        head += f"\n{r['note']}"
    return head


def _fmt_rewards(r: dict[str, Any]) -> str:
    lines = [f"{r['address']}: {r['total']:g} VCOIN in {len(r['rewards'])} reward(s) "
             f"(source: {r['source']})"]  # fmt: skip
    for x in r["rewards"]:
        lines.append(f"  task {x['task_id'][:12]}  {x['amount']:g} VCOIN  block {x['block']}  "
                     f"tx {x['tx_hash'][:18]}…")  # fmt: skip
    return "\n".join(lines)


def _fmt_ops(r: dict[str, Any]) -> str:
    lines = [f"queue: {r['counts']}"]
    for o in r["ops"]:
        err = f"  ({o['error']})" if o.get("error") else ""
        lines.append(f"  #{o['op_id']} {o['kind']:<8} {o['status']:<8} tries {o['attempts']}"
                     f"  {o.get('tx_hash') or '-'}{err}")  # fmt: skip
    return "\n".join(lines)


def run_client_command(ns: argparse.Namespace, client: _Client) -> tuple[Any, Callable[[Any], str]]:
    if getattr(ns, "wait", None) is not None:  # the daemon waits for the receipt that long
        client.timeout = max(client.timeout, ns.wait + 10)
    if ns.command == "chain":
        if ns.view == "info":
            return client.call("vcoin_chainInfo"), fmt_kv
        if ns.view == "balance":
            return client.call("vcoin_balance", {"address": ns.address}), fmt_kv
        if ns.view == "rewards":
            params = {"address": ns.address, "limit": ns.limit}
            return client.call("vcoin_rewards", params), _fmt_rewards
        return client.call("vcoin_chainOps", {"limit": ns.limit}), _fmt_ops
    if ns.command in ("stake", "unstake"):
        method = "vcoin_stake" if ns.command == "stake" else "vcoin_unstake"
        return client.call(method, {"amount": ns.amount, "wait_s": ns.wait}), _fmt_op
    if ns.command == "withdraw":
        return client.call("vcoin_withdraw", {"wait_s": ns.wait}), _fmt_op
    if ns.gov_action == "propose":
        params = {"description": ns.description, "wait_s": ns.wait}
        return client.call("vcoin_govPropose", params), _fmt_op
    if ns.gov_action == "vote":
        params = {"proposal_id": ns.proposal_id, "support": ns.support, "wait_s": ns.wait}
        return client.call("vcoin_govVote", params), _fmt_op
    return client.call("vcoin_govStatus", {"proposal_id": ns.proposal_id}), fmt_kv
