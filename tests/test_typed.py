"""Settlement-v2 typed data (``vcoind.chain.typed``) against an independent EIP-712
implementation (eth_account's ``encode_typed_data``), domain separation, and what
``recover`` refuses. The contract's own hash views are compared in test_contracts."""

from __future__ import annotations

import random
from typing import Any

import pytest
from eth_account import Account
from eth_account.messages import _hash_eip191_message, encode_typed_data

from vcoind.chain import typed
from vcoind.chain.typed import Domain, Outcome, Ticket

KEY = bytes([1]) * 32
ADDRESS = Account.from_key(KEY).address
TASK = "0123456789abcdef0123456789abcdef"
MODEL = "sha256:" + "ab" * 32
DOMAIN = Domain("devnet", 31337, "0x" + "5f" * 20)
TICKET = Ticket(TASK, ADDRESS, MODEL, 1, 3, True, 10**14, 64, 1_900_000_000, 7, b"\x09" * 32)


def _fields(name: str) -> list[dict[str, str]]:
    inner = typed.TYPES[name][len(name) + 1 : -1]
    return [{"name": f.split(" ")[1], "type": f.split(" ")[0]} for f in inner.split(",")]


def _eth_account_digest(d: Domain, name: str, values: tuple[Any, ...]) -> bytes:
    fields = _fields(name)
    msg = {
        "types": {
            "EIP712Domain": [{"name": "name", "type": "string"},
                             {"name": "version", "type": "string"},
                             {"name": "chainId", "type": "uint256"},
                             {"name": "verifyingContract", "type": "address"}],
            name: fields,
        },
        "primaryType": name,
        "domain": {"name": f"VCoin:{d.network}", "version": "2", "chainId": d.chain_id,
                   "verifyingContract": d.contract},
        "message": {f["name"]: v for f, v in zip(fields, values, strict=True)},
    }  # fmt: skip
    return bytes(_hash_eip191_message(encode_typed_data(full_message=msg)))


def test_every_struct_hashes_as_eip712_says() -> None:
    th = TICKET.hash()
    rh = bytes(range(32))
    cases = {
        "Ticket": TICKET.values(),
        "Award": (th, ADDRESS, 5 * 10**13),
        "Bid": (bytes(16) + bytes.fromhex(TASK), ADDRESS, 5 * 10**13),
        "Result": (bytes(16) + bytes.fromhex(TASK), rh, b"\x09" * 32),
        "Outcome": (bytes(16) + bytes.fromhex(TASK), th, rh, 3, 12, b"\x09" * 32),
    }
    ours = {
        "Ticket": th,
        "Award": typed.award_hash(th, ADDRESS, 5 * 10**13),
        "Bid": typed.bid_hash(TASK, ADDRESS, 5 * 10**13),
        "Result": typed.result_struct_hash(TASK, rh, b"\x09" * 32),
        "Outcome": Outcome(rh, 3, 12, b"\x09" * 32).hash(TICKET),
    }
    for name, values in cases.items():
        assert DOMAIN.digest(ours[name]) == _eth_account_digest(DOMAIN, name, values), name


def test_a_signature_counts_only_in_its_domain() -> None:
    digest = DOMAIN.digest(TICKET.hash())
    sig = typed.sign(KEY, digest)
    assert typed.recover(digest, sig) == ADDRESS
    assert typed.signed_by(digest, sig, ADDRESS.lower())
    others = [
        Domain("devnet", 1, DOMAIN.contract),  # another chain
        Domain("devnet", DOMAIN.chain_id, "0x" + "60" * 20),  # another deployment
        Domain("testnet", DOMAIN.chain_id, DOMAIN.contract),  # another network
        Domain.offline("devnet"),
    ]
    for d in others:
        assert typed.recover(d.digest(TICKET.hash()), sig) != ADDRESS


def test_tampered_signature_does_not_recover_the_signer() -> None:
    digest = DOMAIN.digest(TICKET.hash())
    sig = typed.sign(KEY, digest)
    for pos in (0, 17, 31, 40, 63, 64):
        bad = bytearray(sig)
        bad[pos] ^= 0x01
        assert typed.recover(digest, bytes(bad)) != ADDRESS


def test_recover_never_raises_on_garbage() -> None:
    digest = bytes(32)
    n = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
    good = typed.sign(KEY, digest)
    r, s = good[:32], int.from_bytes(good[32:64], "big")
    high_s = r + (n - s).to_bytes(32, "big") + bytes([55 - good[64]])  # malleable twin
    unusable: list[Any] = [
        b"",
        b"\x00" * 65,
        b"\xff" * 65,
        good[:64],
        good + b"\x00",
        good[:64] + b"\x00",
        good[:64] + b"\x01",
        high_s,
        "zz",
        None,
        12,
    ]
    for sig in unusable:
        assert typed.recover(digest, sig) is None
    rng = random.Random(5)
    for _ in range(50):
        got = typed.recover(digest, rng.randbytes(65))
        assert got is None or got.startswith("0x")
    assert typed.recover(b"short", good) is None
    assert typed.recover(digest, good) == ADDRESS


def test_ticket_round_trip_and_checks() -> None:
    assert Ticket.from_json(TICKET.to_json()) == TICKET
    assert TICKET.max_cost() == 10**14 * 64 * 3
    for change in ({"replicas": 0}, {"mode": 256}, {"max_tokens": 1 << 32},
                   {"requester": "0x12"}, {"task_id": "XY"}, {"model_id": "m"}):  # fmt: skip
        with pytest.raises(ValueError):
            Ticket.from_json({**TICKET.to_json(), **change})
    o = Outcome(bytes(32), 2, 5)
    assert Outcome.from_json(o.to_json()) == o
    assert o.hash_for(TASK, TICKET.hash()) == o.hash(TICKET)
    assert o.hash_for(TASK, bytes(32)) != o.hash(TICKET)
