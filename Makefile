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

.PHONY: help run test e2e e2e-kind lint venv debian-packages images cluster-build helm-build cluster cluster-down bench bench-local bench-operator bench-faults bench-server-faults

help:
	@echo "make run    train $(JOB) on this machine (output in runs/)"
	@echo "make test   run the whole test suite"
	@echo "make cluster      make this host a single-node Kubernetes cluster with Bouquet installed; prints the export lines of KUBECONFIG and PATH (its kubectl, helm)"
	@echo "make cluster-down stop it and remove everything it left on the host but what its claims hold (DELETE_CLAIMS=1: that too)"
	@echo "make e2e          the end-to-end tests on the cluster of \$$KUBECONFIG (unset: this host's own)"
	@echo "make e2e-kind     the end-to-end tests on a kind cluster (hosts with Docker and registry access)"
	@echo "make images       build the workloads and operator images"
	@echo "make bench        Bouquet next to stock Flower 1.41 on the same jobs (CASES=abc): round times, bytes, memory"
	@echo "make bench-local  time a local run of $(JOB) and print figures"
	@echo "make bench-operator  time the operator on the test control plane and print figures"
	@echo "make bench-faults    kill the operator, its leader and the API server at random moments of jobs (TRIALS=10 each), crash-loop a server, and print what held"
	@echo "make bench-server-faults  delete or SIGKILL a real run's server pod at a random round (TRIALS=10, on this host's single-node cluster) and print what held"

venv:
	@scripts/venv.sh >/dev/null

debian-packages:
	@scripts/debian-packages.sh

run: venv
	@$(PYTHON) -m bouquet run $(JOB)

# The control plane is built once (tens of minutes on two cores) and cached; the tests start
# and stop a cluster of their own.
cluster-build:
	@scripts/cluster/build.sh >/dev/null

helm-build:
	@scripts/helm.sh >/dev/null

# The single-node cluster (root: containerd, kubelet, iptables) with Bouquet's chart installed.
cluster: cluster-build helm-build
	@scripts/cluster/up.sh --node >/dev/null
	@scripts/cluster/install.sh

# Keeps what the cluster's claims hold in /var/lib/bouquet/claims; DELETE_CLAIMS=1 deletes it.
cluster-down:
	@scripts/cluster/down.sh $(if $(DELETE_CLAIMS),--delete-claims)

# Every test, the end-to-end ones on a single-node cluster of this host's own.
# The builds run side by side: Go's compiles are bound by the CPU, the images' by the disk
# and the network.
# A run that passes leaves its wall time in runs/make-test.txt, which make bench prints.
test: lint debian-packages
	@started=$$(date +%s); \
	$(MAKE) --no-print-directory -j3 cluster-build helm-build images >/dev/null; \
	env -u BOUQUET_E2E_KUBECONFIG $(PYTHON) -m pytest $(PYTEST_ARGS); \
	mkdir -p runs; echo "$$(( $$(date +%s) - started )) $$(git rev-parse --short HEAD 2>/dev/null || echo unknown) $$(date -u +%FT%TZ)" > runs/make-test.txt

# The end-to-end tests on the cluster $$KUBECONFIG names, which must hold Bouquet's images;
# with KUBECONFIG unset, on a single-node cluster of this host's own, as in `make test`.
e2e: venv debian-packages cluster-build helm-build
	BOUQUET_E2E_KUBECONFIG="$${KUBECONFIG:-}" $(PYTHON) -m pytest tests/e2e $(PYTEST_ARGS)

# The same tests on kind (kind-config.yaml): for hosts with Docker and registry access.
e2e-kind: venv debian-packages helm-build
	@scripts/kind.sh
	BOUQUET_E2E_KUBECONFIG="$$(scripts/kind.sh --kubeconfig)" $(PYTHON) -m pytest tests/e2e $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check operator workloads tests benchmarks
	$(VENV)/bin/ruff format --check operator workloads tests benchmarks

# The workloads and operator images (Debian's dockerd, a debootstrapped base; no registry).
images: venv
	@scripts/images.sh

CASES ?= abc
bench: venv
	$(PYTHON) benchmarks/compare.py --cases "$(CASES)"

bench-local: venv
	$(PYTHON) benchmarks/local_run.py $(JOB)

bench-operator: venv cluster-build
	$(PYTHON) benchmarks/operator_load.py

TRIALS ?= 10
bench-faults: venv cluster-build
	$(PYTHON) benchmarks/faults.py --trials $(TRIALS)

bench-server-faults: venv debian-packages cluster-build helm-build images
	$(PYTHON) benchmarks/server_faults.py --trials $(TRIALS)
