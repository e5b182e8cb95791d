"""Entry points: ``vcoind`` (the daemon) and ``vcoin`` (a client of its JSON-RPC).

daemon.py: the daemon's flags, ``vcoind init``, running the node; model.py: ``vcoind model``;
client.py: ``vcoin`` and its RPC client; format.py: what they print (a leaf the others import).
"""

from vcoind.cli.client import (
    CLIENT_COMMANDS,
    CONSENSUS_VIEWS,
    ClientError,
    RPCClient,
    client_main,
    client_parser,
)
from vcoind.cli.daemon import DAEMON_EPILOG, daemon_main, daemon_parser
from vcoind.cli.format import EXIT_USAGE, fmt_anchor, fmt_consensus
from vcoind.cli.model import model_main, model_parser

__all__ = [
    "CLIENT_COMMANDS",
    "CONSENSUS_VIEWS",
    "DAEMON_EPILOG",
    "EXIT_USAGE",
    "ClientError",
    "RPCClient",
    "client_main",
    "client_parser",
    "daemon_main",
    "daemon_parser",
    "fmt_anchor",
    "fmt_consensus",
    "model_main",
    "model_parser",
]
