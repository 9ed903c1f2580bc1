#!/usr/bin/env bash
# om's full test suite: the README's test command. Run as root on a fresh machine: it installs what the
# suite needs, then fails on the first failing step.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s\n' "$*"; }

step "dependencies"
bash ci/deps.sh
if [ "$(id -u)" -ne 0 ]; then
  echo "ci/test.sh: the multi-node tests need root (network namespaces); run as root" >&2
  exit 1
fi

step "format"
cargo fmt --all -- --check
cargo fmt --manifest-path fuzz/Cargo.toml -- --check

step "om.h is what cbindgen generates from lib/launch"
cbindgen --quiet --config lib/launch/cbindgen.toml --crate om-launch --output target/om.h.generated
diff -u lib/launch/include/om.h target/om.h.generated

step "clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "build"
cargo build --workspace --all-targets --locked
# The kernel-behaviour probes the docs quote (benches/probes/*.c) must still build, warning-free.
for probe in benches/probes/*.c; do
  gcc -O2 -Wall -Wextra -Werror -pthread -o "target/probe-$(basename "$probe" .c)" "$probe"
done

step "tests"
# verbs/tests/layout.rs must compare against the real header here (ci/deps.sh installs it).
OM_REQUIRE_VERBS_H=1 cargo test --workspace --locked

step "verbs over soft-RoCE in a QEMU guest (ci/rxe)"
bash ci/rxe/run.sh

step "fuzz (bounded: ${OM_FUZZ_SECONDS:-10} s per decoder)"
bash ci/fuzz.sh "${OM_FUZZ_SECONDS:-10}"

step "no rig left behind"
left=$(ls /run/netns 2>/dev/null | grep '^omrig-' || true)
if [ -n "$left" ]; then
  echo "rig namespaces left behind: $left" >&2
  exit 1
fi
echo "ok"
