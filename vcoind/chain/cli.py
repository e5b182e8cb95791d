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
                   help="devnet: 60 s unstake and withdrawal delays, 1 h mint epochs, 2 min "
                   "votes, and the deployer keeps its admin roles and MINTER_ROLE as a faucet; "
                   "production: 7 day unstake delay, 1 day withdrawal delay and epochs, 7 day "
                   "votes, and the deployer hands every role to the Timelock and TaskAnchor "
                   "and keeps none (the --fund VCOIN is minted before that; fees go to the "
                   "Timelock). Default devnet")  # fmt: skip
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
    from vcoind.chain.views import wei

    ns = chain_parser().parse_args(args)
    key = os.environ.get(DEPLOYER_KEY_ENV, "")
    if not key:
        print(f"vcoind chain: error: set ${DEPLOYER_KEY_ENV} to the deployer's private key",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        deployer = Deployer(ns.rpc, bytes.fromhex(key.removeprefix("0x")))
        vcoin = ns.vcoin
        if ns.action == "deploy":
            params = DEVNET_PARAMS if ns.params == "devnet" else DeployParams()
            # Without a faucet, tokens can only be minted before the handover.
            genesis = {} if params.faucet else {a: wei(vcoin) for a in ns.fund}
            d = deployer.deploy(ns.network, params, ns.out, genesis)
            print(f"deployed to chain {d.chain_id} ({ns.rpc}), deployment file {ns.out}")
            for name, addr in d.addresses.items():
                print(f"  {name:<14} {addr}")
            if d.faucet:
                print(f"  faucet         {d.faucet} (the deployer: admin roles, MINTER_ROLE)")
            else:
                print("  governance     every role handed to the Timelock / TaskAnchor; the "
                      "deployer holds none")  # fmt: skip
                vcoin = 0.0  # minted above
        else:
            d = Deployment.read(ns.contracts)
        for addr in ns.fund:
            deployer.fund(d, [addr], vcoin=vcoin, eth=ns.eth)
            print(f"  funded {addr}: {ns.vcoin:g} VCOIN, {ns.eth:g} ETH")
    except (ChainError, ValueError, OSError) as exc:
        print(f"vcoind chain: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # connection refused and the like, from requests/web3
        print(f"vcoind chain: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


# --- vcoin (client) -----------------------------------------------------------


SETTING_KEYS = (
    "min_stake",
    "unstake_delay",
    "slash_amount",
    "fee_bps",
    "burn_bps",
    "mint_bps",
    "epoch_mint_cap",
    "epoch_length",
    "withdraw_delay",
)  # vcoind.chain.gov.SETTINGS


class _SetAction(argparse.Action):
    """``--set KEY=VALUE`` (repeatable) into a dict; a repeated or unknown key is an error."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:  # fmt: skip
        got: dict[str, str] = dict(getattr(namespace, self.dest) or {})
        key, sep, value = str(values).partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not value:
            parser.error(f"--set {values!r}: expected KEY=VALUE")
        if key not in SETTING_KEYS:
            parser.error(f"--set {key}: unknown setting (one of {', '.join(SETTING_KEYS)})")
        if key in got:
            parser.error(f"--set {key} given twice")
        got[key] = value
        setattr(namespace, self.dest, got)


def add_client_commands(sub: Any) -> None:
    ch = sub.add_parser("chain", help="chain: info, balance, rewards, write queue")
    ch.add_argument("view", choices=("info", "balance", "rewards", "ops"))
    ch.add_argument("address", nargs="?", help="address (balance, rewards; default this node)")
    ch.add_argument("--limit", type=int, default=20, help="rows (rewards, ops)")
    for name, help_text in (
        ("stake", "stake VCOIN (eligible for tasks at the minimum stake)"),
        ("unstake", "request to unstake VCOIN (withdraw after the delay)"),
        ("deposit", "deposit VCOIN in TaskAnchor: what this node's tasks are paid from"),
    ):
        s = sub.add_parser(name, help=help_text)
        s.add_argument("amount", type=float, help="VCOIN")
        s.add_argument("--wait", type=float, default=30.0, metavar="SECONDS",
                       help="wait this long for the transaction (default 30)")  # fmt: skip
    w = sub.add_parser("withdraw", help="withdraw unstaked VCOIN after the unstake delay")
    w.add_argument("--wait", type=float, default=30.0, metavar="SECONDS")
    wd = sub.add_parser(
        "withdraw-deposit",
        help="take a deposit back: AMOUNT requests it, no amount withdraws what is released",
        description="Two steps. `vcoin withdraw-deposit AMOUNT` requests the withdrawal of "
        "AMOUNT VCOIN: it moves from available to pending and the withdrawal delay starts "
        "again for everything pending (pending VCOIN still pays work accepted before it "
        "leaves). Once the delay has passed (`vcoin chain info`: deposit release_time), "
        "`vcoin withdraw-deposit` with no amount pays everything pending back.",
    )  # fmt: skip
    wd.add_argument("amount", type=float, nargs="?", help="VCOIN to request (omit to withdraw)")
    wd.add_argument("--wait", type=float, default=30.0, metavar="SECONDS")
    g = sub.add_parser("gov", help="governance: propose, vote, queue, execute, status")
    gs = g.add_subparsers(dest="gov_action", metavar="ACTION", required=True)
    gp = gs.add_parser(
        "propose",
        help="create a proposal: text, or --set parameters (needs 1000 VCOIN of votes)",
        description="A text proposal (DESCRIPTION) or parameter changes the Timelock makes "
        "once the proposal passes, is queued and executed: --set KEY=VALUE, repeatable, KEY "
        "one of min_stake (VCOIN), unstake_delay (s) on Staking; slash_amount (VCOIN), "
        "fee_bps, burn_bps, mint_bps (basis points, set together: the ones not given keep "
        "their current value), epoch_mint_cap (VCOIN), epoch_length (s), withdraw_delay (s) "
        "on TaskAnchor.",
    )  # fmt: skip
    gp.add_argument("description", nargs="?", help="the proposal's text")
    gp.add_argument("--description", dest="description_opt", metavar="TEXT",
                    help="the same (default with --set: 'set KEY=VALUE, ...')")  # fmt: skip
    gp.add_argument("--set", dest="settings", action=_SetAction, metavar="KEY=VALUE",
                    help="a parameter to change (repeatable)")  # fmt: skip
    gv = gs.add_parser("vote", help="vote on a proposal")
    gv.add_argument("proposal_id")
    gv.add_argument("support", choices=("for", "against", "abstain"))
    gq = gs.add_parser("queue", help="queue a succeeded proposal in the Timelock")
    gq.add_argument("proposal_id")
    ge = gs.add_parser("execute", help="execute a queued proposal after the Timelock delay")
    ge.add_argument("proposal_id")
    gt = gs.add_parser("status", help="a proposal's state, actions and votes")
    gt.add_argument("proposal_id")
    for q in (gp, gv, gq, ge):
        q.add_argument("--wait", type=float, default=30.0, metavar="SECONDS")


CHAIN_COMMANDS = ("chain", "stake", "unstake", "withdraw", "deposit", "withdraw-deposit", "gov")


def fmt_kv(r: dict[str, Any]) -> str:
    return "\n".join(f"{k:<22} {json.dumps(v) if isinstance(v, dict | list) else v}"
                     for k, v in r.items())  # fmt: skip


def _fmt_op(r: dict[str, Any]) -> str:
    head = f"{r['kind']} {r['status']}"
    if r.get("tx_hash"):
        head += f"  tx {r['tx_hash']}  block {r.get('block')}"
    result = r.get("result") or {}
    if result.get("proposal_id"):
        head += f"\nproposal {result['proposal_id']}"
    if result.get("note"):
        head += f"\n{result['note']}"
    if r.get("note"):
        head += f"\n{r['note']}"
    return head


def _fmt_info(r: dict[str, Any]) -> str:
    r = dict(r)
    d = r.pop("deposit", None)
    if isinstance(d, dict):
        release = f", released at {d['release_time']}" if d.get("pending") else ""
        r["deposit"] = f"{d['available']:g} VCOIN available, {d['pending']:g} pending{release}"
    return fmt_kv(r)


def _fmt_proposal(r: dict[str, Any]) -> str:
    r = dict(r)
    actions = r.pop("actions", [])
    out = fmt_kv(r)
    if not actions:
        return out + f"\n{'actions':<22} none (a text proposal)"
    lines = [f"{'actions':<22} {len(actions)}"]
    for a in actions:
        sets = ", ".join(f"{k} = {v}" for k, v in a.get("sets", {}).items())
        lines.append(f"  {a['target']}.{a['call']}" + (f"   ({sets})" if sets else ""))
    return out + "\n" + "\n".join(lines)


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
            return client.call("vcoin_chainInfo"), _fmt_info
        if ns.view == "balance":
            return client.call("vcoin_balance", {"address": ns.address}), _fmt_info
        if ns.view == "rewards":
            params = {"address": ns.address, "limit": ns.limit}
            return client.call("vcoin_rewards", params), _fmt_rewards
        return client.call("vcoin_chainOps", {"limit": ns.limit}), _fmt_ops
    if ns.command in ("stake", "unstake", "deposit"):
        method = {"stake": "vcoin_stake", "unstake": "vcoin_unstake",
                  "deposit": "vcoin_deposit"}[ns.command]  # fmt: skip
        return client.call(method, {"amount": ns.amount, "wait_s": ns.wait}), _fmt_op
    if ns.command == "withdraw":
        return client.call("vcoin_withdraw", {"wait_s": ns.wait}), _fmt_op
    if ns.command == "withdraw-deposit":
        params = {"amount": ns.amount, "wait_s": ns.wait}
        return client.call("vcoin_withdrawDeposit", params), _fmt_op
    if ns.gov_action == "propose":
        params = {"description": ns.description_opt or ns.description, "set": ns.settings,
                  "wait_s": ns.wait}  # fmt: skip
        return client.call("vcoin_govPropose", params), _fmt_op
    if ns.gov_action == "vote":
        params = {"proposal_id": ns.proposal_id, "support": ns.support, "wait_s": ns.wait}
        return client.call("vcoin_govVote", params), _fmt_op
    if ns.gov_action in ("queue", "execute"):
        method = "vcoin_govQueue" if ns.gov_action == "queue" else "vcoin_govExecute"
        return client.call(method, {"proposal_id": ns.proposal_id, "wait_s": ns.wait}), _fmt_op
    return client.call("vcoin_govStatus", {"proposal_id": ns.proposal_id}), _fmt_proposal
