#!/usr/bin/env bash
# Runs every cargo-fuzz target of crates/mezo-fuzz for SECONDS each (default 600), one after the
# other, growing corpus/<target>/ and then minimising it (cargo fuzz cmin). Nightly Rust and
# cargo-fuzz (`cargo install cargo-fuzz`) are needed; CI does not run this, it replays the corpora
# (crates/mezo-fuzz/tests/corpora.rs). Crashes land in crates/mezo-fuzz/fuzz/artifacts/<target>/:
# fix them, copy the input to regressions/<target>/, and rerun.
# Usage: scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
export CARGO_TARGET_DIR="${MEZO_FUZZ_TARGET_DIR:-$HOME/.cache/mezo/target-fuzz}"
# The harnesses write each input to a scratch file: keep that in memory.
export TMPDIR="${MEZO_FUZZ_TMPDIR:-/dev/shm}"
secs="${1:-600}"; shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(config_json tokenizer safetensors torch_bin dataset snapshot log_record)
cd crates/mezo-fuzz
cargo +nightly fuzz build -O --debug-assertions
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "regressions/$t"
  echo "fuzz: $t for ${secs}s"
  cargo +nightly fuzz run -O --debug-assertions "$t" "corpus/$t" "regressions/$t" -- \
    -max_total_time="$secs" -rss_limit_mb=4096 -max_len=65536 -print_final_stats=1 2>&1 | tee "fuzz/$t.log" | grep -E "^(#[0-9]+\s+DONE|stat::|==|SUMMARY|Done)" || true
  cargo +nightly fuzz cmin -O --debug-assertions "$t" "corpus/$t" 2>&1 | tail -1
done
