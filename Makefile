# tickpipe: see README.md. Every target installs and starts what it needs.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

STACK := deploy/local/stack.sh
# Exports the addresses of the running local stack, the interop interpreter,
# Prometheus and the Apache Kafka jars for tests that start brokers of their own.
# (Assignments apart from `export`, so that a failed install stops the target.)
STACK_ENV = eval "$$($(STACK) env)"; TICKPIPE_INTEROP_PYTHON="$$(deploy/local/python-env.sh)"; TICKPIPE_PROMETHEUS_BIN="$$(deploy/local/prometheus.sh)"; TICKPIPE_KAFKA_HOME="$$($(STACK) kafka-home)"; export TICKPIPE_INTEROP_PYTHON TICKPIPE_PROMETHEUS_BIN TICKPIPE_KAFKA_HOME;

.PHONY: help
help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

.PHONY: stack-up stack-down stack-status kafka
stack-up: ## install (cached) and start Kafka, Schema Registry, PostgreSQL, BigQuery emulator and S3 (moto)
	$(STACK) up
stack-down: ## stop what stack-up started
	$(STACK) down
stack-status: ## show what is running
	$(STACK) status
kafka: ## start only Apache Kafka (docker compose if a Docker engine answers, else from the cached jars)
	$(STACK) up kafka

DEMO := deploy/local/demo.sh

.PHONY: demo demo-stop demo-status producer consumers
demo: ## the whole pipeline in the background (stack, producer, candles, sinks), then a minute of progress
	$(DEMO) up
	$(DEMO) watch 60
demo-stop: ## stop what demo, producer and consumers started (the stack stays; make stack-down)
	$(DEMO) down
demo-status: ## which pipeline services run
	$(DEMO) status
producer: ## start the producer in the background (live sources when Binance answers, else the simulator)
	$(DEMO) up producer
consumers: ## start candles, postgres-sink, bigquery-sink and lake-sink in the background
	$(DEMO) up consumers

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
	eval "$$($(STACK) env)"; TICKPIPE_KAFKA_HOME="$$($(STACK) kafka-home)" cargo bench --locked -p tickpipe-consumers --bench postgres_sink_group
	eval "$$($(STACK) env)"; cargo bench --locked -p tickpipe-consumers --bench bigquery_sink
	eval "$$($(STACK) env)"; TICKPIPE_INTEROP_PYTHON="$$(deploy/local/python-env.sh)" cargo bench --locked -p tickpipe-consumers --bench lake_sink
	eval "$$($(STACK) env)"; cargo bench --locked -p tickpipe-producer --bench replay
