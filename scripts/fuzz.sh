#!/usr/bin/env bash
# `make fuzz FUZZ_SECONDS=N`: every fuzz target (fuzz/fuzz_targets) for N seconds with libFuzzer,
# starting from the reviewed corpus in fuzz/corpus/<target>; what it finds that is new goes to
# target/fuzz-corpus/<target>, so the repository's corpus only changes by hand. A crash fails
# the run and leaves its input in fuzz/artifacts/<target>/ (add it to the corpus with the fix).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${FUZZ_SECONDS:-60}
if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  echo "fuzz: needs a nightly toolchain (libFuzzer's coverage instrumentation): rustup toolchain install nightly" >&2
  exit 1
fi
if ! command -v cargo-fuzz >/dev/null; then
  echo "fuzz: installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked
fi
cd fuzz
printf '%-16s %10s %12s %s\n' TARGET SECONDS EXECUTIONS "EXEC/S"
for target in $(cargo +nightly fuzz list); do
  scratch=../target/fuzz-corpus/$target
  mkdir -p "$scratch"
  log=../target/fuzz-$target.log
  if ! cargo +nightly fuzz run "$target" "$scratch" "corpus/$target" -- \
      -max_total_time="$secs" -print_final_stats=1 >"$log" 2>&1; then
    tail -40 "$log" >&2
    echo "fuzz: $target crashed; the input is in fuzz/artifacts/$target/" >&2
    exit 1
  fi
  runs=$(awk '/stat::number_of_executed_units/ {print $2}' "$log" | tail -1)
  rate=$(awk '/stat::average_exec_per_sec/ {print $2}' "$log" | tail -1)
  printf '%-16s %10s %12s %s\n' "$target" "$secs" "${runs:-?}" "${rate:-?}"
done
