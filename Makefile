# make help lists the targets. The tests need PostgreSQL and RabbitMQ:
# `make services` (scripts/services.sh up) finds, starts or installs them.

GO        ?= go
VERSION   ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
COMMIT    ?= $(shell git rev-parse --short HEAD 2>/dev/null || echo unknown)
LDFLAGS   := -X main.version=$(VERSION) -X main.commit=$(COMMIT)
TESTFLAGS ?=
BENCH_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help build services test test-race lint bench demo clean

help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-10s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

build: ## Build bin/outbox-relay with version and commit stamped in
	$(GO) build -ldflags "$(LDFLAGS)" -o bin/outbox-relay ./cmd/outbox-relay

services: ## Make sure PostgreSQL and RabbitMQ run (scripts/services.sh up)
	bash scripts/services.sh up

test: services ## Run all tests against the real services (TESTFLAGS=... adds flags)
	$(GO) test -count=1 -p 2 -timeout 12m $(TESTFLAGS) ./...

test-race: services ## Run all tests with the race detector
	$(GO) test -race -count=1 -p 2 -timeout 20m $(TESTFLAGS) ./...

lint: ## Fail on unformatted files (gofmt -l), then go vet
	@out="$$(gofmt -l .)"; if [ -n "$$out" ]; then echo "gofmt -l: these files need gofmt -w:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...

bench: services ## Run the throughput benchmark (BENCH_ARGS=... passes flags)
	$(GO) run ./cmd/outbox-bench $(BENCH_ARGS)

demo: services build ## Run the end-to-end demo (scripts/demo.sh)
	bash scripts/demo.sh

clean: ## Remove build output (bin/)
	rm -rf bin/
