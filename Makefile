# nodeagent — `make help` lists the targets.
SHELL := /bin/bash
GO ?= go
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo devel)
LDFLAGS := -s -w -X github.com/nodeagent/nodeagent/agent.version=$(VERSION)
PREFIX ?= /usr/local
DESTDIR ?=

.DEFAULT_GOAL := help

.PHONY: help
help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

.PHONY: build
build: ## build bin/nodeagent
	$(GO) build -trimpath -ldflags '$(LDFLAGS)' -o bin/nodeagent ./cmd/nodeagent

.PHONY: run
run: build ## run the agent on this machine with deploy/examples/local.yaml (needs root)
	$(if $(filter 0,$(shell id -u)),,sudo -E) bin/nodeagent run --config deploy/examples/local.yaml

.PHONY: deps
deps: ## install what the tests need: Debian packages (as root) and the peer binaries (SPIRE, Jaeger, otel-cli, telemetrygen, otelcol, golangci-lint)
	bash .ci/deps.sh

.PHONY: test
test: deps ## run every test, privileged ones included (as root; NODEAGENT_REQUIRE_PRIVILEGED=1 makes a skip a failure)
	$(GO) test -race -count=1 -timeout 30m ./...
	cd deploy/test && $(GO) test -count=1 -timeout 15m ./...

.PHONY: generate
generate: ## regenerate the eBPF objects with Debian's clang (committed; CI checks they match)
	$(GO) generate ./ebpf/...

.PHONY: lint
lint: ## golangci-lint v2 (built once into the tools cache)
	$$(bash test/tools/build.sh golangci-lint | cut -f2) run ./...

.PHONY: bench
bench: build ## benchmarks against the peers, measured in one run (results in BENCHMARKS.md)
	bash test/bench/run.sh

.PHONY: install
install: build ## install binary, systemd units and config under DESTDIR/PREFIX
	bash deploy/systemd/install.sh "$(DESTDIR)" "$(PREFIX)" bin/nodeagent

.PHONY: clean
clean: ## remove build output
	rm -rf bin
