#!/usr/bin/env bash
# Starts the FastAPI + Redis peer on loopback, in the background:
#   bench/peers/python/run.sh start WORKDIR PORT JWKS_FILE ISSUER AUDIENCE
#   bench/peers/python/run.sh stop WORKDIR
# `start` runs redis-server on 127.0.0.1:6390 (no persistence) and uvicorn
# with 2 workers on 127.0.0.1:PORT, waits until the ticket endpoint responds,
# and writes the process ids to WORKDIR/pids (uvicorn's parent and workers).
# Needs redis-server (Debian package) and requirements.txt installed.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
redis_port=6390

case "${1:-}" in
start)
    workdir="$2" port="$3" jwks="$4" issuer="$5" audience="$6"
    mkdir -p "$workdir"
    redis-server --bind 127.0.0.1 --port "$redis_port" --save '' --appendonly no \
        --daemonize no >"$workdir/redis.log" 2>&1 &
    echo $! >"$workdir/redis.pid"
    PEER_JWKS_FILE="$jwks" PEER_ISSUER="$issuer" PEER_AUDIENCE="$audience" \
        PEER_REDIS_URL="redis://127.0.0.1:$redis_port/0" \
        python3 -m uvicorn --app-dir "$here" app:app --host 127.0.0.1 --port "$port" \
        --workers 2 --no-access-log --log-level warning >"$workdir/uvicorn.log" 2>&1 &
    echo $! >"$workdir/uvicorn.pid"
    for _ in $(seq 100); do
        if python3 - "$port" <<'PY' 2>/dev/null; then break; fi
import http.client, sys
c = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=1)
c.request("POST", "/websocket/ticket")
sys.exit(0 if c.getresponse().status == 401 else 1)
PY
        sleep 0.2
    done
    parent="$(cat "$workdir/uvicorn.pid")"
    { echo "$parent"; pgrep -P "$parent" || true; } >"$workdir/pids"
    ;;
stop)
    workdir="$2"
    for file in "$workdir/uvicorn.pid" "$workdir/redis.pid"; do
        [ -f "$file" ] && kill "$(cat "$file")" 2>/dev/null || true
    done
    ;;
*)
    echo "usage: $0 start WORKDIR PORT JWKS_FILE ISSUER AUDIENCE | stop WORKDIR" >&2
    exit 2
    ;;
esac
