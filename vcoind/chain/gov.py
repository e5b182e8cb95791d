"""Governance proposals that change parameters: ``--set KEY=VALUE`` to contract calls and back.

A proposal's actions are calls the Timelock makes once the vote has passed: ``{"target":
"TaskAnchor", "signature": "setFees(uint16,uint16,uint16)", "args": [...]}`` (integers as
decimal strings: wei do not fit a JSON double). Pure, except for what reads or binds the
contracts given to it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from eth_abi.abi import decode as abi_decode
from eth_abi.abi import encode as abi_encode
from eth_utils.crypto import keccak
from web3 import Web3

from vcoind.chain.contracts import NAMES, Contracts, abi_type, artifact
from vcoind.chain.views import vcoin, wei

FEES = ("fee_bps", "burn_bps", "mint_bps")  # set together by one setFees call
TARGETS = ("TaskAnchor", "Staking", "VCoinGovernor")
MAX_SECONDS = 10 * 365 * 86400
MAX_VCOIN = 1e9


@dataclass(frozen=True)
class Setting:
    """A parameter governance may set: its contract, setter, and unit (VCOIN, s or bps)."""

    contract: str
    setter: str
    unit: str

    def to_chain(self, key: str, value: Any) -> int:
        """``value`` (VCOIN, seconds or basis points) as the setter's integer; ValueError
        with the key named when it is not one or out of range."""
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ValueError(f"{key}: expected a number, got {value!r}")
        try:
            x = float(value)
        except ValueError:
            raise ValueError(f"{key}: expected a number, got {value!r}") from None
        if self.unit == "VCOIN":
            if not 0 <= x <= MAX_VCOIN:
                raise ValueError(f"{key}: {value} VCOIN is out of range (0 to {MAX_VCOIN:g})")
            return wei(x)
        limit = 10_000 if self.unit == "bps" else MAX_SECONDS
        if x != int(x) or not 0 <= x <= limit:
            raise ValueError(f"{key}: expected a whole number of {self.unit} from 0 to {limit}, "
                             f"got {value!r}")  # fmt: skip
        return int(x)

    def shown(self, raw: int) -> str:
        return f"{vcoin(raw):g} VCOIN" if self.unit == "VCOIN" else f"{raw} {self.unit}"


SETTINGS: dict[str, Setting] = {
    "min_stake": Setting("Staking", "setMinStake(uint256)", "VCOIN"),
    "unstake_delay": Setting("Staking", "setUnstakeDelay(uint64)", "s"),
    "slash_amount": Setting("TaskAnchor", "setSlashAmount(uint256)", "VCOIN"),
    "fee_bps": Setting("TaskAnchor", "setFees(uint16,uint16,uint16)", "bps"),
    "burn_bps": Setting("TaskAnchor", "setFees(uint16,uint16,uint16)", "bps"),
    "mint_bps": Setting("TaskAnchor", "setFees(uint16,uint16,uint16)", "bps"),
    "epoch_mint_cap": Setting("TaskAnchor", "setEpochMintCap(uint256)", "VCOIN"),
    "epoch_length": Setting("TaskAnchor", "setEpochLength(uint64)", "s"),
    "withdraw_delay": Setting("TaskAnchor", "setWithdrawDelay(uint64)", "s"),
}


def parse_sets(items: Sequence[str]) -> dict[str, str]:
    """``["fee_bps=300", ...]`` (the command line's ``--set``) as a dict; ValueError for an
    item that is not KEY=VALUE or repeats a key. Keys and values are checked by
    :func:`actions_for`."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or not value.strip():
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        if key in out:
            raise ValueError(f"--set {key} given twice")
        out[key] = value.strip()
    return out


def actions_for(
    settings: Mapping[str, Any], current_fees: Mapping[str, int]
) -> list[dict[str, Any]]:
    """The proposal actions that set ``settings`` (KEY -> value in VCOIN / s / bps); the
    fee shares not given keep their ``current_fees`` value in the one setFees call.
    ValueError for an unknown key, a bad value, or fees TaskAnchor would refuse."""
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise ValueError(f"unknown setting {', '.join(unknown)} (one of {', '.join(SETTINGS)})")
    values = {k: SETTINGS[k].to_chain(k, v) for k, v in settings.items()}
    actions: list[dict[str, Any]] = []
    for key, value in values.items():
        if key not in FEES:
            s = SETTINGS[key]
            actions.append({"target": s.contract, "signature": s.setter, "args": [str(value)]})
    if any(k in values for k in FEES):
        fee, burn, mint = (values.get(k, current_fees[k]) for k in FEES)
        if not 0 <= mint < burn or fee + burn > 10_000:
            raise ValueError(f"fees refused by TaskAnchor: fee_bps {fee} + burn_bps {burn} must be "
                             f"at most 10000 and mint_bps {mint} below burn_bps")  # fmt: skip
        actions.append({"target": "TaskAnchor", "signature": SETTINGS["fee_bps"].setter,
                        "args": [str(fee), str(burn), str(mint)]})  # fmt: skip
    return actions


def describe(settings: Mapping[str, Any]) -> str:
    """A proposal's default description: what it sets."""
    return "set " + ", ".join(f"{k}={v}" for k, v in settings.items())


def _types(signature: str) -> list[str]:
    inner = signature[signature.index("(") + 1 : -1]
    return [t for t in inner.split(",") if t]


def _arg(t: str, v: Any) -> Any:
    if t.startswith(("uint", "int")):
        return int(v)
    if t == "address":
        return Web3.to_checksum_address(str(v))
    if t == "bool":
        return bool(v)
    if t.startswith("bytes"):
        return bytes.fromhex(str(v).removeprefix("0x"))
    return v


def _signatures(name: str) -> list[str]:
    """The function signatures of contract ``name``'s ABI (``setFees(uint16,uint16,uint16)``)."""
    return [
        f"{i['name']}({','.join(abi_type(x) for x in i['inputs'])})"
        for i in artifact(name)["abi"]
        if i.get("type") == "function"
    ]


def encode(c: Contracts, action: Mapping[str, Any]) -> tuple[str, bytes]:
    """(target address, calldata) of one action; ValueError when the target has no such
    function or the arguments do not fit (the proposal would pass the vote and then fail to
    execute)."""
    name, signature = str(action["target"]), str(action["signature"])
    if name not in TARGETS:
        raise ValueError(f"proposal target {name!r} is not one of {', '.join(TARGETS)}")
    target = c.by_name(name)
    if signature not in _signatures(name):
        raise ValueError(f"{name} has no function {signature}")
    types = _types(signature)
    args = list(action.get("args", []))
    if len(args) != len(types):
        raise ValueError(f"{signature}: {len(args)} argument(s) for {len(types)}")
    values = [_arg(t, v) for t, v in zip(types, args, strict=True)]
    return target.address, keccak(text=signature)[:4] + abi_encode(types, values)


def decode(c: Contracts, target: str, calldata: bytes) -> dict[str, Any]:
    """One action of a proposal, as ``{"target", "call", "sets"}``: ``call`` the function
    with its arguments, ``sets`` what it changes in ``--set`` terms (empty if not a known
    setter). A text proposal's no-op call to the Timelock comes out as ``call: "(none)"``."""
    names = {k.address.lower(): n for n, k in zip(NAMES, c.all(), strict=True)}
    name = names.get(target.lower(), target)
    if not calldata:
        return {"target": name, "call": "(none)", "sets": {}}
    known = _signatures(name) if target.lower() in names else []
    fn = next((sig for sig in known if keccak(text=sig)[:4] == calldata[:4]), None)
    if fn is None:
        return {"target": name, "call": "0x" + calldata.hex(), "sets": {}}
    try:
        values = list(abi_decode(_types(fn), calldata[4:]))
    except Exception:  # a calldata that does not decode: shown raw
        return {"target": name, "call": "0x" + calldata.hex(), "sets": {}}
    shown = ", ".join("0x" + v.hex() if isinstance(v, bytes) else str(v) for v in values)
    keys = [k for k, s in SETTINGS.items() if s.contract == name and s.setter == fn]
    sets = {k: SETTINGS[k].shown(int(values[FEES.index(k)] if k in FEES else values[0]))
            for k in keys}  # fmt: skip
    return {"target": name, "call": f"{fn.partition('(')[0]}({shown})", "sets": sets}


@dataclass(frozen=True)
class Proposal:
    """What the Governor's queue and execute need again, from the ProposalCreated log."""

    proposal_id: int
    proposer: str
    targets: list[str]
    values: list[int]
    calldatas: list[bytes]
    description: str
    block: int

    def call_args(self) -> tuple[list[str], list[int], list[bytes], bytes]:
        """(targets, values, calldatas, descriptionHash): queue's and execute's arguments."""
        return self.targets, self.values, self.calldatas, keccak(text=self.description)


def proposals(c: Contracts, from_block: int) -> list[Proposal]:
    """Every proposal created since ``from_block``, oldest first (its event has no indexed
    field to filter on)."""
    out = []
    for lg in c.governor.events.ProposalCreated().get_logs(from_block=from_block):
        a = lg["args"]
        out.append(Proposal(int(a["proposalId"]), str(a["proposer"]), list(a["targets"]),
                            [int(v) for v in a["values"]], [bytes(x) for x in a["calldatas"]],
                            str(a["description"]), int(lg["blockNumber"])))  # fmt: skip
    return out


def find_proposal(c: Contracts, from_block: int, proposal_id: int) -> Proposal | None:
    return next((p for p in proposals(c, from_block) if p.proposal_id == proposal_id), None)
