#!/usr/bin/env bash
# Runs every fuzz target for a bounded time over its committed seed corpus and prints one line
# per target on stdout:
#   fuzz target=<name> execs=<n> panics=<0|1>
# Exits non-zero when a target crashed (panic, timeout, out of memory) or did not build; the
# crashing input is kept in fuzz/artifacts/<target>/.
#
# Usage: fuzz/run.sh [SECONDS_PER_TARGET] [MAX_RUNS_PER_TARGET]   (defaults: 20, unbounded)
# FUZZ_TARGETS="a b" limits the run to those targets. FUZZ_SANITIZER (default address) picks
# cargo-fuzz's sanitizer: the long runs for the execution counts use `none` (several times faster;
# the code under test is safe Rust, and what is checked is panics and hangs).
#
# cargo-fuzz is installed once (pinned, --locked) into the user's cache. The stable toolchain
# runs with RUSTC_BOOTSTRAP=1 because cargo-fuzz passes -Z flags (the sanitizer) to rustc.
set -euo pipefail

seconds=${1:-20}
max_runs=${2:--1}
cargo_fuzz_version=0.13.2

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
tools=${XDG_CACHE_HOME:-$HOME/.cache}/tailnode/tools/cargo-fuzz-$cargo_fuzz_version
if [ ! -x "$tools/bin/cargo-fuzz" ]; then
  echo "fuzz: installing cargo-fuzz $cargo_fuzz_version into $tools" >&2
  # Its own target dir, so that a CARGO_TARGET_DIR of the caller is not filled with it.
  CARGO_TARGET_DIR="$tools/build" cargo install cargo-fuzz --version "$cargo_fuzz_version" --locked --root "$tools" >&2
  rm -rf "$tools/build"
fi
export PATH="$tools/bin:$PATH"
export RUSTC_BOOTSTRAP=1

cd "$repo"
# The fuzz crate builds into a target dir of its own, whatever CARGO_TARGET_DIR says: its flags
# differ from the main crate's, so sharing one would only rebuild both. It lives in the machine's
# cache (like the Go build cache), so a fresh clone rebuilds only tailnode itself, not every
# sanitizer-instrumented dependency; TAILNODE_FUZZ_TARGET_DIR overrides it.
# Each sanitizer has its own (its flags rebuild every dependency).
sanitizer=${FUZZ_SANITIZER:-address}
suffix=""
[ "$sanitizer" = address ] || suffix="-$sanitizer"
target_dir=${TAILNODE_FUZZ_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tailnode/fuzz-target$suffix}
mkdir -p "$target_dir"
echo "fuzz: building the targets" >&2
cargo fuzz build --sanitizer "$sanitizer" --fuzz-dir "$here" --target-dir "$target_dir" >&2

mapfile -t targets < <(if [ -n "${FUZZ_TARGETS:-}" ]; then tr ' ' '\n' <<<"$FUZZ_TARGETS"; else cargo fuzz list --fuzz-dir "$here"; fi)
failed=0
for t in "${targets[@]}"; do
  [ -n "$t" ] || continue
  seeds="$here/corpus/$t"
  # libFuzzer writes what it finds into the first corpus dir: keep that out of the committed seeds.
  work="$target_dir/corpus/$t"
  logs="$target_dir/logs"
  log="$logs/$t.log"
  mkdir -p "$work" "$logs" "$here/artifacts/$t"
  args=(-max_total_time="$seconds" -runs="$max_runs" -workers=1 -jobs=1 -timeout=10 -print_final_stats=1)
  if [ -f "$here/dicts/$t.dict" ]; then args+=(-dict="$here/dicts/$t.dict"); fi
  started=$SECONDS
  rc=0
  # From the log dir: with -jobs, libFuzzer also writes fuzz-<job>.log into the working dir.
  (cd "$logs" && cargo fuzz run --sanitizer "$sanitizer" --fuzz-dir "$here" --target-dir "$target_dir" "$t" "$work" "$seeds" -- "${args[@]}") \
    >"$log" 2>&1 || rc=$?
  # Executions: libFuzzer's final stats, else the last `#N DONE`/status line.
  execs=$(sed -n 's/^stat::number_of_executed_units: *\([0-9]*\).*/\1/p' "$log" | tail -n 1)
  if [ -z "$execs" ]; then
    execs=$(sed -n 's/^#\([0-9][0-9]*\)[[:space:]].*/\1/p' "$log" | tail -n 1)
  fi
  panics=0
  if [ "$rc" -ne 0 ] || grep -qE '^==[0-9]+== ERROR: libFuzzer|panicked at|^SUMMARY: (libFuzzer|AddressSanitizer)' "$log"; then
    panics=1
    failed=1
    {
      echo "fuzz: target $t failed (exit $rc); the end of its log ($log):"
      tail -n 40 "$log"
      find "$here/artifacts/$t" -type f -printf "fuzz: crashing input: fuzz/artifacts/$t/%f\n"
    } >&2
  fi
  rate=$(sed -n 's/^stat::average_exec_per_sec: *\([0-9]*\).*/\1/p' "$log" | tail -n 1)
  echo "fuzz: $t ran $((SECONDS - started))s at ${rate:-?} exec/s" >&2
  echo "fuzz target=$t execs=${execs:-0} panics=$panics"
done
exit "$failed"
