#!/usr/bin/env bash
# The main job on its embedded default: sets up when needed, then runs `mezo demo`: MeZO trains
# the bundled small OPT on SST-2 on the CPU and prints zero-shot and final test accuracy.
# Extra arguments go to `mezo demo` (e.g. --json).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
exec "$CARGO_TARGET_DIR/release/mezo" demo "$@"
