# meshd: `make lab` runs a multi-cluster mesh, `make test` runs every test.
# Both install what they need first (see scripts/install-deps.sh).

CARGO ?= cargo
export CARGO_TERM_COLOR ?= never

.PHONY: all deps build test lint fmt bench lab lab-down lab-docker lab-docker-down clean

all: build

deps:
	@scripts/install-deps.sh

build: deps
	$(CARGO) build --workspace --all-targets

lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Tests that need root, etcd, clang or bpffs fail (never skip) when CI=true and one is missing.
# The end-to-end tests run the built binaries (meshd, clustermesh-apiserver) the way a user
# does, so they are built first.
test: deps lint
	$(CARGO) build --workspace --bins
	$(CARGO) test --workspace --no-fail-fast

bench: deps
	$(CARGO) build --release --workspace --all-targets
	scripts/bench.sh

# The namespace lab: two clusters, two nodes each, a global service and a policy, then a
# connectivity check. It keeps running; `make lab-down` removes it.
lab: deps
	$(CARGO) build --release -p meshd -p clustermesh-apiserver
	target/release/meshd lab up

lab-down:
	@if [ -x target/release/meshd ]; then target/release/meshd lab down; \
	else echo "make lab-down: no target/release/meshd, nothing to do" >&2; fi

# The same lab on Docker (docker-compose.yml), with the image built offline when no registry
# answers.
lab-docker: deps
	lab/docker/up.sh

lab-docker-down:
	lab/docker/down.sh

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
