#!/usr/bin/env bash
# Layer-store benchmark: image import vs tar -x into ext4 on a plain loop file, container create+mount
# latency (p50, p99) with 1, 100 and CONTAINERS containers present, and pool data per container.
#
#   bench/layers.sh [WORKDIR]     (root; default: a fresh directory under /var/tmp, removed unless KEEP=1)
#
# Environment: CONTAINERS (default 1000), SAMPLES (per level, default 50), FILES (files in the big
# layer, default 3000), PLOT (PNG path, default bench/out/layers.png).  A devmapper daemon with device
# files and loop devices runs for the duration (links in WORKDIR/mapper); everything is undone on exit.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
PY=${PY:-$ROOT/.venv/bin/python}
WORK=${1:-$(mktemp -d /var/tmp/layers-bench.XXXXXX)}
export DEVMAPPER_RUNTIME_DIR="$WORK/run" DEVMAPPER_STATE_DIR="$WORK/state" DEVMAPPER_NO_AUTOSTART=1
DAEMON=

cleanup() {
    set +e
    grep -o " $WORK[^ ]*" /proc/self/mounts | sort -r | while read -r m; do
        [ "$m" = "$WORK/run/devices" ] || umount -l "$m"
    done
    if [ -n "$DAEMON" ]; then kill "$DAEMON" 2>/dev/null && wait "$DAEMON" 2>/dev/null; fi
    [ "${KEEP:-0}" = 1 ] || rm -rf "$WORK"
}
trap cleanup EXIT

[ "$(id -u)" = 0 ] || { echo "layers.sh: needs root (loop devices, mount)" >&2; exit 1; }
mkdir -p "$WORK"
"$PY" -m devmapper.cli.main daemon --mapper-dir "$WORK/mapper" --log-file "$WORK/daemon.log" &
DAEMON=$!
for _ in $(seq 100); do [ -S "$WORK/run/control" ] && break; sleep 0.1; done
"$PY" "$HERE/layers_bench.py" --runtime-dir "$WORK/run" --work "$WORK" --containers "${CONTAINERS:-1000}" \
    --samples "${SAMPLES:-50}" --files "${FILES:-3000}" --plot "${PLOT:-$ROOT/bench/out/layers.png}"
