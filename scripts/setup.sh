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

# Debian's prometheus package: promtool checks the coordinator's /metrics and deploy/prometheus/,
# and a real prometheus scrapes a live coordinator for the dashboards test.
if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing prometheus and promtool (Debian package prometheus)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null
  else
    echo "setup: prometheus/promtool missing; install Debian's prometheus package (the metrics, dashboards and deploy tests need it)" >&2
  fi
fi

echo "setup: building mezo (release; the first build compiles libtorch bindings, a few minutes)"
cargo build --release --locked --bin mezo
