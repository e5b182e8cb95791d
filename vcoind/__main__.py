"""`python -m vcoind` runs the daemon (same as the `vcoind` script)."""

import sys

from vcoind.cli import daemon_main

sys.exit(daemon_main())
