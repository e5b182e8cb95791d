"""The consensus outcome that replicas sign and the chain contract verifies.

Byte layout (stable; version ``v1``):

- ``task_id_bytes32(id)``: task ids are 32 lowercase hex characters (16 bytes); left-padded
  with 16 zero bytes, i.e. ``bytes32(uint256(uint128(id)))`` in Solidity.
- ``model_id_bytes32("sha256:<64 lowercase hex>")``: the 32 bytes of the hex part.
- ``result_hash(text) = sha256(utf8(text))``.
- ``commitment(task_id, result_hash, salt) = sha256(utf8(task_id) || result_hash || salt)``
  with the task id as its 32-character ASCII hex text and a 32-byte random salt.
- ``decision``: ``DECISION_CODES`` as a uint8: none 0, tie 1, majority 2, supermajority 3.

Digest and signature, in Solidity (OpenZeppelin 5)::

    bytes32 domain = keccak256(bytes(string.concat("vcoin-outcome:v1:", network)));
    bytes32 digest = keccak256(abi.encode(domain, taskId, resultHash, modelId, uint8(decision)));
    address signer = ECDSA.recover(MessageHashUtils.toEthSignedMessageHash(digest), sig);

``abi.encode`` pads every field to 32 bytes, so the preimage is 160 bytes: domain, task id,
result hash, model id, then the decision as a big-endian 32-byte integer. The signature is
EIP-191 ``personal_sign`` over the 32-byte digest, i.e. an ECDSA signature of
``keccak256("\\x19Ethereum Signed Message:\\n32" || digest)``, 65 bytes ``r || s || v`` with
v in {27, 28}. ``recover_outcome_signer`` accepts exactly what ``ECDSA.recover`` accepts
(65 bytes, v 27 or 28, s in the lower half of the curve order), so a signature the node
counts is one the contract counts.
"""

from __future__ import annotations

import hashlib
import re

from eth_abi.abi import encode as abi_encode
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_keys.exceptions import BadSignature
from eth_utils.crypto import keccak
from eth_utils.exceptions import ValidationError as EthKeysValidationError

DECISION_CODES: dict[str, int] = {"none": 0, "tie": 1, "majority": 2, "supermajority": 3}
OUTCOME_DOMAIN_PREFIX = "vcoin-outcome:v1:"
SALT_BYTES = 32
# A task id: 32 lowercase hex characters (the wire schemas and the RPC use this pattern).
TASK_ID_RE = r"[0-9a-f]{32}"

_TASK_ID = re.compile(TASK_ID_RE)
_MODEL_ID = re.compile(r"sha256:([0-9a-f]{64})")
_SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
_SECP256K1_HALF_N = _SECP256K1_N // 2


def _check_bytes32(name: str, value: bytes) -> None:
    if not isinstance(value, bytes | bytearray) or len(value) != 32:
        raise ValueError(f"{name} must be 32 bytes")


def result_hash(text: str) -> bytes:
    """sha256 of the UTF-8 encoded result text (32 bytes)."""
    return hashlib.sha256(text.encode("utf-8")).digest()


def commitment(task_id: str, result_hash: bytes, salt: bytes) -> bytes:
    """sha256(utf8(task_id) || result_hash || salt); both hashes 32 bytes (ValueError if not)."""
    _check_bytes32("result_hash", result_hash)
    _check_bytes32("salt", salt)
    return hashlib.sha256(task_id.encode("utf-8") + bytes(result_hash) + bytes(salt)).digest()


def task_id_bytes32(task_id: str) -> bytes:
    """16 zero bytes || bytes.fromhex(task_id); the id must be 32 lowercase hex chars."""
    if not _TASK_ID.fullmatch(task_id):
        raise ValueError(f"task id must be 32 lowercase hex characters: {task_id!r}")
    return bytes(16) + bytes.fromhex(task_id)


def model_id_bytes32(model_id: str) -> bytes:
    """The 32 bytes of ``"sha256:<64 lowercase hex>"`` (ValueError for any other form)."""
    m = _MODEL_ID.fullmatch(model_id)
    if m is None:
        raise ValueError(f"model id must be 'sha256:' + 64 lowercase hex: {model_id!r}")
    return bytes.fromhex(m.group(1))


def outcome_domain(network: str) -> bytes:
    """keccak256(utf8("vcoin-outcome:v1:" + network))."""
    return keccak(text=OUTCOME_DOMAIN_PREFIX + network)


def outcome_digest(
    network: str, task_id: str, result_hash: bytes, model_id: str, decision: str
) -> bytes:
    """keccak256(abi.encode(bytes32 domain, bytes32 taskId, bytes32 resultHash,
    bytes32 modelId, uint8 decision)); see the module docstring. ValueError on a malformed
    task id, model id, result hash or unknown decision."""
    _check_bytes32("result_hash", result_hash)
    if decision not in DECISION_CODES:
        raise ValueError(f"unknown decision {decision!r}")
    encoded = abi_encode(
        ["bytes32", "bytes32", "bytes32", "bytes32", "uint8"],
        [
            outcome_domain(network),
            task_id_bytes32(task_id),
            bytes(result_hash),
            model_id_bytes32(model_id),
            DECISION_CODES[decision],
        ],
    )
    return keccak(encoded)


def sign_outcome(eth_key: bytes, digest: bytes) -> bytes:
    """EIP-191 personal signature (65 bytes r || s || v, v in {27, 28}, low s) over the
    32-byte digest: ``Account.sign_message(encode_defunct(primitive=digest), eth_key)``."""
    _check_bytes32("digest", digest)
    signed = Account.sign_message(encode_defunct(primitive=bytes(digest)), private_key=eth_key)
    return bytes(signed.signature)


def recover_outcome_signer(digest: bytes, sig: bytes) -> str | None:
    """The checksum address that signed ``digest`` (EIP-191), or None if the signature is
    unusable: not 65 bytes, v not 27/28, r or s zero or out of range, s above n/2 (the
    malleable twin OpenZeppelin rejects), or no key recovers. Never raises."""
    if not isinstance(digest, bytes | bytearray) or len(digest) != 32:
        return None
    if not isinstance(sig, bytes | bytearray) or len(sig) != 65:
        return None
    r = int.from_bytes(sig[0:32], "big")
    s = int.from_bytes(sig[32:64], "big")
    if sig[64] not in (27, 28) or not 0 < r < _SECP256K1_N or not 0 < s <= _SECP256K1_HALF_N:
        return None
    try:
        return str(
            Account.recover_message(encode_defunct(primitive=bytes(digest)), signature=bytes(sig))
        )
    except (ValueError, TypeError, IndexError, BadSignature, EthKeysValidationError):
        return None
