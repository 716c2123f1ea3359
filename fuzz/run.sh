#!/usr/bin/env bash
# Run every fuzz target briefly (CI) or for a long campaign, and fail on any crash.
#
#   fuzz/run.sh [seconds-per-target] [target...]     (default 20 s, every target)
#
# Needs the nightly toolchain; installs cargo-fuzz if it is missing. Targets run one at a
# time, each in one process on one core (libFuzzer's default; -jobs=1 would also fork a
# worker and send its output to fuzz-0.log), from the committed seeds in fuzz/corpus/<target>/;
# new inputs go to a scratch copy (the committed corpus is not modified; to keep new
# coverage, `cargo +nightly fuzz cmin` into the corpus by hand). A crash, a panic, a
# timeout (-timeout=10 s per input) or an out-of-memory (-rss_limit_mb=2048) fails the run,
# and the input is left in fuzz/artifacts/<target>/. Built without a sanitizer (all
# decoders are safe Rust: a sanitizer would find nothing more than a panic and costs
# about 2x in speed) and with debug assertions and overflow checks (-a).
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-20}"
shift || true
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo +nightly fuzz list)
fi
cargo +nightly fuzz build --sanitizer none -a
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
status=0
for t in "${targets[@]}"; do
    mkdir -p "$scratch/$t"
    echo "== $t (${secs} s)"
    if ! cargo +nightly fuzz run --sanitizer none -a "$t" "$scratch/$t" "corpus/$t" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        2>"$scratch/$t.log"; then
        status=1
        tail -n 60 "$scratch/$t.log"
        echo "!! $t FAILED (input in fuzz/artifacts/$t/)"
    fi
    grep -E '^(Done|#[0-9]+ +DONE)|stat::number_of_executed_units|stat::average_exec_per_sec' "$scratch/$t.log" || true
done
exit $status
