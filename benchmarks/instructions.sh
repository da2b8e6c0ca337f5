#!/bin/sh
# Instructions the service executes per call, counted by callgrind: repeatable where times
# are not (the same code and workload give the same count, whatever else the machine does).
#
#   benchmarks/instructions.sh lat  [COUNT]   # per round trip, one call in flight
#   benchmarks/instructions.sh tput [COUNT]   # per call, 256 in flight
#   benchmarks/instructions.sh conn [COUNT]   # per connection (spawn, Hello, 1 call, close)
#
# A private dbus-daemon, `dbus-test-tool echo`, our service under
# `valgrind --tool=callgrind` (started by benchmarks/mint.py, filtered, talk to the echo
# name), 50 warm-up calls, then the counters are zeroed, the workload runs and the counters
# are dumped. Counts user space only (the kernel's share of a syscall is not in it). Under
# valgrind the service runs ~50x slower, which changes batching: compare counts of the same
# scenario between versions, not with real-time figures.
#
# Environment: REPO (checkout to measure, default: this one), PY (its Python, default
# .venv/bin/python). Needs valgrind (callgrind_control).
set -eu

here=$(cd "$(dirname "$0")" && pwd)
REPO=${REPO:-$(cd "$here/.." && pwd)}
PY=${PY:-$here/../.venv/bin/python}
scenario=${1:-lat}
case $scenario in
    lat | tput) count=${2:-2000} ;;
    conn) count=${2:-100} ;;
    *) echo "usage: $0 lat|tput|conn [COUNT]" >&2; exit 2 ;;
esac
command -v callgrind_control >/dev/null || { echo "instructions.sh: needs valgrind" >&2; exit 2; }

d=$(mktemp -d "${TMPDIR:-/tmp}/xdgc-instr.XXXXXX")
pids=
cleanup() {
    for p in $pids; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$d"
}
trap cleanup EXIT INT TERM

cat >"$d/bus.conf" <<EOF
<busconfig><type>session</type><listen>unix:path=$d/bus.sock</listen><auth>EXTERNAL</auth>
<policy context="default"><allow send_destination="*"/><allow receive_sender="*"/><allow own="*"/></policy>
<limit name="max_replies_per_connection">100000</limit><limit name="reply_timeout">600000</limit>
</busconfig>
EOF
dbus-daemon --config-file="$d/bus.conf" --nofork --nopidfile 2>/dev/null &
pids="$pids $!"
while [ ! -S "$d/bus.sock" ]; do sleep 0.05; done
bus=unix:path=$d/bus.sock
name=com.example.ProxyBench.Echo
DBUS_SESSION_BUS_ADDRESS=$bus dbus-test-tool echo --name=$name &
pids="$pids $!"
sleep 0.3

cat >"$d/vg" <<EOF
#!/bin/sh
exec valgrind --tool=callgrind --callgrind-out-file=$d/cg.%p "$PY" "\$@"
EOF
chmod +x "$d/vg"
mkdir -m 700 "$d/runtime"
XDG_RUNTIME_DIR=$d/runtime "$PY" "$REPO/benchmarks/mint.py" "$bus" --filter --talk $name \
    --python "$d/vg" >"$d/address" 2>"$d/mint.log" &
mint=$!
pids="$pids $mint"
while [ ! -s "$d/address" ]; do
    if ! kill -0 "$mint" 2>/dev/null; then cat "$d/mint.log" >&2; exit 1; fi
    sleep 0.2
done
address=$(head -n 1 "$d/address")

spam() { DBUS_SESSION_BUS_ADDRESS=$address dbus-test-tool spam --dest=$name "$@"; }
case $scenario in
    lat) spam --count=50 --queue=1 ;;
    tput) spam --count=50 --queue=256 ;;
    conn) spam --count=1; spam --count=1 ;;
esac
callgrind_control -z >/dev/null 2>&1
case $scenario in
    lat) spam --count="$count" --queue=1 ;;
    tput) spam --count="$count" --queue=256 ;;
    conn) i=0; while [ $i -lt "$count" ]; do spam --count=1; i=$((i + 1)); done ;;
esac
callgrind_control -d >/dev/null 2>&1
sleep 1
dump=$(ls -t "$d"/cg.*.1 | head -n 1)
total=$(sed -n 's/^summary: \([0-9]*\).*/\1/p' "$dump")
per=$((total / count))
echo "SUMMARY instructions scenario=$scenario count=$count: $per per $( [ "$scenario" = conn ] && echo connection || echo call) (service user space, callgrind)"
