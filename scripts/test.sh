#!/usr/bin/env bash
# Every test: sets up from nothing when needed (venv, build), then runs the workspace's tests.
# GPU-only tests are #[ignore]d here and run on a CUDA machine with `--ignored`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
cargo test --release --locked --workspace "$@"
