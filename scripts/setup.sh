#!/usr/bin/env bash
# Installs what is missing and reuses what is there: the Python venv with torch 2.11.0 (whose
# libtorch the binary links) and the release build of `mezo`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

want=$(sha256sum scripts/requirements.txt | cut -c1-16)
if [ "$(cat "$MEZO_VENV/.requirements" 2>/dev/null)" != "$want" ]; then
  echo "setup: creating Python venv at $MEZO_VENV (torch 2.11.0, transformers; about 2 minutes)"
  rm -rf "$MEZO_VENV"
  python3 -m venv "$MEZO_VENV"
  "$MEZO_VENV/bin/pip" install -q --upgrade pip
  "$MEZO_VENV/bin/pip" install -q -r scripts/requirements.txt
  echo "$want" > "$MEZO_VENV/.requirements"
fi

echo "setup: building mezo (release; the first build compiles libtorch bindings, a few minutes)"
cargo build --release --locked --bin mezo
