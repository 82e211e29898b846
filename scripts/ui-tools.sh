#!/usr/bin/env bash
# Installs what the dashboard's browser test needs: Debian's chromium (as
# root, through apt) and playwright-core from npm into target/tools/ui
# (git-ignored). Idempotent; prints nothing when both are there.
#   scripts/ui-tools.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ ! -x /usr/bin/chromium ]]; then
  if [[ $(id -u) -ne 0 ]]; then
    echo "ui-tools: chromium is missing and only root can install it (apt-get install chromium)" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
if [[ ! -d target/tools/ui/node_modules/playwright-core ]]; then
  mkdir -p target/tools/ui
  npm install --silent --no-audit --no-fund --prefix target/tools/ui playwright-core@1 >/dev/null
fi
