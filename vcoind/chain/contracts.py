"""The compiled VCoin contracts, deployment, and revert decoding.

Everything here is synchronous web3.py; :mod:`vcoind.chain.link` runs it off the trio
thread. Transactions are signed locally by a :class:`Signer` (the node's Ethereum key),
never by the chain node, so the same code talks to the embedded EVM, anvil or any RPC.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from eth_abi.abi import decode as abi_decode
from eth_account import Account
from eth_typing import ChecksumAddress, HexStr
from eth_utils.crypto import keccak
from web3 import Web3
from web3.contract import Contract
from web3.logs import DISCARD

ARTIFACTS = Path(__file__).resolve().parents[2] / "contracts" / "artifacts"
NAMES = ("VCoin", "Staking", "TaskAnchor", "VCoinTimelock", "VCoinGovernor")
ZERO_ADDRESS = "0x0000000000000000000000000000000000000000"
E18 = 10**18
DEPLOYMENT_VERSION = 2  # 2: settlement v2 (TaskAnchor with escrow)
ADMIN_ROLE = bytes(32)  # DEFAULT_ADMIN_ROLE
GAS_MARGIN = 25_000


class ChainError(Exception):
    """A chain operation failed for good (a revert, a bad deployment file, ...)."""


class RevertError(ChainError):
    """The contract refused: ``name`` is the custom error (or "Error" / "Panic"), ``args``
    its decoded arguments."""

    def __init__(self, name: str, args: tuple[Any, ...] = ()) -> None:
        self.name = name
        self.args_ = args
        shown = ", ".join(_show(a) for a in args)
        super().__init__(f"{name}({shown})")


def _show(v: Any) -> str:
    if isinstance(v, bytes):
        return "0x" + v.hex()
    return str(v)


def artifact(name: str) -> dict[str, Any]:
    path = ARTIFACTS / f"{name}.json"
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise ChainError(f"contract artifact {path} is missing (run `make contracts`)") from None
    return data


def error_table(abis: Iterable[Sequence[dict[str, Any]]]) -> dict[bytes, tuple[str, list[str]]]:
    """Selector -> (custom error name, argument types) of every error in ``abis``, plus
    Solidity's ``Error(string)`` and ``Panic(uint256)``."""
    table: dict[bytes, tuple[str, list[str]]] = {
        keccak(text="Error(string)")[:4]: ("Error", ["string"]),
        keccak(text="Panic(uint256)")[:4]: ("Panic", ["uint256"]),
    }
    for abi in abis:
        for item in abi:
            if item.get("type") == "error":
                types = [abi_type(i) for i in item["inputs"]]
                table[keccak(text=f"{item['name']}({','.join(types)})")[:4]] = (
                    item["name"],
                    types,
                )
    return table


def abi_type(inp: dict[str, Any]) -> str:
    t = str(inp["type"])
    if t.startswith("tuple"):
        return "(" + ",".join(abi_type(c) for c in inp["components"]) + ")" + t[5:]
    return t


_ERRORS: dict[bytes, tuple[str, list[str]]] | None = None


def decode_revert_data(data: bytes) -> RevertError:
    """Name and arguments of revert ``data`` against every VCoin contract's errors."""
    global _ERRORS
    if _ERRORS is None:
        _ERRORS = error_table(artifact(n)["abi"] for n in NAMES)
    if len(data) < 4:
        return RevertError("Revert", () if not data else (data,))
    found = _ERRORS.get(data[:4])
    if found is None:
        return RevertError("UnknownError", (data,))
    name, types = found
    try:
        values = abi_decode(types, data[4:])
    except Exception:  # malformed arguments: still name the error
        return RevertError(name, (data[4:],))
    return RevertError(
        name,
        tuple(
            Web3.to_checksum_address(v) if t == "address" else v
            for t, v in zip(types, values, strict=True)
        ),
    )


def revert_from(exc: BaseException) -> RevertError | None:
    """The decoded revert inside a web3 / eth-tester exception, or None if it is not one.

    Anvil (HTTP) raises ``ContractCustomError`` / ``ContractLogicError`` with the data as hex;
    the embedded EVM raises eth-tester's ``TransactionFailed`` whose context holds the raw
    bytes.
    """
    from eth_tester.exceptions import TransactionFailed  # type: ignore[import-untyped]
    from web3.exceptions import ContractLogicError

    if isinstance(exc, ContractLogicError):
        data = exc.data
        if isinstance(data, str) and data.startswith("0x"):
            try:
                return decode_revert_data(bytes.fromhex(data[2:]))
            except ValueError:
                pass
        return RevertError("Error", (exc.message or str(exc),))
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, TransactionFailed) or "TransactionFailed" in type(seen).__name__:
            arg = seen.args[0] if seen.args else None
            if isinstance(arg, Exception) and arg.args:
                arg = arg.args[0]
            if isinstance(arg, str):  # a call (not a transaction): the bytes' repr
                arg = _bytes_repr(arg)
            if isinstance(arg, bytes):
                return decode_revert_data(arg)
        seen = seen.__context__
    if "execution reverted" in str(exc).lower() or isinstance(exc, TransactionFailed):
        return RevertError("Error", (str(exc),))
    return None


def _bytes_repr(text: str) -> bytes | str:
    """The bytes eth-tester writes as ``"[execution reverted: ]b'...'"`` for a reverted
    call, or ``text`` itself."""
    literal = text.removeprefix("execution reverted: ")
    if literal.startswith(("b'", 'b"')):
        try:
            value = ast.literal_eval(literal)
        except (ValueError, SyntaxError):
            return text
        if isinstance(value, bytes):
            return value
    return text


class KeyHolder(Protocol):
    """What holds a key: its address and transaction signatures (``vcoind.signer.Signer``
    for the node's own key, an eth_account ``LocalAccount`` for a deployer's)."""

    @property
    def address(self) -> str: ...

    def sign_transaction(self, tx: Any) -> Any: ...


class Signer:
    """Signs (through one key holder) and sends transactions; keeps the nonce locally."""

    def __init__(self, w3: Web3, key: bytes | KeyHolder) -> None:
        self.w3 = w3
        self._holder: KeyHolder = Account.from_key(key) if isinstance(key, bytes) else key
        self.address: ChecksumAddress = Web3.to_checksum_address(self._holder.address)
        self._nonce: int | None = None

    def sign_transaction(self, tx: Any) -> Any:
        return self._holder.sign_transaction(tx)

    def reset_nonce(self) -> None:
        self._nonce = None

    def build(self, fn: Any, value: int = 0) -> tuple[bytes, str, int]:
        """Sign the call ``fn`` (a contract function or constructor): (raw tx, hash, nonce).

        Gas is estimated first, so a call that would revert raises :class:`RevertError`
        (decoded) here and uses no nonce.
        """
        if self._nonce is None:
            self._nonce = self.w3.eth.get_transaction_count(self.address, "pending")
        # The estimate is the least gas that succeeds when run alone; calls into other
        # contracts (63/64 of the gas passed on) and a changed state can need more.
        try:
            gas = fn.estimate_gas({"from": self.address, "value": value})
        except Exception as exc:
            revert = revert_from(exc)
            if revert is not None:
                raise revert from None
            raise
        tx = fn.build_transaction({"from": self.address, "nonce": self._nonce, "value": value,
                                   "gas": gas * 5 // 4 + GAS_MARGIN})  # fmt: skip
        signed = self.sign_transaction(tx)
        nonce = self._nonce
        self._nonce += 1
        return bytes(signed.raw_transaction), signed.hash.to_0x_hex(), nonce

    def broadcast(self, raw: bytes, tx_hash: str, timeout: float = 30.0) -> Any:
        """Send ``raw`` (again: the same bytes are the same transaction) and wait for its
        receipt. A transaction the chain already has is not an error."""
        receipt = self.receipt(tx_hash)
        if receipt is not None:
            return receipt
        try:
            self.w3.eth.send_raw_transaction(raw)
        except Exception as exc:
            text = str(exc).lower()
            if "already known" not in text and "known transaction" not in text:
                if "nonce" in text:
                    self.reset_nonce()
                raise
        return self.w3.eth.wait_for_transaction_receipt(
            HexStr(tx_hash), timeout=timeout, poll_latency=0.05
        )

    def receipt(self, tx_hash: str) -> Any:
        from web3.exceptions import TransactionNotFound

        try:
            return self.w3.eth.get_transaction_receipt(HexStr(tx_hash))
        except TransactionNotFound:
            return None

    def send(self, fn: Any, value: int = 0) -> Any:
        """Build, sign, send and wait; raises :class:`RevertError` for a refused call."""
        raw, tx_hash, _ = self.build(fn, value)
        receipt = self.broadcast(raw, tx_hash)
        if receipt["status"] != 1:
            raise ChainError(f"transaction {tx_hash} reverted")
        return receipt


def events(contract: Contract, name: str, receipt: Any) -> list[dict[str, Any]]:
    """The ``name`` events of ``contract`` in ``receipt`` (others skipped)."""
    logs = contract.events[name]().process_receipt(receipt, errors=DISCARD)
    return [dict(log["args"]) for log in logs]


@dataclass(frozen=True)
class DeployParams:
    """Constructor arguments (see contracts/README.md). Amounts in wei, times in seconds.

    The defaults are production's: the deployer hands every role to the Timelock (through
    governance) and TaskAnchor, and keeps none. ``faucet`` (devnet) lets the deployer keep
    its admin roles and MINTER_ROLE, to fund nodes.
    """

    unstake_delay: int = 7 * 86400
    min_stake: int = 100 * E18
    # TaskAnchor's Params
    slash_amount: int = 50 * E18
    fee_bps: int = 200  # of every payment, to the reserve
    burn_bps: int = 1000  # of every payment, burned
    mint_bps: int = 500  # minted to the worker on top (below burn_bps: more burned than minted)
    epoch_length: int = 86400
    epoch_mint_cap: int = 10_000 * E18  # minted per epoch, at most
    withdraw_delay: int = 86400  # a requester's deposit withdrawal waits this long
    # Governance
    voting_delay: int = 86400
    voting_period: int = 7 * 86400
    timelock_delay: int = 2 * 86400
    reserve: str = ""  # receives fees and half of every slash; "" = the deployer (faucet) or
    # the Timelock (production: fees become governance's treasury)
    faucet: bool = False

    def anchor_params(self) -> tuple[int, int, int, int, int, int, int]:
        """TaskAnchor's ``Params`` struct, in field order."""
        return (self.slash_amount, self.fee_bps, self.burn_bps, self.mint_bps,
                self.epoch_length, self.epoch_mint_cap, self.withdraw_delay)  # fmt: skip

    def check(self) -> None:
        """ChainError for fees the contract refuses (``BadFees``)."""
        if not 0 <= self.mint_bps < self.burn_bps or self.fee_bps + self.burn_bps > 10_000:
            raise ChainError(f"bad fees: fee {self.fee_bps} + burn {self.burn_bps} bps must be "
                             f"at most 10000 and mint {self.mint_bps} below burn")  # fmt: skip


DEVNET_PARAMS = DeployParams(
    unstake_delay=60, min_stake=100 * E18, slash_amount=50 * E18, epoch_length=3600,
    withdraw_delay=60, voting_delay=1, voting_period=120, timelock_delay=10, faucet=True,
)  # fmt: skip


@dataclass(frozen=True)
class Deployment:
    """Where the contracts live: what ``--contracts FILE`` holds."""

    chain_id: int
    network: str
    deployer: str
    block: int
    addresses: dict[str, str]
    params: dict[str, Any] = field(default_factory=dict)
    version: int = DEPLOYMENT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)

    @classmethod
    def read(cls, path: Path) -> Deployment:
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ChainError(f"deployment file {path} not found") from None
        except (OSError, ValueError) as exc:
            raise ChainError(f"deployment file {path} is not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise ChainError(f"deployment file {path}: not a JSON object")
        version = raw.get("version")
        if version != DEPLOYMENT_VERSION:
            old = version == 1
            raise ChainError(
                f"deployment file {path}: version {version} "
                + ("(settlement v1 contracts, which this node no longer speaks)" if old
                   else "is not supported")
                + ": redeploy with `vcoind chain deploy`"
            )  # fmt: skip
        try:
            d = cls(**raw)
        except TypeError as exc:
            raise ChainError(f"deployment file {path}: {exc}") from None
        missing = [n for n in NAMES if not Web3.is_address(d.addresses.get(n, ""))]
        if missing:
            raise ChainError(f"deployment file {path}: no address for {', '.join(missing)}")
        return d

    @property
    def faucet(self) -> str | None:
        """The address that kept MINTER_ROLE and the admin roles (a devnet), or None."""
        f = self.params.get("faucet")
        return str(f) if f else None


@dataclass
class Contracts:
    """Bound web3 contract objects of one deployment."""

    w3: Web3
    token: Contract
    staking: Contract
    anchor: Contract
    timelock: Contract
    governor: Contract

    @classmethod
    def at(cls, w3: Web3, addresses: dict[str, str]) -> Contracts:
        def bind(name: str) -> Contract:
            addr = Web3.to_checksum_address(addresses[name])
            return w3.eth.contract(address=addr, abi=artifact(name)["abi"])

        return cls(w3, *(bind(n) for n in NAMES))

    def all(self) -> tuple[Contract, ...]:
        """In NAMES order."""
        return (self.token, self.staking, self.anchor, self.timelock, self.governor)

    def by_name(self, name: str) -> Contract:
        """The contract called ``name`` (one of NAMES); ValueError for another name."""
        if name not in NAMES:
            raise ValueError(f"unknown contract {name!r} (one of {', '.join(NAMES)})")
        return self.all()[NAMES.index(name)]


def deploy(
    w3: Web3,
    signer: Signer,
    network: str,
    p: DeployParams,
    genesis: Mapping[str, int] | None = None,
) -> Deployment:
    """Deploy the five contracts and grant the roles contracts/README.md lists.

    ``genesis``: VCOIN (wei) minted to addresses before the deployer gives up MINTER_ROLE
    (without a faucet, the only tokens that exist besides what TaskAnchor mints). With
    ``p.faucet`` the deployer keeps its admin roles and MINTER_ROLE (a devnet's faucet);
    without, it renounces every role it holds, and the deployment is checked: the Timelock
    is the only admin, TaskAnchor the only minter (ChainError if any role is left behind).
    """
    p.check()
    admin = signer.address
    start = w3.eth.block_number

    def new(name: str, *args: Any) -> Contract:
        a = artifact(name)
        ctor = w3.eth.contract(abi=a["abi"], bytecode=a["bytecode"]).constructor(*args)
        receipt = signer.send(ctor)
        contract: Contract = w3.eth.contract(address=receipt["contractAddress"], abi=a["abi"])
        return contract

    token = new("VCoin", admin)
    staking = new("Staking", token.address, admin, p.reserve or admin, p.unstake_delay,
                  p.min_stake)  # fmt: skip
    anchor = new("TaskAnchor", token.address, staking.address, admin, network,
                 p.anchor_params())  # fmt: skip
    timelock = new("VCoinTimelock", p.timelock_delay, [], [ZERO_ADDRESS], admin)
    governor = new("VCoinGovernor", token.address, timelock.address, p.voting_delay,
                   p.voting_period)  # fmt: skip
    t, s, tl = token.functions, staking.functions, timelock.functions
    minter, burner = t.MINTER_ROLE().call(), t.BURNER_ROLE().call()
    signer.send(t.grantRole(minter, anchor.address))
    signer.send(t.grantRole(burner, anchor.address))  # burns its share of each payment
    signer.send(t.grantRole(burner, staking.address))  # burns half of each slash
    signer.send(s.grantRole(s.SLASHER_ROLE().call(), anchor.address))
    signer.send(tl.grantRole(tl.PROPOSER_ROLE().call(), governor.address))
    signer.send(tl.grantRole(tl.CANCELLER_ROLE().call(), governor.address))
    for c in (token, staking, anchor):
        signer.send(c.functions.grantRole(ADMIN_ROLE, timelock.address))
    if p.faucet:
        signer.send(t.grantRole(minter, admin))
    minted = {Web3.to_checksum_address(a): v for a, v in (genesis or {}).items() if v}
    if minted:
        if not p.faucet:  # for the genesis mint only; renounced below
            signer.send(t.grantRole(minter, admin))
        for to, amount in minted.items():
            signer.send(t.mint(to, amount))
    if not p.faucet:
        if not p.reserve:
            signer.send(s.setReserve(timelock.address))
        if minted:
            signer.send(t.renounceRole(minter, admin))
        # The Timelock's own admin role last: until then the deployer could still fix it.
        for c in (token, staking, anchor, timelock):
            signer.send(c.functions.renounceRole(ADMIN_ROLE, admin))
    contracts = (token, staking, anchor, timelock, governor)
    d = Deployment(
        chain_id=w3.eth.chain_id, network=network, deployer=admin, block=start,
        addresses={n: c.address for n, c in zip(NAMES, contracts, strict=True)},
        params={**asdict(p), "reserve": s.reserve().call(), "faucet": admin if p.faucet else None,
                "genesis": {a: str(v) for a, v in minted.items()}},
    )  # fmt: skip
    if not p.faucet:
        check_handover(Contracts.at(w3, d.addresses), admin)
    return d


def check_handover(c: Contracts, deployer: str) -> None:
    """ChainError unless governance owns the deployment: the deployer holds no role on any
    contract, the Timelock is admin of VCoin, Staking, TaskAnchor and itself, and TaskAnchor
    holds the roles it pays and slashes with."""
    t, s, tl = c.token.functions, c.staking.functions, c.timelock.functions
    held = [
        (c.token, "DEFAULT_ADMIN_ROLE", ADMIN_ROLE),
        (c.token, "MINTER_ROLE", t.MINTER_ROLE().call()),
        (c.token, "BURNER_ROLE", t.BURNER_ROLE().call()),
        (c.staking, "DEFAULT_ADMIN_ROLE", ADMIN_ROLE),
        (c.staking, "SLASHER_ROLE", s.SLASHER_ROLE().call()),
        (c.anchor, "DEFAULT_ADMIN_ROLE", ADMIN_ROLE),
        (c.timelock, "DEFAULT_ADMIN_ROLE", ADMIN_ROLE),
        (c.timelock, "PROPOSER_ROLE", tl.PROPOSER_ROLE().call()),
        (c.timelock, "CANCELLER_ROLE", tl.CANCELLER_ROLE().call()),
        (c.timelock, "EXECUTOR_ROLE", tl.EXECUTOR_ROLE().call()),
    ]  # fmt: skip
    problems = [
        f"the deployer still holds {name} on {_name_of(c, k)}"
        for k, name, role in held
        if k.functions.hasRole(role, deployer).call()
    ]
    needed = [
        (c.token, "DEFAULT_ADMIN_ROLE", ADMIN_ROLE, c.timelock),
        (c.staking, "DEFAULT_ADMIN_ROLE", ADMIN_ROLE, c.timelock),
        (c.anchor, "DEFAULT_ADMIN_ROLE", ADMIN_ROLE, c.timelock),
        (c.timelock, "DEFAULT_ADMIN_ROLE", ADMIN_ROLE, c.timelock),
        (c.token, "MINTER_ROLE", t.MINTER_ROLE().call(), c.anchor),
        (c.token, "BURNER_ROLE", t.BURNER_ROLE().call(), c.anchor),
        (c.staking, "SLASHER_ROLE", s.SLASHER_ROLE().call(), c.anchor),
        (c.timelock, "PROPOSER_ROLE", tl.PROPOSER_ROLE().call(), c.governor),
    ]  # fmt: skip
    problems += [f"{_name_of(c, who)} lacks {name} on {_name_of(c, k)}"
                 for k, name, role, who in needed
                 if not k.functions.hasRole(role, who.address).call()]  # fmt: skip
    if problems:
        raise ChainError("the governance handover is incomplete: " + "; ".join(problems))


def _name_of(c: Contracts, contract: Contract) -> str:
    return next(n for n, k in zip(NAMES, c.all(), strict=True) if k.address == contract.address)


def fund(w3: Web3, signer: Signer, c: Contracts, to: str, *, vcoin: int = 0, eth: int = 0) -> None:
    """Send ``eth`` wei and mint ``vcoin`` wei of VCOIN to ``to`` (the signer needs
    MINTER_ROLE and the ether)."""
    to = Web3.to_checksum_address(to)
    if eth:
        tx = {"from": signer.address, "to": to, "value": eth,
              "nonce": w3.eth.get_transaction_count(signer.address, "pending"),
              "gas": 21000, "chainId": w3.eth.chain_id}  # fmt: skip
        base = w3.eth.get_block("latest").get("baseFeePerGas", 10**9)
        tx.update(maxFeePerGas=2 * base + 10**9, maxPriorityFeePerGas=10**9)
        signed = signer.sign_transaction(tx)
        signer.reset_nonce()
        signer.broadcast(bytes(signed.raw_transaction), signed.hash.to_0x_hex())
    if vcoin:
        signer.send(c.token.functions.mint(to, vcoin))


class Deployer:
    """The deployer of an external chain (a JSON-RPC URL and its key): deploys the
    contracts and funds node addresses. ``vcoind chain`` and the devnet use it."""

    def __init__(self, url: str, key: bytes) -> None:
        self.w3 = Web3(Web3.HTTPProvider(url, request_kwargs={"timeout": 30}))
        self.signer = Signer(self.w3, key)

    def deploy(
        self,
        network: str,
        params: DeployParams,
        out: Path,
        genesis: Mapping[str, int] | None = None,
    ) -> Deployment:
        """Deploy (minting ``genesis`` wei of VCOIN to each address before any handover) and
        write the deployment file ``out``."""
        d = deploy(self.w3, self.signer, network, params, genesis)
        d.write(out)
        return d

    def fund(self, d: Deployment, addresses: Iterable[str], *, vcoin: float, eth: float) -> None:
        """``vcoin`` VCOIN minted and ``eth`` ether sent to each address. Minting needs the
        devnet's faucet (a production deployer holds no role: mint at deploy time)."""
        if vcoin and d.faucet is None:
            raise ChainError("this deployment has no faucet (production: the deployer renounced "
                             "MINTER_ROLE); fund with --vcoin 0 (ether only), or give tokens at "
                             "deploy time (`vcoind chain deploy --fund`)")  # fmt: skip
        c = Contracts.at(self.w3, d.addresses)
        for a in addresses:
            fund(self.w3, self.signer, c, a, vcoin=int(vcoin * E18), eth=int(eth * E18))
