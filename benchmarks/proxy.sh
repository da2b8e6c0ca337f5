#!/bin/sh
# proxybench side by side: direct, xdg-dbus-proxy --filter, and our service.
#
# "ours" is a filtered server minted by AddServer (policy: talk to the echo
# name), served by `python -m xdg_containers serve` started by benchmarks/mint.py;
# proxybench's "xdg-filter" is `xdg-dbus-proxy --filter --talk=NAME`.
#
#   benchmarks/proxy.sh                      # full run, 1 and 4 clients (~2-3 min)
#   benchmarks/proxy.sh --quick              # smoke run
#   benchmarks/proxy.sh --wait-quiet 60 --json /tmp/proxy.json
#
# The last lines compare ours with xdg-filter directly (benchmarks/proxy_ratio.py):
# rate ratio (>= 1.00 meets the issue's target) and proxy-CPU ratio per scenario.
#
# Extra arguments go to proxybench unchanged (later options override earlier
# ones, so e.g. `--clients 1` or `--variants xdg,xdg-filter` work).
#
# Environment:
#   PROXYBENCH  path to proxybench (default: ../shared/bench/proxybench next to the repo)
#   PY          Python for the service (default: .venv/bin/python, /tmp/venv0/bin/python, python3)
set -eu

here=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$here/.." && pwd)

if [ -n "${PROXYBENCH:-}" ]; then
    bench=$PROXYBENCH
else
    bench=
    for candidate in "$REPO/../shared/bench/proxybench" "$here/../../shared/bench/proxybench"; do
        if [ -f "$candidate" ]; then
            bench=$candidate
            break
        fi
    done
fi
if [ -z "$bench" ] || [ ! -f "$bench" ]; then
    echo "proxy.sh: proxybench not found; set PROXYBENCH=/path/to/proxybench" >&2
    exit 2
fi

if [ -z "${PY:-}" ]; then
    if [ -x "$REPO/.venv/bin/python" ] && "$REPO/.venv/bin/python" -c 'import dbus_fast' 2>/dev/null; then
        PY=$REPO/.venv/bin/python
    elif [ -x /tmp/venv0/bin/python ]; then
        PY=/tmp/venv0/bin/python
    else
        PY=python3
    fi
fi
if ! "$PY" -c 'import dbus_fast' 2>/dev/null; then
    echo "proxy.sh: $PY cannot import dbus_fast (set PY=, or run tools/bootstrap once to make .venv)" >&2
    exit 2
fi

# proxybench runs the template through shlex: quote paths that may hold spaces.
q() { printf "'%s'" "$(printf %s "$1" | sed "s/'/'\\\\''/g")"; }

if [ -x "$bench" ]; then
    runner=
else
    runner=python3
fi
# The JSON results feed the ours/xdg-filter summary printed at the end
# (benchmarks/proxy_ratio.py); a --json given by the caller is used as is.
json=
prev=
for arg in "$@"; do
    if [ "$prev" = "--json" ]; then json=$arg; fi
    case $arg in --json=*) json=${arg#--json=} ;; esac
    prev=$arg
done
tmpjson=
if [ -z "$json" ]; then
    tmpjson=$(mktemp "${TMPDIR:-/tmp}/proxy-sh.XXXXXX.json")
    json=$tmpjson
    set -- "$@" --json "$json"
fi
status=0
${runner} "$bench" --variants xdg-filter \
    --proxy ours "$(q "$PY") $(q "$REPO/benchmarks/mint.py") {bus} --filter --talk {name}" \
    --clients 1,4 \
    "$@" || status=$?
if [ "$status" -eq 0 ] && [ -s "$json" ]; then
    python3 "$REPO/benchmarks/proxy_ratio.py" "$json"
fi
[ -n "$tmpjson" ] && rm -f "$tmpjson"
exit "$status"
