#!/usr/bin/env bash
# NBD benchmark: devmapper's NBD server on a thin volume vs qemu-nbd/qcow2, nbdkit file and the raw file.
#
#   bench/nbd.sh [WORKDIR]        (default: a fresh directory under /var/tmp; kept with KEEP=1)
#
# Environment: RUNTIME (s per fio job, default 4), RAMP (s, default 1), ROUNDS (main table, 3),
# DEPTH_ROUNDS (snapshot-depth rows, 3), SIZE_MIB (1024), DEPTH (100),
# WORKERS (worker threads per connection of our server, default 4), NO_PIN=1 to skip CPU pinning.
#
# One run, one disk: every file lives in WORKDIR.  All NBD traffic is fio's nbd engine over unix
# sockets (one connection per job).  All servers run for the whole benchmark; within each row the
# targets take turns and the rows are repeated ROUNDS times; the report keeps each target's best
# round (interference from other work on the machine only ever slows a job down).  Targets:
#   ours         devmapper nbd serving a fully written thin volume (page cache: our engine does
#                buffered pread/pwrite, like qemu's cache=writeback and nbdkit's file plugin)
#   qcow2wb      qemu-nbd on a fully written qcow2 (64 KiB clusters), --cache=writeback --aio=threads
#                (qemu-nbd's default; the like-for-like comparison)
#   qcow2direct  the same image with --cache=none --aio=native (O_DIRECT; for reference)
#   nbdkit       nbdkit's file plugin on the raw image (page cache)
#   raw          fio libaio with O_DIRECT on the raw image: the physical limit of the disk
# Snapshot depth: random 4 KiB reads from the volume at depth 1, 10, 100 of our snapshot chain and of
# a qcow2 backing chain (populated base + 4 MiB per layer), qemu-nbd --cache=writeback, read-only.
# With two cores the servers run on CPU 1 and fio on CPU 0 (taskset) unless NO_PIN=1.
# Before every job: `sync` (no job pays for writing back another's dirty pages) and a read of the
# whole export through its server (nbdcopy to null:), so every page-cache target starts warm.  The
# page cache does not keep idle files: a VM's reclaim (here DAMON pageout of file pages unused for a
# minute) empties it between a target's turns, and a job that starts cold measures the disk.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
PY=${PY:-$ROOT/.venv/bin/python}
DEVMAPPER=${DEVMAPPER:-$ROOT/.venv/bin/devmapper}
RUNTIME=${RUNTIME:-4}
ROUNDS=${ROUNDS:-3}
DEPTH_ROUNDS=${DEPTH_ROUNDS:-3}
RAMP=${RAMP:-1}
SIZE_MIB=${SIZE_MIB:-1024}
DEPTH=${DEPTH:-100}
WORKERS=${WORKERS:-4}
WORK=${1:-$(mktemp -d /var/tmp/nbd-bench.XXXXXX)}
mkdir -p "$WORK/results"
cd "$WORK"

for tool in fio qemu-img qemu-io qemu-nbd nbdkit nbdinfo; do
    command -v "$tool" >/dev/null || { echo "nbd.sh: $tool is missing" >&2; exit 2; }
done
if [[ -z ${NO_PIN:-} ]] && command -v taskset >/dev/null && [[ $(nproc) -ge 2 ]]; then
    SRV=(taskset -c 1); CLI=(taskset -c 0); PIN="servers on CPU 1, fio on CPU 0"
else
    SRV=(); CLI=(); PIN="no CPU pinning"
fi

PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [[ -n ${KEEP:-} ]] || rm -rf "$WORK"
}
trap cleanup EXIT

start() {  # start NAME SOCKET URI COMMAND...: run a server in the background, wait until it answers
    local name=$1 sock=$2 uri=$3; shift 3
    rm -f "$sock"
    "${SRV[@]}" "$@" >"$WORK/$name.log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 100); do
        nbdinfo --size "$uri" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "nbd.sh: server $name did not come up:" >&2
    cat "$WORK/$name.log" >&2
    exit 1
}

stop_all() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    PIDS=()
}

declare -A ROW=(
    [seqread-1M-qd1]="--rw=read --bs=1M --iodepth=1"
    [seqwrite-1M-qd1]="--rw=write --bs=1M --iodepth=1"
    [randread-4k-qd1]="--rw=randread --bs=4k --iodepth=1"
    [randread-4k-qd32]="--rw=randread --bs=4k --iodepth=32"
    [randwrite-4k-qd1]="--rw=randwrite --bs=4k --iodepth=1"
    [randwrite-4k-qd32]="--rw=randwrite --bs=4k --iodepth=32"
)
MAIN_ROWS=(seqread-1M-qd1 seqwrite-1M-qd1 randread-4k-qd1 randread-4k-qd32 randwrite-4k-qd1 randwrite-4k-qd32)

warm() {  # warm TARGET: flush dirty pages, then read the target's export through its server
    sync
    case $1 in
        raw | qcow2direct) ;;  # O_DIRECT: the page cache is not theirs to use
        *) nbdcopy "${URI[$1]}" null: 2>/dev/null || true ;;
    esac
}

job() {  # job TARGET ROW ROUND ENGINE-ARGS...
    local target=$1 row=$2 round=$3; shift 3
    warm "$target"
    # shellcheck disable=SC2086
    "${CLI[@]}" fio --name="$target-$row" ${ROW[$row]} --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" \
        --size="${SIZE_MIB}M" --output-format=json --output="results/${target}__${row}__r${round}.json" "$@" >/dev/null 2>&1 \
        || { echo "nbd.sh: fio failed for $target $row" >&2; exit 1; }
    printf .
}

t_start=$(date +%s)
echo "== setup in $WORK ($SIZE_MIB MiB volumes, chain depth $DEPTH; $PIN)"
"$PY" "$HERE/nbd_bench.py" setup "$WORK" --size-mib "$SIZE_MIB" --depth "$DEPTH"
qemu-img convert -f raw -O qcow2 -o cluster_size=64k raw.img single.qcow2
cp single.qcow2 single-direct.qcow2
qemu-img convert -f raw -O qcow2 -o cluster_size=64k raw.img s0.qcow2
for i in $(seq 1 $((DEPTH - 1))); do
    qemu-img create -q -f qcow2 -o cluster_size=64k -F qcow2 -b "s$((i - 1)).qcow2" "s$i.qcow2"
    qemu-io -f qcow2 -c "write -q -P $((i % 256)) $(( (i * 8) % (SIZE_MIB - 4) ))M 4M" "s$i.qcow2"
done

echo "== servers"
U_OURS="nbd+unix:///vol?socket=$WORK/ours.sock"
start ours ours.sock "$U_OURS" "$DEVMAPPER" nbd --metadata meta --data data --size "${SIZE_MIB}M" \
    --thin 1000:vol --thin 0:d1 --thin 9:d10 --thin $((DEPTH - 1)):d100 --workers "$WORKERS" --socket ours.sock
U_QWB="nbd+unix:///?socket=$WORK/qwb.sock"
start qcow2wb qwb.sock "$U_QWB" qemu-nbd -k "$WORK/qwb.sock" -f qcow2 --cache=writeback -t single.qcow2
U_QD="nbd+unix:///?socket=$WORK/qd.sock"
start qcow2direct qd.sock "$U_QD" qemu-nbd -k "$WORK/qd.sock" -f qcow2 --cache=none --aio=native -t single-direct.qcow2
U_KIT="nbd+unix:///?socket=$WORK/kit.sock"
start nbdkit kit.sock "$U_KIT" nbdkit -f -U "$WORK/kit.sock" file raw.img
declare -A URI=([ours]=$U_OURS [qcow2wb]=$U_QWB [qcow2direct]=$U_QD [nbdkit]=$U_KIT)
for n in 1 10 100; do
    top="s$((n - 1)).qcow2"
    URI[qcow2wb-d$n]="nbd+unix:///?socket=$WORK/q$n.sock"
    start "qcow2-d$n" "q$n.sock" "${URI[qcow2wb-d$n]}" qemu-nbd -r -k "$WORK/q$n.sock" -f qcow2 --cache=writeback -t "$top"
    URI[ours-d$n]="nbd+unix:///d$n?socket=$WORK/ours.sock"
done

target_args() {  # the fio engine arguments of a target
    if [[ $1 == raw ]]; then echo "--ioengine=libaio --direct=1 --filename=raw.img"
    else echo "--ioengine=nbd --uri=${URI[$1]}"; fi
}

# Targets take turns within each row and the rows are repeated ROUNDS times, so a burst of load from
# elsewhere on the machine hits every target alike; the report keeps each target's best round.
for r in $(seq "$ROUNDS"); do
    echo "== round $r/$ROUNDS: main table (fio ${RUNTIME}s + ${RAMP}s ramp per job)"
    for row in "${MAIN_ROWS[@]}"; do
        for t in ours qcow2wb qcow2direct nbdkit raw; do
            # shellcheck disable=SC2046
            job "$t" "$row" "$r" $(target_args "$t")
        done
    done
    echo
done
for r in $(seq "$DEPTH_ROUNDS"); do
    echo "== round $r/$DEPTH_ROUNDS: snapshot depth"
    for row in randread-4k-qd1 randread-4k-qd32; do
        for n in 1 10 100; do
            for t in "ours-d$n" "qcow2wb-d$n"; do
                # shellcheck disable=SC2046
                job "$t" "$row" "$r" $(target_args "$t")
            done
        done
    done
    echo
done
stop_all

if ! "$PY" -c "import matplotlib" 2>/dev/null; then
    "$PY" -m pip install -q matplotlib >/dev/null 2>&1 || echo "nbd.sh: matplotlib could not be installed; no plot"
fi
"$PY" "$HERE/nbd_bench.py" report "$WORK" --png "${PNG:-$ROOT/bench/nbd.png}" || true
echo "== total $(( $(date +%s) - t_start )) s"
