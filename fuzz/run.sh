#!/usr/bin/env bash
# Runs every cargo-fuzz target for SECONDS each (default 60), one after the
# other; stops at the first crash (its input is left in fuzz/artifacts/).
# Usage: fuzz/run.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-60}"
# libFuzzer's instrumentation flags are nightly-only; RUSTC_BOOTSTRAP lets
# the stable toolchain accept them. `-s none`: the product is safe Rust
# (`unsafe_code = "forbid"`), so AddressSanitizer would add cost, not bugs.
export RUSTC_BOOTSTRAP=1
for target in $(cargo fuzz list); do
  mkdir -p "corpus/$target"
  echo "== $target: ${secs}s"
  # New inputs go to corpus/ (not committed); seeds/ is read only.
  cargo fuzz run "$target" -s none "corpus/$target" "seeds/$target" \
    -- -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1
done
