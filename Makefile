# Two commands matter: `make run` and `make test`. Both install what is missing first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml client/pyproject.toml | sha1sum | cut -c1-12)
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
PROMETHEUS := /usr/bin/prometheus

.PHONY: run test install testdata postgresql proto proto-check sdk-check lint typecheck settings-table settings-check fuzz chaos chaos-replicas soak

$(STAMP): pyproject.toml client/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned, so the extra's resolver never reaches for another build.
	$(PY) -m pip install --disable-pip-version-check -q torch==2.14.1 torchvision==0.29.1
	# The SDK (client/, its own distribution) and the server, which depends on it.
	$(PY) -m pip install --disable-pip-version-check -q -e ./client -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

## Start the server on the embedded default (local store, CPU or CUDA, real backbones).
run: install
	$(PY) -m transfer_service

$(FASHION_MNIST):
	# Test data: Fashion-MNIST from Debian (offline-reachable, real images).
	if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	$$SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -qq >/dev/null && $$SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null; }

$(PROMETHEUS):
	# A real Prometheus for the scrape test (tests/e2e/test_prometheus_scrape.py), from Debian.
	if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	$$SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -qq >/dev/null && \
	    $$SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

postgresql:
	# A real PostgreSQL for the PostgreSQL store's tests (tests/postgres_server.py), from Debian.
	if ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	$$SUDO apt-get install -y -qq --no-install-recommends postgresql >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -qq >/dev/null && \
	    $$SUDO apt-get install -y -qq --no-install-recommends postgresql >/dev/null; }

testdata: $(FASHION_MNIST) $(PROMETHEUS) postgresql

## Regenerate the checked-in gRPC code from protos/.
proto: install
	PY=$(PY) bash tools/gen_proto.sh client/transfer_client/proto

## Fails when client/transfer_client/proto differs from what protos/ generates.
proto-check: install
	rm -rf $(VENV)/proto-check && PY=$(PY) bash tools/gen_proto.sh $(VENV)/proto-check
	diff -r -x __pycache__ $(VENV)/proto-check client/transfer_client/proto || { echo "generated protobuf code drifted: run 'make proto'"; exit 1; }

lint: install
	$(VENV)/bin/ruff check service client tests bench tools
	$(VENV)/bin/ruff format --check service client tests bench tools

typecheck: install
	$(VENV)/bin/mypy service client

## Refresh the README's settings table from service/transfer_service/settings.py.
settings-table: install
	$(PY) tools/settings_table.py --write README.md

settings-check: install
	$(PY) tools/settings_table.py --check README.md

## The SDK as a user gets it: build its wheel, install it into a clean venv (grpcio and
## protobuf only), import it and run its CLI; fails if torch or the server came along.
sdk-check: install
	# Built from a copy: setuptools leaves build/ beside the sources it builds.
	rm -rf $(VENV)/sdk-check && mkdir -p $(VENV)/sdk-check && cp -r client $(VENV)/sdk-check/src
	rm -rf $(VENV)/sdk-check/src/*.egg-info && $(PY) -m venv $(VENV)/sdk-check/venv
	$(PY) -m pip wheel --disable-pip-version-check -q --no-deps -w $(VENV)/sdk-check/dist $(VENV)/sdk-check/src
	$(VENV)/sdk-check/venv/bin/pip install --disable-pip-version-check -q $(VENV)/sdk-check/dist/transfer_client-*.whl
	cd $(VENV)/sdk-check && venv/bin/python -c "import importlib.util as u, transfer_client as t; assert t.TransferClient and t.AsyncTransferClient; missing = [m for m in ('torch', 'numpy', 'transfer_service') if u.find_spec(m)]; assert not missing, missing; print('SDK wheel imports without', 'torch, numpy or the server')"
	cd $(VENV)/sdk-check && venv/bin/transfer --help >/dev/null
	test ! -e $(VENV)/sdk-check/venv/bin/transfer-server

## Lint, types, proto drift, SDK wheel, README settings table and the whole suite.
test: install testdata proto-check sdk-check lint typecheck settings-check
	$(PY) -m pytest -q -p no:cacheprovider

## Reliability runs, not in CI (each starts its own server on loopback; see tools/reliability).
## >= 5,000 hypothesis-generated requests per RPC against a live server.
fuzz: install testdata
	$(PY) -m tools.reliability.fuzz --examples 5000

## >= 100 SIGKILLs during training and head saves, restart and check after each.
chaos: install testdata
	$(PY) -m tools.reliability.chaos --kills 100

## The same on 3 replicas sharing a PostgreSQL (jobs taken over when a replica dies).
chaos-replicas: install testdata
	$(PY) -m tools.reliability.chaos --replicas 3 --kills 100

## Minutes of mixed load; reports errors, p50/p99 and RSS growth (plus a leaking control).
soak: install testdata
	$(PY) -m tools.reliability.soak --minutes 5
