# Two promises: `make devnet` runs the three-node demo, `make test` runs the suite.
# Both create .venv and install what they need; re-running is cheap (stamp file).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# npm writes this file on every install: it stands for "contracts/node_modules matches the lock".
NODE_DEPS := contracts/node_modules/.package-lock.json

.PHONY: install browser netns-deps test lint contracts devnet devnet-check bench clean

install: $(STAMP) $(NODE_DEPS)

$(STAMP): pyproject.toml
	@# fastecdsa (a libp2p dependency) builds from source against GMP.
	@if ! [ -f /usr/include/gmp.h ] && ! ls /usr/include/*/gmp.h >/dev/null 2>&1; then \
		echo "installing libgmp-dev (needed to build fastecdsa)"; \
		(apt-get update -qq && apt-get install -y -qq libgmp-dev) || \
		{ echo "error: libgmp-dev is missing and could not be installed; install it with your package manager" >&2; exit 1; }; \
	fi
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

# The pinned solcjs, OpenZeppelin and anvil (contracts/package-lock.json). The daemon needs
# no compiler (the artifacts are committed); `make contracts` and the artifact test do, and
# the devnet and the chain tests run anvil.
$(NODE_DEPS): contracts/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
		npm ci --prefix contracts --no-audit --no-fund; \
	else \
		echo "note: npm not found: no anvil for the devnet chain, and contracts cannot be recompiled (the committed artifacts still work)" >&2; \
	fi

# Compile contracts/src with solcjs into the committed contracts/artifacts/*.json.
contracts: $(NODE_DEPS)
	node contracts/build.js

# The dashboard test drives Debian's chromium headless through its chromedriver; the
# REST tests send the planning documents' own curl lines.
browser:
	@if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1 || ! command -v curl >/dev/null 2>&1; then \
		echo "installing chromium, chromium-driver and curl (the dashboard's browser test, the REST tests)"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver curl >/dev/null) || \
		{ echo "error: chromium/chromedriver/curl missing and could not be installed; install them with your package manager" >&2; exit 1; }; \
	fi

# The namespace testbed (`--netns`, tests/test_netns.py) needs root and nftables' nft; where
# either is missing the test is skipped with the reason, so a failed install is only a note.
netns-deps:
	@if [ "$$(id -u)" = 0 ] && ! command -v nft >/dev/null 2>&1; then \
		echo "installing nftables (the NAT of the --netns testbed)"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nftables >/dev/null) || \
		echo "note: nftables could not be installed: the --netns testbed and its test are unavailable" >&2; \
	fi

test: install browser netns-deps
	$(BIN)/ruff check vcoind tests devnet bench
	$(BIN)/ruff format --check vcoind tests devnet bench
	$(BIN)/mypy
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check vcoind tests devnet bench
	$(BIN)/ruff format --check vcoind tests devnet bench
	$(BIN)/mypy

devnet: install $(if $(findstring --netns,$(DEVNET_ARGS)),netns-deps)
	$(BIN)/python -m devnet $(DEVNET_ARGS)

devnet-check: install $(if $(findstring --netns,$(DEVNET_ARGS)),netns-deps)
	$(BIN)/python -m devnet --check $(DEVNET_ARGS)

bench: install
	$(BIN)/python bench/gossip.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
