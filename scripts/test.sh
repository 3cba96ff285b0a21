#!/usr/bin/env bash
# The project's test command (README.md; CI runs it through .ci/run).
# Sets up what the tests need (scripts/setup.sh), then: formatting, clippy, unit tests, and the
# lab tests, which boot the stock Debian kernel under our VMM inside emulated hosts (QEMU TCG
# with nested SVM). Usage: bash scripts/test.sh [--no-lab]
set -euo pipefail
cd "$(dirname "$0")/.."

lab=1
[ "${1:-}" = "--no-lab" ] && lab=0

step() { printf '\n=== %s\n' "$*" >&2; }

step "setup"
bash scripts/setup.sh

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --locked --workspace --all-targets -- -D warnings

step "unit tests"
cargo test --locked --workspace

if [ "$lab" = 1 ]; then
    step "lab tests (nested KVM in emulated hosts; minutes)"
    # They boot real guests: one at a time per core is what two cores allow.
    VHPC_BIN="$PWD/target/vhpc" cargo test --locked -p vhpc --test lab -- --ignored --test-threads=2
else
    echo "LAB TESTS NOT RUN (--no-lab): nothing guest-visible was tested" >&2
fi
