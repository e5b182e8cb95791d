"""A multi-host testbed on one machine: network namespaces, a NAT, daemons in each.

Topology (``ID`` is unique per run, ``X`` a per-run subnet byte)::

                       vcn-PID-ID-sw: bridge br0 ("the internet", 10.X.0.0/24)
                 /                        |                         \\
    vcn-PID-ID-pub              vcn-PID-ID-nat1                vcn-PID-ID-nat2
    public node 10.X.0.10       wan 10.X.0.1                   wan 10.X.0.2
                                masquerade out of wan          masquerade out of wan
                                lan 192.168.1.1                lan 192.168.2.1
                                      |                              |
                                vcn-PID-ID-lan1                vcn-PID-ID-lan2
                                NATed node 192.168.1.10        NATed node 192.168.2.10
                                (default via 192.168.1.1)      (default via 192.168.2.1)

Every link is a veth pair created directly between two of these namespaces (``ip -n A
link add .. peer name .. netns B``), so nothing is added to the host's own network and
deleting the namespaces removes every link. The NAT routers run nftables: a ``nat``
postrouting chain masquerades the private LAN out of ``wan`` (port-preserving by default,
what hole punching needs; ``random_ports=True`` gives ``masquerade random``, which defeats
it), and a ``filter`` forward chain drops new connections coming in from ``wan`` (a home
router: only replies get in). The public side has no route to 192.168.x at all.

RPC: each daemon's RPC listens on 127.0.0.1 inside its own namespace, which the host cannot
reach. Rather than giving the host a leg on the public LAN (a route in the host's table,
and still no way through a NAT to the private nodes' RPC), the host opens its RPC sockets
*inside* the node's namespace: a short-lived thread joins the namespace (``setns(2)``),
connects, and hands the socket back; a socket stays in the namespace it was created in
(``NetnsRPCClient``). The same trick runs the TCP probes of the tests. Daemons are real
processes started with ``ip netns exec NS python -m vcoind`` (``ip`` execs, so the pid is
the daemon's; the devnet's fork server cannot enter a namespace).

Dial policy: every testbed address is RFC 1918, so each daemon's announce address is
private and ``p2p.allow_private_dials = auto`` lets it dial the others' private addresses:
the only addresses it learns are inside these namespaces. The namespaces have no other
link, so nothing else is reachable anyway.

Relay: the public node runs the circuit relay v2 hop service (``--relay-service on``: its
10.x address is not public, so not by default). The NATed nodes find by a dial-back that
nobody can dial them, reserve a slot on it (their bootstrap peer), and advertise
``.../p2p/<relay>/p2p-circuit/p2p/<me>``; they reach each other through it. DCUtR then
dials the NATs' public addresses (learnt from the dial-back) from the listen ports, at
once from both sides: the first SYN is dropped by the far NAT, the second finds the
near NAT's mapping and the simultaneous open gives a direct connection. The routers drop
unsolicited inbound packets (forward and input) as home routers do: a router that
answered them with RST (no input rule) would tear its own mapping down and defeat the
punch. ``Testbed(random_ports=True)`` makes a NAT that defeats it too. More daemon flags
go in ``start_network(role_flags={"public": [...], "worker": [...], "requester": [...]})``.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import http.client
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from devnet.__main__ import DevNode
from vcoind.cli import ClientError, RPCClient
from vcoind.datadir import DataDir

T = TypeVar("T")

NS_PREFIX = "vcn-"  # vcn-<owner pid>-<4 hex>-<role>
_NS_RE = re.compile(r"^vcn-(\d+)-[0-9a-f]{4}-[a-z0-9]+$")
CLONE_NEWNET = 0x40000000
P2P_PORT = 4001
NFT_HINT = "apt-get install nftables (`make devnet DEVNET_ARGS=--netns` installs it)"


class NetnsError(Exception):
    """A command that builds or runs the testbed failed."""


class NetnsUnavailable(NetnsError):
    """This machine cannot host the testbed (the reason says why)."""


@dataclass(frozen=True)
class NetHost:
    """A namespace that runs (or may run) a daemon."""

    role: str  # "public" or "nated"
    ns: str
    ip: str
    nat: str = ""  # the NAT router's namespace, for a NATed host
    nat_ip: str = ""  # the address the public side sees it as

    def p2p_listen(self) -> str:
        return f"/ip4/{self.ip}/tcp/{P2P_PORT}"


def run(cmd: list[str], *, ns: str | None = None, stdin: str | None = None,
        check: bool = True, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """Run ``cmd`` (inside namespace ``ns`` when given); a failure raises ``NetnsError``
    with the command and its stderr."""
    full = ["ip", "netns", "exec", ns, *cmd] if ns else cmd
    try:
        r = subprocess.run(full, input=stdin, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetnsError(f"{' '.join(full)}: {exc}") from None
    if check and r.returncode != 0:
        raise NetnsError(f"{' '.join(full)}: exit {r.returncode}: {r.stderr.strip()}")
    return r


def list_namespaces() -> list[str]:
    out = run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _kill_and_delete(ns: str) -> None:
    """SIGKILL what still runs in ``ns`` (daemons of this testbed, one pid at a time),
    then delete it (its veths go with it)."""
    pids = run(["ip", "netns", "pids", ns], check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    run(["ip", "netns", "del", ns], check=False)


def cleanup_stale() -> list[str]:
    """Delete the testbed namespaces of runs whose process is gone (killed runs); a running
    testbed's (its owner pid is alive) are left alone. Returns the names removed."""
    removed = []
    for ns in list_namespaces():
        m = _NS_RE.match(ns)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            _kill_and_delete(ns)
            removed.append(ns)
    return removed


_libc = ctypes.CDLL(None, use_errno=True)


def in_netns(ns: str, fn: Callable[[], T]) -> T:
    """``fn()`` called in a fresh thread that joined namespace ``ns``: a socket it creates
    lives in ``ns`` (for good, whichever thread uses it later). The thread ends after
    ``fn``, so no other code ever runs in the namespace."""
    box: dict[str, T] = {}
    err: list[BaseException] = []

    def body() -> None:
        try:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    e = ctypes.get_errno()
                    raise OSError(e, f"setns({ns}): {os.strerror(e)}")
            finally:
                os.close(fd)
            box["v"] = fn()
        except BaseException as exc:  # handed to the caller's thread
            err.append(exc)

    t = threading.Thread(target=body, name=f"netns-{ns}")
    t.start()
    t.join()
    if err:
        raise err[0]
    return box["v"]


def connect_in(ns: str, ip: str, port: int, timeout: float = 3.0) -> socket.socket:
    """A TCP connection to ``ip:port`` made from inside ``ns`` (``OSError`` if refused,
    unreachable or timed out)."""
    return in_netns(ns, lambda: socket.create_connection((ip, port), timeout=timeout))


def listen_in(ns: str, ip: str, port: int = 0) -> socket.socket:
    """A listening TCP socket on ``ip:port`` inside ``ns``."""

    def make() -> socket.socket:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((ip, port))
        s.listen(8)
        return s

    return in_netns(ns, make)


def established_peers(ns: str, port: int = P2P_PORT) -> set[str]:
    """The remote IPs of established TCP connections to local port ``port`` in ``ns``, as
    the kernel there sees them (``ss``)."""
    out = run(["ss", "-Htn", "state", "established", f"( sport = :{port} )"], ns=ns).stdout
    peers = set()
    for line in out.splitlines():
        cols = line.split()
        if len(cols) >= 4:
            peers.add(cols[3].rsplit(":", 1)[0])
    return peers


NAT_RULES = """
table ip nat {{
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname "wan" masquerade{random}
  }}
}}
table ip filter {{
  chain forward {{
    type filter hook forward priority filter; policy accept;
    ct state established,related accept
    iifname "wan" drop
  }}
  chain input {{
    type filter hook input priority filter; policy accept;
    ct state established,related accept
    iifname "wan" ct state new drop
  }}
}}
"""


@functools.cache
def unavailable() -> str | None:
    """Why this machine cannot host the testbed, or None when it can: root, ``ip netns``,
    veth, bridge and an nftables NAT table in a namespace are each tried (once per
    process, in a throwaway namespace)."""
    if os.geteuid() != 0:
        return "needs root (ip netns, veth, nftables)"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is missing"
    if shutil.which("nft") is None:
        return f"nft (nftables) is missing: {NFT_HINT}"
    ns = f"{NS_PREFIX}{os.getpid()}-{secrets.token_hex(2)}-probe"
    try:
        run(["ip", "netns", "add", ns])
    except NetnsError as exc:
        return f"cannot create a network namespace: {exc}"
    try:
        run(["ip", "-n", ns, "link", "add", "name", "br0", "type", "bridge"])
        run(["ip", "-n", ns, "link", "add", "name", "va", "type", "veth", "peer", "name", "vb"])
        run(["ip", "-n", ns, "link", "set", "va", "master", "br0"])
        run(["nft", "-f", "-"], ns=ns, stdin=NAT_RULES.format(random=""))
        run(["sysctl", "-qw", "net.ipv4.ip_forward=1"], ns=ns)
    except NetnsError as exc:
        return f"the kernel lacks a feature the testbed needs: {exc}"
    finally:
        _kill_and_delete(ns)
    return None


class Testbed:
    """The topology of the module docstring, built on ``__enter__`` and removed on
    ``__exit__`` (also when building fails half way)::

        with Testbed() as bed:
            bed.public, bed.nated[0], bed.nated[1]   # NetHost: ns, ip, role
    """

    __test__ = False  # not a pytest test class, whatever its name

    def __init__(self, *, random_ports: bool = False) -> None:
        self.id = f"{NS_PREFIX}{os.getpid()}-{secrets.token_hex(2)}"
        self.subnet = 16 + secrets.randbelow(200)  # 10.X.0.0/24: distinct in logs only
        self.random_ports = random_ports
        lan = f"10.{self.subnet}.0"
        self.switch = f"{self.id}-sw"
        self.public = NetHost("public", f"{self.id}-pub", f"{lan}.10")
        self.nated = [
            NetHost("nated", f"{self.id}-lan{i}", f"192.168.{i}.10",
                    nat=f"{self.id}-nat{i}", nat_ip=f"{lan}.{i}")
            for i in (1, 2)
        ]  # fmt: skip
        self.namespaces: list[str] = []
        self.build_s = 0.0

    @property
    def hosts(self) -> list[NetHost]:
        return [self.public, *self.nated]

    def __enter__(self) -> Testbed:
        reason = unavailable()
        if reason:
            raise NetnsUnavailable(reason)
        cleanup_stale()
        t0 = time.monotonic()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        self.build_s = time.monotonic() - t0
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Kill what still runs in the namespaces and delete them (idempotent)."""
        for ns in reversed(self.namespaces):
            _kill_and_delete(ns)
        self.namespaces.clear()

    def _ns(self, name: str) -> str:
        run(["ip", "netns", "add", name])
        self.namespaces.append(name)
        run(["ip", "-n", name, "link", "set", "lo", "up"])
        return name

    def _veth(self, a: str, a_if: str, b: str, b_if: str) -> None:
        run(["ip", "-n", a, "link", "add", "name", a_if, "type", "veth", "peer", "name", b_if,
             "netns", b])  # fmt: skip

    def _addr(self, ns: str, ifname: str, cidr: str) -> None:
        run(["ip", "-n", ns, "addr", "add", cidr, "dev", ifname])
        run(["ip", "-n", ns, "link", "set", ifname, "up"])

    def _build(self) -> None:
        sw = self._ns(self.switch)
        run(["ip", "-n", sw, "link", "add", "name", "br0", "type", "bridge"])
        run(["ip", "-n", sw, "link", "set", "br0", "up"])
        wan_side = [(self.public.ns, self.public.ip, "pub")]
        wan_side += [(h.nat, h.nat_ip, f"nat{i}") for i, h in enumerate(self.nated, 1)]
        for ns, ip, port in wan_side:
            self._ns(ns)
            self._veth(sw, port, ns, "wan")
            run(["ip", "-n", sw, "link", "set", port, "master", "br0", "up"])
            self._addr(ns, "wan", f"{ip}/24")
        masq = " random" if self.random_ports else ""
        for h in self.nated:
            router_ip = h.ip.rsplit(".", 1)[0] + ".1"
            self._ns(h.ns)
            self._veth(h.nat, "lan", h.ns, "eth0")
            self._addr(h.nat, "lan", f"{router_ip}/24")
            self._addr(h.ns, "eth0", f"{h.ip}/24")
            run(["ip", "-n", h.ns, "route", "add", "default", "via", router_ip])
            run(["sysctl", "-qw", "net.ipv4.ip_forward=1"], ns=h.nat)
            try:
                run(["nft", "-f", "-"], ns=h.nat, stdin=NAT_RULES.format(random=masq))
            except NetnsError as exc:
                raise NetnsUnavailable(f"nftables NAT failed in {h.nat}: {exc}") from None

    def describe(self) -> list[tuple[str, str, str]]:
        """(namespace, addresses, what it is) for every namespace of the testbed."""
        rows = [(self.switch, f"10.{self.subnet}.0.0/24", "bridge br0: the public LAN"),
                (self.public.ns, self.public.ip, "public node")]  # fmt: skip
        for h in self.nated:
            lan = h.ip.rsplit(".", 1)[0]
            masq = "masquerade random" if self.random_ports else "masquerade"
            rows.append((h.nat, f"{h.nat_ip} / {lan}.1", f"NAT router, {masq}"))
            rows.append((h.ns, h.ip, f"NATed node (default via {lan}.1)"))
        return rows


class NetnsRPCClient(RPCClient):
    """``RPCClient`` whose connections are opened inside namespace ``ns`` (the daemon's RPC
    listens on 127.0.0.1 there)."""

    def __init__(self, ns: str, url: str, cookie: str | None, timeout: float = 10.0) -> None:
        super().__init__(url, cookie, timeout)
        self.ns = ns

    def _request(self, path: str, body: bytes | None) -> bytes:
        u = urllib.parse.urlsplit(self.url)
        host, port = u.hostname or "127.0.0.1", u.port or 80
        where = f"the daemon at {self.url} in {self.ns}"
        try:
            sock = connect_in(self.ns, host, port, self.timeout)
        except OSError as exc:
            raise ClientError(f"cannot reach {where}: {exc}") from None
        conn = http.client.HTTPConnection(host, port, timeout=self.timeout)
        conn.sock = sock
        try:
            conn.request("GET" if body is None else "POST", path, body=body,
                         headers={"Content-Type": "application/json", **self.auth})  # fmt: skip
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise ClientError(f"no answer from {where}: {exc}") from None
        finally:
            conn.close()
        if resp.status >= 400:
            raise ClientError(f"{self.url}: HTTP {resp.status} {data[:200]!r}")
        return data


@dataclass
class NsNode(DevNode):
    """A devnet daemon running in a namespace; ``rpc``/``client`` reach it there."""

    host: NetHost | None = None

    def client(self, timeout: float) -> RPCClient:
        assert self.host is not None
        cookie = DataDir(self.datadir).read_cookie()
        return NetnsRPCClient(self.host.ns, self.info["rpc_url"], cookie, timeout)


def start_daemon(host: NetHost, index: int, base: Path, *, bootstrap: str | None,
                 heartbeat: float, peer_timeout: float, network: str = "devnet",
                 extra: list[str] | None = None, timeout: float = 90.0) -> NsNode:  # fmt: skip
    """``ip netns exec NS python -m vcoind`` listening and announcing ``host.ip``:4001, its
    RPC on 127.0.0.1 inside the namespace (the same flags as ``devnet.start_node``).
    Returns at once; ``node.info`` waits until the daemon is up."""
    datadir = base / f"node{index}-{host.ns.rsplit('-', 1)[1]}"
    datadir.mkdir(parents=True, exist_ok=True)
    log_path = datadir / "vcoind.log"
    cmd = [
        "ip", "netns", "exec", host.ns, sys.executable, "-m", "vcoind",
        "--datadir", str(datadir), "--network", network,
        "--listen", host.p2p_listen(), "--announce", host.p2p_listen(),
        "--rpc-addr", "127.0.0.1:0",
        "--heartbeat-interval", str(heartbeat), "--peer-timeout", str(peer_timeout),
        *(["--bootstrap", bootstrap] if bootstrap else []),
        "--cpu-threads", "1",
        *(extra or []),
    ]  # fmt: skip
    DataDir(datadir).remove_run_file()  # a stale file of a killed run is not ours
    with log_path.open("ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    return NsNode(index, datadir, proc, log_path, timeout=timeout, started=time.monotonic(),
                  host=host)  # fmt: skip


# --- the network: three daemons --------------------------------------------------------

ROLES = {
    "public": "public node, no model: its tasks go to a NATed worker",
    "worker": "NATed worker, serves the test model",
    "requester": "NATed requester, no model: its tasks need the worker",
}


def start_network(bed: Testbed, base: Path, models: Path, *, heartbeat: float = 0.5,
                  peer_timeout: float = 5.0, network: str = "devnet",
                  role_flags: Mapping[str, list[str]] | None = None) -> list[NsNode]:  # fmt: skip
    """The public node and the two NATed nodes (``ROLES``, in that order), all launched at
    once: the public node's identity is made first, so the others can bootstrap to its
    address while it starts (their dials retry). No chain (``--no-chain``). ``role_flags``:
    more daemon flags per role (a relay's, later). Returns at once; ``node.info`` waits
    for each."""
    empty = base / "no-models"
    empty.mkdir(parents=True, exist_ok=True)
    pub_dir = base / f"node1-{bed.public.ns.rsplit('-', 1)[1]}"
    dd = DataDir(pub_dir)
    dd.init(exist_ok=True)
    boot = f"{bed.public.p2p_listen()}/p2p/{dd.load_identity().peer_id}"
    plan = [(bed.public, None, empty), (bed.nated[0], boot, models), (bed.nated[1], boot, empty)]
    # The public node relays for the NATed ones (its 10.x address is not public, so it
    # would not by default); they find out by a dial-back that nobody can dial them and
    # hold a slot at it, their bootstrap peer, then punch through to each other (DCUtR).
    flags = {"public": ["--relay-service", "on"], **(role_flags or {})}
    return [
        start_daemon(host, i, base, bootstrap=b, heartbeat=heartbeat, network=network,
                     peer_timeout=peer_timeout,
                     extra=["--no-chain", "--models-dir", str(m), *flags.get(role, [])])
        for i, ((host, b, m), role) in enumerate(zip(plan, ROLES, strict=True), 1)
    ]  # fmt: skip
