"""The devnet's shared chain: anvil (npm ``@foundry-rs/anvil``, pinned in contracts/), the
VCoin contracts deployed on it, node addresses funded."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from vcoind.chain.contracts import DEVNET_PARAMS, Deployer, Deployment

ROOT = Path(__file__).resolve().parent.parent
# anvil's first dev account: a publicly known key, for local chains only.
ANVIL_DEPLOYER_KEY = "ac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"
ANVIL_CHAIN_ID = 31337


class ChainSetupError(Exception):
    pass


def has_anvil() -> bool:
    return bool(
        sorted((ROOT / "contracts" / "node_modules" / "@foundry-rs").glob("anvil-*/bin/anvil"))
    )


def anvil_binary() -> Path:
    found = sorted((ROOT / "contracts" / "node_modules" / "@foundry-rs").glob("anvil-*/bin/anvil"))
    if not found:
        raise ChainSetupError(
            "anvil is not installed: run `npm ci --prefix contracts` (or `make install`)"
        )
    return found[0]


@dataclass
class Anvil:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def pause(self) -> None:
        """Freeze the chain (SIGSTOP): requests hang until :meth:`resume`, like a chain
        node that stopped answering; its state is kept."""
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.resume()
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _rpc_up(url: str) -> bool:
    req = urllib.request.Request(
        url,
        data=json.dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_chainId"}).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=1) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def start_anvil(port: int, log_path: Path, timeout: float = 20.0) -> Anvil:
    """anvil on 127.0.0.1:``port`` (chain id 31337, instant mining, 10 funded accounts)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("ab")
    cmd = [str(anvil_binary()), "--host", "127.0.0.1", "--port", str(port),
           "--chain-id", str(ANVIL_CHAIN_ID)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    a = Anvil(proc, port, log_path)
    deadline = time.monotonic() + timeout
    while not _rpc_up(a.url):
        if proc.poll() is not None:
            raise ChainSetupError(f"anvil exited with code {proc.returncode} (log {log_path})")
        if time.monotonic() > deadline:
            a.stop()
            raise ChainSetupError(f"anvil did not answer on {a.url} within {timeout:g} s")
        time.sleep(0.05)
    return a


def deploy_devnet(url: str, out: Path, network: str) -> Deployment:
    """Deploy the contracts with devnet parameters (60 s unstake delay, 2-minute votes)."""
    return Deployer(url, bytes.fromhex(ANVIL_DEPLOYER_KEY)).deploy(network, DEVNET_PARAMS, out)


def fund_nodes(
    url: str, d: Deployment, addresses: list[str], vcoin: float = 10_000, eth: float = 10
) -> None:
    """Ether for gas and VCOIN to stake, minted by the deployer."""
    Deployer(url, bytes.fromhex(ANVIL_DEPLOYER_KEY)).fund(d, addresses, vcoin=vcoin, eth=eth)
