# meshd: `make lab` runs a multi-cluster mesh, `make test` runs every test.
# Both install what they need first (see scripts/install-deps.sh).

CARGO ?= cargo
export CARGO_TERM_COLOR ?= never

.PHONY: all deps build test lint fmt bench lab lab-down lab-docker lab-docker-down clean install fuzz faults floods

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

# Coverage-guided fuzzing of the decoders of untrusted input (nightly + cargo-fuzz, installed
# when missing): every target for FUZZ_SECONDS.
FUZZ_SECONDS ?= 60
fuzz: deps
	FUZZ_SECONDS=$(FUZZ_SECONDS) scripts/fuzz.sh

# Randomized fault trials over the end-to-end mesh (tests/tests/fault_trials.rs): TRIALS trials
# drawn from SEED (a new seed each run unless given), on ETCD_MEMBERS-member etcds, with a mirror
# per cluster and agents reading the cache when KVSTOREMESH=1. `make test` runs 10 trials of
# seed 1 and 5 through the cache. A failing trial prints the command that replays it.
TRIALS ?= 20
SEED ?= $(shell date +%s)
ETCD_MEMBERS ?= 1
KVSTOREMESH ?= 0
faults: deps
	$(CARGO) build --workspace --bins
	MESHD_FAULT_TRIALS=$(TRIALS) MESHD_FAULT_SEED=$(SEED) MESHD_FAULT_ETCD_MEMBERS=$(ETCD_MEMBERS) MESHD_FAULT_KVSTOREMESH=$(KVSTOREMESH) $(CARGO) test -p meshd-e2e --test fault_trials -- --nocapture --exact randomized_fault_trials_leave_maps_equal_to_etcd

# The long flood (issue 17, item 4; tests/benches/floods.rs): c3 publishes FLOOD_KEYS keys while
# c2's propagation to c1/n1 is timed against the same probes before the flood, and c1/n1's
# memory is sampled; direct mode, then through the cache. FLOOD_LIMIT=0 keeps the default
# remote_entry_limit. FLOOD_ISOLATE=1 runs c1/n1 and the probe's path on CPU 0 and the flood
# (c3's etcd, the writer, the other agents) on CPU 1, as if on machines of their own.
# `make test` runs the short version (tests/tests/agent_floods.rs).
FLOOD_KEYS ?= 1000000
FLOOD_LIMIT ?= 0
FLOOD_ISOLATE ?= 0
# The probe: looked for every 0.1 ms and timed from the put's request (the bench's own defaults,
# 0.5 ms from etcd's answer, are session 10's instrument and can read a delayed probe as 0 ms).
FLOOD_PROBE ?= --poll-us 100 --from-request 1
floods: deps
	$(CARGO) build --release -p meshd -p clustermesh-apiserver
	$(CARGO) bench -p meshd-e2e --bench floods -- --keys $(FLOOD_KEYS) --limit $(FLOOD_LIMIT) --isolate $(FLOOD_ISOLATE) $(FLOOD_PROBE) --cache 0
	$(CARGO) bench -p meshd-e2e --bench floods -- --keys $(FLOOD_KEYS) --limit $(FLOOD_LIMIT) --isolate $(FLOOD_ISOLATE) $(FLOOD_PROBE) --cache 1

# The namespace lab: two clusters, two nodes each, a global service and a policy, then a
# connectivity check. It keeps running; `make lab-down` removes it.
# ROUTING=native runs both clusters in native routing mode (no tunnel); with it,
# SERVICE_LB_MODE=dsr (or hybrid) has node ports answer with direct server return.
ROUTING ?= tunnel
SERVICE_LB_MODE ?= snat
lab: deps
	$(CARGO) build --release -p meshd -p clustermesh-apiserver -p meshd-otlp-collector
	target/release/meshd lab up --routing $(ROUTING) --service-lb-mode $(SERVICE_LB_MODE)

lab-down:
	@if [ -x target/release/meshd ]; then target/release/meshd lab down; \
	else echo "make lab-down: no target/release/meshd, nothing to do" >&2; fi

# The same lab on Docker (docker-compose.yml), with the image built offline when no registry
# answers.
lab-docker: deps
	lab/docker/up.sh

lab-docker-down:
	lab/docker/down.sh

# Binaries, shell completions and man pages (generated from the CLI definition) under
# $(DESTDIR)$(PREFIX).
PREFIX ?= /usr/local
SYSTEMD_UNIT_DIR ?= /etc/systemd/system
install: deps
	$(CARGO) build --release -p meshd -p clustermesh-apiserver -p meshd-otlp-collector
	install -D -m 0755 target/release/meshd $(DESTDIR)$(PREFIX)/bin/meshd
	install -D -m 0755 target/release/clustermesh-apiserver $(DESTDIR)$(PREFIX)/bin/clustermesh-apiserver
	install -D -m 0755 target/release/meshd-otlp-collector $(DESTDIR)$(PREFIX)/bin/meshd-otlp-collector
	install -d $(DESTDIR)$(PREFIX)/share/bash-completion/completions \
		$(DESTDIR)$(PREFIX)/share/zsh/site-functions $(DESTDIR)$(PREFIX)/share/fish/vendor_completions.d \
		$(DESTDIR)$(PREFIX)/share/man/man1
	target/release/meshd completion bash > $(DESTDIR)$(PREFIX)/share/bash-completion/completions/meshd
	target/release/meshd completion zsh > $(DESTDIR)$(PREFIX)/share/zsh/site-functions/_meshd
	target/release/meshd completion fish > $(DESTDIR)$(PREFIX)/share/fish/vendor_completions.d/meshd.fish
	target/release/meshd man --out-dir $(DESTDIR)$(PREFIX)/share/man/man1 > /dev/null
	install -d $(DESTDIR)$(SYSTEMD_UNIT_DIR)
	for unit in deploy/systemd/*.service; do \
		sed 's|@BINDIR@|$(PREFIX)/bin|g' $$unit > $(DESTDIR)$(SYSTEMD_UNIT_DIR)/$$(basename $$unit); \
	done
	@echo "make install: meshd, clustermesh-apiserver and meshd-otlp-collector in $(DESTDIR)$(PREFIX)/bin, completions and man pages under $(DESTDIR)$(PREFIX)/share, systemd units in $(DESTDIR)$(SYSTEMD_UNIT_DIR)"

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
