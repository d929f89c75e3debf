# tickpipe: see README.md. Every target installs and starts what it needs.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

STACK := deploy/local/stack.sh
# Exports the addresses of the running local stack and the interop interpreter.
STACK_ENV = eval "$$($(STACK) env)"; export TICKPIPE_INTEROP_PYTHON="$$(deploy/local/python-env.sh)";

.PHONY: help
help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

.PHONY: stack-up stack-down stack-status kafka
stack-up: ## install (cached) and start broker, PostgreSQL and BigQuery emulator
	$(STACK) up
stack-down: ## stop what stack-up started
	$(STACK) down
stack-status: ## show what is running
	$(STACK) status
kafka: ## start only the Kafka-protocol broker (docker compose if a Docker engine answers, else tansu)
	$(STACK) up kafka

.PHONY: producer
producer: stack-up ## run the producer on the local stack (live sources when Binance answers, else the simulator)
	eval "$$($(STACK) env)"; cargo run --release --locked -p tickpipe-producer --bin producer -- run

.PHONY: lint
lint: ## rustfmt and clippy, warnings are errors
	cargo fmt --all --check
	cargo clippy --workspace --all-targets --locked -- -D warnings

.PHONY: test
test: lint stack-up ## the whole test suite against the real local stack
	$(STACK_ENV) cargo test --workspace --locked

.PHONY: bench
bench: stack-up ## print the benchmark figures (ratios against baselines run alongside)
	cargo bench --locked -p tickpipe-schemas --bench codec
	cargo bench --locked -p tickpipe-consumers --bench candles
	eval "$$($(STACK) env)"; cargo bench --locked -p tickpipe-consumers --bench candles_e2e
	eval "$$($(STACK) env)"; cargo bench --locked -p tickpipe-consumers --bench postgres_sink
	eval "$$($(STACK) env)"; cargo bench --locked -p tickpipe-consumers --bench bigquery_sink
	eval "$$($(STACK) env)"; cargo bench --locked -p tickpipe-producer --bench replay
