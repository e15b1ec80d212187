# Sendense — the two commands in README.md are `make demo` and `make test`.
SHELL := /bin/bash
export SENDENSE_CACHE ?= $(HOME)/.cache/sendense
# Cargo's build output lives in the cache, outside the clone, so CI does not rebuild it every run.
export CARGO_TARGET_DIR ?= $(SENDENSE_CACHE)/target
CLUSTER := e2e/cluster

.PHONY: bench bench-operator demo test deps build images crds crds-check lint unit e2e chart-check tools cluster-build cluster-up cluster-down cluster-status kubeconfig vcsim

## demo: the local control plane and node, the CRDs and samples, the images loaded into the node,
## the chart installed, a full and an incremental backup of a simulated VM, restored and verified
demo: deps
	@bash e2e/demo.sh

## test: everything CI runs (lint, unit tests, CRD drift, end-to-end on a real control plane)
test: deps
	@bash e2e/run-tests.sh

## deps: install what the project needs on this machine (apt packages, Go-built tools)
deps:
	@bash e2e/install-deps.sh

build:
	cargo build --workspace --all-targets

## images: the pause, operator and agent images as archives (OCI layout + docker-archive) in
## $(SENDENSE_CACHE)/images/<appVersion>/; one "<name> <archive> <reference>" line each
## (README.md, "Images"). SENDENSE_IMAGE_PROFILE=dev builds the binaries unoptimised.
images: deps
	@bash e2e/images/build.sh

## crds: regenerate the CRD YAML from the types in crds/
crds:
	cargo run -q -p sendense-crds --bin crdgen

## crds-check: fail when the committed CRD YAML differs from the types
crds-check:
	cargo run -q -p sendense-crds --bin crdgen -- --check

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

unit:
	cargo test --workspace --lib --bins

## e2e: end-to-end tests against the running control plane (make cluster-up first)
e2e:
	eval "$$(bash e2e/tools/build.sh)" && export HELM PROMTOOL && \
	KUBECTL="$$(source $(CLUSTER)/env.sh && echo $$KUBECTL)" KUBECONFIG="$$(source $(CLUSTER)/env.sh && echo $$KUBECONFIG_PATH)" \
	  cargo test --workspace --test '*'

## tools: build helm and kubeconform at the pinned versions (e2e/tools/versions.env)
tools:
	@bash e2e/tools/build.sh

## chart-check: lint and validate charts/sendense and config/ against the running control plane
chart-check:
	KUBECTL="$$(source $(CLUSTER)/env.sh && echo $$KUBECTL)" KUBECONFIG="$$(source $(CLUSTER)/env.sh && echo $$KUBECONFIG_PATH)" \
	  bash e2e/chart/check.sh

## cluster-build: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubelet and
## kube-proxy at the pinned version (only missing ones are built)
cluster-build:
	@bash $(CLUSTER)/build.sh

## cluster-up: the local control plane and its real node (containerd, kubelet, kube-proxy as
## Node "sendense-node"; SENDENSE_NODE=0 leaves the node out); idempotent
cluster-up:
	@bash $(CLUSTER)/up.sh

## cluster-down: stops the node (and removes all it changed on the machine, checked by
## e2e/cluster/node-leftovers.sh), then the control plane
cluster-down:
	@bash $(CLUSTER)/down.sh

cluster-status:
	@bash $(CLUSTER)/status.sh

## kubeconfig: print the admin kubeconfig path of the local control plane
kubeconfig:
	@source $(CLUSTER)/env.sh && echo "$$KUBECONFIG_PATH"

## vcsim: run the vCenter simulator with CBT (one VM, 2 disks) in the foreground; it prints its
## URL, credentials, thumbprint and datastore directory as one JSON line
vcsim:
	bin=$$(bash e2e/vcsim-cbt/build.sh) && "$$bin" serve -datastore-dir "$(SENDENSE_CACHE)/vcsim"

## bench: the copy engine against nbdcopy, incremental cost, added latency and a 100 Mbit/s link
bench: deps
	@bash e2e/bench/run.sh

## bench-operator: N BackupJobs at once vs N batch/v1 Jobs of the same pods (operator/tests/scale.rs)
bench-operator: deps
	@bash e2e/bench/operator.sh
