# vipd developer entry points. `make test` and `make demo` set up everything they need on a
# fresh Debian machine (as root: Debian packages; always: .venv with vipd installed) and
# skip what is already there.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# python3-venv: without it `python3 -m venv` leaves a .venv with python but no pip.
DEB_TEST := python3-venv iproute2 etcd-server curl tcpdump iperf3 procps keepalived systemd prometheus
DEB_DEMO := python3-venv iproute2 etcd-server curl procps
DEB_BENCH := haproxy nginx-light iperf3 wrk keepalived curl
PYTEST_ARGS ?=

.PHONY: test demo bench lint venv deb-test deb-demo deb-bench clean

# A half-made .venv (python but no pip: venv ran before python3-venv was installed) is rebuilt.
$(STAMP): pyproject.toml
	@if ! test -x $(BIN)/python || ! test -x $(BIN)/pip; then rm -rf $(VENV) && $(PY) -m venv $(VENV); fi
	@$(BIN)/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
	$(BIN)/python -m pip install -q -e '.[test,lab]'
	@touch $(STAMP)

venv: $(STAMP)

# Explicit rules: make skips pattern rules for .PHONY targets, so a `deb-%` rule never ran.
deb-test:
	@packaging/ensure-debs $(DEB_TEST)
deb-demo:
	@packaging/ensure-debs $(DEB_DEMO)
deb-bench:
	@packaging/ensure-debs $(DEB_BENCH)

test: deb-test venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: deb-demo venv
	$(BIN)/vipd lab demo

bench: deb-bench deb-test venv
	$(BIN)/python -m bench

lint: venv
	$(BIN)/ruff check vipd tests bench

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
