#!/usr/bin/env bash
# The main job on its embedded default: sets up when needed, then evaluates the bundled small
# OPT on SST-2's validation set. Extra arguments go to `mezo eval` (e.g. --json, --limit 100).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
assets=crates/mezo-cli/assets
exec "$CARGO_TARGET_DIR/release/mezo" eval --model "$assets/opt-mini" --task sst2 \
  --data "$assets/sst2/validation.jsonl" "$@"
