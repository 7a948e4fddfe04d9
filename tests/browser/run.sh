#!/usr/bin/env bash
# Runs the browser tests: headless Chromium against the real wsticket binary.
#
# Installs nothing. It needs Debian's chromium package, Node 20 or later, and
# `npm ci` run in this directory. It builds the debug binary with cargo unless
# WSTICKET_BIN names one. Exits non-zero when a prerequisite is missing or a
# test fails. An argument runs only the tests whose name contains it.
set -euo pipefail
if [[ -n ${WSTICKET_BIN:-} ]]; then
    WSTICKET_BIN=$(realpath "$WSTICKET_BIN")
    export WSTICKET_BIN
fi
cd "$(dirname "${BASH_SOURCE[0]}")"

chromium=${CHROMIUM:-/usr/bin/chromium}
missing=()
[[ -x $chromium ]] || missing+=("Chromium at $chromium (apt-get install chromium)")
command -v node >/dev/null 2>&1 || missing+=("node (apt-get install nodejs)")
[[ -d node_modules/playwright-core ]] || missing+=("node_modules/playwright-core (npm ci in tests/browser)")
if ((${#missing[@]})); then
    printf 'browser tests cannot run, missing: %s\n' "${missing[@]}" >&2
    exit 1
fi
node_major=$(node -p 'process.versions.node.split(".")[0]')
if ((node_major < 20)); then
    echo "browser tests need Node 20 or later, found $(node --version)" >&2
    exit 1
fi

if [[ -z ${WSTICKET_BIN:-} ]]; then
    (cd ../.. && cargo build --quiet --bin wsticket)
fi

exec node e2e.mjs "$@"
