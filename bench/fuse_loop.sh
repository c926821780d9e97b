#!/usr/bin/env bash
# FUSE + loop benchmark: fio on ext4 on /dev/mapper/NAME (a thin volume: loop device with
# --direct-io=on over the daemon's FUSE file) vs ext4 on a plain loop device over a sparse file.
#
#   bench/fuse_loop.sh [WORKDIR]      (root; default: a fresh directory under /var/tmp, removed unless KEEP=1)
#
# Environment: RUNTIME (s per fio job, default 5), SIZE_MIB (fio file size, default 256),
# MAPPER_DIR (where the daemon links NAME -> loop device; default /dev/mapper).
# Both filesystems are made the same way (mkfs.ext4 -q, mounted with defaults) on 1 GiB devices; the
# pool's data and metadata are sparse files behind loop devices in WORKDIR, like the plain loop's
# file.  fio runs psync with O_DIRECT on a file in the filesystem: 4 KiB random read and write at
# depth 1, and 1 MiB sequential write and read.  One line per job: IOPS and MB/s for both targets.
# Everything is undone on exit (unmount, remove devices, stop the daemon, detach loop devices).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
PY=${PY:-$ROOT/.venv/bin/python}
RUNTIME=${RUNTIME:-5}
SIZE_MIB=${SIZE_MIB:-256}
MAPPER_DIR=${MAPPER_DIR:-/dev/mapper}
WORK=${1:-$(mktemp -d /var/tmp/fuse-loop-bench.XXXXXX)}
NAME="fuseloop$$"
export DEVMAPPER_RUNTIME_DIR="$WORK/run" DEVMAPPER_STATE_DIR="$WORK/state" DEVMAPPER_NO_AUTOSTART=1
UDM=("$PY" -m devmapper.cli.udmsetup)
LOOPS=()
DAEMON=

cleanup() {
    set +e
    for m in "$WORK/mnt-dm" "$WORK/mnt-loop"; do mountpoint -q "$m" && umount "$m"; done
    if [ -n "$DAEMON" ]; then
        "${UDM[@]}" remove "$NAME" >/dev/null 2>&1
        "${UDM[@]}" remove "$NAME-pool" >/dev/null 2>&1
        kill "$DAEMON" 2>/dev/null && wait "$DAEMON" 2>/dev/null
    fi
    for l in "${LOOPS[@]}"; do losetup -d "$l"; done
    [ "${KEEP:-0}" = 1 ] || rm -rf "$WORK"
}
trap cleanup EXIT

[ "$(id -u)" = 0 ] || { echo "fuse_loop.sh: needs root (loop devices, mount)" >&2; exit 1; }
mkdir -p "$WORK/mnt-dm" "$WORK/mnt-loop"
loop() { truncate -s "$2" "$WORK/$1"; LOOP=$(losetup -f --show "$WORK/$1"); LOOPS+=("$LOOP"); }

"$PY" -m devmapper.cli.main daemon --mapper-dir "$MAPPER_DIR" --log-file "$WORK/daemon.log" &
DAEMON=$!
for _ in $(seq 100); do [ -S "$WORK/run/control" ] && break; sleep 0.1; done
loop data.img 2G; DATA=$LOOP; loop meta.img 64M; META=$LOOP
"${UDM[@]}" create "$NAME-pool" --table "0 4194304 thin-pool $META $DATA 128 32768 1 skip_block_zeroing"
"${UDM[@]}" message "$NAME-pool" 0 "create_thin 0"
"${UDM[@]}" create "$NAME" --table "0 2097152 thin /dev/mapper/$NAME-pool 0"
loop plain.img 1G; PLAIN=$LOOP
mkfs.ext4 -q "$MAPPER_DIR/$NAME"; mount "$MAPPER_DIR/$NAME" "$WORK/mnt-dm"
mkfs.ext4 -q "$PLAIN"; mount "$PLAIN" "$WORK/mnt-loop"

job() {  # job DIR RW BS -> "IOPS MB/s"
    fio --name=b --directory="$1" --filename=bench.dat --size="${SIZE_MIB}M" --rw="$2" --bs="$3" \
        --ioengine=psync --direct=1 --time_based --runtime="$RUNTIME" --ramp_time=1 --output-format=json \
        | "$PY" -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; s=j["read"] if j["read"]["io_bytes"] else j["write"]; print("%.0f %.0f" % (s["iops"], s["bw_bytes"] / 1e6))'
}
for d in "$WORK/mnt-dm" "$WORK/mnt-loop"; do  # lay the file out first (reads of holes are not I/O)
    fio --name=fill --directory="$d" --filename=bench.dat --size="${SIZE_MIB}M" --rw=write --bs=1M \
        --ioengine=psync --direct=1 >/dev/null
done
printf '%-22s %22s %22s\n' "fio psync O_DIRECT" "ext4 on /dev/mapper" "ext4 on plain loop"
for spec in "randread 4k" "randwrite 4k" "write 1M" "read 1M"; do
    set -- $spec
    a=($(job "$WORK/mnt-dm" "$1" "$2")); b=($(job "$WORK/mnt-loop" "$1" "$2"))
    printf '%-22s %10s IOPS %4s MB/s %10s IOPS %4s MB/s\n' "$1 $2 qd1" "${a[0]}" "${a[1]}" "${b[0]}" "${b[1]}"
done
