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

.PHONY: help run test venv debian-packages

help:
	@echo "make run    train $(JOB) on this machine (output in runs/)"
	@echo "make test   run the whole test suite"

venv:
	@scripts/venv.sh >/dev/null

debian-packages:
	@scripts/debian-packages.sh

run: venv
	$(PYTHON) -m bouquet run $(JOB)

test: venv debian-packages
	$(PYTHON) -m pytest $(PYTEST_ARGS)
