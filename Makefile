# Bouquet's two commands: `make run` trains the local example, `make test` runs every test.
# Each sets up what it needs on a fresh machine (Python environment, Debian packages) and
# reuses what is already there.

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

VENV = $(shell scripts/venv.sh)
PYTHON = $(VENV)/bin/python
export PYTHONPATH := $(CURDIR)/operator:$(CURDIR)/workloads
# Tests and runs must not pick up a user's Flower configuration.
export FLWR_HOME := $(CURDIR)/.flwr

JOB ?= examples/breast-cancer.yaml
PYTEST_ARGS ?=

.PHONY: help run test lint venv debian-packages images cluster-build helm-build cluster cluster-down bench-local bench-operator

help:
	@echo "make run    train $(JOB) on this machine (output in runs/)"
	@echo "make test   run the whole test suite"
	@echo "make cluster      start a Kubernetes control plane on loopback; prints export KUBECONFIG=..."
	@echo "make cluster-down stop it and remove its state"
	@echo "make images       build the workloads and operator images"
	@echo "make bench-local  time a local run of $(JOB) and print figures"
	@echo "make bench-operator  time the operator on the test control plane and print figures"

venv:
	@scripts/venv.sh >/dev/null

debian-packages:
	@scripts/debian-packages.sh

run: venv
	$(PYTHON) -m bouquet run $(JOB)

# The control plane is built once (tens of minutes on two cores) and cached; the tests start
# and stop a cluster of their own.
cluster-build:
	@scripts/cluster/build.sh >/dev/null

helm-build:
	@scripts/helm.sh >/dev/null

cluster:
	@scripts/cluster/up.sh

cluster-down:
	@scripts/cluster/down.sh

test: lint debian-packages cluster-build helm-build
	$(PYTHON) -m pytest $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check operator workloads tests benchmarks
	$(VENV)/bin/ruff format --check operator workloads tests benchmarks

# The workloads and operator images (Debian's dockerd, a debootstrapped base; no registry).
images: venv
	@scripts/images.sh

bench-local: venv
	$(PYTHON) benchmarks/local_run.py $(JOB)

bench-operator: venv cluster-build
	$(PYTHON) benchmarks/operator_load.py
