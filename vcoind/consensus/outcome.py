"""The consensus encodings every replica computes alike.

Byte layout (stable):

- ``task_id_bytes32(id)``: task ids are 32 lowercase hex characters (16 bytes); left-padded
  with 16 zero bytes, i.e. ``bytes32(uint256(uint128(id)))`` in Solidity.
- ``model_id_bytes32("sha256:<64 lowercase hex>")``: the 32 bytes of the hex part.
- ``result_hash(text) = sha256(utf8(text))``.
- ``commitment(task_id, committer, attempt, result_hash, salt) = sha256("vcoin/commit/2" ||
  utf8(task_id) || uint8(len(committer)) || utf8(committer) || uint32be(attempt) ||
  result_hash || salt)`` with the task id as its 32-character ASCII hex text, the
  committer's libp2p peer id (base58) and a 32-byte random salt. Bound to its committer
  and attempt: a commitment copied from another replica cannot be revealed as one's own.
- ``decision``: ``DECISION_CODES`` as a uint8: none 0, tie 1, majority 2, supermajority 3.

What replicas sign (their result, the agreed outcome) is settlement-v2 EIP-712 typed data:
``vcoind.chain.typed``.
"""

from __future__ import annotations

import hashlib
import re

DECISION_CODES: dict[str, int] = {"none": 0, "tie": 1, "majority": 2, "supermajority": 3}
SALT_BYTES = 32
# A task id: 32 lowercase hex characters (the wire schemas and the RPC use this pattern).
TASK_ID_RE = r"[0-9a-f]{32}"

_TASK_ID = re.compile(TASK_ID_RE)
_MODEL_ID = re.compile(r"sha256:([0-9a-f]{64})")


def _check_bytes32(name: str, value: bytes) -> None:
    if not isinstance(value, bytes | bytearray) or len(value) != 32:
        raise ValueError(f"{name} must be 32 bytes")


def result_hash(text: str) -> bytes:
    """sha256 of the UTF-8 encoded result text (32 bytes)."""
    return hashlib.sha256(text.encode("utf-8")).digest()


COMMIT_TAG = b"vcoin/commit/2"


def commitment(
    task_id: str, committer: str, attempt: int, result_hash: bytes, salt: bytes
) -> bytes:
    """A replica's commitment to ``result_hash``, bound to the committer's peer id and the
    attempt (the module docstring's layout); ValueError on malformed input."""
    _check_bytes32("result_hash", result_hash)
    _check_bytes32("salt", salt)
    who = committer.encode("utf-8")
    if not who or len(who) > 255:
        raise ValueError("committer must be a peer id of 1-255 bytes")
    if not 0 <= attempt < 1 << 32:
        raise ValueError("attempt must fit 32 bits")
    return hashlib.sha256(
        COMMIT_TAG + task_id.encode("utf-8") + bytes([len(who)]) + who
        + attempt.to_bytes(4, "big") + bytes(result_hash) + bytes(salt)
    ).digest()  # fmt: skip


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
